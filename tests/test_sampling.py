"""Sampling: each processor equals Transformers' LogitsProcessor (no_repeat_ngram_size and bad_words_ids
included), top_k=1 is greedy, the empirical distribution of draws matches the processed softmax
(chi-square), top-p stays in the nucleus, per-row knobs equal each row alone, bad values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gptj_jax.sampling import (
    SamplingError,
    SamplingParams,
    apply_bad_words,
    apply_min_p,
    apply_no_repeat_ngram,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    bad_words_table,
    process_logits,
    prompt_keys,
    row_keys,
    sample,
)

B, V = 6, 300


def _logits(seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.RandomState(seed).randn(B, V) * scale).astype(np.float32)


def _same(ours, theirs) -> None:
    """Equal -inf pattern and finite values within 1e-6 (relative)."""
    ours, theirs = np.asarray(ours), theirs.numpy()
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


def test_repetition_penalty_matches_transformers():
    logits = _logits(1)
    ids = np.random.RandomState(2).randint(0, V, (B, 20))
    seen = np.zeros((B, V), bool)
    seen[np.arange(B)[:, None], ids] = True
    for penalty in (1.3, 0.7):
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(ids), torch.tensor(logits))
        _same(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), jnp.float32(penalty)), theirs)


@pytest.mark.parametrize("t", [0.3, 1.7])
def test_temperature_matches_transformers(t):
    logits = _logits(3)
    theirs = TemperatureLogitsWarper(t)(None, torch.tensor(logits))
    _same(apply_temperature(jnp.asarray(logits), jnp.float32(t)), theirs)


@pytest.mark.parametrize("k", [1, 5, 40, 300, 1000])
def test_top_k_matches_transformers(k):
    from gptj_jax.sampling import top_k_bucket

    logits = _logits(4)
    theirs = TopKLogitsWarper(k)(None, torch.tensor(logits))
    _same(apply_top_k(jnp.asarray(logits), jnp.int32(k), top_k_bucket(k)), theirs)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999, 1.0])
def test_top_p_matches_transformers(p):
    logits = _logits(5)
    theirs = TopPLogitsWarper(p)(None, torch.tensor(logits))
    _same(apply_top_p(jnp.asarray(logits), jnp.float32(p)), theirs)


@pytest.mark.parametrize("m", [0.0, 0.05, 0.3, 1.0])
def test_min_p_matches_transformers(m):
    logits = _logits(6)
    theirs = MinPLogitsWarper(m)(None, torch.tensor(logits))
    _same(apply_min_p(jnp.asarray(logits), jnp.float32(m)), theirs)


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.2),
        dict(temperature=1.3, top_k=0, top_p=0.6, repetition_penalty=0.9),
        dict(temperature=0.5, top_k=7),
        dict(top_p=0.3, min_p=0.2),
    ],
)
def test_processor_chain_matches_transformers_order(kw):
    """All processors together, in Transformers' order (penalty, temperature, top-k, top-p, min-p)."""
    logits = _logits(7)
    ids = np.random.RandomState(8).randint(0, V, (B, 30))
    seen = np.zeros((B, V), bool)
    seen[np.arange(B)[:, None], ids] = True
    chain = LogitsProcessorList()
    if kw.get("repetition_penalty", 1.0) != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]))
    if kw.get("temperature", 1.0) != 1.0:
        chain.append(TemperatureLogitsWarper(kw["temperature"]))
    if kw.get("top_k", 0):
        chain.append(TopKLogitsWarper(kw["top_k"]))
    if kw.get("top_p", 1.0) < 1.0:
        chain.append(TopPLogitsWarper(kw["top_p"]))
    if kw.get("min_p", 0.0) > 0:
        chain.append(MinPLogitsWarper(kw["min_p"]))
    theirs = chain(torch.tensor(ids), torch.tensor(logits))
    params = SamplingParams(do_sample=True, **kw)
    ours = process_logits(jnp.asarray(logits), params.spec(), params.knobs(), seen=jnp.asarray(seen))
    _same(ours, theirs)


def test_top_k_1_equals_greedy():
    logits = jnp.asarray(_logits(9, scale=0.3))  # flat-ish: sampling without top-k would often differ
    greedy = SamplingParams(do_sample=False)
    top1 = SamplingParams(do_sample=True, top_k=1, temperature=1.5)
    keys = row_keys(0, B)
    want, _ = sample(logits, keys, jnp.int32(0), greedy.spec(), greedy.knobs())
    for step in range(5):
        got, lp = sample(logits, keys, jnp.int32(step), top1.spec(), top1.knobs())
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(lp, 0.0, atol=1e-6)  # the only token left has probability 1


def test_chi_square_matches_processed_softmax():
    """20000 draws of one row (one key per draw): the histogram matches softmax(processed logits)."""
    v = 12
    row = np.random.RandomState(10).randn(v).astype(np.float32) * 1.5
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=9, top_p=0.95)
    spec, knobs = params.spec(), params.knobs()
    n = 20000
    logits = jnp.broadcast_to(jnp.asarray(row), (n, v))
    tokens, _ = jax.jit(lambda l, k: sample(l, k, jnp.int32(3), spec, knobs))(logits, row_keys(1234, n))
    processed = np.asarray(process_logits(jnp.asarray(row)[None], spec, knobs))[0].astype(np.float64)
    probs = np.exp(processed - processed.max())
    probs /= probs.sum()
    counts = np.bincount(np.asarray(tokens), minlength=v)
    assert counts[probs == 0].sum() == 0, "drew a filtered token"
    keep = probs > 0
    assert keep.sum() >= 5
    expected = probs[keep] / probs[keep].sum() * n
    _, pvalue = stats.chisquare(counts[keep], expected)
    assert pvalue > 1e-3, (counts, probs * n)


def test_top_p_never_leaves_nucleus():
    """Over many draws from many random rows, every token is in the nucleus computed independently."""
    rng = np.random.RandomState(11)
    n, v, p = 4000, 50, 0.6
    logits = (rng.randn(n, v) * 2).astype(np.float32)
    params = SamplingParams(do_sample=True, top_p=p)
    tokens, _ = jax.jit(lambda l, k: sample(l, k, jnp.int32(0), params.spec(), params.knobs()))(
        jnp.asarray(logits), row_keys(5, n)
    )
    tokens = np.asarray(tokens)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for i in range(n):
        order = np.argsort(-probs[i])
        mass_before = np.concatenate([[0.0], np.cumsum(probs[i][order])[:-1]])
        nucleus = set(order[mass_before < p].tolist())  # largest tokens until the mass reaches p
        assert tokens[i] in nucleus, (i, tokens[i], sorted(nucleus))


def test_row_keys_are_per_row():
    """A row's draws depend on its own key only, not on the other rows of the batch."""
    logits = jnp.asarray(_logits(12, scale=0.5))
    params = SamplingParams(do_sample=True)
    full, _ = sample(logits, row_keys(7, B), jnp.int32(2), params.spec(), params.knobs())
    part, _ = sample(logits[:2], row_keys(7, 2), jnp.int32(2), params.spec(), params.knobs())
    np.testing.assert_array_equal(np.asarray(full)[:2], part)


@pytest.mark.parametrize(
    "kw, option",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_bad_values_name_the_option(kw, option):
    with pytest.raises(SamplingError, match=option) as info:
        SamplingParams(**kw)
    assert info.value.option == option


@pytest.mark.parametrize(
    "kw, option",
    [
        (dict(do_sample=True, temperature=float("inf")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    ],
)
def test_non_finite_values_name_the_option(kw, option):
    with pytest.raises(SamplingError, match=f"{option} must be a finite number") as info:
        SamplingParams(**kw)
    assert info.value.option == option


def test_numpy_scalars_are_python_numbers():
    """np.float32 / np.int64 knobs are accepted and stored as Python numbers (same spec and knobs)."""
    py = SamplingParams(do_sample=True, temperature=0.5, top_k=7, top_p=0.75, min_p=0.125, repetition_penalty=1.5)
    npy = SamplingParams(do_sample=True, temperature=np.float32(0.5), top_k=np.int64(7), top_p=np.float32(0.75),
                         min_p=np.float64(0.125), repetition_penalty=np.float16(1.5))
    assert npy == py and type(npy.temperature) is float and type(npy.top_k) is int
    assert npy.spec() == py.spec()
    with pytest.raises(SamplingError, match="top_k"):
        SamplingParams(top_k=np.float32(3.0))


def test_seed_keys_keep_32_bit_seeds_and_use_the_high_word():
    """Seeds < 2**32 keep jax.random.PRNGKey(seed); 2**32 is key [1, 0], not seed 0; up to 2**64 - 1."""
    def folded(key, n):
        return np.asarray(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n, dtype=jnp.uint32)))

    for seed in (0, 7, 2**31 + 3, 2**32 - 1):
        want = folded(jax.random.PRNGKey(seed), 3)
        np.testing.assert_array_equal(row_keys(seed, 3), want)
        np.testing.assert_array_equal(prompt_keys([seed], 3, 4)[:3], want)
    for seed, key in ((2**32, [1, 0]), (2**32 + 5, [1, 5]), (2**64 - 1, [2**32 - 1, 2**32 - 1])):
        want = folded(jnp.asarray(key, jnp.uint32), 3)
        np.testing.assert_array_equal(row_keys(seed, 3), want)
        np.testing.assert_array_equal(prompt_keys([seed], 3, 3), want)
    assert not np.array_equal(row_keys(2**32, 3), row_keys(0, 3))
    for bad in (2**64, -1):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
            row_keys(bad, 1)


# ============================================================================ n-gram rule, bad words
def _history(seed: int, rows: int, length: int, alphabet: int) -> np.ndarray:
    """Token rows drawn from a small alphabet, so that n-grams repeat."""
    return np.random.RandomState(seed).randint(0, alphabet, (rows, length)).astype(np.int64)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_transformers(n):
    logits = _logits(20 + n)
    ids = _history(30 + n, B, 25, 6)
    if n > 1:
        ids[:, 5:5 + n - 1] = ids[:, 1 - n:]  # the row's last n - 1 tokens occurred before: a ban in every row
    theirs = NoRepeatNGramLogitsProcessor(n)(torch.tensor(ids), torch.tensor(logits))
    assert np.isneginf(theirs.numpy()).any(axis=1).all()  # something is banned in every row
    ours = apply_no_repeat_ngram(jnp.asarray(logits), jnp.asarray(ids, jnp.int32), jnp.int32(ids.shape[1]),
                                 jnp.int32(n), n)
    _same(ours, theirs)
    # through the chain, with a per-row size [R] (the largest is compiled in): row r uses sizes[r]
    sizes = np.array([n, 0, 1, n, 2, 3][:B], np.int32)
    spec = SamplingParams(no_repeat_ngram_size=n).spec()._replace(no_repeat_ngram=max(n, 3))
    knobs = dict(SamplingParams().knobs(), no_repeat_ngram_size=jnp.asarray(sizes))
    ours = process_logits(jnp.asarray(logits), spec, knobs, history=jnp.asarray(ids, jnp.int32),
                          history_end=jnp.full((B,), ids.shape[1], jnp.int32))
    for r, size in enumerate(sizes):
        want = torch.tensor(logits[r:r + 1])
        if size:
            want = NoRepeatNGramLogitsProcessor(int(size))(torch.tensor(ids[r:r + 1]), want)
        _same(ours[r:r + 1], want)


def test_no_repeat_ngram_ignores_pads_and_unwritten_slots():
    """A row of the history with -1 (left pads, slots not written yet) and its own end equals the row's real
    tokens alone through Transformers (pads never take part in an n-gram)."""
    logits = _logits(40)
    L = 30
    history = np.full((B, L), -1, np.int64)
    real, ends = [], []
    for r in range(B):
        n_pad, n_tok = r * 2, 12 + r
        toks = _history(50 + r, 1, n_tok, 5)[0]
        history[r, n_pad:n_pad + n_tok] = toks
        real.append(toks)
        ends.append(n_pad + n_tok)
    for n in (2, 3):
        ours = apply_no_repeat_ngram(jnp.asarray(logits), jnp.asarray(history, jnp.int32),
                                     jnp.asarray(ends, jnp.int32), jnp.int32(n), n)
        for r in range(B):
            theirs = NoRepeatNGramLogitsProcessor(n)(torch.tensor(real[r][None]), torch.tensor(logits[r:r + 1]))
            _same(ours[r:r + 1], theirs)


BAD_WORDS = [[7], [3, 4], [1, 2, 3], [4, 4, 4, 2], [9], [5, 0]]


@pytest.mark.parametrize("eos", [None, [9], [7, 9]])
def test_bad_words_match_transformers(eos):
    """Single-token words always banned, longer ones when the row ends with their prefix; one-token words
    equal to an EOS id are dropped (Transformers' rule)."""
    logits = _logits(60)
    ids = _history(61, B, 12, 6)
    ids[0, -2:] = [1, 2]  # rows ending with prefixes of the multi-token words
    ids[1, -1] = 3
    ids[2, -3:] = [4, 4, 4]
    ids[3, -1] = 5
    theirs = NoBadWordsLogitsProcessor(BAD_WORDS, eos)(torch.tensor(ids), torch.tensor(logits))
    table = bad_words_table(BAD_WORDS, eos or [], V)
    kept = [w for w in BAD_WORDS if not (len(w) == 1 and w[0] in (eos or []))]
    assert table.shape == (8 if len(kept) > 4 else 4, 4)  # words and length rounded up to powers of two
    assert (table[:, -1] >= 0).sum() == len(kept)
    ours = apply_bad_words(jnp.asarray(logits), jnp.asarray(ids, jnp.int32), jnp.int32(ids.shape[1]),
                           jnp.asarray(table))
    _same(ours, theirs)
    assert np.isneginf(np.asarray(ours)[[0, 1, 2, 3], [3, 4, 2, 0]]).all()  # each multi-token word bit once
    # per-row tables [R, W, M]: row r bans only its own words
    tables = np.stack([bad_words_table(BAD_WORDS[r % 3::3] or [[8]], eos or [], V, min_words=2, min_length=4)
                       for r in range(B)])
    ours = apply_bad_words(jnp.asarray(logits), jnp.asarray(ids, jnp.int32), jnp.int32(ids.shape[1]),
                           jnp.asarray(tables))
    for r in range(B):
        theirs = NoBadWordsLogitsProcessor(BAD_WORDS[r % 3::3], eos)(torch.tensor(ids[r:r + 1]),
                                                                     torch.tensor(logits[r:r + 1]))
        _same(ours[r:r + 1], theirs)


def test_bad_words_table_errors_and_eos_only():
    from gptj_jax.generation_config import GenerationError

    assert bad_words_table([[9]], [9], V) is None  # every word is an EOS id: nothing to ban
    assert bad_words_table(None, [], V) is None
    with pytest.raises(GenerationError, match=r"bad_words_ids\[1\]\[1\] = 300 is outside the vocabulary \[0, 300\)"):
        bad_words_table([[1], [2, 300]], [], V)


def test_processor_chain_with_ngram_and_bad_words_matches_transformers_order():
    """Repetition penalty, n-gram rule, bad words, then temperature / top-k / top-p, as Transformers chains them."""
    logits = _logits(70)
    ids = _history(71, B, 20, 6)
    seen = np.zeros((B, V), bool)
    seen[np.arange(B)[:, None], ids] = True
    chain = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(2),
        NoBadWordsLogitsProcessor(BAD_WORDS, None), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
        TopPLogitsWarper(0.8),
    ])
    theirs = chain(torch.tensor(ids), torch.tensor(logits))
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3,
                            no_repeat_ngram_size=2)
    ours = process_logits(jnp.asarray(logits), params.spec(bad_words=True), params.knobs(), seen=jnp.asarray(seen),
                          history=jnp.asarray(ids, jnp.int32), history_end=jnp.int32(20),
                          bad_words=jnp.asarray(bad_words_table(BAD_WORDS, [], V)))
    _same(ours, theirs)


# ============================================================================ per-row knobs
ROWS = [
    SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.2),
    SamplingParams(),  # greedy
    SamplingParams(do_sample=True, top_p=0.5),  # top-p without top-k: the full-vocabulary sort
    SamplingParams(do_sample=True, temperature=1.5, top_k=3, no_repeat_ngram_size=2),
    SamplingParams(repetition_penalty=0.8, no_repeat_ngram_size=3),  # greedy with processors
    SamplingParams(do_sample=True, min_p=0.2),
]


def test_per_row_knobs_equal_each_row_alone():
    """Rows with different settings in one call (knobs [R], the merged spec) give each row what it gets alone:
    the same processed logits (hence log-probs) and the same token for the same key."""
    from gptj_jax.sampling import merge_specs, stack_knobs

    logits = jnp.asarray(_logits(80, scale=1.0))
    ids = _history(81, B, 16, 8)
    seen = np.zeros((B, V), bool)
    seen[np.arange(B)[:, None], ids] = True
    inputs = dict(seen=jnp.asarray(seen), history=jnp.asarray(ids, jnp.int32), history_end=jnp.int32(16))
    keys = row_keys(9, B)
    spec = merge_specs([p.spec() for p in ROWS])
    assert spec.do_sample and not spec.top_p_in_top_k and spec.no_repeat_ngram == 3
    fn = jax.jit(lambda l, k, s: sample(l, k, s, spec, stack_knobs(ROWS), **inputs))
    together = jax.jit(lambda l: process_logits(l, spec, stack_knobs(ROWS), **inputs))(logits)
    for step in (0, 3):
        tokens, logprobs = fn(logits, keys, jnp.full((B,), step, jnp.int32))
        for r, p in enumerate(ROWS):
            one = {k: v[r:r + 1] for k, v in inputs.items() if k != "history_end"}
            alone, lp = sample(logits[r:r + 1], keys[r:r + 1], jnp.int32(step), p.spec(), p.knobs(),
                               history_end=jnp.int32(16), **one)
            assert int(tokens[r]) == int(alone[0]), (r, step)
            np.testing.assert_allclose(logprobs[r], lp[0], rtol=1e-6, atol=1e-6)
            mine = process_logits(logits[r:r + 1], p.spec(), p.knobs(), history_end=jnp.int32(16), **one)
            np.testing.assert_array_equal(np.isneginf(together[r]), np.isneginf(mine[0]))
            np.testing.assert_allclose(np.where(np.isfinite(mine[0]), together[r], 0),
                                       np.where(np.isfinite(mine[0]), mine[0], 0), rtol=1e-6, atol=1e-6)


def test_sampling_params_validated_by_generation_config():
    """SamplingParams has no rules of its own: the same bad value gives GenerationConfig's error."""
    from gptj_jax import GenerationConfig

    for kw in (dict(top_p=0.0), dict(no_repeat_ngram_size=-1)):
        with pytest.raises(ValueError) as a:
            SamplingParams(**kw)
        with pytest.raises(ValueError) as b:
            GenerationConfig(**kw)
        assert str(a.value) == str(b.value) and type(a.value) is type(b.value)
    assert SamplingParams.from_config(GenerationConfig(do_sample=True, top_k=np.int64(5))).top_k == 5

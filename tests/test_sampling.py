"""Sampling: each processor equals Transformers' LogitsProcessor, top_k=1 is greedy, the empirical
distribution of draws matches the processed softmax (chi-square), top-p stays in the nucleus, bad values.
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
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gptj_jax.sampling import (
    SamplingError,
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
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

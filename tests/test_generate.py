"""Generation: greedy parity with transformers' ``generate``, cache correctness at every decode step,
EOS / min_new_tokens / stop strings / streaming / repeats / seeds / suppression, one compile per bucket,
the persistent compilation cache, a mesh, and the ``gptj-jax generate`` CLI (happy paths, resume,
and bad input: one error line, nothing written).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY, hf_model, left_padded_batch, params_of

from gptj_jax import GenerationConfig, GPTJConfig, GPTJForCausalLM
from gptj_jax import engine as engine_mod
from gptj_jax.cli import main as cli_main
from gptj_jax.generation import (
    TRACE_COUNTS,
    GenerationError,
    bucket,
    decode_step,
    generate,
    iter_generate,
    prefill,
)
from gptj_jax.sampling import SamplingError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = [9, 5, 1, 7, 12]
NEW = 40  # >= 32 new tokens
PAD = 0
# vocab 50400 so that GPT-J's tokenizer fits (stop strings, suppression, CLI)
WIDE = GPTJConfig(vocab_size=50400, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)


@pytest.fixture(scope="module")
def tiny():
    hf = hf_model(TINY, seed=0, scale=3.0)
    return hf, params_of(hf)


@pytest.fixture(scope="module")
def wide():
    hf = hf_model(WIDE, seed=0, scale=3.0)
    return hf, params_of(hf)


@pytest.fixture(scope="module")
def tokenizer():
    from gptj_jax.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, wide):
    path = tmp_path_factory.mktemp("tiny-gptj")
    wide[0].save_pretrained(path)
    return str(path)


def _hf_generate(hf, ids, mask, **kw):
    """transformers' greedy generate -> (sequences, raw logits per step, processed scores per step)."""
    out = hf.generate(
        torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=NEW,
        return_dict_in_generate=True, output_logits=True, output_scores=True, **kw,
    )
    return out.sequences.numpy(), [l.numpy() for l in out.logits], [s.numpy() for s in out.scores]


def _pick_eos(new_tokens: np.ndarray, how_many: int) -> list:
    """Token ids that end some rows inside the window (between new tokens 3 and 35) but not all rows."""
    rows = new_tokens.shape[0]
    for tok in np.unique(new_tokens):
        first = [np.flatnonzero(new_tokens[b] == tok) for b in range(rows)]
        ends = [f[0] for f in first if len(f)]
        if ends and all(3 <= e < 35 for e in ends) and 0 < len(ends) < rows:
            chosen = [int(tok)]
            if how_many == 2:  # a second id that ends one of the rows the first does not
                for tok2 in np.unique(new_tokens):
                    hit = [b for b in range(rows) if not len(first[b]) and 3 <= _first(new_tokens[b], tok2) < 35]
                    if hit and len(hit) < rows - len(ends):
                        return chosen + [int(tok2)]
                continue
            return chosen
    raise AssertionError("no suitable EOS token for this seed")


def _first(row: np.ndarray, tok) -> int:
    where = np.flatnonzero(row == tok)
    return int(where[0]) if len(where) else 10**9


# ============================================================================ greedy parity
@pytest.mark.parametrize("seed, n_eos, min_new", [(0, 1, 0), (1, 2, 0), (2, 1, 6)])
def test_greedy_matches_transformers(seed, n_eos, min_new):
    """Left-padded prompts of different lengths, 40 new tokens, EOS inside the window for some rows
    (one id, two ids, or with min_new_tokens): tokens equal transformers' greedy generate."""
    hf = hf_model(TINY, seed=seed, scale=10.0)
    params = params_of(hf)
    ids, mask, _ = left_padded_batch(TINY.vocab_size, LENGTHS, seed=seed)
    P = ids.shape[1]
    free, _, _ = _hf_generate(hf, ids, mask, pad_token_id=PAD)  # vocab 101: config's EOS 50256 never occurs
    eos = _pick_eos(free[:, P + min_new:], n_eos)
    ref, logits, scores = _hf_generate(hf, ids, mask, eos_token_id=eos, pad_token_id=PAD, min_new_tokens=min_new)

    out = generate(TINY, params, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD,
                   min_new_tokens=min_new, return_logprobs=True)
    assert out.sequences.shape == (len(LENGTHS), P + NEW)
    steps = ref.shape[1] - P
    np.testing.assert_array_equal(out.sequences[:, : P + steps], ref)
    assert (out.sequences[:, P + steps:] == PAD).all()
    reasons = set(out.finish_reasons)
    assert reasons == {"eos", "length"}, out.finish_reasons  # EOS inside the window for some rows only
    if min_new:
        assert out.num_new_tokens.min() > min_new
    # no near-ties: every greedy decision beat the runner-up by more than twice the 1e-4 logit tolerance,
    # and our log-probabilities of the chosen tokens equal transformers' (processed scores) within 1e-4
    for t, (step_logits, step_scores) in enumerate(zip(logits, scores)):
        live = out.num_new_tokens > t
        top2 = np.sort(step_logits[live], axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 2e-4
        theirs = torch.log_softmax(torch.tensor(step_scores), -1).numpy()[np.arange(len(live)), ref[:, P + t]]
        np.testing.assert_allclose(out.logprobs[live, t], theirs[live], atol=1e-4)


# ============================================================================ n-gram rule and bad words
NEVER = TINY.vocab_size - 1  # the pad id: pushed down in the LM head, so no model ever emits it


@pytest.fixture(scope="module")
def no_pad_model():
    hf = hf_model(TINY, seed=5, scale=10.0)
    with torch.no_grad():
        hf.lm_head.bias[NEVER] -= 1e4
    return hf, params_of(hf)


@pytest.mark.parametrize("case", ["ngram1", "ngram2", "ngram3", "bad_words", "all", "bad_eos"])
def test_no_repeat_ngram_and_bad_words_match_transformers(no_pad_model, case):
    """Greedy with no_repeat_ngram_size / bad_words_ids (single and multi-token words, one of them the EOS id)
    on a left-padded batch: tokens and log-probs equal transformers' generate. The pad id never occurs as
    a token, so Transformers' matching of pads (it treats them as tokens) changes nothing."""
    hf, params = no_pad_model
    rng = np.random.RandomState(6)
    lengths = [9, 5, 1, 7, 12]
    P = max(lengths)
    ids = np.full((len(lengths), P), NEVER, np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, P - n:] = rng.randint(0, NEVER, n)
        mask[b, P - n:] = 1
    plain = generate(TINY, params, ids, mask, max_new_tokens=NEW, pad_token_id=NEVER)
    new = plain.new_tokens
    counts = np.bincount(new.ravel(), minlength=TINY.vocab_size)
    frequent = int(np.argmax(counts))  # the token the model repeats most
    bigram = [int(new[0, 10]), int(new[0, 11])]  # occurs in row 0: its second token is banned after the first
    triple = [int(t) for t in new[1, 4:7]]
    bad = [[frequent], bigram, triple, [int(new[2, 3]), int(new[2, 4]), int(new[2, 5]), int(new[2, 6])]]
    kw = {
        "ngram1": dict(no_repeat_ngram_size=1),
        "ngram2": dict(no_repeat_ngram_size=2),
        "ngram3": dict(no_repeat_ngram_size=3),
        "bad_words": dict(bad_words_ids=bad),
        "all": dict(no_repeat_ngram_size=2, bad_words_ids=bad, repetition_penalty=1.3),
        # the frequent token is EOS as well: its one-token bad word is dropped (both libraries), rows end on it
        "bad_eos": dict(bad_words_ids=bad, eos_token_id=[frequent]),
    }[case]
    ref, _, scores = _hf_generate(hf, ids, mask, pad_token_id=NEVER, **kw)
    gc = GenerationConfig(max_new_tokens=NEW, pad_token_id=NEVER, logprobs=True)
    out = generate(TINY, params, ids, mask, generation_config=gc, **kw)
    steps = ref.shape[1] - P
    np.testing.assert_array_equal(out.sequences[:, : P + steps], ref)
    assert not np.array_equal(out.new_tokens, new)  # the processors changed the greedy result
    if case == "bad_eos":
        assert "eos" in out.finish_reasons
    for t, step_scores in enumerate(scores):
        live = out.num_new_tokens > t
        theirs = torch.log_softmax(torch.tensor(step_scores), -1).numpy()[np.arange(len(live)), ref[:, P + t]]
        np.testing.assert_allclose(out.logprobs[live, t], theirs[live], atol=1e-4)


def test_no_repeat_ngram_and_bad_words_do_not_retrace(no_pad_model):
    """Other bad words (same table bucket) and other prompts in the same bucket reuse the compiled programs;
    the n-gram rule and the bad words also hold while sampling."""
    _, params = no_pad_model
    kw = dict(max_new_tokens=16, do_sample=True, top_k=20, seed=2, eos_token_id=[], no_repeat_ngram_size=2)
    prompts = [[1, 2, 3], [4, 5]]
    out = generate(TINY, params, prompts, bad_words_ids=[[7], [8, 9]], **kw)
    before = dict(TRACE_COUNTS)
    again = generate(TINY, params, [[3, 2, 1], [5, 4]], bad_words_ids=[[11, 12], [13]], **kw)
    assert dict(TRACE_COUNTS) == before
    for b, row in enumerate(prompts):
        toks = row + out.new_tokens[b].tolist()
        pairs = list(zip(toks, toks[1:]))
        assert len(pairs) == len(set(pairs)), toks  # no bigram twice (prompt included)
        assert 9 not in [t for s, t in pairs if s == 8]
    assert 7 not in out.new_tokens and 13 not in again.new_tokens


# ============================================================================ cache correctness
def test_decode_logits_equal_full_forward_at_every_step(tiny):
    """prefill + decode_step logits equal a cache-free forward over the sequence so far (<= 1e-4), and so
    do the log-probabilities the while_loop records. (The forward is causal, so one forward over the final
    sequence gives the logits of every prefix.)"""
    _, params = tiny
    ids, mask, _ = left_padded_batch(TINY.vocab_size, [6, 3, 8], seed=3)
    B, P = ids.shape
    steps = 24
    out = generate(TINY, params, ids, mask, max_new_tokens=steps, eos_token_id=[], return_logprobs=True)
    seq = out.sequences  # [B, P + steps]
    seq_mask = np.concatenate([mask, np.ones((B, steps), mask.dtype)], 1)
    full = GPTJForCausalLM(TINY).apply({"params": params}, jnp.asarray(seq), attention_mask=jnp.asarray(seq_mask))
    ref = np.asarray(full.logits[:, P - 1: P - 1 + steps])  # [B, steps, V]: logits that chose new token t

    for layout in ("BNSH",):  # the one cache layout (cache.py)
        logits, cache = prefill(params, jnp.asarray(ids), jnp.asarray(mask), config=TINY, cache_len=P + steps)
        worst = 0.0
        for t in range(steps):
            worst = max(worst, float(np.abs(np.asarray(logits) - ref[:, t]).max()))
            if t + 1 < steps:
                logits, cache = decode_step(params, cache, jnp.asarray(seq[:, P + t], jnp.int32), config=TINY)
        assert worst <= 1e-4, (layout, worst)
    np.testing.assert_array_equal(out.new_tokens, ref.argmax(-1))
    want = np.take_along_axis(np.asarray(jax.nn.log_softmax(ref)), out.new_tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs, want, atol=1e-4)


def test_cache_layout_equals_full_forward(tiny):
    """Cached decoding with the one cache layout (K/V [B, N, S, H], per-row index) gives the logits of a
    cache-free forward over the same tokens; a cache of another shape (the old [B, S, N, H]) is an error."""
    from gptj_jax.cache import init_cache

    _, params = tiny
    ids, mask, _ = left_padded_batch(TINY.vocab_size, [6, 3], seed=8)
    B, P = ids.shape
    model = GPTJForCausalLM(TINY)
    cache = init_cache(TINY, B, P + 3)
    out = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask), cache=cache)
    step = model.apply({"params": params}, jnp.asarray(ids[:, -1:]), cache=out.cache)
    assert step.cache["layers"][0]["k"].shape == (B, 4, P + 3, 8)
    # the same tokens without a cache: the prompt and its last token once more
    seq, seq_mask = np.concatenate([ids, ids[:, -1:]], 1), np.concatenate([mask, np.ones((B, 1), mask.dtype)], 1)
    full = np.asarray(model.apply({"params": params}, jnp.asarray(seq), attention_mask=jnp.asarray(seq_mask)).logits)
    real = mask.astype(bool)  # pad positions attend to nothing: their outputs are not defined
    np.testing.assert_allclose(np.asarray(out.logits)[real], full[:, :P][real], atol=1e-5)
    np.testing.assert_allclose(np.asarray(step.logits), full[:, P:], atol=1e-5)
    old = init_cache(TINY, B, P + 3)
    old["layers"] = [{k: jnp.swapaxes(v, 1, 2) for k, v in layer.items()} for layer in old["layers"]]
    with pytest.raises(ValueError, match=r"not the cache layout \[B, N, S, H\]"):
        model.apply({"params": params}, jnp.asarray(ids), cache=old)


@pytest.mark.parametrize("unrolled_rows", [0, 16])  # 0: the scatter (CPU); 16: one update per row (accelerators)
@pytest.mark.parametrize("rows", [1, 4, 17])  # 17 > UNROLLED_WRITE_ROWS: a scatter on every backend
def test_write_kv_writes_each_row_at_its_slot(rows, unrolled_rows):
    """``cache.write_kv``: row b of ``new`` at slots index[b] .., clamped into the buffer like
    ``dynamic_update_slice`` (an index past S - T writes the last T slots), in the buffer's dtype; the
    per-row updates and the scatter write the same bytes."""
    from gptj_jax.cache import UNROLLED_WRITE_ROWS, write_kv

    assert UNROLLED_WRITE_ROWS == 16
    rng = np.random.RandomState(rows)
    buf = rng.randn(rows, 2, 8, 4).astype(np.float32)
    for T in (1, 3):
        new = rng.randn(rows, 2, T, 4)
        index = rng.randint(0, 9, rows).astype(np.int32)  # 8 - T < index: clamped
        want = buf.astype(jnp.bfloat16).copy()
        for b in range(rows):
            i = min(int(index[b]), 8 - T)
            want[b, :, i : i + T] = new[b].astype(jnp.bfloat16)
        write = jax.jit(lambda b, n, i: write_kv(b, n, i, unrolled_rows=unrolled_rows))
        got = write(jnp.asarray(buf, jnp.bfloat16), jnp.asarray(new, jnp.float32), jnp.asarray(index))
        assert got.dtype == jnp.bfloat16 and np.array_equal(np.asarray(got), want), (rows, T)


def test_decode_writes_the_cache_by_row_on_accelerators_and_by_scatter_on_cpu(tiny):
    """The model's cache write follows the platform it is traced for (``model.attention_backend``, as plan's
    TPU compiles set it): one ``dynamic_update_slice`` per row and K/V buffer for a TPU (no while loop over rows
    there), a scatter on CPU (which compiles the unrolled form several times slower). The attention mask is a
    scatter on both. Lowered only: no TPU needed."""
    from gptj_jax.cache import init_cache
    from gptj_jax.model import attention_backend

    _, params = tiny
    model = GPTJForCausalLM(TINY)
    rows = 4
    cache = init_cache(TINY, rows, 16)
    ids = jnp.zeros((rows, 1), jnp.int32)
    text = {}
    for platform in ("cpu", "tpu"):
        with attention_backend(platform):
            text[platform] = jax.jit(lambda p, c: model.apply({"params": p}, ids, cache=c)).lower(params, cache).as_text()
    assert text["tpu"].count("dynamic_update_slice") == rows * 2 * TINY.n_layer  # K and V of each layer, per row
    assert "dynamic_update_slice" not in text["cpu"]
    assert text["cpu"].count("stablehlo.scatter") > text["tpu"].count("stablehlo.scatter") > 0


# ============================================================================ compile counting
def test_second_call_in_same_bucket_does_not_retrace(tiny):
    _, params = tiny
    kw = dict(do_sample=True, top_k=20, top_p=0.9, eos_token_id=[3, 4])
    ids, mask, _ = left_padded_batch(TINY.vocab_size, [9, 10], seed=4)
    generate(TINY, params, ids, mask, max_new_tokens=20, temperature=0.7, seed=1, **kw)
    before = dict(TRACE_COUNTS)
    # generate() runs on the engine: these are every jitted program it calls
    programs = (engine_mod._init_state_fn, engine_mod._prefill_fn, engine_mod._first_token_fn,
                engine_mod._insert_fn, engine_mod._step_fn)
    sizes = [f._cache_size() for f in programs]
    # same buckets (prompt 12, batch 2, new tokens 24, top-k 32), other lengths, values and seed
    ids, mask, _ = left_padded_batch(TINY.vocab_size, [11, 4], seed=5)
    out = generate(TINY, params, ids, mask, max_new_tokens=17, temperature=1.3, seed=9, min_p=0.0,
                   **dict(kw, top_k=30, top_p=0.5, eos_token_id=[7]))
    assert out.sequences.shape == (2, 11 + 17)
    assert dict(TRACE_COUNTS) == before
    assert [f._cache_size() for f in programs] == sizes
    # a new prompt bucket does compile (the counter works)
    ids, mask, _ = left_padded_batch(TINY.vocab_size, [13, 2], seed=6)
    generate(TINY, params, ids, mask, max_new_tokens=17, temperature=1.3, **kw)
    assert TRACE_COUNTS["engine.prefill"] == before["engine.prefill"] + 1


def test_buckets():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 6, 7, 9, 13, 17, 25, 33, 100)] == [
        1, 2, 3, 4, 6, 6, 8, 12, 16, 24, 32, 48, 128]
    assert bucket(3, 8) == 8


# ============================================================================ behaviour
def test_sampling_top_k_1_repeats_and_row_seeds(tiny):
    _, params = tiny
    ids, mask, _ = left_padded_batch(TINY.vocab_size, [5, 8], seed=7)
    greedy = generate(TINY, params, ids, mask, max_new_tokens=20, eos_token_id=[])
    top1 = generate(TINY, params, ids, mask, max_new_tokens=20, eos_token_id=[], do_sample=True, top_k=1,
                    temperature=2.0, seed=3)
    np.testing.assert_array_equal(top1.sequences, greedy.sequences)

    # (greedy with num_return_sequences > 1 is an error now, as in Transformers; top_k=1 sampling is greedy)
    rep = generate(TINY, params, ids, mask, max_new_tokens=20, eos_token_id=[], num_return_sequences=3,
                   do_sample=True, top_k=1)
    np.testing.assert_array_equal(rep.sequences, np.repeat(greedy.sequences, 3, axis=0))

    sampled = generate(TINY, params, ids, mask, max_new_tokens=20, eos_token_id=[], do_sample=True,
                       num_return_sequences=3, seed=[11, 22])
    new = sampled.new_tokens
    assert len({tuple(r) for r in new}) == 6  # every row its own key
    # a prompt's draws depend on its own seed, not on the batch it is in
    alone = generate(TINY, params, ids[1:], mask[1:], max_new_tokens=20, eos_token_id=[], do_sample=True,
                     num_return_sequences=3, seed=[22])
    np.testing.assert_array_equal(alone.new_tokens, new[3:])


def test_streaming_chunks_and_iterator(tiny):
    _, params = tiny
    ids, mask, _ = left_padded_batch(TINY.vocab_size, [5, 8], seed=7)
    chunks = []
    out = generate(TINY, params, ids, mask, max_new_tokens=20, eos_token_id=[], streamer=chunks.append,
                   stream_interval=6)
    assert [c.start for c in chunks] == [0, 6, 12, 18]
    assert all(c.output is None for c in chunks[:-1]) and chunks[-1].output is out
    np.testing.assert_array_equal(np.concatenate([c.tokens for c in chunks], 1), out.new_tokens)
    again = list(iter_generate(TINY, params, ids, mask, max_new_tokens=20, eos_token_id=[], stream_interval=6))
    np.testing.assert_array_equal(again[-1].output.sequences, out.sequences)


def _stop_string_at(tokenizer, row: np.ndarray, other: np.ndarray) -> tuple[str, int]:
    """A two-token string whose first occurrence in ``row``'s text completes at token i + 1 (i >= 3), and
    that ``other``'s text lacks."""
    text = tokenizer.decode(row.tolist())
    for i in range(3, len(row) - 2):
        stop = tokenizer.decode(row[i: i + 2].tolist())
        if stop.strip() and text.find(stop) == len(tokenizer.decode(row[:i].tolist())) \
                and stop not in tokenizer.decode(other.tolist()):
            return stop, i + 1
    raise AssertionError("no usable stop string in this continuation")


def test_stop_strings(wide, tokenizer):
    _, params = wide
    prompts = [tokenizer("The quick brown fox")["input_ids"], tokenizer("Hello")["input_ids"]]
    free = generate(WIDE, params, prompts, max_new_tokens=16, eos_token_id=[], tokenizer=tokenizer)
    row = free.new_tokens[0]
    stop, last = _stop_string_at(tokenizer, row, free.new_tokens[1])
    out = generate(WIDE, params, prompts, max_new_tokens=16, eos_token_id=[], tokenizer=tokenizer,
                   stop_strings=["never appears", stop], pad_token_id=50256)
    cut = int(out.num_new_tokens[0])
    assert cut == last + 1
    np.testing.assert_array_equal(out.new_tokens[0, :cut], row[:cut])
    assert (out.new_tokens[0, cut:] == 50256).all()
    assert tokenizer.decode(out.new_tokens[0, :cut].tolist()).endswith(stop)
    assert out.finish_reasons == ["stop_string", "length"]
    np.testing.assert_array_equal(out.new_tokens[1], free.new_tokens[1])


def test_extra_tokens_suppressed_with_gptj_vocab(wide, tokenizer):
    _, params = wide
    params = jax.tree.map(lambda x: x, params)
    bias = np.array(params["lm_head"]["bias"])
    bias[50300] = 1e4  # the model wants a padding-vocab id every step
    params = dict(params, lm_head=dict(params["lm_head"], bias=bias))
    prompt = [tokenizer("Hello")["input_ids"]]
    free = generate(WIDE, params, prompt, max_new_tokens=8, eos_token_id=[], suppress_extra_tokens=False)
    assert (free.new_tokens == 50300).all()
    for kw in ({}, {"tokenizer": tokenizer}):  # default: on for vocab 50400 and GPT-J's tokenizer
        out = generate(WIDE, params, prompt, max_new_tokens=8, eos_token_id=[], **kw)
        assert (out.new_tokens < 50257).all()


# ============================================================================ bad input
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(input_ids=np.zeros((1, 0), np.int64)), "empty prompt"),
        (dict(input_ids=[[1, 2, 3]], attention_mask=[[0, 0, 0]]), "empty prompt: row 0"),
        (dict(input_ids=[[]]), "empty prompt"),
        (dict(input_ids=[list(range(1, 60))], max_new_tokens=10), "prompt too long"),
        (dict(temperature=-1.0), "temperature"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(do_sample=True, top_p=1.01), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(min_new_tokens=50), "min_new_tokens"),
        (dict(input_ids=[[1, 500]]), "outside the vocabulary"),
        (dict(stop_strings=["x"]), "need a tokenizer"),
        (dict(input_ids=[[1, 2, 3]], attention_mask=[[1, 0, 1]]), "holes"),
        (dict(seed=[1, 2]), "one per prompt"),
    ],
)
def test_bad_input_raises_clear_error(tiny, kw, match):
    _, params = tiny
    args = dict(input_ids=[[1, 2, 3]], max_new_tokens=5)
    args.update(kw)
    with pytest.raises((GenerationError, SamplingError), match=match):
        generate(TINY, params, args.pop("input_ids"), args.pop("attention_mask", None), **args)


def _cli(capsys, *argv):
    rc = cli_main(["generate", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--model", "/nonexistent/model", "--prompt", "hi"], "--model /nonexistent/model: no such directory"),
        (["--prompt", ""], "--prompt: empty prompt"),
        (["--prompt", "hello " * 40, "--max-new-tokens", "30"], "prompt too long"),
        (["--prompt", "hi", "--temperature", "-1"], "--temperature"),
        (["--prompt", "hi", "--top-p", "0"], "--top-p"),
        (["--prompt", "hi", "--top-p", "1.5"], "--top-p"),
        (["--prompt", "hi", "--top-k", "-3"], "--top-k"),
        (["--prompt", "hi", "--greedy", "--top-k", "3"], "--greedy conflicts"),
    ],
)
def test_cli_bad_input_one_line_nothing_written(capsys, tmp_path, model_dir, argv, match):
    argv = ["--model", model_dir, *argv] if "--model" not in argv else argv
    rc, out, err = _cli(capsys, *argv)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptj-jax generate: error:") and match in lines[0], err
    assert out == ""


@pytest.mark.parametrize("line", ['{"id": 1, "prompt": ""}', '{"id": 1, "prompt": "' + "hello " * 40 + '"}'])
def test_cli_batch_bad_prompt_writes_nothing(capsys, tmp_path, model_dir, line):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": 0, "prompt": "fine"}\n' + line + "\n")
    rc, _, err = _cli(capsys, "--model", model_dir, "--input", str(src), "--output", str(dst),
                      "--max-new-tokens", "30")
    assert rc == 1 and "line 2" in err and len(err.strip().splitlines()) == 1
    assert not dst.exists()


# ============================================================================ CLI happy paths
def test_cli_single_prompt_and_stream(capsys, model_dir, wide, tokenizer):
    _, params = wide
    rc, out, _ = _cli(capsys, "--model", model_dir, "--prompt", "Hello world", "--max-new-tokens", "12", "--quiet")
    assert rc == 0
    ids = tokenizer("Hello world")["input_ids"]
    ref = generate(WIDE, params, [ids], max_new_tokens=12, tokenizer=tokenizer)
    text = "Hello world" + tokenizer.decode(ref.new_tokens[0, : ref.num_new_tokens[0]].tolist())
    assert out == text + "\n"
    rc, streamed, _ = _cli(capsys, "--model", model_dir, "--prompt", "Hello world", "--max-new-tokens", "12",
                           "--stream", "--stream-interval", "3", "--quiet")
    assert rc == 0 and streamed == out


def test_cli_batch_resumes(capsys, tmp_path, model_dir):
    prompts = [{"id": i, "prompt": p} for i, p in enumerate(["The cat", "Once upon a time", "A", "Why is the sky"])]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    args = ["--model", model_dir, "--input", str(src), "--output", str(dst), "--max-new-tokens", "6",
            "--temperature", "0.9", "--top-k", "50", "--batch-size", "2", "--seed", "5", "--quiet"]
    src.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    assert _cli(capsys, *args)[0] == 0
    whole = {json.loads(l)["id"]: json.loads(l) for l in dst.read_text().splitlines()}
    assert sorted(whole) == [0, 1, 2, 3]
    assert all(r["num_new_tokens"] == 6 and r["finish_reason"] == "length" for r in whole.values())

    # an interrupted run: two results written, then a torn line; the rerun completes the rest
    dst2 = tmp_path / "out2.jsonl"
    dst2.write_text(json.dumps(whole[3]) + "\n" + json.dumps(whole[0]) + "\n" + '{"id": 1, "prom')
    args2 = [a if a != str(dst) else str(dst2) for a in args]
    assert _cli(capsys, *args2)[0] == 0
    lines = [json.loads(l) for l in dst2.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == [0, 1, 2, 3]
    assert {r["id"]: r for r in lines} == whole  # per-prompt seeds: same samples in any batching
    # nothing left to do
    assert _cli(capsys, *args2)[0] == 0
    assert len(dst2.read_text().splitlines()) == 4


# ============================================================================ compilation cache, mesh
CACHE_SCRIPT = """
import sys, time, numpy as np
sys.path.insert(0, {repo!r})
from gptj_jax import GPTJConfig, init_params
from gptj_jax.generation import enable_compilation_cache, generate
import jax
enable_compilation_cache({cache!r})
cfg = GPTJConfig(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
params = init_params(cfg, jax.random.PRNGKey(0))
out = generate(cfg, params, [[1, 2, 3]], max_new_tokens=5)
print(out.sequences.tolist())
"""


@pytest.mark.slow
def test_persistent_compilation_cache(tmp_path):
    cache = str(tmp_path / "xla-cache")
    script = CACHE_SCRIPT.format(repo=REPO, cache=cache)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    entries = os.listdir(cache)
    assert len(entries) >= 2, entries  # the start program and the loop program at least
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert sorted(os.listdir(cache)) == sorted(entries)  # everything came from the cache


MESH_SCRIPT = """
import sys, json, numpy as np
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import jax
jax.config.update("jax_num_cpu_devices", 4)
from conftest import hf_model, params_of, left_padded_batch
from gptj_jax import GPTJConfig
from gptj_jax.generation import generate
from gptj_jax.sharding import make_mesh
cfg = GPTJConfig(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
params = params_of(hf_model(cfg, seed=0, scale=3.0))
ids, mask, _ = left_padded_batch(cfg.vocab_size, [6, 3, 8], seed=0)
kw = dict(max_new_tokens=12, eos_token_id=[], do_sample=True, top_k=10, seed=4)
one = generate(cfg, params, ids, mask, **kw)
sharded = generate(cfg, params, ids, mask, mesh=make_mesh(dp=2, mp=2), **kw)
print(json.dumps({{"one": one.sequences.tolist(), "mesh": sharded.sequences.tolist()}}))
"""


@pytest.mark.slow
def test_mesh_matches_one_device():
    script = MESH_SCRIPT.format(repo=REPO, tests=os.path.join(REPO, "tests"))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["one"] == res["mesh"]


def test_cli_mesh_flag_gives_the_same_text(capsys, model_dir):
    """`--mesh mp=2` on two simulated devices prints what one device prints (greedy)."""
    rc, single, _ = _cli(capsys, "--model", model_dir, "--prompt", "Hello world", "--max-new-tokens", "8", "--quiet")
    assert rc == 0
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    script = (
        "import sys; from gptj_jax.cli import main; "
        f"sys.exit(main(['generate', '--model', {model_dir!r}, '--prompt', 'Hello world', "
        "'--max-new-tokens', '8', '--quiet', '--mesh', 'mp=2']))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == single
    bad = subprocess.run([sys.executable, "-c", script.replace("mp=2", "mp=3")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 1 and "mp=3" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# ============================================================================ regressions (issue 9)
# vocab 1000 and the config's defaults: EOS 50256 (as transformers saves a small GPT-J), no pad id
SMALL = GPTJConfig(vocab_size=1000, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
RESULT = {"id": 0, "prompt": "fine", "completion": " x", "num_new_tokens": 1, "finish_reason": "length"}


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory):
    """WIDE with EOS 50256 pushed up by 1e4 (saved, and our params): greedy emits it as soon as
    min_new_tokens allows."""
    hf = hf_model(WIDE, seed=0, scale=3.0)
    with torch.no_grad():
        hf.lm_head.bias[50256] += 1e4
    path = tmp_path_factory.mktemp("eos-gptj")
    hf.save_pretrained(path)
    return str(path), params_of(hf)


def test_default_eos_outside_vocab_with_left_padding(tiny):
    """EOS 50256 >= vocab_size 1000 is also the default pad id: left-padded rows (pads holding 50256, as
    a Transformers-style batch would) give each prompt's tokens alone and transformers', finite logprobs."""
    assert SMALL.eos_token_id == 50256 and SMALL.pad_token_id is None
    hf = hf_model(SMALL, seed=4, scale=3.0)
    params = params_of(hf)
    ids, mask, _ = left_padded_batch(SMALL.vocab_size, [7, 3, 5], seed=4)
    padded = np.where(mask == 1, ids, 50256)
    out = generate(SMALL, params, padded, mask, max_new_tokens=12, return_logprobs=True)
    P = ids.shape[1]
    assert np.isfinite(out.logprobs).all() and (out.logprobs < 0).all()
    np.testing.assert_array_equal(out.sequences[:, :P], padded)  # the prompt part as given
    assert out.finish_reasons == ["length"] * 3
    for b in range(len(ids)):
        alone = generate(SMALL, params, [ids[b][mask[b] == 1].tolist()], max_new_tokens=12, return_logprobs=True)
        np.testing.assert_array_equal(out.new_tokens[b], alone.new_tokens[0])
        np.testing.assert_allclose(out.logprobs[b], alone.logprobs[0], atol=1e-5)
    ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=12,
                      pad_token_id=0)
    np.testing.assert_array_equal(out.new_tokens, ref.numpy()[:, P:])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(pad_token_id=60000), r"pad_token_id 60000 is outside the vocabulary \[0, 101\)"),
        (dict(do_sample=True, temperature=float("inf")), "temperature must be a finite number"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number"),
        (dict(num_return_sequences=2), "does not support num_return_sequences different than 1"),
        (dict(do_sample=True, seed=2**64), r"seed must be an integer in \[0, 2\*\*64\)"),
        (dict(do_sample=True, seed=[2**64]), r"seed\[0\] must be an integer in \[0, 2\*\*64\)"),
    ],
)
def test_more_bad_input_raises_clear_error(tiny, kw, match):
    _, params = tiny
    with pytest.raises((GenerationError, SamplingError), match=match):
        generate(TINY, params, [[1, 2, 3]], max_new_tokens=5, **kw)


def test_numpy_scalar_knobs_equal_python_ones(tiny):
    _, params = tiny
    ids, mask, _ = left_padded_batch(TINY.vocab_size, [5, 8], seed=7)
    kw = dict(eos_token_id=[], do_sample=True, seed=3)
    py = generate(TINY, params, ids, mask, max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05,
                  repetition_penalty=1.25, **kw)
    npy = generate(TINY, params, ids, mask, max_new_tokens=np.int64(10), temperature=np.float32(0.7),
                   top_k=np.int64(20), top_p=np.float64(0.9), min_p=np.float32(0.05),
                   repetition_penalty=np.float32(1.25), **kw)
    np.testing.assert_array_equal(npy.sequences, py.sequences)


def test_any_number_of_eos_ids(tiny):
    """Nine EOS ids (explicit, or the config's) end rows as the one of them that occurs does."""
    _, params = tiny
    ids, mask, _ = left_padded_batch(TINY.vocab_size, [5, 8], seed=7)
    free = generate(TINY, params, ids, mask, max_new_tokens=20, eos_token_id=[])
    stop = int(free.new_tokens[0, 5])
    unused = [t for t in range(TINY.vocab_size) if t not in free.new_tokens][:8]
    one = generate(TINY, params, ids, mask, max_new_tokens=20, eos_token_id=[stop], pad_token_id=0)
    assert "eos" in one.finish_reasons
    nine = generate(TINY, params, ids, mask, max_new_tokens=20, eos_token_id=unused + [stop], pad_token_id=0)
    config9 = TINY.replace(eos_token_id=tuple(unused + [stop]))
    default = generate(config9, params, ids, mask, max_new_tokens=20, pad_token_id=0)
    for out in (nine, default):
        np.testing.assert_array_equal(out.sequences, one.sequences)
        assert out.finish_reasons == one.finish_reasons


def test_seeds_use_both_32_bit_words(tiny):
    """seed 2**32 is not seed 0; an int seed and a one-prompt list of it agree; 2**64 - 1 works."""
    _, params = tiny
    kw = dict(max_new_tokens=16, eos_token_id=[], do_sample=True)
    zero = generate(TINY, params, [[1, 2, 3]], seed=0, **kw)
    big = generate(TINY, params, [[1, 2, 3]], seed=2**32, **kw)
    assert not np.array_equal(big.new_tokens, zero.new_tokens)
    np.testing.assert_array_equal(generate(TINY, params, [[1, 2, 3]], seed=[2**32], **kw).sequences, big.sequences)
    top = generate(TINY, params, [[1, 2, 3]], seed=2**64 - 1, **kw)
    assert not np.array_equal(top.new_tokens, zero.new_tokens)


def test_decode_step_on_a_full_cache_is_an_error(tiny):
    _, params = tiny
    ids, mask, _ = left_padded_batch(TINY.vocab_size, [4, 2], seed=3)
    logits, cache = prefill(params, jnp.asarray(ids), jnp.asarray(mask), config=TINY, cache_len=5)
    logits, cache = decode_step(params, cache, jnp.argmax(logits, -1).astype(jnp.int32), config=TINY)  # slot 4
    assert np.asarray(cache["index"]).tolist() == [5, 5]  # per-row index (was one shared int: 5)
    with pytest.raises(GenerationError, match=r"cache is full \(cache\['index'\] = 5, 5 slots\)"):
        decode_step(params, cache, jnp.zeros((2,), jnp.int32), config=TINY)


def test_greedy_logprobs_are_renormalised_over_text_ids(wide):
    """With suppression on (vocab 50400), a greedy token's logprob is the log-softmax over the 50257 text
    ids (docs/generation.md), not the model's log-softmax over all 50400."""
    _, params = wide
    bias = np.array(params["lm_head"]["bias"])
    bias[50257:] += 6.0  # the padding rows get real probability mass
    params = dict(params, lm_head=dict(params["lm_head"], bias=bias))
    prompt = [15496, 995, 11]
    out = generate(WIDE, params, [prompt], max_new_tokens=6, eos_token_id=[], return_logprobs=True)
    assert (out.new_tokens < 50257).all()
    logits = GPTJForCausalLM(WIDE).apply({"params": params}, jnp.asarray(out.sequences)).logits[0, 2:8]  # [6, V]
    tok = out.new_tokens[0]
    text = np.asarray(jax.nn.log_softmax(logits[:, :50257]))[np.arange(6), tok]
    whole = np.asarray(jax.nn.log_softmax(logits))[np.arange(6), tok]
    np.testing.assert_allclose(out.logprobs[0], text, atol=1e-4)
    assert (text - whole).min() > 0.05, text - whole


def test_eos_first_reports_eos_not_stop_string(eos_model, wide, tokenizer):
    """Stop strings are matched on text without special tokens and before EOS: a row that ended on EOS
    reports "eos", also when a stop string is the text of the EOS token itself."""
    _, params = eos_model
    prompt = [tokenizer("Hello world")["input_ids"]]
    out = generate(WIDE, params, prompt, max_new_tokens=8, min_new_tokens=3, tokenizer=tokenizer,
                   stop_strings=["<|endoftext|>", "endoftext"])
    assert out.num_new_tokens.tolist() == [4] and int(out.new_tokens[0, 3]) == 50256
    assert out.finish_reasons == ["eos"]

    _, params = wide
    free = generate(WIDE, params, prompt, max_new_tokens=16, eos_token_id=[], tokenizer=tokenizer)
    row = free.new_tokens[0]
    for i in range(3, 16):
        piece = tokenizer.decode([int(row[i])])
        if piece.strip() and int(row[i]) not in row[:i] and piece not in tokenizer.decode(row[:i].tolist()):
            break
    else:
        raise AssertionError("no usable EOS token in this continuation")
    out = generate(WIDE, params, prompt, max_new_tokens=16, eos_token_id=[int(row[i])], tokenizer=tokenizer,
                   stop_strings=[piece])
    assert out.num_new_tokens.tolist() == [i + 1] and out.finish_reasons == ["eos"]


def test_cli_text_has_no_special_tokens(capsys, tmp_path, eos_model, tokenizer):
    path, params = eos_model
    ref = generate(WIDE, params, [tokenizer("Hello world")["input_ids"]], max_new_tokens=8, min_new_tokens=3,
                   tokenizer=tokenizer)
    assert int(ref.new_tokens[0, 3]) == 50256
    text = tokenizer.decode(ref.new_tokens[0, :3].tolist())
    assert "<|" not in text
    args = ["--model", path, "--max-new-tokens", "8", "--min-new-tokens", "3", "--quiet"]
    rc, out, _ = _cli(capsys, *args, "--prompt", "Hello world")
    assert rc == 0 and out == "Hello world" + text + "\n"
    rc, out, _ = _cli(capsys, *args, "--prompt", "Hello world", "--stream", "--stream-interval", "2")
    assert rc == 0 and out == "Hello world" + text + "\n"
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "Hello world"}) + "\n")
    rc, _, _ = _cli(capsys, *args, "--input", str(src), "--output", str(dst))
    record = json.loads(dst.read_text())
    assert rc == 0 and record["completion"] == text
    assert record["finish_reason"] == "eos" and record["num_new_tokens"] == 4


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--prompt", "hi", "--seed", str(2**64)], "--seed must be < 2**64"),
        (["--prompt", "hi", "--logprobs"], "--logprobs is for batch mode"),
        (["--prompt", "hi", "--num-return-sequences", "2"], "--num-return-sequences 2 needs sampling"),
        (["--prompt", "hi", "--temperature", "inf"], "--temperature: temperature must be a finite number"),
    ],
)
def test_cli_more_bad_input_one_line(capsys, model_dir, argv, match):
    rc, out, err = _cli(capsys, "--model", model_dir, "--max-new-tokens", "4", *argv)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("gptj-jax generate: error:") and match in lines[0], err
    assert out == ""


def test_cli_prompt_ids_outside_vocab_checked_before_weights(capsys, tmp_path):
    """A vocab-1000 model directory with no weights at all: the prompt's ids are checked against
    config.vocab_size first, so the error is about them (not about the weights)."""
    model = tmp_path / "small"
    SMALL.save_pretrained(str(model))
    assert os.listdir(model) == ["config.json"]
    rc, _, err = _cli(capsys, "--model", str(model), "--prompt", "Hello world", "--max-new-tokens", "8")
    assert rc == 1 and "--prompt: token id 15496 is outside the model's vocabulary (vocab_size 1000)" in err, err
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": 7, "prompt": "Hello"}\n')
    rc, _, err = _cli(capsys, "--model", str(model), "--input", str(src), "--output", str(dst), "--max-new-tokens", "8")
    assert rc == 1 and "--input line 1 (id 7): token id 15496 is outside" in err, err
    assert len(err.strip().splitlines()) == 1 and not dst.exists()


def test_cli_input_not_utf8_names_file_and_line(capsys, tmp_path, model_dir):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b'{"id": 0, "prompt": "fine"}\n{"id": 1, "prompt": "caf\xe9"}\n')
    rc, _, err = _cli(capsys, "--model", model_dir, "--input", str(src), "--output", str(dst))
    assert rc == 1 and f"--input {src} line 2: not UTF-8 text" in err and len(err.strip().splitlines()) == 1, err
    assert not dst.exists()


@pytest.mark.parametrize(
    "content, line",
    [
        (b"my notes\nmore notes\n", 1),
        ((json.dumps(RESULT) + "\na note\n" + json.dumps(dict(RESULT, id=5)) + "\n").encode(), 2),
        (b'{"id": 0, "prompt": "fine"}\n', 1),  # JSON, but not a results line
        ((json.dumps(RESULT) + "\n\n").encode(), 2),  # a blank line
        ((json.dumps(RESULT) + "\nnotes, no newline").encode(), 2),  # unterminated, but not one of our lines
        (b"notes without a newline", 1),
        ((json.dumps(RESULT) + "\n").encode() + b'\xff{"id": 3}\n', 2),  # not UTF-8
    ],
)
def test_cli_output_that_is_not_a_results_file_is_left_alone(capsys, tmp_path, model_dir, content, line):
    src, dst = tmp_path / "in.jsonl", tmp_path / "notes.txt"
    src.write_text('{"id": 0, "prompt": "fine"}\n{"id": 1, "prompt": "also fine"}\n')
    dst.write_bytes(content)
    rc, out, err = _cli(capsys, "--model", model_dir, "--input", str(src), "--output", str(dst),
                        "--max-new-tokens", "4", "--quiet")
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert f"--output {dst} line {line}: not a results line of gptj-jax generate" in err, err
    assert dst.read_bytes() == content


def test_cli_output_that_is_the_input_is_refused(capsys, tmp_path, model_dir, monkeypatch):
    src = tmp_path / "in.jsonl"
    content = '{"id": 0, "prompt": "fine"}\n'
    src.write_text(content)
    (tmp_path / "link.jsonl").symlink_to(src)
    os.link(src, tmp_path / "hard.jsonl")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    for out in (str(src), "in.jsonl", "sub/../in.jsonl", "link.jsonl", "hard.jsonl"):
        rc, _, err = _cli(capsys, "--model", model_dir, "--input", "in.jsonl", "--output", out,
                          "--max-new-tokens", "4", "--quiet")
        assert rc == 1 and f"--output {out} is the --input file" in err and len(err.strip().splitlines()) == 1, err
        assert src.read_text() == content


def test_cli_output_torn_last_line_is_cut_with_a_warning(capsys, tmp_path, model_dir):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": 0, "prompt": "fine"}\n{"id": 1, "prompt": "also fine"}\n')
    first = json.dumps(RESULT) + "\n"
    args = ["--model", model_dir, "--input", str(src), "--output", str(dst), "--max-new-tokens", "4", "--quiet"]
    for torn in (b'{"id": 1, "prompt": "also fi', b'{"id": 1, "prompt": "caf' + "\u00e9".encode()[:1]):
        dst.write_bytes(first.encode() + torn)
        rc, _, err = _cli(capsys, *args)
        assert rc == 0 and "warning: --output" in err and "cutting a torn last line" in err, err
        text = dst.read_text()
        assert text.startswith(first) and [json.loads(l)["id"] for l in text.splitlines()] == [0, 1]
    # a complete last line without its newline is kept; the next result goes on a line of its own
    dst.write_text(first.rstrip("\n"))
    rc, _, err = _cli(capsys, *args)
    text = dst.read_text()
    assert rc == 0 and "warning" not in err and text.startswith(first)
    assert [json.loads(l)["id"] for l in text.splitlines()] == [0, 1]


def test_num_beams_runs_beam_search_and_refuses_streaming(tiny):
    """generate(num_beams > 1) is gptj_jax.beam_search (same tokens and scores); streaming beams is one clear
    error, from generate(streamer=...) and from iter_generate."""
    import gptj_jax

    _, params = tiny
    ids, mask, _ = left_padded_batch(TINY.vocab_size, [6, 3], seed=2)
    kw = dict(max_new_tokens=8, num_beams=3, length_penalty=0.5, num_return_sequences=2, eos_token_id=[])
    out = generate(TINY, params, ids, mask, **kw)
    ref = gptj_jax.beam_search(TINY, params, ids, mask, **kw)
    np.testing.assert_array_equal(out.sequences, ref.sequences)
    np.testing.assert_array_equal(out.sequence_scores, ref.sequence_scores)
    assert out.sequences.shape == (4, ids.shape[1] + 8)
    with pytest.raises(GenerationError, match="beam search does not stream"):
        generate(TINY, params, ids, mask, streamer=print, **kw)
    with pytest.raises(GenerationError, match="num_beams 3: beam search does not stream"):
        iter_generate(TINY, params, ids, mask, **kw)

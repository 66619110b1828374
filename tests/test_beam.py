"""Beam search: tokens and sequence scores equal transformers' ``generate(num_beams=4)`` (left-padded batches,
length penalties, the three early-stopping modes, num_return_sequences, EOS inside the window, several EOS
ids, the greedy processors, GPT-J's extra-token suppression), per-token scores equal
``compute_transition_scores``, one compile per bucket, a mesh, and bad input.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY, hf_model, left_padded_batch, params_of

import gptj_jax
from gptj_jax import BeamOutput, GenerationConfig, GPTJConfig
from gptj_jax import beam as beam_mod
from gptj_jax.beam import TRACE_COUNTS
from gptj_jax.generation import GenerateOutput
from gptj_jax.generation_config import GenerationError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEAMS = 4
NEW = 40
PAD = TINY.vocab_size - 1  # not a token the grid's outputs need; Transformers fills with it after a beam ends
LENGTHS = [9, 5, 12]


def _hf_beams(hf, ids, mask, **kw):
    """transformers' beam search -> its output (sequences, sequences_scores, scores, beam_indices)."""
    return hf.generate(
        torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, num_beams=BEAMS,
        return_dict_in_generate=True, output_scores=True, **kw,
    )


def _assert_same(out: BeamOutput, ref, pad: int) -> None:
    """Tokens identical (Transformers crops to the longest returned beam, we pad to max_new_tokens) and
    sequence scores within 1e-4."""
    theirs = ref.sequences.numpy()
    n = theirs.shape[1]
    np.testing.assert_array_equal(out.sequences[:, :n], theirs)
    assert (out.sequences[:, n:] == pad).all()
    np.testing.assert_allclose(out.sequence_scores, ref.sequences_scores.numpy(), atol=1e-4, rtol=0)


# ============================================================================ parity grid
@pytest.fixture(scope="module")
def grid():
    """A tiny model, three left-padded prompts and an EOS id that ends some beams inside the window and
    makes the three early-stopping modes give three different results at length_penalty 1 (found with
    Transformers, so the grid below can tell the modes apart)."""
    hf = hf_model(TINY, seed=0, scale=3.0)
    ids, mask, _ = left_padded_batch(TINY.vocab_size, LENGTHS, seed=0)
    P = ids.shape[1]
    kw = dict(max_new_tokens=NEW, pad_token_id=PAD, num_return_sequences=2)
    free = _hf_beams(hf, ids, mask, **kw).sequences.numpy()[:, P:]  # vocab 101: the config's EOS never occurs
    for tok in np.unique(free[:, 3:35]):
        runs = [_hf_beams(hf, ids, mask, eos_token_id=int(tok), early_stopping=es, **kw).sequences.numpy()
                for es in (True, False, "never")]
        if all(a.shape != b.shape or not np.array_equal(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]):
            return hf, params_of(hf), ids, mask, int(tok)
    raise AssertionError("no EOS id separates the early-stopping modes for this model")


@pytest.mark.parametrize("length_penalty", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("num_return_sequences", [1, 2])
def test_beam_search_matches_transformers(grid, length_penalty, early_stopping, num_return_sequences):
    hf, params, ids, mask, eos = grid
    kw = dict(max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD, length_penalty=length_penalty,
              early_stopping=early_stopping, num_return_sequences=num_return_sequences)
    ref = _hf_beams(hf, ids, mask, **kw)
    out = gptj_jax.beam_search(TINY, params, ids, mask, num_beams=BEAMS, **kw)
    rows = len(LENGTHS) * num_return_sequences
    assert out.sequences.shape == (rows, ids.shape[1] + NEW) and out.sequence_scores.shape == (rows,)
    _assert_same(out, ref, PAD)
    P = ids.shape[1]
    for r in range(rows):  # num_new_tokens and finish_reasons describe each returned hypothesis
        n = out.num_new_tokens[r]
        assert out.finish_reasons[r] == ("eos" if out.sequences[r, P + n - 1] == eos else "length")
        assert n == NEW or out.finish_reasons[r] == "eos"
    if length_penalty == 0.5:  # a short penalty favours the hypotheses that end early on EOS
        assert "eos" in out.finish_reasons and out.num_new_tokens.min() < NEW


def test_early_stopping_modes_differ_and_share_one_program(grid):
    """At length_penalty 1 the three modes give three different results (so the grid tells them apart), and
    every knob of the grid is traced: all its calls ran one compiled program."""
    _, params, ids, mask, eos = grid
    kw = dict(max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD, num_beams=BEAMS)
    before = TRACE_COUNTS["beam"]
    outs = [gptj_jax.beam_search(TINY, params, ids, mask, early_stopping=es, **kw) for es in (True, False, "never")]
    assert TRACE_COUNTS["beam"] == before  # the grid compiled it already
    for i, a in enumerate(outs):
        for b in outs[i + 1:]:
            assert not np.array_equal(a.sequences, b.sequences)


def test_several_eos_ids(grid):
    """Two EOS ids (the grid's and the most frequent token of the free-running beams) end beams."""
    hf, params, ids, mask, eos = grid
    P = ids.shape[1]
    free = _hf_beams(hf, ids, mask, max_new_tokens=NEW, pad_token_id=PAD).sequences.numpy()[:, P:]
    counts = np.bincount(free.ravel(), minlength=TINY.vocab_size)
    counts[eos] = 0
    second = int(np.argmax(counts))
    kw = dict(max_new_tokens=NEW, eos_token_id=[eos, second], pad_token_id=PAD, num_return_sequences=3,
              length_penalty=0.5)
    ref = _hf_beams(hf, ids, mask, **kw)
    out = gptj_jax.beam_search(TINY, params, ids, mask, num_beams=BEAMS, **kw)
    _assert_same(out, ref, PAD)
    last = {int(out.sequences[r, P + n - 1]) for r, n in enumerate(out.num_new_tokens) if out.finish_reasons[r] == "eos"}
    assert second in last


def test_right_padding_and_ragged_lists_equal_left_padding(grid):
    """The same prompts as a ragged list (left-padded here with 0, as the grid's batch) or right-padded
    (re-padded on the left, with the pad id): the same beams and scores."""
    _, params, ids, mask, eos = grid
    kw = dict(max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD, num_beams=BEAMS, num_return_sequences=2)
    left = gptj_jax.beam_search(TINY, params, ids, mask, **kw)
    rows = [ids[b][mask[b] == 1].tolist() for b in range(len(ids))]
    ragged = gptj_jax.beam_search(TINY, params, rows, **kw)
    np.testing.assert_array_equal(ragged.sequences, left.sequences)
    np.testing.assert_allclose(ragged.sequence_scores, left.sequence_scores, atol=1e-6)
    right_ids, right_mask = np.zeros_like(ids), np.zeros_like(mask)
    for b, row in enumerate(rows):
        right_ids[b, : len(row)] = row
        right_mask[b, : len(row)] = 1
    right = gptj_jax.beam_search(TINY, params, right_ids, right_mask, **kw)
    np.testing.assert_array_equal(right.new_tokens, left.new_tokens)
    np.testing.assert_allclose(right.sequence_scores, left.sequence_scores, atol=1e-6)
    prompt = np.where(np.repeat(mask, 2, 0) == 1, np.repeat(ids, 2, 0), PAD)  # pads become the pad id
    np.testing.assert_array_equal(right.sequences[:, : ids.shape[1]], prompt)


# ============================================================================ processors
NEVER = TINY.vocab_size - 1  # the pad id: pushed down in the LM head, so no model ever emits it


@pytest.fixture(scope="module")
def no_pad():
    """A model that never emits NEVER, five prompts left-padded with NEVER (the batch bucket is 6, so one
    row only fills it), and the beams it finds without processors. Transformers treats its pad id as a token
    for the n-gram rule and the repetition penalty; a pad id that no beam can produce changes nothing."""
    hf = hf_model(TINY, seed=5, scale=10.0)
    with torch.no_grad():
        hf.lm_head.bias[NEVER] -= 1e4
    rng = np.random.RandomState(6)
    lengths = [9, 5, 1, 7, 12]
    P = max(lengths)
    ids = np.full((len(lengths), P), NEVER, np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, P - n:] = rng.randint(0, NEVER, n)
        mask[b, P - n:] = 1
    free = _hf_beams(hf, ids, mask, max_new_tokens=30, pad_token_id=NEVER).sequences.numpy()[:, P:]
    return hf, params_of(hf), ids, mask, free


@pytest.mark.parametrize("case", ["ngram2", "ngram3", "penalty", "penalty_below_1", "bad_words", "all"])
def test_processors_with_beams_match_transformers(no_pad, case):
    """no_repeat_ngram_size, repetition_penalty, bad_words_ids, min_new_tokens and two EOS ids with beams:
    tokens and sequence scores equal Transformers', and each token's score (our logprobs) equals
    ``compute_transition_scores``; the processors changed the beams."""
    hf, params, ids, mask, free = no_pad
    counts = np.bincount(free.ravel(), minlength=TINY.vocab_size)
    bad = [[int(np.argmax(counts))], [int(free[0, 10]), int(free[0, 11])], [int(t) for t in free[1, 4:7]]]
    eos = [int(free[2, 5]), int(free[3, 7])]
    kw = {
        "ngram2": dict(no_repeat_ngram_size=2),
        "ngram3": dict(no_repeat_ngram_size=3, num_return_sequences=2),
        "penalty": dict(repetition_penalty=1.3),
        "penalty_below_1": dict(repetition_penalty=0.8, length_penalty=2.0),
        "bad_words": dict(bad_words_ids=bad),
        "all": dict(no_repeat_ngram_size=2, repetition_penalty=1.3, bad_words_ids=bad, eos_token_id=eos,
                    min_new_tokens=4, num_return_sequences=3),
    }[case]
    kw = dict(kw, max_new_tokens=30, pad_token_id=NEVER)
    ref = _hf_beams(hf, ids, mask, **kw)
    out = gptj_jax.beam_search(TINY, params, ids, mask, num_beams=BEAMS, logprobs=True, **kw)
    _assert_same(out, ref, NEVER)
    theirs = hf.compute_transition_scores(ref.sequences, ref.scores, ref.beam_indices).numpy()  # [rows, steps]
    np.testing.assert_allclose(out.logprobs[:, : theirs.shape[1]], theirs, atol=1e-4)
    assert (out.logprobs[:, theirs.shape[1]:] == 0).all()
    lp = kw.get("length_penalty", 1.0)
    np.testing.assert_allclose(out.logprobs.sum(1) / out.num_new_tokens ** lp, out.sequence_scores, atol=1e-4)
    best = out.new_tokens[:: kw.get("num_return_sequences", 1)]
    assert not np.array_equal(best, free)
    if case == "all":
        assert "eos" in out.finish_reasons and out.num_new_tokens.min() > 4


# a vocabulary of 50400 with GPT-J's 143 padding ids, one of them pushed up so that beams would pick it
WIDE = GPTJConfig(vocab_size=50400, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
EXTRA = 50300


def test_extra_tokens_suppressed_with_gptj_vocab():
    """On GPT-J's vocabulary the padding ids are banned by default (= Transformers with suppress_tokens),
    and ``suppress_extra_tokens=False`` lets the beams pick them (= Transformers without)."""
    hf = hf_model(WIDE, seed=0, scale=3.0)
    with torch.no_grad():
        hf.lm_head.bias[EXTRA] += 3.0
    params = params_of(hf)
    ids, mask, _ = left_padded_batch(50257, [6, 3], seed=1)
    kw = dict(max_new_tokens=12, pad_token_id=0, num_return_sequences=2)
    ref = _hf_beams(hf, ids, mask, suppress_tokens=list(range(50257, 50400)), **kw)
    out = gptj_jax.beam_search(WIDE, params, ids, mask, num_beams=BEAMS, **kw)
    _assert_same(out, ref, 0)
    assert (out.new_tokens < 50257).all()
    ref = _hf_beams(hf, ids, mask, **kw)
    out = gptj_jax.beam_search(WIDE, params, ids, mask, num_beams=BEAMS, suppress_extra_tokens=False, **kw)
    _assert_same(out, ref, 0)
    assert (out.new_tokens == EXTRA).any()


# ============================================================================ compiles
def test_second_call_in_same_bucket_does_not_retrace(no_pad):
    """Other prompts (same prompt bucket), max_new_tokens (same bucket), length penalty, early stopping,
    num_return_sequences, EOS ids (another count) and the repetition penalty reuse the compiled program; a new
    prompt bucket compiles once (the counter works)."""
    _, params, _, _, _ = no_pad
    kw = dict(num_beams=BEAMS, no_repeat_ngram_size=2, repetition_penalty=1.2)
    ids, mask, _ = left_padded_batch(TINY.vocab_size, [9, 10], seed=4)
    gptj_jax.beam_search(TINY, params, ids, mask, max_new_tokens=20, eos_token_id=[3], **kw)
    before, size = dict(TRACE_COUNTS), beam_mod._beam_program._cache_size()
    ids, mask, _ = left_padded_batch(TINY.vocab_size, [11, 4], seed=5)
    out = gptj_jax.beam_search(TINY, params, ids, mask, max_new_tokens=17, eos_token_id=[7, 8, 9], length_penalty=2.0,
                      early_stopping="never", num_return_sequences=3,
                      **dict(kw, repetition_penalty=1.5))
    assert out.sequences.shape == (6, 11 + 17)
    assert dict(TRACE_COUNTS) == before and beam_mod._beam_program._cache_size() == size
    ids, mask, _ = left_padded_batch(TINY.vocab_size, [13, 2], seed=6)
    gptj_jax.beam_search(TINY, params, ids, mask, max_new_tokens=17, **kw)
    assert TRACE_COUNTS["beam"] == before["beam"] + 1


# ============================================================================ mesh
MESH_SCRIPT = """
import sys, json, numpy as np, torch
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import jax
jax.config.update("jax_num_cpu_devices", 8)
from conftest import hf_model, params_of, left_padded_batch
import gptj_jax
from gptj_jax import GPTJConfig
from gptj_jax.sharding import make_mesh
assert jax.device_count() == 8
cfg = GPTJConfig(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
hf = hf_model(cfg, seed=0, scale=3.0)
params = params_of(hf)
ids, mask, _ = left_padded_batch(cfg.vocab_size, [6, 3, 8], seed=0)
P = ids.shape[1]
def theirs(**kw):
    return hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, num_beams=4,
                       return_dict_in_generate=True, output_scores=True, **kw)
free = theirs(max_new_tokens=12, pad_token_id=127).sequences.numpy()[:, P:]
kw = dict(max_new_tokens=12, eos_token_id=[int(free[0, 4])], pad_token_id=127, num_return_sequences=2,
          length_penalty=0.5)
ref = theirs(**kw)
kw["num_beams"] = 4
outs = {{"one": gptj_jax.beam_search(cfg, params, ids, mask, **kw)}}
for name, mesh in [("dp4_mp2", make_mesh(dp=4, mp=2)), ("dp2_fsdp2_mp2", make_mesh(dp=2, fsdp=2, mp=2))]:
    outs[name] = gptj_jax.beam_search(cfg, params, ids, mask, mesh=mesh, **kw)
res = {{k: dict(sequences=o.sequences.tolist(), scores=o.sequence_scores.tolist(), n=o.num_new_tokens.tolist(),
               reasons=o.finish_reasons) for k, o in outs.items()}}
res["hf"] = dict(sequences=ref.sequences.tolist(), scores=ref.sequences_scores.tolist())
print(json.dumps(res))
"""


@pytest.mark.slow
def test_mesh_matches_one_device_and_transformers():
    """dp=4 x mp=2 and dp=2 x fsdp=2 x mp=2 on eight simulated devices (3 prompts: the batch bucket is
    padded to 4 rows for the data axes) give one device's beams and scores, which equal Transformers'; the
    EOS (a token the free-running beams emit) ends some hypotheses early."""
    script = MESH_SCRIPT.format(repo=REPO, tests=os.path.join(REPO, "tests"))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    one, hf = res["one"], res["hf"]
    assert "eos" in one["reasons"] and min(one["n"]) < 12
    n = len(hf["sequences"][0])
    assert [row[:n] for row in one["sequences"]] == hf["sequences"]
    np.testing.assert_allclose(one["scores"], hf["scores"], atol=1e-4, rtol=0)
    for name in ("dp4_mp2", "dp2_fsdp2_mp2"):
        assert res[name]["sequences"] == one["sequences"], name
        assert res[name]["reasons"] == one["reasons"], name
        np.testing.assert_allclose(res[name]["scores"], one["scores"], atol=1e-5, rtol=0)


# ============================================================================ bad input
@pytest.fixture(scope="module")
def tiny_params():
    return params_of(hf_model(TINY, seed=0, scale=3.0))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(do_sample=True), r"num_beams 4 with do_sample=True \(beam sampling\) is not supported"),
        (dict(num_return_sequences=5), r"num_return_sequences \(5\) must be <= num_beams \(4\)"),
        (dict(num_beams=1), r"beam search needs num_beams >= 2, got 1"),
        (dict(stop_strings=["x"]), "stop_strings are not supported with beam search"),
        (dict(early_stopping="soon"), r"early_stopping must be True, False or 'never', got 'soon'"),
        (dict(length_penalty=float("nan")), "length_penalty must be a finite number"),
        (dict(max_new_tokens=None), "max_new_tokens is not set"),
        (dict(max_new_tokens=60), r"prompt too long: row 0 has 5 tokens \+ max_new_tokens 60 = 65 > the model's "
                                  r"n_positions 64"),
        (dict(eos_token_id=[101]), r"eos_token_id 101 is not a token id in \[0, 101\)"),
        (dict(bad_words_ids=[[3, 200]]), r"bad_words_ids\[0\]\[1\] = 200 is outside the vocabulary"),
        (dict(num_bems=4), "unknown generation option 'num_bems' \\(did you mean 'num_beams'\\?\\)"),
    ],
)
def test_bad_input_raises_clear_error(tiny_params, kw, match):
    params = tiny_params
    kw = dict(dict(num_beams=BEAMS, max_new_tokens=8), **kw)
    with pytest.raises(GenerationError, match=match):
        gptj_jax.beam_search(TINY, params, [[1, 2, 3, 4, 5]], **kw)


def test_generation_config_is_used(tiny_params):
    """The knobs may come from a GenerationConfig (overrides on top), as in generate."""
    params = tiny_params
    gc = GenerationConfig(max_new_tokens=6, num_beams=3, num_return_sequences=2, length_penalty=0.0)
    out = gptj_jax.beam_search(TINY, params, [[1, 2, 3]], generation_config=gc)
    again = gptj_jax.beam_search(TINY, params, [[1, 2, 3]], max_new_tokens=6, num_beams=3, num_return_sequences=2,
                        length_penalty=0.0)
    assert out.sequences.shape == (2, 3 + 6)
    np.testing.assert_array_equal(out.sequences, again.sequences)
    assert out.sequence_scores[0] >= out.sequence_scores[1]  # best first


def test_streamer_is_refused_and_generate_keywords_pass_through(tiny_params):
    """Beam search does not stream: a streamer is one clear error (nothing runs). generate's other keywords
    are accepted: return_logprobs= is logprobs=, stream_interval is unused; the result is a GenerateOutput."""
    params = tiny_params
    kw = dict(num_beams=3, max_new_tokens=5, num_return_sequences=2)
    chunks = []
    with pytest.raises(GenerationError, match=r"beam search does not stream: num_beams 3 with a streamer") as err:
        gptj_jax.beam_search(TINY, params, [[1, 2, 3]], streamer=chunks.append, **kw)
    assert err.value.field == "streamer" and chunks == []
    out = gptj_jax.beam_search(TINY, params, [[1, 2, 3]], return_logprobs=True, stream_interval=8, **kw)
    again = gptj_jax.beam_search(TINY, params, [[1, 2, 3]], logprobs=True, **kw)
    assert isinstance(out, GenerateOutput) and isinstance(out, BeamOutput)
    assert out.prompt_length == 3 and out.logprobs.shape == (2, 5) and out.new_tokens.shape == (2, 5)
    np.testing.assert_array_equal(out.sequences, again.sequences)
    np.testing.assert_array_equal(out.logprobs, again.logprobs)
    np.testing.assert_allclose(out.logprobs.sum(1) / out.num_new_tokens, out.sequence_scores, atol=1e-5)

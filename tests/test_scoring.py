"""Scoring (``gptj_jax.score`` / ``score_rolling``): log-probs and is_greedy equal transformers' forward +
log_softmax on the same weights (mixed lengths in one batch, left truncation, vocabulary blocks), results
independent of the batch they are in, lm-eval's rolling windows, one compile per bucket, a mesh, and bad
input (one clear error naming the request).
"""

import json
import os
import subprocess
import sys

import lm_eval.utils
import numpy as np
import pytest
import torch
from conftest import TINY, hf_model, params_of

import gptj_jax
from gptj_jax import scoring

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_POS = TINY.n_positions  # 64
V = TINY.vocab_size  # 101 (prime: a 16-column block leaves a 5-column remainder)


@pytest.fixture(scope="module")
def model():
    hf = hf_model(TINY, seed=0, scale=3.0)
    return hf, params_of(hf)


def hf_reference(hf, context: list, continuation: list) -> tuple[np.ndarray, bool]:
    """lm-eval's HF backend for one request: (ctx + cont)[-(n_pos + 1):][:-1] in, the last n logits scored."""
    window = (context + continuation)[-(N_POS + 1):]
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([window[:-1]])).logits.float(), dim=-1)[0]  # [T, V]
    sel = logprobs[-len(continuation):]
    target = torch.tensor(continuation)
    lp = torch.gather(sel, 1, target[:, None])[:, 0].numpy()
    return lp, bool((sel.argmax(-1) == target).all())


def greedy_continuation(hf, context: list, n: int) -> list:
    ids = list(context)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids[-N_POS:]])).logits[0, -1].argmax()))
    return ids[len(context):]


def mixed_requests(hf) -> list:
    rng = np.random.RandomState(0)
    rand = lambda n: rng.randint(0, V, n).tolist()
    reqs = [
        (rand(5), rand(3)),
        (rand(1), rand(1)),  # one-token context and continuation
        (rand(20), rand(7)),
        (rand(2), rand(40)),  # long continuation, short context
        (rand(60), rand(10)),  # 70 tokens: truncated on the left to 65
        (rand(100), rand(N_POS)),  # continuation of exactly n_positions: only its last context token stays
        (rand(12), rand(1)),
    ]
    ctx = rand(9)
    greedy = greedy_continuation(hf, ctx, 6)
    reqs.append((ctx, greedy))  # is_greedy True
    near = greedy[:5] + [(greedy[5] + 1) % V]
    reqs.append((ctx, near))  # is_greedy False (only the last token differs)
    ctx2 = rand(70)
    reqs.append((ctx2, greedy_continuation(hf, ctx2[-(N_POS + 1 - 4):], 4)))  # greedy on the truncated window
    return reqs


@pytest.mark.parametrize("vocab_block", [None, 16, V])
def test_score_matches_transformers(model, vocab_block):
    """Mixed lengths in batches of 4 (sorted longest first, right-padded into buckets): every log-prob within
    1e-4 of transformers' log_softmax, the sum is theirs, is_greedy identical, for several vocabulary blocks."""
    hf, params = model
    reqs = mixed_requests(hf)
    results = gptj_jax.score(TINY, params, reqs, batch_size=4, vocab_block=vocab_block)
    assert len(results) == len(reqs)
    greedy_seen = []
    for (ctx, cont), res in zip(reqs, results):
        ref, ref_greedy = hf_reference(hf, ctx, cont)
        assert isinstance(res, gptj_jax.ScoreResult)
        assert res.logprobs.dtype == np.float32 and res.logprobs.shape == (len(cont),)
        np.testing.assert_allclose(res.logprobs, ref, rtol=0, atol=1e-4)
        assert res.sum == pytest.approx(float(ref.sum()), abs=1e-4 * len(cont))
        assert res.is_greedy == ref_greedy
        greedy_seen.append(res.is_greedy)
    assert greedy_seen[-3:] == [True, False, True]  # both outcomes are exercised


def test_results_do_not_depend_on_the_batch(model):
    """A request scored alone, in a batch of 8 with others, or in another order: the same log-probs."""
    hf, params = model
    reqs = mixed_requests(hf)
    together = gptj_jax.score(TINY, params, reqs, batch_size=8)
    reordered = gptj_jax.score(TINY, params, reqs[::-1], batch_size=3)[::-1]
    for i, req in enumerate(reqs):
        (alone,) = gptj_jax.score(TINY, params, [req], batch_size=1)
        for other in (together[i], reordered[i]):
            np.testing.assert_allclose(other.logprobs, alone.logprobs, rtol=0, atol=1e-5)
            assert other.is_greedy == alone.is_greedy


def test_one_compile_per_bucket(model):
    _, params = model
    rng = np.random.RandomState(1)
    rand = lambda n: rng.randint(0, V, n).tolist()
    gptj_jax.score(TINY, params, [(rand(10), rand(3)), (rand(6), rand(2))])  # rows 2, length 12, scored 8
    before = dict(scoring.TRACE_COUNTS)
    again = gptj_jax.score(TINY, params, [(rand(8), rand(4)), (rand(3), rand(4))])  # inputs 11, 6: same buckets
    assert dict(scoring.TRACE_COUNTS) == before
    assert len(again) == 2
    gptj_jax.score(TINY, params, [(rand(30), rand(3)), (rand(3), rand(4))])  # length bucket 32: one new trace
    assert scoring.TRACE_COUNTS["score"] == before["score"] + 1


@pytest.mark.parametrize("length", [0, 1, 63, 64, 65, 150, 200])
@pytest.mark.parametrize("context_len", [1, 10, 64])
def test_rolling_windows_equal_lm_eval(length, context_len):
    tokens = np.random.RandomState(length).randint(0, 50257, length).tolist()
    ours = gptj_jax.scoring.rolling_windows(tokens, 50256, N_POS, context_len)
    theirs = [
        lm_eval.utils.make_disjoint_window(w)
        for w in lm_eval.utils.get_rolling_token_windows(tokens, 50256, N_POS, context_len)
    ]
    assert ours == [(list(c), list(k)) for c, k in theirs]
    assert [t for _, cont in ours for t in cont] == tokens  # every token scored once, in order


def test_score_rolling_equals_lm_eval_rule(model):
    """A text of 150 tokens (> n_positions 64): the sum over lm-eval's windows of transformers' log-probs."""
    hf, params = model
    rng = np.random.RandomState(2)
    texts = [rng.randint(0, V, 150).tolist(), rng.randint(0, V, 30).tolist(), []]
    prefix = 7
    totals = gptj_jax.score_rolling(TINY, params, texts, prefix_token=prefix, batch_size=2)
    for text, total in zip(texts, totals):
        windows = [
            lm_eval.utils.make_disjoint_window(w)
            for w in lm_eval.utils.get_rolling_token_windows(text, prefix, N_POS, 1)
        ]
        expected = sum(float(hf_reference(hf, list(c), list(k))[0].sum()) for c, k in windows)
        assert total == pytest.approx(expected, abs=1e-4 * max(len(text), 1))
    assert totals[2] == 0.0


@pytest.mark.parametrize(
    "requests, message",
    [
        ([([1, 2], [3]), ([1], [])], "request 1: the continuation is empty"),
        ([([], [3, 4])], "request 0: the context is empty"),
        ([([1, 2], [3, 101])], "request 0: continuation[1] = 101 is outside the vocabulary [0, 101)"),
        ([([1, -2], [3])], "request 0: context[1] = -2 is outside the vocabulary [0, 101)"),
        ([([1], list(range(N_POS + 1)))], "request 0: the continuation has 65 tokens, more than the model's n_positions 64"),
        ([([1], [2.5])], "request 0: continuation must hold integer token ids"),
        ([([1], [2], [3])], "request 0 must be a (context ids, continuation ids) pair"),
        ([("abc", [2])], "request 0: context must be a list of token ids, got a string"),
        ("abc", "requests must be a list of (context ids, continuation ids) pairs"),
    ],
)
def test_bad_requests(model, requests, message):
    _, params = model
    with pytest.raises(scoring.ScoringError) as info:
        gptj_jax.score(TINY, params, requests)
    assert message in str(info.value)


def test_bad_options(model):
    _, params = model
    with pytest.raises(scoring.ScoringError, match="batch_size must be an integer >= 1, got 0"):
        gptj_jax.score(TINY, params, [([1], [2])], batch_size=0)
    with pytest.raises(scoring.ScoringError, match="vocab_block must be an integer >= 1, got 0"):
        gptj_jax.score(TINY, params, [([1], [2])], vocab_block=0)
    with pytest.raises(scoring.ScoringError, match="params are not a GPT-J causal-LM tree"):
        gptj_jax.score(TINY, {"transformer": params["transformer"]}, [([1], [2])])
    with pytest.raises(scoring.ScoringError, match=r"prefix_token 50256 is outside the vocabulary \[0, 101\)"):
        gptj_jax.score_rolling(TINY, params, [[1, 2, 3]])  # the default (EOS 50256) is not in a 101-id vocab
    with pytest.raises(scoring.ScoringError, match=r"text 1\[0\] = 500 is outside the vocabulary"):
        gptj_jax.score_rolling(TINY, params, [[1], [500]], prefix_token=0)
    with pytest.raises(scoring.ScoringError, match=r"context_len must be an integer in \[1, max_len=8\], got 9"):
        gptj_jax.scoring.rolling_windows([1, 2, 3], 0, 8, context_len=9)


MESH_SCRIPT = """
import sys, json
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import jax
jax.config.update("jax_num_cpu_devices", 8)
import numpy as np
from conftest import hf_model, params_of
import gptj_jax
from gptj_jax.sharding import make_mesh
cfg = gptj_jax.GPTJConfig(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
params = params_of(hf_model(cfg, seed=0, scale=3.0))
rng = np.random.RandomState(0)
reqs = [(rng.randint(0, 128, a).tolist(), rng.randint(0, 128, b).tolist()) for a, b in [(5, 3), (30, 9), (2, 1)]]
out = {{"one": gptj_jax.score(cfg, params, reqs, vocab_block=16)}}
out["dp2_fsdp2_mp2"] = gptj_jax.score(cfg, params, reqs, mesh=make_mesh(dp=2, fsdp=2, mp=2))
out["dp8"] = gptj_jax.score(cfg, params, reqs, mesh=make_mesh(dp=8), vocab_block=16)
print(json.dumps({{k: [[r.logprobs.tolist(), r.is_greedy] for r in v] for k, v in out.items()}}))
"""


@pytest.mark.slow
def test_mesh_matches_one_device():
    """Params sharded over (dp, fsdp, mp) (vocabulary split: one block) or dp=8 (3 rows rounded up to 8,
    vocabulary blocks): the one-device log-probs and is_greedy."""
    script = MESH_SCRIPT.format(repo=REPO, tests=os.path.join(REPO, "tests"))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("dp2_fsdp2_mp2", "dp8"):
        for (lp, greedy), (lp1, greedy1) in zip(res[name], res["one"]):
            np.testing.assert_allclose(lp, lp1, rtol=0, atol=1e-5)
            assert greedy == greedy1

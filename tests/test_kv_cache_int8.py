"""The int8 KV cache (``kv_cache="int8"``, ``--kv-cache int8``): int8 K/V with one float32 scale per (row, head,
slot), quantized before the write and dequantized in the compute dtype on read.

What it computes (exactly attention over the quantized K/V, the current tokens included) and how far that is from
the float32 cache (against a bound derived below), its bytes, greedy output on an 8-device mesh (this file run as a
script is the worker), ``scan_layers``, beam search, and bad values of the option.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import generate_cli, hf_model, left_padded_batch, params_of

import gptj_jax
from gptj_jax import generation as G
from gptj_jax import model as M
from gptj_jax.convert import table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One layer: q, k, v of every position depend on the tokens only, not on the cache, so the int8 model is exactly
# "float attention over quantize-dequantize(K/V)" and its distance to the float model can be bounded by hand.
ONE = gptj_jax.GPTJConfig(vocab_size=101, n_positions=64, n_embd=64, n_layer=1, n_head=4, rotary_dim=8)
TWO = gptj_jax.GPTJConfig(vocab_size=101, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
STEPS = 6  # decode steps after the prefill


def _params(config, scale=3.0, seed=0):
    return jax.tree.map(jnp.asarray, params_of(hf_model(config, seed=seed, scale=scale)))


def _run(config, params, ids, mask, kv_cache, fed=None):
    """``generation.prefill`` then ``STEPS`` ``decode_step`` s, fed ``fed [B, STEPS]`` (default: greedy).
    Returns (the tokens fed ``[B, STEPS]``, logits ``[B, 1 + STEPS, V]``, the cache)."""
    logits, cache = G.prefill(params, jnp.asarray(ids), jnp.asarray(mask), config=config,
                              cache_len=ids.shape[1] + STEPS + 2, kv_cache=kv_cache)
    out, toks = [np.asarray(logits)], []
    for i in range(STEPS):
        toks.append(np.argmax(out[-1], -1).astype(np.int32) if fed is None else fed[:, i])
        logits, cache = G.decode_step(params, cache, jnp.asarray(toks[-1]), config=config)
        out.append(np.asarray(logits))
    return np.stack(toks, 1), np.stack(out, 1), cache


def _greedy_run(config, params, ids, mask):
    """The float32-cache greedy tokens and the logits of both caches fed those tokens."""
    fed, ref, _ = _run(config, params, ids, mask, None)
    _, q8, cache = _run(config, params, ids, mask, "int8", fed)
    return fed, ref, q8, cache


def _fake_quant(x: np.ndarray) -> np.ndarray:
    """Reference of the scheme: per vector over the last axis, ``s = max|x| / 127``, ``round(x / s) * s``."""
    s = np.abs(x).max(-1, keepdims=True) / 127
    s = np.where(s > 0, s, 1.0)
    return np.clip(np.round(x / s), -127, 127) * s


@pytest.fixture(scope="module")
def one_layer():
    params = _params(ONE)
    ids, mask, _ = left_padded_batch(ONE.vocab_size, [8, 5], seed=1)
    fed, ref, q8, cache = _greedy_run(ONE, params, ids, mask)
    # q, k, v, the block output and the attention output of every position of prompt + fed tokens (no cache)
    full = np.concatenate([ids, fed], 1)
    fmask = np.concatenate([mask, np.ones_like(fed)], 1)
    _, inter = M.GPTJForCausalLM(ONE).apply({"params": params}, full, fmask, capture_intermediates=True,
                                            mutable=["intermediates"])
    block = inter["intermediates"]["transformer"]["h_0"]
    B, T = full.shape
    qkv = [np.asarray(block["attn"][n]["__call__"][0]).reshape(B, T, ONE.n_head, ONE.head_dim)
           for n in ("q_proj", "k_proj", "v_proj")]
    return dict(params=params, ids=ids, mask=mask, fed=fed, ref=ref, q8=q8, cache=cache, full=full, fmask=fmask,
                qkv=qkv, h=np.asarray(block["__call__"][0][0]), attn=np.asarray(block["attn"]["__call__"][0][0]))


def test_int8_cache_is_attention_over_quantized_kv(one_layer):
    """Prefill + decode with the int8 cache gives exactly the logits of float attention over K/V quantized per
    (row, head, token) vector, the current token's own K/V included (the reference is numpy + ``M.attend``)."""
    r = one_layer
    params, (q, k, v), full, fmask = r["params"], r["qkv"], r["full"], r["fmask"]
    pos = np.maximum(np.cumsum(fmask, 1) - 1, 0)
    sin, cos = M.rotary_sin_cos(jnp.asarray(pos), ONE.rotary_dims)
    q, k = (np.asarray(M.apply_rotary(jnp.asarray(x), sin, cos)) for x in (q, k))
    T = full.shape[1]
    allowed = fmask[:, None, :].astype(bool) & (np.arange(T)[None, :] <= np.arange(T)[:, None])[None]
    w_out = np.asarray(params["transformer"]["h_0"]["attn"]["out_proj"]["kernel"])

    def attention(kk, vv):  # [B, T, N, H] keys / values -> attention output [B, T, D]
        out, _ = M.attend(jnp.asarray(q), jnp.asarray(kk.swapaxes(1, 2)), jnp.asarray(vv.swapaxes(1, 2)),
                          jnp.asarray(allowed))
        return np.asarray(out).reshape(full.shape + (-1,)) @ w_out

    assert np.abs(attention(k, v) - r["attn"]).max() < 1e-5  # the reference reproduces the float model
    h = r["h"] - r["attn"] + attention(_fake_quant(k), _fake_quant(v))  # the block output with int8 K/V
    ln = params["transformer"]["ln_f"]
    y = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + ONE.layer_norm_epsilon)
    y = y * np.asarray(ln["scale"]) + np.asarray(ln["bias"])
    want = y @ np.asarray(params["lm_head"]["kernel"]) + np.asarray(params["lm_head"]["bias"])
    P = r["ids"].shape[1]
    got = r["q8"]  # [B, 1 + STEPS, V]: positions P - 1 .. T - 1
    err = np.abs(got - want[:, P - 1:]).max()
    moved = np.abs(got - r["ref"]).max()
    print(f"int8 cache vs reference {err:.2e}; vs the float32 cache {moved:.2e}")
    assert err < 2e-5 and moved > 20 * err, (err, moved)
    # the cache holds what the reference quantized: int8 values and float32 scales [B, N, S, 1]
    layer = r["cache"]["layers"][0]
    assert layer["k"].dtype == jnp.int8 and layer["k_scale"].dtype == jnp.float32
    assert layer["k_scale"].shape == (2, ONE.n_head, P + STEPS + 2, 1)
    stored = np.asarray(layer["v"][:, :, :T], np.float32) * np.asarray(layer["v_scale"][:, :, :T])
    want_v = _fake_quant(v.swapaxes(1, 2)) * fmask[:, None, :, None]  # pad slots are never read
    assert np.abs(stored * fmask[:, None, :, None] - want_v).max() < 1e-5


def test_int8_cache_logits_within_the_derived_bound(one_layer):
    """|logits(int8 cache) - logits(float32 cache)| at every prefill / decode position, against a first-order
    worst-case bound from the quantization step.

    Per head ``n`` and key ``s`` the stored key is off by at most ``s_k / 2 = max|k_s| / 254 <= |k_s|_2 / 254``
    per element (rotary is a rotation, so the norm is that of the unrotated ``k_s``), hence a score by at most
    ``e = |q_t|_2 * max_s |k_s|_2 / 254`` (Cauchy-Schwarz; ``1/sqrt(H)`` cancels ``sqrt(H)``). Softmax moves
    the probabilities by ``|dp|_1 <= 2 e``, so output element ``h`` moves by at most ``2 e max_s |v_sh| +
    max_s |v_s|_inf / 254``. Then ``out_proj`` (spectral norm), ``ln_f`` (``max|gamma| / sigma_t``: LayerNorm's
    Jacobian is ``diag(gamma) / sigma`` times a projection) and the LM head (largest column norm). One layer:
    the block's other terms do not see the cache. Second-order terms are below ``e`` (< 0.05 here) times it.
    """
    r = one_layer
    params, (q, k, v), fmask, h = r["params"], r["qkv"], r["fmask"], r["h"]
    qn, kn, vinf = np.linalg.norm(q, axis=-1), np.linalg.norm(k, axis=-1), np.abs(v).max(-1)  # [B, T, N]
    w_out = np.linalg.norm(np.asarray(params["transformer"]["h_0"]["attn"]["out_proj"]["kernel"]), 2)
    gamma = np.abs(np.asarray(params["transformer"]["ln_f"]["scale"])).max()
    head = np.linalg.norm(np.asarray(params["lm_head"]["kernel"]), axis=0).max()
    sigma = np.sqrt(h.var(-1) + ONE.layer_norm_epsilon)  # [B, T]
    B, T = fmask.shape
    P = r["ids"].shape[1]
    bound = np.zeros((B, T - P + 1))
    e_max = 0.0
    for b in range(B):
        for i, t in enumerate(range(P - 1, T)):
            keys = [s for s in range(t + 1) if fmask[b, s]]
            e = qn[b, t] * kn[b, keys].max(0) / 254  # [N]
            e_max = max(e_max, float(e.max()))
            d_out = 2 * e[:, None] * np.abs(v[b, keys]).max(0) + vinf[b, keys].max(0)[:, None] / 254  # [N, H]
            bound[b, i] = head * gamma / sigma[b, t] * w_out * np.linalg.norm(d_out)
    err = np.abs(r["q8"] - r["ref"]).max(-1)  # [B, 1 + STEPS]
    print(f"max error {err.max():.2e}, bound {bound.min():.2e} .. {bound.max():.2e}, e {e_max:.3f}")
    assert e_max < 0.05
    assert (err <= 1.05 * bound).all(), (err, bound)
    assert (err > 0).all()  # the cache really is quantized


def test_int8_cache_greedy_tokens_equal_float32_where_margins_allow():
    """Where the float32 cache's top-1 margin exceeds twice the int8 cache's logit error at every step (checked),
    greedy ``gptj_jax.generate`` with ``kv_cache="int8"`` gives exactly the float32 tokens; two layers."""
    params = _params(TWO, scale=4.0)
    ids, mask, _ = left_padded_batch(TWO.vocab_size, [7, 4, 6], seed=3)
    fed, ref, q8, _ = _greedy_run(TWO, params, ids, mask)
    top2 = np.sort(ref, -1)[..., -2:]
    margin, err = top2[..., 1] - top2[..., 0], np.abs(q8 - ref).max(-1)
    print(f"smallest margin {margin.min():.3f}, largest error {err.max():.2e}")
    assert (margin > 2 * err).all(), (margin, err)  # the case: margins allow
    kw = dict(max_new_tokens=STEPS + 1, eos_token_id=[])
    f32 = gptj_jax.generate(TWO, params, ids, mask, **kw)
    i8 = gptj_jax.generate(TWO, params, ids, mask, kv_cache="int8", **kw)
    np.testing.assert_array_equal(i8.sequences, f32.sequences)
    np.testing.assert_array_equal(f32.new_tokens[:, :STEPS], fed)


def test_int8_cache_on_a_trained_model(tmp_path):
    """A demo-size GPT-J (configs/demo-tiny.yaml) trained 60 steps on two demo fable files; 1024 held-out tokens
    run through the cache (every position attends to the stored K/V): top-1 agreement of the int8 cache with the
    float32 cache >= 99% and mean KL(float32 || int8) <= 0.01 nats per token."""
    import glob

    from gptj_jax.train.config import load_train_config
    from gptj_jax.train.data import prepare
    from gptj_jax.train.loop import train

    files = sorted(glob.glob(os.path.join(REPO, "data", "demo", "train", "*.txt")))
    prepare(files[:2], str(tmp_path / "data"), seq=64, workers=1, progress=False)
    cfg = load_train_config(os.path.join(REPO, "configs", "demo-tiny.yaml"), [
        f"train_set={tmp_path / 'data'}", f"model_dir={tmp_path / 'run'}", "seq=64", "per_replica_batch=8",
        "total_steps=60", "warmup_steps=0", "anneal_steps=60", "lr=3e-3", "ckpt_every=1000", "val_set={}",
        "progress=false", "peak_flops=1e11",
    ])
    summary = train(cfg)
    config, params = summary["model_config"], summary["final_params"]
    with open(sorted(glob.glob(os.path.join(REPO, "data", "demo", "val", "*.txt")))[0], encoding="utf-8") as f:
        ids = gptj_jax.load_tokenizer(None)(f.read())["input_ids"]
    rows = jnp.asarray(np.asarray(ids[: 8 * 128], np.int32).reshape(8, 128))
    model = gptj_jax.GPTJForCausalLM(config)

    @jax.jit
    def logp(params, cache):
        return jax.nn.log_softmax(model.apply({"params": params}, rows, cache=cache).logits, -1)

    f32 = np.asarray(logp(params, gptj_jax.init_cache(config, 8, 128)))
    q8 = np.asarray(logp(params, gptj_jax.init_cache(config, 8, 128, kv_cache="int8")))
    agree = float((f32.argmax(-1) == q8.argmax(-1)).mean())
    kl = float((np.exp(f32) * (f32 - q8)).sum(-1).mean())
    nll = -np.take_along_axis(f32[:, :-1], np.asarray(rows)[:, 1:, None], -1).mean()
    print(f"trained demo model (val nll {nll:.2f}): top-1 agreement {agree:.4f}, mean KL {kl:.2e} nats/token")
    assert nll < 6.0  # it learned something (uniform over 50400 ids is 10.8)
    assert agree >= 0.99 and kl <= 0.01, (agree, kl)


def test_int8_cache_bytes_at_most_055_of_bfloat16():
    """Bytes of the cache arrays (K/V and scales): int8 <= 0.55x bfloat16, measured from the arrays; the same for
    GPT-J-6B from ``jax.eval_shape`` (no arrays made), and ``cache.cache_bytes`` says so too."""
    from gptj_jax.cache import cache_bytes

    def nbytes(cache):
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(cache["layers"]))

    cfg = gptj_jax.GPTJConfig(vocab_size=101, n_positions=64, n_embd=256, n_layer=2, n_head=4, rotary_dim=16)  # H 64
    bf16 = gptj_jax.init_cache(cfg, 3, 64, jnp.bfloat16)
    q8 = gptj_jax.init_cache(cfg, 3, 64, jnp.bfloat16, kv_cache="int8")
    assert nbytes(q8) <= 0.55 * nbytes(bf16), (nbytes(q8), nbytes(bf16))
    assert nbytes(q8) == cache_bytes(cfg, 3, 64, jnp.bfloat16, "int8") == 2 * 2 * 3 * 64 * (256 + 4 * 4)
    assert nbytes(bf16) == cache_bytes(cfg, 3, 64, jnp.bfloat16)

    big = gptj_jax.GPTJConfig.preset("gptj-6b")
    per_token = {kv: nbytes(jax.eval_shape(lambda kv=kv: gptj_jax.init_cache(big, 1, 2048, jnp.bfloat16, kv))) // 2048
                 for kv in (None, "int8")}
    print(f"GPT-J-6B cache bytes per token: bfloat16 {per_token[None]}, int8 {per_token['int8']}")
    assert per_token == {None: 458752, "int8": 232960}  # 2 x 28 x 4096 x 2; 2 x 28 x 16 x (256 + 4)
    assert per_token["int8"] <= 0.55 * per_token[None]
    assert cache_bytes(big, 4, 2048, jnp.bfloat16, "int8") == 4 * 2048 * per_token["int8"]


def test_scan_layers_int8_cache_equals_unrolled():
    """With ``scan_layers`` the int8 cache is stacked (``[L, B, N, S, H]`` int8, scales ``[L, B, N, S, 1]``) and
    prefill + decode logits equal the unrolled int8 run; generate's tokens too."""
    params = _params(TWO)
    scan = TWO.replace(scan_layers=True)
    stacked = table.stack_layers(params)
    ids, mask, _ = left_padded_batch(TWO.vocab_size, [6, 3], seed=2)
    fed, _, q8, cache = _greedy_run(TWO, params, ids, mask)
    _, got, scache = _run(scan, stacked, ids, mask, "int8", fed)
    assert np.abs(got - q8).max() <= 1e-5
    layers = scache["layers"]
    S = ids.shape[1] + STEPS + 2
    assert set(layers) == {"k", "v", "k_scale", "v_scale"}
    assert layers["k"].shape == (2, 2, TWO.n_head, S, TWO.head_dim) and layers["k"].dtype == jnp.int8
    assert layers["v_scale"].shape == (2, 2, TWO.n_head, S, 1)
    for i in range(TWO.n_layer):  # the same values as the unrolled cache's layer i
        assert np.abs(np.asarray(layers["k_scale"][i]) - np.asarray(cache["layers"][i]["k_scale"])).max() <= 1e-6
    kw = dict(max_new_tokens=8, eos_token_id=[], kv_cache="int8")
    np.testing.assert_array_equal(gptj_jax.generate(scan, stacked, ids, mask, **kw).sequences,
                                  gptj_jax.generate(TWO, params, ids, mask, **kw).sequences)


def test_beam_search_and_scheduler_take_the_int8_cache():
    """Beam search (rows reordered with ``cache.take_rows``) and the scheduler (``cache.insert`` into decode slots,
    requests admitted at different steps) run on the int8 cache and agree with ``generate``'s int8 greedy rows."""
    from gptj_jax.engine import LLM

    params = _params(TWO, scale=4.0)
    prompts = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 6], [11, 12, 13, 14, 15]]
    kw = dict(max_new_tokens=6, eos_token_id=[])
    greedy = gptj_jax.generate(TWO, params, prompts, kv_cache="int8", **kw)
    llm = LLM(TWO, params, max_slots=2, max_len=16, kv_cache="int8")  # 3 requests on 2 slots: one waits
    outs = llm.generate(prompts, **kw)
    for b, out in enumerate(outs):
        assert out.token_ids[0] == greedy.new_tokens[b].tolist()
    assert llm.state.cache["layers"][0]["k"].dtype == jnp.int8
    beams = gptj_jax.generate(TWO, params, prompts, kv_cache="int8", num_beams=2, **kw)
    f32 = gptj_jax.generate(TWO, params, prompts, num_beams=2, **kw)
    np.testing.assert_array_equal(beams.sequences, f32.sequences)
    assert np.abs(beams.sequence_scores - f32.sequence_scores).max() < 1e-2


# ---------------------------------------------------------------------------------------- bad values
def test_unknown_kv_cache_scheme_is_one_clear_error(tmp_path):
    """``int4`` (or anything but ``int8``) is a ValueError naming the keyword, before anything runs."""
    from gptj_jax.engine import LLM
    from gptj_jax.eval_harness import GPTJLM

    params = _params(TWO)
    msg = r"kv_cache='int4' is not a KV cache scheme; the one scheme is 'int8'"
    with pytest.raises(ValueError, match=msg):
        gptj_jax.generate(TWO, params, [[1, 2]], max_new_tokens=2, kv_cache="int4")
    with pytest.raises(ValueError, match=msg):
        gptj_jax.generate(TWO, params, [[1, 2]], max_new_tokens=2, kv_cache="int4", num_beams=2)
    with pytest.raises(ValueError, match=msg):
        gptj_jax.init_cache(TWO, 1, 8, kv_cache="int4")
    with pytest.raises(ValueError, match=msg):
        LLM(TWO, params, max_slots=1, max_len=8, kv_cache="int4")
    with pytest.raises(ValueError, match=r"kv_cache='fp8' is not a KV cache scheme"):
        GPTJLM(config=TWO, params=params, tokenizer=None, kv_cache="fp8")
    # a layer with int8 K/V but no scales is not the cache layout
    cache = gptj_jax.init_cache(TWO, 1, 8, kv_cache="int8")
    del cache["layers"][1]["v_scale"]
    with pytest.raises(ValueError, match=r"cache layer 1 holds \['k', 'k_scale', 'v'\]"):
        M.GPTJForCausalLM(TWO).apply({"params": params}, jnp.ones((1, 2), jnp.int32), cache=cache)


@pytest.mark.parametrize("verb", ["generate", "serve", "lm-eval"])
def test_cli_refuses_an_unknown_kv_cache(tmp_path, verb):
    """``--kv-cache int4`` on every verb with the model flags: exit 1, one line naming the flag."""
    argv = {"generate": ["generate", "--model", str(tmp_path), "--prompt", "x"],
            "serve": ["serve", "--model", str(tmp_path)],
            "lm-eval": ["lm-eval", "--model", str(tmp_path), "--tasks", "x"]}[verb]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "gptj_jax.cli", *argv, "--kv-cache", "int4"], capture_output=True,
                          text=True, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0] == (f"gptj-jax {verb}: error: ValueError: --kv-cache='int4' is not a KV cache scheme; the one "
                        "scheme is 'int8' (leave it unset for K/V in the compute dtype)")


# ---------------------------------------------------------------------------------------- 8 devices
MESH_CFG = dict(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
MESHES = [(1, 2, 4), (2, 1, 4), (8, 1, 1)]  # (dp, fsdp, mp)
PROMPTS = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 6], [11, 12, 13, 14, 15], [1]]


def mesh_worker() -> dict:
    """On 8 simulated devices: int8-cache greedy ``generate`` and ``LLM`` per mesh against one device."""
    jax.config.update("jax_num_cpu_devices", 8)
    from gptj_jax import sharding as sh
    from gptj_jax.engine import LLM

    cfg = gptj_jax.GPTJConfig(**MESH_CFG)
    params = jax.device_get(_params(cfg, scale=4.0))
    kw = dict(max_new_tokens=10, eos_token_id=[], kv_cache="int8")
    ref = gptj_jax.generate(cfg, params, PROMPTS, return_logprobs=True, **kw)
    out = {}
    for shape in MESHES:
        mesh = sh.make_mesh(*shape)
        got = gptj_jax.generate(cfg, params, PROMPTS, return_logprobs=True, mesh=mesh, **kw)
        llm = LLM(cfg, params, max_slots=8, max_len=32, mesh=mesh, kv_cache="int8")
        served = llm.generate(PROMPTS, max_new_tokens=10, eos_token_id=[])
        scale = llm.state.cache["layers"][0]["k_scale"]
        out["x".join(map(str, shape))] = {
            "tokens_equal": bool(np.array_equal(got.sequences, ref.sequences)),
            "logprob_err": float(np.abs(got.logprobs - ref.logprobs).max()),
            "scheduler_equal": [o.token_ids[0] for o in served] == ref.new_tokens.tolist(),
            "scale_spec": str(scale.sharding.spec),
            "scale_shard": list(scale.addressable_shards[0].data.shape),
            "k_dtype": str(llm.state.cache["layers"][0]["k"].dtype),
        }
    return out


@pytest.fixture(scope="module")
def mesh_results() -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.path.join(REPO, "tests"), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "mesh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", MESHES, ids=["dp%d-fsdp%d-mp%d" % m for m in MESHES])
def test_int8_cache_on_8_devices_equals_one_device(mesh_results, shape):
    """Greedy ``generate`` and the scheduler with the int8 cache on an 8-device mesh give one device's tokens;
    the decode state's scales are split like K/V (rows over the data axes, heads over ``mp``)."""
    r = mesh_results["x".join(map(str, shape))]
    dp, fsdp, mp = shape
    assert r["tokens_equal"] and r["scheduler_equal"] and r["logprob_err"] <= 1e-4, r
    assert r["k_dtype"] == "int8"
    assert r["scale_shard"] == [8 // (dp * fsdp), MESH_CFG["n_head"] // mp, 32, 1], r
    if mp > 1:
        assert "mp" in r["scale_spec"], r


def test_cli_kv_cache_int8_mesh_of_8_equals_one_device(tmp_path):
    """``gptj-jax generate --kv-cache int8 --greedy`` on an 8-device mesh (fsdp=2, mp=4) prints what one device
    prints (a saved tiny GPT-J with GPT-J's vocabulary; GPT-J's tokenizer)."""
    cfg = gptj_jax.GPTJConfig(vocab_size=50400, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
    hf_model(cfg, scale=4.0).save_pretrained(str(tmp_path / "model"))
    prompt = "Hello world, this is"
    argv = ["--model", str(tmp_path / "model"), "--prompt", prompt, "--max-new-tokens", "12", "--greedy", "--quiet",
            "--kv-cache", "int8"]
    one = generate_cli(argv)
    eight = generate_cli([*argv, "--mesh", "fsdp=2,mp=4"], env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert one.returncode == 0 and eight.returncode == 0, (one.stderr[-2000:], eight.stderr[-2000:])
    assert eight.stdout == one.stdout and one.stdout.startswith(prompt) and len(one.stdout) > len(prompt) + 1


if __name__ == "__main__" and sys.argv[1:] == ["mesh"]:
    print(json.dumps(mesh_worker()))

"""The shard_map (Megatron) forward of ``tp.py``: equal to the jit path, and the collectives it compiles to.

Runs in one subprocess with 8 simulated CPU devices (this file as a script is the worker), for
meshes (dp, fsdp, mp) in (8,1,1), (1,8,1), (1,1,8), (2,2,2), (1,2,4):

* logits, loss and gradients of ``impl="shard_map"`` equal the jit path and one device (<= 1e-5);
* the compiled HLO holds exactly the expected collectives: per block one all-reduce over mp in the
  forward (two with the backward), and, with fsdp > 1, seven all-gathers (q, k, v, out_proj,
  fc_in, fc_out kernels, fc_out bias) whose backward is seven reduce-scatters. Per-block counts come
  from the difference between a 3-layer and a 2-layer model, so nothing else can hide in them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import padded_lm_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4)]
MESH_IDS = ["dp%d-fsdp%d-mp%d" % m for m in MESHES]
COUNT_MESHES = [(1, 1, 8), (1, 2, 4), (2, 2, 2)]
CONFIG = dict(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=8, rotary_dim=4)
B, T = 8, 12


def _batch():
    return padded_lm_batch(CONFIG["vocab_size"], B, T, seed=5)


def worker() -> dict:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_num_cpu_devices", 8)
    from gptj_jax import sharding as sh
    from gptj_jax import tp
    from gptj_jax.config import GPTJConfig
    from gptj_jax.losses import causal_lm_loss
    from gptj_jax.model import init_params, model_for

    cfg = GPTJConfig(**CONFIG)
    params = jax.device_get(init_params(cfg, jax.random.PRNGKey(0)))
    ids, mask, labels = _batch()
    module = model_for(cfg)

    def ref_loss(p):
        return causal_lm_loss(module.apply({"params": p}, ids, attention_mask=mask).logits, labels)

    ref_logits = np.asarray(module.apply({"params": params}, ids, attention_mask=mask).logits)
    ref_l, ref_g = jax.value_and_grad(ref_loss)(params)
    ref_g = jax.device_get(ref_g)

    def maxdiff(a, b):
        return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    out: dict = {"meshes": {}, "counts": {}}
    for shape in MESHES:
        mesh = sh.make_mesh(*shape)
        p = sh.shard_params(params, mesh, cfg)
        x, m, y = sh.shard_batch(mesh, ids, mask, labels)
        r: dict = {}
        logits = {impl: np.asarray(tp.forward(p, x, m, config=cfg, mesh=mesh, impl=impl)) for impl in tp.IMPLS}
        r["sm_vs_jit"] = float(np.abs(logits["shard_map"] - logits["jit"]).max())
        r["sm_vs_ref"] = float(np.abs(logits["shard_map"] - ref_logits).max())
        losses = {impl: float(tp.loss(p, x, y, m, config=cfg, mesh=mesh, impl=impl)) for impl in tp.IMPLS}
        r["loss_sm_vs_jit"] = abs(losses["shard_map"] - losses["jit"])
        r["loss_sm_vs_ref"] = abs(losses["shard_map"] - float(ref_l))
        grad_fn = jax.jit(jax.grad(tp.make_loss(cfg, mesh, "shard_map")))
        g = grad_fn(p, x, y, m)
        r["grad_vs_ref"] = maxdiff(jax.device_get(g), ref_g)
        r["grad_sharded_like_params"] = all(
            a.sharding.is_equivalent_to(s.sharding, a.ndim) for a, s in zip(jax.tree.leaves(g), jax.tree.leaves(p))
        )
        # No retracing: the cached jitted forward compiled once for these shapes.
        tp.forward(p, x, m, config=cfg, mesh=mesh, impl="shard_map")
        r["same_object"] = tp.make_forward(cfg, mesh, "shard_map") is tp.make_forward(cfg, mesh, impl="shard_map", dtype=jnp.float32)
        r["compiles"] = tp.make_forward(cfg, mesh, "shard_map")._cache_size()
        if shape == (1, 2, 4):
            bf = {impl: np.asarray(tp.forward(p, x, m, config=cfg, mesh=mesh, impl=impl, dtype=jnp.bfloat16)) for impl in tp.IMPLS}
            r["bf16_sm_vs_jit"] = float(np.abs(bf["shard_map"] - bf["jit"]).max())
            r["bf16_vs_f32"] = float(np.abs(bf["shard_map"] - ref_logits).max())
        out["meshes"]["x".join(map(str, shape))] = r

    for shape in COUNT_MESHES:
        per_layers = {}
        for n_layer in (2, 3):
            c = GPTJConfig(**dict(CONFIG, n_layer=n_layer))
            mesh = sh.make_mesh(*shape)
            ap = sh.abstract_params(c, mesh)
            ab = tp.abstract_batch(mesh, B, T)
            fwd = tp.make_forward(c, mesh, "shard_map")
            loss = tp.make_loss(c, mesh, "shard_map")
            per_layers[n_layer] = {
                "forward": tp.compiled_collectives(fwd, ap, ab, ab, ab),
                "loss": tp.compiled_collectives(loss, ap, ab, ab, ab, ab),
                "grad": tp.compiled_collectives(jax.jit(jax.grad(loss)), ap, ab, ab, ab, ab),
                "expected_forward": tp.expected_forward_collectives(c, mesh),
            }
        out["counts"]["x".join(map(str, shape))] = per_layers
    return out


@pytest.fixture(scope="module")
def results() -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=MESH_IDS)
def test_shard_map_equals_jit_and_one_device(results, shape):
    r = results["meshes"]["x".join(map(str, shape))]
    assert r["sm_vs_jit"] <= 1e-5 and r["sm_vs_ref"] <= 1e-5, r
    assert r["loss_sm_vs_jit"] <= 1e-5 and r["loss_sm_vs_ref"] <= 1e-5, r  # vocab-parallel cross-entropy
    assert r["grad_vs_ref"] <= 1e-5, r
    assert r["grad_sharded_like_params"]
    assert r["same_object"] and r["compiles"] == 1  # two calls, one trace


@pytest.mark.slow
def test_shard_map_bfloat16_tracks_jit(results):
    r = results["meshes"]["1x2x4"]
    assert r["bf16_sm_vs_jit"] <= 2e-2, r  # both bf16; reduction orders differ
    assert r["bf16_vs_f32"] <= 5e-2, r


@pytest.mark.slow
@pytest.mark.parametrize("shape", COUNT_MESHES, ids=["dp%d-fsdp%d-mp%d" % m for m in COUNT_MESHES])
def test_collectives_per_block(results, shape):
    counts = results["counts"]["x".join(map(str, shape))]
    dp, fsdp, mp = shape

    def per_block(kind):
        return {k: counts["3"][kind][k] - counts["2"][kind][k] for k in counts["2"][kind]}

    gathers = 7 if fsdp > 1 else 0
    zero = {"all-to-all": 0, "collective-permute": 0}
    # Forward: exactly one all-reduce (the psum over mp) per block, plus the fsdp all-gathers.
    assert per_block("forward") == {"all-reduce": 1, "all-gather": gathers, "reduce-scatter": 0, **zero}
    # Backward adds one all-reduce over mp per block (the gradient of the block input, which every
    # column-parallel matmul reads) and turns each all-gather into a reduce-scatter.
    assert per_block("grad") == {"all-reduce": 2, "all-gather": gathers, "reduce-scatter": gathers, **zero}
    # Whole forward: the embedding's psum + one per block, and the gathers for wte and lm_head too.
    for n_layer in (2, 3):
        assert counts[str(n_layer)]["forward"] == counts[str(n_layer)]["expected_forward"]
        assert counts[str(n_layer)]["forward"]["all-reduce"] == 1 + n_layer
        # The loss adds the vocab-parallel cross-entropy: one pmax and one psum over mp, plus one
        # psum over the batch axes (when they have more than one device); the logits are never gathered.
        extra = 2 + (1 if dp * fsdp > 1 else 0)
        assert counts[str(n_layer)]["loss"]["all-reduce"] == counts[str(n_layer)]["forward"]["all-reduce"] + extra
        assert counts[str(n_layer)]["loss"]["all-gather"] == counts[str(n_layer)]["forward"]["all-gather"]


def test_count_collectives_parses_hlo():
    from gptj_jax.tp import count_collectives

    hlo = """
  %all-reduce.1 = f32[2,8]{1,0} all-reduce(f32[2,8]{1,0} %x), channel_id=1, replica_groups={{0,1}}
  %ag = f32[4,8]{1,0} all-gather-start(f32[2,8]{1,0} %y), dimensions={0}
  %agd = f32[4,8]{1,0} all-gather-done(f32[4,8]{1,0} %ag)
  %rs = f32[1,8]{1,0} reduce-scatter(f32[2,8]{1,0} %z), dimensions={0}
  %fusion.all-reduce = f32[2]{0} fusion(f32[2]{0} %w), kind=kLoop
"""
    assert count_collectives(hlo) == {
        "all-reduce": 1, "all-gather": 1, "reduce-scatter": 1, "all-to-all": 0, "collective-permute": 0,
    }


def test_tp_rejects_rules_that_split_heads_and_vocab_differently():
    from jax.sharding import AbstractMesh

    from gptj_jax import sharding as sh
    from gptj_jax import tp

    mesh = AbstractMesh((1, 2, 4), ("dp", "fsdp", "mp"))
    rules = tuple((n, "fsdp" if n == "vocab" else t) for n, t in sh.DEFAULT_RULES)
    with pytest.raises(ValueError, match=r"heads, mlp and vocab split over the same mesh axes"):
        tp.layout_of(mesh, rules)
    with pytest.raises(ValueError, match=r"impl 'pjit' is not one of \('jit', 'shard_map'\)"):
        tp._check_impl("pjit")


if __name__ == "__main__":
    print(json.dumps(worker()))

"""The blockwise cross entropy (``losses.blockwise_cross_entropy``): the same loss and gradients as the full
``token_cross_entropy`` (<= 1e-5, float32) with z-loss, ``ignore_index`` and left-padded batches, on one
device and on the 8-device meshes (``jit`` / GSPMD and ``shard_map``), through the train step and the
training loop; and no ``[N, V]`` array in its compiled program.

The mesh checks run in one subprocess with 8 simulated CPU devices (this file as a script is the worker).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, padded_lm_batch

import gptj_jax
from gptj_jax import losses
from gptj_jax.train.step import StepConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4)]
MESH_IDS = ["dp%d-fsdp%d-mp%d" % m for m in MESHES]
CONFIG = dict(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=8, rotary_dim=4)
B, T = 8, 12
BLOCK = 12  # 256 = 21 * 12 + 4 on one device, 32 = 2 * 12 + 8 per mp=8 shard: full blocks and a remainder
Z = 1e-2


def _maxdiff(a, b) -> float:
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _random_head(seed: int = 0, lead=(3, 10), d: int = 16, v: int = 37):
    rng = np.random.RandomState(seed)
    h = jnp.asarray(rng.randn(*lead, d), jnp.float32)
    k = jnp.asarray(rng.randn(d, v) * 0.7, jnp.float32)
    b = jnp.asarray(rng.randn(v), jnp.float32)
    t = rng.randint(0, v, lead).astype(np.int32)
    t[0, :4] = -100  # left padding, ignored
    t[2, 7] = v - 1  # the last column (in the remainder block)
    return h, k, b, jnp.asarray(t)


# ---------------------------------------------------------------------------------------- one device
@pytest.mark.parametrize("block_size", [1, 5, 8, 37, 100])
@pytest.mark.parametrize("z_loss", [0.0, Z])
def test_blockwise_equals_token_cross_entropy(block_size, z_loss):
    h, k, b, t = _random_head()

    def full(h, k, b):
        out = losses.token_cross_entropy(h @ k + b, t, ignore_index=-100, z_loss=z_loss)
        return out.mean() + jnp.sum(out.z) / 30.0, out

    def blockwise(h, k, b):
        out = losses.blockwise_cross_entropy(h, k, b, t, block_size=block_size, ignore_index=-100, z_loss=z_loss)
        return out.mean() + jnp.sum(out.z) / 30.0, out

    (v0, ref), g0 = jax.value_and_grad(full, argnums=(0, 1, 2), has_aux=True)(h, k, b)
    (v1, got), g1 = jax.jit(jax.value_and_grad(blockwise, argnums=(0, 1, 2), has_aux=True))(h, k, b)
    assert np.array_equal(got.valid, ref.valid) and not bool(got.valid[0, :4].any())
    assert np.abs(np.asarray(got.ce) - np.asarray(ref.ce)).max() <= 1e-5
    assert np.abs(np.asarray(got.z) - np.asarray(ref.z)).max() <= 1e-5
    assert float(np.asarray(got.ce)[0, :4].max()) == 0.0 and float(np.asarray(got.z)[0, :4].max()) == 0.0
    if z_loss:
        assert float(np.asarray(got.z).max()) > 1e-3  # the z term is really there
    assert abs(float(v1) - float(v0)) <= 1e-5
    assert _maxdiff(g1, g0) <= 1e-5, [float(np.abs(x - y).max()) for x, y in zip(g1, g0)]


def test_blockwise_without_bias_and_with_bfloat16_inputs():
    h, k, _, t = _random_head(seed=1)
    ref = losses.token_cross_entropy(h.astype(jnp.bfloat16).astype(jnp.float32) @ k, t, ignore_index=-100)
    got = losses.blockwise_cross_entropy(h.astype(jnp.bfloat16), k, None, t, block_size=16, ignore_index=-100)
    assert got.ce.dtype == jnp.float32
    assert np.abs(np.asarray(got.ce) - np.asarray(ref.ce)).max() <= 1e-5


def test_blockwise_never_holds_the_vocabulary_logits():
    """The compiled value-and-grad has no ``[N, V]`` (or ``[N, 1, V]``) array, and its temporaries stay far
    below one ``[N, V]`` float32 array."""
    n, d, v, block = 512, 32, 4096, 256
    rng = np.random.RandomState(0)
    h = jnp.asarray(rng.randn(n, d), jnp.float32)
    k = jnp.asarray(rng.randn(d, v) * 0.1, jnp.float32)
    b = jnp.zeros((v,), jnp.float32)
    t = jnp.asarray(rng.randint(0, v, (n,)), jnp.int32)

    def blockwise(h, k, b):
        return losses.blockwise_cross_entropy(h, k, b, t, block_size=block, z_loss=1e-4).mean()

    def full(h, k, b):
        return losses.token_cross_entropy(h @ k + b, t, z_loss=1e-4).mean()

    shapes = re.compile(rf"f32\[{n},(1,)?{v}\]")
    compiled = {}
    for name, fn in (("blockwise", blockwise), ("full", full)):
        compiled[name] = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2))).lower(h, k, b).compile()
    assert shapes.search(compiled["full"].as_text())  # the pattern finds the full loss's logits
    assert not shapes.search(compiled["blockwise"].as_text())
    temp = {name: c.memory_analysis().temp_size_in_bytes for name, c in compiled.items()}
    assert temp["blockwise"] < n * v * 4 // 4 < temp["full"], temp


_TPU_LOSS_MEMORY = """
import json, sys
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding
from gptj_jax import losses
topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:1x1", chips_per_host_bounds=(1, 1, 1))
s = SingleDeviceSharding(topo.devices[0])
args = (jax.ShapeDtypeStruct((2, 2048, 4096), jnp.bfloat16, sharding=s), jax.ShapeDtypeStruct((4096, 50400), jnp.float32, sharding=s),
        jax.ShapeDtypeStruct((50400,), jnp.float32, sharding=s), jax.ShapeDtypeStruct((2, 2048), jnp.int32, sharding=s))
def blockwise(h, k, b, t):
    return losses.blockwise_cross_entropy(h, k, b, t, block_size=8192).mean()
def full(h, k, b, t):
    return losses.token_cross_entropy(jnp.einsum("btd,dv->btv", h.astype(jnp.float32), k) + b, t).mean()
out = {}
for name, fn in (("blockwise", blockwise), ("full", full)):
    c = jax.jit(jax.grad(fn, argnums=(0, 1, 2))).lower(*args).compile()
    out[name] = c.memory_analysis().temp_size_in_bytes
print(json.dumps(out))
"""


@pytest.mark.slow
def test_blockwise_gradient_compiled_for_tpu_v5e_holds_no_second_kernel():
    """GPT-J-6B's head (h [2, 2048, 4096] bf16, float32 kernel [4096, 50400]) compiled for a TPU v5e chip (libtpu,
    deviceless): the blockwise loss's value-and-grad needs fewer temporaries than one float32 [4096, 50400] array
    (0.77 GiB) and than the full logits' program. XLA:TPU stores that kernel column-major; a kernel-gradient carry in
    another layout was copied once more after the block loop (1.23 GiB of temporaries)."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", _TPU_LOSS_MEMORY], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    temp = json.loads(proc.stdout.strip().splitlines()[-1])
    kernel = 4096 * 50400 * 4
    assert temp["blockwise"] < 0.8 * kernel and temp["blockwise"] < temp["full"], temp


def test_blockwise_rejects_bad_arguments():
    h, k, b, t = _random_head()
    with pytest.raises(ValueError, match="block_size must be > 0, got 0"):
        losses.blockwise_cross_entropy(h, k, b, t, block_size=0)
    with pytest.raises(ValueError, match=r"hidden states \[\.\.\., 16\] do not match the kernel \[8, 37\]"):
        losses.blockwise_cross_entropy(h, k[:8], b, t, block_size=4)
    with pytest.raises(ValueError, match="vocab_shards=2 does not divide the kernel's 37 vocabulary columns"):
        losses.blockwise_cross_entropy(h, k, b, t, block_size=4, vocab_shards=2)
    with pytest.raises(ValueError, match="loss_block_size must be >= 0"):
        StepConfig(TINY, loss_block_size=-1)


def test_train_step_loss_blockwise_equals_full_with_dropout_and_z_loss():
    """The train step's loss (gspmd, one device): blockwise == full logits in value and gradient, with z-loss and
    dropout on (the trunk draws the same dropout masks as the causal LM)."""
    from gptj_jax import sharding as sh
    from gptj_jax.model import init_params
    from gptj_jax.train import step as step_lib

    cfg = TINY.replace(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, cfg.vocab_size, (4, 17)), jnp.int32)
    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    out = {}
    for block in (0, 16):
        scfg = step_lib.StepConfig(cfg, z_loss=Z, loss_block_size=block)
        fn = jax.jit(jax.value_and_grad(step_lib.make_loss_fn(scfg, mesh), has_aux=True))
        out[block] = fn(params, tokens, jax.random.PRNGKey(7))
    (l0, a0), g0 = out[0]
    (l1, a1), g1 = out[16]
    assert float(a0["z"]) > 1e-3
    for key in ("ce", "z"):
        assert abs(float(a1[key]) - float(a0[key])) <= 1e-5, (key, a0, a1)
    assert abs(float(l1) - float(l0)) <= 1e-5
    assert _maxdiff(g1, g0) <= 1e-5
    # another dropout key gives another loss: dropout is really on in both
    l2, _ = jax.jit(step_lib.make_loss_fn(step_lib.StepConfig(cfg, z_loss=Z), mesh))(params, tokens, jax.random.PRNGKey(8))
    assert abs(float(l2) - float(l0)) > 1e-4


def test_tp_make_loss_blockwise_on_one_device_with_left_padding():
    cfg = gptj_jax.GPTJConfig(**CONFIG)
    params = gptj_jax.init_params(cfg, jax.random.PRNGKey(0))
    ids, mask, labels = padded_lm_batch(cfg.vocab_size, B, T, seed=5)
    from gptj_jax import sharding as sh
    from gptj_jax import tp

    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    ref_l, ref_g = jax.value_and_grad(tp.make_loss(cfg, mesh))(params, ids, labels, mask)
    got_l, got_g = jax.value_and_grad(tp.make_loss(cfg, mesh, block_size=BLOCK))(params, ids, labels, mask)
    assert abs(float(got_l) - float(ref_l)) <= 1e-5
    assert _maxdiff(got_g, ref_g) <= 1e-5
    with pytest.raises(ValueError, match="block_size must be >= 0"):
        tp.make_loss(cfg, mesh, block_size=-2)


def test_training_loop_with_loss_block_size_matches_full_logits(tmp_path):
    """``loss_block_size`` in the train config: 3 steps give the same losses and parameters (<= 1e-5) as the full
    logits; a negative value is a config error naming the key."""
    from gptj_jax.train.config import TrainConfigError, load_train_config
    from gptj_jax.train.data import write_records
    from gptj_jax.train.loop import train

    rows = (np.random.RandomState(0).randint(0, 128, (48, 1)) + np.arange(17)[None, :]) % 128
    data = str(tmp_path / "data")
    write_records(data, rows, num_bytes=48 * 17 * 3)
    base = ["layers=2", "d_model=32", "n_heads=4", "n_vocab=128", "pe_rotary_dims=4", "n_positions=64", "seq=16",
            "dtype=float32", "progress=false", "peak_flops=1e11", f"train_set={data}", "total_steps=3",
            "per_replica_batch=4", "lr=1e-3", "z_loss=1e-4", "gradient_accumulation_steps=2", "val_set={}"]
    runs = {}
    for block in (0, 24):
        cfg = load_train_config(None, base + [f"model_dir={tmp_path / f'run{block}'}", f"loss_block_size={block}"])
        assert cfg.loss_block_size == block
        summary = train(cfg)
        with open(os.path.join(cfg.model_dir, "metrics.jsonl"), encoding="utf-8") as f:
            losses_ = [r["loss"] for r in map(json.loads, f) if "loss" in r]
        runs[block] = (losses_, jax.device_get(summary["final_params"]))
    assert len(runs[0][0]) == 3 and np.allclose(runs[24][0], runs[0][0], rtol=0, atol=1e-5), (runs[0][0], runs[24][0])
    assert _maxdiff(runs[24][1], runs[0][1]) <= 1e-5
    with pytest.raises(TrainConfigError, match="loss_block_size"):
        load_train_config(None, base + [f"model_dir={tmp_path / 'bad'}", "loss_block_size=-1"])


# ---------------------------------------------------------------------------------------- 8 devices
def worker() -> dict:
    jax.config.update("jax_num_cpu_devices", 8)
    from gptj_jax import sharding as sh
    from gptj_jax import tp
    from gptj_jax.config import GPTJConfig
    from gptj_jax.model import init_params
    from gptj_jax.train import step as step_lib

    cfg = GPTJConfig(**CONFIG)
    params = jax.device_get(init_params(cfg, jax.random.PRNGKey(0)))
    ids, mask, labels = padded_lm_batch(cfg.vocab_size, B, T, seed=5)
    tokens = np.random.RandomState(9).randint(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    one = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    ref_l, ref_g = jax.device_get(jax.value_and_grad(tp.make_loss(cfg, one))(params, ids, labels, mask))
    ref_step = {}
    for forward in ("gspmd", "shard_map"):
        scfg = step_lib.StepConfig(cfg, z_loss=Z, forward=forward)
        fn = jax.value_and_grad(step_lib.make_loss_fn(scfg, one), has_aux=True)
        ref_step[forward] = jax.device_get(jax.jit(fn)(params, tokens, jax.random.PRNGKey(0)))

    out: dict = {}
    for shape in MESHES:
        mesh = sh.make_mesh(*shape)
        p = sh.shard_params(params, mesh, cfg)
        x, m, y = sh.shard_batch(mesh, ids, mask, labels)
        r: dict = {}
        for impl in tp.IMPLS:
            loss_fn = tp.make_loss(cfg, mesh, impl, block_size=BLOCK)
            l, g = jax.value_and_grad(loss_fn)(p, x, y, m)
            r[f"tp_{impl}_loss"] = abs(float(l) - float(ref_l))
            r[f"tp_{impl}_grad"] = _maxdiff(jax.device_get(g), ref_g)
            # shard_map: every gradient comes back sharded like its param; jit (GSPMD) leaves some LayerNorm
            # gradients replicated with the full logits too, so there only the lm_head (the blockwise loss's) counts
            where = p if impl == "shard_map" else p["lm_head"]
            r[f"tp_{impl}_grad_sharded_like_params"] = all(
                a.sharding.is_equivalent_to(s.sharding, a.ndim)
                for a, s in zip(jax.tree.leaves(g if impl == "shard_map" else g["lm_head"]), jax.tree.leaves(where))
            )
        (tk,) = sh.shard_batch(mesh, tokens)
        for forward in ("gspmd", "shard_map"):
            scfg = step_lib.StepConfig(cfg, z_loss=Z, forward=forward, loss_block_size=BLOCK)
            fn = jax.jit(jax.value_and_grad(step_lib.make_loss_fn(scfg, mesh), has_aux=True))
            (l, aux), g = jax.device_get(fn(p, tk, jax.random.PRNGKey(0)))
            (l0, aux0), g0 = ref_step[forward]
            r[f"step_{forward}_loss"] = max(abs(float(aux[k]) - float(aux0[k])) for k in ("ce", "z"))
            r[f"step_{forward}_z"] = float(aux["z"])
            r[f"step_{forward}_grad"] = _maxdiff(g, g0)
        out["x".join(map(str, shape))] = r
    return out


@pytest.fixture(scope="module")
def mesh_results() -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=MESH_IDS)
@pytest.mark.parametrize("impl", ["jit", "shard_map"])
def test_blockwise_on_mesh_equals_one_device_full_loss(mesh_results, shape, impl):
    """``tp.make_loss(block_size=12)`` on the mesh (left-padded rows, -100 labels) == one device's full loss."""
    r = mesh_results["x".join(map(str, shape))]
    assert r[f"tp_{impl}_loss"] <= 1e-5, r
    assert r[f"tp_{impl}_grad"] <= 1e-5, r
    assert r[f"tp_{impl}_grad_sharded_like_params"], r


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=MESH_IDS)
@pytest.mark.parametrize("forward", ["gspmd", "shard_map"])
def test_train_step_blockwise_on_mesh_equals_one_device_full_loss(mesh_results, shape, forward):
    """The train step's loss with ``loss_block_size=12`` and z-loss on the mesh == one device's full logits."""
    r = mesh_results["x".join(map(str, shape))]
    assert r[f"step_{forward}_z"] > 1e-3, r
    assert r[f"step_{forward}_loss"] <= 1e-5, r
    assert r[f"step_{forward}_grad"] <= 1e-5, r


if __name__ == "__main__":
    print(json.dumps(worker()))

"""Sharding on a mesh: rules, shard shapes, equality with one device, sharded loading, bad input.

The mesh tests need 8 devices, so they run in one subprocess with 8 simulated CPU devices
(``jax_num_cpu_devices``; this file run as a script is that worker) that checks all five meshes
(dp, fsdp, mp) in (8,1,1), (1,8,1), (1,1,8), (2,2,2), (1,2,4) and reports JSON; the pytest process
keeps its single device. Rules, specs and errors are checked in-process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4)]
MESH_IDS = ["dp%d-fsdp%d-mp%d" % m for m in MESHES]
# n_head and vocab divisible by 8 so that mp=8 splits them.
CONFIG = dict(vocab_size=256, n_positions=64, n_embd=128, n_layer=2, n_head=8, rotary_dim=4)
B, T = 8, 12


def _run_worker(args: list[str], timeout: int = 600, **extra_env: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **extra_env)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"worker {args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _batch():
    rng = np.random.RandomState(1)
    ids = rng.randint(0, CONFIG["vocab_size"], (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    for row, pad in enumerate([0, 2, 0, 4, 1, 0, 6, 3]):
        mask[row, :pad] = 0
    return ids, mask


# ============================================================================ the 8-device worker
def mesh_worker() -> dict:
    """Everything that needs 8 devices, for all meshes, as JSON-able numbers."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_num_cpu_devices", 8)
    import optax

    from gptj_jax import sharding as sh
    from gptj_jax.config import GPTJConfig
    from gptj_jax.generation import generate
    from gptj_jax.model import init_params, model_for
    from gptj_jax.train import step as train_step

    cfg = GPTJConfig(**CONFIG)
    module = model_for(cfg)
    params = init_params(cfg, jax.random.PRNGKey(0))
    host_params = jax.device_get(params)
    ids, mask = _batch()
    ref_logits = np.asarray(module.apply({"params": params}, ids, attention_mask=mask).logits)

    def greedy(p, mesh):
        """``generate`` (greedy, with logprobs) of the left-padded batch, on ``mesh`` or one device."""
        out = generate(cfg, p, ids, mask, max_new_tokens=4, eos_token_id=[], return_logprobs=True, mesh=mesh)
        return np.asarray(out.sequences), np.asarray(out.logprobs)

    ref_toks, ref_logprobs = greedy(host_params, None)

    # One training step (train/step.py) on one device, then on each mesh.
    tokens = np.random.RandomState(2).randint(0, cfg.vocab_size, (1, B, T + 1)).astype(np.int32)
    # Plain SGD: the update is lr x gradient, so equal params mean equal gradients. (Adam's first
    # step is lr x g / (|g| + eps), which turns float rounding of near-zero gradients into
    # differences of a few percent of lr: a property of Adam, not of the sharding.)
    schedule = optax.constant_schedule(0.1)
    optimizer = optax.sgd(0.1)

    def train_once(mesh, forward="gspmd"):
        scfg = train_step.StepConfig(model=cfg, forward=forward)
        shardings = train_step.state_shardings(scfg, mesh, optimizer, jnp.float32)
        p = sh.shard_params(host_params, mesh, cfg)
        state = train_step.init_state(p, optimizer, 0, shardings)
        step = train_step.make_train_step(scfg, mesh, optimizer, schedule, shardings)
        state, metrics = step(state, tokens)
        return jax.device_get(state["params"]), float(metrics["loss"])

    one = sh.make_mesh(devices=jax.devices()[:1])
    ref_trained, ref_train_loss = train_once(one)

    out: dict = {"meshes": {}}
    import time

    for shape in MESHES:
        mesh = sh.make_mesh(*shape)
        r: dict = {}
        t0 = time.perf_counter()
        p = sh.shard_params(host_params, mesh, cfg)
        from gptj_jax import tp

        logits = tp.forward(p, ids, mask, config=cfg, mesh=mesh, impl="jit")
        r["logits_err"] = float(np.abs(np.asarray(logits) - ref_logits).max())
        r["logits_placed"] = logits.sharding.is_equivalent_to(sh.logits_sharding(mesh), 3)
        flat = jax.tree_util.tree_flatten_with_path(p)[0]
        r["shard_shapes"] = {jax.tree_util.keystr(k): list(v.sharding.shard_shape(v.shape)) for k, v in flat}
        r["device0_bytes"] = sh.device_bytes(p, jax.devices()[0])
        r["total_bytes"] = sh.tree_bytes(p)
        r["device_bytes_all"] = [sh.device_bytes(p, d) for d in jax.devices()]
        made = sh.init_sharded_params(cfg, mesh, jax.random.PRNGKey(0))
        r["init_equal"] = all(
            np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(made)), jax.tree.leaves(host_params))
        )
        r["init_sharded_like_rules"] = all(
            x.sharding.is_equivalent_to(s, x.ndim)
            for x, s in zip(jax.tree.leaves(made), jax.tree.leaves(sh.param_shardings(cfg, mesh)))
        )
        t1 = time.perf_counter()
        toks, logprobs = greedy(host_params, mesh)
        t2 = time.perf_counter()
        r["greedy_equal"] = bool(np.array_equal(toks, ref_toks))
        r["greedy_logprob_err"] = float(np.abs(logprobs - ref_logprobs).max())
        cache = sh.init_sharded_cache(cfg, mesh, B, T)
        r["cache_placed"] = all(
            a.sharding.is_equivalent_to(s, a.ndim)
            for a, s in zip(jax.tree.leaves(cache), jax.tree.leaves(sh.cache_shardings(cfg, mesh, cache)))
        )
        k = cache["layers"][0]["k"]
        r["kv_shard"] = list(k.sharding.shard_shape(k.shape))
        trained, loss = train_once(mesh)
        r["train_param_err"] = max(
            float(np.abs(np.asarray(a) - np.asarray(b)).max())
            for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(ref_trained))
        )
        r["train_loss_err"] = abs(loss - ref_train_loss)
        r["seconds"] = [t1 - t0, t2 - t1, time.perf_counter() - t2]
        r["train_moved"] = max(
            float(np.abs(np.asarray(a) - np.asarray(b)).max())
            for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(host_params))
        )
        out["meshes"]["x".join(map(str, shape))] = r
    return out


@pytest.fixture(scope="module")
def mesh_results() -> dict:
    return _run_worker(["mesh"])["meshes"]


def _result(mesh_results, shape):
    return mesh_results["x".join(map(str, shape))]


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=MESH_IDS)
def test_forward_equals_single_device(mesh_results, shape):
    r = _result(mesh_results, shape)
    assert r["logits_err"] <= 1e-5, r["logits_err"]
    assert r["logits_placed"]


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=MESH_IDS)
def test_greedy_generation_equal_and_cache_sharded(mesh_results, shape):
    r = _result(mesh_results, shape)
    assert r["greedy_equal"]  # generate(..., mesh=mesh) tokens == one device
    assert r["greedy_logprob_err"] <= 1e-5
    dp, fsdp, mp = shape
    assert r["cache_placed"]
    head_dim = CONFIG["n_embd"] // CONFIG["n_head"]
    # [B, N, S, H] (cache.py's one layout): rows on dp x fsdp, heads on mp
    assert r["kv_shard"] == [B // (dp * fsdp), CONFIG["n_head"] // mp, T, head_dim]


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=MESH_IDS)
def test_one_train_step_gives_equal_params(mesh_results, shape):
    r = _result(mesh_results, shape)
    assert r["train_moved"] > 1e-3  # the step did change the params
    assert r["train_param_err"] <= 1e-6, r["train_param_err"]
    assert r["train_loss_err"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=MESH_IDS)
def test_shard_shapes_follow_rules(mesh_results, shape):
    import jax

    from gptj_jax import sharding as sh
    from gptj_jax.config import GPTJConfig

    r = _result(mesh_results, shape)
    cfg = GPTJConfig(**CONFIG)
    dp, fsdp, mp = shape
    sizes = {"dp": dp, "fsdp": fsdp, "mp": mp}
    d, f, v = cfg.n_embd, cfg.inner_dim, cfg.vocab_size
    got = r["shard_shapes"]
    # The headline examples, spelled out.
    assert got["['transformer']['h_0']['attn']['q_proj']['kernel']"] == [d // fsdp, d // mp]
    assert got["['transformer']['h_0']['attn']['out_proj']['kernel']"] == [d // mp, d // fsdp]
    assert got["['transformer']['h_1']['mlp']['fc_in']['kernel']"] == [d // fsdp, f // mp]
    assert got["['transformer']['h_1']['mlp']['fc_out']['kernel']"] == [f // mp, d // fsdp]
    assert got["['transformer']['wte']['embedding']"] == [v // mp, d // fsdp]
    assert got["['lm_head']['kernel']"] == [d // fsdp, v // mp]
    assert got["['lm_head']['bias']"] == [v // mp]
    assert got["['transformer']['ln_f']['scale']"] == [d]
    # Every leaf: global shape divided by the mesh axes its spec names.
    specs = jax.tree_util.tree_flatten_with_path(sh.param_specs(cfg), is_leaf=lambda x: isinstance(x, sh.P))[0]
    shapes = dict(jax.tree_util.tree_flatten_with_path(_param_shapes(cfg))[0])
    for path, spec in specs:
        shape_ = shapes[path].shape
        want = [n // math.prod(sizes[a] for a in sh.as_axes(t)) for n, t in zip(shape_, tuple(spec) + (None,) * len(shape_))]
        assert got[jax.tree_util.keystr(path)] == want, jax.tree_util.keystr(path)


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=MESH_IDS)
def test_device_bytes_about_one_over_fsdp_mp(mesh_results, shape):
    r = _result(mesh_results, shape)
    dp, fsdp, mp = shape
    share = r["device0_bytes"] / r["total_bytes"]
    # Exactly 1/(fsdp*mp) for the split matrices; LayerNorms (replicated) add a little.
    assert 1 / (fsdp * mp) <= share <= 1.05 / (fsdp * mp), share
    assert len(set(r["device_bytes_all"])) == 1  # every device holds the same amount


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=MESH_IDS)
def test_init_sharded_params_equals_init_params(mesh_results, shape):
    r = _result(mesh_results, shape)
    assert r["init_equal"] and r["init_sharded_like_rules"]


def _param_shapes(cfg):
    import jax

    from gptj_jax.model import init_params

    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


# ============================================================================ in-process: rules and errors
def test_default_rules_mirror_mesh_transformer_jax():
    from gptj_jax import sharding as sh
    from gptj_jax.config import GPTJConfig

    specs = sh.param_specs(GPTJConfig(**CONFIG))
    layer = specs["transformer"]["h_0"]
    P = sh.P
    for name in ("q_proj", "k_proj", "v_proj"):  # column-parallel
        assert layer["attn"][name]["kernel"] == P("fsdp", "mp")
    assert layer["attn"]["out_proj"]["kernel"] == P("mp", "fsdp")  # row-parallel
    assert layer["mlp"]["fc_in"]["kernel"] == P("fsdp", "mp")
    assert layer["mlp"]["fc_in"]["bias"] == P("mp")
    assert layer["mlp"]["fc_out"]["kernel"] == P("mp", "fsdp")
    assert layer["ln_1"]["scale"] == P(None) and layer["ln_1"]["bias"] == P(None)
    assert specs["transformer"]["wte"]["embedding"] == P("mp", "fsdp")  # vocab on mp
    assert specs["lm_head"]["kernel"] == P("fsdp", "mp")
    assert sh.logical_to_mesh(sh.BATCH_AXES) == P(("dp", "fsdp"), None)


def test_rules_are_ordered_and_a_mesh_axis_is_used_once_per_array():
    from gptj_jax import sharding as sh

    rules = (("embed", "fsdp"), ("embed", "mp"), ("heads", "mp"))
    assert sh.logical_to_mesh(("embed", "embed"), rules) == sh.P("fsdp", "mp")
    assert sh.logical_to_mesh(("embed", "heads"), rules) == sh.P("fsdp", "mp")
    # heads wants mp, but mp is taken by the first dim: replicated.
    assert sh.logical_to_mesh(("heads", "heads"), rules) == sh.P("mp", None)
    # Changing the parallelism is editing the table: pure FSDP over the embed side.
    fsdp_only = (("batch", ("dp", "fsdp")), ("vocab", None), ("heads", None), ("mlp", None), ("embed", "fsdp"),
                 ("norm", None), ("classes", None))
    assert sh.logical_to_mesh(("embed", "heads"), fsdp_only) == sh.P("fsdp", None)


def test_unknown_names_are_errors():
    from gptj_jax import sharding as sh

    with pytest.raises(ValueError, match=r"unknown mesh axis 'tp' in 'dp=1,tp=8'; the axes are dp, fsdp, mp"):
        sh.parse_mesh("dp=1,tp=8")
    with pytest.raises(ValueError, match=r"rule \('heads', 'model'\) names unknown mesh axis 'model'"):
        sh.logical_to_mesh(("heads",), (("heads", "model"),))
    with pytest.raises(ValueError, match=r"logical axis 'kv' has no rule"):
        sh.logical_to_mesh(("kv",))
    with pytest.raises(ValueError, match=r"not NAME=SIZE"):
        sh.parse_mesh("dp:2")
    assert sh.parse_mesh("mp=8") == {"dp": 1, "fsdp": 1, "mp": 8}


def test_mesh_size_must_match_device_count():
    import jax

    from gptj_jax import sharding as sh

    devices = jax.devices()[:1]
    with pytest.raises(ValueError, match=r"mesh dp=1 x fsdp=2 x mp=4 = 8 devices, but 1 devices are available"):
        sh.make_mesh(1, 2, 4, devices=devices)
    assert sh.resolve_mesh_shape(2, -1, 2, n_devices=8) == (2, 2, 2)
    with pytest.raises(ValueError, match=r"cannot fill mp=-1: the other axes multiply to 3, which does not divide the 8 devices"):
        sh.resolve_mesh_shape(3, 1, -1, n_devices=8)
    with pytest.raises(ValueError, match=r"only one mesh axis may be -1"):
        sh.resolve_mesh_shape(-1, 1, -1, n_devices=8)
    mesh = sh.make_mesh(devices=devices)
    assert sh.mesh_shape(mesh) == {"dp": 1, "fsdp": 1, "mp": 1}


def _abstract_mesh(dp, fsdp, mp):
    from jax.sharding import AbstractMesh

    return AbstractMesh((dp, fsdp, mp), ("dp", "fsdp", "mp"))


def test_mp_must_divide_heads_vocab_and_mlp():
    from gptj_jax import sharding as sh
    from gptj_jax.config import GPTJConfig

    cfg = GPTJConfig(vocab_size=256, n_positions=64, n_embd=64, n_layer=1, n_head=4, rotary_dim=4)
    with pytest.raises(ValueError, match=r"mesh axis mp=8 does not divide n_head=4 .*sizes up to 8 that divide it: \[1, 2, 4\]"):
        sh.param_shardings(cfg, _abstract_mesh(1, 1, 8))
    cfg = GPTJConfig(vocab_size=50257, n_positions=64, n_embd=64, n_layer=1, n_head=8, rotary_dim=4)
    with pytest.raises(ValueError, match=r"mesh axis mp=8 does not divide vocab_size=50257"):
        sh.param_shardings(cfg, _abstract_mesh(1, 1, 8))
    cfg = GPTJConfig(vocab_size=256, n_positions=64, n_embd=64, n_layer=1, n_head=8, rotary_dim=4, n_inner=100)
    with pytest.raises(ValueError, match=r"mesh axis mp=8 does not divide n_inner=100"):
        sh.param_shardings(cfg, _abstract_mesh(1, 1, 8))
    cfg = GPTJConfig(vocab_size=256, n_positions=64, n_embd=36, n_layer=1, n_head=4, rotary_dim=4)
    with pytest.raises(ValueError, match=r"mesh axis fsdp=8 does not divide n_embd=36"):
        sh.param_shardings(cfg, _abstract_mesh(1, 8, 1))


def test_batch_must_split_over_batch_axes():
    from gptj_jax import sharding as sh

    with pytest.raises(ValueError, match=r"batch size 6 does not split over the batch axes dp=2 x fsdp=2 = 4"):
        sh.check_batch(_abstract_mesh(2, 2, 2), 6)
    sh.check_batch(_abstract_mesh(2, 2, 2), 8)


def test_shard_params_names_missing_leaves_and_infers_head():
    import jax

    from gptj_jax import sharding as sh
    from gptj_jax.config import GPTJConfig
    from gptj_jax.model import head_of, init_params

    cfg = GPTJConfig(**dict(CONFIG, n_layer=1))
    params = jax.device_get(init_params(cfg, jax.random.PRNGKey(0)))
    mesh = sh.make_mesh(devices=jax.devices()[:1])
    placed = sh.shard_params(params, mesh, cfg)  # head inferred from the keys: causal_lm
    assert placed["lm_head"]["kernel"].sharding.spec == sh.P("fsdp", "mp")
    del params["transformer"]["h_0"]["mlp"]
    with pytest.raises(ValueError, match=r"params \(head 'causal_lm'\) do not match .*missing \[\"\['transformer'\]\['h_0'\]\['mlp'\]"):
        sh.shard_params(params, mesh, cfg)
    with pytest.raises(ValueError, match=r"cannot tell the head of params with top-level keys \['foo'\]"):
        head_of({"foo": 1})


def test_optimizer_state_shardings_mirror_params():
    import jax
    import optax

    from gptj_jax import sharding as sh
    from gptj_jax.config import GPTJConfig

    cfg = GPTJConfig(**CONFIG)
    mesh = sh.make_mesh(devices=jax.devices()[:1])
    params = _param_shapes(cfg)
    shardings = sh.param_shardings(cfg, mesh)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state_sh = sh.opt_state_shardings(opt, params, shardings)
    adam = state_sh[1][0]
    for moment in (adam.mu, adam.nu):
        assert moment["transformer"]["h_0"]["attn"]["q_proj"]["kernel"].spec == sh.P("fsdp", "mp")
        assert moment["lm_head"]["bias"].spec == sh.P("mp")
    assert adam.count.spec == sh.P()


# ============================================================================ sharded HF loading
LOAD_CONFIG = dict(vocab_size=65536, n_positions=64, n_embd=512, n_layer=2, n_head=8, rotary_dim=4)


def _write_big_checkpoint(directory: str) -> None:
    """An HF safetensors dir of random float32 weights, written one tensor at a time (~300 MB)."""
    from gptj_jax.config import GPTJConfig
    from gptj_jax.convert import table
    from gptj_jax.convert.hf import write_config_files
    from gptj_jax.convert.io import SafetensorsWriter

    cfg = GPTJConfig(**LOAD_CONFIG)
    shapes = table.expected_shapes(cfg, "causal_lm")
    writer = SafetensorsWriter(directory, [(n, s, np.float32) for n, s in shapes.items()], "1GB")
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        writer.write(name, rng.standard_normal(shape, dtype=np.float32) * 0.02)
    writer.close()
    write_config_files(directory, cfg, "causal_lm", np.float32)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def load_worker(directory: str, how: str) -> dict:
    """Load ``directory`` onto a (1,1,8) mesh ``how`` = sharded | whole; report peak RSS numbers."""
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    from gptj_jax import load
    from gptj_jax import sharding as sh
    from gptj_jax.config import GPTJConfig
    from gptj_jax.convert import from_pretrained

    mesh = sh.make_mesh(1, 1, 8)
    jax.block_until_ready(jax.device_put(np.zeros(8, np.float32), sh.NamedSharding(mesh, sh.P("mp"))))
    sh.param_shardings(GPTJConfig.from_pretrained(directory), mesh)  # warm up tracing before measuring
    # and the modules the loaders import on first use: their code is not the transient tensor overhead measured
    import gptj_jax.convert.hf  # noqa: F401
    import gptj_jax.convert.io  # noqa: F401
    import gptj_jax.convert.pipeline  # noqa: F401
    import gptj_jax.quantize  # noqa: F401

    before = _rss("VmRSS")
    stats: dict = {}
    if how == "sharded":
        cfg, params = load(directory, mesh=mesh, stats=stats)
    else:  # the baseline: whole tensors through the host, then split
        cfg, whole = from_pretrained(directory)
        params = sh.shard_params(whole, mesh, cfg)
        del whole
    jax.block_until_ready(params)
    peak = _rss("VmHWM")
    q = params["transformer"]["h_1"]["attn"]["q_proj"]["kernel"]
    return dict(
        before=before, peak=peak, param_bytes=sh.tree_bytes(params), stats=stats,
        q_shard=list(q.sharding.shard_shape(q.shape)), device0=sh.device_bytes(params, jax.devices()[0]),
    )


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("bigckpt"))
    _write_big_checkpoint(directory)
    return directory


@pytest.mark.slow
def test_sharded_hf_load_never_holds_a_whole_weight(big_checkpoint):
    # A fixed malloc mmap threshold makes freed blocks go back to the OS at once, so RSS shows what
    # is held rather than what glibc's heap kept (its dynamic threshold would keep 16 MiB blocks).
    env = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    sharded = _run_worker(["load", big_checkpoint, "sharded"], **env)
    whole = _run_worker(["load", big_checkpoint, "whole"], **env)
    largest = LOAD_CONFIG["vocab_size"] * LOAD_CONFIG["n_embd"] * 4  # wte / lm_head: 128 MiB
    assert sharded["stats"]["largest_tensor_bytes"] == largest
    assert sharded["stats"]["max_read_bytes"] == largest // 8  # one device's slice at a time
    assert sharded["q_shard"] == [512, 64]
    # On CPU the 8 "devices" live in host RAM too, so the loaded params themselves count in RSS:
    # compare the peak with what must be resident (before + params), i.e. the transient overhead.
    over_sharded = sharded["peak"] - sharded["before"] - sharded["param_bytes"]
    over_whole = whole["peak"] - whole["before"] - whole["param_bytes"]
    msg = f"sharded overhead {over_sharded / 2**20:.0f} MiB, whole-tensor overhead {over_whole / 2**20:.0f} MiB, largest weight {largest / 2**20:.0f} MiB"
    assert over_whole >= 0.9 * largest, msg  # the measurement can tell: the naive path holds whole weights
    assert over_sharded < 0.5 * largest, msg  # one 16 MiB slice (+ its file pages) at a time


@pytest.mark.slow
def test_sharded_hf_load_equals_params(tmp_path):
    out = _run_worker(["hfload", str(tmp_path)])
    for shape, ok in out.items():
        assert ok == [True, True, True, True], shape


def hfload_worker(directory: str) -> dict:
    """Save a tiny model as HF and orbax, load both sharded on three meshes: values and shardings."""
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    from gptj_jax import load
    from gptj_jax import sharding as sh
    from gptj_jax.config import GPTJConfig
    from gptj_jax.convert import save_flax, save_pretrained
    from gptj_jax.model import init_params

    cfg = GPTJConfig(**CONFIG)
    params = jax.device_get(init_params(cfg, jax.random.PRNGKey(0)))
    save_pretrained(os.path.join(directory, "hf"), cfg, params)
    save_flax(os.path.join(directory, "flax"), cfg, params)
    out = {}
    for shape in [(1, 1, 8), (2, 2, 2), (1, 2, 4)]:
        mesh = sh.make_mesh(*shape)
        want = sh.param_shardings(cfg, mesh)
        checks = []
        for sub in ("hf", "flax"):
            _, p = load(os.path.join(directory, sub), mesh=mesh)
            checks.append(all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(p)), jax.tree.leaves(params))))
            checks.append(all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(jax.tree.leaves(p), jax.tree.leaves(want))))
        out["x".join(map(str, shape))] = checks
    return out


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "mesh":
        result = mesh_worker()
    elif mode == "load":
        result = load_worker(sys.argv[2], sys.argv[3])
    elif mode == "hfload":
        result = hfload_worker(sys.argv[2])
    else:
        sys.exit("usage: python tests/test_sharding.py mesh | load DIR sharded|whole | hfload DIR")
    print(json.dumps(result))

"""Multi-host: 2 processes x 4 CPU devices on 127.0.0.1 (gloo collectives) match one process.

Each process initializes ``jax.distributed`` through ``gptj_jax.distributed``, builds meshes over
all 8 devices, feeds only its own batch rows (``process_rows`` + ``global_batch``), and runs:
the jit and shard_map forwards and losses on params made by ``init_sharded_params``; the same
forward on params loaded with ``gptj_jax.load(mesh=...)`` from an HF directory (each process reading only
its devices' slices) and from an orbax checkpoint (orbax restore into shardings). Process 0 gathers the results; the
test compares them with a single-process, single-device forward of the same params.

Run as a script (``python tests/test_multihost.py worker PID PORT WORKDIR``) it is the worker.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import padded_lm_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(1, 2, 4), (2, 2, 2), (1, 1, 8)]
CONFIG = dict(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=8, rotary_dim=4)
B, T = 8, 12


def _batch():
    return padded_lm_batch(CONFIG["vocab_size"], B, T, seed=3)


def _tokens():
    """A ``[1, B, T + 1]`` training batch (one micro-batch)."""
    return np.random.RandomState(4).randint(0, CONFIG["vocab_size"], (1, B, T + 1)).astype(np.int32)


def worker(pid: int, port: int, workdir: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    from gptj_jax import distributed

    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from gptj_jax import load, tp
    from gptj_jax import sharding as sh
    from gptj_jax.config import GPTJConfig

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    cfg = GPTJConfig(**CONFIG)
    ids, mask, labels = _batch()
    out: dict[str, np.ndarray] = {}
    for shape in MESHES:
        name = "x".join(map(str, shape))
        mesh = sh.make_mesh(*shape)
        lo, hi = distributed.process_rows(mesh, B)
        g_ids, g_mask, g_labels = (distributed.global_batch(mesh, a[lo:hi], B) for a in (ids, mask, labels))
        params = sh.init_sharded_params(cfg, mesh, jax.random.PRNGKey(0))
        for impl in tp.IMPLS:
            logits = tp.forward(params, g_ids, g_mask, config=cfg, mesh=mesh, impl=impl)
            out[f"{name}/{impl}/logits"] = sh.unshard(logits)
            out[f"{name}/{impl}/loss"] = sh.unshard(tp.loss(params, g_ids, g_labels, g_mask, config=cfg, mesh=mesh, impl=impl))
        stats: dict = {}
        _, loaded = load(os.path.join(workdir, "hf"), mesh=mesh, stats=stats)
        out[f"{name}/hf/logits"] = sh.unshard(tp.forward(loaded, g_ids, g_mask, config=cfg, mesh=mesh))
        out[f"{name}/hf/bytes_read/{pid}"] = np.asarray(stats["bytes_read"])
        _, restored = load(os.path.join(workdir, "flax"), mesh=mesh)
        out[f"{name}/flax/logits"] = sh.unshard(tp.forward(restored, g_ids, g_mask, config=cfg, mesh=mesh))
        out[f"{name}/rows/{pid}"] = np.asarray([lo, hi])

    # One training step (train/step.py, plain SGD) on the 2-process mesh, then an orbax save of the
    # trained params by both processes and a restore onto a different mesh (resharding on load).
    import optax

    from gptj_jax.train import step as train_step

    mesh = sh.make_mesh(1, 2, 4)
    tokens = _tokens()
    lo, hi = distributed.process_rows(mesh, B)
    g_tokens = jax.make_array_from_process_local_data(
        train_step.batch_spec_sharding(mesh), tokens[:, lo:hi], tokens.shape)
    scfg = train_step.StepConfig(model=cfg)
    optimizer = optax.sgd(0.1)
    shardings = train_step.state_shardings(scfg, mesh, optimizer, jax.numpy.float32)
    params = sh.init_sharded_params(cfg, mesh, jax.random.PRNGKey(0))
    state = train_step.init_state(params, optimizer, 0, shardings)
    state, metrics = train_step.make_train_step(scfg, mesh, optimizer, optax.constant_schedule(0.1), shardings)(
        state, g_tokens)
    out["train/loss"] = sh.unshard(metrics["loss"])
    out["train/params/wte"] = sh.unshard(state["params"]["transformer"]["wte"]["embedding"])
    out["train/params/fc_out"] = sh.unshard(state["params"]["transformer"]["h_1"]["mlp"]["fc_out"]["kernel"])

    import orbax.checkpoint as ocp

    ckpt = os.path.join(workdir, "trained")
    if pid == 0:
        os.makedirs(ckpt, exist_ok=True)
        cfg.save_pretrained(ckpt)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(ckpt, "params"), state["params"])
        checkpointer.wait_until_finished()
    other = sh.make_mesh(2, 2, 2)
    _, restored = load(ckpt, mesh=other)
    out["train/restored_equal"] = np.asarray(all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(sh.unshard(restored)), jax.tree.leaves(sh.unshard(state["params"])))
    ))
    out["train/restored_on_other_mesh"] = np.asarray(all(
        x.sharding.is_equivalent_to(s, x.ndim)
        for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(sh.param_shardings(cfg, other)))
    ))
    np.savez(os.path.join(workdir, f"out{pid}.npz"), **out)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Write the checkpoints, run the two workers, return (outputs of process 0 and 1, reference)."""
    import jax

    from gptj_jax.config import GPTJConfig
    from gptj_jax.convert import save_flax, save_pretrained
    from gptj_jax.model import causal_lm_loss, init_params, model_for

    workdir = str(tmp_path_factory.mktemp("multihost"))
    cfg = GPTJConfig(**CONFIG)
    params = jax.device_get(init_params(cfg, jax.random.PRNGKey(0)))
    save_pretrained(os.path.join(workdir, "hf"), cfg, params)
    save_flax(os.path.join(workdir, "flax"), cfg, params)
    ids, mask, labels = _batch()
    logits = np.asarray(model_for(cfg).apply({"params": params}, ids, attention_mask=mask).logits)
    ref = {"logits": logits, "loss": float(causal_lm_loss(logits, labels)), "param_bytes": sum(
        np.asarray(x).nbytes for x in jax.tree.leaves(params))}
    ref["train"] = _single_process_train_step(cfg, params)

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "worker", str(pid), str(port), workdir],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for pid in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"worker failed (exit {p.returncode}):\n{log[-4000:]}"
    outs = [dict(np.load(os.path.join(workdir, f"out{pid}.npz"))) for pid in range(2)]
    return outs, ref


def _single_process_train_step(cfg, params) -> dict:
    """The same SGD step on this process's single device."""
    import jax
    import optax

    from gptj_jax import sharding as sh
    from gptj_jax.train import step as train_step

    mesh = sh.make_mesh(devices=jax.devices()[:1])
    scfg = train_step.StepConfig(model=cfg)
    optimizer = optax.sgd(0.1)
    shardings = train_step.state_shardings(scfg, mesh, optimizer, jax.numpy.float32)
    state = train_step.init_state(sh.shard_params(params, mesh, cfg), optimizer, 0, shardings)
    state, metrics = train_step.make_train_step(scfg, mesh, optimizer, optax.constant_schedule(0.1), shardings)(
        state, _tokens())
    p = jax.device_get(state["params"])
    return {"loss": float(metrics["loss"]), "wte": p["transformer"]["wte"]["embedding"],
            "fc_out": p["transformer"]["h_1"]["mlp"]["fc_out"]["kernel"],
            "moved": float(np.abs(p["transformer"]["wte"]["embedding"] - params["transformer"]["wte"]["embedding"]).max())}


@pytest.mark.slow
def test_train_step_and_checkpoint_across_processes(run):
    outs, ref = run
    train = ref["train"]
    assert train["moved"] > 1e-3
    for out in outs:
        assert abs(float(out["train/loss"]) - train["loss"]) <= 1e-5
        np.testing.assert_allclose(out["train/params/wte"], train["wte"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(out["train/params/fc_out"], train["fc_out"], atol=1e-6, rtol=0)
        # saved by both processes from mesh (1,2,4), restored onto (2,2,2): same values, new shardings
        assert bool(out["train/restored_equal"]) and bool(out["train/restored_on_other_mesh"])


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "dp%d-fsdp%d-mp%d" % s)
def test_sharded_forward_matches_single_process(run, shape):
    outs, ref = run
    name = "x".join(map(str, shape))
    for out in outs:  # both processes see the same gathered result
        for impl in ("jit", "shard_map", "hf", "flax"):
            np.testing.assert_allclose(out[f"{name}/{impl}/logits"], ref["logits"], atol=1e-5, rtol=0,
                                       err_msg=f"{impl} logits on mesh {shape}")
        for impl in ("jit", "shard_map"):
            np.testing.assert_allclose(out[f"{name}/{impl}/loss"], ref["loss"], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "dp%d-fsdp%d-mp%d" % s)
def test_each_process_feeds_and_reads_only_its_part(run, shape):
    outs, ref = run
    name = "x".join(map(str, shape))
    rows = [tuple(outs[pid][f"{name}/rows/{pid}"]) for pid in range(2)]
    dp, fsdp, mp = shape
    if dp * fsdp == 1:  # rows are not split: every process feeds the whole batch
        assert rows == [(0, B), (0, B)]
    else:  # process 0 holds devices 0-3: the first half of the rows
        assert rows == [(0, B // 2), (B // 2, B)]
    read = [int(outs[pid][f"{name}/hf/bytes_read/{pid}"]) for pid in range(2)]
    if dp == 2:
        # Each process's 4 devices are one whole dp replica (fsdp x mp = 4): it reads every weight once.
        assert read == [ref["param_bytes"]] * 2
    else:
        # The weights are split over all 8 devices: each process reads about half of the checkpoint
        # (its devices' slices, plus the small replicated LayerNorms), never the whole of it.
        for n in read:
            assert 0.45 * ref["param_bytes"] < n < 0.6 * ref["param_bytes"], (read, ref["param_bytes"])


# ============================================================================ flags (in-process)
def test_distributed_flags_and_detection():
    import argparse

    from gptj_jax import distributed

    parser = argparse.ArgumentParser()
    distributed.add_distributed_args(parser)
    args = parser.parse_args([])
    assert args.distributed == "auto" and args.coordinator_address is None
    assert distributed.detect_multiprocess({}) is None
    assert distributed.detect_multiprocess({"TPU_WORKER_HOSTNAMES": "host-0"}) is None  # a single TPU VM
    assert distributed.detect_multiprocess({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}) == "TPU_WORKER_HOSTNAMES"
    assert distributed.detect_multiprocess({"SLURM_NTASKS": "2"}) == "SLURM_NTASKS"
    assert distributed.detect_multiprocess({"OMPI_COMM_WORLD_SIZE": "1"}) is None
    with pytest.MonkeyPatch.context() as mp:  # nothing in this environment says "several processes"
        for var in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS",
                    "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
            mp.delenv(var, raising=False)
        assert distributed.maybe_initialize(args) is False
        assert distributed.maybe_initialize(parser.parse_args(["--distributed", "off"])) is False
    with pytest.raises(ValueError, match="--distributed off contradicts"):
        distributed.maybe_initialize(parser.parse_args(["--distributed", "off", "--num-processes", "2"]))
    with pytest.raises(ValueError, match="pass --coordinator-address, --num-processes and --process-id together"):
        distributed.initialize(coordinator_address="127.0.0.1:1", num_processes=2)
    with pytest.raises(ValueError, match=r"--process-id 2 is not in 0..1"):
        distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2)


def test_process_rows_on_one_process():
    import jax

    from gptj_jax import distributed
    from gptj_jax import sharding as sh

    mesh = sh.make_mesh(devices=jax.devices()[:1])
    assert distributed.process_rows(mesh, 8) == (0, 8)
    batch = distributed.global_batch(mesh, np.arange(16).reshape(8, 2), 8)
    assert batch.shape == (8, 2) and np.array_equal(np.asarray(batch), np.arange(16).reshape(8, 2))
    with pytest.raises(ValueError, match=r"must supply rows 0..8 \(8 rows\) of the 8-row batch, got 4"):
        distributed.global_batch(mesh, np.zeros((4, 2)), 8)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit("usage: python tests/test_multihost.py worker PID PORT WORKDIR")

"""Training on simulated 8-device meshes (a subprocess: XLA_FLAGS must be set before JAX starts).

* one training step (2 micro-batches, z-loss on) on dp=8, dp=2 x mp=4, dp=2 x fsdp=2 x mp=2 and on the
  shard_map path (vocab-parallel loss) gives the parameters of one device to <= 1e-5;
* a checkpoint saved on (dp=2, mp=4) restores onto (dp=8) and onto one device (this process) and both keep
  training to the same parameters;
* configs/mtj_tiny_roto.json (mesh-transformer-jax's 6B_roto_256.json shrunk) runs with only its paths changed.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from gptj_jax.convert import table
from gptj_jax.train.config import load_train_config
from gptj_jax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    from gptj_jax.train.data import prepare

    work = tmp_path_factory.mktemp("mesh")
    mtj_data = work / "mtj_data"
    val_text = sorted(glob.glob(os.path.join(ROOT, "data", "demo", "val", "*.txt")))
    prepare(val_text, str(mtj_data / "train"), seq=64, workers=1, progress=False)
    prepare(val_text, str(mtj_data / "val"), seq=64, workers=1, progress=False)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "train_mesh_worker.py"), str(work), str(mtj_data)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return work, json.loads(lines[-1][len("RESULTS "):])


def test_one_step_on_meshes_equals_one_device(mesh_run):
    _, results = mesh_run
    diffs = results["step_diffs"]
    assert set(diffs) == {"dp=8", "dp=2,mp=4", "dp=2,fsdp=2,mp=2", "shard_map dp=2,mp=4", "shard_map fsdp=2,mp=4"}
    for label, diff in diffs.items():
        assert diff <= 1e-5, (label, diff)


def test_checkpoint_restores_onto_other_meshes_and_keeps_training(mesh_run):
    work, results = mesh_run
    assert results["reshard"]["start_step"] == 2 and results["reshard"]["step"] == 4
    # One device (this process): the same (dp=2, mp=4) checkpoint, the same two more steps.
    data = str(work / "data")
    cfg = load_train_config(None, [
        "layers=2", "d_model=32", "n_heads=4", "n_vocab=128", "pe_rotary_dims=4", "n_positions=64", "seq=16",
        "dtype=float32", "progress=false", "peak_flops=1e11", f"train_set={data}", "per_replica_batch=8",
        "lr=1e-3", "ckpt_every=2", f"model_dir={work / 'run_for_one_device'}", "total_steps=4",
    ])
    summary = train(cfg)
    assert summary["start_step"] == 2 and summary["step"] == 4
    ours = table.flatten(jax.device_get(summary["final_params"]))
    dp8 = np.load(work / "dp8_params.npz")
    for key, value in ours.items():
        np.testing.assert_allclose(value, dp8[key.replace("/", "|")], atol=1e-5, err_msg=key)


def test_mtj_config_runs_with_only_paths_changed(mesh_run):
    _, results = mesh_run
    mtj = results["mtj"]
    assert mtj["step"] == 4  # total_steps
    assert mtj["mesh"] == "dp=4,fsdp=1,mp=2"  # cores_per_replica=2 on 8 devices
    assert mtj["val_rows"] == [4]  # val_every=4
    assert mtj["checkpoints"] == [2, 4]  # ckpt_every=2

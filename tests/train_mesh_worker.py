"""Run by tests/test_train_mesh.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS set by the caller).

    python tests/train_mesh_worker.py WORKDIR MTJ_DATA_DIR

Prints one JSON line of results:
  step_diffs      {mesh label: max |params after one step - params after the same step on one device|}
  reshard         {"start_step", "step"} of the run restored from a (dp=2, mp=4) checkpoint onto (dp=8)
  mtj             summary of configs/mtj_tiny_roto.json run with only its paths changed
and writes WORKDIR/dp8_params.npz (the dp=8 run's final params) for the one-device comparison.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gptj_jax import sharding as sh
from gptj_jax.config import GPTJConfig
from gptj_jax.convert import table
from gptj_jax.model import init_params
from gptj_jax.train import step as step_lib
from gptj_jax.train.config import load_train_config
from gptj_jax.train.loop import train
from gptj_jax.train.optimizer import mtj_optimizer, mtj_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = GPTJConfig(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)


def one_step(mesh, forward: str, params_np, batch) -> dict:
    """Params after one train step (k=2 micro-batches) on ``mesh`` from the given params, as numpy."""
    scfg = step_lib.StepConfig(CFG, "float32", forward=forward, grad_accum=2, z_loss=1e-4)
    sched = mtj_schedule(0, 10, 1e-3, 1e-4)
    opt = mtj_optimizer(lr_schedule=sched, weight_decay=0.1, gradient_accumulation_steps=2)
    shardings = step_lib.state_shardings(scfg, mesh, opt, jnp.float32)
    params = jax.tree.map(jax.device_put, params_np, shardings["params"])
    state = step_lib.init_state(params, opt, 0, shardings)
    fn = step_lib.make_train_step(scfg, mesh, opt, sched, shardings)
    state, _ = fn(state, jax.device_put(batch, step_lib.batch_spec_sharding(mesh)))
    state, _ = fn(state, jax.device_put(batch[::-1].copy(), step_lib.batch_spec_sharding(mesh)))
    return jax.device_get(state["params"])


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main() -> None:
    work, mtj_data = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 8, jax.devices()
    results: dict = {}

    # ---- one training step on each mesh == one device
    params_np = jax.device_get(init_params(CFG, jax.random.PRNGKey(0)))
    batch = np.random.RandomState(0).randint(0, 128, (2, 8, 17)).astype(np.uint16)  # k=2 micro-batches of 8
    ref = one_step(sh.make_mesh(devices=jax.devices()[:1]), "gspmd", params_np, batch)
    results["step_diffs"] = {}
    for label, forward, sizes in (
        ("dp=8", "gspmd", dict(dp=8)),
        ("dp=2,mp=4", "gspmd", dict(dp=2, mp=4)),
        ("dp=2,fsdp=2,mp=2", "gspmd", dict(dp=2, fsdp=2, mp=2)),
        ("shard_map dp=2,mp=4", "shard_map", dict(dp=2, mp=4)),
        ("shard_map fsdp=2,mp=4", "shard_map", dict(fsdp=2, mp=4)),
    ):
        got = one_step(sh.make_mesh(**sizes), forward, params_np, batch)
        results["step_diffs"][label] = max_diff(ref, got)

    # ---- a checkpoint saved on (dp=2, mp=4) restores onto (dp=8) and keeps training
    data = os.path.join(work, "data")
    rows = (np.random.RandomState(0).randint(0, 128, (64, 1)) + np.arange(17)[None, :]) % 128
    from gptj_jax.train.data import write_records

    write_records(data, rows)
    common = ["layers=2", "d_model=32", "n_heads=4", "n_vocab=128", "pe_rotary_dims=4", "n_positions=64", "seq=16",
              "dtype=float32", "progress=false", "peak_flops=1e11", f"train_set={data}", "per_replica_batch=2",
              "lr=1e-3", "ckpt_every=2"]
    run = os.path.join(work, "run_dp2mp4")
    train(load_train_config(None, common + [f"model_dir={run}", "mesh=dp=2,mp=4", "total_steps=2"]))
    shutil.copytree(run, os.path.join(work, "run_for_one_device"))
    s = train(load_train_config(None, common + [f"model_dir={run}", "mesh=dp=8", "per_replica_batch=1",
                                                "total_steps=4"]))
    results["reshard"] = {"start_step": s["start_step"], "step": s["step"], "loss": s["loss"]}
    flat = table.flatten(jax.device_get(s["final_params"]))
    np.savez(os.path.join(work, "dp8_params.npz"), **{k.replace("/", "|"): v for k, v in flat.items()})

    # ---- the mtj-style config, only paths changed
    with open(os.path.join(ROOT, "configs", "mtj_tiny_roto.json"), encoding="utf-8") as f:
        mtj = json.load(f)
    # paths changed, and the harness tasks off: lambada, piqa, ... need dataset downloads this machine cannot make
    # (tests/test_eval_harness.py runs eval_harness_tasks on local tasks)
    mtj.update(train_set=os.path.join(mtj_data, "train"), val_set={"fables": os.path.join(mtj_data, "val")},
               model_dir=os.path.join(work, "mtj_run"), eval_harness_tasks=[])
    mtj_file = os.path.join(work, "mtj_tiny_roto.json")
    with open(mtj_file, "w", encoding="utf-8") as f:
        json.dump(mtj, f)
    s = train(load_train_config(mtj_file, ["progress=false"]))
    with open(os.path.join(work, "mtj_run", "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    results["mtj"] = {
        "step": s["step"], "mesh": sh.describe_mesh(s["mesh"]),
        "val_rows": [r["step"] for r in rows if "val_fables_loss" in r],
        "checkpoints": sorted(int(d) for d in os.listdir(os.path.join(work, "mtj_run")) if d.isdigit()),
    }
    print("RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()

"""Multi-host training check on one machine: 2 JAX processes x 2 CPU devices each (gloo collectives).

    python scripts/multihost_train_check.py [--workdir DIR] [--port 12355] [--timeout 600]

Launches three 2-process runs of the real trainer (``gptj_jax.train.loop.train``) on a tiny model:
  A. 4 steps in one go;
  B. 2 steps (saves a checkpoint: each process writes its shards and its own data-loader state), then
  C. the same command with total_steps=4: restores B's checkpoint in both processes and trains 2 more steps.
It exits 0 when A's and C's final parameters are bit-identical (a multi-host step, save and restore that
resume exactly, data position included), else 1, printing one JSON line ``RESULTS {...}``.
Used by tests/test_multihost.py; also a smoke test before a real multi-host TPU job.

``--worker`` runs one process of a run (the launcher passes it); not for direct use.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["layers=2", "d_model=32", "n_heads=4", "n_vocab=128", "pe_rotary_dims=4", "n_positions=64", "seq=16",
        "dtype=float32", "progress=false", "peak_flops=1e11", "per_replica_batch=2", "lr=1e-3", "ckpt_every=2",
        "gradient_accumulation_steps=2", "dropout=0.1"]


def worker(args: argparse.Namespace) -> int:
    sys.path.insert(0, ROOT)
    from gptj_jax.distributed import initialize, set_cpu_devices

    set_cpu_devices(2)
    initialize(f"127.0.0.1:{args.port}", 2, args.process_id)
    import jax
    import numpy as np

    from gptj_jax import sharding as sh
    from gptj_jax.convert import table
    from gptj_jax.train.config import load_train_config
    from gptj_jax.train.loop import train

    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.devices())
    cfg = load_train_config(None, TINY + [f"train_set={args.data}", f"model_dir={args.run}",
                                          f"total_steps={args.total_steps}"])
    summary = train(cfg)
    params = sh.unshard(summary["final_params"])
    if jax.process_index() == 0:
        flat = table.flatten(params)
        np.savez(os.path.join(args.run, "final_params.npz"), **{k.replace("/", "|"): v for k, v in flat.items()})
        with open(os.path.join(args.run, "summary.json"), "w", encoding="utf-8") as f:
            json.dump({"start_step": summary["start_step"], "step": summary["step"], "loss": summary["loss"]}, f)
    return 0


def launch(script: str, port: int, data: str, run: str, total_steps: int, timeout: float) -> dict:
    """Run one 2-process training run; returns process 0's summary."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, script, "--worker", "--process-id", str(i), "--port", str(port), "--data", data,
             "--run", run, "--total-steps", str(total_steps)],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"multi-host run {run} timed out after {timeout} s") from None
    for i, (p, out) in enumerate(zip(procs, outputs)):
        if p.returncode != 0:
            raise RuntimeError(f"process {i} of run {run} exited with {p.returncode}:\n{out[-3000:]}")
    with open(os.path.join(run, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where runs go (default: a temporary directory, removed)")
    parser.add_argument("--port", type=int, default=12355, help="coordinator port on 127.0.0.1 (A uses it, B +1, C +2)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--total-steps", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, ROOT)
    import numpy as np

    from gptj_jax.train.data import write_records

    work = args.workdir or tempfile.mkdtemp(prefix="gptj-multihost-")
    os.makedirs(work, exist_ok=True)
    try:
        data = os.path.join(work, "data")
        rows = (np.random.RandomState(0).randint(0, 128, (64, 1)) + np.arange(17)[None, :]) % 128
        write_records(data, rows)
        script = os.path.abspath(__file__)
        a = launch(script, args.port, data, os.path.join(work, "A"), 4, args.timeout)
        b = launch(script, args.port + 1, data, os.path.join(work, "BC"), 2, args.timeout)
        c = launch(script, args.port + 2, data, os.path.join(work, "BC"), 4, args.timeout)
        pa = np.load(os.path.join(work, "A", "final_params.npz"))
        pc = np.load(os.path.join(work, "BC", "final_params.npz"))
        identical = sorted(pa.files) == sorted(pc.files) and all(np.array_equal(pa[k], pc[k]) for k in pa.files)
        max_diff = max(float(np.max(np.abs(pa[k] - pc[k]))) for k in pa.files)
        results = {"A": a, "B": b, "C": c, "identical": identical, "max_diff": max_diff,
                   "checkpoints": sorted(int(d) for d in os.listdir(os.path.join(work, "BC")) if d.isdigit())}
        print("RESULTS " + json.dumps(results), flush=True)
        ok = identical and b["step"] == 2 and c["start_step"] == 2 and c["step"] == 4 and a["step"] == 4
        return 0 if ok else 1
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: checkpoint conversion time, throughput and peak memory, ours next to transformers.

Creates a ~1.4B-parameter GPT-J checkpoint (``gptj_jax/presets/gptj-1.3b.json``, random float16 weights, one
``model.safetensors`` as transformers writes it) without building a model, then runs each conversion
in a fresh subprocess and reads that process's peak RSS (``ru_maxrss``):

* ours: HF -> Flax, Flax -> HF, HF -> HF (resharded to 1 GB shards), HF -> mtj (mp 8, setup for
  the next row), mtj -> HF;
* peer: transformers ``GPTJForCausalLM.from_pretrained(src, dtype=float16)`` + ``save_pretrained``
  on the same file (HF -> HF; transformers has no Flax or mtj path, and mesh-transformer-jax's
  ``to_hf_weights.py`` needs its whole code base and ~30 GB, so it is the peer for every row);
* floor: copying the source file (the bytes every conversion must at least read and write).

Prints a markdown table: seconds, MB/s (checkpoint bytes / seconds), peak RSS, RSS above the
interpreter's baseline (imports done, nothing loaded), and ours / transformers ratios.

    python scripts/bench_convert.py [--config gptj_jax/presets/gptj-1.3b.json] [--workdir /tmp/bench_convert] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each job runs in its own interpreter: import, record baseline RSS, run, record time and peak RSS.
CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
kind, src, dst, extra = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
if kind == "transformers":
    import torch, transformers
else:
    from gptj_jax.convert import convert
def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
baseline = rss_now()
t0 = time.perf_counter()
if kind == "transformers":
    model = transformers.GPTJForCausalLM.from_pretrained(src, dtype=torch.float16)
    model.save_pretrained(dst, max_shard_size=extra["max_shard_size"])
else:
    convert(src, dst, verbose=False, tokenizer=False, **extra)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(json.dumps({{"seconds": seconds, "peak": peak, "hwm": hwm, "baseline": baseline}}))
"""


def run_child(kind: str, src: str, dst: str, extra: dict) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    code = CHILD.format(root=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code, kind, src, dst, json.dumps(extra)],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {src} -> {dst} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_checkpoint(config_path: str, directory: str) -> tuple[int, int, int]:
    """Random float16 GPT-J in ``directory`` (config.json + model.safetensors), one tensor in memory at a time.

    Returns (parameters, bytes, largest tensor bytes)."""
    sys.path.insert(0, ROOT)
    import numpy as np

    from gptj_jax.config import GPTJConfig
    from gptj_jax.convert import table
    from gptj_jax.convert.hf import write_config_files
    from gptj_jax.convert.io import SafetensorsWriter

    config = GPTJConfig.from_pretrained(config_path)
    shapes = table.expected_shapes(config, "causal_lm")
    os.makedirs(directory, exist_ok=True)
    plan = sorted((name, shape, np.dtype(np.float16)) for name, shape in shapes.items())  # transformers' order
    writer = SafetensorsWriter(directory, plan, max_shard_size="1TB")
    rng = np.random.default_rng(0)
    for name, shape, _ in plan:
        if name.endswith("ln_1.weight") or name.endswith("ln_f.weight"):
            array = np.ones(shape, np.float16)
        else:
            array = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
        writer.write(name, array)
    writer.close()
    write_config_files(directory, config, "causal_lm", np.float16)
    params = sum(int(np.prod(s)) for s in shapes.values())
    largest = max(int(np.prod(s)) for s in shapes.values()) * 2
    return params, params * 2, largest


def measure_copy(src_file: str, dst_file: str) -> float:
    """Floor: seconds to copy the checkpoint file once (read + write of every byte)."""
    t0 = time.perf_counter()
    shutil.copyfile(src_file, dst_file)  # into the page cache, like the conversions (none fsyncs)
    seconds = time.perf_counter() - t0
    os.remove(dst_file)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "gptj_jax", "presets", "gptj-1.3b.json"))
    ap.add_argument("--workdir", default="/tmp/bench_convert")
    ap.add_argument("--shards", type=int, default=8, help="mp of the mesh-transformer-jax checkpoint")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir")
    ap.add_argument("--make-checkpoint", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_checkpoint:
        print(json.dumps(make_checkpoint(args.config, args.make_checkpoint)))
        return

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    src = os.path.join(work, "hf")
    t0 = time.perf_counter()
    # In a subprocess: a child's ru_maxrss starts from its parent's RSS at fork, so the parent stays small.
    made = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--make-checkpoint", src, "--config", args.config],
        check=True, capture_output=True, text=True,
    )
    params, nbytes, largest = json.loads(made.stdout.strip().splitlines()[-1])
    print(f"created {src}: {params / 1e9:.2f}B parameters, float16, {nbytes / 1e9:.2f} GB "
          f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    copy_s = measure_copy(os.path.join(src, "model.safetensors"), os.path.join(work, "copy.safetensors"))

    jobs = [  # (label, kind, src, dst, extra)
        ("HF -> HF (1 GB shards)", "ours", src, os.path.join(work, "hf_resharded"), {"to": "hf", "max_shard_size": "1GB"}),
        ("HF -> Flax", "ours", src, os.path.join(work, "flax"), {"to": "flax"}),
        ("Flax -> HF", "ours", os.path.join(work, "flax"), os.path.join(work, "hf_from_flax"), {"to": "hf"}),
        (f"HF -> mtj (mp {args.shards}, slim)", "ours", src, os.path.join(work, "mtj"), {"to": "mtj", "shards": args.shards}),
        ("mtj -> HF", "ours", os.path.join(work, "mtj"), os.path.join(work, "hf_from_mtj"),
         {"to": "hf", "config": os.path.join(src, "config.json")}),
        ("transformers from_pretrained + save_pretrained (1 GB shards)", "transformers", src,
         os.path.join(work, "hf_transformers"), {"max_shard_size": "1GB"}),
    ]
    results = {}
    for label, kind, s, d, extra in jobs:
        print(f"running {label} ...", file=sys.stderr, flush=True)
        results[label] = run_child(kind, s, d, extra)
        r = results[label]
        print(f"  {r['seconds']:.1f} s, peak RSS {r['peak'] / 1e9:.2f} GB (VmHWM {r['hwm'] / 1e9:.2f} GB)", file=sys.stderr)

    peer = results[jobs[-1][0]]
    gb = 1e9
    print()
    print(f"Checkpoint: {params / 1e9:.2f}B-parameter GPT-J ({os.path.relpath(args.config, ROOT)}), float16, "
          f"{nbytes / gb:.2f} GB, largest tensor {largest / 1e6:.0f} MB; {os.cpu_count()} CPU cores, page-cached files.")
    print(f"Load average during the run: {os.getloadavg()[0]:.1f} (shared machine).")
    print(f"Floor: copying the {nbytes / gb:.2f} GB file takes {copy_s:.1f} s ({nbytes / 1e6 / copy_s:.0f} MB/s).")
    print()
    print("| conversion | seconds | MB/s | peak RSS GB | RSS above baseline GB | time vs transformers | peak RSS vs transformers |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, _, _, _, _ in jobs:
        r = results[label]
        row = [
            label + (" (peer)" if r is peer else " (ours)"),
            f"{r['seconds']:.1f}",
            f"{nbytes / 1e6 / r['seconds']:.0f}",
            f"{r['peak'] / gb:.2f}",
            f"{(r['peak'] - r['baseline']) / gb:.2f}",
            f"{r['seconds'] / peer['seconds']:.2f}x",
            f"{r['peak'] / peer['peak']:.2f}x",
        ]
        print("| " + " | ".join(row) + " |")
    print()
    print(f"Bounds from the issue: HF outputs stay under max_shard_size + 2 x largest tensor ({2 * largest / gb:.2f} GB) "
          f"+ interpreter; Flax output under 1.2 x model ({1.2 * nbytes / gb:.2f} GB) + interpreter.")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

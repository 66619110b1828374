"""Benchmark: loading a checkpoint to bfloat16 params, ours (``gptj_jax.load``) next to transformers.

Writes a ~1.4B-parameter GPT-J (``gptj_jax/presets/gptj-1.3b.json``, random float32 weights) once into
``--workdir``, in the layouts users meet:

* ``bin/``: one float32 ``pytorch_model.bin``, as ``EleutherAI/gpt-j-6B``'s ``main`` branch has it;
* ``safetensors/``: ``model-0000k-of-0000n.safetensors`` shards (2 GB) + index;
* ``flax/``: one ``flax_model.msgpack`` (Transformers 4.x Flax), written by ``gptj-jax convert --to hf-flax``;
* ``hub/``: a Hugging Face cache (``models--bench--gptj-1.3b``) whose snapshot links to ``safetensors/``
  plus tokenizer files, for the time-to-first-token rows.

Each load runs in a fresh interpreter (``JAX_PLATFORMS=cpu``), which samples ``/proc/self/status``
every 5 ms from a thread: wall time of the load call, peak ``RssAnon`` and ``RssFile``, ``VmHWM``, and
the baseline after imports. "anon over" = peak RssAnon - baseline RssAnon - bytes of the loaded params
(bfloat16): the transient host memory of the load, whose target is <= 2 x the largest tensor + 300 MB.
MB/s is checkpoint bytes / load seconds, next to ``cat FILES > /dev/null`` (run twice; the second, warm
figure is the page-cache read rate a load could reach; caches are not dropped, so every row reads warm).

Time to first token: a cold process running ``gptj-jax generate --model bench/gptj-1.3b --max-new-tokens 1
--dtype bfloat16`` (HF_HUB_OFFLINE=1, the cache above) against a transformers script doing the same
(AutoTokenizer + ``GPTJForCausalLM.from_pretrained(dtype=torch.bfloat16)`` + ``generate``): process wall time.

    python scripts/bench_load.py [--workdir /tmp/bench_load] [--preset gptj-1.3b] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "bench/gptj-1.3b"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROMPT = "The quick brown fox jumps over the lazy dog. In the beginning"

# One load per interpreter: imports, baseline, a 5 ms /proc/self/status sampler, the load, the figures.
CHILD = r"""
import json, os, resource, sys, threading, time
sys.path.insert(0, {root!r})
kind, src = sys.argv[1], sys.argv[2]
if kind == "transformers":
    import torch, transformers
else:
    import jax
    import gptj_jax
    from gptj_jax.convert import load as _load_module  # imported before the baseline, like transformers
def status():
    out = {{}}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out
base = status()
peak = dict(base)
stop = threading.Event()
def sample():
    while not stop.is_set():
        s = status()
        for k in ("RssAnon", "RssFile", "VmRSS"):
            peak[k] = max(peak[k], s[k])
        time.sleep(0.005)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
t0 = time.perf_counter()
r0 = resource.getrusage(resource.RUSAGE_SELF)
if kind == "transformers":
    model = transformers.GPTJForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
else:
    config, params = gptj_jax.load(src, dtype="bfloat16")
    jax.block_until_ready(params)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
seconds = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
stop.set()
thread.join()
end = status()
for k in ("RssAnon", "RssFile", "VmRSS"):
    peak[k] = max(peak[k], end[k])
print(json.dumps({{"seconds": seconds, "base": base, "peak": peak, "end": end, "hwm": end["VmHWM"], "params": nbytes, "cpu": cpu,
                  "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
                  "minflt": r1.ru_minflt - r0.ru_minflt}}))
"""

TRANSFORMERS_TTFT = r"""
import sys, torch, transformers
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
model = transformers.GPTJForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
ids = tok(sys.argv[2], return_tensors="pt")
out = model.generate(**ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.eos_token_id)
print(tok.decode(out[0, ids["input_ids"].shape[1]:]))
"""


# ============================================================================ the checkpoint
def prepare(workdir: str, preset: str) -> dict:
    """Write the layouts (once; an existing complete workdir is reused). Returns sizes."""
    sys.path.insert(0, ROOT)
    import numpy as np

    from gptj_jax.config import GPTJConfig
    from gptj_jax.convert import table
    from gptj_jax.convert.hf import write_config_files
    from gptj_jax.convert.io import SafetensorsWriter

    config = GPTJConfig.preset(preset)
    shapes = table.expected_shapes(config, "causal_lm")
    info = {
        "parameters": sum(int(np.prod(s)) for s in shapes.values()),
        "largest": max(int(np.prod(s)) * 4 for s in shapes.values()),
        "bytes": sum(int(np.prod(s)) * 4 for s in shapes.values()),
    }
    done = os.path.join(workdir, "done.json")
    if os.path.isfile(done):
        return info
    os.makedirs(workdir, exist_ok=True)
    st = os.path.join(workdir, "safetensors")
    print(f"writing {info['parameters'] / 1e9:.2f}B random float32 parameters to {workdir} ...", flush=True)
    rng = np.random.default_rng(0)
    writer = SafetensorsWriter(st, [(n, s, np.float32) for n, s in shapes.items()], "2GB")
    for name, shape in shapes.items():
        writer.write(name, (rng.standard_normal(shape, dtype=np.float32) * 0.02))
    writer.close()
    write_config_files(st, config, "causal_lm", np.float32)
    _write_bin(st, os.path.join(workdir, "bin"))
    subprocess.run(
        [sys.executable, "-m", "gptj_jax.cli", "convert", st, os.path.join(workdir, "flax"), "--to", "hf-flax",
         "--max-shard-size", "100GB", "--quiet"],
        check=True, cwd=ROOT,
    )
    _write_hub(st, os.path.join(workdir, "hub"))
    with open(done, "w") as f:
        json.dump(info, f)
    return info


def _write_bin(st: str, directory: str) -> None:
    """One float32 ``pytorch_model.bin``: torch.save streams tensors that view the safetensors files
    (memory-mapped), so the model is never in anonymous memory."""
    import shutil

    import numpy as np
    import torch

    from gptj_jax.convert.io import CheckpointReader

    os.makedirs(directory, exist_ok=True)
    state = {}
    with CheckpointReader(st) as reader:
        for name in reader.names:
            file = reader.file_of(name)
            handle = reader._handle(file)  # the header offsets of this shard
            dtype, shape, begin, _ = handle._entry(name)
            mm = np.memmap(file, dtype=dtype, mode="r", offset=handle._data_start + begin, shape=shape)
            state[name] = torch.from_numpy(np.asarray(mm))
    torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    for name in ("config.json", "generation_config.json"):
        shutil.copy(os.path.join(st, name), os.path.join(directory, name))


def _write_hub(st: str, hub: str) -> None:
    """A huggingface_hub cache holding ``bench/gptj-1.3b`` (main): links to the safetensors files, tokenizer."""
    from gptj_jax.tokenizer import save_tokenizer

    snapshot = os.path.join(hub, "models--" + REPO.replace("/", "--"), "snapshots", COMMIT)
    os.makedirs(snapshot, exist_ok=True)
    for name in os.listdir(st):
        os.symlink(os.path.join(os.path.abspath(st), name), os.path.join(snapshot, name))
    save_tokenizer(snapshot)
    refs = os.path.join(hub, "models--" + REPO.replace("/", "--"), "refs")
    os.makedirs(refs, exist_ok=True)
    with open(os.path.join(refs, "main"), "w") as f:
        f.write(COMMIT)


# ============================================================================ measurements
def run_child(kind: str, src: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=ROOT), kind, src],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {src} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def weight_files(directory: str) -> list[str]:
    return sorted(
        os.path.join(directory, n) for n in os.listdir(directory)
        if n.endswith((".safetensors", ".bin", ".msgpack"))
    )


def evict(files: list[str]) -> None:
    """Drop ``files`` from the page cache (``posix_fadvise(DONTNEED)``), so that the 17 GB of layouts do not
    crowd out the one being measured (caches cannot be dropped as a whole without root)."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cat_seconds(files: list[str]) -> float:
    """Seconds of ``cat FILES > /dev/null``, run twice; the second (warm) run."""
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
        seconds = time.perf_counter() - t0
    return seconds


def ttft(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{out.stderr[-3000:]}")
    return seconds


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/bench_load")
    ap.add_argument("--preset", default="gptj-1.3b")
    ap.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest is shown")
    args = ap.parse_args(argv)
    t_start = time.time()
    info = prepare(args.workdir, args.preset)
    mb = 1e6
    bound = 2 * info["largest"] + 300 * 2**20
    rows = []
    layouts = (("bin", "pytorch_model.bin (1 file)"), ("safetensors", "safetensors (2 GB shards)"),
               ("flax", "flax_model.msgpack (1 file)"))
    for layout, label in layouts:
        src = os.path.join(args.workdir, layout)
        files = weight_files(src)
        evict([f for other, _ in layouts if other != layout for f in weight_files(os.path.join(args.workdir, other))])
        size = sum(os.path.getsize(f) for f in files)
        cat = cat_seconds(files)
        peers = ["ours", "transformers"] if layout != "flax" else ["ours"]
        runs: dict = {kind: [] for kind in peers}
        for _ in range(args.repeat):  # alternate, so both see the same machine
            for kind in peers:
                runs[kind].append(run_child(kind, src))
        for kind in peers:
            r = min(runs[kind], key=lambda x: x["seconds"])
            over = r["peak"]["RssAnon"] - r["base"]["RssAnon"] - r["params"]
            rows.append((label, kind, r, size, cat, over))
            each = ", ".join(f"{x['seconds']:.1f}" for x in runs[kind])
            print(f"  {label:30s} {kind:12s} {r['seconds']:6.1f} s (runs: {each})", flush=True)
    env = {**os.environ, "HF_HUB_CACHE": os.path.join(args.workdir, "hub"), "HF_HUB_OFFLINE": "1",
           "JAX_PLATFORMS": "cpu"}
    ours_cmd = [sys.executable, "-m", "gptj_jax.cli", "generate", "--model", REPO, "--prompt", PROMPT,
                "--max-new-tokens", "1", "--dtype", "bfloat16", "--quiet"]
    theirs_cmd = [sys.executable, "-c", TRANSFORMERS_TTFT, REPO, PROMPT]
    first = {"ours": min(ttft(ours_cmd, env) for _ in range(args.repeat)),
             "transformers": min(ttft(theirs_cmd, env) for _ in range(args.repeat))}

    print()
    print(f"Loading {info['parameters'] / 1e9:.2f}B random float32 parameters ({args.preset}) to bfloat16, fresh "
          f"process per row; largest tensor {info['largest'] / mb:.0f} MB, so the anon target is <= "
          f"{bound / mb:.0f} MB.")
    print()
    print("| source | loader | seconds | CPU seconds | MB/s | warm `cat` MB/s | peak RssAnon over params (MB) "
          "| peak RssFile (MB) | VmHWM (MB) | transformers / ours (time) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    theirs = {label: r["seconds"] for label, kind, r, *_ in rows if kind == "transformers"}
    for label, kind, r, size, cat, over in rows:
        ratio = f"{theirs[label] / r['seconds']:.2f}" if kind == "ours" and label in theirs else ""
        print(f"| {label} | {kind} | {r['seconds']:.1f} | {r['cpu']:.1f} | {size / mb / r['seconds']:.0f} "
              f"| {size / mb / cat:.0f} | {over / mb:.0f} | {r['peak']['RssFile'] / mb:.0f} | {r['hwm'] / mb:.0f} "
              f"| {ratio} |")
    print()
    print("| time to first token, cold process, cached hub id | seconds |")
    print("|---|---:|")
    print(f"| `gptj-jax generate --model {REPO} --max-new-tokens 1 --dtype bfloat16` | {first['ours']:.1f} |")
    print(f"| transformers: AutoTokenizer + GPTJForCausalLM.from_pretrained(bf16) + generate(1) | "
          f"{first['transformers']:.1f} |")
    print()
    print(f"benchmark wall time {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

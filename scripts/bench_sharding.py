"""Benchmark: forward and decode throughput on 1, 2, 4 and 8 simulated CPU devices, collectives per step.

A sanity view of the sharded code paths, not a speed claim: simulated devices share this machine's
cores, so more devices cannot go faster; what the table shows is that every mesh runs, how much
the partitioning costs on one host, and how many collectives each compiled step holds (counted in
the HLO with ``tp.count_collectives``; on real hardware those are the ICI / NVLink transfers).

For each device count n, one subprocess (``jax_num_cpu_devices = n``) runs:

* forward ``[batch, seq]`` -> logits with ``impl="jit"`` (XLA's partitioner) and ``impl="shard_map"``
  (``tp.py``'s Megatron forward) on the pure tensor-parallel mesh ``mp=n``, ``shard_map`` on the
  pure FSDP mesh ``fsdp=n`` (weights all-gathered per block), and ``jit`` on the pure data-parallel
  mesh ``dp=n``;
* one greedy decode step (``generation.decode_step``, the real one, cache donated) for ``batch`` rows
  against a ``cache_len`` cache, params and cache sharded by the rules, on ``mp=n``.

Peer: the same step on 1 device (ratio = ours / 1 device). Floor: the matmul FLOP/s of one device
measured on the spot (``train.loop.measure_peak_flops``; XLA's CPU matmul already uses every core)
and the forward's share of it.

    python scripts/bench_sharding.py [--config ...] [--batch 8] [--seq 128] [--no-write]

Writes the table under ``## Sharding`` in docs/benchmarks.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNTS = (1, 2, 4, 8)
# A model big enough that matmuls dominate, small enough for 2 CPU cores; n_head and vocab split 8 ways.
DEFAULT_CONFIG = dict(vocab_size=8192, n_positions=512, n_embd=512, n_layer=4, n_head=8, rotary_dim=32)


def child(n: int, config: dict, batch: int, seq: int, cache_len: int, reps: int) -> dict:
    """Measure everything for ``n`` devices (runs in a fresh interpreter)."""
    import time

    import jax

    jax.config.update("jax_num_cpu_devices", n)
    import jax.numpy as jnp
    import numpy as np

    from gptj_jax import sharding as sh
    from gptj_jax import tp
    from gptj_jax.config import GPTJConfig
    from gptj_jax.generation import decode_step, prefill
    from gptj_jax.model import init_params
    from gptj_jax.train.loop import measure_peak_flops

    cfg = GPTJConfig(**config)
    params = jax.device_get(init_params(cfg, jax.random.PRNGKey(0)))
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, seq)).astype(np.int32)

    def timed(fn, *args) -> float:
        """Best seconds per call over ``reps`` calls (after one warm-up)."""
        jax.block_until_ready(fn(*args))
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best = min(best, time.perf_counter() - t0)
        return best

    def counts(jitted, *args) -> dict:
        return tp.compiled_collectives(jitted, *args)

    rows = []
    meshes = [("mp", (1, 1, n), impl) for impl in tp.IMPLS]
    if n > 1:
        meshes += [("fsdp", (1, n, 1), "shard_map"), ("dp", (n, 1, 1), "jit")]
    for label, shape, impl in meshes:
        mesh = sh.make_mesh(*shape)
        p = sh.shard_params(params, mesh, cfg)
        (x,) = sh.shard_batch(mesh, ids)
        fwd = tp.make_forward(cfg, mesh, impl)
        seconds = timed(fwd, p, x)
        row = dict(devices=n, mesh=sh.describe_mesh(mesh), impl=impl, forward_s=seconds,
                   forward_tok_s=batch * seq / seconds, forward_collectives=counts(fwd, p, x))
        if label == "mp" and impl == "jit":
            # decode: prefill a cache_len cache with the prompt (cache.py's layout, the one generate uses),
            # place it with sharding.cache_shardings, then time single decode steps
            prompt = ids[:, : cache_len // 2]
            pr, mk = sh.shard_batch(mesh, prompt, np.ones_like(prompt))
            _, cache = prefill(p, pr, mk, config=cfg, cache_len=cache_len)
            cache = jax.device_put(cache, sh.cache_shardings(cfg, mesh, cache))
            (tok,) = sh.shard_batch(mesh, np.zeros((batch,), np.int32))
            hlo = decode_step.lower(p, cache, tok, config=cfg).compile().as_text()
            row["decode_collectives"] = tp.count_collectives(hlo)
            _, cache = decode_step(p, cache, tok, config=cfg)  # warm-up (compiles)
            best = float("inf")
            for _ in range(max(reps, 8)):
                t0 = time.perf_counter()
                logits, cache = decode_step(p, cache, tok, config=cfg)
                jax.block_until_ready(logits)
                best = min(best, time.perf_counter() - t0)
                tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            row["decode_s"] = best
            row["decode_tok_s"] = batch / best
        rows.append(row)
    flops_fwd = 2.0 * (cfg.num_params("causal_lm") - cfg.vocab_size * cfg.n_embd) * batch * seq \
        + 4.0 * cfg.n_layer * cfg.n_embd * seq * seq * batch
    return dict(rows=rows, peak_flops=measure_peak_flops(jnp.float32, n=1024, seconds=0.5), flops_fwd=flops_fwd)


def _fmt_counts(c: dict) -> str:
    short = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A",
             "collective-permute": "CP"}
    parts = [f"{v} {short[k]}" for k, v in c.items() if v]
    return ", ".join(parts) if parts else "none"


def table(results: list[dict], config: dict, batch: int, seq: int, cache_len: int) -> str:
    base = {(r["impl"]): r for r in results[0]["rows"]}  # 1 device
    peak = results[0]["peak_flops"]
    flops_fwd = results[0]["flops_fwd"]
    lines = [
        "## Sharding",
        "",
        f"`python scripts/bench_sharding.py`: GPT-J with n_embd {config['n_embd']}, {config['n_layer']} layers, "
        f"{config['n_head']} heads, vocab {config['vocab_size']}; forward on [{batch}, {seq}] tokens, float32; "
        f"decode = one greedy `generation.decode_step` for {batch} rows against a {cache_len}-slot cache. "
        "Simulated CPU devices share this host's cores, so this is a sanity view: more devices cannot be faster "
        "here, and the ratio to 1 device shows the cost of partitioning on one host. Collectives are counted in "
        "the compiled HLO of one step (AR all-reduce, AG all-gather, RS reduce-scatter, CP collective-permute).",
        "",
        f"Floor: one device's matmul rate measured now, {peak / 1e9:.1f} GFLOP/s "
        f"(forward = {flops_fwd / 1e9:.2f} GFLOP). Each figure is the best of a few calls; every device count "
        "runs in its own process, so load from other jobs on the host shifts whole rows: read ratios within "
        "about 1.5x as noise.",
        "",
        "| devices | mesh | forward impl | forward tok/s | vs 1 device | share of floor | collectives / forward "
        "| decode tok/s | vs 1 device | collectives / decode step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_decode = next(r for r in results[0]["rows"] if "decode_tok_s" in r)["decode_tok_s"]
    for res in results:
        for r in res["rows"]:
            ref = base.get(r["impl"], base["jit"])
            mfu = flops_fwd / r["forward_s"] / peak
            decode = (f"{r['decode_tok_s']:.0f} | {r['decode_tok_s'] / base_decode:.2f} | "
                      f"{_fmt_counts(r['decode_collectives'])}") if "decode_tok_s" in r else "| |"
            lines.append(
                f"| {r['devices']} | {r['mesh']} | {r['impl']} | {r['forward_tok_s']:.0f} | "
                f"{r['forward_tok_s'] / ref['forward_tok_s']:.2f} | {mfu:.0%} | {_fmt_counts(r['forward_collectives'])} | "
                f"{decode} |"
            )
    lines += [
        "",
        f"The shard_map forward holds exactly 1 + n_layer = {1 + config['n_layer']} all-reduces on an mp mesh "
        "(the embedding's and one per block, GPT-J's parallel residual sums attention and MLP before the one psum); "
        "on an fsdp mesh it all-gathers each weight before use (7 per block + wte + lm_head), on a dp mesh it needs "
        "none. The jit rows show what XLA's partitioner chose for the same shardings.",
    ]
    return "\n".join(lines) + "\n"


def write_section(path: str, section: str) -> None:
    """Replace (or append) the ``## Sharding`` section of ``path``, keeping every other section."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    pattern = re.compile(r"^## Sharding\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="config.json (default: a 512-wide, 4-layer GPT-J)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--cache-len", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3, help="timed calls per step (best is reported)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    config = DEFAULT_CONFIG
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            config = {k: v for k, v in json.load(f).items() if k in (
                "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "rotary_dim", "n_inner")}
    if args.child is not None:
        print(json.dumps(child(args.child, config, args.batch, args.seq, args.cache_len, args.reps)))
        return 0

    results = []
    for n in DEVICE_COUNTS:
        env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(n), "--batch", str(args.batch),
               "--seq", str(args.seq), "--cache-len", str(args.cache_len), "--reps", str(args.reps)]
        if args.config:
            cmd += ["--config", args.config]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{n} device(s) done", file=sys.stderr)
    section = table(results, config, args.batch, args.seq, args.cache_len)
    print(section)
    if not args.no_write:
        write_section(os.path.join(ROOT, "docs", "benchmarks.md"), section)
        print("updated docs/benchmarks.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile time of GPT-J-6B's programs, unrolled vs ``scan_layers`` (a benchmark, not a test).

AOT ``jit(...).lower(...).compile()`` on abstract inputs (``jax.ShapeDtypeStruct``; no weights are made) of
the three programs users wait for at start-up: the fine-tuning step (``gptj_jax.train.step``, mtj's
optimizer, bf16 compute, float32 params), the prefill (prompt ``--seq`` into a cache of ``--seq`` slots)
and the decode step (one token against that cache) of ``gptj_jax.generation``. Both use ``plan.py``'s
compile helpers, so the programs are the ones ``gptj-jax plan`` and the runtime compile.

    python scripts/bench_compile.py [--config gptj-6b] [--seq 2048] [--batch 1] [--remat none] [--programs train,prefill,decode]

Prints a Markdown table (wall and process-CPU seconds per program, unrolled and scanned, and the ratio of
CPU seconds, which a loaded shared machine distorts less than wall time) and the load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import time


def _timed(jitted, *args) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``jitted.lower(*args).compile()``."""
    w, c = time.perf_counter(), time.process_time()
    jitted.lower(*args).compile()
    return time.perf_counter() - w, time.process_time() - c


def measure(config_name: str, scan: bool, programs: list[str], batch: int, seq: int, remat: str,
            attention: str = "xla") -> dict[str, tuple[float, float]]:
    """``{program: (wall s, cpu s)}`` of the AOT compile of each program for one layout."""
    import jax
    import jax.numpy as jnp

    from gptj_jax import sharding as sh
    from gptj_jax.cache import init_cache
    from gptj_jax.config import GPTJConfig
    from gptj_jax.generation import forward_cached
    from gptj_jax.train import step as train_step
    from gptj_jax.train.optimizer import mtj_optimizer, mtj_schedule

    cfg = GPTJConfig.load(config_name).replace(scan_layers=scan, attention=attention)
    mesh = sh.make_mesh(devices=jax.devices()[:1])
    out: dict[str, tuple[float, float]] = {}
    if "train" in programs:  # plan.train_steps' program: mtj's optimizer, bf16 compute, float32 params
        scfg = train_step.StepConfig(model=cfg, dtype="bfloat16", remat=remat)
        schedule = mtj_schedule(warmup_steps=100, anneal_steps=1000, lr=1e-5, end_lr=1e-6)
        optimizer = mtj_optimizer(lr_schedule=schedule, weight_decay=0.1, gradient_accumulation_steps=1)
        shardings = train_step.state_shardings(scfg, mesh, optimizer, jnp.float32)
        state = train_step.abstract_state(scfg, mesh, optimizer, jnp.float32)
        jitted = train_step.make_train_step(scfg, mesh, optimizer, schedule, shardings)
        tokens = jax.ShapeDtypeStruct((1, batch, seq + 1), jnp.int32, sharding=train_step.batch_spec_sharding(mesh))
        out["train"] = _timed(jitted, state, tokens)
    if "prefill" in programs or "decode" in programs:  # plan.inference_steps' program (generation's model call)
        params = sh.abstract_params(cfg, mesh, "causal_lm", jnp.bfloat16)
        cache_shape = jax.eval_shape(lambda: init_cache(cfg, batch, seq, jnp.bfloat16))
        cache_sh = sh.cache_shardings(cfg, mesh, cache_shape)
        cache = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), cache_shape, cache_sh)

        def step(params, ids, mask, cache):
            return forward_cached(params, ids, mask, cache, config=cfg, dtype=jnp.bfloat16)

        jitted = jax.jit(step, donate_argnums=(3,))
        prompt = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
        one = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
        if "prefill" in programs:
            out["prefill"] = _timed(jitted, params, prompt, prompt, cache)
        if "decode" in programs:
            out["decode"] = _timed(jitted, params, one, one, cache)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="gptj-6b", help="preset or config.json (default gptj-6b)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--remat", default="none")
    ap.add_argument("--programs", default="train,prefill,decode")
    args = ap.parse_args()
    programs = args.programs.split(",")

    import jax

    t0 = time.perf_counter()
    rows = {}
    for scan in (False, True):
        rows[scan] = measure(args.config, scan, programs, args.batch, args.seq, args.remat)
        print(f"scan_layers={scan}: {rows[scan]}", flush=True)
    load = os.getloadavg()
    print()
    print(f"{args.config}, batch {args.batch}, seq {args.seq}, remat {args.remat}; jax {jax.__version__} "
          f"{jax.default_backend()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores); "
          f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; total {time.perf_counter() - t0:.0f} s")
    print()
    print("| program | unrolled wall (s) | scan_layers wall (s) | unrolled CPU (s) | scan_layers CPU (s) | ratio (CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    for p in programs:
        (aw, ac), (bw, bc) = rows[False][p], rows[True][p]
        print(f"| {p} | {aw:.1f} | {bw:.1f} | {ac:.1f} | {bc:.1f} | {ac / bc:.1f}x |")


if __name__ == "__main__":
    main()

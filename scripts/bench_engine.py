"""Continuous batching on this CPU: the engine against static batches and transformers, in one run.

    python scripts/bench_engine.py [--config gptj_jax/presets/gptj-162m.json] [--requests 64] [--slots 16]
                                   [--parts engine static hf steps]

A workload of ``--requests`` requests (fixed seed), prompt lengths drawn from 8-256 tokens and
``max_new_tokens`` from 8-256, greedy, EOS off (every request gets exactly the tokens it asked for), float32,
all submitted at time 0. Columns: total new tokens/s (requested tokens only), p50 / p99 request latency
(submit to result), wall seconds:

* (a) the engine: ``gptj_jax.LLM`` with ``--slots`` decode slots (continuous batching: a finished request's
  slot is refilled at once) and ``max_len`` 512;
* (b) static batches, as the CLI ran them before the engine: prompts sorted by length, ``generate`` on
  batches of ``--slots`` with the batch's largest ``max_new_tokens`` (every row waits for the longest; each
  row keeps only its own tokens); a request's latency is the end of its batch;
* (c) transformers ``generate`` on the same left-padded batches (greedy, ``min_new_tokens`` =
  ``max_new_tokens`` = the batch's largest).

Compilation is excluded: (a) runs a warm-up workload covering every prompt bucket first; (b) compiles each
batch's programs first by one prefill + insert + decode step on an engine of that batch's shapes. Then the
steady-state decode step at ``--slots`` busy slots (512 cache slots, 128-token prompts): the engine's
``generate`` step (sampling, per-slot controls included) against a plain ``decode_step`` + argmax loop at
the same batch and cache, best of 3 x 20 steps each. Prints a markdown table (and the load average).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

MAX_LEN = 512


def workload(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        p, new = rng.randint(8, 257), rng.randint(8, 257)
        out.append((rng.randint(0, 50257, p).tolist(), int(new)))
    return out


def percentiles(latencies: list[float]) -> tuple[float, float]:
    return float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


def run_engine(llm, work) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    handles = [llm.submit(prompt, max_new_tokens=new, eos_token_id=[]) for prompt, new in work]
    llm.run_until_idle()
    wall = time.perf_counter() - t0
    for h, (_, new) in zip(handles, work):
        assert h.result().num_new_tokens == [new]
    return wall, [h.result().latency for h in handles]


def static_batches(work, slots: int) -> list[list[int]]:
    order = sorted(range(len(work)), key=lambda i: len(work[i][0]))
    return [order[i: i + slots] for i in range(0, len(order), slots)]


def warm_static(config, params, work, batches) -> None:
    """Compile the programs ``generate`` runs for each static batch (same static arguments, one step)."""
    from gptj_jax.engine import Engine, plan_request
    from gptj_jax.generation import EOS_SLOTS, bucket, resolve_config

    seen = set()
    for batch in batches:
        longest = max(len(work[i][0]) for i in batch)
        new = max(work[i][1] for i in batch)
        key = (bucket(len(batch)), bucket(longest, 8), bucket(new, 8))
        if key in seen:
            continue
        seen.add(key)
        plan = plan_request(config, resolve_config(None, max_new_tokens=new, eos_token_id=[]))
        engine = Engine(config, params, max_slots=key[0], max_len=key[1] + key[2], eos_slots=EOS_SLOTS,
                        bad_words_capacity=(1, 1))
        prompts = np.zeros((len(batch), longest), np.int64)
        lengths = np.array([len(work[i][0]) for i in batch])
        for b, i in enumerate(batch):
            prompts[b, : lengths[b]] = work[i][0]
        state = engine.init_decode_state()
        prefix = engine.prefill(engine.params, prompts, lengths, plan, rows=key[0])
        state = engine.insert(prefix, state, 0)
        state, result = engine.generate(engine.params, state)
        np.asarray(result.tokens)


def run_static(config, params, work, batches) -> tuple[float, list[float]]:
    from gptj_jax.generation import generate

    latencies = [0.0] * len(work)
    t0 = time.perf_counter()
    for batch in batches:
        new = max(work[i][1] for i in batch)
        out = generate(config, params, [work[i][0] for i in batch], max_new_tokens=new, eos_token_id=[])
        assert (out.num_new_tokens == new).all()
        now = time.perf_counter() - t0
        for i in batch:
            latencies[i] = now
    return time.perf_counter() - t0, latencies


def run_hf(hf, work, batches) -> tuple[float, list[float]]:
    import torch

    latencies = [0.0] * len(work)
    t0 = time.perf_counter()
    for batch in batches:
        new = max(work[i][1] for i in batch)
        longest = max(len(work[i][0]) for i in batch)
        ids = np.zeros((len(batch), longest), np.int64)
        mask = np.zeros_like(ids)
        for b, i in enumerate(batch):
            p = work[i][0]
            ids[b, longest - len(p):] = p
            mask[b, longest - len(p):] = 1
        with torch.no_grad():
            out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                              max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        assert out.shape[1] == longest + new
        now = time.perf_counter() - t0
        for i in batch:
            latencies[i] = now
    return time.perf_counter() - t0, latencies


def step_times(config, params, llm, slots: int, steps: int = 20, repeats: int = 3) -> tuple[float, float]:
    """Seconds per decode step at ``slots`` busy slots: the engine's step, and a plain decode_step loop."""
    import jax
    import jax.numpy as jnp

    from gptj_jax.engine import Engine
    from gptj_jax.generation import _decode_step, prefill

    engine = llm.engine
    rng = np.random.RandomState(1)
    prompts = rng.randint(0, 50257, (slots, 128))
    plan = engine.plan(max_new_tokens=MAX_LEN - 128, eos_token_id=[])
    best_engine = best_plain = float("inf")
    for _ in range(repeats):
        state = engine.init_decode_state()
        for s in range(slots):
            state = engine.insert(engine.prefill(engine.params, prompts[s], None, plan), state, s)
        state = Engine.with_spec(state, [plan.spec])
        state, result = engine.generate(engine.params, state)  # warm
        jax.block_until_ready(result.tokens)
        t = time.perf_counter()
        for _ in range(steps):
            state, result = engine.generate(engine.params, state)
        jax.block_until_ready(result.tokens)
        best_engine = min(best_engine, (time.perf_counter() - t) / steps)
        del state

        ids = jnp.asarray(prompts, jnp.int32)
        logits, cache = prefill(engine.params, ids, jnp.ones_like(ids), config=config, cache_len=MAX_LEN)
        tok = jnp.argmax(logits, -1)
        logits, cache = _decode_step(engine.params, cache, tok, config=config)  # warm
        tok = jnp.argmax(logits, -1)
        jax.block_until_ready(tok)
        t = time.perf_counter()
        for _ in range(steps):
            logits, cache = _decode_step(engine.params, cache, tok, config=config)
            tok = jnp.argmax(logits, -1)
        jax.block_until_ready(tok)
        best_plain = min(best_plain, (time.perf_counter() - t) / steps)
        del cache
    return best_engine, best_plain


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "gptj_jax", "presets", "gptj-162m.json"))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", nargs="*", choices=["engine", "static", "hf", "steps"],
                        default=["engine", "static", "hf", "steps"], help="which measurements to run (default all)")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from bench_generate import build_models

    from gptj_jax import LLM
    from gptj_jax.generation import TRACE_COUNTS

    config, hf, params_np = build_models(args.config)
    params = jax.tree.map(jnp.asarray, params_np)
    work = workload(args.requests, args.seed)
    total = sum(new for _, new in work)
    loads = [os.getloadavg()[0]]
    print(f"{len(work)} requests, {total} new tokens, load {loads[0]:.1f}", file=sys.stderr)

    llm = LLM(config, params, max_slots=args.slots, max_len=MAX_LEN, max_waiting=max(1024, len(work)))
    batches = static_batches(work, args.slots)
    rows = []
    if "engine" in args.parts:
        warm = [([1] * n, 2) for n in sorted({len(p) for p, _ in work})]  # every prompt bucket
        run_engine(llm, warm)
        before = dict(TRACE_COUNTS)
        t, lat = run_engine(llm, work)
        traced = {k: v - before.get(k, 0) for k, v in TRACE_COUNTS.items() if v != before.get(k, 0)}
        print(f"engine {t:.1f} s (programs traced while timed: {traced or 'none'})", file=sys.stderr)
        loads.append(os.getloadavg()[0])
        rows.append(("(a) engine, continuous batching", t, lat))
    if "static" in args.parts:
        warm_static(config, params, work, batches)
        before = dict(TRACE_COUNTS)
        t, lat = run_static(config, params, work, batches)
        traced = {k: v - before.get(k, 0) for k, v in TRACE_COUNTS.items() if v != before.get(k, 0)}
        print(f"static {t:.1f} s (programs traced while timed: {traced or 'none'})", file=sys.stderr)
        loads.append(os.getloadavg()[0])
        rows.append((f"(b) static batches of {args.slots} (`generate`)", t, lat))
    if "hf" in args.parts:
        run_hf(hf, [(work[0][0][:8], 2)], [[0]])  # warm-up
        t, lat = run_hf(hf, work, batches)
        print(f"transformers {t:.1f} s", file=sys.stderr)
        loads.append(os.getloadavg()[0])
        rows.append((f"(c) transformers `generate`, batches of {args.slots}", t, lat))
    step_engine = step_plain = None
    if "steps" in args.parts:
        step_engine, step_plain = step_times(config, params, llm, args.slots)
        print(f"step: engine {step_engine * 1e3:.1f} ms, plain {step_plain * 1e3:.1f} ms", file=sys.stderr)
        loads.append(os.getloadavg()[0])
    t_engine = rows[0][1] if rows and rows[0][0].startswith("(a)") else None
    print(f"\n{len(work)} requests (prompts 8-256, new 8-256, seed {args.seed}), {total} new tokens, "
          f"{args.slots} slots, float32; load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs\n")
    print("| run | new tokens/s | p50 latency (s) | p99 latency (s) | wall (s) | engine speed-up |")
    print("|---|---|---|---|---|---|")
    for name, wall, lat in rows:
        p50, p99 = percentiles(lat)
        ratio = "-" if t_engine is None else f"{wall / t_engine:.2f}x"
        print(f"| {name} | {total / wall:.1f} | {p50:.1f} | {p99:.1f} | {wall:.1f} | {ratio} |")
    if step_engine is not None:
        print(f"| decode step at {args.slots} busy slots, 512 cache slots | engine {step_engine * 1e3:.1f} ms | "
              f"plain `decode_step` + argmax {step_plain * 1e3:.1f} ms | | | {step_engine / step_plain:.2f}x "
              "the plain step |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory and speed of the 162M config on this machine: decode (float32, bfloat16, int8 weights) and training
(full fine-tuning, LoRA, QLoRA). Prints a markdown table (docs/benchmarks.md, section "Memory: int8, LoRA, QLoRA").

    python scripts/bench_memory.py [--steps 16] [--train-steps 3] [--seq 128] [--rank 8]

Decode: a 16-token prompt prefilled into a 16 + steps slot cache, then ``steps`` jitted ``decode_step`` calls
timed (after one untimed warm-up step); tokens/s = batch * steps / seconds. "weight bytes / step" is what one
decode step reads of the parameters (every weight once: int8 + scales for the quantized kernels), "cache" the
KV cache it reads at the last step. XLA:CPU does not run int8 matmuls natively: the dequantization is extra
work here; on TPU/GPU the step is bandwidth-bound and the halved weight bytes are what count.

Train: the project's jitted train step (``train/step.py``: mtj's AdamW chain, float32 master weights,
bfloat16 compute) on ``[1, 1, seq + 1]`` batches; "state" is the bytes of what the step keeps (trained params +
optimizer state + the frozen base), "compiled peak" XLA's own figure for the step: arguments + outputs +
temporaries - aliased (donated) bytes, from ``compiled.memory_analysis()``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bytes(tree) -> int:
    import jax
    import numpy as np

    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def bench_decode(config, params, batch: int, steps: int, dtype) -> tuple[float, int, int]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gptj_jax import generation

    P = 16
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 50000, (batch, P)), jnp.int32)
    mask = jnp.ones_like(ids)
    logits, cache = generation.prefill(params, ids, mask, config=config, cache_len=P + steps + 1, dtype=dtype)
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    logits, cache = generation.decode_step(params, cache, tok, config=config, dtype=dtype)  # warm-up (compile)
    jax.block_until_ready(logits)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        logits, cache = generation.decode_step(params, cache, tok, config=config, dtype=dtype)
    jax.block_until_ready(logits)
    dt = time.perf_counter() - t0
    cache_bytes = sum(int(x.nbytes) for layer in cache["layers"] for x in layer.values())
    return batch * steps / dt, _bytes(params), cache_bytes


def bench_train(config, mode: str, seq: int, steps: int, rank: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gptj_jax import lora, quantize
    from gptj_jax import sharding as sh
    from gptj_jax.model import init_params
    from gptj_jax.train import step as step_lib
    from gptj_jax.train.config import load_train_config
    from gptj_jax.train.optimizer import OptimizerConfig

    mesh = sh.make_mesh()
    tcfg = load_train_config(None, ["train_set=x", "model_dir=y", f"total_steps={steps}", "model_config=gptj-162m",
                                    "dtype=bfloat16", f"seq={seq}"])
    spec = lora.make_spec(config, rank, 2.0 * rank) if mode != "full" else None
    scfg = step_lib.StepConfig(config, "bfloat16", "none", "gspmd", 0.0, 1, spec, "int8" if mode == "qlora" else None)
    optimizer, schedule = OptimizerConfig.from_train_config(tcfg).build()
    shardings = step_lib.state_shardings(scfg, mesh, optimizer, jnp.float32)
    params = init_params(config, jax.random.PRNGKey(0))
    base_args: tuple = ()
    if spec is None:
        trained = params
    else:
        trained = jax.device_put(lora.init_adapters(config, spec, jax.random.PRNGKey(1)), shardings["params"])
        base = params if mode == "lora" else quantize.quantize_params(params)
        base_args = (base,)
    state = step_lib.init_state(trained, optimizer, 0, shardings)
    train_step = step_lib.make_train_step(scfg, mesh, optimizer, schedule, shardings)
    batch = jnp.asarray(np.random.RandomState(0).randint(0, 50000, (1, 1, seq + 1)), jnp.int32)
    compiled = train_step.lower(state, batch, *base_args).compile()
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    state_bytes = _bytes(state["params"]) + _bytes(state["opt_state"]) + sum(_bytes(b) for b in base_args)
    opt_bytes = _bytes(state["opt_state"])
    state, metrics = train_step(state, batch, *base_args)  # warm-up
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, batch, *base_args)
    jax.block_until_ready(metrics)
    return {"step_s": (time.perf_counter() - t0) / steps, "peak": peak, "state": state_bytes, "opt": opt_bytes,
            "temp": m.temp_size_in_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps")
    ap.add_argument("--train-steps", type=int, default=3, help="timed train steps")
    ap.add_argument("--seq", type=int, default=128, help="train sequence length")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from gptj_jax import quantize
    from gptj_jax.config import GPTJConfig
    from gptj_jax.model import init_params

    config = GPTJConfig.preset("gptj-162m")
    f32 = init_params(config, jax.random.PRNGKey(0))
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32)
    q8 = quantize.quantize_params(bf16)
    MiB = 2**20
    load = os.getloadavg()
    print(f"162M config ({config.num_params() / 1e6:.0f}M params), {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s), {os.cpu_count()} cores, load average {load[0]:.2f} at start\n")
    print("| weights | batch | decode tokens/s | weight bytes / step | KV cache bytes |")
    print("|---|---|---|---|---|")
    for name, params, dtype in (("float32", f32, jnp.float32), ("bfloat16", bf16, jnp.bfloat16),
                                ("int8 (bf16 compute)", q8, jnp.bfloat16)):
        for batch in (1, 16):
            tps, wbytes, cbytes = bench_decode(config, params, batch, args.steps, dtype)
            print(f"| {name} | {batch} | {tps:.1f} | {wbytes / MiB:.1f} MiB | {cbytes / MiB:.2f} MiB |", flush=True)
    print(f"\n| training (seq {args.seq}, batch 1, bf16 compute) | step time | trained + optimizer + base state | "
          "optimizer state | XLA temporaries | compiled peak |")
    print("|---|---|---|---|---|---|")
    for mode, label in (("full", "full fine-tuning"), ("lora", f"LoRA r={args.rank} (float32 base)"),
                        ("qlora", f"QLoRA r={args.rank} (int8 base)")):
        r = bench_train(config, mode, args.seq, args.train_steps, args.rank)
        print(f"| {label} | {r['step_s']:.2f} s | {r['state'] / MiB:.0f} MiB | {r['opt'] / MiB:.1f} MiB | "
              f"{r['temp'] / MiB:.0f} MiB | {r['peak'] / MiB:.0f} MiB |", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""Training throughput: our jitted train step vs transformers + torch.optim.AdamW, same model, same batch.

    python scripts/bench_train.py                      # 162M config, batch 4 x 256, float32; updates docs/benchmarks.md
    python scripts/bench_train.py --steps 3 --no-write

Both sides run a full optimizer step per batch: forward, backward, global-norm clip 1.0, Adam(W) with weight
decay. Ours is ``gptj_jax.train.step.make_train_step`` with the mesh-transformer-jax chain on one device;
theirs is ``GPTJForCausalLM`` (eager attention) with ``clip_grad_norm_`` and ``AdamW``. Model FLOPs per token are
``6 N + 12 n_layer n_embd seq`` (N without the embedding lookup), MFU is model FLOP/s over the float32 matmul
peak measured here on the spot (``[2048, 2048] @ [2048, 2048]`` in JAX). Prints a markdown table and writes it
under ``## Training`` in docs/benchmarks.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def setup_ours(config, batch: int, seq: int, remat: str):
    """A zero-argument callable running (and waiting for) one of our train steps, compiled and warmed up."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gptj_jax import sharding as sh
    from gptj_jax.train import step as step_lib
    from gptj_jax.train.optimizer import mtj_optimizer, mtj_schedule

    mesh = sh.make_mesh(devices=jax.devices()[:1])
    scfg = step_lib.StepConfig(config, "float32", remat=remat)
    sched = mtj_schedule(0, 1000, 1e-4, 1e-5)
    opt = mtj_optimizer(lr_schedule=sched, weight_decay=0.1)
    shardings = step_lib.state_shardings(scfg, mesh, opt, jnp.float32)
    state = step_lib.init_state(sh.init_sharded_params(config, mesh, jax.random.PRNGKey(0)), opt, 0, shardings)
    fn = step_lib.make_train_step(scfg, mesh, opt, sched, shardings)
    tokens = np.random.RandomState(0).randint(0, 50257, (1, batch, seq + 1)).astype(np.uint16)
    holder = {"state": state}

    def run() -> None:
        holder["state"], m = fn(holder["state"], tokens)
        jax.block_until_ready((holder["state"], m))

    run()  # compile + warm up
    return run


def setup_torch(config, batch: int, seq: int):
    """A zero-argument callable running one transformers GPTJForCausalLM + AdamW step, warmed up."""
    import numpy as np
    import torch
    import transformers

    d = config.to_hf_dict()
    d.pop("model_type")
    hf_cfg = transformers.GPTJConfig(**d)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.GPTJForCausalLM(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    tokens = torch.from_numpy(np.random.RandomState(0).randint(0, 50257, (batch, seq + 1)).astype(np.int64))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm up
    return step


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def write_section(path: str, section: str) -> None:
    """Replace (or append) the ``## Training`` section of ``path``, keeping every other section."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    pattern = re.compile(r"^## Training\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "gptj_jax", "presets", "gptj-162m.json"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="interleaved timed rounds (best of each reported)")
    parser.add_argument("--remat", default="none", help="our remat policy (none, dots, full)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    from gptj_jax.config import GPTJConfig
    from gptj_jax.losses import train_flops_per_token
    from gptj_jax.train.loop import measure_peak_flops

    config = GPTJConfig.from_pretrained(args.config)
    tokens = args.batch * args.seq
    flops = train_flops_per_token(config, args.seq) * tokens
    ours = setup_ours(config, args.batch, args.seq, args.remat)
    theirs = setup_torch(config, args.batch, args.seq)
    # Interleaved rounds (peak, ours, theirs), best of each: on a shared machine the load changes from minute to
    # minute, and the fastest sample of each is the one least disturbed by it.
    peaks, t_ours, t_torch = [], [], []
    for r in range(args.steps):
        peaks.append(measure_peak_flops(jnp.float32, 2048, seconds=1.0))
        t_ours.append(timed(ours))
        t_torch.append(timed(theirs))
        print(f"round {r + 1}/{args.steps}: peak {peaks[-1] / 1e9:.1f} GFLOP/s, ours {t_ours[-1]:.2f} s, "
              f"transformers {t_torch[-1]:.2f} s", flush=True)
    peak, t_ours, t_torch = max(peaks), min(t_ours), min(t_torch)

    rows = [
        ("gptj-jax train step (jit, mtj chain)", t_ours),
        ("transformers + torch.optim.AdamW", t_torch),
    ]
    name = os.path.basename(args.config).removesuffix(".json")
    lines = [
        "## Training",
        "",
        f"`python scripts/bench_train.py`: one optimizer step (forward, backward, clip 1.0, Adam with weight decay) of "
        f"{name} (n_embd {config.n_embd}, n_layer {config.n_layer}, {config.num_params() / 1e6:.0f}M params) on a "
        f"batch of {args.batch} x {args.seq} tokens, float32; {args.steps} interleaved rounds of (peak, our step, their step) after a warm-up step, "
        f"best of each reported (the machine is shared, so the fastest sample is the least disturbed). "
        f"Model FLOPs {flops / 1e9:.1f} GFLOP per step (6 N + 12 L d T per token). Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads).",
        "",
        f"Float32 matmul peak measured on the spot (JAX, 2048^3): **{peak / 1e9:.1f} GFLOP/s**.",
        "",
        "| implementation | step time (s) | tokens/s | model GFLOP/s | MFU (of measured peak) |",
        "|---|---|---|---|---|",
    ]
    for label, t in rows:
        lines.append(f"| {label} | {t:.3f} | {tokens / t:.0f} | {flops / t / 1e9:.1f} | {flops / t / peak:.1%} |")
    lines += ["", f"Ratio gptj-jax / transformers (tokens/s): **{t_torch / t_ours:.2f}x**.", ""]
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_write:
        write_section(os.path.join(ROOT, "docs", "benchmarks.md"), section)
        print("updated docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

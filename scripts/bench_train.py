"""Training throughput: our jitted train step vs transformers + torch.optim.AdamW, same model, same batch.

    python scripts/bench_train.py                      # 162M config, batch 4 x 256, float32; updates docs/benchmarks.md
    python scripts/bench_train.py --steps 3 --no-write
    python scripts/bench_train.py --profile --no-write # also: where each step spends its time, per op class
    python scripts/bench_train.py --loss-block-size 0 --also-block-size 8192 --profile --floor  # as in the docs

Both sides run a full optimizer step per batch: forward, backward, global-norm clip 1.0, Adam(W) with weight
decay. Ours is ``gptj_jax.train.step.make_train_step`` with the mesh-transformer-jax chain on one device (the
train config's default ``loss_block_size`` unless ``--loss-block-size``); theirs is ``GPTJForCausalLM`` (eager
attention) with ``clip_grad_norm_`` and ``AdamW``. Model FLOPs per token are ``6 N + 12 n_layer n_embd seq`` (N
without the embedding lookup), MFU is model FLOP/s over the float32 matmul peak measured here on the spot
(``[2048, 2048] @ [2048, 2048]`` in JAX). Rounds interleave (peak, ours, theirs); the **median** of each is
reported, with the ratio within each round (the machine is shared: the load, from ``os.getloadavg``, is noted).
Prints a markdown table and writes it under ``## Training step vs PyTorch`` in docs/benchmarks.md (other sections
are kept).

``--floor`` (our main row's loss must be ``--loss-block-size 0``: no dot in a loop): the dots of our compiled step
read from its HLO, as GEMMs ``[batch, M, K] @ [batch, K, N]`` with row-major operands, each shape timed alone in
JAX (XLA:CPU) and torch; their sum is the step's matmul time at each library's best, so the MFU either could
reach if nothing else took time.

``--profile``: ours from a ``jax.profiler`` trace (one event per XLA:CPU thunk, mapped to its HLO instruction
in the compiled module and classed by what it computes), theirs from ``torch.profiler`` (self CPU time per aten
op, classed by op name and input shapes); both averaged over the profiled steps.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SECTION = "## Training step vs PyTorch"


def setup_ours(config, batch: int, seq: int, remat: str, loss_block_size: int):
    """(run, compiled HLO text): ``run()`` runs (and waits for) one of our train steps, compiled and warmed up."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gptj_jax import sharding as sh
    from gptj_jax.train import step as step_lib
    from gptj_jax.train.optimizer import mtj_optimizer, mtj_schedule

    mesh = sh.make_mesh(devices=jax.devices()[:1])
    scfg = step_lib.StepConfig(config, "float32", remat=remat, loss_block_size=loss_block_size)
    sched = mtj_schedule(0, 1000, 1e-4, 1e-5)
    opt = mtj_optimizer(lr_schedule=sched, weight_decay=0.1)
    shardings = step_lib.state_shardings(scfg, mesh, opt, jnp.float32)
    state = step_lib.init_state(sh.init_sharded_params(config, mesh, jax.random.PRNGKey(0)), opt, 0, shardings)
    fn = step_lib.make_train_step(scfg, mesh, opt, sched, shardings)
    tokens = np.random.RandomState(0).randint(0, 50257, (1, batch, seq + 1)).astype(np.uint16)
    hlo = fn.lower(state, tokens).compile().as_text()
    holder = {"state": state}

    def run() -> None:
        holder["state"], m = fn(holder["state"], tokens)
        jax.block_until_ready((holder["state"], m))

    run()  # compile + warm up
    return run, hlo


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


# ---------------------------------------------------------------------------------------- profiles
CLASSES = (
    "matmul: dense (q/k/v/out, fc_in/fc_out), fwd",
    "matmul: dense, bwd (dx and dW)",
    "matmul: lm_head (vocab), fwd+bwd",
    "matmul: attention (q k^T, p v), fwd+bwd",
    "softmax / cross entropy over the vocabulary",
    "attention softmax, mask",
    "LayerNorm, GELU, rotary, residual (elementwise)",
    "optimizer (clip, Adam, weight decay)",
    "copies / transposes / casts",
    "other",
)


def _hlo_index(hlo: str) -> tuple[dict, dict]:
    """(instruction name -> (opcode, result shape, called computation, op_name), computation -> its body text)."""
    instrs, comps, current = {}, {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m and not line.startswith(" "):
            current = m.group(1)
            comps[current] = []
            continue
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(", line)
        if m and current is not None:
            comps[current].append(line)
            called = re.search(r"calls=%([\w.\-]+)", line)
            op_name = re.search(r'op_name="([^"]*)"', line)
            instrs[m.group(1)] = (m.group(3), m.group(2), called.group(1) if called else None,
                                  op_name.group(1) if op_name else "")
    return instrs, comps


def _dims(shape: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", shape.split("[", 1)[1].split("]", 1)[0])] if "[" in shape else []


def _jax_class(name: str, instrs: dict, comps: dict, vocab: int, seq: int) -> str:
    """The op class of one compiled instruction, from its op_name (the module path: ``transformer/h_3/attn/...``,
    ``jvp`` in the forward, ``transpose(jvp)`` in the backward, neither in the optimizer), what it computes and
    its shapes."""
    opcode, shape, called, op_name = instrs[name]
    body = comps.get(called, []) if called else []
    names = op_name or " ".join(re.findall(r'op_name="([^"]*)"', "\n".join(body)))
    text = "\n".join(body) or f"{opcode}({shape})"
    if "jvp(" not in names:
        return CLASSES[7]  # after the gradient: clip, Adam, weight decay, the update
    is_dot = opcode in ("dot", "convolution") or " dot(" in text or " convolution(" in text
    in_model = "transformer/" in names
    if is_dot:
        if not in_model:
            return CLASSES[2]  # the lm_head (full or in vocabulary blocks)
        if re.search(r"BN[TS][SH],", names):
            return CLASSES[3]
        return CLASSES[1] if "transpose(" in names else CLASSES[0]
    if not in_model:
        return CLASSES[4]
    if opcode in ("copy", "transpose", "convert") or (
        body and all(re.search(r" (parameter|copy|transpose|convert|bitcast|reshape)\(", ln) for ln in body)
    ):
        return CLASSES[8]
    if "attn" in names and re.search(rf"[\[,]{seq},{seq}\]", text):
        return CLASSES[5]
    return CLASSES[6]


def profile_ours(run, hlo: str, vocab: int, seq: int, steps: int) -> dict:
    """Milliseconds per step by class, from a jax.profiler trace of ``steps`` steps (thunk events on the CPU)."""
    import jax

    instrs, comps = _hlo_index(hlo)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        (path,) = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    out = collections.Counter()
    for e in events:
        # while / call / conditional thunks contain the thunks of their bodies: count the bodies only
        if e.get("ph") == "X" and e.get("name") in instrs and instrs[e["name"]][0] not in ("while", "call", "conditional"):
            out[_jax_class(e["name"], instrs, comps, vocab, seq)] += e.get("dur", 0) / 1e3 / steps
    return dict(out)


def _torch_class(name: str, shapes: list, vocab: int, seq: int, parents: str) -> str:
    """The op class of one aten op, from its name, input shapes and the record_function ranges above it."""
    flat = [d for sh in shapes if isinstance(sh, (list, tuple)) for d in sh]
    if "Optimizer" in parents or "clip_grad" in parents or name.startswith("aten::_foreach"):
        return CLASSES[7]
    backward = "autograd::engine" in parents
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::baddbmm", "aten::linear"):
        if vocab in flat:
            return CLASSES[2]
        if name in ("aten::bmm", "aten::baddbmm"):
            return CLASSES[3]
        return CLASSES[1] if backward else CLASSES[0]
    if vocab in flat or "log_softmax" in name or "nll_loss" in name:
        return CLASSES[4]
    if "softmax" in name or flat.count(seq) >= 2:
        return CLASSES[5]
    if name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::to", "aten::_to_copy", "aten::t",
                "aten::transpose", "aten::permute", "aten::view", "aten::reshape", "aten::_unsafe_view"):
        return CLASSES[8]
    return CLASSES[6]


def profile_torch(step, vocab: int, seq: int, steps: int) -> dict:
    """Milliseconds per step by class, from torch.profiler (self CPU time of each aten op)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    out = collections.Counter()
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        parents, p = [], e.cpu_parent
        while p is not None:
            parents.append(p.name)
            p = p.cpu_parent
        out[_torch_class(e.name, e.input_shapes or [], vocab, seq, " ".join(parents))] += e.self_cpu_time_total / 1e3 / steps
    return dict(out)


# ---------------------------------------------------------------------------------------- matmul floor
_DOT = re.compile(r"= (\w+)\[[\d,]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)$")


def _dims_of(attrs: str, key: str) -> tuple[int, ...]:
    m = re.search(key + r"=\{([\d,]*)\}", attrs)
    return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()


def step_dots(hlo: str) -> collections.Counter:
    """The dots of a compiled step without loops: ``Counter`` of (dtype, lhs shape, rhs shape, dimension
    numbers ((lhs contracting, rhs contracting), (lhs batch, rhs batch))) -> how many times the step runs it."""
    instrs, comps = _hlo_index(hlo)
    looped, todo = set(), re.findall(r" while\(.*?body=%([\w.\-]+)", hlo)
    while todo:  # the computations a loop runs: its body and what the body calls
        name = todo.pop()
        if name not in looped:
            looped.add(name)
            todo += re.findall(r"(?:calls|body|to_apply)=%([\w.\-]+)", "\n".join(comps.get(name, [])))
    if any(" dot(" in line for name in looped for line in comps.get(name, [])):
        raise ValueError("a dot runs in a loop (blockwise loss or scan_layers): its trip count is not counted")
    out = collections.Counter()
    for line in hlo.splitlines():
        m = _DOT.search(line)
        if m:
            attrs = m.group(4)
            dims = ((_dims_of(attrs, "lhs_contracting_dims"), _dims_of(attrs, "rhs_contracting_dims")),
                    (_dims_of(attrs, "lhs_batch_dims"), _dims_of(attrs, "rhs_batch_dims")))
            lhs, rhs = (tuple(_dims(instrs[name][1])) for name in (m.group(2), m.group(3)))
            out[(m.group(1), lhs, rhs, dims)] += 1
    return out


def _gemm_of(lhs: tuple, rhs: tuple, dims: tuple) -> tuple[int, int, int, int]:
    """(batch, M, K, N) of a dot_general: the same FLOPs as one ``[batch, M, K] @ [batch, K, N]``."""
    (lc, rc), (lb, rb) = dims
    batch = math.prod(lhs[i] for i in lb)
    k = math.prod(lhs[i] for i in lc)
    m = math.prod(d for i, d in enumerate(lhs) if i not in lc + lb)
    n = math.prod(d for j, d in enumerate(rhs) if j not in rc + rb)
    return batch, m, k, n


def _best_seconds(fn, *args, budget: float = 0.5, calls: int = 5) -> float:
    """The fastest of repeated calls ``fn(*args)`` after one warm-up: at least ``calls`` calls, and more within
    about ``budget`` seconds."""
    fn(*args)
    best, t_end = float("inf"), time.perf_counter() + budget
    for i in range(1000):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
        if i + 1 >= calls and time.perf_counter() > t_end:
            break
    return best


def matmul_floor(hlo: str) -> list[dict]:
    """The dots of our compiled step as GEMMs ``[batch, M, K] @ [batch, K, N]`` in row-major operands (the layout
    each library is fastest in; XLA picks the step's own layouts), each shape timed alone, in JAX (XLA:CPU) and
    in torch: the fastest call of each. A row per shape: the step's matmul work at each library's best."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    gemms = collections.Counter()
    for (dtype, lhs, rhs, dims), count in step_dots(hlo).items():
        gemms[(dtype, *_gemm_of(lhs, rhs, dims))] += count
    rows = []
    matmul = jax.jit(jnp.matmul)
    for (dtype, batch, m, k, n), count in sorted(gemms.items(), key=lambda kv: -math.prod(kv[0][1:]) * kv[1]):
        np_dtype = {"f32": np.float32, "f64": np.float64}[dtype]
        rng = np.random.RandomState(0)
        a, b = rng.randn(batch, m, k).astype(np_dtype), rng.randn(batch, k, n).astype(np_dtype)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        t_jax = _best_seconds(lambda x, y: matmul(x, y).block_until_ready(), ja, jb)
        t_torch = _best_seconds(torch.matmul, torch.from_numpy(a), torch.from_numpy(b))
        rows.append({"dot": f"[{batch}, {m}, {k}] @ [{batch}, {k}, {n}]", "count": count, "flops": 2 * batch * m * k * n,
                     "jax": t_jax, "torch": t_torch})
    return rows


def floor_lines(rows: list[dict], flops: float, m_ours: float, m_torch: float, peak: float) -> list[str]:
    """The ``--floor`` table and what it bounds."""
    t_jax = sum(r["count"] * r["jax"] for r in rows)
    t_torch = sum(r["count"] * r["torch"] for r in rows)
    dot_flops = sum(r["count"] * r["flops"] for r in rows)
    lines = [
        f"Matmul floor (`--floor`): the dots of our compiled step ({sum(r['count'] for r in rows)} per step, "
        f"{dot_flops / 1e9:.1f} GFLOP) as {len(rows)} GEMM shapes `[batch, M, K] @ [batch, K, N]` with row-major "
        f"operands, each timed alone with random inputs (fastest call after a warm-up) in JAX (XLA:CPU) and in "
        f"torch (`torch.matmul`, {__import__('torch').get_num_threads()} threads).",
        "",
        "| GEMM | calls per step | GFLOP per call | XLA:CPU ms (GFLOP/s) | torch ms (GFLOP/s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| `{r['dot']}` | {r['count']} | {r['flops'] / 1e9:.2f} | {r['jax'] * 1e3:.1f} "
                     f"({r['flops'] / r['jax'] / 1e9:.0f}) | {r['torch'] * 1e3:.1f} ({r['flops'] / r['torch'] / 1e9:.0f}) |")
    lines += [
        f"| all dots of one step | | {dot_flops / 1e9:.1f} | {t_jax * 1e3:.0f} ({dot_flops / t_jax / 1e9:.0f}) | "
        f"{t_torch * 1e3:.0f} ({dot_flops / t_torch / 1e9:.0f}) |",
        "",
        f"The step's matmuls alone, back to back at their fastest, take {t_jax:.2f} s in XLA:CPU and {t_torch:.2f} s in "
        f"torch: with XLA:CPU's dots our step can reach at most {flops / t_jax / peak:.0%} of the median peak "
        f"({flops / t_torch / peak:.0%} with torch's), before any non-matmul work. Our median step is "
        f"{m_ours / t_jax:.2f}x its matmul floor; Transformers' is {m_torch / t_torch:.2f}x the torch floor.",
        "",
    ]
    return lines


def write_section(path: str, section: str) -> None:
    """Replace (or append) the section of ``path`` headed by ``section``'s first line, keeping every other one."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    heading = section.splitlines()[0]
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "gptj_jax", "presets", "gptj-162m.json"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=7, help="interleaved timed rounds (the median is reported)")
    parser.add_argument("--remat", default="none", help="our remat policy (none, dots, full)")
    parser.add_argument("--loss-block-size", type=int, default=None,
                        help="our loss_block_size (default: the train config's; 0: full logits)")
    parser.add_argument("--also-block-size", type=int, default=None,
                        help="also time ours with this loss_block_size in the same rounds (a third row)")
    parser.add_argument("--profile", action="store_true", help="also profile both steps and print ms per op class")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--floor", action="store_true",
                        help="also time each dot of our step alone (XLA:CPU and torch): the matmul floor of the step")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    from gptj_jax.config import GPTJConfig
    from gptj_jax.losses import train_flops_per_token
    from gptj_jax.train.config import TrainConfig
    from gptj_jax.train.loop import measure_peak_flops

    block = TrainConfig.__dataclass_fields__["loss_block_size"].default if args.loss_block_size is None else args.loss_block_size
    config = GPTJConfig.from_pretrained(args.config)
    tokens = args.batch * args.seq
    flops = train_flops_per_token(config, args.seq) * tokens
    load_before = os.getloadavg()
    ours, hlo = setup_ours(config, args.batch, args.seq, args.remat, block)
    other = None if args.also_block_size is None else setup_ours(config, args.batch, args.seq, args.remat,
                                                                   args.also_block_size)[0]
    theirs = setup_torch(config, args.batch, args.seq)
    # Interleaved rounds (peak, ours, theirs): on a shared machine the load changes from minute to minute; the
    # median of each and the ratio within each round are reported.
    peaks, t_ours, t_torch, t_other = [], [], [], []
    for r in range(args.steps):
        peaks.append(measure_peak_flops(jnp.float32, 2048, seconds=1.0))
        t_ours.append(timed(ours))
        if other is not None:
            t_other.append(timed(other))
            print(f"round {r + 1}: ours with loss_block_size {args.also_block_size}: {t_other[-1]:.3f} s", flush=True)
        t_torch.append(timed(theirs))
        print(f"round {r + 1}/{args.steps}: peak {peaks[-1] / 1e9:.1f} GFLOP/s, ours {t_ours[-1]:.3f} s, "
              f"transformers {t_torch[-1]:.3f} s, ratio {t_torch[-1] / t_ours[-1]:.2f}x, "
              f"ours {flops / t_ours[-1] / peaks[-1]:.1%} of that round's peak", flush=True)
    load_after = os.getloadavg()
    ratios = [b / a for a, b in zip(t_ours, t_torch)]
    mfus = [flops / a / p for a, p in zip(t_ours, peaks)]
    peak, m_ours, m_torch = statistics.median(peaks), statistics.median(t_ours), statistics.median(t_torch)

    rows = [
        (f"gptj-jax train step (jit, mtj chain, loss_block_size {block})", m_ours),
        ("transformers + torch.optim.AdamW", m_torch),
    ]
    if other is not None:
        rows.insert(1, (f"gptj-jax train step, loss_block_size {args.also_block_size}", statistics.median(t_other)))
    name = os.path.basename(args.config).removesuffix(".json")
    lines = [
        SECTION,
        "",
        f"`python scripts/bench_train.py`: one optimizer step (forward, backward, clip 1.0, Adam with weight decay) of "
        f"{name} (n_embd {config.n_embd}, n_layer {config.n_layer}, {config.num_params() / 1e6:.0f}M params) on a "
        f"batch of {args.batch} x {args.seq} tokens, float32; {args.steps} interleaved rounds of (peak, our step, "
        f"their step) after a warm-up step, **median** of each reported. "
        f"Model FLOPs {flops / 1e9:.1f} GFLOP per step (6 N + 12 L d T per token). Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, shared (load average {load_before[0]:.1f} before, {load_after[0]:.1f} after), "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads).",
        "",
        f"Float32 matmul peak measured on the spot (JAX, 2048^3), median: **{peak / 1e9:.1f} GFLOP/s**.",
        "",
        "| implementation | median step time (s) | tokens/s | model GFLOP/s | MFU (of median peak) |",
        "|---|---|---|---|---|",
    ]
    for label, t in rows:
        lines.append(f"| {label} | {t:.3f} | {tokens / t:.0f} | {flops / t / 1e9:.1f} | {flops / t / peak:.1%} |")
    lines += [
        "",
        f"Ratio gptj-jax / transformers (tokens/s), median of the medians: **{m_torch / m_ours:.2f}x**; "
        f"within each round: {', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f}x). "
        f"Ours as a share of the same round's peak: {', '.join(f'{x:.0%}' for x in mfus)} "
        f"(median {statistics.median(mfus):.1%}).",
        "",
    ]
    if other is not None:
        lines[-1:-1] = [
            f"Ours with loss_block_size {args.also_block_size} / ours with {block}, within each round: "
            + ", ".join(f"{a / b:.2f}" for a, b in zip(t_ours, t_other)) + ". "
            f"Ours with loss_block_size {args.also_block_size} / transformers (tokens/s), within each round: "
            + ", ".join(f"{b / a:.2f}" for a, b in zip(t_other, t_torch))
            + f" (median {statistics.median([b / a for a, b in zip(t_other, t_torch)]):.2f}x).",
            "",
        ]
    if args.profile:
        p_ours = profile_ours(ours, hlo, config.vocab_size, args.seq, args.profile_steps)
        p_torch = profile_torch(theirs, config.vocab_size, args.seq, args.profile_steps)
        lines += [
            f"Profile (`--profile`, {args.profile_steps} steps each; ours: jax.profiler thunk events mapped to the "
            f"compiled HLO; theirs: torch.profiler self CPU time of aten ops), ms per step:",
            "",
            "| op class | gptj-jax (ms) | transformers + torch (ms) |",
            "|---|---|---|",
        ]
        for cls in CLASSES:
            lines.append(f"| {cls} | {p_ours.get(cls, 0.0):.0f} | {p_torch.get(cls, 0.0):.0f} |")
        lines.append(f"| total (profiled) | {sum(p_ours.values()):.0f} | {sum(p_torch.values()):.0f} |")
        lines.append("")
    print("\n".join(lines), flush=True)
    if args.floor:
        floor = floor_lines(matmul_floor(hlo), flops, m_ours, m_torch, peak)
        print("\n".join(floor), flush=True)
        lines += floor
    section = "\n".join(lines) + "\n"
    if not args.no_write:
        write_section(os.path.join(ROOT, "docs", "benchmarks.md"), section)
        print("updated docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

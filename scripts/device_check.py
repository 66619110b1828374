"""One accelerator check (GPU or TPU VM, < 8 minutes on one GPU): attention error, inference speed against the
memory-bandwidth floor, training MFU, compile time. ``--small`` runs it end to end on CPU with tiny shapes.

    python scripts/device_check.py            # on a GPU / TPU host
    JAX_PLATFORMS=cpu python scripts/device_check.py --small

Prints four Markdown tables:

1. attention: max error of each implementation the backend runs (GPU: ``cudnn``; TPU: ``splash``,
   ``pallas_flash``; CPU ``--small``: both Pallas kernels in interpret mode and ``dot_product_attention``'s
   xla implementation) against ``xla`` (``model.attend`` in float32 on the same bfloat16-rounded inputs) on
   GPT-J-6B shapes: B 2, S 2048, 16 heads, head dim 256, rotary 64, row 1 left-padded by 300; real rows only.
2. inference: prefill (a 2048-token prompt... ``--prefill`` tokens) and decode tokens/s at batch 1, 16, 64
   for a GPT-J-6B-shaped model with 4 layers, bfloat16 weights and cache (int8 weights are not in this
   package yet), with the memory-bandwidth floor of a decode step (weight + cache bytes over the device's
   bandwidth) and measured / floor.
3. train: the training step's MFU at GPT-J-6B width (4 layers, seq 2048, bf16 compute, float32 params, SGD)
   per attention implementation and remat policy (model FLOPs from ``losses.train_flops_per_token``).
4. compile: AOT compile seconds of that train step, unrolled vs ``scan_layers``.

Peak FLOP/s and bandwidth come from :data:`DEVICES` by ``device_kind`` (n/a for unknown devices, e.g. CPU).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

# device_kind substring -> (peak dense bf16 FLOP/s, HBM bytes/s), from the vendors' data sheets.
DEVICES = {
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.0e12),
    "L4": (121e12, 0.3e12),
    "TPU v5 lite": (197e12, 819e9),
    "TPU v5e": (197e12, 819e9),
    "TPU v5p": (459e12, 2.76e12),
    "TPU v5": (459e12, 2.76e12),
    "TPU v4": (275e12, 1.2e12),
    "TPU v6": (918e12, 1.64e12),
}


def device_peak() -> tuple[Optional[float], Optional[float], str]:
    kind = jax.devices()[0].device_kind
    for key, (flops, bw) in DEVICES.items():
        if key.lower() in kind.lower():
            return flops, bw, kind
    return None, None, kind


def _time(fn, *args, repeats: int = 3) -> float:
    """Best wall seconds of ``fn(*args)`` (compiled first), blocking on the result."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------------------- 1. attention
def attention_errors(small: bool) -> list[tuple[str, float]]:
    from gptj_jax import model as M

    B, T, N, H, R, pad = (2, 256, 4, 256, 64, 40) if small else (2, 2048, 16, 256, 64, 300)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.bfloat16) for _ in range(3))
    mask = np.ones((B, T), np.int32)
    mask[1, :pad] = 0
    pos = jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0))
    sin, cos = M.rotary_sin_cos(pos, R)
    q = M.apply_rotary(q.astype(jnp.float32), sin, cos).astype(jnp.bfloat16)
    k = M.apply_rotary(k.astype(jnp.float32), sin, cos).astype(jnp.bfloat16)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    allowed = jnp.asarray(mask[:, None, :].astype(bool) & (np.arange(T)[None, :] <= np.arange(T)[:, None])[None])
    ref = jax.jit(lambda q, k, v: M.attend(q, k, v, allowed)[0])(*(x.astype(jnp.float32) for x in (q, k, v)))
    seg = jnp.asarray(mask)
    backend = jax.default_backend()
    impls = {"gpu": ["cudnn"], "tpu": ["splash", "pallas_flash"]}.get(backend, ["splash", "pallas_flash", "cudnn"])
    real = mask.astype(bool)[:, :, None, None]
    rows = []
    for impl in impls:
        cpu = backend == "cpu"
        fn = jax.jit(lambda q, k, v, impl=impl, cpu=cpu: M.fused_attend(
            q, k, v, seg, seg, impl, interpret=cpu, dpa_implementation="xla" if cpu else "cudnn"))
        try:
            out = fn(q, k, v).astype(jnp.float32)
            err = float(np.max(np.where(real, np.abs(np.asarray(out) - np.asarray(ref)), 0)))
            rows.append((impl + (" (interpret / dpa xla)" if cpu else ""), err))
        except Exception as e:  # the table says which kernel failed and why
            rows.append((f"{impl}: failed ({str(e).splitlines()[0][:100]})", float("nan")))
        print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------------------- 2. inference
def inference(small: bool, bandwidth: Optional[float]) -> list[dict[str, Any]]:
    from gptj_jax.cache import cache_bytes
    from gptj_jax.config import GPTJConfig
    from gptj_jax.generation import decode_step, prefill
    from gptj_jax.model import init_params

    cfg = GPTJConfig(n_layer=4) if not small else GPTJConfig(n_layer=2, n_embd=256, n_head=2, vocab_size=1024)
    prompt, slots = (2048, 2048 + 64) if not small else (64, 80)
    params = jax.jit(lambda k: jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params(cfg, k)))(jax.random.PRNGKey(0))
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    rows = []
    for batch in (1, 16, 64) if not small else (1, 4):
        ids = jnp.ones((batch, prompt), jnp.int32)
        mask = jnp.ones((batch, prompt), jnp.int32)
        t_pre = _time(lambda ids=ids, mask=mask: prefill(params, ids, mask, config=cfg, cache_len=slots, dtype=jnp.bfloat16),
                      repeats=2)
        _, cache = prefill(params, ids, mask, config=cfg, cache_len=slots, dtype=jnp.bfloat16)
        tok = jnp.ones((batch,), jnp.int32)
        state = {"cache": cache}

        def one_step(state=state, tok=tok):
            logits, state["cache"] = decode_step(params, state["cache"], tok, config=cfg, dtype=jnp.bfloat16)
            return logits

        t_dec = _time(one_step, repeats=5)
        step_bytes = weight_bytes + cache_bytes(cfg, batch, slots, jnp.bfloat16)
        floor = step_bytes / bandwidth if bandwidth else None
        rows.append(dict(batch=batch, prefill_tps=batch * prompt / t_pre, decode_tps=batch / t_dec,
                         step_ms=t_dec * 1e3, floor_ms=floor * 1e3 if floor else None,
                         ratio=t_dec / floor if floor else None, gib=step_bytes / 2**30))
        print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------------------- 3./4. train
def _train_step(cfg, remat: str, batch: int, seq: int):
    import optax

    from gptj_jax import sharding as sh
    from gptj_jax.train import step as train_step

    mesh = sh.make_mesh(devices=jax.devices()[:1])
    scfg = train_step.StepConfig(model=cfg, dtype="bfloat16", remat=remat)
    opt = optax.sgd(1e-4)
    shardings = train_step.state_shardings(scfg, mesh, opt, jnp.float32)
    step = train_step.make_train_step(scfg, mesh, opt, optax.constant_schedule(1e-4), shardings)
    tokens = jax.ShapeDtypeStruct((1, batch, seq + 1), jnp.int32, sharding=train_step.batch_spec_sharding(mesh))
    return step, train_step, shardings, opt, tokens, scfg, mesh


def train_mfu(small: bool, peak: Optional[float], impls: list[str], remats: list[str]) -> list[dict[str, Any]]:
    from gptj_jax.config import GPTJConfig
    from gptj_jax.losses import train_flops_per_token
    from gptj_jax.model import init_params

    base = GPTJConfig(n_layer=4) if not small else GPTJConfig(n_layer=2, n_embd=256, n_head=2, vocab_size=1024, n_positions=256)
    seq, batch = (2048, 1) if not small else (128, 2)
    host = None
    rows = []
    for impl in impls:
        for remat in remats:
            cfg = base.replace(attention=impl)
            try:
                step, train_step, shardings, opt, tokens, _, _ = _train_step(cfg, remat, batch, seq)
                if host is None:
                    host = init_params(base, jax.random.PRNGKey(0))
                params = jax.device_put(jax.tree.map(jnp.copy, host), shardings["params"])
                state = train_step.init_state(params, opt, 0, shardings)
                data = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, tokens.shape), jnp.int32)
                state, _ = step(state, data)  # compile + warm up
                jax.block_until_ready(state)
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    state, metrics = step(state, data)
                    jax.block_until_ready(metrics["loss"])
                    times.append(time.perf_counter() - t0)
                t = min(times)
                flops = train_flops_per_token(cfg, seq) * batch * seq
                rows.append(dict(impl=impl, remat=remat, step_ms=t * 1e3, tflops=flops / t / 1e12,
                                 mfu=flops / t / peak if peak else None, loss=float(metrics["loss"])))
                del state
            except Exception as e:  # e.g. a kernel this backend lacks: reported, the rest still runs
                rows.append(dict(impl=impl, remat=remat, error=str(e).splitlines()[0][:100]))
            print(rows[-1], flush=True)
    return rows


def compile_times(small: bool) -> list[tuple[str, float, float]]:
    from gptj_jax.config import GPTJConfig
    from gptj_jax.train import step as train_step_lib

    base = GPTJConfig(n_layer=28) if not small else GPTJConfig(n_layer=6, n_embd=256, n_head=2, vocab_size=1024, n_positions=256)
    seq = 2048 if not small else 128
    out = []
    for scan in (False, True):
        cfg = base.replace(scan_layers=scan)
        step, _, _, opt, tokens, scfg, mesh = _train_step(cfg, "dots", 1, seq)
        state = train_step_lib.abstract_state(scfg, mesh, opt, jnp.float32)
        t0 = time.perf_counter()
        step.lower(state, tokens).compile()
        out.append(("scan_layers" if scan else "unrolled", base.n_layer, time.perf_counter() - t0))
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes, runs on CPU (Pallas kernels interpreted)")
    ap.add_argument("--sections", default="attention,inference,train,compile")
    args = ap.parse_args()
    sections = args.sections.split(",")
    t_start = time.perf_counter()
    peak, bw, kind = device_peak()
    backend = jax.default_backend()
    print(f"device: {kind} ({backend}), jax {jax.__version__}; peak {peak or 'n/a'} FLOP/s, HBM {bw or 'n/a'} B/s"
          f"{'; --small shapes' if args.small else ''}", flush=True)
    if backend == "cpu" and not args.small:
        raise SystemExit("device_check: no accelerator (backend cpu): run with --small, or on a GPU / TPU host")

    if "attention" in sections:
        rows = attention_errors(args.small)
        print("\n| attention | max error vs xla (real rows) |\n|---|---:|")
        for name, err in rows:
            print(f"| {name} | {err:.3g} |")
    if "inference" in sections:
        rows = inference(args.small, bw)
        print("\n| batch | prefill tok/s | decode tok/s | decode step (ms) | weights + cache (GiB) | floor (ms) | step / floor |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            floor = f"{r['floor_ms']:.2f}" if r["floor_ms"] else "n/a"
            ratio = f"{r['ratio']:.2f}" if r["ratio"] else "n/a"
            print(f"| {r['batch']} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | {r['step_ms']:.2f} | {r['gib']:.2f} "
                  f"| {floor} | {ratio} |")
    if "train" in sections:
        impls = {"gpu": ["xla", "cudnn"], "tpu": ["xla", "splash", "pallas_flash"]}.get(backend, ["xla"])
        rows = train_mfu(args.small, peak, impls, ["none", "dots", "full"])
        print("\n| attention | remat | step (ms) | model TFLOP/s | MFU |\n|---|---|---:|---:|---:|")
        for r in rows:
            if "error" in r:
                print(f"| {r['impl']} | {r['remat']} | failed: {r['error']} | | |")
            else:
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
                print(f"| {r['impl']} | {r['remat']} | {r['step_ms']:.1f} | {r['tflops']:.2f} | {mfu} |")
    if "compile" in sections:
        rows = compile_times(args.small)
        print("\n| train step (remat dots) | layers | compile (s) |\n|---|---:|---:|")
        for name, layers, s in rows:
            print(f"| {name} | {layers} | {s:.1f} |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

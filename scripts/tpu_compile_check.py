"""TPU programs checked without a TPU: deviceless AOT compiles through libtpu (``jax.experimental.topologies``).

Needs a Python with ``jax[tpu]`` and libtpu (not the project's venv), run on a CPU host::

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 PYTHONPATH=. /work/tpuvenv/bin/python scripts/tpu_compile_check.py

Prints three Markdown tables:

1. ``kernels``: the Pallas kernels (``splash``, ``pallas_flash``) through ``model.fused_attend`` lower and
   compile with Mosaic for GPT-J-6B's attention shapes (B 2, S 2048, 16 heads, head dim 256, bfloat16),
   forward and backward, on v5e and v4 topologies (one chip), with XLA:TPU's temporaries.
2. ``train``: the training step (``gptj_jax.train.step``; SGD so the optimizer state does not dominate,
   bfloat16 params and compute) of a GPT-J-6B-width model with ``--layers`` blocks at seq 2048, batch 1
   and 4, per attention implementation and remat policy: XLA:TPU's temporaries on one v5e chip.
3. ``decode``: GPT-J-6B's decode step (28 layers, bfloat16 weights and a 2048-slot bfloat16 cache, the
   program ``generate`` runs, cache donated) at batch 1 and 4, unrolled and ``scan_layers``: XLA's
   ``bytes accessed`` against weights + cache read once, and the HLO's copies of cache-sized buffers
   (a real copy) next to its in-place dynamic-update-slices (accounted as a full read + write of the
   buffer by the cost model, though the update touches one slot).
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

GiB = 2**30
MiB = 2**20


def tpu_mesh(topology: str) -> Mesh:
    """A one-chip ``("dp", "fsdp", "mp")`` mesh of the first device of an abstract TPU topology."""
    bounds = {"v5e:1x1": (1, 1, 1), "v4:2x2x1": (2, 2, 1)}[topology]
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology, chips_per_host_bounds=bounds)
    return Mesh(np.array(topo.devices[:1]).reshape(1, 1, 1), ("dp", "fsdp", "mp"))


def kernels(topologies_: list[str]) -> list[dict[str, Any]]:
    from gptj_jax import model as M

    B, T, N, H = 2, 2048, 16, 256
    rows = []
    for topo in topologies_:
        mesh = tpu_mesh(topo)
        rep = NamedSharding(mesh, P())
        q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16, sharding=rep)
        kv = jax.ShapeDtypeStruct((B, N, T, H), jnp.bfloat16, sharding=rep)
        seg = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=rep)
        for impl in ("xla", "splash", "pallas_flash"):
            if impl == "xla":
                causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]

                def fwd(q, k, v, s, causal=causal):
                    allowed = s.astype(bool)[:, None, :] & causal[None]
                    return M.attend(q, k, v, allowed)[0]
            else:
                def fwd(q, k, v, s, impl=impl):
                    return M.fused_attend(q, k, v, s, s, impl)

            def bwd(q, k, v, s, fwd=fwd):
                return jax.grad(lambda q, k, v: fwd(q, k, v, s).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)

            for name, fn in (("forward", fwd), ("backward", bwd)):
                t0 = time.perf_counter()
                try:
                    compiled = jax.jit(fn).lower(q, kv, kv, seg).compile()
                    mosaic = "tpu_custom_call" in compiled.as_text()
                    rows.append(dict(topology=topo, impl=impl, program=name, ok="yes", mosaic=mosaic,
                                     temp=compiled.memory_analysis().temp_size_in_bytes / MiB,
                                     seconds=time.perf_counter() - t0))
                except Exception as e:  # reported in the table: a kernel that fails to compile is the finding
                    rows.append(dict(topology=topo, impl=impl, program=name, ok=f"no: {str(e).splitlines()[0][:120]}",
                                     mosaic=False, temp=float("nan"), seconds=time.perf_counter() - t0))
                print(rows[-1], flush=True)
    return rows


def train(layers: int, batches: list[int], impls: list[str], remats: list[str]) -> list[dict[str, Any]]:
    import optax

    from gptj_jax import model as M
    from gptj_jax.config import GPTJConfig
    from gptj_jax.train import step as train_step

    mesh = tpu_mesh("v5e:1x1")
    rows = []
    for batch in batches:
        for impl in impls:
            for remat in remats:
                cfg = GPTJConfig(n_layer=layers, attention=impl)
                scfg = train_step.StepConfig(model=cfg, dtype="bfloat16", remat=remat)
                opt = optax.sgd(1e-3)
                shardings = train_step.state_shardings(scfg, mesh, opt, jnp.bfloat16)
                state = train_step.abstract_state(scfg, mesh, opt, jnp.bfloat16)
                tokens = jax.ShapeDtypeStruct((1, batch, 2049), jnp.int32, sharding=train_step.batch_spec_sharding(mesh))
                t0 = time.perf_counter()
                with M.attention_backend("tpu"):
                    step = train_step.make_train_step(scfg, mesh, opt, optax.constant_schedule(1e-3), shardings)
                    compiled = step.lower(state, tokens).compile()
                mem = compiled.memory_analysis()
                rows.append(dict(batch=batch, impl=impl, remat=remat, temp=mem.temp_size_in_bytes / GiB,
                                 args=mem.argument_size_in_bytes / GiB, seconds=time.perf_counter() - t0))
                print(rows[-1], flush=True)
    return rows


def _cache_buffers(hlo: str, shape: str) -> dict[str, int]:
    """Counts, in optimized HLO text, of copies / dynamic-update-slices / scatters producing ``shape`` (and the
    ``copy-done``s of memory-space assignment's asynchronous copies of such a buffer, e.g. a write-back)."""
    out = {}
    for op in ("copy", "dynamic-update-slice", "scatter", "fusion", "copy-done"):
        out[op] = len(re.findall(rf"= {re.escape(shape)}\{{[^}}]*\}} {op}\(", hlo))
    return out


def decode(batches: list[int], layouts: list[str], layers: int = 28, hlo_dir: str = "/tmp") -> list[dict[str, Any]]:
    from gptj_jax import model as M
    from gptj_jax import sharding as sh
    from gptj_jax.cache import cache_bytes, init_cache
    from gptj_jax.config import GPTJConfig
    from gptj_jax.generation import forward_cached

    mesh = tpu_mesh("v5e:1x1")
    rows = []
    for scan in [layout == "scan_layers" for layout in layouts]:
        cfg = GPTJConfig(n_layer=layers, scan_layers=scan)
        params = sh.abstract_params(cfg, mesh, "causal_lm", jnp.bfloat16)
        weights = sum(np.prod(p.shape) * 2 for p in jax.tree.leaves(params))
        for batch in batches:
            cache_shape = jax.eval_shape(lambda cfg=cfg, batch=batch: init_cache(cfg, batch, 2048, jnp.bfloat16))
            cache_sh = sh.cache_shardings(cfg, mesh, cache_shape)
            cache = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), cache_shape, cache_sh)
            one = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=sh.batch_sharding(mesh, batch))

            def step(params, ids, cache, cfg=cfg):
                return forward_cached(params, ids, None, cache, config=cfg, dtype=jnp.bfloat16)

            t0 = time.perf_counter()
            with M.attention_backend("tpu"):
                compiled = jax.jit(step, donate_argnums=(2,)).lower(params, one, cache).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            accessed = float(cost.get("bytes accessed", 0.0))
            kv = cache_bytes(cfg, batch, 2048, jnp.bfloat16)
            hlo = compiled.as_text()
            layer_shape = f"bf16[{batch},16,2048,256]" if not scan else f"bf16[{layers},{batch},16,2048,256]"
            counts = _cache_buffers(hlo, layer_shape)
            mem = compiled.memory_analysis()
            rows.append(dict(scan=scan, batch=batch, weights=weights / GiB, cache=kv / GiB, floor=(weights + kv) / GiB,
                             accessed=accessed / GiB, ratio=accessed / (weights + kv), counts=counts,
                             temp=mem.temp_size_in_bytes / GiB, alias=mem.alias_size_in_bytes / GiB,
                             seconds=time.perf_counter() - t0))
            print(rows[-1], flush=True)
            with open(f"{hlo_dir}/decode_hlo_scan{int(scan)}_b{batch}.txt", "w") as f:
                f.write(hlo)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="kernels,train,decode")
    ap.add_argument("--topologies", default="v5e:1x1,v4:2x2x1")
    ap.add_argument("--layers", type=int, default=4, help="blocks of the train-step model (6B width)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--impls", default="xla,splash,pallas_flash")
    ap.add_argument("--remats", default="none,dots,full")
    ap.add_argument("--layouts", default="unrolled,scan_layers", help="decode section: unrolled and / or scan_layers")
    ap.add_argument("--hlo-dir", default="/tmp", help="decode section: where the optimized HLO texts are written")
    args = ap.parse_args()
    sections = args.sections.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    print(f"jax {jax.__version__}; libtpu deviceless compiles on a CPU host")
    if "kernels" in sections:
        rows = kernels(args.topologies.split(","))
        print("\n| topology | attention | program | compiles | Mosaic kernel | temporaries (MiB) | compile (s) |")
        print("|---|---|---|---|---|---:|---:|")
        for r in rows:
            print(f"| {r['topology']} | {r['impl']} | {r['program']} | {r['ok']} | {'yes' if r['mosaic'] else 'no'} "
                  f"| {r['temp']:.0f} | {r['seconds']:.0f} |")
    if "train" in sections:
        rows = train(args.layers, batches, args.impls.split(","), args.remats.split(","))
        print(f"\nTrain step, GPT-J-6B width, {args.layers} layers, seq 2048, bf16 params + SGD, v5e:1x1")
        print("| batch | attention | remat | temporaries (GiB) | arguments (GiB) | compile (s) |")
        print("|---:|---|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['batch']} | {r['impl']} | {r['remat']} | {r['temp']:.2f} | {r['args']:.2f} | {r['seconds']:.0f} |")
    if "decode" in sections:
        rows = decode(batches, args.layouts.split(","), hlo_dir=args.hlo_dir)
        print("\nDecode step, GPT-J-6B (28 layers), bf16 weights, 2048-slot bf16 cache, v5e:1x1")
        print("| layout | batch | weights (GiB) | cache (GiB) | floor (GiB) | bytes accessed (GiB) | ratio | "
              "cache-sized copies / DUS / scatters / copy-done | temporaries (GiB) |")
        print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
        for r in rows:
            c = r["counts"]
            print(f"| {'scan_layers' if r['scan'] else 'unrolled'} | {r['batch']} | {r['weights']:.2f} | {r['cache']:.2f} "
                  f"| {r['floor']:.2f} | {r['accessed']:.2f} | {r['ratio']:.2f} | {c['copy']} / {c['dynamic-update-slice']} / "
                  f"{c['scatter']} / {c['copy-done']} | {r['temp']:.2f} |")


if __name__ == "__main__":
    main()

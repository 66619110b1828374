"""GPT-J-6B decode on one TPU v5e chip with a bfloat16 and an int8 KV cache, compiled without a TPU.

Deviceless AOT compile through libtpu (``jax.experimental.topologies``), the program ``generate`` runs
(``generation.forward_cached``, bfloat16 weights, a 2048-slot cache, donated). Needs a Python with ``jax[tpu]``
and libtpu (not the project's venv), on a CPU host::

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 PYTHONPATH=. /work/tpuvenv/bin/python scripts/tpu_kv_cache_check.py

Prints one Markdown row per (cache, batch): the cache bytes (``cache.cache_bytes``), XLA:TPU's argument,
temporary and total (argument + output - alias + temporary) bytes, its ``bytes accessed``, and the copies of a
whole K/V buffer in the compiled HLO with XLA's estimated cycles for one (with the int8 cache, the per-row write
loop of ``cache.write_kv`` relayouts the s8 buffer once per row and layer; see docs/quantization.md). Results are kept
in ``--out`` (JSON); a rerun skips the cells already there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh

GiB = 2**30


def measure(layers: int, batch: int, kv_cache: str | None, slots: int = 2048) -> dict:
    from gptj_jax import model as M
    from gptj_jax import sharding as sh
    from gptj_jax.cache import cache_bytes, init_cache
    from gptj_jax.config import GPTJConfig
    from gptj_jax.generation import forward_cached

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:1x1", chips_per_host_bounds=(1, 1, 1))
    mesh = Mesh(np.array(topo.devices[:1]).reshape(1, 1, 1), ("dp", "fsdp", "mp"))
    cfg = GPTJConfig(n_layer=layers)
    params = sh.abstract_params(cfg, mesh, "causal_lm", jnp.bfloat16)
    shape = jax.eval_shape(lambda: init_cache(cfg, batch, slots, jnp.bfloat16, kv_cache))
    shardings = sh.cache_shardings(cfg, mesh, shape)
    cache = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), shape, shardings)
    one = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=sh.batch_sharding(mesh, batch))

    def step(params, ids, cache):
        return forward_cached(params, ids, None, cache, config=cfg, dtype=jnp.bfloat16)

    t0 = time.perf_counter()
    with M.attention_backend("tpu"):
        compiled = jax.jit(step, donate_argnums=(2,)).lower(params, one, cache).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    # top-level copies of a whole K/V buffer (a pass over it; inside the per-row write loop, once per row)
    kv_shape = f"{'s8' if kv_cache == 'int8' else 'bf16'}[{batch},16,{slots},256]"
    copies = [int(c) for c in re.findall(
        rf"= {re.escape(kv_shape)}\{{[^}}]*\}} copy\([^)]*\)(?:.*?\"estimated_cycles\":\"(\d+)\")?", compiled.as_text()) if c]
    return dict(layers=layers, batch=batch, kv_cache=kv_cache or "bfloat16",
                cache=cache_bytes(cfg, batch, slots, jnp.bfloat16, kv_cache) / GiB,
                argument=mem.argument_size_in_bytes / GiB, temp=mem.temp_size_in_bytes / GiB, total=total / GiB,
                accessed=float(cost.get("bytes accessed", 0.0)) / GiB, kv_copies=len(copies),
                kv_copy_cycles=max(copies, default=0), seconds=round(time.perf_counter() - t0, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--out", default="/tmp/tpu_kv_cache_check.json")
    args = ap.parse_args()
    done = json.load(open(args.out)) if os.path.exists(args.out) else {}
    for batch in (int(b) for b in args.batches.split(",")):
        for kv in (None, "int8"):
            key = f"{args.layers}/{batch}/{kv or 'bfloat16'}"
            if key not in done:
                try:
                    done[key] = measure(args.layers, batch, kv)
                except Exception as e:  # XLA:TPU refuses a program that does not fit the chip's HBM
                    if "RESOURCE_EXHAUSTED" not in str(e):
                        raise
                    done[key] = dict(layers=args.layers, batch=batch, kv_cache=kv or "bfloat16",
                                     oom=str(e).split("RESOURCE_EXHAUSTED: ")[-1].splitlines()[0])
                print(done[key], flush=True)
                with open(args.out + ".tmp", "w") as f:
                    json.dump(done, f, indent=1)
                os.replace(args.out + ".tmp", args.out)
    print("| layers | batch x 2048 | KV cache | cache GiB | arguments GiB | temporaries GiB | total GiB | bytes accessed GiB "
          "| K/V buffer copies in the HLO (estimated cycles each) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in done.values():
        if "oom" in r:
            print(f"| {r['layers']} | {r['batch']} | {r['kv_cache']} | does not fit: {r['oom']} |")
            continue
        print(f"| {r['layers']} | {r['batch']} | {r['kv_cache']} | {r['cache']:.3f} | {r['argument']:.2f} | "
              f"{r['temp']:.3f} | {r['total']:.2f} | {r['accessed']:.2f} | {r['kv_copies']} ({r['kv_copy_cycles']}) |")


if __name__ == "__main__":
    main()

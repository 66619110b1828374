"""Temporary memory of the train step compiled for a real TPU topology, on a host without a TPU.

    JAX_PLATFORMS=cpu /work/tpuvenv/bin/python scripts/tpu_train_memory.py            # the table below
    JAX_PLATFORMS=cpu /work/tpuvenv/bin/python scripts/tpu_train_memory.py --batch 2 --remat none --loss full

Needs ``jax[tpu]`` (libtpu) in the interpreter that runs it; libtpu compiles for the abstract devices of
``jax.experimental.topologies.get_topology_desc`` (deviceless AOT), and ``Compiled.memory_analysis()`` gives
XLA:TPU's own figures. The model is GPT-J-6B's width (n_embd 4096, 16 heads of 256, rotary 64, vocab 50400)
with 4 layers, seq 2048, bfloat16 compute and float32 params and Adam state (``gptj_jax.train.step``, one
micro-batch, the mtj optimizer chain) on one chip. Prints a markdown table of temporaries (GiB) by batch x remat
policy (``model.REMAT_POLICIES``) x loss (``full``: the ``[B, S, V]`` float32 logits; ``blockwise``:
``losses.blockwise_cross_entropy`` with ``--block-size`` columns per block) x ``--query-block`` (the einsum
attention's ``attention_query_block``; 0: all query rows at once). Results go to ``--json`` as they come (a rerun
skips the cells already there).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GIB = 2**30
WIDTH_6B = dict(vocab_size=50400, n_positions=2048, n_embd=4096, n_head=16, rotary_dim=64)


def compile_step(topology: str, n_layer: int, batch: int, seq: int, remat: str, block_size: int,
                 program: str = "step", query_block: int = 0) -> dict:
    """Compile one train step (``program="step"``; ``"grad"``: the loss's value and gradient only) for
    ``topology`` (one chip) and return XLA:TPU's memory analysis (bytes). ``query_block``: the model's
    ``attention_query_block``."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import Mesh

    from gptj_jax.config import GPTJConfig
    from gptj_jax.train import step as step_lib
    from gptj_jax.train.optimizer import mtj_optimizer, mtj_schedule

    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology, chips_per_host_bounds=(1, 1, 1))
    devices = topo.devices[:1]
    mesh = Mesh([[[devices[0]]]], ("dp", "fsdp", "mp"))
    config = GPTJConfig(**WIDTH_6B, n_layer=n_layer, attention="xla", attention_query_block=query_block)
    scfg = step_lib.StepConfig(config, "bfloat16", remat=remat, loss_block_size=block_size)
    sched = mtj_schedule(0, 1000, 1e-4, 1e-5)
    opt = mtj_optimizer(lr_schedule=sched, weight_decay=0.1)
    shardings = step_lib.state_shardings(scfg, mesh, opt, jnp.float32)
    state = step_lib.abstract_state(scfg, mesh, opt, jnp.float32)
    fn = step_lib.make_train_step(scfg, mesh, opt, sched, shardings)
    tokens = jax.ShapeDtypeStruct((1, batch, seq + 1), jnp.int32, sharding=step_lib.batch_spec_sharding(mesh))
    kind = getattr(devices[0], "device_kind", topology)
    if program == "grad":  # the loss's value and gradient alone: the gradients are outputs, not temporaries
        loss_fn = step_lib.make_loss_fn(scfg, mesh)
        fn = jax.jit(jax.value_and_grad(lambda p, t: loss_fn(p, t, jax.random.PRNGKey(0)), has_aux=True))
        state, tokens = state["params"], jax.ShapeDtypeStruct(tokens.shape[1:], jnp.int32)
    try:
        m = fn.lower(state, tokens).compile().memory_analysis()
    except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses programs over the chip's HBM, naming the need
        need = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or need is None:
            raise
        scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[need.group(2)]
        return {"temp": float(need.group(1)) * scale, "argument": None, "oom": True, "device": kind}
    return {
        "temp": m.temp_size_in_bytes,
        "argument": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "alias": m.alias_size_in_bytes,
        "oom": False,
        "device": kind,
    }


def main() -> int:
    from gptj_jax.model import REMAT_POLICIES
    from gptj_jax.train.config import TrainConfig

    default_block = TrainConfig.__dataclass_fields__["loss_block_size"].default
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5e:1x1")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--remat", nargs="*", default=list(REMAT_POLICIES))
    parser.add_argument("--loss", nargs="*", default=["full", "blockwise"], choices=["full", "blockwise"])
    parser.add_argument("--block-size", type=int, default=default_block or 8192,
                        help="vocabulary columns per block of the blockwise loss")
    parser.add_argument("--query-block", type=int, nargs="*", default=[0],
                        help="the einsum attention's query rows per block (attention_query_block; 0: all rows)")
    parser.add_argument("--program", default="step", choices=["step", "grad"],
                        help="step: the whole train step (gradients and Adam's temporaries included); grad: the "
                        "loss's value_and_grad alone")
    parser.add_argument("--json", default=None, help="results cache (default: none)")
    parser.add_argument("--no-grad-barrier", action="store_true", help="trace the model without model._grad_barrier")
    args = parser.parse_args()

    if args.no_grad_barrier:
        import gptj_jax.model

        gptj_jax.model._grad_barrier = lambda x: x
    results = {}
    if args.json and os.path.exists(args.json):
        with open(args.json, encoding="utf-8") as f:
            results = json.load(f)
    def key_of(batch: int, remat: str, loss: str, qb: int) -> str:
        block = args.block_size if loss == "blockwise" else 0
        key = f"{args.program}|{args.topology}|{args.layers}|{args.seq}|{batch}|{remat}|{loss}|{block}"
        return key + (f"|qb{qb}" if qb else "")

    for qb in args.query_block:
        for batch in args.batch:
            for remat in args.remat:
                for loss in args.loss:
                    key = key_of(batch, remat, loss, qb)
                    if key not in results:
                        t0 = time.time()
                        block = args.block_size if loss == "blockwise" else 0
                        results[key] = compile_step(args.topology, args.layers, batch, args.seq, remat, block,
                                                    args.program, qb)
                        results[key]["compile_s"] = round(time.time() - t0, 1)
                        if args.json:
                            tmp = args.json + ".tmp"
                            with open(tmp, "w", encoding="utf-8") as f:
                                json.dump(results, f, indent=1)
                            os.replace(tmp, args.json)
                    r = results[key]
                    over = " (over the chip's HBM: XLA refuses it)" if r["oom"] else ""
                    print(f"{loss:9s} remat={remat:13s} batch={batch} query_block={qb}: temp {r['temp'] / GIB:.2f} "
                          f"GiB{over} ({r['compile_s']} s)", flush=True)

    kind = next(iter(results.values()))["device"] if results else args.topology
    print()
    what = "the train step" if args.program == "step" else "the loss's value_and_grad (gradients are outputs)"
    print(f"Temporaries (GiB) of {what} compiled for {args.topology} ({kind}), {args.layers} layers at "
          f"GPT-J-6B width, seq {args.seq}, bfloat16 compute, float32 params and Adam state; "
          f"blockwise: loss_block_size {args.block_size}; einsum attention.")
    print()
    head = [f"{loss} / batch {b}" for loss in args.loss for b in args.batch]
    print("| query block | remat | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 2) + "|")
    for qb in args.query_block:
        for remat in args.remat:
            cells = []
            for loss in args.loss:
                for b in args.batch:
                    r = results.get(key_of(b, remat, loss, qb))
                    cells.append("-" if r is None else f"{r['temp'] / GIB:.2f}" + (" (OOM)" if r["oom"] else ""))
            print(f"| {qb or 'all rows'} | `{remat}` | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

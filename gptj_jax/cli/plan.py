"""The ``gptj-jax plan`` verb: flags in, :func:`gptj_jax.plan.make_plan` on simulated devices, tables out.

    gptj-jax plan --config gptj-6b --mesh dp=1,fsdp=1,mp=8 --batch 1 --seq 2048 [--train] [--json]
"""

from __future__ import annotations

import argparse

from gptj_jax.cli.command import Command
from gptj_jax.dtypes import DTYPE_NAMES

HELP = "per-device memory and FLOPs of a step on a mesh (AOT on simulated devices)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``plan`` flags to its sub-parser."""
    parser.add_argument("--config", required=True, help="config.json of the model, or a preset name (e.g. gptj-6b)")
    parser.add_argument("--mesh", default="dp=1,fsdp=1,mp=1", help="mesh sizes, e.g. dp=1,fsdp=1,mp=8 (-1 = the rest)")
    parser.add_argument("--batch", type=int, default=1, help="global batch (rows) per step")
    parser.add_argument("--seq", type=int, default=2048, help="sequence length (cache slots for inference)")
    parser.add_argument("--train", action="store_true", help="plan the fine-tuning step instead of inference")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="compute dtype (default bfloat16)")
    parser.add_argument("--param-dtype", default=None, choices=DTYPE_NAMES,
                        help="parameter dtype (default: float32 for --train, else --dtype)")
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots", "dots_no_batch"),
                        help="rematerialisation policy of the training step")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per training step")
    parser.add_argument("--forward", default="gspmd", choices=("gspmd", "shard_map"),
                        help="training forward: XLA-partitioned or the explicit shard_map one")
    parser.add_argument("--loss-block-size", type=int, default=None,
                        help="training loss in blocks of this many vocabulary columns (default: the train config's "
                        "loss_block_size; 0: full logits)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of markdown")


def run(args: argparse.Namespace) -> int:
    """Check the inputs, simulate the mesh's devices on CPU, compile, print the tables. Returns 0."""
    from gptj_jax import plan as plan_lib
    from gptj_jax.config import GPTJConfig
    from gptj_jax.sharding import parse_mesh

    config = GPTJConfig.load(args.config)
    sizes = parse_mesh(args.mesh)
    if -1 in sizes.values():
        raise ValueError(f"--mesh {args.mesh!r}: plan needs every axis size (no -1): it simulates that many devices")
    n = plan_lib.check_mesh(config, sizes, args.batch, args.seq, train=args.train, dtype=args.dtype,
                            param_dtype=args.param_dtype, grad_accum=args.grad_accum)
    plan = plan_lib.make_plan(
        config, sizes, args.batch, args.seq, train=args.train, dtype=args.dtype, param_dtype=args.param_dtype,
        remat=args.remat, grad_accum=args.grad_accum, forward=args.forward, config_name=str(args.config),
        devices=plan_lib.simulated_devices(n), loss_block_size=args.loss_block_size,
    )
    if args.json:
        import json

        print(json.dumps(plan_lib.plan_dict(plan), indent=2))
    else:
        print(plan_lib.format_plan(plan))
    return 0


COMMAND = Command(HELP, add_arguments, run)

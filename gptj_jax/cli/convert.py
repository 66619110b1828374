"""The ``gptj-jax convert`` verb: flags in, :func:`gptj_jax.convert.pipeline.convert` out.

    gptj-jax convert SRC DST --to {hf,hf-flax,flax,mtj} [--config PATH] [--dtype float32|bfloat16|float16]
                     [--max-shard-size 5GB] [--shards N] [--overwrite]
"""

from __future__ import annotations

import argparse

from gptj_jax.cli.command import Command
from gptj_jax.dtypes import DTYPE_NAMES

HELP = "convert a checkpoint between Transformers (PyTorch or Flax), gptj-jax Flax and mesh-transformer-jax formats"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``convert`` flags to its sub-parser."""
    p.add_argument("src", metavar="SRC", help="source checkpoint; its format (hf, hf-flax, flax, mtj) is detected")
    p.add_argument("dst", metavar="DST", help="output directory (written to a temporary sibling, then renamed)")
    p.add_argument("--to", required=True, choices=["hf", "hf-flax", "flax", "mtj"], help="output format")
    p.add_argument(
        "--config",
        metavar="PATH",
        help="HF config.json or mesh-transformer-jax config JSON; required for mesh-transformer-jax sources",
    )
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="cast every tensor (default: keep)")
    p.add_argument("--max-shard-size", default="5GB", help="HF / HF Flax output: largest safetensors / msgpack shard (default 5GB)")
    p.add_argument("--shards", type=int, help="mesh-transformer-jax output: number of model-parallel shards (mp), >= 1")
    p.add_argument(
        "--mtj-layout", choices=["slim", "full"], default="slim",
        help="mesh-transformer-jax output: params only (slim) or with zeroed Adam state (full)",
    )
    p.add_argument("--no-tokenizer", action="store_true", help="HF / HF Flax output: do not write the GPT-J tokenizer files")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary line")


def run(args: argparse.Namespace) -> int:
    """Run the conversion; exceptions propagate (:func:`gptj_jax.cli.main` turns them into one error line)."""
    from gptj_jax.convert.pipeline import convert

    convert(
        args.src,
        args.dst,
        to=args.to,
        config=args.config,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        shards=args.shards,
        overwrite=args.overwrite,
        mtj_layout=args.mtj_layout,
        tokenizer=not args.no_tokenizer,
        verbose=not args.quiet,
    )
    return 0


COMMAND = Command(HELP, add_arguments, run)

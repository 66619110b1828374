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
    p.add_argument("--to", required=True, choices=["hf", "hf-flax", "flax", "mtj", "peft"],
                   help="output format (peft: the adapters of a LoRA training run, for peft.PeftModel)")
    p.add_argument("--merge-lora", action="store_true", help="--to hf from a LoRA run: the base with the adapters merged")
    p.add_argument("--merge-into", choices=None, metavar="{float,dequantized}",
                   help="--merge-lora of a run on an int8 base: merge into its float weights or the dequantized int8 ones")
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
    import os

    from gptj_jax import lora

    is_lora_run = os.path.isdir(args.src) and lora.read_run_file(args.src) is not None
    if args.to == "peft" or args.merge_lora or is_lora_run:
        if not is_lora_run:
            raise ValueError(f"{args.src}: not a LoRA training run (no {lora.RUN_FILE}); --to peft and --merge-lora "
                             "take the model_dir of a `gptj-jax train` run with lora_rank > 0")
        if args.to == "hf" and not args.merge_lora:
            raise ValueError(f"{args.src} is a LoRA run: its checkpoints hold adapters only; use --to peft, or "
                             "--to hf --merge-lora for the merged weights")
        if args.merge_lora and args.to != "hf":
            raise ValueError("--merge-lora goes with --to hf")
        out = lora.export(args.src, args.dst, args.to, merge_into=args.merge_into, dtype=args.dtype,
                          tokenizer=not args.no_tokenizer)
        if not args.quiet:
            print(f"wrote {out} ({args.to}{' merged' if args.merge_lora else ''})")
        return 0
    if args.merge_into is not None:
        raise ValueError("--merge-into goes with --to hf --merge-lora")
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

"""The ``prepare``, ``train`` and ``eval`` verbs: flags in, :mod:`gptj_jax.train` out.

    gptj-jax prepare --input data/*.txt --output out/data --seq 2048
    gptj-jax train configs/finetune-6b-v3-8.yaml total_steps=1000 lr=3e-5
    gptj-jax eval --model out/run --data out/val

``train`` exits 0 when it reaches ``total_steps``, 143 after a SIGTERM and 130 after Ctrl-C (both save
first, so running the same command again resumes).
"""

from __future__ import annotations

import argparse

from gptj_jax.cli.command import Command, add_model_flags, model_flags
from gptj_jax.distributed import add_distributed_args
from gptj_jax.dtypes import DTYPE_NAMES


# ---------------------------------------------------------------------------------------- train
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``train`` flags to its sub-parser."""
    p.add_argument("config", help="training config, JSON or YAML (mesh-transformer-jax keys work; see docs/training.md)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override config keys, e.g. total_steps=100 lr=3e-5 val_set.pile=out/val")
    add_distributed_args(p)


def run_train(args: argparse.Namespace) -> int:
    """Train (or resume) and print one summary line; the exit code says how the run stopped."""
    from gptj_jax.distributed import maybe_initialize

    maybe_initialize(args)
    from gptj_jax.train.config import load_train_config
    from gptj_jax.train.loop import train

    cfg = load_train_config(args.config, list(args.overrides))
    summary = train(cfg)
    stopped = summary["stopped_by"]
    loss = summary["loss"]
    shown = f"{loss:.4f}" if loss is not None else "n/a"
    print(f"{cfg.name}: step {summary['step']} of {cfg.total_steps}, last loss {shown}, checkpoints in {cfg.model_dir}"
          + (f" (stopped by {stopped})" if stopped else ""))
    if stopped == "SIGTERM":
        return 143
    if stopped == "SIGINT":
        return 130
    return 0


# ---------------------------------------------------------------------------------------- prepare
def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``prepare`` flags to its sub-parser."""
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help=".txt (one document per file), .jsonl or .jsonl.zst (one document per line, 'text' field)")
    p.add_argument("--output", required=True, metavar="DIR", help="directory to write index.json and token shards to")
    p.add_argument("--seq", type=int, default=2048, help="training sequence length; records are seq + 1 tokens (default 2048)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared set already in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_prepare(args: argparse.Namespace) -> int:
    """Tokenize and pack the input, then print one line describing the prepared set."""
    from gptj_jax.train.data import prepare

    index = prepare(args.input, args.output, seq=args.seq, workers=args.workers, overwrite=args.overwrite,
                    progress=not args.no_progress)
    print(f"{args.output}: {index['num_records']} records of {index['record_len']} tokens from "
          f"{index['num_documents']} documents ({index['num_tokens']} tokens, {index['dropped_tokens']} left over)")
    return 0


# ---------------------------------------------------------------------------------------- eval
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``eval`` flags to its sub-parser."""
    p.add_argument("--model", required=True, metavar="SOURCE",
                   help="hub id (owner/name), HF or HF Flax directory, gptj-jax checkpoint or training run dir "
                        "(newest step), or mtj checkpoint (with --config)")
    p.add_argument("--revision", metavar="REV", help="branch, tag or commit of a hub id (default: main)")
    p.add_argument("--data", required=True, nargs="+", metavar="DIR", help="prepared data directories (gptj-jax prepare)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="model config for an mtj checkpoint (its training JSON or an HF config.json)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches per data dir")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="compute dtype")
    p.add_argument("--mesh", default=None, help="mesh, e.g. 'dp=-1,mp=8' (default: all devices data-parallel)")
    add_model_flags(p, quantize=False)
    add_distributed_args(p)


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate the checkpoint on each data dir and print one line per dir."""
    from gptj_jax.distributed import maybe_initialize

    maybe_initialize(args)
    from gptj_jax.train.evaluate import evaluate_checkpoint

    flags = model_flags(args)
    results = evaluate_checkpoint(args.model, args.data, args.batch_size, args.max_batches, args.dtype, args.mesh,
                                  args.config, revision=args.revision, attention=flags["attention"],
                                  scan_layers=flags["scan_layers"])
    for r in results:
        print(f"{r['data']}: loss {r['loss']:.4f}  perplexity {r['ppl']:.3f}  bits per byte {r['bits_per_byte']:.4f}  "
              f"({r['tokens']} tokens)")
    return 0


PREPARE = Command("tokenize text into packed training records", add_prepare_arguments, run_prepare)
TRAIN = Command("train / fine-tune from a JSON or YAML config (resumes if checkpoints exist)", add_train_arguments,
                run_train)
EVAL = Command("loss, perplexity and bits per byte of a checkpoint on prepared data", add_eval_arguments, run_eval)

"""The ``train``, ``prepare`` and ``eval`` verbs: flag parsing that calls the library (registered in ``gptj_jax/cli.py``).

    gptj-jax prepare --input data/*.txt --output out/data --seq 2048
    gptj-jax train configs/finetune-6b-v3-8.yaml total_steps=1000 lr=3e-5
    gptj-jax eval --model out/run --data out/val

``train`` exits 0 when it reaches ``total_steps``, 143 after a SIGTERM and 130 after Ctrl-C (both save
first, so running the same command again resumes).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from gptj_jax.distributed import add_distributed_args, maybe_initialize


# ---------------------------------------------------------------------------------------- train
def add_train_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training config, JSON or YAML (mesh-transformer-jax keys work; see docs/training.md)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override config keys, e.g. total_steps=100 lr=3e-5 val_set.pile=out/val")
    add_distributed_args(p)


def run_train(args: argparse.Namespace) -> int:
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
def add_prepare_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help=".txt (one document per file), .jsonl or .jsonl.zst (one document per line, 'text' field)")
    p.add_argument("--output", required=True, metavar="DIR", help="directory to write index.json and token shards to")
    p.add_argument("--seq", type=int, default=2048, help="training sequence length; records are seq + 1 tokens (default 2048)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared set already in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_prepare(args: argparse.Namespace) -> int:
    from gptj_jax.train.data import prepare

    index = prepare(args.input, args.output, seq=args.seq, workers=args.workers, overwrite=args.overwrite,
                    progress=not args.no_progress)
    print(f"{args.output}: {index['num_records']} records of {index['record_len']} tokens from "
          f"{index['num_documents']} documents ({index['num_tokens']} tokens, {index['dropped_tokens']} left over)")
    return 0


# ---------------------------------------------------------------------------------------- eval
def add_eval_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH",
                   help="HF directory, gptj-jax checkpoint or training run dir (newest step), or mtj checkpoint")
    p.add_argument("--data", required=True, nargs="+", metavar="DIR", help="prepared data directories (gptj-jax prepare)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="model config for an mtj checkpoint (its training JSON or an HF config.json)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches per data dir")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="compute dtype")
    p.add_argument("--mesh", default=None, help="mesh, e.g. 'dp=-1,mp=8' (default: all devices data-parallel)")
    add_distributed_args(p)


def evaluate_checkpoint(model: str, data_dirs: list[str], batch_size: int = 8, max_batches: Any = None,
                        dtype: str = "float32", mesh_text: Any = None, config_path: Any = None) -> list[dict]:
    """Loss (nats/token), perplexity and bits per byte of ``model`` on each prepared dir in ``data_dirs``."""
    import jax.numpy as jnp

    from gptj_jax import sharding as sh
    from gptj_jax.convert.pipeline import load_config
    from gptj_jax.train import data as data_lib
    from gptj_jax.train import step as step_lib
    from gptj_jax.train.loop import evaluate, load_params

    sizes = sh.parse_mesh(mesh_text) if mesh_text else {"dp": -1, "fsdp": 1, "mp": 1}
    if mesh_text and "dp=" not in mesh_text.replace(" ", "") and -1 not in sizes.values():
        sizes["dp"] = -1
    mesh = sh.make_mesh(**sizes)
    hint = load_config(config_path)[0] if config_path else None
    config, params = load_params(model, hint, lambda c: sh.param_shardings(c, mesh, "causal_lm"), jnp.float32)
    scfg = step_lib.StepConfig(config, dtype)
    eval_step = step_lib.make_eval_step(scfg, mesh, sh.param_shardings(config, mesh, "causal_lm"))
    sharding = sh.logical_sharding(mesh, ("batch", "length"))
    results = []
    for directory in data_dirs:
        records = data_lib.TokenRecords(directory, key="--data")
        if records.seq > config.n_positions:
            raise data_lib.DataError(
                f"--data {directory} was prepared with --seq {records.seq}, larger than the model's n_positions "
                f"({config.n_positions})"
            )
        sh.check_batch(mesh, batch_size)
        r = evaluate(params, eval_step, records, batch_size, max_batches, sharding)
        bpt = records.bytes_per_token
        r["bits_per_byte"] = r["loss"] / math.log(2) / bpt if bpt else float("nan")
        r["data"] = directory
        results.append(r)
    return results


def run_eval(args: argparse.Namespace) -> int:
    maybe_initialize(args)
    results = evaluate_checkpoint(args.model, args.data, args.batch_size, args.max_batches, args.dtype, args.mesh,
                                  args.config)
    for r in results:
        print(f"{r['data']}: loss {r['loss']:.4f}  perplexity {r['ppl']:.3f}  bits per byte {r['bits_per_byte']:.4f}  "
              f"({r['tokens']} tokens)")
    return 0

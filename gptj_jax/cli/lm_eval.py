"""The ``gptj-jax lm-eval`` verb: lm-evaluation-harness tasks on a gptj-jax model, through the in-process
adapter (:mod:`gptj_jax.eval_harness`, registered in lm-eval as ``gptj-jax``).

    gptj-jax lm-eval --model SOURCE --tasks lambada_openai,hellaswag [--include-path DIR] [--limit N]
                     [--num-fewshot K] [--batch-size B] [--max-length L] [--dtype bfloat16] [--mesh dp=1,mp=8]
                     [--output-path DIR [--log-samples]]

lm-eval has no plugin discovery for models, so this verb is the entry point: it registers the adapter, checks
the task names (lm-eval's registry plus ``--include-path``) before loading the model, runs lm-eval's
``simple_evaluate`` and prints lm-eval's results table. ``--output-path`` gets ``results_<time>.json`` (and
with ``--log-samples`` one ``samples_<task>_<time>.jsonl`` per task); nothing there is overwritten.
Needs the ``[eval]`` extra.
"""

from __future__ import annotations

import argparse

from gptj_jax.cli.command import Command, add_model_flags, model_flags
from gptj_jax.dtypes import DTYPE_NAMES

HELP = "run lm-evaluation-harness tasks on a GPT-J model (in-process adapter)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``lm-eval`` flags to its sub-parser."""
    p.add_argument("--model", required=True, metavar="SOURCE",
                   help="hub id (owner/name), HF or HF Flax directory, gptj-jax checkpoint or run dir")
    p.add_argument("--revision", metavar="REV", help="branch, tag or commit of a hub id (default: main)")
    p.add_argument("--tokenizer", metavar="SOURCE", help="directory or hub id of the tokenizer (default: the model's, "
                   "else GPT-J's)")
    p.add_argument("--tasks", required=True, metavar="T1,T2", help="comma-separated lm-eval task (or group) names")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="directory of extra task YAML files (repeatable)")
    p.add_argument("--limit", type=float, metavar="N", help="at most N documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="requests per forward pass / decode "
                   "slots (default 8)")
    p.add_argument("--max-length", type=int, metavar="L", help="context window (default: the model's n_positions)")
    p.add_argument("--max-gen-toks", type=int, default=256, metavar="N",
                   help="new tokens of generate_until tasks that do not set max_gen_toks (default 256)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="cast the weights (and compute) to this dtype "
                   "(default: as stored)")
    p.add_argument("--mesh", metavar="dp=A,fsdp=B,mp=C", default=None, help="device mesh (default: one device)")
    add_model_flags(p)
    p.add_argument("--seed", type=int, default=0, help="lm-eval's random seed (default 0)")
    p.add_argument("--output-path", metavar="DIR", help="write results_<time>.json (and samples) into DIR")
    p.add_argument("--log-samples", action="store_true", help="with --output-path: also write every request's "
                   "inputs and outputs")


def run(args: argparse.Namespace) -> int:
    """Check the flags and tasks, load the model, evaluate, print the table. Returns 0."""
    for flag in ("batch_size", "max_gen_toks"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be > 0, got {args.limit}")
    if args.log_samples and not args.output_path:
        raise ValueError("--log-samples needs --output-path")
    flags = model_flags(args)
    try:
        from gptj_jax import eval_harness
    except ImportError as e:
        raise ImportError(f"lm-evaluation-harness is not installed ({e}); run `pip install 'gptj-jax[eval]'`") from None

    manager = eval_harness.task_manager(args.include_path)
    tasks = eval_harness.check_tasks(args.tasks, manager)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    lm = eval_harness.GPTJLM(model=args.model, revision=args.revision, tokenizer=args.tokenizer,
                             batch_size=args.batch_size, max_length=args.max_length, max_gen_toks=args.max_gen_toks,
                             dtype=args.dtype, mesh=args.mesh, **flags)
    results = eval_harness.evaluate(lm, tasks, manager=manager, limit=limit, num_fewshot=args.num_fewshot,
                                    log_samples=args.log_samples, seed=args.seed)
    print(eval_harness.format_results(results))
    if args.output_path:
        for path in eval_harness.write_results(results, args.output_path, samples=args.log_samples):
            print(f"wrote {path}")
    return 0


COMMAND = Command(HELP, add_arguments, run)

"""`gptj-jax <verb>`: a thin command line over the library.

Each verb is one :class:`~gptj_jax.cli.command.Command` (a help line, a function that adds its flags to a
sub-parser, a function that runs it and returns the exit code) exported by one module of this package:

    convert.py      convert          checkpoint conversion (gptj_jax.convert)
    generate.py     generate         one prompt, or a JSONL file of prompts (gptj_jax.generation, gptj_jax.batch)
    plan.py         plan             per-device memory and FLOPs on a mesh (gptj_jax.plan)
    lm_eval.py      lm-eval          lm-evaluation-harness tasks (gptj_jax.eval_harness)
    train.py        prepare, train, eval   fine-tuning (gptj_jax.train)
    tokenizer.py    tokenizer-save   GPT-J's tokenizer as HF files (gptj_jax.tokenizer)
    serve.py        serve            OpenAI-compatible HTTP server on the engine (gptj_jax.serve)

To add a verb, write its module (flags only at the top; the library imported inside ``run``, so
``gptj-jax --help`` imports no jax) and add it to ``COMMANDS``. The verbs parse flags, call the library
and print; the work is the library's. Library errors (exceptions) become one ``gptj-jax VERB: error: ...``
line and exit code 1 (``GPTJ_JAX_TRACEBACK=1`` shows the full traceback instead); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from gptj_jax.cli import convert, generate, lm_eval, plan, serve, tokenizer, train
from gptj_jax.cli.command import Command

COMMANDS: dict[str, Command] = {
    "tokenizer-save": tokenizer.COMMAND,
    "prepare": train.PREPARE,
    "train": train.TRAIN,
    "eval": train.EVAL,
    "convert": convert.COMMAND,
    "generate": generate.COMMAND,
    "plan": plan.COMMAND,
    "lm-eval": lm_eval.COMMAND,
    "serve": serve.COMMAND,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``gptj-jax`` parser: one sub-parser per entry of ``COMMANDS``."""
    parser = argparse.ArgumentParser(prog="gptj-jax", description="GPT-J-6B in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        cmd.add_arguments(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the verb and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        print("gptj-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the CLI's contract: one line, non-zero exit
        if os.environ.get("GPTJ_JAX_TRACEBACK"):
            raise
        print(f"gptj-jax {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


__all__ = ["COMMANDS", "Command", "build_parser", "main"]

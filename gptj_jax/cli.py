"""`gptj-jax <verb>`: a thin command line over the library.

Each verb is one entry of ``COMMANDS``: a help line, a function that adds its flags to a sub-parser, and a
function that runs it and returns the exit code. To add a verb, write those two functions in this file
(importing the library lazily inside ``run`` so ``gptj-jax --help`` stays fast) and add an entry.
Library errors (exceptions) become one ``gptj-jax VERB: error: ...`` line and exit code 1; set
``GPTJ_JAX_TRACEBACK=1`` to see the full traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---- tokenizer-save -----------------------------------------------------------------------------------------


def _tokenizer_save_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="where to write tokenizer.json, tokenizer_config.json, vocab.json, ...")


def _tokenizer_save(args: argparse.Namespace) -> int:
    from gptj_jax.tokenizer import save_tokenizer

    for path in save_tokenizer(args.directory):
        print(path)
    return 0


COMMANDS: dict[str, Command] = {
    "tokenizer-save": Command("save GPT-J's tokenizer as Hugging Face files", _tokenizer_save_args, _tokenizer_save),
}

# Training verbs (gptj_jax/train/cli.py parses only; the library is imported inside each run function).
from gptj_jax.train import cli as _train_cli  # noqa: E402

COMMANDS["prepare"] = Command("tokenize text into packed training records", _train_cli.add_prepare_parser, _train_cli.run_prepare)
COMMANDS["train"] = Command("train / fine-tune from a JSON or YAML config (resumes if checkpoints exist)", _train_cli.add_train_parser, _train_cli.run_train)
COMMANDS["eval"] = Command("loss, perplexity and bits per byte of a checkpoint on prepared data", _train_cli.add_eval_parser, _train_cli.run_eval)

from gptj_jax.convert import cli as _convert_cli  # noqa: E402

COMMANDS["convert"] = Command(_convert_cli.HELP, _convert_cli.add_convert_arguments, _convert_cli.run_convert)
from gptj_jax import generate_cli as _generate_cli; COMMANDS["generate"] = Command(_generate_cli.HELP, _generate_cli.add_generate_arguments, _generate_cli.run_generate)  # noqa: E402, E702, I001
from gptj_jax import plan as _plan; COMMANDS["plan"] = Command("per-device memory and FLOPs of a step on a mesh (AOT on simulated devices)", _plan.add_plan_arguments, _plan.run_plan)  # noqa: E402, E702, I001


def build_parser() -> argparse.ArgumentParser:
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


if __name__ == "__main__":
    sys.exit(main())

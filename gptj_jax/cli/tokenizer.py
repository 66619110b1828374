"""The ``gptj-jax tokenizer-save`` verb: :func:`gptj_jax.tokenizer.save_tokenizer` into a directory.

    gptj-jax tokenizer-save DIR
"""

from __future__ import annotations

import argparse

from gptj_jax.cli.command import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``tokenizer-save`` flags to its sub-parser."""
    p.add_argument("directory", help="where to write tokenizer.json, tokenizer_config.json, vocab.json, ...")


def run(args: argparse.Namespace) -> int:
    """Write the files and print their paths, one a line."""
    from gptj_jax.tokenizer import save_tokenizer

    for path in save_tokenizer(args.directory):
        print(path)
    return 0


COMMAND = Command("save GPT-J's tokenizer as Hugging Face files", add_arguments, run)

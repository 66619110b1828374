"""What one ``gptj-jax`` verb is: a help line, its flags, and the function that runs it."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NamedTuple

from gptj_jax.config import ATTENTION_IMPLS


class Command(NamedTuple):
    """One verb of ``gptj-jax``.

    ``add_arguments`` adds the verb's flags to its (already created) sub-parser; it must import nothing
    heavy, since every verb's flags are built for ``gptj-jax --help``. ``run`` imports the library it
    needs, does the work and returns the exit code; its exceptions become one error line (see
    :func:`gptj_jax.cli.main`).
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------------- model flags
def add_model_flags(p: argparse.ArgumentParser, quantize: bool = True) -> None:
    """The flags of every verb that loads a model to run it (generate, serve, lm-eval, eval) or compiles its
    steps (plan): how the model computes (attention implementation, layers under ``nn.scan``) and, unless
    ``quantize`` is False (eval, plan: no int8 step there), int8 weight-only quantization."""
    p.add_argument("--attention", choices=ATTENTION_IMPLS, default="auto",
                   help="attention implementation (default auto: xla on CPU, cudnn on GPU, splash on TPU)")
    p.add_argument("--scan-layers", action="store_true", help="run the blocks under nn.scan (stacked params; faster compile)")
    if quantize:
        p.add_argument("--quantize", metavar="SCHEME", help="int8: int8 weight-only matmul weights, quantized as they load")
        p.add_argument("--quantize-embeddings", action="store_true", help="with --quantize, also quantize wte and lm_head")


def model_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The checked values of :func:`add_model_flags`' flags: ``{attention, scan_layers, quantize,
    quantize_embeddings}`` (the keywords of ``serve``, ``GPTJLM`` and, bar the first two, ``gptj_jax.load``);
    ``quantize`` None and ``quantize_embeddings`` False for a verb without those flags."""
    from gptj_jax.quantize import check_scheme

    quantize, quantize_embeddings = getattr(args, "quantize", None), getattr(args, "quantize_embeddings", False)
    check_scheme(quantize, "--quantize")
    if quantize_embeddings and not quantize:
        raise ValueError("--quantize-embeddings needs --quantize int8")
    return dict(attention=args.attention, scan_layers=args.scan_layers, quantize=quantize,
                quantize_embeddings=quantize_embeddings)

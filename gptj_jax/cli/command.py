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
    ``quantize`` is False (eval, plan: no quantized weights or cache there), int8 weight-only quantization and
    the int8 KV cache."""
    p.add_argument("--attention", choices=ATTENTION_IMPLS, default="auto",
                   help="attention implementation (default auto: xla on CPU, cudnn on GPU, splash on TPU)")
    p.add_argument("--scan-layers", action="store_true", help="run the blocks under nn.scan (stacked params; faster compile)")
    if quantize:
        p.add_argument("--quantize", metavar="SCHEME", help="int8: int8 weight-only matmul weights, quantized as they load")
        p.add_argument("--quantize-embeddings", action="store_true", help="with --quantize, also quantize wte and lm_head")
        p.add_argument("--kv-cache", metavar="SCHEME", help="int8: KV cache as int8 with one scale per head and token "
                       "(about half the bytes of bfloat16); default: the compute dtype")


def model_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The checked values of :func:`add_model_flags`' flags: ``{attention, scan_layers, quantize,
    quantize_embeddings, kv_cache}`` (the keywords of ``serve`` and ``GPTJLM``; ``quantize*`` are
    ``gptj_jax.load``'s, ``kv_cache`` the engine's and ``generate``'s); ``quantize`` and ``kv_cache`` None and
    ``quantize_embeddings`` False for a verb without those flags."""
    from gptj_jax.cache import check_kv_cache
    from gptj_jax.quantize import check_scheme

    quantize, quantize_embeddings = getattr(args, "quantize", None), getattr(args, "quantize_embeddings", False)
    check_scheme(quantize, "--quantize")
    if quantize_embeddings and not quantize:
        raise ValueError("--quantize-embeddings needs --quantize int8")
    kv_cache = getattr(args, "kv_cache", None)
    check_kv_cache(kv_cache, "--kv-cache")
    return dict(attention=args.attention, scan_layers=args.scan_layers, quantize=quantize,
                quantize_embeddings=quantize_embeddings, kv_cache=kv_cache)

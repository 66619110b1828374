"""The ``gptj-jax serve`` verb: an OpenAI-compatible completions server (:mod:`gptj_jax.serve`).

    gptj-jax serve --model SOURCE [--mesh dp=A,fsdp=B,mp=C] [--host 127.0.0.1] [--port 8000] [--max-slots N]
                   [--max-waiting M] [--max-len L] [--served-model-name NAME] [--dtype bfloat16] [--grace S]

Needs the ``serve`` extra (``pip install 'gptj-jax[serve]'``: FastAPI and uvicorn). The server binds
127.0.0.1 by default and has no authentication: put a proxy in front to expose it (docs/serving.md).
SIGTERM / Ctrl-C drain it: new requests get 503, running ones get ``--grace`` seconds, then it exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging

from gptj_jax.cli.command import Command, add_model_flags, model_flags
from gptj_jax.dtypes import DTYPE_NAMES

HELP = "serve a GPT-J model over HTTP (OpenAI-compatible /v1/completions)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``serve`` flags to its sub-parser."""
    p.add_argument(
        "--model", required=True, metavar="SOURCE",
        help="hub id (owner/name), HF or HF Flax directory, gptj-jax checkpoint or run dir, or mtj checkpoint",
    )
    p.add_argument("--revision", metavar="REV", help="branch, tag or commit of a hub id (default: main)")
    p.add_argument("--tokenizer", metavar="SOURCE", help="tokenizer directory or hub id (default: the model's, else GPT-J's)")
    p.add_argument("--config", metavar="FILE", help="model config for an mtj checkpoint (its JSON or an HF config.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; no authentication!)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-slots", type=int, default=16, metavar="N", help="decode slots: sequences decoded at once (default 16)")
    p.add_argument("--max-waiting", type=int, default=256, metavar="M",
                   help="requests waiting for a slot at most; more get 429 (default 256)")
    p.add_argument("--max-len", type=int, default=None, metavar="L",
                   help="cache slots per sequence: prompt + max_tokens at most (default: the model's n_positions)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model name clients send (default: --model)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="cast the weights (and compute) to this dtype (default: as stored)")
    p.add_argument("--grace", type=float, default=30.0, metavar="S",
                   help="seconds running requests get to finish after SIGTERM (default 30)")
    p.add_argument(
        "--mesh", metavar="dp=A,fsdp=B,mp=C", default=None,
        help="shard params and KV cache over this process's devices (e.g. mp=8 on a TPU v2-8); default: one device",
    )
    p.add_argument(
        "--compilation-cache", nargs="?", const="", default=None, metavar="DIR",
        help="JAX persistent compilation cache (default dir: $GPTJ_JAX_COMPILATION_CACHE or ~/.cache/gptj_jax/xla)",
    )
    add_model_flags(p)
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run(args: argparse.Namespace) -> int:
    """Run the verb; exceptions propagate (:func:`gptj_jax.cli.main` turns them into one error line)."""
    for flag, value, low in (("--port", args.port, 0), ("--max-slots", args.max_slots, 1),
                             ("--max-waiting", args.max_waiting, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.port > 65535:
        raise ValueError(f"--port must be <= 65535, got {args.port}")
    if args.max_len is not None and args.max_len < 2:
        raise ValueError(f"--max-len must be >= 2, got {args.max_len}")
    if args.grace < 0:
        raise ValueError(f"--grace must be >= 0, got {args.grace}")
    flags = model_flags(args)
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{' and '.join(missing)} not installed: pip install 'gptj-jax[serve]'")
    from gptj_jax.convert.load import resolve, source_config

    try:
        source = resolve(args.model, args.revision)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--model {e}") from None
    config = source_config(source, args.config).replace(attention=flags["attention"], scan_layers=flags["scan_layers"])
    if args.max_len is not None and args.max_len > config.n_positions:
        raise ValueError(f"--max-len {args.max_len} > the model's n_positions {config.n_positions}")

    from gptj_jax.generation import enable_compilation_cache
    from gptj_jax.serve import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.compilation_cache is not None:
        enable_compilation_cache(args.compilation_cache or None)
    return serve(
        source, host=args.host, port=args.port, max_slots=args.max_slots, max_waiting=args.max_waiting,
        max_len=args.max_len, served_model_name=args.served_model_name or args.model, dtype=args.dtype,
        mesh=args.mesh, tokenizer=args.tokenizer, config=config, grace=args.grace, log_level=args.log_level,
        quantize=flags["quantize"], quantize_embeddings=flags["quantize_embeddings"], kv_cache=flags["kv_cache"],
    )


COMMAND = Command(HELP, add_arguments, run)

"""The ``gptj-jax generate`` verb: flags in, :func:`gptj_jax.generation.generate` (one prompt) or
:func:`gptj_jax.batch.generate_jsonl` (a JSONL file of prompts) out.

    gptj-jax generate --model SOURCE --prompt TEXT [--max-new-tokens N] [--greedy | --temperature T --top-k K
                      --top-p P --min-p M] [--seed S] [--stream]
    gptj-jax generate --model SOURCE --input prompts.jsonl --output out.jsonl [--batch-size 8]

``--model`` is anything :func:`gptj_jax.load` reads: a hub id (``EleutherAI/gpt-j-6B``, ``--revision float16``),
an HF or HF Flax directory, a gptj-jax checkpoint or training run directory, a mesh-transformer-jax checkpoint
(with ``--config``). The tokenizer is the checkpoint's own when it carries tokenizer files, else GPT-J's
(``--tokenizer`` names another directory or hub id). With ``--mesh`` every weight goes from disk straight to
the devices that hold its blocks.

Single-prompt mode prints the prompt and its continuation (``--stream``: as it is decoded). Batch mode
reads one JSON object per line (``{"id": ..., "prompt": ...}``), skips ids already in ``--output``
(so an interrupted run resumes) and appends one JSON line per prompt (``id``, ``prompt``, ``completion``,
``num_new_tokens``, ``finish_reason``); :mod:`gptj_jax.batch` does that work and documents the files.
``--output`` must be a new file or a results file this tool wrote (a torn last line is cut off with a
warning); anything else, or the ``--input`` file itself, is refused and left as it is.

Everything is checked before anything is written: the flags, the model source and its config, every
prompt (empty? longer than the model allows? ids outside the vocabulary?), the output file; the weights
are loaded last.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Optional

from gptj_jax.cli.command import Command, add_model_flags, model_flags
from gptj_jax.dtypes import DTYPE_NAMES

HELP = "generate text with a GPT-J model (one prompt, or a JSONL file of prompts)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``generate`` flags to its sub-parser."""
    p.add_argument(
        "--model", required=True, metavar="SOURCE",
        help="hub id (owner/name), HF or HF Flax directory, gptj-jax checkpoint or run dir, or mtj checkpoint",
    )
    p.add_argument("--revision", metavar="REV", help="branch, tag or commit of a hub id (default: main)")
    p.add_argument(
        "--tokenizer", metavar="SOURCE",
        help="directory or hub id to take the tokenizer from (default: the model's own, else GPT-J's)",
    )
    p.add_argument("--config", metavar="FILE", help="model config for an mtj checkpoint (its JSON or an HF config.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="one prompt; the continuation is printed")
    src.add_argument("--input", metavar="JSONL", help='batch mode: one {"id": ..., "prompt": ...} object per line')
    p.add_argument("--output", metavar="JSONL", help="batch mode: results, appended (ids already present are skipped)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    p.add_argument("--min-new-tokens", type=int, default=0, metavar="N", help="EOS is banned before N new tokens")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (the default unless a sampling flag is given)")
    p.add_argument("--temperature", type=float, metavar="T", help="sampling temperature > 0 (turns sampling on)")
    p.add_argument("--top-k", type=int, metavar="K", help="keep the K most likely tokens (0 = off; turns sampling on)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass in (0, 1] (turns sampling on)")
    p.add_argument("--min-p", type=float, metavar="M", help="min-p filter in [0, 1] (turns sampling on)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="> 0, 1 = off (default)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed in [0, 2**64) (default 0)")
    p.add_argument("--num-return-sequences", type=int, default=1, metavar="N", help="continuations per prompt")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument(
        "--eos-token-id", type=int, action="append", metavar="ID",
        help="end-of-sequence id (repeatable; default: the model config's)",
    )
    p.add_argument("--no-eos", action="store_true", help="ignore EOS: always generate --max-new-tokens tokens")
    p.add_argument("--stream", action="store_true", help="single-prompt mode: print text as it is decoded")
    p.add_argument("--stream-interval", type=int, default=4, metavar="K", help="decode steps per streamed chunk")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="batch mode: prompts per batch (default 8)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="cast the weights (and compute) to this dtype (default: as stored)")
    add_model_flags(p)
    p.add_argument("--logprobs", action="store_true", help="batch mode: also write each new token's log-probability")
    p.add_argument(
        "--compilation-cache", nargs="?", const="", default=None, metavar="DIR",
        help="JAX persistent compilation cache (default dir: $GPTJ_JAX_COMPILATION_CACHE or ~/.cache/gptj_jax/xla)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    p.add_argument(
        "--mesh", metavar="dp=A,fsdp=B,mp=C", default=None,
        help="shard params and KV cache over this process's devices (e.g. mp=8 on a TPU v2-8); default: one device",
    )


# ---------------------------------------------------------------------------------------- checks
def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options, validated (errors name the flag)."""
    from gptj_jax.sampling import SamplingError, SamplingParams

    chosen = {
        "--temperature": args.temperature, "--top-k": args.top_k, "--top-p": args.top_p, "--min-p": args.min_p,
    }
    given = [flag for flag, value in chosen.items() if value is not None]
    if args.greedy and given:
        raise ValueError(f"--greedy conflicts with {', '.join(given)} (those turn sampling on)")
    if not given and args.num_return_sequences > 1:
        raise ValueError(
            f"--num-return-sequences {args.num_return_sequences} needs sampling (--temperature, --top-k, --top-p "
            "or --min-p): greedy decoding would repeat the same sequence"
        )
    kwargs = {
        "do_sample": bool(given),
        "temperature": 1.0 if args.temperature is None else args.temperature,
        "top_k": 0 if args.top_k is None else args.top_k,
        "top_p": 1.0 if args.top_p is None else args.top_p,
        "min_p": 0.0 if args.min_p is None else args.min_p,
        "repetition_penalty": args.repetition_penalty,
    }
    try:
        SamplingParams(**kwargs)
    except SamplingError as e:
        flag = "--" + e.option.replace("_", "-")
        raise ValueError(f"{flag}: {e}") from None
    return kwargs


def _check_flags(args: argparse.Namespace) -> None:
    for flag, value, low in (
        ("--max-new-tokens", args.max_new_tokens, 1), ("--min-new-tokens", args.min_new_tokens, 0),
        ("--num-return-sequences", args.num_return_sequences, 1), ("--batch-size", args.batch_size, 1),
        ("--stream-interval", args.stream_interval, 1), ("--seed", args.seed, 0),
    ):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.seed >= 2**64:
        raise ValueError(f"--seed must be < 2**64, got {args.seed}")
    if args.min_new_tokens > args.max_new_tokens:
        raise ValueError(f"--min-new-tokens ({args.min_new_tokens}) must be <= --max-new-tokens ({args.max_new_tokens})")
    if args.input is not None and not args.output:
        raise ValueError("--input needs --output (where the results go)")
    if args.prompt is not None and args.output:
        raise ValueError("--output is for batch mode (--input); single-prompt mode prints to stdout")
    if args.stream and args.input is not None:
        raise ValueError("--stream is for single-prompt mode (--prompt)")
    if args.logprobs and args.input is None:
        raise ValueError("--logprobs is for batch mode (--input/--output); single-prompt mode prints text only")
    if args.stream and args.num_return_sequences > 1:
        raise ValueError("--stream prints one sequence; use --num-return-sequences 1")
    if args.no_eos and args.eos_token_id:
        raise ValueError("--no-eos conflicts with --eos-token-id")
    if any(not s for s in args.stop):
        raise ValueError("--stop needs a non-empty string")


def _model(args: argparse.Namespace):
    """``(source, config)`` of ``--model`` (a hub id is fetched or found in the cache now); errors name the flag."""
    from gptj_jax.convert.load import resolve, source_config

    try:
        source = resolve(args.model, args.revision)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--model {e}") from None
    config = source_config(source, args.config)
    return source, config.replace(attention=args.attention, scan_layers=args.scan_layers)


# ---------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    """Run the verb; exceptions propagate (:func:`gptj_jax.cli.main` turns them into one error line)."""
    _check_flags(args)
    sampling = _sampling_kwargs(args)
    flags = model_flags(args)
    source, config = _model(args)

    from gptj_jax import batch
    from gptj_jax.tokenizer import load_tokenizer

    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        tokenizer = load_tokenizer(source.path)
    max_new = args.max_new_tokens
    if args.input is not None:
        prompts = batch.read_prompts(args.input)
        batch.tokenize_prompts(prompts, tokenizer, config, max_new)
        scan = batch.scan_results(args.output, args.input)
    else:
        ids = tokenizer(args.prompt)["input_ids"]
        batch.check_prompt(config, ids, max_new, "--prompt")

    from gptj_jax import load
    from gptj_jax.generation import enable_compilation_cache

    if args.compilation_cache is not None:
        enable_compilation_cache(args.compilation_cache or None)
    mesh = _mesh(args.mesh)
    config, params = load(source, mesh=mesh, dtype=args.dtype, config=config, head="causal_lm",
                          quantize=flags["quantize"], quantize_embeddings=flags["quantize_embeddings"])
    common = dict(
        max_new_tokens=max_new, min_new_tokens=args.min_new_tokens, **sampling,
        eos_token_id=[] if args.no_eos else args.eos_token_id, stop_strings=args.stop or None,
        num_return_sequences=args.num_return_sequences, mesh=mesh, kv_cache=flags["kv_cache"],
    )
    if args.input is not None:
        return _run_batch(args, config, params, tokenizer, prompts, common, scan)
    return _run_single(args, config, params, tokenizer, ids, common)


def _mesh(text: Optional[str]):
    """The ``--mesh`` flag as a ``jax.sharding.Mesh`` (None: single device)."""
    if text is None:
        return None
    from gptj_jax.sharding import mesh_from_string

    return mesh_from_string(text)


def _run_single(args, config, params, tokenizer, ids: list[int], common: dict) -> int:
    from gptj_jax.generation import generate

    out = sys.stdout
    t0 = time.perf_counter()
    if args.stream:
        out.write(args.prompt)
        out.flush()
        printed, collected = [""], []

        def show(chunk) -> None:
            collected.extend(chunk.tokens[0].tolist())
            text = tokenizer.decode(collected[: int(chunk.num_new_tokens[0])], skip_special_tokens=True)
            if chunk.output is None:
                text = text.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for the next token
            if text.startswith(printed[0]):
                out.write(text[len(printed[0]):])
                out.flush()
                printed[0] = text

        result = generate(config, params, [ids], **common, tokenizer=tokenizer, seed=args.seed, streamer=show,
                          stream_interval=args.stream_interval)
        out.write("\n")
    else:
        result = generate(config, params, [ids], **common, tokenizer=tokenizer, seed=args.seed)
        for r in range(result.sequences.shape[0]):
            if r:
                out.write("\n---\n")
            n = int(result.num_new_tokens[r])
            out.write(args.prompt + tokenizer.decode(result.new_tokens[r, :n].tolist(), skip_special_tokens=True))
        out.write("\n")
    out.flush()
    if not args.quiet:
        n = int(result.num_new_tokens.sum())
        dt = time.perf_counter() - t0
        print(f"{n} tokens in {dt:.2f} s ({n / dt:.1f} tokens/s, compilation included)", file=sys.stderr)
    return 0


def _run_batch(args, config, params, tokenizer, prompts: list, common: dict, scan: Any) -> int:
    from gptj_jax.batch import generate_jsonl

    summary = generate_jsonl(config, params, tokenizer, prompts, args.output, scan, seed=args.seed,
                             batch_size=args.batch_size, return_logprobs=args.logprobs, progress=not args.quiet,
                             **common)
    if not args.quiet:
        if not summary.generated:
            print(f"all {summary.prompts} prompts are already in {args.output}", file=sys.stderr)
        else:
            n, dt = summary.tokens, summary.seconds
            print(f"{summary.generated} prompts, {n} tokens in {dt:.1f} s ({n / dt:.1f} tokens/s) -> {args.output}",
                  file=sys.stderr)
    return 0


COMMAND = Command(HELP, add_arguments, run)

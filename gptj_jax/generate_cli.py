"""The ``gptj-jax generate`` verb: flags in, :func:`gptj_jax.generation.generate` out.

    gptj-jax generate --model DIR --prompt TEXT [--max-new-tokens N] [--greedy | --temperature T --top-k K
                      --top-p P --min-p M] [--seed S] [--stream]
    gptj-jax generate --model DIR --input prompts.jsonl --output out.jsonl [--batch-size 8]

Single-prompt mode prints the prompt and its continuation (``--stream``: as it is decoded). Batch mode
reads one JSON object per line (``{"id": ..., "prompt": ...}``), skips ids already in ``--output``
(so an interrupted run resumes), sorts the rest by token length and generates them ``--batch-size`` at
a time, appending one JSON line per prompt (``id``, ``prompt``, ``completion``, ``num_new_tokens``,
``finish_reason``) after each batch. Each prompt's PRNG key comes from ``--seed`` and its id, so a
resumed run samples what an uninterrupted one would have. Completion text is decoded without special
tokens (no ``<|endoftext|>``).

``--output`` must be a new file or a results file this tool wrote (every line a JSON object with
``id`` and ``completion`` / ``completions``); the only defect repaired is a torn last line (no newline,
not JSON: a run killed mid-write), which is cut off with a warning. Anything else, or the ``--input``
file itself, is refused and left as it is.

Everything is checked before anything is written: the flags, the model directory and its
config.json, every prompt (empty? longer than the model allows? ids outside the vocabulary?), the
output file; the weights are loaded last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from typing import Any, Optional

HELP = "generate text with a GPT-J model (one prompt, or a JSONL file of prompts)"

DTYPES = ("float32", "bfloat16", "float16")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``generate`` flags to an (already created) sub-parser."""
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face GPT-J directory (config.json + weights)")
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
    p.add_argument("--dtype", choices=DTYPES, help="cast the weights (and compute) to this dtype (default: as stored)")
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


def add_generate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``generate`` on an ``add_subparsers()`` object; returns its parser."""
    p = subparsers.add_parser("generate", help=HELP, description=HELP)
    add_generate_arguments(p)
    p.set_defaults(func=run_generate)
    return p


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


def _model_config(path: str):
    from gptj_jax.config import GPTJConfig

    if not os.path.exists(path):
        raise FileNotFoundError(f"--model {path}: no such directory")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path}: not a directory (expected a Hugging Face model directory)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model {path}: no config.json in this directory")
    return GPTJConfig.from_pretrained(path)


def _read_prompts(path: str) -> list[dict]:
    """The JSONL input as a list of ``{"id", "prompt"}`` (errors name the line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path}: no such file")
    items, seen = [], set()
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"--input {path} line {n}: not UTF-8 text (byte {e.start}: {e.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--input {path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "id" not in obj or "prompt" not in obj:
                raise ValueError(f'--input {path} line {n}: expected an object with "id" and "prompt"')
            if not isinstance(obj["prompt"], str):
                raise ValueError(f"--input {path} line {n}: prompt must be a string")
            key = json.dumps(obj["id"], sort_keys=True)
            if key in seen:
                raise ValueError(f"--input {path} line {n}: duplicate id {obj['id']!r}")
            seen.add(key)
            items.append({"id": obj["id"], "prompt": obj["prompt"], "line": n})
    if not items:
        raise ValueError(f"--input {path}: no prompts")
    return items


RESULT_KEYS = ("completion", "completions")  # one of these is in every line this tool writes
RECORD_START = b'{"id": '  # how every line this tool writes begins (json.dumps of a dict whose first key is id)


def _same_file(a: str, b: str) -> bool:
    """True when the two paths name one file (through symlinks, relative paths or hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _scan_output(path: str, input_path: str) -> tuple[set[str], int, bool]:
    """Check that ``--output`` may be appended to; returns (ids already there as canonical JSON, the size
    to cut it to, whether a newline must be added before appending).

    The file must not exist, or be a results file this tool wrote: every line a JSON object with ``id``
    and ``completion`` or ``completions``. The one defect accepted is a torn last line (no newline, not
    JSON or cut inside a UTF-8 character, beginning as this tool's lines do: a run killed mid-write), to
    be cut off; anything else raises naming the file and the line, and nothing is changed (this only reads).
    """
    if _same_file(path, input_path):
        raise ValueError(f"--output {path} is the --input file; write the results to another file")
    done: set[str] = set()
    if not os.path.exists(path):
        return done, 0, False
    if not os.path.isfile(path):
        raise ValueError(f"--output {path}: not a regular file")
    with open(path, "rb") as f:
        data = f.read()
    lines = data.splitlines(keepends=True)
    keep, newline = len(data), False
    for n, line in enumerate(lines, 1):
        torn = n == len(lines) and not line.endswith(b"\n")
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if torn and line.startswith(RECORD_START):
                keep = len(data) - len(line)
                break
            raise ValueError(
                f"--output {path} line {n}: not a results line of gptj-jax generate (not JSON); "
                "refusing to append to a file this tool did not write"
            ) from None
        if not isinstance(obj, dict) or "id" not in obj or not any(k in obj for k in RESULT_KEYS):
            raise ValueError(
                f'--output {path} line {n}: not a results line of gptj-jax generate (expected an object with "id" '
                'and "completion" or "completions"); refusing to append to a file this tool did not write'
            )
        done.add(json.dumps(obj["id"], sort_keys=True))
        newline = torn
    return done, keep, newline


def _cut_torn_line(path: str, size: int) -> None:
    """Cut the torn last line ``_scan_output`` found (the file is this tool's, written by appending)."""
    cut = os.path.getsize(path) - size
    if cut > 0:
        print(f"gptj-jax generate: warning: --output {path}: cutting a torn last line ({cut} bytes, not JSON) "
              "left by an interrupted run", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(size)


def _check_prompt(config: Any, ids: list[int], max_new: int, where: str) -> None:
    if not ids:
        raise ValueError(f"{where}: empty prompt (it has no tokens)")
    outside = [i for i in ids if not 0 <= i < config.vocab_size]
    if outside:
        raise ValueError(
            f"{where}: token id {outside[0]} is outside the model's vocabulary (vocab_size {config.vocab_size})"
        )
    if len(ids) + max_new > config.n_positions:
        raise ValueError(
            f"{where}: prompt too long: {len(ids)} tokens + --max-new-tokens {max_new} = {len(ids) + max_new} "
            f"> the model's n_positions {config.n_positions}"
        )


def _prompt_seed(seed: int, item_id: Any) -> int:
    """A prompt's own seed from ``--seed`` and its id (stable across runs and batchings)."""
    return zlib.crc32(f"{seed}:{json.dumps(item_id, sort_keys=True)}".encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------- run
def run_generate(args: argparse.Namespace) -> int:
    """Run the verb; exceptions propagate (the top-level CLI turns them into one error line)."""
    _check_flags(args)
    sampling = _sampling_kwargs(args)
    config = _model_config(args.model)

    from gptj_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    max_new = args.max_new_tokens
    if args.input is not None:
        items = _read_prompts(args.input)
        for item in items:
            item["ids"] = tokenizer(item["prompt"])["input_ids"]
            _check_prompt(config, item["ids"], max_new, f"--input line {item['line']} (id {item['id']!r})")
        scan = _scan_output(args.output, args.input)
    else:
        ids = tokenizer(args.prompt)["input_ids"]
        _check_prompt(config, ids, max_new, "--prompt")

    import jax.numpy as jnp

    from gptj_jax import from_pretrained
    from gptj_jax.generation import enable_compilation_cache

    if args.compilation_cache is not None:
        enable_compilation_cache(args.compilation_cache or None)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(args.dtype)
    config, params = from_pretrained(args.model, dtype=dtype)
    common = dict(
        max_new_tokens=max_new, min_new_tokens=args.min_new_tokens, **sampling,
        eos_token_id=[] if args.no_eos else args.eos_token_id, stop_strings=args.stop or None,
        num_return_sequences=args.num_return_sequences, tokenizer=tokenizer, mesh=_mesh(args.mesh),
    )
    if args.input is not None:
        return _run_batch(args, config, params, tokenizer, items, common, scan)
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

        result = generate(config, params, [ids], **common, seed=args.seed, streamer=show,
                          stream_interval=args.stream_interval)
        out.write("\n")
    else:
        result = generate(config, params, [ids], **common, seed=args.seed)
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


def _run_batch(args, config, params, tokenizer, items: list[dict], common: dict, scan: tuple) -> int:
    from tqdm import tqdm

    from gptj_jax.generation import generate

    done, keep, newline = scan
    if os.path.exists(args.output):
        _cut_torn_line(args.output, keep)
    pending = [it for it in items if json.dumps(it["id"], sort_keys=True) not in done]
    if not pending:
        if not args.quiet:
            print(f"all {len(items)} prompts are already in {args.output}", file=sys.stderr)
        return 0
    # Similar lengths together: fewer padding tokens and fewer distinct compiled shapes.
    pending.sort(key=lambda it: len(it["ids"]))
    bar = tqdm(total=len(pending), unit="prompt", disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
    if done and not args.quiet:
        bar.write(f"resuming: {len(done)} of {len(items)} prompts already in {args.output}")
    generated, t0 = 0, time.perf_counter()
    R = args.num_return_sequences
    with open(args.output, "a", encoding="utf-8") as f:
        if newline:  # a complete last line without its newline
            f.write("\n")
        for start in range(0, len(pending), args.batch_size):
            batch = pending[start: start + args.batch_size]
            result = generate(
                config, params, [it["ids"] for it in batch], **common,
                seed=[_prompt_seed(args.seed, it["id"]) for it in batch], return_logprobs=args.logprobs,
            )
            for b, it in enumerate(batch):
                record: dict[str, Any] = {"id": it["id"], "prompt": it["prompt"]}
                texts, counts, reasons, logprobs = [], [], [], []
                for r in range(b * R, (b + 1) * R):
                    n = int(result.num_new_tokens[r])
                    texts.append(tokenizer.decode(result.new_tokens[r, :n].tolist(), skip_special_tokens=True))
                    counts.append(n)
                    reasons.append(result.finish_reasons[r])
                    if result.logprobs is not None:
                        logprobs.append([round(float(x), 6) for x in result.logprobs[r, :n]])
                    generated += n
                if R == 1:
                    record.update(completion=texts[0], num_new_tokens=counts[0], finish_reason=reasons[0])
                    if logprobs:
                        record["logprobs"] = logprobs[0]
                else:
                    record.update(completions=texts, num_new_tokens=counts, finish_reasons=reasons)
                    if logprobs:
                        record["logprobs"] = logprobs
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
            bar.set_postfix_str(f"{generated / (time.perf_counter() - t0):.1f} tokens/s")
    bar.close()
    if not args.quiet:
        dt = time.perf_counter() - t0
        print(f"{len(pending)} prompts, {generated} tokens in {dt:.1f} s ({generated / dt:.1f} tokens/s) -> {args.output}",
              file=sys.stderr)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m gptj_jax.generate_cli ...`` (the same as ``gptj-jax generate ...``)."""
    parser = argparse.ArgumentParser(prog="gptj-jax generate", description=HELP)
    add_generate_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_generate(args)
    except Exception as e:  # one line, non-zero exit (as gptj_jax.cli does)
        if os.environ.get("GPTJ_JAX_TRACEBACK"):
            raise
        print(f"gptj-jax generate: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Resumable batch generation from a JSONL file of prompts to a JSONL file of results.

The library behind ``gptj-jax generate --input prompts.jsonl --output out.jsonl``; its errors name the
two files by those flags and the line. In the order the verb runs them, so that everything is checked
before the weights are loaded and anything is written::

    prompts = read_prompts("prompts.jsonl")                      # [Prompt]: one per {"id", "prompt"} line
    tokenize_prompts(prompts, tokenizer, config, max_new_tokens)  # Prompt.ids, each checked against config
    results = scan_results("out.jsonl", "prompts.jsonl")         # the ids already done; refuses other files
    config, params = gptj_jax.from_pretrained(...)
    summary = generate_jsonl(config, params, tokenizer, prompts, "out.jsonl", results,
                             max_new_tokens=max_new_tokens, seed=0, batch_size=8)

:func:`generate_jsonl` skips the ids already in the results file (so an interrupted run resumes), sorts
the rest by token length and runs them on the inference engine's scheduler (:class:`gptj_jax.engine.LLM`,
continuous batching: ``batch_size`` prompts decode at once and a finished prompt's decode slots are refilled
at once), appending one JSON line per prompt as soon as it finishes (flushed and fsynced)::

    {"id": ..., "prompt": ..., "completion": TEXT, "num_new_tokens": N, "finish_reason": ..., ["logprobs": [...]]}
    {"id": ..., "prompt": ..., "completions": [TEXT, ...], "num_new_tokens": [N, ...], "finish_reasons": [...]}

(the second form when ``num_return_sequences > 1``; lines come in the order prompts finish). Each prompt's
PRNG seed comes from ``seed`` and its id (:func:`prompt_seed`), so a resumed run samples what an
uninterrupted one would have, and a prompt's result equals ``generate(..., seed=[prompt_seed(seed, id)])``. Completion text is
decoded without special tokens (no ``<|endoftext|>``).

The results file must be new or one this module wrote (every line a JSON object with ``id`` and
``completion`` / ``completions``); the only defect repaired is a torn last line (no newline, not JSON: a
run killed mid-write), which is cut off with a warning. Anything else, or the prompts file itself, is
refused and left as it is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

RESULT_KEYS = ("completion", "completions")  # one of these is in every line this module writes
RECORD_START = b'{"id": '  # how every line this module writes begins (json.dumps of a dict whose first key is id)


@dataclasses.dataclass
class Prompt:
    """One line of the prompts file: its ``id`` (any JSON value, unique), the ``prompt`` text, the 1-based
    ``line`` it came from, and its token ids ``[len]`` (set by :func:`tokenize_prompts`)."""

    id: Any
    prompt: str
    line: int
    ids: Optional[list[int]] = None


class ResultsScan(NamedTuple):
    """What :func:`scan_results` found: the ids already written (as canonical JSON, see :func:`id_key`),
    the size to cut the file to (drops a torn last line), and whether a newline must be added before
    appending (a complete last line without its newline)."""

    done: set[str]
    keep: int
    newline: bool


class BatchSummary(NamedTuple):
    """What :func:`generate_jsonl` did: prompts in the file, prompts already in the results before this run,
    prompts generated now, new tokens generated now, and the seconds the generation took."""

    prompts: int
    already_done: int
    generated: int
    tokens: int
    seconds: float


def id_key(item_id: Any) -> str:
    """A prompt id as canonical JSON (how ids are compared: ``1`` and ``"1"`` differ, key order does not)."""
    return json.dumps(item_id, sort_keys=True)


def read_prompts(path: str) -> list[Prompt]:
    """The prompts file (one ``{"id": ..., "prompt": "..."}`` object per line; blank lines skipped) as a list
    of :class:`Prompt`. Raises (naming the file and the line) for a missing file, text that is not UTF-8 or
    not JSON, a line without ``id`` and a string ``prompt``, a duplicate id, or no prompts at all."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path}: no such file")
    items: list[Prompt] = []
    seen: set[str] = set()
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
            key = id_key(obj["id"])
            if key in seen:
                raise ValueError(f"--input {path} line {n}: duplicate id {obj['id']!r}")
            seen.add(key)
            items.append(Prompt(obj["id"], obj["prompt"], n))
    if not items:
        raise ValueError(f"--input {path}: no prompts")
    return items


def check_prompt(config: Any, ids: Sequence[int], max_new_tokens: int, where: str) -> None:
    """Raise (the message starts with ``where``) if the token ids ``[len]`` are empty, hold an id outside
    ``config.vocab_size``, or leave no room for ``max_new_tokens`` within ``config.n_positions``."""
    if not ids:
        raise ValueError(f"{where}: empty prompt (it has no tokens)")
    outside = [i for i in ids if not 0 <= i < config.vocab_size]
    if outside:
        raise ValueError(
            f"{where}: token id {outside[0]} is outside the model's vocabulary (vocab_size {config.vocab_size})"
        )
    if len(ids) + max_new_tokens > config.n_positions:
        raise ValueError(
            f"{where}: prompt too long: {len(ids)} tokens + --max-new-tokens {max_new_tokens} = "
            f"{len(ids) + max_new_tokens} > the model's n_positions {config.n_positions}"
        )


def tokenize_prompts(prompts: Sequence[Prompt], tokenizer: Any, config: Any, max_new_tokens: int) -> None:
    """Set each prompt's ``ids`` with ``tokenizer`` and :func:`check_prompt` them (errors name the line and id)."""
    for item in prompts:
        item.ids = tokenizer(item.prompt)["input_ids"]
        check_prompt(config, item.ids, max_new_tokens, f"--input line {item.line} (id {item.id!r})")


def _same_file(a: str, b: str) -> bool:
    """True when the two paths name one file (through symlinks, relative paths or hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def scan_results(path: str, input_path: str) -> ResultsScan:
    """Check that the results file ``path`` may be appended to; only reads.

    The file must not exist, or be a results file this module wrote: every line a JSON object with ``id``
    and ``completion`` or ``completions``. The one defect accepted is a torn last line (no newline, not
    JSON or cut inside a UTF-8 character, beginning as this module's lines do: a run killed mid-write), to
    be cut off by :func:`generate_jsonl`; anything else, or ``path`` naming the prompts file ``input_path``,
    raises naming the file and the line.
    """
    if _same_file(path, input_path):
        raise ValueError(f"--output {path} is the --input file; write the results to another file")
    done: set[str] = set()
    if not os.path.exists(path):
        return ResultsScan(done, 0, False)
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
        done.add(id_key(obj["id"]))
        newline = torn
    return ResultsScan(done, keep, newline)


def _cut_torn_line(path: str, size: int) -> None:
    """Cut the torn last line :func:`scan_results` found (the file is this module's, written by appending)."""
    cut = os.path.getsize(path) - size
    if cut > 0:
        print(f"gptj-jax generate: warning: --output {path}: cutting a torn last line ({cut} bytes, not JSON) "
              "left by an interrupted run", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(size)


def prompt_seed(seed: int, item_id: Any) -> int:
    """A prompt's own seed in ``[0, 2**31)`` from the run's ``seed`` and its id (stable across runs and batchings)."""
    return zlib.crc32(f"{seed}:{id_key(item_id)}".encode()) & 0x7FFFFFFF


def _record(item: Prompt, result: Any, tokenizer: Any) -> dict[str, Any]:
    """The results line of one prompt from its :class:`gptj_jax.engine.RequestOutput` (text decoded without
    special tokens)."""
    record: dict[str, Any] = {"id": item.id, "prompt": item.prompt}
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in result.token_ids]
    counts = result.num_new_tokens
    reasons = list(result.finish_reasons)
    logprobs = [] if result.logprobs is None else [[round(float(x), 6) for x in row] for row in result.logprobs]
    if len(texts) == 1:
        record.update(completion=texts[0], num_new_tokens=counts[0], finish_reason=reasons[0])
        if logprobs:
            record["logprobs"] = logprobs[0]
    else:
        record.update(completions=texts, num_new_tokens=counts, finish_reasons=reasons)
        if logprobs:
            record["logprobs"] = logprobs
    return record


def generate_jsonl(
    config: Any,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    output: str,
    scan: ResultsScan,
    *,
    seed: int = 0,
    batch_size: int = 8,
    return_logprobs: bool = False,
    progress: bool = True,
    **generate_kwargs: Any,
) -> BatchSummary:
    """Generate a continuation for every prompt not yet in the results file ``output`` and append its line.

    ``prompts`` come from :func:`read_prompts` with ``ids`` set (:func:`tokenize_prompts`); ``scan`` is
    :func:`scan_results` of ``output``, taken before the weights were loaded. A torn last line it found is
    cut first (with a warning on stderr). The prompts run on one :class:`gptj_jax.engine.LLM` with
    ``batch_size * num_return_sequences`` decode slots (continuous batching), shortest first, each with
    :func:`prompt_seed` of ``seed`` and its id; ``generate_kwargs`` are :class:`~gptj_jax.GenerationConfig`
    fields (``max_new_tokens``, sampling options, ``num_return_sequences``, ``eos_token_id``,
    ``stop_strings``...) plus ``mesh``, ``dtype`` and ``kv_cache`` (for the engine); ``tokenizer`` decodes the results and
    checks stop strings. Each result is appended (flushed and fsynced) as soon as its prompt finishes.
    ``progress``: a progress bar and a "resuming" line on stderr.
    """
    from tqdm import tqdm

    from gptj_jax.engine import LLM
    from gptj_jax.generation import bucket

    done, keep, newline = scan
    if os.path.exists(output):
        _cut_torn_line(output, keep)
    pending = [it for it in prompts if id_key(it.id) not in done]
    if not pending:
        return BatchSummary(len(prompts), len(done), 0, 0, 0.0)
    # Similar lengths together: fewer distinct prompt buckets in flight at once.
    pending.sort(key=lambda it: len(it.ids))
    mesh, dtype = generate_kwargs.pop("mesh", None), generate_kwargs.pop("dtype", None)
    kv_cache = generate_kwargs.pop("kv_cache", None)
    R = int(generate_kwargs.get("num_return_sequences", 1))
    slots = batch_size * R
    if mesh is not None:
        from gptj_jax import sharding

        data = sharding.axis_size(mesh, sharding.logical_to_mesh(("batch",))[0])
        slots = -(-slots // data) * data
    max_new = int(generate_kwargs["max_new_tokens"])
    max_len = min(bucket(len(pending[-1].ids) + max_new, 8), config.n_positions)
    llm = LLM(config, params, max_slots=slots, max_len=max_len, dtype=dtype, mesh=mesh, tokenizer=tokenizer,
              max_waiting=2 * batch_size, kv_cache=kv_cache)
    bar = tqdm(total=len(pending), unit="prompt", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    if done and progress:
        bar.write(f"resuming: {len(done)} of {len(pending) + len(done)} prompts already in {output}")
    generated, t0 = 0, time.perf_counter()
    finished: list[tuple[Prompt, Any]] = []
    with open(output, "a", encoding="utf-8") as f:
        if newline:  # a complete last line without its newline
            f.write("\n")
        todo = iter(pending)
        item = next(todo, None)
        busy = True
        while busy or item is not None:
            while item is not None and llm.num_waiting < 2 * batch_size:
                llm.submit(item.ids, seed=prompt_seed(seed, item.id), logprobs=return_logprobs,
                           callback=lambda chunk, it=item: finished.append((it, chunk.output)) if chunk.output else None,
                           **generate_kwargs)
                item = next(todo, None)
            busy = llm.step()
            if not finished:
                continue
            for it, result in finished:
                if result.error is not None:
                    raise RuntimeError(f"--input line {it.line} (id {it.id!r}): generation failed: {result.error}") \
                        from result.error
                f.write(json.dumps(_record(it, result, tokenizer), ensure_ascii=False) + "\n")
                generated += sum(result.num_new_tokens)
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(finished))
            bar.set_postfix_str(f"{generated / (time.perf_counter() - t0):.1f} tokens/s")
            finished.clear()
    bar.close()
    return BatchSummary(len(prompts), len(done), len(pending), generated, time.perf_counter() - t0)

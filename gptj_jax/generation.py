"""Jitted prefill and decode over an explicit KV cache, and ``generate``.

Axis letters: ``B`` rows, ``P`` prompt length, ``N`` new-token slots, ``S`` cache slots (``P + N``),
``V`` vocab.

Pieces, each usable on its own:

* :func:`forward_cached` ``(params, tokens [B, T], mask [B, T], cache) -> (last_logits [B, V], cache)``: the
  one model call generation compiles (prefill, decode, ``plan`` and the benchmarks all run it): ``T``
  tokens per row into the cache (``cache.py``'s layout) at each row's next slots, the LM head at the last
  position only.
* :func:`prefill` ``(params, tokens [B, P], attention_mask [B, P]) -> (last_logits [B, V], cache)``:
  runs the prompt through the model into a freshly allocated ``cache_len``-slot cache and computes the
  LM head only at the last position (with left padding, the last real token of every row).
* :func:`decode_step` ``(params, cache, tokens [B]) -> (logits [B, V], cache)``: one token per row; the
  cache is donated and updated in place. A full cache (a row's ``cache["index"] == S``) is an error.
* :func:`generate`: the whole job, knobs from a :class:`~gptj_jax.generation_config.GenerationConfig`
  and/or keywords, run on the inference engine (:mod:`gptj_jax.engine`). The prompt batch is left-padded
  into a *bucket* (lengths and batch sizes rounded up to ``2^k`` or ``3 * 2^(k-1)``; ``max_new_tokens``
  likewise), prefilled and its first tokens sampled; the rows are inserted into an engine with one decode
  slot per row, and decode steps (one compiled program, the state donated: the cache is allocated once and
  updated in place) are dispatched a few ahead of the host until every row has finished (EOS,
  ``max_new_tokens`` or a stop string). Sampling knobs (temperature, top-k, top-p, min-p, penalty, n-gram
  size, bad words), ``max_new_tokens``, ``min_new_tokens``, EOS ids and the seed are traced values: a new
  prompt in the same bucket, or new knob values, reuse the compiled programs.

Streaming and stop strings read the steps' tokens on the host while the device runs the next steps; a
chunk is handed out every ``stream_interval`` steps.

``enable_compilation_cache()`` turns on JAX's persistent compilation cache so a second process start
skips XLA compilation (see docs/generation.md).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from collections.abc import Iterator
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .cache import Cache, check_kv_cache, init_cache
from .config import GPTJConfig
from .generation_config import GenerationConfig, GenerationError
from .model import GPTJForCausalLM
from .quantize import dequantize

Array = jax.Array
Params = Any

__all__ = [
    "GenerateOutput", "GenerationConfig", "GenerationError", "StreamChunk", "bucket", "decode_step",
    "enable_compilation_cache", "forward_cached", "generate", "iter_generate", "prefill",
]

EOS_SLOTS = 8  # EOS ids are passed as a traced array of at least this many slots (unused slots -1)
SAFE_ID = 0  # what the model is fed at masked (pad) positions and for finished rows: always in the vocab

# How many times each compiled function was traced (tests check a second call in the same bucket adds none).
TRACE_COUNTS: collections.Counter = collections.Counter()


# ---------------------------------------------------------------------------------------- buckets
def bucket(n: int, minimum: int = 1) -> int:
    """Smallest size >= max(n, minimum) of the form ``2^k`` or ``3 * 2^(k-1)`` (1, 2, 3, 4, 6, 8, 12, 16, 24...).

    At most a third of a bucket is padding, and the number of distinct shapes grows like ``2 log2(n)``.
    """
    n = max(int(n), int(minimum), 1)
    size = 1
    while True:
        if size >= n:
            return size
        if size >= 2 and size * 3 // 2 >= n:
            return size * 3 // 2
        size *= 2


# ---------------------------------------------------------------------------------------- compilation cache
def enable_compilation_cache(directory: Optional[str] = None) -> str:
    """Turn on JAX's persistent compilation cache in ``directory`` and return its path.

    Default: ``$GPTJ_JAX_COMPILATION_CACHE`` or ``~/.cache/gptj_jax/xla``. Every compiled program (of any
    compile time or size) is written there, so a later process with the same shapes, flags and jax
    version loads it instead of compiling. Call before the first generate; it is process-wide.
    """
    directory = directory or os.environ.get("GPTJ_JAX_COMPILATION_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "gptj_jax", "xla"
    )
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


# ---------------------------------------------------------------------------------------- model steps
def forward_cached(
    params: Params, tokens: Array, mask: Optional[Array], cache: Cache, *, config: GPTJConfig, dtype: Any
) -> tuple[Array, Cache]:
    """tokens, mask ``[B, T]`` into ``cache`` -> (logits at the last position ``[B, V]`` float32, cache).

    Row ``b``'s tokens go to its slots ``cache["index"][b] ..`` (``cache.py``). ``mask`` None means every
    token is real. Masked positions are fed ``SAFE_ID`` whatever they hold (a pad id outside the vocabulary
    would embed as NaN, and NaN keys/values poison the real positions through the masked attention
    weights). Not jitted: callers jit it (with the cache donated) as part of their program.
    """
    if mask is not None:
        tokens = jnp.where(mask > 0, tokens, SAFE_ID)
    params = dequantize(params)  # int8 weights (quantize.py) -> float, inside the caller's jit
    out = GPTJForCausalLM(config, dtype=dtype).apply(
        {"params": params}, tokens, attention_mask=mask, cache=cache, logits_to_keep=1
    )
    return out.logits[:, -1], out.cache


def _prefill(params: Params, tokens: Array, mask: Array, config: GPTJConfig, cache_len: int, dtype: Any,
             kv_cache: Optional[str] = None):
    """tokens, mask ``[B, P]`` -> (logits at the last position ``[B, V]`` float32, cache with ``cache_len`` slots)."""
    cache = init_cache(config, tokens.shape[0], cache_len, dtype, kv_cache)
    return forward_cached(params, tokens, mask, cache, config=config, dtype=dtype)


def _forward_one(params: Params, cache: Cache, tokens: Array, config: GPTJConfig, dtype: Any):
    """tokens ``[B]`` at the next slot of every row -> (logits ``[B, V]`` float32, cache)."""
    return forward_cached(params, tokens[:, None], None, cache, config=config, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("config", "cache_len", "dtype", "kv_cache"))
def prefill(
    params: Params, tokens: Array, attention_mask: Array, *, config: GPTJConfig, cache_len: int,
    dtype: Any = jnp.float32, kv_cache: Optional[str] = None,
) -> tuple[Array, Cache]:
    """Run a left-padded prompt batch into a new cache.

    tokens, attention_mask ``[B, P]`` (1 = real token; pads on the left). Returns the logits of the last
    position ``[B, V]`` float32 (the LM head runs only there) and a cache (``cache.py``'s layout) with
    ``cache_len >= P`` slots, of which the first ``P`` are filled (``cache["index"]`` is ``P`` in every row).
    Positions are ``cumsum(mask) - 1`` per row. ``kv_cache="int8"``: the cache holds int8 K/V with per-head
    scales (``cache.init_cache``); ``decode_step`` takes either cache.
    """
    TRACE_COUNTS["prefill"] += 1
    if cache_len < tokens.shape[1]:
        raise GenerationError(f"cache_len {cache_len} is shorter than the prompt ({tokens.shape[1]} tokens)")
    return _prefill(params, tokens, attention_mask, config, cache_len, dtype, kv_cache)


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("cache",))
def _decode_step(params: Params, cache: Cache, tokens: Array, *, config: GPTJConfig,
                 dtype: Any = jnp.float32) -> tuple[Array, Cache]:
    TRACE_COUNTS["decode_step"] += 1
    return _forward_one(params, cache, tokens, config, dtype)


def decode_step(
    params: Params, cache: Cache, tokens: Array, *, config: GPTJConfig, dtype: Any = jnp.float32,
) -> tuple[Array, Cache]:
    """Feed one token per row (``tokens [B]`` int) and return its logits ``[B, V]`` float32 and the cache.

    The cache (as ``prefill`` made it) is donated: its buffers are updated in place and the argument must
    not be used afterwards. A full cache (a row whose ``cache["index"]`` equals the ``S`` slots) raises
    :class:`GenerationError` before anything runs; the check reads ``cache["index"]`` on the host, so
    each call waits for the previous step (``generate`` does not use this function).
    """
    slots = cache["mask"].shape[1]  # [B, S]
    index = np.asarray(jax.device_get(cache["index"])).reshape(-1)  # [B]
    if (index >= slots).any():
        row = int(np.argmax(index))
        raise GenerationError(
            f"decode_step: the cache is full (cache['index'] = {int(index[row])}, {slots} slots) in row {row}; "
            f"prefill with a larger cache_len"
        )
    return _decode_step(params, cache, tokens, config=config, dtype=dtype)


decode_step.lower = _decode_step.lower  # ahead-of-time lowering, as on any jitted function (no cache check)


# ---------------------------------------------------------------------------------------- results
@dataclasses.dataclass
class GenerateOutput:
    """What :func:`generate` returns. ``rows = batch * num_return_sequences`` (row ``b * R + r``)."""

    sequences: np.ndarray  # [rows, prompt_len + max_new_tokens] int32: prompt, new tokens, pad after the end
    prompt_length: int  # columns of the prompt part
    num_new_tokens: np.ndarray  # [rows] int32: new tokens per row, counting the EOS token / stop-string token
    finish_reasons: list  # per row: "eos", "stop_string" or "length"
    logprobs: Optional[np.ndarray] = None  # [rows, max_new_tokens] float32 (0 after a row ends) if asked:
    # log_softmax of the processed logits at the chosen token (see sampling.sample)

    @property
    def new_tokens(self) -> np.ndarray:
        """``[rows, max_new_tokens]``: the generated part of ``sequences``."""
        return self.sequences[:, self.prompt_length:]


@dataclasses.dataclass
class StreamChunk:
    """New tokens since the previous chunk: ``tokens [rows, n]`` (pad once a row has ended), ``start``
    the index (among new tokens) of the first column, ``num_new_tokens [rows]`` the real new tokens of
    each row so far, ``done [rows]``. The final chunk carries ``output`` (the :class:`GenerateOutput`)."""

    tokens: np.ndarray
    start: int
    num_new_tokens: np.ndarray
    done: np.ndarray
    output: Optional[GenerateOutput] = None


# ---------------------------------------------------------------------------------------- input checks
def _as_batch(input_ids: Any, attention_mask: Any, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` as ``[B, P]`` int64 and a 0/1 mask. Accepts arrays ``[B, P]`` / ``[P]`` and ragged lists."""
    if isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(r, (list, tuple, np.ndarray)) for r in input_ids):
        lens = [len(r) for r in input_ids]
        if attention_mask is None and len(set(lens)) > 1:  # ragged: left-pad here
            P = max(lens)
            ids = np.zeros((len(lens), P), np.int64)
            mask = np.zeros((len(lens), P), np.int64)
            for b, row in enumerate(input_ids):
                if len(row):
                    ids[b, P - len(row):] = np.asarray(row, np.int64)
                    mask[b, P - len(row):] = 1
            input_ids, attention_mask = ids, mask
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise GenerationError(f"input_ids must be [batch, length] (or one prompt [length]), got shape {ids.shape}")
    if ids.shape[0] == 0:
        raise GenerationError("input_ids has no rows: pass at least one prompt")
    if ids.shape[1] == 0:
        raise GenerationError("empty prompt: input_ids has length 0 (a prompt needs at least one token)")
    if not np.issubdtype(ids.dtype, np.integer):
        raise GenerationError(f"input_ids must be integers, got dtype {ids.dtype}")
    if attention_mask is None:
        mask = np.ones(ids.shape, np.int64)
    else:
        mask = np.asarray(attention_mask)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise GenerationError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise GenerationError("attention_mask must hold only 0 (pad) and 1 (token)")
        mask = mask.astype(np.int64)
    real = mask.astype(bool)
    bad = ((ids < 0) | (ids >= vocab_size)) & real
    if bad.any():
        b, t = np.argwhere(bad)[0]
        raise GenerationError(f"input_ids[{b}, {t}] = {ids[b, t]} is outside the vocabulary [0, {vocab_size})")
    for b in range(ids.shape[0]):
        n = int(real[b].sum())
        if n == 0:
            raise GenerationError(f"empty prompt: row {b} has no tokens with attention_mask 1")
        where = np.flatnonzero(real[b])
        if where[-1] - where[0] + 1 != n:
            raise GenerationError(
                f"attention_mask row {b} has holes; pads must be on one side only (left or right padding)"
            )
    return ids.astype(np.int64), mask


def _eos_list(gc: GenerationConfig, config: GPTJConfig) -> tuple[int, ...]:
    """The EOS ids, any number of them. Explicit ids must lie in the vocabulary; the config's default may
    not (a small model saved by Transformers keeps GPT-2's 50256): such an id can never be produced."""
    if gc.eos_ids is None:
        return tuple(int(e) for e in config.eos_token_ids)
    for e in gc.eos_ids:
        if not e < config.vocab_size:
            raise GenerationError(f"eos_token_id {e!r} is not a token id in [0, {config.vocab_size})", "eos_token_id")
    return gc.eos_ids


def _check_pad(gc: GenerationConfig, config: GPTJConfig, eos: tuple[int, ...]) -> int:
    """The pad id written after a row ends. An explicit ``pad_token_id`` must lie in the vocabulary; the
    default (``config.pad_token_id``, else the first EOS id, else 0) may not, like the config's EOS ids.
    The model itself is never fed the pad id (``SAFE_ID`` instead), so it only shows in the output."""
    if gc.pad_token_id is None:
        return int(config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0))
    if gc.pad_token_id >= config.vocab_size:
        raise GenerationError(
            f"pad_token_id {gc.pad_token_id} is outside the vocabulary [0, {config.vocab_size}) (config.vocab_size = "
            f"{config.vocab_size})", "pad_token_id",
        )
    return gc.pad_token_id


def resolve_config(
    generation_config: Optional[GenerationConfig] = None, return_logprobs: Optional[bool] = None, **overrides: Any
) -> GenerationConfig:
    """``generation_config`` (default: ``GenerationConfig()``) with keyword ``overrides`` on top, validated
    (an unknown keyword is a :class:`GenerationError` naming it); ``return_logprobs`` is ``logprobs``."""
    gc = GenerationConfig() if generation_config is None else generation_config
    if not isinstance(gc, GenerationConfig):
        raise GenerationError(f"generation_config must be a GenerationConfig, got {type(gc).__name__}")
    if return_logprobs is not None:
        overrides["logprobs"] = return_logprobs
    return gc.replace(**overrides)


# ---------------------------------------------------------------------------------------- generate
def generate(
    config: GPTJConfig,
    params: Params,
    input_ids: Any,
    attention_mask: Any = None,
    generation_config: Optional[GenerationConfig] = None,
    *,
    return_logprobs: Optional[bool] = None,
    mesh: Any = None,
    streamer: Optional[Callable[[StreamChunk], Any]] = None,
    tokenizer: Any = None,
    dtype: Any = None,
    stream_interval: int = 8,
    kv_cache: Optional[str] = None,
    **overrides: Any,
) -> GenerateOutput:
    """Generate continuations of a batch of prompts (Transformers' ``generate`` semantics).

    Args:
      config, params: the model (``params`` as from ``from_pretrained`` or ``init_params``; any dtype).
      input_ids: ``[B, P]`` ints (or one prompt ``[P]``, or a ragged list of lists, left-padded here).
      attention_mask: ``[B, P]`` 0/1; pads on either side (rows are re-padded on the left).
      generation_config: the knobs (:class:`~gptj_jax.generation_config.GenerationConfig`; default
        ``GenerationConfig()``). ``**overrides``, any of its fields as keywords (``max_new_tokens=20,
        do_sample=True, seed=3, ...``), apply on top; an unknown keyword is an error naming it. Fields:
      max_new_tokens: tokens to generate per row (>= 1, required); ``P_real + max_new_tokens <= n_positions``.
      min_new_tokens: EOS is banned until a row has this many new tokens.
      do_sample: False = greedy; True samples with temperature / top_k / top_p / min_p (Transformers' order).
      repetition_penalty: > 0; 1 is off. Applies to the real prompt tokens and the generated ones.
      no_repeat_ngram_size: > 0 bans any token that would repeat an n-gram of the row (prompt included).
      bad_words_ids: token sequences never generated (``[[id], [id, id], ...]``); one-token entries equal to
        an EOS id are dropped, as in Transformers. Ids must be in ``[0, vocab_size)``.
      num_beams: > 1 runs beam search (:func:`gptj_jax.beam.beam_search`: ``length_penalty``,
        ``early_stopping``, ``num_return_sequences <= num_beams``; no sampling, stop strings or streaming).
      eos_token_id: one id or several (any number); None = ``config.eos_token_id``; ``[]`` = no EOS. Explicit
        ids must be in ``[0, vocab_size)``; a config EOS outside it (GPT-2's 50256 in a small model) is
        never produced.
      pad_token_id: written after a row ends (and left of right-padded prompts) in ``sequences``; None =
        ``config.pad_token_id``, else the first EOS id, else 0. An explicit id must be in the vocabulary;
        the default may lie outside it. The model is never fed the pad id (masked positions and finished
        rows get id 0), so it cannot change the real rows.
      stop_strings: a row also ends when its generated text contains one of these (needs ``tokenizer``);
        the token that completes the string is kept, later ones become pad. The text is decoded without
        special tokens and ends before an EOS token (a row that ended on EOS reports "eos").
      num_return_sequences: rows per prompt (row ``b * R + r``), each with its own PRNG key. Values > 1
        need ``do_sample=True`` (greedy rows would all be the same; Transformers raises too).
      seed: an int in ``[0, 2**64)``: output row ``i`` draws from ``fold_in(key(seed), i)``; or one seed per
        prompt: row ``b * R + r`` draws from ``fold_in(key(seed[b]), r)`` (a prompt's result then does not
        depend on the batch it is in). ``key(s)`` is ``[s >> 32, s & 0xFFFFFFFF]``, which is
        ``jax.random.PRNGKey(s)`` for ``s < 2**32``. Either way, bucketing does not change results.
      logprobs / return_logprobs: also return each chosen token's log-probability under the processed
        distribution: the log-softmax after the logits processors (for greedy: repetition penalty, n-gram
        rule, bad words, min_new_tokens and suppression, so with suppression on it is renormalised over
        the 50257 text ids).
      suppress_extra_tokens: ban ids >= 50257 (GPT-J's padding vocabulary, no text). None = on when
        ``config.vocab_size == 50400`` and the tokenizer is GPT-J's (or not given).
      mesh: a ``jax.sharding.Mesh`` (``dp``, ``fsdp``, ``mp``): params and cache are sharded with
        ``gptj_jax.sharding``'s rules and the batch over ``dp x fsdp``.
      streamer: called with a :class:`StreamChunk` every ``stream_interval`` steps (and at the end).
      tokenizer: needed for ``stop_strings``; GPT-J's tokenizer also turns on ``suppress_extra_tokens``.
      dtype: compute dtype (default: the dtype of the params' embedding); the cache uses it too.
      kv_cache: ``"int8"`` stores K/V as int8 with one float32 scale per (row, head, slot), dequantized in
        ``dtype`` when read (``cache.py``; about half the cache bytes of bfloat16); None (default): K/V in ``dtype``.

    Returns a :class:`GenerateOutput` whose ``sequences`` are ``[B * R, P + max_new_tokens]``; with
    ``num_beams > 1``, :func:`gptj_jax.beam.beam_search`'s :class:`~gptj_jax.beam.BeamOutput` (the same
    fields plus ``sequence_scores``; beam search does not stream: a ``streamer`` is an error).
    """
    if resolve_config(generation_config, return_logprobs, **overrides).num_beams > 1:
        from .beam import beam_search

        return beam_search(
            config, params, input_ids, attention_mask, generation_config, return_logprobs=return_logprobs,
            mesh=mesh, streamer=streamer, tokenizer=tokenizer, dtype=dtype, stream_interval=stream_interval,
            kv_cache=kv_cache, **overrides,
        )
    stream = iter_generate(
        config, params, input_ids, attention_mask, generation_config, return_logprobs=return_logprobs, mesh=mesh,
        tokenizer=tokenizer, dtype=dtype, stream_interval=stream_interval if streamer is not None else None,
        kv_cache=kv_cache, **overrides,
    )
    output = None
    for chunk in stream:
        if streamer is not None:
            streamer(chunk)
        output = chunk.output
    return output


def iter_generate(
    config: GPTJConfig,
    params: Params,
    input_ids: Any,
    attention_mask: Any = None,
    generation_config: Optional[GenerationConfig] = None,
    *,
    return_logprobs: Optional[bool] = None,
    mesh: Any = None,
    tokenizer: Any = None,
    dtype: Any = None,
    stream_interval: Optional[int] = 8,
    kv_cache: Optional[str] = None,
    **overrides: Any,
) -> Iterator[StreamChunk]:
    """:func:`generate` as an iterator of :class:`StreamChunk` (every ``stream_interval`` decode steps;
    ``None`` = one chunk at the end). The last chunk's ``output`` is the :class:`GenerateOutput`.
    Arguments are validated when this is called, before anything runs on the device.
    """
    from .engine import plan_request

    # ---- validate everything before touching the device
    if not isinstance(config, GPTJConfig):
        raise GenerationError(f"config must be a GPTJConfig, got {type(config).__name__}")
    check_kv_cache(kv_cache)
    gc = resolve_config(generation_config, return_logprobs, **overrides)
    if gc.max_new_tokens is None:
        raise GenerationError(
            "max_new_tokens is not set: pass max_new_tokens=... (or a GenerationConfig with it)", "max_new_tokens"
        )
    if gc.num_beams > 1:
        raise GenerationError(
            f"num_beams {gc.num_beams}: beam search does not stream (a beam's tokens are not final until the "
            "search ends); call generate(..., num_beams=...) without a streamer, or pass num_beams=1", "num_beams"
        )
    if stream_interval is not None and (
        not isinstance(stream_interval, (int, np.integer)) or isinstance(stream_interval, bool) or stream_interval < 1
    ):
        raise GenerationError(f"stream_interval must be an integer >= 1, got {stream_interval!r}", "stream_interval")
    stream_interval = None if stream_interval is None else int(stream_interval)
    ids, mask = _as_batch(input_ids, attention_mask, config.vocab_size)
    B = ids.shape[0]
    if isinstance(gc.seed, tuple) and len(gc.seed) != B:
        raise GenerationError(
            f"seed has {len(gc.seed)} values but there are {B} prompts (pass one int or one per prompt)", "seed"
        )
    lengths = mask.sum(axis=1)  # [B] real tokens per row
    longest = int(lengths.max())
    if longest + gc.max_new_tokens > config.n_positions:
        row = int(lengths.argmax())
        raise GenerationError(
            f"prompt too long: row {row} has {longest} tokens + max_new_tokens {gc.max_new_tokens} = "
            f"{longest + gc.max_new_tokens} > the model's n_positions {config.n_positions}"
        )
    plan = plan_request(config, gc, tokenizer=tokenizer)  # EOS, pad, bad words, stop strings, suppression
    try:
        params["transformer"]["wte"]["embedding"]
    except (KeyError, TypeError):
        raise GenerationError("params are not a GPT-J causal-LM tree (no transformer/wte/embedding)") from None
    row_multiple = 1
    if mesh is not None:
        from . import sharding

        sharding.validate_config(config, mesh, "causal_lm")
        row_multiple = sharding.axis_size(mesh, sharding.logical_to_mesh(("batch",))[0])
    job = _Job(gc, ids, mask, plan, tokenizer)
    return _iterate(config, params, job, dtype, mesh, row_multiple, stream_interval, kv_cache)


@dataclasses.dataclass(frozen=True)
class _Job:
    """A validated generate call: its knobs and the host-side inputs derived from them."""

    gc: GenerationConfig
    ids: np.ndarray  # [B, P_in] as given (or left-padded from a ragged list)
    mask: np.ndarray  # [B, P_in] 0/1
    plan: Any  # engine.RequestPlan: resolved EOS ids, pad id, bad-words table, suppression, sampling spec
    tokenizer: Any


LOOKAHEAD = 2  # decode steps dispatched ahead of the host
STOP_CHECK = 8  # without streaming, stop strings are checked every this many new tokens (and at the end)


def _iterate(config: GPTJConfig, params: Params, job: _Job, dtype: Any, mesh: Any, row_multiple: int,
             stream_interval: Optional[int], kv_cache: Optional[str] = None) -> Iterator[StreamChunk]:
    """Run the call on an :class:`~gptj_jax.engine.Engine` sized for it: ``B_b * R`` decode slots of
    ``P_b + N_b`` cache slots; every prompt prefilled in one program and inserted at once; then decode steps,
    dispatched ``LOOKAHEAD`` ahead of the host, until every row has ended."""
    from .engine import Engine

    gc, ids, mask, plan = job.gc, job.ids, job.mask, job.plan
    B, P_in = ids.shape
    max_new, repeats = gc.max_new_tokens, gc.num_return_sequences
    lengths = mask.sum(axis=1)
    longest = int(lengths.max())
    # ---- buckets: prompts [B_b, P_b] (rows >= B only fill the bucket and start done), new tokens N_b
    P_b = bucket(longest, 8)
    B_b = bucket(B)
    B_b = -(-B_b // row_multiple) * row_multiple
    N_b = bucket(max_new, 8)
    rows = B_b * repeats
    eos = plan.eos
    eos_slots = max(EOS_SLOTS, 1 << (len(eos) - 1).bit_length() if eos else 0)  # 8, or the power of two above
    engine = Engine(
        config, params, max_slots=rows, max_len=P_b + N_b, dtype=dtype, mesh=mesh, eos_slots=eos_slots,
        bad_words_capacity=(1, 1) if plan.bad_words is None else tuple(plan.bad_words.shape), kv_cache=kv_cache,
    )
    prompts = np.zeros((B, longest), np.int64)  # each prompt's real tokens first
    for b in range(B):
        real = ids[b][mask[b].astype(bool)]
        prompts[b, : len(real)] = real
    state = engine.init_decode_state()
    prefix = engine.prefill(engine.params, prompts, lengths, plan, rows=B_b)  # keys: generate's row keys
    state = engine.insert(prefix, state, 0)
    pending = collections.deque([(prefix.tokens, prefix.logprobs, prefix.done)])
    del prefix
    for x in jax.tree.leaves(pending[0]):
        x.copy_to_host_async()

    live = np.repeat(np.arange(B_b) < B, repeats)  # [rows]
    out_rows = B * repeats
    tokens = np.full((rows, max_new), plan.pad_id, np.int64)  # the pad id after a row ends
    logprobs = np.zeros((rows, max_new), np.float32) if gc.logprobs else None
    n_new = np.zeros((rows,), np.int64)
    done = ~live  # host view: the row has ended (EOS, max_new_tokens or a stop string)
    stop_cut = np.full((rows,), -1, np.int64)  # index of the token that completed a stop string
    stop_strings, tokenizer = list(gc.stop_strings), job.tokenizer
    check_every = stream_interval or STOP_CHECK
    dispatched = columns = checked = emitted = 0
    while True:
        while dispatched < max_new - 1 and len(pending) <= LOOKAHEAD and not done.all():
            state, result = engine.generate(engine.params, state)
            step = (result.tokens, result.logprobs, result.done)
            for x in jax.tree.leaves(step):
                x.copy_to_host_async()
            pending.append(step)
            dispatched += 1
        tok, lp, ended = (None if x is None else np.asarray(x) for x in pending.popleft())
        take = ~done  # rows still running get this column
        tokens[take, columns] = tok[take]
        if logprobs is not None:
            logprobs[take, columns] = lp[take]
        n_new += take
        done = done | (take & ended)
        columns += 1
        if stop_strings and (columns % check_every == 0 or columns >= max_new or done.all()):
            for r, cut in _find_stop_strings(tokens, n_new, stop_cut, live, checked, stop_strings, tokenizer,
                                             eos).items():
                stop_cut[r] = cut
                done[r] = True
            checked = columns
        finished = columns >= max_new or bool(done.all())
        if not finished and (stream_interval is None or columns % stream_interval):
            continue
        cut_tokens, n_new_eff = _apply_cuts(tokens, n_new, stop_cut, plan.pad_id)
        output = None
        if finished:
            lp_out = None
            if logprobs is not None:
                cols = np.arange(max_new)[None, :]
                lp_out = np.where(cols < n_new_eff[:out_rows, None], logprobs[:out_rows], 0.0).astype(np.float32)
            output = _assemble(ids, mask, P_in, cut_tokens[:out_rows], n_new_eff[:out_rows], stop_cut[:out_rows], eos,
                               plan.pad_id, repeats, lp_out)
        yield StreamChunk(
            cut_tokens[:out_rows, emitted:columns], emitted, n_new_eff[:out_rows].copy(), done[:out_rows].copy(), output
        )
        emitted = columns
        if finished:
            return


def _apply_cuts(tokens: np.ndarray, n_new: np.ndarray, stop_cut: np.ndarray, pad_id: int):
    """Pad the tokens after each stop-string cut; returns (tokens, new-token counts)."""
    tokens = tokens.copy()
    n_new = n_new.copy()
    for r in np.flatnonzero(stop_cut >= 0):
        tokens[r, stop_cut[r] + 1:] = pad_id
        n_new[r] = stop_cut[r] + 1
    return tokens, n_new


def _find_stop_strings(tokens, n_new, stop_cut, live, emitted, stop_strings, tokenizer, eos) -> dict:
    """Rows whose generated text gained a stop string in this chunk -> index of the token that completed it.

    The text is decoded without special tokens (no ``<|endoftext|>``) and stops before an EOS token: a
    row that ended on EOS keeps ``finish_reason`` "eos" unless a stop string completed before it.
    """
    found = {}
    for r in np.flatnonzero(live):
        n = int(n_new[r])
        if stop_cut[r] >= 0 or n <= emitted:  # already cut, or nothing new since the last check
            continue
        if int(tokens[r, n - 1]) in eos:  # a real token that is an EOS id is the row's last
            n -= 1
        text = _text(tokenizer, tokens[r, :n])
        hits = [text.find(s) + len(s) for s in stop_strings if s in text]
        if not hits:
            continue
        end = min(hits)
        # the first token whose prefix text reaches the end of the stop string
        for t in range(n):
            if len(_text(tokenizer, tokens[r, : t + 1])) >= end:
                found[int(r)] = t
                break
    return found


def _text(tokenizer: Any, ids: np.ndarray) -> str:
    """Generated text as the user sees it: special tokens (``<|endoftext|>``...) are left out."""
    return tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def _assemble(ids, mask, P_in, new_tokens, n_new, stop_cut, eos, pad_id, repeats, logprobs):
    """Prompts (as given if left-padded, else re-padded on the left) + new tokens, rows repeated."""
    B = ids.shape[0]
    prompt = ids.copy()
    for b in range(B):
        real = mask[b].astype(bool)
        if not real[-1]:  # right-padded: move the real tokens to the right
            tok = ids[b][real]
            prompt[b] = pad_id
            prompt[b, P_in - len(tok):] = tok
    prompt = np.repeat(prompt, repeats, axis=0).astype(np.int32)
    sequences = np.concatenate([prompt, new_tokens.astype(np.int32)], axis=1)  # [B*R, P + max_new]
    reasons = []
    for r in range(B * repeats):
        n = int(n_new[r])
        if stop_cut[r] >= 0:
            reasons.append("stop_string")
        elif n > 0 and int(new_tokens[r, n - 1]) in eos:
            reasons.append("eos")
        else:
            reasons.append("length")
    return GenerateOutput(sequences, P_in, n_new.astype(np.int32), reasons, logprobs)

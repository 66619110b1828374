"""Jitted prefill and decode over an explicit KV cache, and ``generate``.

Axis letters: ``B`` rows, ``P`` prompt length, ``N`` new-token slots, ``S`` cache slots (``P + N``),
``V`` vocab.

Pieces, each usable on its own:

* :func:`prefill` ``(params, tokens [B, P], attention_mask [B, P]) -> (last_logits [B, V], cache)``:
  runs the prompt through the model into a freshly allocated ``cache_len``-slot cache and computes the
  LM head only at the last position (with left padding, the last real token of every row).
* :func:`decode_step` ``(params, cache, tokens [B]) -> (logits [B, V], cache)``: one token per row; the
  cache is donated and updated in place. A full cache (``cache["index"] == S``) is an error.
* :func:`generate`: the whole loop. The prompt batch is left-padded into a *bucket* (lengths and batch
  sizes rounded up to ``2^k`` or ``3 * 2^(k-1)``; ``max_new_tokens`` likewise), prefilled, and the first
  token sampled in one compiled program; the rest runs in one ``lax.while_loop`` that stops as soon as
  every row has finished (EOS or ``max_new_tokens``). The loop state (cache, output buffers, flags) is
  donated, so the cache is allocated once and updated in place. Sampling knobs (temperature, top-k,
  top-p, min-p, penalty), ``max_new_tokens``, ``min_new_tokens``, EOS ids and the seed are traced
  values: a new prompt in the same bucket, or new knob values, reuse the compiled programs.

Streaming and stop strings run the same compiled loop in chunks of ``stream_interval`` steps (the loop's
``stop_at`` is traced), handing the new tokens to the host between chunks.

``enable_compilation_cache()`` turns on JAX's persistent compilation cache so a second process start
skips XLA compilation (see docs/generation.md).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .cache import Cache, init_cache
from .config import GPTJConfig
from .model import GPTJForCausalLM
from .sampling import SEED_LIMIT, SamplingParams, SamplingSpec, prompt_keys, row_keys, sample
from .tokenizer import NUM_REAL_TOKENS, VOCAB_SIZE, is_gptj_tokenizer

Array = jax.Array
Params = Any

EOS_SLOTS = 8  # EOS ids are passed as a traced array of at least this many slots (unused slots -1)
SAFE_ID = 0  # what the model is fed at masked (pad) positions and for finished rows: always in the vocab

# How many times each compiled function was traced (tests check a second call in the same bucket adds none).
TRACE_COUNTS: collections.Counter = collections.Counter()


class GenerationError(ValueError):
    """Bad input to ``generate`` (empty or too long prompt, option out of range...); the message names it."""


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
CACHE_LAYOUT = "BNSH"  # what generate uses: K/V [B, N, S, H], no per-step transpose of the cache (cache.py)


def _model(config: GPTJConfig, dtype: Any, layout: str) -> GPTJForCausalLM:
    return GPTJForCausalLM(config, dtype=dtype, cache_layout=layout)


def _prefill(params: Params, tokens: Array, mask: Array, config: GPTJConfig, cache_len: int, dtype: Any,
             layout: str = CACHE_LAYOUT):
    """tokens, mask ``[B, P]`` -> (logits at the last position ``[B, V]`` float32, cache with ``cache_len`` slots).

    Masked positions are fed ``SAFE_ID`` whatever they hold (a pad id outside the vocabulary would embed
    as NaN, and NaN keys/values poison the real positions through the masked attention weights).
    """
    tokens = jnp.where(mask > 0, tokens, SAFE_ID)
    cache = init_cache(config, tokens.shape[0], cache_len, dtype, layout=layout)
    out = _model(config, dtype, layout).apply(
        {"params": params}, tokens, attention_mask=mask, cache=cache, logits_to_keep=1
    )
    return out.logits[:, -1], out.cache


def _forward_one(params: Params, cache: Cache, tokens: Array, config: GPTJConfig, dtype: Any,
                 layout: str = CACHE_LAYOUT):
    """tokens ``[B]`` at the next slot of every row -> (logits ``[B, V]`` float32, cache)."""
    out = _model(config, dtype, layout).apply({"params": params}, tokens[:, None], cache=cache)
    return out.logits[:, 0], out.cache


@functools.partial(jax.jit, static_argnames=("config", "cache_len", "dtype", "cache_layout"))
def prefill(
    params: Params, tokens: Array, attention_mask: Array, *, config: GPTJConfig, cache_len: int,
    dtype: Any = jnp.float32, cache_layout: str = "BSNH",
) -> tuple[Array, Cache]:
    """Run a left-padded prompt batch into a new cache.

    tokens, attention_mask ``[B, P]`` (1 = real token; pads on the left). Returns the logits of the last
    position ``[B, V]`` float32 (the LM head runs only there) and a cache with ``cache_len >= P`` slots,
    of which the first ``P`` are filled, K/V in ``cache_layout`` (``"BSNH"``, the model's default and
    what ``sharding.cache_shardings`` describes, or ``"BNSH"``, faster on CPU; see ``cache.py``).
    Positions are ``cumsum(mask) - 1`` per row.
    """
    TRACE_COUNTS["prefill"] += 1
    if cache_len < tokens.shape[1]:
        raise GenerationError(f"cache_len {cache_len} is shorter than the prompt ({tokens.shape[1]} tokens)")
    return _prefill(params, tokens, attention_mask, config, cache_len, dtype, cache_layout)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "cache_layout"), donate_argnames=("cache",))
def _decode_step(params: Params, cache: Cache, tokens: Array, *, config: GPTJConfig, dtype: Any = jnp.float32,
                 cache_layout: str = "BSNH") -> tuple[Array, Cache]:
    TRACE_COUNTS["decode_step"] += 1
    return _forward_one(params, cache, tokens, config, dtype, cache_layout)


def decode_step(
    params: Params, cache: Cache, tokens: Array, *, config: GPTJConfig, dtype: Any = jnp.float32,
    cache_layout: str = "BSNH",
) -> tuple[Array, Cache]:
    """Feed one token per row (``tokens [B]`` int) and return its logits ``[B, V]`` float32 and the cache.

    The cache (in ``cache_layout``, as ``prefill`` made it) is donated: its buffers are updated in place
    and the argument must not be used afterwards. A full cache (``cache["index"]`` equal to its ``S``
    slots) raises :class:`GenerationError` before anything runs; the check reads ``cache["index"]`` on
    the host, so each call waits for the previous step (``generate`` does not use this function).
    """
    slots = cache["mask"].shape[1]  # [B, S]
    index = int(jax.device_get(cache["index"]))
    if index >= slots:
        raise GenerationError(
            f"decode_step: the cache is full (cache['index'] = {index}, {slots} slots); "
            f"prefill with a larger cache_len"
        )
    return _decode_step(params, cache, tokens, config=config, dtype=dtype, cache_layout=cache_layout)


decode_step.lower = _decode_step.lower  # ahead-of-time lowering, as on any jitted function (no cache check)


# ---------------------------------------------------------------------------------------- the loop
def _repeat_rows(tree: Any, repeats: int) -> Any:
    """Repeat every array with a batch axis ``repeats`` times per row (``repeat_interleave``); scalars stay."""
    if repeats == 1:
        return tree
    return jax.tree.map(lambda x: jnp.repeat(x, repeats, axis=0) if x.ndim else x, tree)


def _record(state: dict, logits: Array, knobs: dict, ctl: dict, spec: SamplingSpec) -> dict:
    """Sample the token of step ``state["step"]`` for every row from ``logits [R, V]`` and write it."""
    s = state["step"]
    tok, lp = sample(
        logits, state["keys"], s, spec, knobs,
        seen=state.get("seen"), eos_ids=ctl["eos_ids"], min_new_tokens=ctl["min_new"],
        suppress_from=ctl["suppress_from"],
    )  # [R], [R]
    done = state["done"]
    is_eos = jnp.any(tok[:, None] == ctl["eos_ids"][None, :], axis=-1)
    new = dict(
        state,
        # the output gets the pad id after a row ends (it may lie outside the vocabulary: see _check_pad)...
        tokens=lax.dynamic_update_slice(state["tokens"], jnp.where(done, ctl["pad_id"], tok)[:, None], (0, s)),
        n_new=state["n_new"] + (~done).astype(jnp.int32),
        done=done | is_eos | (s + 1 >= ctl["max_new"]),
        last=jnp.where(done, SAFE_ID, tok),  # ...the model is fed an id that always embeds
        step=s + 1,
    )
    if spec.logprobs:
        lp = jnp.where(done, 0.0, lp)
        new["logprobs"] = lax.dynamic_update_slice(state["logprobs"], lp[:, None], (0, s))  # [R, N]
    if spec.repetition_penalty:
        new["seen"] = state["seen"].at[jnp.arange(tok.shape[0]), tok].set(True)
    return new


@functools.partial(
    jax.jit, static_argnames=("config", "dtype", "cache_len", "new_len", "repeats", "spec", "mesh")
)
def _start(
    params: Params, ids: Array, mask: Array, keys: Array, live: Array, knobs: dict, ctl: dict, *,
    config: GPTJConfig, dtype: Any, cache_len: int, new_len: int, repeats: int, spec: SamplingSpec, mesh: Any,
) -> dict:
    """Prefill ``ids/mask [B, P]``, repeat each row ``repeats`` times, sample the first token: the loop state.

    keys ``[B*repeats, 2]``, live ``[B*repeats]`` (False for the rows that only fill the batch bucket).
    """
    TRACE_COUNTS["start"] += 1
    logits, cache = _prefill(params, ids, mask, config, cache_len, dtype)  # [B, V]
    logits, cache = _repeat_rows((logits, cache), repeats)
    if mesh is not None:
        cache = lax.with_sharding_constraint(cache, _cache_shardings(mesh, cache))
    R = logits.shape[0]
    state = {
        "cache": cache,
        "tokens": jnp.full((R, new_len), ctl["pad_id"], jnp.int32),
        "n_new": jnp.zeros((R,), jnp.int32),
        "done": ~live,
        "last": jnp.zeros((R,), jnp.int32),
        "step": jnp.zeros((), jnp.int32),
        "keys": keys,
    }
    if spec.logprobs:
        state["logprobs"] = jnp.zeros((R, new_len), jnp.float32)
    if spec.repetition_penalty:
        V = config.vocab_size
        seen = jnp.zeros((ids.shape[0], V + 1), bool)
        seen = seen.at[jnp.arange(ids.shape[0])[:, None], jnp.where(mask > 0, ids, V)].set(True)[:, :V]
        state["seen"] = _repeat_rows(seen, repeats)  # [R, V]
    return _record(state, logits, knobs, ctl, spec)


def _cache_shardings(mesh: Any, cache: Cache) -> Any:
    """Shardings of a ``BNSH`` cache: rows over the batch axes, heads over ``mp`` (``sharding``'s rules)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from .sharding import logical_sharding

    kv = logical_sharding(mesh, ("batch", "heads", "cache_length", "head_dim"))
    return {
        "layers": [{name: kv for name in layer} for layer in cache["layers"]],
        "mask": logical_sharding(mesh, ("batch", "cache_length")),
        "index": NamedSharding(mesh, P()),
        "lengths": logical_sharding(mesh, ("batch",)),
    }


@functools.partial(jax.jit, static_argnames=("config", "dtype", "spec"), donate_argnames=("state",))
def _run(params: Params, state: dict, knobs: dict, ctl: dict, stop_at: Array, *, config: GPTJConfig, dtype: Any,
         spec: SamplingSpec) -> dict:
    """Decode until every row is done or ``state["step"] == stop_at`` (one ``lax.while_loop``)."""
    TRACE_COUNTS["run"] += 1

    def cond(st: dict) -> Array:
        return (st["step"] < stop_at) & ~jnp.all(st["done"])

    def body(st: dict) -> dict:
        logits, cache = _forward_one(params, st["cache"], st["last"], config, dtype)
        return _record(dict(st, cache=cache), logits, knobs, ctl, spec)

    return lax.while_loop(cond, body, state)


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


def _eos_list(eos_token_id: Any, config: GPTJConfig) -> tuple[int, ...]:
    """The EOS ids, any number of them. Explicit ids must lie in the vocabulary; the config's default may
    not (a small model saved by Transformers keeps GPT-2's 50256): such an id can never be produced."""
    if eos_token_id is None:
        return tuple(int(e) for e in config.eos_token_ids)
    ids = (eos_token_id,) if isinstance(eos_token_id, (int, np.integer)) else tuple(eos_token_id)
    for e in ids:
        if not isinstance(e, (int, np.integer)) or isinstance(e, bool) or not 0 <= e < config.vocab_size:
            raise GenerationError(f"eos_token_id {e!r} is not a token id in [0, {config.vocab_size})")
    return tuple(int(e) for e in ids)


def _check_pad(pad_token_id: Optional[int], config: GPTJConfig, eos: tuple[int, ...]) -> int:
    """The pad id written after a row ends. An explicit ``pad_token_id`` must lie in the vocabulary; the
    default (``config.pad_token_id``, else the first EOS id, else 0) may not, like the config's EOS ids.
    The model itself is never fed the pad id (``SAFE_ID`` instead), so it only shows in the output."""
    if pad_token_id is None:
        default = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
        return _check_int("pad_token_id", default, 0)
    pad = _check_int("pad_token_id", pad_token_id, 0)
    if pad >= config.vocab_size:
        raise GenerationError(
            f"pad_token_id {pad} is outside the vocabulary [0, {config.vocab_size}) (config.vocab_size = "
            f"{config.vocab_size})"
        )
    return pad


def _check_int(name: str, value: Any, low: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise GenerationError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_seed(name: str, value: Any) -> int:
    """A seed: any integer in ``[0, 2**64)`` (both 32-bit words go into the key, see ``sampling.seed_key``)."""
    value = _check_int(name, value, 0)
    if value >= SEED_LIMIT:
        raise GenerationError(f"{name} must be an integer in [0, 2**64), got {value}")
    return value


# ---------------------------------------------------------------------------------------- generate
def generate(
    config: GPTJConfig,
    params: Params,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    stop_strings: Union[None, str, Sequence[str]] = None,
    num_return_sequences: int = 1,
    seed: Union[int, Sequence[int]] = 0,
    return_logprobs: bool = False,
    mesh: Any = None,
    streamer: Optional[Callable[[StreamChunk], Any]] = None,
    tokenizer: Any = None,
    dtype: Any = None,
    stream_interval: int = 8,
    suppress_extra_tokens: Optional[bool] = None,
) -> GenerateOutput:
    """Generate continuations of a batch of prompts (Transformers' ``generate`` semantics).

    Args:
      config, params: the model (``params`` as from ``from_pretrained`` or ``init_params``; any dtype).
      input_ids: ``[B, P]`` ints (or one prompt ``[P]``, or a ragged list of lists, left-padded here).
      attention_mask: ``[B, P]`` 0/1; pads on either side (rows are re-padded on the left).
      max_new_tokens: tokens to generate per row (>= 1); ``P_real + max_new_tokens <= n_positions``.
      min_new_tokens: EOS is banned until a row has this many new tokens.
      do_sample: False = greedy; True samples with temperature / top_k / top_p / min_p (Transformers' order).
      repetition_penalty: > 0; 1 is off. Applies to the real prompt tokens and the generated ones.
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
      return_logprobs: also return each chosen token's log-probability under the processed distribution:
        the log-softmax after the logits processors (for greedy: repetition penalty, min_new_tokens and
        suppression, so with suppression on it is renormalised over the 50257 text ids).
      mesh: a ``jax.sharding.Mesh`` (``dp``, ``fsdp``, ``mp``): params and cache are sharded with
        ``gptj_jax.sharding``'s rules and the batch over ``dp x fsdp``.
      streamer: called with a :class:`StreamChunk` every ``stream_interval`` steps (and at the end).
      tokenizer: needed for ``stop_strings``; GPT-J's tokenizer also turns on ``suppress_extra_tokens``.
      dtype: compute dtype (default: the dtype of the params' embedding); the cache uses it too.
      suppress_extra_tokens: ban ids >= 50257 (GPT-J's padding vocabulary, no text). None = on when
        ``config.vocab_size == 50400`` and the tokenizer is GPT-J's (or not given).

    Returns a :class:`GenerateOutput` whose ``sequences`` are ``[B * R, P + max_new_tokens]``.
    """
    stream = iter_generate(
        config, params, input_ids, attention_mask, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        stop_strings=stop_strings, num_return_sequences=num_return_sequences, seed=seed,
        return_logprobs=return_logprobs, mesh=mesh, tokenizer=tokenizer, dtype=dtype,
        stream_interval=stream_interval if streamer is not None else None,
        suppress_extra_tokens=suppress_extra_tokens,
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
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    stop_strings: Union[None, str, Sequence[str]] = None,
    num_return_sequences: int = 1,
    seed: Union[int, Sequence[int]] = 0,
    return_logprobs: bool = False,
    mesh: Any = None,
    tokenizer: Any = None,
    dtype: Any = None,
    stream_interval: Optional[int] = 8,
    suppress_extra_tokens: Optional[bool] = None,
) -> Iterator[StreamChunk]:
    """:func:`generate` as an iterator of :class:`StreamChunk` (every ``stream_interval`` decode steps;
    ``None`` = one chunk at the end). The last chunk's ``output`` is the :class:`GenerateOutput`.
    Arguments are validated when this is called, before anything runs on the device.
    """
    # ---- validate everything before touching the device
    if not isinstance(config, GPTJConfig):
        raise GenerationError(f"config must be a GPTJConfig, got {type(config).__name__}")
    max_new = _check_int("max_new_tokens", max_new_tokens, 1)
    min_new = _check_int("min_new_tokens", min_new_tokens, 0)
    if min_new > max_new:
        raise GenerationError(f"min_new_tokens ({min_new}) must be <= max_new_tokens ({max_new})")
    repeats = _check_int("num_return_sequences", num_return_sequences, 1)
    if repeats > 1 and not do_sample:
        raise GenerationError(
            "greedy decoding (do_sample=False) does not support num_return_sequences different than 1 "
            f"(got {repeats}): every row would be the same; pass do_sample=True"
        )
    if isinstance(seed, (list, tuple, np.ndarray)):
        seed = [_check_seed(f"seed[{i}]", s) for i, s in enumerate(seed)]
    else:
        seed = _check_seed("seed", seed)
    if stream_interval is not None:
        stream_interval = _check_int("stream_interval", stream_interval, 1)
    sampling = SamplingParams(
        do_sample=bool(do_sample), temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty,
    )
    ids, mask = _as_batch(input_ids, attention_mask, config.vocab_size)
    B, P_in = ids.shape
    if isinstance(seed, list) and len(seed) != B:
        raise GenerationError(f"seed has {len(seed)} values but there are {B} prompts (pass one int or one per prompt)")
    lengths = mask.sum(axis=1)  # [B] real tokens per row
    longest = int(lengths.max())
    if longest + max_new > config.n_positions:
        row = int(lengths.argmax())
        raise GenerationError(
            f"prompt too long: row {row} has {longest} tokens + max_new_tokens {max_new} = {longest + max_new} "
            f"> the model's n_positions {config.n_positions}"
        )
    eos = _eos_list(eos_token_id, config)
    pad_id = _check_pad(pad_token_id, config, eos)
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stop_strings = list(stop_strings or [])
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise GenerationError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
    if stop_strings and tokenizer is None:
        raise GenerationError("stop_strings need a tokenizer (pass tokenizer=...) to decode the generated text")
    if suppress_extra_tokens is None:
        suppress_extra_tokens = config.vocab_size == VOCAB_SIZE and (
            tokenizer is None or is_gptj_tokenizer(tokenizer)
        )
    suppress = bool(suppress_extra_tokens) and config.vocab_size > NUM_REAL_TOKENS
    try:
        embedding = params["transformer"]["wte"]["embedding"]
    except (KeyError, TypeError):
        raise GenerationError("params are not a GPT-J causal-LM tree (no transformer/wte/embedding)") from None
    if dtype is None:
        dtype = np.dtype(embedding.dtype)
        dtype = jnp.float32 if dtype == np.float64 else dtype
    dtype = jnp.dtype(dtype)
    if mesh is None:  # numpy leaves would be copied to the device at every call of the compiled functions
        params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), params)
    row_multiple = 1
    if mesh is not None:
        from . import sharding

        sharding.validate_config(config, mesh, "causal_lm")
        row_multiple = sharding.axis_size(mesh, sharding.logical_to_mesh(("batch",))[0])
    return _iterate(
        config, params, ids, mask, lengths, P_in, max_new, min_new, sampling, repeats, seed, eos, pad_id,
        stop_strings, tokenizer, suppress, dtype, mesh, row_multiple, stream_interval, return_logprobs,
    )


def _iterate(config, params, ids, mask, lengths, P_in, max_new, min_new, sampling, repeats, seed, eos, pad_id,
             stop_strings, tokenizer, suppress, dtype, mesh, row_multiple, stream_interval, return_logprobs):
    B = ids.shape[0]
    longest = int(lengths.max())
    # ---- bucket: left-pad rows into [B_b, P_b]; rows >= B only fill the bucket and start done
    P_b = bucket(longest, 8)
    B_b = bucket(B)
    B_b = -(-B_b // row_multiple) * row_multiple
    N_b = bucket(max_new, 8)
    ids_b = np.full((B_b, P_b), SAFE_ID, np.int32)  # masked: never the pad id, which may lie outside the vocab
    mask_b = np.zeros((B_b, P_b), np.int32)
    for b in range(B_b):
        src = b if b < B else 0
        real = ids[src][mask[src].astype(bool)]
        ids_b[b, P_b - len(real):] = real
        mask_b[b, P_b - len(real):] = 1
    rows = B_b * repeats
    live = np.arange(rows) < B * repeats
    if isinstance(seed, list):
        keys = prompt_keys(seed, repeats, rows)  # row b*R + r: fold_in(key(seed[b]), r)
    else:
        keys = row_keys(seed, rows)  # row i: fold_in(key(seed), i)
    spec = sampling.spec(min_new_tokens=min_new > 0 and bool(eos), suppress=suppress, logprobs=return_logprobs)
    knobs = sampling.knobs()
    eos_arr = np.full((max(EOS_SLOTS, 1 << (len(eos) - 1).bit_length() if eos else 0),), -1, np.int32)
    eos_arr[: len(eos)] = eos  # [E]: 8 slots, or the next power of two above 8 ids
    ctl = {
        "max_new": jnp.asarray(max_new, jnp.int32),
        "min_new": jnp.asarray(min_new, jnp.int32),
        "eos_ids": jnp.asarray(eos_arr),
        "pad_id": jnp.asarray(pad_id, jnp.int32),
        "suppress_from": jnp.asarray(NUM_REAL_TOKENS, jnp.int32),
    }
    ids_d, mask_d, live_d = jnp.asarray(ids_b), jnp.asarray(mask_b), jnp.asarray(live)
    if mesh is not None:
        from . import sharding

        params = sharding.shard_params(params, mesh, config)
        ids_d, mask_d = sharding.shard_batch(mesh, ids_b, mask_b)
        (live_d,) = sharding.shard_batch(mesh, live)
        keys = jax.device_put(keys, sharding.logical_sharding(mesh, ("batch", None)))

    state = _start(
        params, ids_d, mask_d, keys, live_d, knobs, ctl, config=config, dtype=dtype, cache_len=P_b + N_b,
        new_len=N_b, repeats=repeats, spec=spec, mesh=mesh,
    )
    chunk = stream_interval
    if chunk is None and stop_strings:
        chunk = 8  # stop strings are checked on the host between chunks
    stop_cut = np.full((rows,), -1, np.int64)  # index of the token that completed a stop string
    out_rows = B * repeats
    emitted = 0
    while True:
        step = int(state["step"])
        ended = np.array(jax.device_get(state["done"])) | (stop_cut >= 0)
        if step < max_new and not ended.all():
            stop_at = max_new if chunk is None else min(max_new, (step // chunk + 1) * chunk)  # aligned chunks
            state = _run(params, state, knobs, ctl, jnp.asarray(stop_at, jnp.int32), config=config, dtype=dtype,
                         spec=spec)
        # copies: the device buffers are donated to the next call
        step = int(state["step"])
        tokens = np.array(jax.device_get(state["tokens"]))
        done = np.array(jax.device_get(state["done"]))
        n_new = np.array(jax.device_get(state["n_new"]))
        if stop_strings:
            newly = _find_stop_strings(tokens, n_new, stop_cut, live, emitted, stop_strings, tokenizer, eos)
            if newly:
                hit = np.zeros((rows,), bool)
                for r, cut in newly.items():
                    stop_cut[r] = cut
                    hit[r] = True
                state["done"] = state["done"] | jnp.asarray(hit)
        done = done | (stop_cut >= 0)
        tokens, n_new_eff = _apply_cuts(tokens, n_new, stop_cut, pad_id)
        finished = step >= max_new or bool(done.all())
        output = None
        if finished:
            logprobs = None
            if return_logprobs:
                logprobs = np.array(jax.device_get(state["logprobs"]))[:out_rows, :max_new]
                cols = np.arange(max_new)[None, :]
                logprobs = np.where(cols < n_new_eff[:out_rows, None], logprobs, 0.0).astype(np.float32)
            output = _assemble(ids, mask, P_in, tokens[:out_rows, :max_new], n_new_eff[:out_rows],
                               stop_cut[:out_rows], eos, pad_id, repeats, logprobs)
        yield StreamChunk(
            tokens[:out_rows, emitted:step], emitted, n_new_eff[:out_rows].copy(), done[:out_rows].copy(), output
        )
        emitted = step
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

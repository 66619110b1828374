"""The inference engine: continuous batching over a slot-based KV cache, and the scheduler that serves on it.

Axis letters: ``L`` decode slots (``max_slots``), ``S`` cache slots per decode slot (``max_len``), ``n`` prompts
of one prefill, ``m`` rows of a prefix (``n * num_return_sequences``), ``P`` the prefill's prompt bucket, ``V``
vocab, ``E`` EOS slots, ``W x M`` the bad-words table.

:class:`Engine` is MaxText/JetStream's contract, three jitted programs around one :class:`DecodeState`:

* ``prefill(params, tokens, true_length, request) -> Prefix``: prompts (padded to a length bucket) through
  the model into a fresh ``P``-slot cache, and each row's first token sampled with the request's own knobs
  and PRNG key;
* ``insert(prefix, decode_state, slot) -> decode_state``: the prefix's rows into decode slots (the state is
  donated: updated in place; ``cache.insert`` copies the K/V rows);
* ``generate(params, decode_state) -> (decode_state, StepResult)``: one decode step for every slot at once
  (donated). Every slot has its own cache index and position, sampling knobs, PRNG key, EOS ids, token
  history (for the n-gram rule and bad words), counters and done flag, all ``[L]`` arrays, so requests with
  different settings share one compiled step; which processors are compiled in is the union of the active
  requests' specs (``sampling.merge_specs``), carried by the state as static data.

The decode state is allocated once (``init_decode_state``); nothing per request is allocated on the device
beyond the prefix, which ``insert`` consumes. A prefix's prompt sits at cache slots ``[0, length)`` of its
decode slot (the prefill left-pads to the bucket, then rolls each row left), so a slot holds any request
with ``prompt + max_new_tokens <= max_len``.

:class:`Scheduler` (and :class:`LLM`, which builds the engine too) runs requests on an engine: ``submit``
queues a request (admission control: at most ``max_waiting`` waiting, else :class:`QueueFullError`), a free
slot is refilled as soon as a request ends, decode steps are dispatched ``lookahead`` ahead of the host, whose
copies of the step results run asynchronously while it appends tokens, checks stop strings and calls back;
``cancel(id)`` frees the request's slots before the next step. ``step()`` / ``run_until_idle()`` run it in
the calling thread; ``start()`` / ``stop(grace)`` run it in a background thread (for a server).

``gptj_jax.generate`` runs on the engine (all prompts prefilled together, no refill); ``gptj_jax.batch``'s
JSONL job runs on the scheduler. See docs/generation.md ("Engine").
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from . import cache as cache_lib
from .config import GPTJConfig
from .generation import (
    EOS_SLOTS,
    LOOKAHEAD,
    SAFE_ID,
    TRACE_COUNTS,
    _check_pad,
    _eos_list,
    _find_stop_strings,
    _text,
    bucket,
    forward_cached,
    resolve_config,
)
from .generation_config import GenerationConfig, GenerationError
from .sampling import SamplingParams, SamplingSpec, bad_words_table, merge_specs, prompt_keys, row_keys, sample
from .tokenizer import NUM_REAL_TOKENS, VOCAB_SIZE, is_gptj_tokenizer

Array = jax.Array
Params = Any

__all__ = [
    "DecodeState", "Engine", "LLM", "Prefix", "QueueFullError", "Request", "RequestChunk", "RequestOutput",
    "RequestPlan", "Scheduler", "SchedulerStoppedError", "StepResult", "UnknownRequestError", "plan_request",
]

BAD_WORDS_CAPACITY = (16, 8)  # default bad-words table of a slot: 16 words of up to 8 tokens
NEUTRAL_SPEC = SamplingParams().spec(logprobs=False)  # no processor: merge_specs([NEUTRAL_SPEC, s]) == s


# ---------------------------------------------------------------------------------------- errors
class QueueFullError(RuntimeError):
    """``submit`` found ``max_waiting`` requests already waiting (a server answers 429)."""


class SchedulerStoppedError(RuntimeError):
    """``submit`` after ``stop()`` (a server answers 503)."""


class UnknownRequestError(LookupError):
    """``cancel`` of an id that ``submit`` never returned."""

    def __str__(self) -> str:  # LookupError would quote the message like a key
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------------------- device pytrees
@struct.dataclass
class DecodeState:
    """Everything the decode step reads and writes, one row per decode slot (``L`` slots, ``S`` cache slots).

    ``ctl`` holds the per-slot controls: ``knobs`` (``{name: [L]}``, ``sampling.stack_knobs``' names),
    ``keys [L, 2]`` uint32, ``eos_ids [L, E]`` (-1: unused), ``max_new [L]``, ``min_new [L]``,
    ``suppress_from [L]`` (``V`` = off), ``bad_words [L, W, M]`` (-1: no word). ``spec`` (static) says which
    processors the step compiles in.
    """

    cache: cache_lib.Cache  # cache.py's layout, L rows x S slots
    tokens: Array  # [L] int32: each slot's last token (fed at the next step)
    active: Array  # [L] bool: the slot decodes a live row (False: free, or its row ended)
    steps: Array  # [L] int32: new tokens of the row so far (folded into its key; the min_new_tokens counter)
    ctl: dict  # per-slot controls, see above
    seen: Array  # [L, V] bool: ids in the row (repetition penalty)
    history: Array  # [L, S] int32: the row's tokens by cache slot, -1 where none (n-gram rule, bad words)
    spec: SamplingSpec = struct.field(pytree_node=False, default=NEUTRAL_SPEC)

    @property
    def max_slots(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def max_len(self) -> int:
        return int(self.history.shape[1])


@struct.dataclass
class Prefix:
    """What ``prefill`` returns and ``insert`` consumes: ``m`` rows (prompt ``i``'s ``R`` return sequences at
    rows ``i * R .. i * R + R - 1``), each with its prompt in cache slots ``[0, length)`` of a ``P``-slot cache
    and its first token already sampled."""

    cache: cache_lib.Cache  # m rows x P slots; index = lengths = length
    tokens: Array  # [m] int32: the first new token
    logprobs: Optional[Array]  # [m] float32 (None unless some row asked for logprobs)
    done: Array  # [m] bool: the row ended with its first token (EOS, max_new_tokens 1) or is batch padding
    length: Array  # [m] int32: prompt tokens
    ctl: dict  # per-row controls (DecodeState.ctl's layout, m rows)
    seen: Array  # [m, V] bool: the prompt's ids and the first token
    history: Array  # [m, P] int32: the prompt by cache slot, -1 after it
    spec: SamplingSpec = struct.field(pytree_node=False, default=NEUTRAL_SPEC)


@struct.dataclass
class StepResult:
    """One decode step's output, ``[L]`` per slot. Only slots with ``valid`` produced a token of their row."""

    tokens: Array  # [L] int32
    logprobs: Optional[Array]  # [L] float32 (None unless the state's spec computes them)
    valid: Array  # [L] bool: the slot was decoding a live row
    done: Array  # [L] bool: the row ended with this token (EOS or max_new_tokens)


# ---------------------------------------------------------------------------------------- requests (host)
@dataclasses.dataclass(frozen=True)
class RequestPlan:
    """A request's settings as the engine uses them, validated against the model (``plan_request``)."""

    config: GenerationConfig
    eos: tuple[int, ...]  # resolved EOS ids
    pad_id: int
    suppress: bool  # ban ids >= 50257
    bad_words: Optional[np.ndarray]  # [W, M] (sampling.bad_words_table) or None
    spec: SamplingSpec  # the processors this request needs

    @property
    def max_new_tokens(self) -> int:
        return int(self.config.max_new_tokens)

    @property
    def rows(self) -> int:
        return int(self.config.num_return_sequences)


def plan_request(
    config: GPTJConfig,
    generation_config: GenerationConfig,
    *,
    tokenizer: Any = None,
    eos_slots: Optional[int] = None,
    bad_words_capacity: Optional[tuple[int, int]] = None,
) -> RequestPlan:
    """Resolve and check a request's :class:`GenerationConfig` against the model: EOS / pad ids in the
    vocabulary, the bad-words table (fitting ``bad_words_capacity`` ``(W, M)`` when given), at most
    ``eos_slots`` EOS ids, a tokenizer for stop strings, ``max_new_tokens`` set, ``num_beams`` 1. Raises
    :class:`GenerationError` naming the field."""
    gc = generation_config
    if gc.max_new_tokens is None:
        raise GenerationError(
            "max_new_tokens is not set: pass max_new_tokens=... (or a GenerationConfig with it)", "max_new_tokens"
        )
    if gc.num_beams > 1:
        raise GenerationError(
            f"num_beams {gc.num_beams}: beam search does not run on the engine's decode slots; pass num_beams=1",
            "num_beams",
        )
    eos = _eos_list(gc, config)
    pad_id = _check_pad(gc, config, eos)
    if eos_slots is not None and len(eos) > eos_slots:
        raise GenerationError(
            f"eos_token_id has {len(eos)} ids; this engine holds at most {eos_slots} per request (eos_slots)",
            "eos_token_id",
        )
    W, M = bad_words_capacity or (1, 1)
    table = bad_words_table(gc.bad_words_ids, eos, config.vocab_size, min_words=W, min_length=M)
    if bad_words_capacity is not None and table is not None and table.shape != (W, M):
        words = len(gc.bad_words_ids)
        longest = max(len(w) for w in gc.bad_words_ids)
        raise GenerationError(
            f"bad_words_ids has {words} words of up to {longest} tokens; this engine holds at most {W} words of "
            f"up to {M} tokens per request (bad_words_capacity)", "bad_words_ids",
        )
    if gc.stop_strings and tokenizer is None:
        raise GenerationError(
            "stop_strings need a tokenizer (pass tokenizer=...) to decode the generated text", "stop_strings"
        )
    suppress = gc.suppress_extra_tokens
    if suppress is None:
        suppress = config.vocab_size == VOCAB_SIZE and (tokenizer is None or is_gptj_tokenizer(tokenizer))
    suppress = bool(suppress and config.vocab_size > NUM_REAL_TOKENS)
    spec = SamplingParams.from_config(gc).spec(
        min_new_tokens=gc.min_new_tokens > 0 and bool(eos), suppress=suppress, logprobs=gc.logprobs,
        bad_words=table is not None,
    )
    return RequestPlan(gc, eos, pad_id, suppress, table, spec)


# ---------------------------------------------------------------------------------------- jitted programs
def _row_sharding(mesh: Any, x: Any) -> Any:
    from .sharding import logical_sharding

    return logical_sharding(mesh, ("batch",) + (None,) * (np.ndim(x) - 1))


def _constrain(state: DecodeState, config: GPTJConfig, mesh: Any) -> DecodeState:
    """The decode state's sharding on ``mesh``: the cache by ``sharding.cache_shardings`` (rows over the data
    axes, heads over ``mp``), every other array by rows."""
    if mesh is None:
        return state
    from .sharding import cache_shardings

    rows = lambda tree: jax.tree.map(lambda x: lax.with_sharding_constraint(x, _row_sharding(mesh, x)), tree)  # noqa: E731
    cache = jax.tree.map(lax.with_sharding_constraint, state.cache, cache_shardings(config, mesh, state.cache))
    return state.replace(
        cache=cache, tokens=rows(state.tokens), active=rows(state.active), steps=rows(state.steps),
        ctl=rows(state.ctl), seen=rows(state.seen), history=rows(state.history),
    )


@functools.lru_cache(maxsize=1024)
def _host_knobs(params: SamplingParams) -> dict[str, np.ndarray]:
    """``params.knobs()`` as numpy scalars (read back once per distinct knob set)."""
    with jax.ensure_compile_time_eval():  # also when first called while tracing
        return {k: np.asarray(v) for k, v in jax.device_get(params.knobs()).items()}


def _rows_of(knobs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    return {k: np.full((rows,), v, v.dtype) for k, v in knobs.items()}


def _neutral_controls(config: GPTJConfig, rows: int, eos_slots: int, bad_words_shape: tuple[int, int]) -> dict:
    """Controls of ``rows`` idle rows (numpy): neutral knobs, no EOS, no bad words, no suppression."""
    return {
        "knobs": _rows_of(_host_knobs(SamplingParams()), rows),
        "keys": np.zeros((rows, 2), np.uint32),
        "eos_ids": np.full((rows, eos_slots), -1, np.int32),
        "max_new": np.ones((rows,), np.int32),
        "min_new": np.zeros((rows,), np.int32),
        "suppress_from": np.full((rows,), config.vocab_size, np.int32),
        "bad_words": np.full((rows,) + tuple(bad_words_shape), -1, np.int32),
    }


@functools.partial(
    jax.jit, static_argnames=("config", "slots", "max_len", "dtype", "eos_slots", "bad_words_shape", "mesh", "kv_cache")
)
def _init_state_fn(*, config, slots, max_len, dtype, eos_slots, bad_words_shape, mesh, kv_cache=None) -> DecodeState:
    TRACE_COUNTS["engine.init"] += 1
    ctl = jax.tree.map(jnp.asarray, _neutral_controls(config, slots, eos_slots, bad_words_shape))
    state = DecodeState(
        cache=cache_lib.init_cache(config, slots, max_len, dtype, kv_cache),
        tokens=jnp.zeros((slots,), jnp.int32),
        active=jnp.zeros((slots,), bool),
        steps=jnp.zeros((slots,), jnp.int32),
        ctl=ctl,
        seen=jnp.zeros((slots, config.vocab_size), bool),
        history=jnp.full((slots, max_len), -1, jnp.int32),
    )
    return _constrain(state, config, mesh)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "repeats", "mesh", "kv_cache"))
def _prefill_fn(params: Params, tokens: Array, mask: Array, *, config: GPTJConfig, dtype: Any, repeats: int,
                mesh: Any, kv_cache: Optional[str] = None):
    """tokens, mask ``[n, P]`` (left-padded) -> (last logits ``[m, V]``, cache of ``m = n * repeats`` rows whose
    prompts sit in slots ``[0, length)``, length ``[m]``, seen ``[m, V]``, history ``[m, P]``)."""
    TRACE_COUNTS["engine.prefill"] += 1
    n, P = tokens.shape
    V = config.vocab_size
    cache = cache_lib.init_cache(config, n, P, dtype, kv_cache)
    logits, cache = forward_cached(params, tokens, mask, cache, config=config, dtype=dtype)  # [n, V]
    length = mask.sum(axis=1).astype(jnp.int32)  # [n]
    # roll each row left by its padding: slot j takes slot j + P - length (mod P)
    idx = (jnp.arange(P)[None, :] + (P - length)[:, None]) % P  # [n, P]
    roll_kv = jax.vmap(lambda x, i: jnp.take(x, i, axis=1))  # [N, P, H] per row

    def roll(x: Array) -> Array:  # [n, N, P, H|1], or [L, n, N, P, H|1] when the layers are stacked (scan_layers)
        return roll_kv(x, idx) if x.ndim == 4 else jax.vmap(lambda y: roll_kv(y, idx))(x)

    aligned = jnp.arange(P)[None, :] < length[:, None]  # [n, P]
    cache = {
        "layers": jax.tree.map(roll, cache["layers"]),
        "mask": aligned,
        "index": length,
        "lengths": length,
    }
    history = jnp.where(aligned, jnp.take_along_axis(tokens.astype(jnp.int32), idx, axis=1), -1)  # [n, P]
    seen = jnp.zeros((n, V + 1), bool).at[jnp.arange(n)[:, None], jnp.where(mask > 0, tokens, V)].set(True)[:, :V]
    out = (logits, cache, length, seen, history)
    if repeats > 1:
        out = jax.tree.map(lambda x: jnp.repeat(x, repeats, axis=0), out)
    if mesh is not None:
        from .sharding import axis_size, cache_shardings, logical_to_mesh

        if (n * repeats) % axis_size(mesh, logical_to_mesh(("batch",))[0]) == 0:
            logits, cache, length, seen, history = out
            cache = jax.tree.map(lax.with_sharding_constraint, cache, cache_shardings(config, mesh, cache))
            out = (logits, cache, length, seen, history)
    return out


@functools.partial(jax.jit, static_argnames=("spec",))
def _first_token_fn(logits: Array, seen: Array, history: Array, length: Array, ctl: dict, live: Array, *,
                    spec: SamplingSpec):
    """Sample every prefix row's first token (step 0 of its key) -> (tokens, logprobs, done, seen)."""
    TRACE_COUNTS["engine.first_token"] += 1
    m = logits.shape[0]
    tok, lp = sample(
        logits, ctl["keys"], jnp.zeros((m,), jnp.int32), spec, ctl["knobs"], seen=seen, eos_ids=ctl["eos_ids"],
        min_new_tokens=ctl["min_new"], suppress_from=ctl["suppress_from"], history=history, history_end=length,
        bad_words=ctl["bad_words"],
    )
    is_eos = jnp.any(tok[:, None] == ctl["eos_ids"], axis=-1)
    done = ~live | is_eos | (ctl["max_new"] <= 1)
    seen = seen.at[jnp.arange(m), tok].set(True)
    return tok, lp, done, seen


@functools.partial(jax.jit, static_argnames=("config", "mesh"), donate_argnames=("state",))
def _insert_fn(state: DecodeState, cache: cache_lib.Cache, tokens: Array, done: Array, length: Array, ctl: dict,
               seen: Array, history: Array, slot: Array, *, config: GPTJConfig, mesh: Any) -> DecodeState:
    """Prefix rows into decode slots: ``slot`` a scalar (rows ``slot ..``) or ``[m]`` (row i -> ``slot[i]``)."""
    TRACE_COUNTS["engine.insert"] += 1
    m = tokens.shape[0]
    S = state.history.shape[1]
    hist = jnp.full((m, S), -1, jnp.int32).at[:, : history.shape[1]].set(history)
    hist = hist.at[jnp.arange(m), length].set(tokens, mode="drop")  # the first token at slot `length`
    rows = dict(tokens=tokens, active=~done, steps=jnp.ones((m,), jnp.int32), ctl=ctl, seen=seen, history=hist)
    if slot.ndim == 0:
        new_cache = cache_lib.insert(state.cache, cache, slot)

        def put(dst: Array, src: Array) -> Array:
            return lax.dynamic_update_slice(dst, src.astype(dst.dtype), (slot,) + (jnp.zeros((), slot.dtype),) * (dst.ndim - 1))
    else:
        new_cache = state.cache
        for i in range(m):
            new_cache = cache_lib.insert(new_cache, cache_lib.take_rows(cache, jnp.arange(i, i + 1)), slot[i])

        def put(dst: Array, src: Array) -> Array:
            return dst.at[slot].set(src.astype(dst.dtype))

    new = state.replace(
        cache=new_cache,
        **{name: jax.tree.map(put, getattr(state, name), value) for name, value in rows.items()},
    )
    return _constrain(new, config, mesh)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "mesh"), donate_argnames=("state",))
def _step_fn(params: Params, state: DecodeState, *, config: GPTJConfig, dtype: Any, mesh: Any):
    """One decode step for every slot -> (state, StepResult)."""
    TRACE_COUNTS["engine.generate"] += 1
    spec, ctl, active = state.spec, state.ctl, state.active
    L, S = state.history.shape
    V = config.vocab_size
    fed = jnp.where(active, state.tokens, SAFE_ID)
    logits, cache = forward_cached(params, fed[:, None], None, state.cache, config=config, dtype=dtype)  # [L, V]
    end = cache["lengths"]  # [L]: prompt + tokens fed = the slot the new token goes to
    tok, lp = sample(
        logits, ctl["keys"], state.steps, spec, ctl["knobs"], seen=state.seen, eos_ids=ctl["eos_ids"],
        min_new_tokens=ctl["min_new"], suppress_from=ctl["suppress_from"], history=state.history,
        history_end=end, bad_words=ctl["bad_words"],
    )
    is_eos = jnp.any(tok[:, None] == ctl["eos_ids"], axis=-1)
    done = active & (is_eos | (state.steps + 1 >= ctl["max_new"]))
    rows = jnp.arange(L)
    new = state.replace(
        cache=cache,
        tokens=jnp.where(active, tok, state.tokens),
        active=active & ~done,
        steps=state.steps + active.astype(jnp.int32),
        seen=state.seen.at[rows, jnp.where(active, tok, V)].set(True, mode="drop"),
        history=state.history.at[rows, jnp.where(active, end, S)].set(tok, mode="drop"),
    )
    return _constrain(new, config, mesh), StepResult(tok, lp if spec.logprobs else None, active, done)


def _copy_to_host_async(tree: Any) -> None:
    for x in jax.tree.leaves(tree):
        x.copy_to_host_async()


# ---------------------------------------------------------------------------------------- the engine
class Engine:
    """Continuous-batching inference engine (MaxText/JetStream's ``prefill`` / ``insert`` / ``generate``).

    Args:
      config, params: the model (``params`` of the causal LM; numpy leaves are put on the device once; with
        ``mesh``, sharded by ``sharding.shard_params``).
      max_slots: decode slots ``L`` (requests decoded at once; rows of one request each take a slot). On a
        mesh, a multiple of the data axes (``dp x fsdp``).
      max_len: cache slots per decode slot ``S``: a request needs ``prompt + max_new_tokens <= max_len``.
      dtype: compute (and cache) dtype; default the params' embedding dtype (float64 -> float32).
      mesh: ``("dp", "fsdp", "mp")`` mesh: slots over the data axes, heads over ``mp``.
      eos_slots: EOS ids per request (``E``); bad_words_capacity: ``(W, M)`` words x tokens per request.
      kv_cache: ``"int8"``: the KV cache (decode state and prefixes) holds int8 K/V with per-head scales
        (``cache.init_cache``), dequantized in ``dtype`` when read; None (default): K/V in ``dtype``.

    ``params`` is prepared once as ``engine.params``; the methods take params explicitly (JetStream's
    contract), normally ``engine.params``.
    """

    def __init__(
        self,
        config: GPTJConfig,
        params: Params,
        *,
        max_slots: int,
        max_len: int,
        dtype: Any = None,
        mesh: Any = None,
        eos_slots: int = EOS_SLOTS,
        bad_words_capacity: tuple[int, int] = BAD_WORDS_CAPACITY,
        kv_cache: Optional[str] = None,
    ):
        if not isinstance(config, GPTJConfig):
            raise GenerationError(f"config must be a GPTJConfig, got {type(config).__name__}")
        self.kv_cache = cache_lib.check_kv_cache(kv_cache)
        for name, value in (("max_slots", max_slots), ("max_len", max_len), ("eos_slots", eos_slots)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise GenerationError(f"{name} must be an integer >= 1, got {value!r}", name)
        W, M = (int(v) for v in bad_words_capacity)
        if W < 1 or M < 1 or W & (W - 1) or M & (M - 1):
            raise GenerationError(f"bad_words_capacity must be two powers of two, got {bad_words_capacity!r}")
        try:
            embedding = params["transformer"]["wte"]["embedding"]
        except (KeyError, TypeError):
            raise GenerationError("params are not a GPT-J causal-LM tree (no transformer/wte/embedding)") from None
        if dtype is None:
            dtype = np.dtype(embedding.dtype)
            dtype = jnp.float32 if dtype == np.float64 else dtype
        self.config = config
        self.max_slots, self.max_len, self.eos_slots = int(max_slots), int(max_len), int(eos_slots)
        self.bad_words_capacity = (W, M)
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh
        self._data = 1
        if mesh is not None:
            from . import sharding

            sharding.validate_config(config, mesh, "causal_lm")
            self._data = sharding.axis_size(mesh, sharding.logical_to_mesh(("batch",))[0])
            if self.max_slots % self._data:
                raise GenerationError(
                    f"max_slots {self.max_slots} does not split over the mesh's data axes ({self._data} devices): "
                    f"use a multiple of {self._data}", "max_slots",
                )
            self.params = sharding.shard_params(params, mesh, config)
        else:  # numpy leaves would be copied to the device at every call of the compiled functions
            self.params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), params)

    # ------------------------------------------------------------------------------------ requests
    def plan(self, generation_config: Optional[GenerationConfig] = None, *, tokenizer: Any = None,
             **overrides: Any) -> RequestPlan:
        """A request's :class:`RequestPlan` (``generation_config`` with keyword ``overrides``), checked against
        the model and this engine's capacities (EOS slots, bad-words table, ``num_return_sequences <= max_slots``)."""
        gc = resolve_config(generation_config, None, **overrides)
        plan = plan_request(self.config, gc, tokenizer=tokenizer, eos_slots=self.eos_slots,
                            bad_words_capacity=self.bad_words_capacity)
        if plan.rows > self.max_slots:
            raise GenerationError(
                f"num_return_sequences {plan.rows} > this engine's {self.max_slots} decode slots (max_slots)",
                "num_return_sequences",
            )
        return plan

    def check_prompt(self, length: int, max_new_tokens: int, where: str = "prompt") -> None:
        """Raise :class:`GenerationError` unless a prompt of ``length`` tokens with ``max_new_tokens`` fits a
        decode slot (``max_len``) and the model (``n_positions``)."""
        if length < 1:
            raise GenerationError(f"empty {where}: a prompt needs at least one token")
        total = length + max_new_tokens
        if total > self.max_len:
            raise GenerationError(
                f"{where} too long for the cache: {length} tokens + max_new_tokens {max_new_tokens} = {total} > "
                f"the engine's max_len {self.max_len} (cache slots per request)"
            )
        if total > self.config.n_positions:
            raise GenerationError(
                f"{where} too long: {length} tokens + max_new_tokens {max_new_tokens} = {total} > the model's "
                f"n_positions {self.config.n_positions}"
            )

    # ------------------------------------------------------------------------------------ programs
    def init_decode_state(self) -> DecodeState:
        """A fresh decode state (every slot free), allocated once; ``insert`` and ``generate`` update it in place."""
        return _init_state_fn(
            config=self.config, slots=self.max_slots, max_len=self.max_len, dtype=self.dtype,
            eos_slots=self.eos_slots, bad_words_shape=self.bad_words_capacity, mesh=self.mesh, kv_cache=self.kv_cache,
        )

    def prefill(
        self,
        params: Params,
        tokens: Any,
        true_length: Any = None,
        request: Union[None, GenerationConfig, RequestPlan] = None,
        *,
        keys: Any = None,
        rows: Optional[int] = None,
    ) -> Prefix:
        """Prompts into a prefix, first token sampled.

        tokens: ``[P]`` (one prompt) or ``[n, P]`` ints; row ``i``'s prompt is ``tokens[i, :true_length[i]]``
          (``true_length``: int / ``[n]``; None = whole rows). The batch is left-padded to the prompt bucket
          ``bucket(longest, 8)`` (at most ``max_len``) and ``rows`` prompt rows (default ``n``; extra rows
          repeat prompt 0 and start done).
        request: a :class:`RequestPlan` (``engine.plan(...)``) or a :class:`GenerationConfig`, the same for
          every row; each prompt gives ``num_return_sequences`` prefix rows.
        keys: ``[m, 2]`` uint32 PRNG keys per prefix row; default ``generate``'s: row ``i`` gets
          ``fold_in(key(seed), i)`` (or, for one seed per prompt, ``fold_in(key(seed[b]), r)``).
        """
        plan = request if isinstance(request, RequestPlan) else self.plan(request)
        gc = plan.config
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise GenerationError(f"tokens must be [n, length] integers, got shape {tokens.shape} {tokens.dtype}")
        n = tokens.shape[0]
        lengths = np.full((n,), tokens.shape[1]) if true_length is None else np.broadcast_to(true_length, (n,))
        for i, length in enumerate(lengths):
            if not 1 <= length <= tokens.shape[1]:
                raise GenerationError(f"true_length[{i}] = {length} is not in [1, {tokens.shape[1]}]")
            row = tokens[i, :length]
            if ((row < 0) | (row >= self.config.vocab_size)).any():
                bad = int(row[(row < 0) | (row >= self.config.vocab_size)][0])
                raise GenerationError(f"prompt {i}: token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
            self.check_prompt(int(length), plan.max_new_tokens, f"prompt {i}")
        n_b = n if rows is None else int(rows)
        if n_b < n:
            raise GenerationError(f"rows {n_b} < the {n} prompts")
        P = min(bucket(int(lengths.max()), 8), self.max_len)
        ids = np.full((n_b, P), SAFE_ID, np.int32)
        mask = np.zeros((n_b, P), np.int32)
        for b in range(n_b):
            src = b if b < n else 0
            ids[b, P - lengths[src]:] = tokens[src, : lengths[src]]
            mask[b, P - lengths[src]:] = 1
        R = plan.rows
        m = n_b * R
        if keys is None:
            keys = prompt_keys(gc.seed, R, m) if isinstance(gc.seed, tuple) else row_keys(gc.seed, m)
        keys = jnp.asarray(keys, jnp.uint32)
        if keys.shape != (m, 2):
            raise GenerationError(f"keys must be [{m}, 2] (one per prefix row), got {tuple(keys.shape)}")
        ctl = self._controls(plan, m)
        ctl["keys"] = keys
        live = jnp.asarray(np.repeat(np.arange(n_b) < n, R))
        ids_d, mask_d = jnp.asarray(ids), jnp.asarray(mask)
        if self.mesh is not None and n_b % self._data == 0:
            from . import sharding

            ids_d, mask_d = sharding.shard_batch(self.mesh, ids, mask)
        logits, cache, length, seen, history = _prefill_fn(
            params, ids_d, mask_d, config=self.config, dtype=self.dtype, repeats=R, mesh=self.mesh,
            kv_cache=self.kv_cache,
        )
        tok, lp, done, seen = _first_token_fn(logits, seen, history, length, ctl, live, spec=plan.spec)
        return Prefix(cache, tok, lp, done, length, ctl, seen, history, spec=plan.spec)

    def _controls(self, plan: RequestPlan, m: int) -> dict:
        """The per-row controls of ``m`` rows of one request (device arrays; keys left to the caller)."""
        gc = plan.config
        ctl = _neutral_controls(self.config, m, self.eos_slots, self.bad_words_capacity)
        ctl["knobs"] = _rows_of(_host_knobs(SamplingParams.from_config(gc)), m)
        ctl["eos_ids"][:, : len(plan.eos)] = plan.eos
        ctl["max_new"][:] = gc.max_new_tokens
        ctl["min_new"][:] = gc.min_new_tokens
        if plan.suppress:
            ctl["suppress_from"][:] = NUM_REAL_TOKENS
        if plan.bad_words is not None:
            ctl["bad_words"][:] = plan.bad_words
        return jax.device_put(ctl)

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: Any) -> DecodeState:
        """Copy the prefix's rows into decode slots: ``slot`` an int (rows go to ``slot .. slot + m - 1``) or a
        sequence of ``m`` slots. ``decode_state`` is donated (do not use it afterwards). The returned state's
        spec is the union of the old one and the prefix's (:meth:`with_spec` narrows it again)."""
        m = int(prefix.tokens.shape[0])
        slot_arr = np.asarray(slot, np.int32)
        if slot_arr.ndim == 0:
            if not 0 <= int(slot_arr) <= self.max_slots - m:
                raise GenerationError(f"slot {int(slot_arr)}: {m} rows do not fit slots [0, {self.max_slots})")
        elif slot_arr.shape != (m,) or (slot_arr < 0).any() or (slot_arr >= self.max_slots).any():
            raise GenerationError(f"slot must be an int or {m} slots in [0, {self.max_slots}), got {slot!r}")
        spec = merge_specs([decode_state.spec, prefix.spec])
        state = _insert_fn(
            decode_state.replace(spec=NEUTRAL_SPEC), prefix.cache, prefix.tokens, prefix.done, prefix.length,
            prefix.ctl, prefix.seen, prefix.history, jnp.asarray(slot_arr), config=self.config, mesh=self.mesh,
        )
        return state.replace(spec=spec)

    def generate(self, params: Params, decode_state: DecodeState) -> tuple[DecodeState, StepResult]:
        """One decode step for every slot (``decode_state`` donated) -> (new state, :class:`StepResult`).
        Asynchronous: returns once dispatched."""
        return _step_fn(params, decode_state, config=self.config, dtype=self.dtype, mesh=self.mesh)

    @staticmethod
    def with_spec(decode_state: DecodeState, specs: Sequence[SamplingSpec]) -> DecodeState:
        """The state with the processors of ``specs`` (their union) compiled into the next steps: the specs of
        the requests still decoding. Host-only, no device work."""
        return decode_state.replace(spec=merge_specs([NEUTRAL_SPEC, *specs]))


# ---------------------------------------------------------------------------------------- scheduler results
@dataclasses.dataclass
class RequestOutput:
    """A finished request. Rows are its ``num_return_sequences`` sequences."""

    id: int
    prompt_ids: list[int]
    token_ids: list[list[int]]  # per row: new tokens (an EOS / stop-string token included)
    finish_reasons: list[str]  # per row: "eos", "stop_string", "length", "cancelled" or "error"
    logprobs: Optional[list[list[float]]] = None  # per row, per token (when the request asked for them)
    texts: Optional[list[str]] = None  # per row, decoded without special tokens (when there is a tokenizer)
    error: Optional[BaseException] = None  # what failed the request (finish reason "error")
    slots: list[int] = dataclasses.field(default_factory=list)  # the decode slot of each row
    admitted_step: int = -1  # decode steps dispatched before the request's rows were inserted (-1: never)
    finished_step: int = -1  # decode steps dispatched when the host saw its last row end
    latency: float = 0.0  # seconds from submit to finish

    @property
    def num_new_tokens(self) -> list[int]:
        return [len(t) for t in self.token_ids]


@dataclasses.dataclass
class RequestChunk:
    """A streamed piece of a request: ``tokens[r]`` new tokens of row ``r`` since the previous chunk, the
    first of them new token number ``start[r]``. The last chunk carries ``output``."""

    request_id: int
    tokens: list[list[int]]
    start: list[int]
    output: Optional[RequestOutput] = None


class Request:
    """Handle of a submitted request: ``id``, ``done()``, ``result(timeout)``, ``cancel()``, and (when submitted
    with ``stream=True``) iteration over its :class:`RequestChunk` s."""

    def __init__(self, scheduler: "Scheduler", request_id: int, prompt: list[int], plan: RequestPlan,
                 callback: Optional[Callable[[RequestChunk], Any]], stream: bool):
        self.id = request_id
        self.prompt_ids = prompt
        self.plan = plan
        self._scheduler = scheduler
        self._callback = callback
        self._chunks: Optional[queue.Queue] = queue.Queue() if stream else None
        self._event = threading.Event()
        self._submitted = time.perf_counter()
        self.output: Optional[RequestOutput] = None
        R, N = plan.rows, plan.max_new_tokens
        # host-side progress (owned by the scheduler's loop)
        self._tokens = np.zeros((R, N), np.int64)
        self._logprobs = np.zeros((R, N), np.float32) if plan.config.logprobs else None
        self._n = np.zeros((R,), np.int64)
        self._emitted = np.zeros((R,), np.int64)
        self._checked = np.zeros((R,), np.int64)
        self._reasons: list[Optional[str]] = [None] * R
        self._slots: list[int] = []
        self._admitted = -1

    @property
    def generation_config(self) -> GenerationConfig:
        return self.plan.config

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: Optional[float] = None) -> RequestOutput:
        """The :class:`RequestOutput` once finished. With the scheduler's thread running this waits (at most
        ``timeout`` seconds, then TimeoutError); otherwise it runs the scheduler here until the request ends."""
        if not self._event.is_set():
            if self._scheduler.running:
                if not self._event.wait(timeout):
                    raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
            else:
                while not self._event.is_set() and self._scheduler.step():
                    pass
        if self.output is None:
            raise RuntimeError(f"request {self.id} did not finish (the scheduler went idle)")
        return self.output

    def cancel(self) -> bool:
        """Cancel this request (see :meth:`Scheduler.cancel`)."""
        return self._scheduler.cancel(self.id)

    def __iter__(self) -> Iterator[RequestChunk]:
        """The request's chunks as they are decoded (needs ``submit(..., stream=True)``); the last carries the
        output. Runs the scheduler here when its thread is not running."""
        if self._chunks is None:
            raise GenerationError(f"request {self.id} was not submitted with stream=True; use result()")
        while True:
            try:
                chunk = self._chunks.get_nowait()
            except queue.Empty:
                if self._scheduler.running:
                    chunk = self._chunks.get()
                elif not self._scheduler.step() and self._chunks.empty():
                    raise RuntimeError(f"request {self.id} did not finish (the scheduler went idle)") from None
                else:
                    continue
            yield chunk
            if chunk.output is not None:
                return

    # ---- host-side bookkeeping (scheduler loop only)
    def _append(self, r: int, token: int, logprob: Optional[float]) -> None:
        n = self._n[r]
        self._tokens[r, n] = token
        if self._logprobs is not None and logprob is not None:
            self._logprobs[r, n] = logprob
        self._n[r] = n + 1

    def _end_row(self, r: int, reason: str) -> None:
        if self._reasons[r] is None:
            self._reasons[r] = reason


# ---------------------------------------------------------------------------------------- the scheduler
class Scheduler:
    """Serves requests on an :class:`Engine` with continuous batching.

    Args:
      engine: the engine (its ``params`` are used).
      tokenizer: decodes the results (``RequestOutput.texts``), checks stop strings, and lets ``submit`` take
        text; with GPT-J's tokenizer (or none) ids >= 50257 are suppressed by default.
      generation_config: the default knobs of a request (``submit``'s keywords apply on top).
      max_waiting: requests waiting for a slot at most; one more is a :class:`QueueFullError`.
      lookahead: decode steps dispatched before the host reads a step's result (the host appends tokens,
        checks stop strings and calls back while the device runs those). A request that ends on EOS or a
        stop string keeps its slot for up to this many steps; one that ends by ``max_new_tokens`` does not
        (the host knows in advance).

    The decode step compiles in the union of the processors (``SamplingSpec``) of every request served so
    far: a greedy row in a step that also samples stays greedy (per-row knobs), so a request's tokens do
    not depend on its neighbours, and after warm-up on each kind of request nothing compiles again.

    Stable API (the HTTP server, ``gptj_jax.serve``, builds on it): ``submit`` (-> :class:`Request`:
    ``id``, ``result``, ``cancel``, iteration with ``stream=True``; ``callback`` gets every
    :class:`RequestChunk`), ``cancel``, ``start`` / ``stop``, ``step`` / ``run_until_idle``, ``generate``,
    ``num_waiting`` / ``num_live`` / ``num_busy_slots`` / ``steps`` / ``running``; errors :class:`QueueFullError`,
    :class:`SchedulerStoppedError`, :class:`UnknownRequestError`, ``GenerationError``.
    """

    def __init__(self, engine: Engine, *, tokenizer: Any = None,
                 generation_config: Optional[GenerationConfig] = None, max_waiting: int = 1024,
                 lookahead: int = LOOKAHEAD):
        if not isinstance(engine, Engine):
            raise GenerationError(f"engine must be an Engine, got {type(engine).__name__}")
        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            raise GenerationError(f"generation_config must be a GenerationConfig, got {type(generation_config).__name__}")
        for name, value, low in (("max_waiting", max_waiting, 1), ("lookahead", lookahead, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise GenerationError(f"{name} must be an integer >= {low}, got {value!r}", name)
        self.engine = engine
        self.tokenizer = tokenizer
        self.generation_config = generation_config or GenerationConfig()
        self.max_waiting, self.lookahead = int(max_waiting), int(lookahead)
        self.state = engine.init_decode_state()
        L = engine.max_slots
        self._owner: list[Optional[tuple[Request, int]]] = [None] * L  # slot -> (request, row), host view
        self._free_at = [0] * L  # decode step from which the slot's row has ended by max_new_tokens
        self._waiting: collections.deque[Request] = collections.deque()
        self._pending: collections.deque = collections.deque()  # results dispatched, not yet read
        self._steps = 0  # decode steps dispatched
        # the processors the decode step compiles in: the union of every request's served so far (it only
        # grows, so a mix of request kinds compiles a handful of step programs once, never again after warm-up)
        self._spec = NEUTRAL_SPEC
        self._collect: Optional[list[RequestOutput]] = None
        # shared with other threads (guarded by _lock)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[Request] = []
        self._cancels: set[int] = set()
        self._live: dict[int, Request] = {}  # submitted, not finished
        self._n_waiting = 0
        self._next_id = 0
        self._accepting = True
        self._thread: Optional[threading.Thread] = None
        self._stop_now = False
        self._loop_thread_id: Optional[int] = None

    # ------------------------------------------------------------------------------------ public
    @property
    def running(self) -> bool:
        """True while the background thread (``start()``) runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def steps(self) -> int:
        """Decode steps dispatched so far."""
        return self._steps

    @property
    def num_waiting(self) -> int:
        return self._n_waiting

    @property
    def num_busy_slots(self) -> int:
        """Decode slots holding a live row (host view; a row that ended on EOS may hold its slot up to
        ``lookahead`` steps)."""
        return sum(owner is not None for owner in list(self._owner))

    @property
    def num_live(self) -> int:
        """Requests submitted and not finished (waiting or decoding)."""
        return len(self._live)

    def submit(
        self,
        prompt: Any,
        generation_config: Optional[GenerationConfig] = None,
        *,
        callback: Optional[Callable[[RequestChunk], Any]] = None,
        stream: bool = False,
        **overrides: Any,
    ) -> Request:
        """Queue a request; returns its :class:`Request` handle (``handle.id`` is the request id).

        prompt: token ids ``[P]`` (or text, with a tokenizer). generation_config: the knobs (default: the
        scheduler's), ``**overrides`` on top (``max_new_tokens=..., seed=...``; an unknown key is an error
        naming it). ``seed`` is the request's own: row ``r`` draws from ``fold_in(key(seed), r)``, as a
        one-prompt ``generate`` call does. callback: called (on the scheduler's thread) with every
        :class:`RequestChunk`, the last one carrying the output; an exception it raises fails this request
        only. stream: keep the chunks for iterating over the handle.

        Raises :class:`GenerationError` for bad input (checked here, before anything runs),
        :class:`QueueFullError` when ``max_waiting`` requests wait, :class:`SchedulerStoppedError` after ``stop()``.
        """
        gc = resolve_config(generation_config or self.generation_config, None, **overrides)
        if gc.num_beams > 1:
            raise GenerationError(
                f"num_beams {gc.num_beams}: beam search is not served by the scheduler yet (it runs whole "
                "batches, see gptj_jax.beam); pass num_beams=1" + (" (and beams cannot stream)" if stream or callback
                                                                    else ""), "num_beams",
            )
        if isinstance(gc.seed, tuple):
            if len(gc.seed) != 1:
                raise GenerationError(f"seed has {len(gc.seed)} values for one prompt (pass one int)", "seed")
            gc = gc.replace(seed=gc.seed[0])
        plan = self.engine.plan(gc, tokenizer=self.tokenizer)
        ids = self._prompt_ids(prompt)
        self.engine.check_prompt(len(ids), plan.max_new_tokens)
        with self._lock:
            if not self._accepting:
                raise SchedulerStoppedError("the scheduler is stopped: it accepts no new requests")
            if self._n_waiting >= self.max_waiting:
                raise QueueFullError(
                    f"{self._n_waiting} requests are waiting (max_waiting {self.max_waiting}); retry later"
                )
            request = Request(self, self._next_id, ids, plan, callback, stream)
            self._next_id += 1
            self._inbox.append(request)
            self._live[request.id] = request
            self._n_waiting += 1
            self._wake.notify_all()
        return request

    def cancel(self, request_id: Union[int, Request]) -> bool:
        """Cancel a request: a waiting one never starts; a decoding one ends before the next step (its slots
        are refilled), with finish reason "cancelled" and the tokens it had. Returns False when it had already
        finished. An id ``submit`` never returned is an :class:`UnknownRequestError`."""
        rid = request_id.id if isinstance(request_id, Request) else request_id
        with self._lock:
            if rid in self._live:
                self._cancels.add(rid)
                self._wake.notify_all()
                return True
            if isinstance(rid, (int, np.integer)) and not isinstance(rid, bool) and 0 <= rid < self._next_id:
                return False
        raise UnknownRequestError(
            f"unknown request id {rid!r}: no request with this id was submitted (ids are the ints submit() "
            f"returned, 0 .. {self._next_id - 1})" if self._next_id else
            f"unknown request id {rid!r}: no request was submitted yet"
        )

    def step(self) -> bool:
        """One round in the calling thread: take new requests and cancellations, fill free slots, dispatch a
        decode step, read results ``lookahead`` steps behind. Returns False once idle (nothing waiting,
        decoding or unread)."""
        self._check_sync("step()")
        return self._round()

    def run_until_idle(self) -> list[RequestOutput]:
        """Run rounds in the calling thread until every request has finished; returns the outputs of the
        requests that finished meanwhile, in the order they finished."""
        self._check_sync("run_until_idle()")
        self._collect = []
        try:
            while self._round():
                pass
            return self._collect
        finally:
            self._collect = None

    def generate(self, prompts: Sequence[Any], generation_config: Optional[GenerationConfig] = None,
                 **overrides: Any) -> list[RequestOutput]:
        """Submit every prompt (same knobs) and return their outputs in the prompts' order (runs the
        scheduler here unless its thread is running). A bad prompt raises before any of them runs."""
        requests: list[Request] = []
        try:
            for prompt in prompts:
                requests.append(self.submit(prompt, generation_config, **overrides))
        except BaseException:
            for r in requests:
                self.cancel(r)
            raise
        return [r.result() for r in requests]

    def start(self) -> None:
        """Run the scheduler in a background thread (``submit`` / ``cancel`` from any thread)."""
        if self.running:
            raise RuntimeError("the scheduler's thread is already running")
        with self._lock:
            self._accepting = True
            self._stop_now = False
        self._thread = threading.Thread(target=self._loop, name="gptj-jax-scheduler", daemon=True)
        self._thread.start()

    def stop(self, grace: Optional[float] = None) -> None:
        """Stop the background thread: refuse new requests, let running ones finish for up to ``grace``
        seconds (None: until they are done), cancel the rest, and join the thread."""
        if not self.running:
            raise RuntimeError("the scheduler's thread is not running")
        with self._lock:
            self._accepting = False
        deadline = None if grace is None else time.monotonic() + grace
        with self._lock:
            while self._live and (deadline is None or time.monotonic() < deadline):
                self._wake.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            self._cancels.update(self._live)
            self._wake.notify_all()
            while self._live:
                self._wake.wait(1.0)
            self._stop_now = True
            self._wake.notify_all()
        self._thread.join()
        self._thread = None

    # ------------------------------------------------------------------------------------ the loop
    def _check_sync(self, what: str) -> None:
        if self.running and threading.get_ident() != self._loop_thread_id:
            raise RuntimeError(f"{what}: the scheduler's background thread is running (use stop() first)")

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GenerationError("a text prompt needs a tokenizer (Scheduler(..., tokenizer=...)); or pass token ids")
            prompt = self.tokenizer(prompt)["input_ids"]
        ids = np.asarray(prompt)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise GenerationError(f"prompt must be a list of token ids [P] (or text), got shape {ids.shape} {ids.dtype}")
        if ids.size == 0:
            raise GenerationError("empty prompt: a prompt needs at least one token")
        V = self.engine.config.vocab_size
        bad = ids[(ids < 0) | (ids >= V)]
        if bad.size:
            raise GenerationError(f"prompt token id {int(bad[0])} is outside the vocabulary [0, {V})")
        return [int(t) for t in ids]

    def _loop(self) -> None:
        self._loop_thread_id = threading.get_ident()
        while True:
            with self._lock:
                while not (self._stop_now or self._inbox or self._cancels or self._busy()):
                    self._wake.wait()
                if self._stop_now:
                    return
            try:
                self._round()
            except Exception as e:  # the engine failed (not one request): fail what is in flight, start over
                self._reset(e)

    def _busy(self) -> bool:
        return bool(self._waiting or self._pending or any(o is not None for o in self._owner))

    def _round(self) -> bool:
        with self._lock:
            new, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, set()
        self._waiting.extend(new)
        for rid in cancels:
            self._cancel_now(rid)
        self._admit()
        dispatched = self._dispatch()
        while len(self._pending) > (self.lookahead if dispatched else 0):
            self._process(self._pending.popleft())
        with self._lock:
            return bool(self._inbox or self._cancels or self._busy())

    def _slot_free(self, s: int) -> bool:
        owner = self._owner[s]
        return owner is None or self._free_at[s] <= self._steps

    def _admit(self) -> None:
        while self._waiting:
            request = self._waiting[0]
            free = [s for s in range(self.engine.max_slots) if self._slot_free(s)]
            R = request.plan.rows
            if len(free) < R:
                return
            self._waiting.popleft()
            with self._lock:
                self._n_waiting -= 1
            slots = free[:R]
            try:
                keys = prompt_keys([request.plan.config.seed], R, R)
                prefix = self.engine.prefill(self.engine.params, request.prompt_ids, None, request.plan, keys=keys)
            except Exception as e:  # this request's prefill failed: the others go on
                self._fail(request, e)
                continue
            self.state = self.engine.insert(prefix, self.state, slots)
            self._spec = merge_specs([self._spec, request.plan.spec])
            request._slots, request._admitted = slots, self._steps
            for r, s in enumerate(slots):
                self._owner[s] = (request, r)
                self._free_at[s] = self._steps + request.plan.max_new_tokens - 1
            first = (prefix.tokens, prefix.logprobs, prefix.done)
            _copy_to_host_async(first)
            self._pending.append(("prefill", request, first))

    def _dispatch(self) -> bool:
        running = [s for s in range(self.engine.max_slots) if self._owner[s] is not None and not self._slot_free(s)]
        if not running:
            return False
        owners = tuple(self._owner[s] if s in running else None for s in range(self.engine.max_slots))
        self.state, result = self.engine.generate(self.engine.params, Engine.with_spec(self.state, [self._spec]))
        _copy_to_host_async(result)
        self._pending.append(("step", owners, result))
        self._steps += 1
        return True

    def _process(self, entry: tuple) -> None:
        kind = entry[0]
        touched: dict[int, Request] = {}
        if kind == "prefill":
            _, request, (tokens, logprobs, done) = entry
            tokens, done = np.asarray(tokens), np.asarray(done)
            logprobs = None if logprobs is None else np.asarray(logprobs)
            if request.output is None:
                for r in range(request.plan.rows):
                    self._take(request, r, int(tokens[r]), None if logprobs is None else float(logprobs[r]),
                               bool(done[r]))
                touched[request.id] = request
        else:
            _, owners, result = entry
            tokens, valid, done = np.asarray(result.tokens), np.asarray(result.valid), np.asarray(result.done)
            logprobs = None if result.logprobs is None else np.asarray(result.logprobs)
            for s, owner in enumerate(owners):
                if owner is None or not valid[s]:
                    continue
                request, r = owner
                if request.output is not None or request._reasons[r] is not None:
                    continue
                self._take(request, r, int(tokens[s]), None if logprobs is None else float(logprobs[s]), bool(done[s]))
                touched[request.id] = request
        for request in touched.values():
            self._after_tokens(request)

    def _take(self, request: Request, r: int, token: int, logprob: Optional[float], done: bool) -> None:
        request._append(r, token, logprob)
        if done:
            self._end_row(request, r, "eos" if token in request.plan.eos else "length")

    def _end_row(self, request: Request, r: int, reason: str) -> None:
        request._end_row(r, reason)
        for s in request._slots[r: r + 1]:
            if self._owner[s] == (request, r):
                self._owner[s] = None

    def _after_tokens(self, request: Request) -> None:
        """Stop strings, then a chunk to the callback / stream, then the output if every row ended."""
        plan = request.plan
        if plan.config.stop_strings:
            for r in range(plan.rows):
                n = int(request._n[r])
                if request._reasons[r] not in (None, "eos", "length") or n <= request._checked[r]:
                    continue
                cut = _find_stop_strings(request._tokens[r: r + 1], request._n[r: r + 1], np.full((1,), -1),
                                         np.ones((1,), bool), int(request._checked[r]), list(plan.config.stop_strings),
                                         self.tokenizer, plan.eos)
                request._checked[r] = n
                if cut:
                    request._n[r] = cut[0] + 1
                    request._reasons[r] = None
                    self._end_row(request, r, "stop_string")
        finished = all(reason is not None for reason in request._reasons)
        output = self._finish(request) if finished else None
        self._emit(request, output)

    def _emit(self, request: Request, output: Optional[RequestOutput]) -> None:
        if request._callback is None and request._chunks is None:
            return
        n = request._n
        chunk = RequestChunk(
            request.id,
            [request._tokens[r, request._emitted[r]: max(n[r], request._emitted[r])].tolist() for r in range(len(n))],
            request._emitted.tolist(), output,
        )
        request._emitted = np.maximum(request._emitted, n)
        if request._chunks is not None:
            request._chunks.put(chunk)
        if request._callback is not None:
            try:
                request._callback(chunk)
            except Exception as e:  # the callback's failure fails its request only
                if output is None:
                    self._fail(request, e)
                elif output.error is None:
                    output.error = e

    def _finish(self, request: Request) -> RequestOutput:
        plan = request.plan
        rows = range(plan.rows)
        tokens = [request._tokens[r, : request._n[r]].tolist() for r in rows]
        output = RequestOutput(
            id=request.id,
            prompt_ids=request.prompt_ids,
            token_ids=tokens,
            finish_reasons=[request._reasons[r] or "cancelled" for r in rows],
            logprobs=None if request._logprobs is None else
            [request._logprobs[r, : request._n[r]].astype(float).tolist() for r in rows],
            texts=None if self.tokenizer is None else [_text(self.tokenizer, np.asarray(t, np.int64)) for t in tokens],
            slots=list(request._slots),
            admitted_step=request._admitted,
            finished_step=self._steps,
            latency=time.perf_counter() - request._submitted,
        )
        for r in rows:
            self._end_row(request, r, output.finish_reasons[r])
        request.output = output
        if self._collect is not None:
            self._collect.append(output)
        with self._lock:
            self._live.pop(request.id, None)
            self._wake.notify_all()
        request._event.set()
        return output

    def _cancel_now(self, rid: int) -> None:
        request = self._live.get(rid)
        if request is None or request.output is not None:
            return
        if request in self._waiting:
            self._waiting.remove(request)
            with self._lock:
                self._n_waiting -= 1
        for r in range(request.plan.rows):
            if request._reasons[r] is None:
                self._end_row(request, r, "cancelled")
        self._emit(request, self._finish(request))

    def _fail(self, request: Request, error: BaseException) -> None:
        if request.output is not None:
            return
        for r in range(request.plan.rows):
            if request._reasons[r] is None:
                self._end_row(request, r, "error")
        output = self._finish(request)
        output.error = error
        self._emit(request, output)

    def _reset(self, error: BaseException) -> None:
        """After an engine failure: fail every request in flight, drop unread results, a fresh decode state."""
        self._pending.clear()
        for owner in list(self._owner):
            if owner is not None:
                self._fail(owner[0], error)
        self._owner = [None] * self.engine.max_slots
        self._free_at = [0] * self.engine.max_slots
        self.state = self.engine.init_decode_state()


class LLM(Scheduler):
    """A :class:`Scheduler` on its own :class:`Engine`: ``LLM(config, params, max_slots=16, ...)``.

    ``max_len`` defaults to ``config.n_positions``; ``dtype``, ``mesh``, ``eos_slots``, ``bad_words_capacity``
    and ``kv_cache`` go to the engine, the rest to the scheduler (see both)."""

    def __init__(
        self,
        config: GPTJConfig,
        params: Params,
        *,
        max_slots: int = 16,
        max_len: Optional[int] = None,
        dtype: Any = None,
        mesh: Any = None,
        tokenizer: Any = None,
        generation_config: Optional[GenerationConfig] = None,
        max_waiting: int = 1024,
        lookahead: int = LOOKAHEAD,
        eos_slots: int = EOS_SLOTS,
        bad_words_capacity: tuple[int, int] = BAD_WORDS_CAPACITY,
        kv_cache: Optional[str] = None,
    ):
        if not isinstance(config, GPTJConfig):
            raise GenerationError(f"config must be a GPTJConfig, got {type(config).__name__}")
        engine = Engine(config, params, max_slots=max_slots, max_len=config.n_positions if max_len is None else max_len,
                        dtype=dtype, mesh=mesh, eos_slots=eos_slots, bad_words_capacity=bad_words_capacity,
                        kv_cache=kv_cache)
        super().__init__(engine, tokenizer=tokenizer, generation_config=generation_config, max_waiting=max_waiting,
                         lookahead=lookahead)

"""Logits processors and one ``sample()`` function, in the order Transformers applies them.

Shapes: ``B`` rows, ``V`` vocab. Logits are float32 ``[B, V]`` throughout.

Order (as ``transformers.GenerationMixin._get_logits_processor``):

1. repetition penalty (also applied when greedy, as in Transformers),
2. min_new_tokens (EOS ids set to ``-inf`` while fewer than ``min_new_tokens`` tokens were generated),
3. suppression of ids that have no text (``>= suppress_from``; GPT-J's 143 padding rows),
4. when sampling only: temperature, top-k, top-p, min-p,
5. greedy ``argmax`` or a categorical draw with the row's own PRNG key.

Filtered entries become ``-inf`` (Transformers' ``filter_value``). Each processor is a pure function of
the logits and the knob values, so the knob values may be traced: changing ``temperature`` or ``top_p``
between calls does not recompile. What does change the compiled program is *which* processors are on
(``SamplingParams.spec()``), plus the top-k bucket (``top_k`` rounded up to a power of two).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

NEG_INF = float("-inf")


class SamplingError(ValueError):
    """A sampling option is out of range; the message names the option and the value (``option`` holds its name)."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


# ---------------------------------------------------------------------------------------- processors
def apply_repetition_penalty(logits: Array, seen: Array, penalty: Array) -> Array:
    """Transformers' ``RepetitionPenaltyLogitsProcessor``: for ids already in the sequence, divide
    positive logits by ``penalty`` and multiply negative ones by it.

    logits ``[B, V]`` float32, seen ``[B, V]`` bool (id occurred in the row's real tokens), penalty ``[]``.
    """
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def apply_temperature(logits: Array, temperature: Array) -> Array:
    """``logits / temperature`` (``TemperatureLogitsWarper``). temperature ``[]`` > 0."""
    return logits / temperature


def top_k_bucket(top_k: int) -> int:
    """Static width of the ``lax.top_k`` used for ``top_k`` (next power of two, so nearby k share a program)."""
    if top_k <= 0:
        return 0
    return 1 << (top_k - 1).bit_length()


def apply_top_k(logits: Array, top_k: Array, bucket: int) -> Array:
    """Keep the ``top_k`` largest logits of each row (ties with the k-th are kept, as in Transformers).

    logits ``[B, V]``; top_k ``[]`` int32 (1 <= top_k <= bucket); bucket: static width >= top_k.
    """
    width = min(bucket, logits.shape[-1])
    values, _ = lax.top_k(logits, width)  # [B, width] descending
    kth = lax.dynamic_index_in_dim(values, jnp.clip(top_k - 1, 0, width - 1), axis=1)  # [B, 1]
    return jnp.where(logits < kth, NEG_INF, logits)  # [B, V]


def top_p_threshold(sorted_ascending: Array, top_p: Array) -> Array:
    """Smallest logit kept by top-p for each row, from the row's logits sorted ascending ``[B, K]``.

    Transformers removes the ascending-sorted prefix whose cumulative probability is ``<= 1 - top_p`` and
    always keeps the largest. Returns ``[B, 1]``.
    """
    probs = jax.nn.softmax(sorted_ascending, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)  # [B, K] non-decreasing
    remove = cum <= (1.0 - top_p)
    remove = remove.at[:, -1].set(False)
    n_removed = jnp.sum(remove, axis=-1, keepdims=True)  # removed entries form a prefix
    return jnp.take_along_axis(sorted_ascending, n_removed, axis=-1)  # [B, 1]


def apply_top_p(logits: Array, top_p: Array) -> Array:
    """Nucleus filtering (``TopPLogitsWarper``): keep the smallest set of largest logits whose probability
    mass exceeds ``top_p``. logits ``[B, V]``, top_p ``[]`` in (0, 1]."""
    threshold = top_p_threshold(jnp.sort(logits, axis=-1), top_p)
    return jnp.where(logits < threshold, NEG_INF, logits)


def apply_top_k_top_p(logits: Array, top_k: Array, bucket: int, top_p: Array) -> Array:
    """Top-k then top-p, computing top-p on the ``bucket`` largest logits only (exact: the entries top-k
    removed have probability 0, so they fall in the removed prefix either way)."""
    width = min(bucket, logits.shape[-1])
    values, _ = lax.top_k(logits, width)  # [B, width] descending
    kth = lax.dynamic_index_in_dim(values, jnp.clip(top_k - 1, 0, width - 1), axis=1)  # [B, 1]
    values = jnp.where(values >= kth, values, NEG_INF)  # the top-k (ties with the k-th stay)
    threshold = top_p_threshold(values[:, ::-1], top_p)  # ascending
    threshold = jnp.maximum(threshold, kth)
    return jnp.where(logits < threshold, NEG_INF, logits)


def apply_min_p(logits: Array, min_p: Array) -> Array:
    """``MinPLogitsWarper``: drop ids whose probability is below ``min_p`` times the top probability.
    The top id always stays (``min_p <= 1``). logits ``[B, V]``, min_p ``[]`` in [0, 1]."""
    probs = jax.nn.softmax(logits, axis=-1)
    top = jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < min_p * top, NEG_INF, logits)


def apply_min_new_tokens(logits: Array, eos_ids: Array, step: Array, min_new_tokens: Array) -> Array:
    """``MinNewTokensLengthLogitsProcessor``: EOS ids get ``-inf`` while ``step < min_new_tokens``.

    eos_ids ``[E]`` int32 (entries < 0 are unused slots), step ``[]`` = tokens generated so far.
    """
    V = logits.shape[-1]
    is_eos = jnp.any(jnp.arange(V)[:, None] == eos_ids[None, :], axis=-1)  # [V]
    return jnp.where(is_eos[None, :] & (step < min_new_tokens), NEG_INF, logits)


def suppress_ids_from(logits: Array, suppress_from: Array) -> Array:
    """Set ids ``>= suppress_from`` to ``-inf`` (GPT-J's 143 padding-vocab rows have no text)."""
    return jnp.where(jnp.arange(logits.shape[-1])[None, :] >= suppress_from, NEG_INF, logits)


# ---------------------------------------------------------------------------------------- parameters
def _is_real(value: Any) -> bool:
    """A Python int or float (not bool); numpy scalars are converted before this check."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class SamplingSpec(NamedTuple):
    """The static part of sampling: which processors run. Part of the compiled program's key."""

    do_sample: bool
    temperature: bool
    top_k_bucket: int  # 0: top-k off
    top_p: bool
    min_p: bool
    repetition_penalty: bool
    min_new_tokens: bool
    suppress: bool
    logprobs: bool = True  # compute the chosen tokens' log-probabilities (a log-softmax over V per step)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """User-facing sampling options, validated on construction (errors name the option and value).

    ``do_sample=False`` is greedy: temperature, top_k, top_p and min_p are ignored (as in Transformers),
    repetition penalty still applies.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        # numpy scalars (np.float32(0.7), np.int64(40)) are accepted like Python numbers, then stored as such
        for name, kind in (("temperature", float), ("top_k", int), ("top_p", float), ("min_p", float),
                           ("repetition_penalty", float)):
            value = getattr(self, name)
            if isinstance(value, np.integer) or (kind is float and isinstance(value, np.floating)):
                object.__setattr__(self, name, value.item())
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise SamplingError(f"temperature must be a finite number >= 0, got {t!r}", "temperature")
        if self.do_sample and t == 0:
            raise SamplingError("temperature 0 with sampling: use greedy decoding instead", "temperature")
        k = self.top_k
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 turns it off), got {k!r}", "top_k")
        p = self.top_p
        if not _is_real(p) or not 0.0 < p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {p!r}", "top_p")
        m = self.min_p
        if not _is_real(m) or not 0.0 <= m <= 1.0:
            raise SamplingError(f"min_p must be in [0, 1], got {m!r}", "min_p")
        r = self.repetition_penalty
        if not _is_real(r) or not math.isfinite(r) or not r > 0:
            raise SamplingError(f"repetition_penalty must be a finite number > 0, got {r!r}", "repetition_penalty")

    def spec(self, *, min_new_tokens: bool = False, suppress: bool = False, logprobs: bool = True) -> SamplingSpec:
        """Which processors are on (static)."""
        s = self.do_sample
        return SamplingSpec(
            do_sample=s,
            temperature=s and self.temperature != 1.0,
            top_k_bucket=top_k_bucket(self.top_k) if s else 0,
            top_p=s and self.top_p < 1.0,
            min_p=s and self.min_p > 0.0,
            repetition_penalty=self.repetition_penalty != 1.0,
            min_new_tokens=min_new_tokens,
            suppress=suppress,
            logprobs=logprobs,
        )

    def knobs(self) -> dict[str, Array]:
        """The values, as arrays of fixed dtype (traced: a new value does not recompile)."""
        return {
            "temperature": jnp.asarray(self.temperature if self.temperature > 0 else 1.0, jnp.float32),
            "top_k": jnp.asarray(max(self.top_k, 1), jnp.int32),
            "top_p": jnp.asarray(self.top_p, jnp.float32),
            "min_p": jnp.asarray(self.min_p, jnp.float32),
            "repetition_penalty": jnp.asarray(self.repetition_penalty, jnp.float32),
        }


# ---------------------------------------------------------------------------------------- sampling
def process_logits(
    logits: Array,
    spec: SamplingSpec,
    knobs: dict[str, Array],
    *,
    seen: Optional[Array] = None,
    eos_ids: Optional[Array] = None,
    step: Optional[Array] = None,
    min_new_tokens: Optional[Array] = None,
    suppress_from: Optional[Array] = None,
) -> Array:
    """Apply the processors ``spec`` turns on, in Transformers' order. logits ``[B, V]`` -> ``[B, V]`` float32.

    seen ``[B, V]`` bool (needed for repetition penalty); eos_ids ``[E]``, step ``[]`` and min_new_tokens ``[]``
    (needed for min_new_tokens); suppress_from ``[]`` (needed for suppression).
    """
    logits = logits.astype(jnp.float32)
    if spec.repetition_penalty:
        logits = apply_repetition_penalty(logits, seen, knobs["repetition_penalty"])
    if spec.min_new_tokens:
        logits = apply_min_new_tokens(logits, eos_ids, step, min_new_tokens)
    if spec.suppress:
        logits = suppress_ids_from(logits, suppress_from)
    if not spec.do_sample:
        return logits
    if spec.temperature:
        logits = apply_temperature(logits, knobs["temperature"])
    if spec.top_k_bucket and spec.top_p:
        logits = apply_top_k_top_p(logits, knobs["top_k"], spec.top_k_bucket, knobs["top_p"])
    elif spec.top_k_bucket:
        logits = apply_top_k(logits, knobs["top_k"], spec.top_k_bucket)
    elif spec.top_p:
        logits = apply_top_p(logits, knobs["top_p"])
    if spec.min_p:
        logits = apply_min_p(logits, knobs["min_p"])
    return logits


SEED_LIMIT = 2**64  # seeds are 64-bit: both 32-bit words go into the key


def seed_key(seed: int) -> np.ndarray:
    """Raw PRNG key data ``[2]`` uint32 of a seed in ``[0, 2**64)``: ``[seed >> 32, seed & 0xFFFFFFFF]``.

    For ``seed < 2**32`` this is exactly ``jax.random.PRNGKey(seed)`` (so results of those seeds do not
    change); larger seeds keep their high word instead of wrapping (``2**32`` is not ``0``).
    """
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def row_keys(seed: int, rows: int) -> Array:
    """One PRNG key per row, ``fold_in(key(seed), row)``: a row's draws do not depend on the batch it is in.
    ``seed`` in ``[0, 2**64)`` (:func:`seed_key`). Returns raw key data ``[rows, 2]`` uint32."""
    base = jnp.asarray(seed_key(seed))
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(rows, dtype=jnp.uint32))


def prompt_keys(seeds: Sequence[int], repeats: int, rows: int) -> Array:
    """Per-prompt seeds: row ``b * repeats + r`` gets ``fold_in(key(seeds[b]), r)``; rows past
    ``len(seeds) * repeats`` (batch padding) get key 0. Seeds in ``[0, 2**64)``. Returns ``[rows, 2]`` uint32."""
    per_prompt = jnp.asarray(np.stack([seed_key(s) for s in seeds]))  # [B, 2]
    keys = jax.vmap(lambda k: jax.vmap(lambda r: jax.random.fold_in(k, r))(jnp.arange(repeats, dtype=jnp.uint32)))(
        per_prompt
    ).reshape(-1, 2)  # [B * repeats, 2]
    return jnp.concatenate([keys, jnp.zeros((rows - keys.shape[0], 2), keys.dtype)], axis=0)


def sample(
    logits: Array,
    keys: Array,
    step: Array,
    spec: SamplingSpec,
    knobs: dict[str, Array],
    **processor_inputs: Any,
) -> tuple[Array, Array]:
    """Choose one token per row.

    logits ``[B, V]`` (raw model logits); keys ``[B, 2]`` uint32 per-row keys (``row_keys``); step ``[]``
    int32 (tokens generated so far: folded into each row's key, and the min_new_tokens counter).
    ``processor_inputs`` go to :func:`process_logits`.

    Returns ``(tokens [B] int32, logprobs [B] float32)``: the log-probability of each chosen token under
    the processed distribution it was drawn from, ``log_softmax(process_logits(...))``. For greedy that is
    the model's log-softmax after the processors that also run when greedy (repetition penalty,
    min_new_tokens, suppression): with suppression on, it is renormalised over the ids ``< suppress_from``
    (e.g. GPT-J's 50257 text ids), not the model's log-softmax over the whole vocabulary. ``None``
    instead of logprobs when ``spec.logprobs`` is False.
    """
    processed = process_logits(logits, spec, knobs, step=step, **processor_inputs)  # [B, V]
    if spec.do_sample:
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
        tokens = jax.vmap(lambda k, row: jax.random.categorical(k, row))(step_keys, processed)
    else:
        tokens = jnp.argmax(processed, axis=-1)
    tokens = tokens.astype(jnp.int32)
    if not spec.logprobs:
        return tokens, None
    logprobs = jax.nn.log_softmax(processed, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]  # [B]
    return tokens, chosen

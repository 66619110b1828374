"""Logits processors and one ``sample()`` function, in the order Transformers applies them.

Shapes: ``R`` rows, ``V`` vocab, ``L`` token-history slots. Logits are float32 ``[R, V]`` throughout.

Order (as ``transformers.GenerationMixin._get_logits_processor``):

1. repetition penalty (also applied when greedy, as in Transformers),
2. no_repeat_ngram_size (``NoRepeatNGramLogitsProcessor``),
3. bad_words_ids (``NoBadWordsLogitsProcessor``),
4. min_new_tokens (EOS ids set to ``-inf`` while fewer than ``min_new_tokens`` tokens were generated),
5. suppression of ids that have no text (``>= suppress_from``; GPT-J's 143 padding rows),
6. when sampling only: temperature, top-k, top-p, min-p,
7. greedy ``argmax`` or a categorical draw with the row's own PRNG key.

Filtered entries become ``-inf`` (Transformers' ``filter_value``). Each processor is a pure function of
the logits and the knob values, so the knob values may be traced: changing ``temperature`` or ``top_p``
between calls does not recompile. What does change the compiled program is *which* processors are on
(:class:`SamplingSpec`, from ``SamplingParams.spec()``), plus the top-k bucket (``top_k`` rounded up to a
power of two) and the largest n-gram size.

Per-row knobs: every knob (and ``step``, ``min_new_tokens``, ``suppress_from``; ``eos_ids`` as
``[R, E]``) may be a scalar (one value for all rows) or an array ``[R]`` (one per row), so rows with
different settings share one compiled step (:func:`stack_knobs`, :func:`merge_specs`). A row whose
value turns a processor off (temperature 1, top_k 0, top_p 1, min_p 0, penalty 1, n-gram size 0,
``do_sample`` False) is left exactly as if the processor were not compiled in.

The token history the n-gram and bad-words processors read is ``history [R, L]`` int32 (``-1`` = no
token: left padding, slots not yet written) with ``end [R]``: the row's tokens are
``history[r, :end[r]]`` with pads dropped, its last token at ``end[r] - 1``. ``generate`` keeps it aligned
with the KV cache's slots. Unlike Transformers, pads never take part in an n-gram or a bad-word match
(Transformers matches its pad id like any token), so a row's result does not depend on its batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .generation_config import SEED_LIMIT, GenerationConfig, GenerationError, SamplingError

Array = jax.Array

NEG_INF = float("-inf")

__all__ = [
    "SEED_LIMIT", "SamplingError", "SamplingParams", "SamplingSpec", "apply_bad_words", "apply_min_new_tokens",
    "apply_min_p", "apply_no_repeat_ngram", "apply_repetition_penalty", "apply_temperature", "apply_top_k",
    "apply_top_k_top_p", "apply_top_p", "bad_words_table", "merge_specs", "process_logits", "prompt_keys",
    "row_keys", "sample", "seed_key", "stack_knobs", "suppress_ids_from", "top_k_bucket",
]


def _col(x: Any) -> Array:
    """A knob as a column against ``[R, V]``: a scalar stays a scalar, ``[R]`` becomes ``[R, 1]``."""
    x = jnp.asarray(x)
    return x[:, None] if x.ndim == 1 else x


def _rows(x: Any, R: int) -> Array:
    """A knob as one value per row ``[R]``."""
    return jnp.broadcast_to(jnp.asarray(x), (R,))


def _id_mask(ids: Array, V: int) -> Array:
    """``ids [E]`` or ``[R, E]`` int (entries outside ``[0, V)`` unused) -> ``[V]`` or ``[R, V]`` bool."""
    safe = jnp.where((ids >= 0) & (ids < V), ids, V)
    if ids.ndim == 1:
        return jnp.zeros((V + 1,), bool).at[safe].set(True)[:V]
    rows = jnp.arange(ids.shape[0])[:, None]
    return jnp.zeros((ids.shape[0], V + 1), bool).at[rows, safe].set(True)[:, :V]


# ---------------------------------------------------------------------------------------- processors
def apply_repetition_penalty(logits: Array, seen: Array, penalty: Array) -> Array:
    """Transformers' ``RepetitionPenaltyLogitsProcessor``: for ids already in the sequence, divide
    positive logits by ``penalty`` and multiply negative ones by it.

    logits ``[R, V]`` float32, seen ``[R, V]`` bool (id occurred in the row's real tokens), penalty ``[]`` or ``[R]``.
    """
    penalty = _col(penalty)
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def apply_no_repeat_ngram(logits: Array, history: Array, end: Array, size: Array, max_size: int) -> Array:
    """Transformers' ``NoRepeatNGramLogitsProcessor``: ban every token that would complete an n-gram
    (``n = size``) already in the row, i.e. the token after each earlier occurrence of the row's last
    ``n - 1`` tokens (prompt included; ``n = 1`` bans every token the row holds).

    logits ``[R, V]``; history ``[R, L]`` int32 (-1 = no token) and end ``[]`` / ``[R]``: see the module
    docstring; size ``[]`` / ``[R]`` int32 (0 = off for that row); max_size: static, >= every size.
    """
    R, L = history.shape
    V = logits.shape[-1]
    end, size = _rows(end, R)[:, None], _rows(size, R)[:, None]  # [R, 1]
    j = jnp.arange(L)[None, :]  # slot of the token an n-gram ending there would ban
    ok = (size > 0) & (j >= size - 1) & (j < end) & (history >= 0)  # [R, L]
    for i in range(1, max_size):  # the n-gram's token i places before j must equal the row's i-th last token
        before = jnp.pad(history, ((0, 0), (i, 0)), constant_values=-1)[:, :L]  # history[r, j - i]
        last = jnp.take_along_axis(history, jnp.clip(end - i, 0, L - 1), axis=1)  # history[r, end - i]  [R, 1]
        ok &= (i >= size) | ((before == last) & (before >= 0))
    banned = jnp.where(ok, history, V)  # [R, L]; V: nothing
    mask = jnp.zeros((R, V + 1), bool).at[jnp.arange(R)[:, None], banned].set(True)[:, :V]
    return jnp.where(mask, NEG_INF, logits)


def apply_bad_words(logits: Array, history: Array, end: Array, bad_words: Array) -> Array:
    """Transformers' ``NoBadWordsLogitsProcessor``: a one-token bad word is always banned; the last token
    of a longer one is banned when the row ends with the rest of it.

    logits ``[R, V]``; history ``[R, L]`` / end: see the module docstring; bad_words ``[W, M]`` (the same
    words for every row) or ``[R, W, M]`` int32 from :func:`bad_words_table`: each word right-aligned
    (its last token in column ``M - 1``), ``-1`` before it; an all ``-1`` row is no word.
    """
    R, L = history.shape
    V = logits.shape[-1]
    words = jnp.broadcast_to(bad_words, (R,) + bad_words.shape[-2:])  # [R, W, M]
    M = words.shape[-1]
    end = _rows(end, R)[:, None]  # [R, 1]
    last = words[..., M - 1]  # [R, W] the token to ban
    ok = last >= 0
    for i in range(1, M):  # the word's token i places before its last must be the row's i-th last token
        want = words[..., M - 1 - i]  # [R, W]; -1: the word is shorter, nothing to match
        got = jnp.take_along_axis(history, jnp.clip(end - i, 0, L - 1), axis=1)  # [R, 1]
        got = jnp.where(end - i >= 0, got, -2)  # before the first slot: matches no token
        ok &= (want < 0) | (got == want)
    banned = jnp.where(ok, last, V)
    mask = jnp.zeros((R, V + 1), bool).at[jnp.arange(R)[:, None], banned].set(True)[:, :V]
    return jnp.where(mask, NEG_INF, logits)


def apply_temperature(logits: Array, temperature: Array) -> Array:
    """``logits / temperature`` (``TemperatureLogitsWarper``). temperature ``[]`` or ``[R]``, > 0."""
    return logits / _col(temperature)


def top_k_bucket(top_k: int) -> int:
    """Static width of the ``lax.top_k`` used for ``top_k`` (next power of two, so nearby k share a program)."""
    if top_k <= 0:
        return 0
    return 1 << (top_k - 1).bit_length()


def _kth(values: Array, top_k: Array) -> Array:
    """The k-th largest logit per row from ``values [R, width]`` (descending); ``-inf`` where ``top_k <= 0``
    (top-k off for the row). Returns ``[R, 1]``."""
    R, width = values.shape
    top_k = _rows(top_k, R)[:, None]
    kth = jnp.take_along_axis(values, jnp.clip(top_k - 1, 0, width - 1), axis=1)  # [R, 1]
    return jnp.where(top_k > 0, kth, NEG_INF)


def apply_top_k(logits: Array, top_k: Array, bucket: int) -> Array:
    """Keep the ``top_k`` largest logits of each row (ties with the k-th are kept, as in Transformers).

    logits ``[R, V]``; top_k ``[]`` or ``[R]`` int32 (1 <= top_k <= bucket; 0 = off); bucket: static width >= top_k.
    """
    width = min(bucket, logits.shape[-1])
    values, _ = jax.lax.top_k(logits, width)  # [R, width] descending
    return jnp.where(logits < _kth(values, top_k), NEG_INF, logits)  # [R, V]


def top_p_threshold(sorted_ascending: Array, top_p: Array) -> Array:
    """Smallest logit kept by top-p for each row, from the row's logits sorted ascending ``[R, K]``.

    Transformers removes the ascending-sorted prefix whose cumulative probability is ``<= 1 - top_p`` and
    always keeps the largest; ``top_p >= 1`` keeps everything (Transformers does not run it then).
    Returns ``[R, 1]``.
    """
    top_p = _col(top_p)
    probs = jax.nn.softmax(sorted_ascending, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)  # [R, K] non-decreasing
    remove = cum <= (1.0 - top_p)
    remove = remove.at[:, -1].set(False)
    n_removed = jnp.sum(remove, axis=-1, keepdims=True)  # removed entries form a prefix
    threshold = jnp.take_along_axis(sorted_ascending, n_removed, axis=-1)  # [R, 1]
    return jnp.where(top_p >= 1.0, NEG_INF, threshold)


def apply_top_p(logits: Array, top_p: Array) -> Array:
    """Nucleus filtering (``TopPLogitsWarper``): keep the smallest set of largest logits whose probability
    mass exceeds ``top_p``. logits ``[R, V]``, top_p ``[]`` or ``[R]`` in (0, 1]."""
    threshold = top_p_threshold(jnp.sort(logits, axis=-1), top_p)
    return jnp.where(logits < threshold, NEG_INF, logits)


def apply_top_k_top_p(logits: Array, top_k: Array, bucket: int, top_p: Array) -> Array:
    """Top-k then top-p, computing top-p on the ``bucket`` largest logits only (exact: the entries top-k
    removed have probability 0, so they fall in the removed prefix either way). Every row with
    ``top_p < 1`` needs ``top_k > 0`` (else top-p would miss the logits outside the bucket)."""
    width = min(bucket, logits.shape[-1])
    values, _ = jax.lax.top_k(logits, width)  # [R, width] descending
    kth = _kth(values, top_k)  # [R, 1]
    values = jnp.where(values >= kth, values, NEG_INF)  # the top-k (ties with the k-th stay)
    threshold = top_p_threshold(values[:, ::-1], top_p)  # ascending
    threshold = jnp.maximum(threshold, kth)
    return jnp.where(logits < threshold, NEG_INF, logits)


def apply_min_p(logits: Array, min_p: Array) -> Array:
    """``MinPLogitsWarper``: drop ids whose probability is below ``min_p`` times the top probability.
    The top id always stays (``min_p <= 1``). logits ``[R, V]``, min_p ``[]`` or ``[R]`` in [0, 1]."""
    probs = jax.nn.softmax(logits, axis=-1)
    top = jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < _col(min_p) * top, NEG_INF, logits)


def apply_min_new_tokens(logits: Array, eos_ids: Array, step: Array, min_new_tokens: Array) -> Array:
    """``MinNewTokensLengthLogitsProcessor``: EOS ids get ``-inf`` while ``step < min_new_tokens``.

    eos_ids ``[E]`` or ``[R, E]`` int32 (entries < 0 are unused slots); step (tokens generated so far) and
    min_new_tokens ``[]`` or ``[R]``.
    """
    is_eos = _id_mask(eos_ids, logits.shape[-1])  # [V] or [R, V]
    return jnp.where(is_eos & (_col(step) < _col(min_new_tokens)), NEG_INF, logits)


def suppress_ids_from(logits: Array, suppress_from: Array) -> Array:
    """Set ids ``>= suppress_from`` (``[]`` or ``[R]``) to ``-inf`` (GPT-J's 143 padding-vocab rows have no text)."""
    return jnp.where(jnp.arange(logits.shape[-1])[None, :] >= _col(suppress_from), NEG_INF, logits)


def bad_words_table(
    bad_words_ids: Optional[Sequence[Sequence[int]]], eos_ids: Sequence[int], vocab_size: int,
    min_words: int = 1, min_length: int = 1,
) -> Optional[np.ndarray]:
    """The host-side table :func:`apply_bad_words` reads: ``[W, M]`` int32, each word right-aligned, -1 before
    it and in unused rows; ``W`` and ``M`` rounded up to powers of two (at least ``min_words`` /
    ``min_length``) so that similar lists share a compiled program. One-token words equal to an EOS id are
    dropped (Transformers does the same); None when no word is left. Ids must lie in ``[0, vocab_size)``.
    """
    if not bad_words_ids:
        return None
    words = []
    for i, word in enumerate(bad_words_ids):
        for j, t in enumerate(word):
            if not 0 <= int(t) < vocab_size:
                raise GenerationError(
                    f"bad_words_ids[{i}][{j}] = {t} is outside the vocabulary [0, {vocab_size})", "bad_words_ids"
                )
        if len(word) == 1 and int(word[0]) in set(eos_ids):
            continue
        words.append([int(t) for t in word])
    if not words:
        return None
    W = 1 << (max(len(words), min_words) - 1).bit_length()
    M = 1 << (max(max(len(w) for w in words), min_length) - 1).bit_length()
    table = np.full((W, M), -1, np.int32)
    for i, word in enumerate(words):
        table[i, M - len(word):] = word
    return table


# ---------------------------------------------------------------------------------------- parameters
class SamplingSpec(NamedTuple):
    """The static part of sampling: which processors run. Part of the compiled program's key."""

    do_sample: bool  # some row samples (rows with do_sample False in the knobs are greedy)
    temperature: bool
    top_k_bucket: int  # 0: top-k off
    top_p: bool
    min_p: bool
    repetition_penalty: bool
    min_new_tokens: bool
    suppress: bool
    logprobs: bool = True  # compute the chosen tokens' log-probabilities (a log-softmax over V per step)
    no_repeat_ngram: int = 0  # the largest no_repeat_ngram_size of any row; 0: off
    bad_words: bool = False  # the bad_words table is passed
    top_p_in_top_k: bool = True  # every row with top-p also has top-k: top-p runs on the top-k bucket only


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """The device-knob view of a :class:`~gptj_jax.generation_config.GenerationConfig`'s sampling options.

    Validated by the config's rules (``GenerationConfig``; errors are :class:`SamplingError` naming the
    option). ``do_sample=False`` is greedy: temperature, top_k, top_p and min_p are ignored (as in
    Transformers), repetition penalty and the n-gram rule still apply.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        checked = GenerationConfig(**dataclasses.asdict(self))  # the one set of rules; numpy -> Python numbers
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, getattr(checked, f.name))

    @classmethod
    def from_config(cls, config: GenerationConfig) -> "SamplingParams":
        """The sampling knobs of ``config``."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    def spec(self, *, min_new_tokens: bool = False, suppress: bool = False, logprobs: bool = True,
             bad_words: bool = False) -> SamplingSpec:
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
            no_repeat_ngram=self.no_repeat_ngram_size,
            bad_words=bad_words,
            top_p_in_top_k=not (s and self.top_p < 1.0 and self.top_k == 0),
        )

    def knobs(self) -> dict[str, Array]:
        """The values, as scalar arrays of fixed dtype (traced: a new value does not recompile). A greedy
        row's warper knobs are the neutral values (temperature 1, top_k 0, top_p 1, min_p 0)."""
        s = self.do_sample
        return {
            "do_sample": jnp.asarray(s, bool),
            "temperature": jnp.asarray(self.temperature if s and self.temperature > 0 else 1.0, jnp.float32),
            "top_k": jnp.asarray(self.top_k if s else 0, jnp.int32),
            "top_p": jnp.asarray(self.top_p if s else 1.0, jnp.float32),
            "min_p": jnp.asarray(self.min_p if s else 0.0, jnp.float32),
            "repetition_penalty": jnp.asarray(self.repetition_penalty, jnp.float32),
            "no_repeat_ngram_size": jnp.asarray(self.no_repeat_ngram_size, jnp.int32),
        }


def stack_knobs(rows: Sequence[SamplingParams]) -> dict[str, Array]:
    """One knob value per row: ``{name: [R]}`` (with ``do_sample [R]`` bool), for :func:`sample` with
    :func:`merge_specs` of the rows' specs."""
    per_row = [p.knobs() for p in rows]
    return {name: jnp.stack([k[name] for k in per_row]) for name in per_row[0]}


def merge_specs(specs: Sequence[SamplingSpec]) -> SamplingSpec:
    """A spec that serves every row: a processor is on if any row needs it, top-k with the widest bucket,
    the n-gram rule with the largest size. Rows then take their own values from :func:`stack_knobs`."""
    on = lambda name: any(getattr(s, name) for s in specs)  # noqa: E731
    return SamplingSpec(
        do_sample=on("do_sample"),
        temperature=on("temperature"),
        top_k_bucket=max(s.top_k_bucket for s in specs),
        top_p=on("top_p"),
        min_p=on("min_p"),
        repetition_penalty=on("repetition_penalty"),
        min_new_tokens=on("min_new_tokens"),
        suppress=on("suppress"),
        logprobs=on("logprobs"),
        no_repeat_ngram=max(s.no_repeat_ngram for s in specs),
        bad_words=on("bad_words"),
        top_p_in_top_k=all(s.top_p_in_top_k for s in specs),
    )


# ---------------------------------------------------------------------------------------- sampling
def process_logits(
    logits: Array,
    spec: SamplingSpec,
    knobs: dict[str, Array],
    *,
    seen: Optional[Array] = None,
    history: Optional[Array] = None,
    history_end: Optional[Array] = None,
    bad_words: Optional[Array] = None,
    eos_ids: Optional[Array] = None,
    step: Optional[Array] = None,
    min_new_tokens: Optional[Array] = None,
    suppress_from: Optional[Array] = None,
) -> Array:
    """Apply the processors ``spec`` turns on, in Transformers' order. logits ``[R, V]`` -> ``[R, V]`` float32.

    Needed inputs, by processor: repetition penalty ``seen [R, V]`` bool; n-gram rule and bad words
    ``history [R, L]`` and ``history_end`` (module docstring), bad words also ``bad_words [W, M]`` /
    ``[R, W, M]`` (:func:`bad_words_table`); min_new_tokens ``eos_ids [E]`` / ``[R, E]``, ``step`` and
    ``min_new_tokens``; suppression ``suppress_from``. Knobs and these counters: ``[]`` or ``[R]``.
    Rows whose ``knobs["do_sample"]`` is False get none of the sampling warpers.
    """
    logits = logits.astype(jnp.float32)
    if spec.repetition_penalty:
        logits = apply_repetition_penalty(logits, seen, knobs["repetition_penalty"])
    if spec.no_repeat_ngram:
        logits = apply_no_repeat_ngram(logits, history, history_end, knobs["no_repeat_ngram_size"],
                                       spec.no_repeat_ngram)
    if spec.bad_words:
        logits = apply_bad_words(logits, history, history_end, bad_words)
    if spec.min_new_tokens:
        logits = apply_min_new_tokens(logits, eos_ids, step, min_new_tokens)
    if spec.suppress:
        logits = suppress_ids_from(logits, suppress_from)
    if not spec.do_sample:
        return logits
    greedy = logits
    if spec.temperature:
        logits = apply_temperature(logits, knobs["temperature"])
    if spec.top_k_bucket and spec.top_p and spec.top_p_in_top_k:
        logits = apply_top_k_top_p(logits, knobs["top_k"], spec.top_k_bucket, knobs["top_p"])
    else:
        if spec.top_k_bucket:
            logits = apply_top_k(logits, knobs["top_k"], spec.top_k_bucket)
        if spec.top_p:
            logits = apply_top_p(logits, knobs["top_p"])
    if spec.min_p:
        logits = apply_min_p(logits, knobs["min_p"])
    do_sample = knobs.get("do_sample")
    if do_sample is not None and jnp.ndim(do_sample) == 1:  # per-row: greedy rows skip the warpers
        logits = jnp.where(do_sample[:, None], logits, greedy)
    return logits


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
) -> tuple[Array, Optional[Array]]:
    """Choose one token per row.

    logits ``[R, V]`` (raw model logits); keys ``[R, 2]`` uint32 per-row keys (``row_keys``); step ``[]`` or
    ``[R]`` int32 (tokens generated so far: folded into each row's key, and the min_new_tokens counter).
    ``processor_inputs`` go to :func:`process_logits`. Rows whose ``knobs["do_sample"]`` (``[R]``) is False
    take the argmax.

    Returns ``(tokens [R] int32, logprobs [R] float32)``: the log-probability of each chosen token under
    the processed distribution it was drawn from, ``log_softmax(process_logits(...))``. For greedy that is
    the model's log-softmax after the processors that also run when greedy (repetition penalty, n-gram
    rule, bad words, min_new_tokens, suppression): with suppression on, it is renormalised over the ids
    ``< suppress_from`` (e.g. GPT-J's 50257 text ids), not the model's log-softmax over the whole
    vocabulary. ``None`` instead of logprobs when ``spec.logprobs`` is False.
    """
    processed = process_logits(logits, spec, knobs, step=step, **processor_inputs)  # [R, V]
    if spec.do_sample:
        steps = _rows(step, keys.shape[0])
        step_keys = jax.vmap(jax.random.fold_in)(keys, steps)
        tokens = jax.vmap(lambda k, row: jax.random.categorical(k, row))(step_keys, processed)
        do_sample = knobs.get("do_sample")
        if do_sample is not None and jnp.ndim(do_sample) == 1:
            tokens = jnp.where(do_sample, tokens, jnp.argmax(processed, axis=-1))
    else:
        tokens = jnp.argmax(processed, axis=-1)
    tokens = tokens.astype(jnp.int32)
    if not spec.logprobs:
        return tokens, None
    logprobs = jax.nn.log_softmax(processed, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]  # [R]
    return tokens, chosen

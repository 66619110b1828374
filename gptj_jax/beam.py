"""Beam search with Transformers' semantics (``generate(num_beams=..., length_penalty=..., early_stopping=...)``).

Axis letters: ``B`` prompts (the batch bucket), ``K`` beams per prompt (``num_beams``), ``C`` candidates per
prompt and step, ``R = B * K`` model rows, ``P`` prompt bucket, ``N`` new-token bucket, ``V`` vocab.

One compiled program per bucket (:func:`beam_search`): the left-padded prompts are prefilled once (``B``
rows), their cache rows repeated ``K`` times, and every step runs in one ``lax.while_loop``:

1. the model's next-token log-softmax for the ``R`` running beams, then the greedy processors
   (``sampling.process_logits``: repetition penalty, n-gram rule, bad words, min_new_tokens, suppression; in
   Transformers' order, applied to the log-probabilities as Transformers does), plus each beam's running score;
2. the best ``C`` continuations over ``K x V`` per prompt; those ending in EOS (or at ``max_new_tokens``)
   are *finished*: one among the best ``K`` candidates enters the prompt's ``K`` finished hypotheses when its
   length-penalised score ``sum(logprobs) / new_tokens ** length_penalty`` beats one of them;
3. the best ``K`` unfinished candidates become the running beams, and the KV cache rows are reordered to
   them with one gather on the device (``cache.take_rows``);
4. the loop ends when no prompt can improve (Transformers' early-stopping heuristic per ``early_stopping``:
   ``True`` stops a prompt once it has ``K`` finished hypotheses, ``False`` once the best running beam at its
   current length cannot beat the worst finished one, ``"never"`` uses the longest possible length when
   ``length_penalty > 0``), or at ``max_new_tokens``.

This is ``transformers.GenerationMixin._beam_search`` (5.x) step for step, including its ``-1e9`` masks, so
tokens and ``sequence_scores`` equal Transformers' (``sequences_scores``). One difference: ``C`` is
``(1 + E) * K`` with ``E`` the EOS slots (8, or the power of two at or above the number of EOS ids) where
Transformers takes ``max(2, 1 + n_eos) * K``; at most ``n_eos * K`` candidates of a step end in EOS, so both
hold the same best ``K`` unfinished ones and the same best ``K`` candidates, and the result is the same,
while a different number of EOS ids does not recompile. After a hypothesis ends, ``sequences`` hold the pad id
(``pad_token_id``); Transformers' beam search writes ``eos_token_id[0]`` there when ``pad_token_id`` is 0
(its ``pad or eos`` fallback).

Traced knobs (no recompilation within a bucket): ``length_penalty``, ``early_stopping``, ``max_new_tokens``,
``min_new_tokens`` (once on), the EOS ids (up to the slot count), the ``repetition_penalty`` value, the
bad-words table (same table bucket), ``num_return_sequences`` (sliced on the host). Static: ``num_beams``,
the buckets, which processors are on and the n-gram size (``sampling.SamplingSpec``).
``TRACE_COUNTS["beam"]`` counts traces.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .cache import check_kv_cache, init_cache, take_rows
from .config import GPTJConfig
from .generation import (
    EOS_SLOTS,
    GenerateOutput,
    _as_batch,
    _check_pad,
    _eos_list,
    bucket,
    forward_cached,
    resolve_config,
)
from .generation_config import GenerationConfig, GenerationError
from .sampling import SamplingParams, SamplingSpec, bad_words_table, process_logits
from .tokenizer import NUM_REAL_TOKENS, VOCAB_SIZE, is_gptj_tokenizer

Array = jax.Array
Params = Any

__all__ = ["BeamOutput", "TRACE_COUNTS", "beam_search"]

NEG = -1.0e9  # Transformers' "very large negative" score for beams that must not be chosen
EARLY_STOPPING = {False: 0, True: 1, "never": 2}  # traced as an int32

# How many times the beam-search program was traced (tests check a second call in a bucket adds none).
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass
class BeamOutput(GenerateOutput):
    """What :func:`beam_search` returns: a :class:`~gptj_jax.generation.GenerateOutput` (rows
    ``b * num_return_sequences + r``, the ``r``-th best hypothesis of prompt ``b``) plus its scores.

    ``logprobs`` (if asked) ``[rows, max_new_tokens]``: each token's processed log-probability (the
    log-softmax after the processors, not renormalised), the terms whose sum is the hypothesis' score.
    ``finish_reasons``: "eos" or "length".
    """

    sequence_scores: Optional[np.ndarray] = None  # [rows] float32: sum(logprobs) / num_new_tokens ** length_penalty


def beam_search(
    config: GPTJConfig,
    params: Params,
    input_ids: Any,
    attention_mask: Any = None,
    generation_config: Optional[GenerationConfig] = None,
    *,
    return_logprobs: Optional[bool] = None,
    mesh: Any = None,
    streamer: Optional[Callable[..., Any]] = None,
    tokenizer: Any = None,
    dtype: Any = None,
    stream_interval: Optional[int] = None,
    kv_cache: Optional[str] = None,
    **overrides: Any,
) -> BeamOutput:
    """Beam search over a batch of prompts, as Transformers' ``generate(num_beams=K, do_sample=False)``.

    Args:
      config, params: the model.
      input_ids: ``[B, P]`` ints (or one prompt ``[P]``, or a ragged list of lists, left-padded here).
      attention_mask: ``[B, P]`` 0/1; pads on either side (rows are re-padded on the left).
      generation_config / ``**overrides``: the knobs (:class:`~gptj_jax.generation_config.GenerationConfig`
        fields as keywords on top). Used here: ``num_beams`` (>= 2), ``length_penalty``, ``early_stopping``
        (True, False or "never"), ``num_return_sequences`` (<= num_beams), ``max_new_tokens`` (required),
        ``min_new_tokens``, ``eos_token_id`` (any number), ``pad_token_id``, ``repetition_penalty``,
        ``no_repeat_ngram_size``, ``bad_words_ids``, ``suppress_extra_tokens`` (None = on for GPT-J's
        50400-id vocabulary with GPT-J's tokenizer or none), ``logprobs``. Refused: ``do_sample`` (beam
        sampling) and ``stop_strings``; ``seed``, temperature and the other sampling warpers are unused.
        As in ``generate``, pads never count as tokens for the repetition penalty, the n-gram rule and bad
        words (Transformers counts its pad id like any token).
      return_logprobs: the same as ``logprobs=`` (``generate``'s keyword).
      dtype: compute dtype (default: the params' embedding dtype); the cache uses it too.
      kv_cache: ``"int8"``: int8 K/V with per-head scales in the cache (``cache.init_cache``); None: ``dtype``.
      mesh: a ``jax.sharding.Mesh``: params and cache sharded with ``gptj_jax.sharding``'s rules (beam rows
        over the batch axes, heads over ``mp``).
      streamer: must be None: beam search does not stream (a beam's tokens are not final until the search
        ends); any other value is a :class:`GenerationError`.
      tokenizer: only decides the default of ``suppress_extra_tokens``.
      stream_interval: ``generate``'s keyword, accepted so that ``generate``'s arguments pass through
        unchanged; unused (nothing streams).

    Returns a :class:`BeamOutput`: ``sequences [B * R, P + max_new_tokens]`` (prompt, new tokens, pad after
    the end), ``num_new_tokens [B * R]``, ``finish_reasons``, ``sequence_scores [B * R]`` and, if asked,
    ``logprobs [B * R, max_new_tokens]``, with ``R = num_return_sequences``.
    """
    if not isinstance(config, GPTJConfig):
        raise GenerationError(f"config must be a GPTJConfig, got {type(config).__name__}")
    check_kv_cache(kv_cache)
    gc = resolve_config(generation_config, return_logprobs, **overrides)
    if streamer is not None:
        raise GenerationError(
            f"beam search does not stream: num_beams {gc.num_beams} with a streamer (a beam's tokens are not final "
            "until the search ends); pass streamer=None, or num_beams=1 to stream", "streamer",
        )
    if gc.max_new_tokens is None:
        raise GenerationError(
            "max_new_tokens is not set: pass max_new_tokens=... (or a GenerationConfig with it)", "max_new_tokens"
        )
    if gc.num_beams < 2:
        raise GenerationError(
            f"beam search needs num_beams >= 2, got {gc.num_beams} (num_beams=1 is greedy or sampling: generate)",
            "num_beams",
        )
    if gc.stop_strings:
        raise GenerationError("stop_strings are not supported with beam search (num_beams > 1)", "stop_strings")
    ids, mask = _as_batch(input_ids, attention_mask, config.vocab_size)
    B = ids.shape[0]
    lengths = mask.sum(axis=1)
    longest = int(lengths.max())
    if longest + gc.max_new_tokens > config.n_positions:
        row = int(lengths.argmax())
        raise GenerationError(
            f"prompt too long: row {row} has {longest} tokens + max_new_tokens {gc.max_new_tokens} = "
            f"{longest + gc.max_new_tokens} > the model's n_positions {config.n_positions}"
        )
    eos = _eos_list(gc, config)
    pad_id = _check_pad(gc, config, eos)
    bad_words = bad_words_table(gc.bad_words_ids, eos, config.vocab_size)
    suppress = gc.suppress_extra_tokens
    if suppress is None:
        suppress = config.vocab_size == VOCAB_SIZE and (tokenizer is None or is_gptj_tokenizer(tokenizer))
    suppress = suppress and config.vocab_size > NUM_REAL_TOKENS
    try:
        embedding = params["transformer"]["wte"]["embedding"]
    except (KeyError, TypeError):
        raise GenerationError("params are not a GPT-J causal-LM tree (no transformer/wte/embedding)") from None
    if dtype is None:
        dtype = np.dtype(embedding.dtype)
        dtype = jnp.float32 if dtype == np.float64 else dtype
    dtype = jnp.dtype(dtype)
    row_multiple = 1
    if mesh is None:  # numpy leaves would be copied to the device at every call
        params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), params)
    else:
        from . import sharding

        sharding.validate_config(config, mesh, "causal_lm")
        row_multiple = sharding.axis_size(mesh, sharding.logical_to_mesh(("batch",))[0])

    # ---- buckets: prompts left-padded into [B_b, P_b]; rows >= B repeat prompt 0 and are ignored
    K, max_new = gc.num_beams, gc.max_new_tokens
    P_b, N_b = bucket(longest, 8), bucket(max_new, 8)
    B_b = -(-bucket(B) // row_multiple) * row_multiple
    ids_b = np.zeros((B_b, P_b), np.int32)
    mask_b = np.zeros((B_b, P_b), np.int32)
    for b in range(B_b):
        real = ids[b if b < B else 0][mask[b if b < B else 0].astype(bool)]
        ids_b[b, P_b - len(real):] = real
        mask_b[b, P_b - len(real):] = 1
    live = np.arange(B_b) < B

    E = max(EOS_SLOTS, 1 << (len(eos) - 1).bit_length() if eos else 0)
    eos_arr = np.full((E,), -1, np.int32)
    eos_arr[: len(eos)] = eos
    sampling = SamplingParams.from_config(gc)
    spec = sampling.spec(min_new_tokens=gc.min_new_tokens > 0 and bool(eos), suppress=suppress, logprobs=False,
                         bad_words=bad_words is not None)
    knobs = sampling.knobs()
    ctl = {
        "max_new": jnp.asarray(max_new, jnp.int32),
        "min_new": jnp.asarray(gc.min_new_tokens, jnp.int32),
        "eos_ids": jnp.asarray(eos_arr),
        "suppress_from": jnp.asarray(NUM_REAL_TOKENS, jnp.int32),
        "early": jnp.asarray(EARLY_STOPPING[gc.early_stopping], jnp.int32),
        "lp_positive": jnp.asarray(gc.length_penalty > 0.0, bool),
        # L ** length_penalty for L = 0 .. N_b, in float64 as Python computes it, then float32 (Transformers
        # divides float32 scores by the Python float)
        "penalty": jnp.asarray(np.array([1.0] + [float(L) ** gc.length_penalty for L in range(1, N_b + 1)],
                                        np.float64).astype(np.float32)),
    }
    if bad_words is not None:
        ctl["bad_words"] = jnp.asarray(bad_words)
    ids_d, mask_d, live_d = jnp.asarray(ids_b), jnp.asarray(mask_b), jnp.asarray(live)
    if mesh is not None:
        from . import sharding

        params = sharding.shard_params(params, mesh, config)
        ids_d, mask_d = sharding.shard_batch(mesh, ids_b, mask_b)
    width = min((1 + E) * K, K * config.vocab_size)  # candidates per prompt and step
    out = _beam_program(params, ids_d, mask_d, live_d, knobs, ctl, config=config, dtype=dtype, new_len=N_b,
                        num_beams=K, width=width, spec=spec, logprobs=gc.logprobs, mesh=mesh, kv_cache=kv_cache)
    out = jax.device_get(out)
    return _assemble(ids, mask, out, gc, eos, pad_id)


# ---------------------------------------------------------------------------------------- the program
def _gather(x: Array, idx: Array) -> Array:
    """``x [B, M, ...]`` at ``idx [B, J]`` along axis 1 -> ``[B, J, ...]`` (Transformers' ``_gather_beams``)."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _history(prompt: Optional[Array], tokens: Array) -> Optional[Array]:
    """The running beams' tokens by slot ``[R, P + N]`` (-1: pad or not written): prompt, then new tokens."""
    if prompt is None:
        return None
    return jnp.concatenate([prompt, tokens.reshape(prompt.shape[0], -1)], axis=1)


def _step(state: dict, logits: Array, prompt: Optional[Array], live: Array, knobs: dict, ctl: dict,
          spec: SamplingSpec, width: int) -> dict:
    """One beam-search step from the running beams' next-token logits ``[R, V]`` (Transformers' steps b-g)."""
    s = state["step"]
    B, K, N = state["run_tokens"].shape
    V = logits.shape[-1]
    # b. log-probabilities, the processors, plus the running scores
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [R, V]
    history = _history(prompt, state["run_tokens"])
    inputs = {}
    if history is not None:
        inputs = dict(history=history, history_end=prompt.shape[1] + s, bad_words=ctl.get("bad_words"))
        if spec.repetition_penalty:
            ids = jnp.where(history >= 0, history, V)  # [R, L]; V: no token
            seen = jnp.zeros((ids.shape[0], V + 1), bool).at[jnp.arange(ids.shape[0])[:, None], ids].set(True)
            inputs["seen"] = seen[:, :V]  # [R, V]
    logp = process_logits(logp, spec, knobs, eos_ids=ctl["eos_ids"], step=s, min_new_tokens=ctl["min_new"],
                          suppress_from=ctl["suppress_from"], **inputs)
    acc = (logp.reshape(B, K, V) + state["run_scores"][:, :, None]).reshape(B, K * V)
    # c. the best `width` continuations
    top_scores, top_idx = lax.top_k(acc, width)  # [B, C]
    src, tok = top_idx // V, (top_idx % V).astype(jnp.int32)  # beam and token of each candidate
    column = jnp.arange(N) == s
    cand_tokens = jnp.where(column, tok[:, :, None], _gather(state["run_tokens"], src))  # [B, C, N]
    if "run_logprobs" in state:
        chosen = jnp.take_along_axis(logp.reshape(B, K * V), top_idx, axis=1)  # [B, C]
        cand_logprobs = jnp.where(column, chosen[:, :, None], _gather(state["run_logprobs"], src))
    # d. which candidates are finished: EOS, or the last token allowed
    is_eos = jnp.any(tok[:, :, None] == ctl["eos_ids"], axis=-1)
    hits = is_eos | (s + 1 >= ctl["max_new"])  # [B, C]
    # e. the best K unfinished candidates run on
    run_scores = top_scores + hits.astype(jnp.float32) * NEG
    keep = lax.top_k(run_scores, K)[1]  # [B, K]
    new = dict(state, run_tokens=_gather(cand_tokens, keep), run_scores=_gather(run_scores, keep),
               last=_gather(tok, keep).reshape(-1))
    if "run_logprobs" in state:
        new["run_logprobs"] = _gather(cand_logprobs, keep)
    # f. a finished candidate among the best K enters the finished hypotheses if it beats one of them
    length = s + 1
    just_done = hits & (jnp.arange(width) < K)
    scores = top_scores / ctl["penalty"][length]  # (s + 1) ** length_penalty
    early_true = ctl["early"] == EARLY_STOPPING[True]
    full = jnp.all(state["done"], axis=-1, keepdims=True) & early_true
    scores = scores + full.astype(jnp.float32) * NEG
    scores = scores + (~state["improvable"][:, None]).astype(jnp.float32) * NEG
    scores = scores + (~just_done).astype(jnp.float32) * NEG
    merged = jnp.concatenate([state["scores"], scores], axis=1)  # [B, K + C]
    best = lax.top_k(merged, K)[1]
    cat = lambda a, b: _gather(jnp.concatenate([a, b], axis=1), best)  # noqa: E731
    new["tokens"] = cat(state["tokens"], cand_tokens)
    new["scores"] = _gather(merged, best)
    new["done"] = cat(state["done"], just_done)
    new["lengths"] = cat(state["lengths"], jnp.full(hits.shape, length, jnp.int32))
    if "run_logprobs" in state:
        new["logprobs"] = cat(state["logprobs"], cand_logprobs)
    # g. the cache rows follow their beams
    rows = (jnp.arange(B)[:, None] * K + _gather(src, keep)).reshape(-1)  # [R]
    new["cache"] = take_rows(state["cache"], rows)
    # the early-stopping heuristic at the new length, and whether any live prompt goes on
    never = (ctl["early"] == EARLY_STOPPING["never"]) & ctl["lp_positive"]
    best_length = jnp.where(never, ctl["max_new"], length)  # Transformers' cur_len - prompt, after the step
    best_running = new["run_scores"][:, :1] / ctl["penalty"][best_length]  # [B, 1]
    worst_done = jnp.where(new["done"], jnp.min(new["scores"], axis=1, keepdims=True), NEG)  # [B, K]
    new["improvable"] = state["improvable"] & jnp.any(best_running > worst_done, axis=-1)
    all_full = jnp.all(new["done"] | ~live[:, None]) & early_true
    new["going"] = jnp.any(new["improvable"] & live) & ~all_full & ~jnp.all(hits | ~live[:, None])
    new["step"] = s + 1
    return new


@functools.partial(
    jax.jit,
    static_argnames=("config", "dtype", "new_len", "num_beams", "width", "spec", "logprobs", "mesh", "kv_cache"),
)
def _beam_program(
    params: Params, ids: Array, mask: Array, live: Array, knobs: dict, ctl: dict, *, config: GPTJConfig,
    dtype: Any, new_len: int, num_beams: int, width: int, spec: SamplingSpec, logprobs: bool, mesh: Any,
    kv_cache: Optional[str] = None,
) -> dict:
    """Prefill ``ids/mask [B, P]``, repeat each row ``num_beams`` times, then the beam loop. Returns the
    finished hypotheses: tokens ``[B, K, N]`` (-1 after the end), scores ``[B, K]``, lengths ``[B, K]``
    (and logprobs ``[B, K, N]``), best first."""
    TRACE_COUNTS["beam"] += 1
    B, P = ids.shape
    K, N = num_beams, new_len
    cache = init_cache(config, B, P + N, dtype, kv_cache)
    logits, cache = forward_cached(params, ids, mask, cache, config=config, dtype=dtype)  # [B, V]
    rows = jnp.repeat(jnp.arange(B), K)  # [R]
    logits, cache = logits[rows], take_rows(cache, rows)

    def constrain(c):
        if mesh is None:
            return c
        from .sharding import cache_shardings

        return lax.with_sharding_constraint(c, cache_shardings(config, mesh, c))

    prompt = None
    if spec.repetition_penalty or spec.no_repeat_ngram or spec.bad_words:
        prompt = jnp.where(mask > 0, ids, -1).astype(jnp.int32)[rows]  # [R, P]
    state = {
        "cache": constrain(cache),
        "run_tokens": jnp.full((B, K, N), -1, jnp.int32),
        # only the first beam of each prompt is live at the start (Transformers: 0, then -1e9)
        "run_scores": jnp.tile(jnp.where(jnp.arange(K) == 0, 0.0, NEG).astype(jnp.float32), (B, 1)),
        "tokens": jnp.full((B, K, N), -1, jnp.int32),
        "scores": jnp.full((B, K), NEG, jnp.float32),
        "done": jnp.zeros((B, K), bool),
        "lengths": jnp.zeros((B, K), jnp.int32),
        "improvable": jnp.ones((B,), bool),
        "last": jnp.zeros((B * K,), jnp.int32),
        "going": jnp.ones((), bool),
        "step": jnp.zeros((), jnp.int32),
    }
    if logprobs:
        state["run_logprobs"] = jnp.zeros((B, K, N), jnp.float32)
        state["logprobs"] = jnp.zeros((B, K, N), jnp.float32)
    step = functools.partial(_step, prompt=prompt, live=live, knobs=knobs, ctl=ctl, spec=spec, width=width)
    state = step(state, logits)

    def cond(st: dict) -> Array:
        return st["going"] & (st["step"] < ctl["max_new"])

    def body(st: dict) -> dict:
        logits, cache = forward_cached(params, st["last"][:, None], None, st["cache"], config=config, dtype=dtype)
        st = step(dict(st, cache=cache), logits)
        return dict(st, cache=constrain(st["cache"]))

    state = lax.while_loop(cond, body, state)
    keys = ["tokens", "scores", "lengths"] + (["logprobs"] if logprobs else [])
    return {k: state[k] for k in keys}


# ---------------------------------------------------------------------------------------- results
def _assemble(ids: np.ndarray, mask: np.ndarray, out: dict, gc: GenerationConfig, eos: tuple[int, ...],
              pad_id: int) -> BeamOutput:
    """The best ``num_return_sequences`` hypotheses of each prompt after its prompt (as given if
    left-padded, else re-padded on the left), pad after each one's end."""
    B, P_in = ids.shape
    R, max_new = gc.num_return_sequences, gc.max_new_tokens
    tokens = np.asarray(out["tokens"])[:B, :R, :max_new].reshape(B * R, max_new)
    n_new = np.asarray(out["lengths"])[:B, :R].reshape(B * R).astype(np.int32)
    scores = np.asarray(out["scores"])[:B, :R].reshape(B * R).astype(np.float32)
    tokens = np.where(np.arange(max_new)[None, :] < n_new[:, None], tokens, pad_id).astype(np.int32)
    prompt = ids.copy()
    for b in range(B):
        real = mask[b].astype(bool)
        if not real[-1]:  # right-padded: move the real tokens to the right
            tok = ids[b][real]
            prompt[b] = pad_id
            prompt[b, P_in - len(tok):] = tok
    prompt = np.repeat(prompt, R, axis=0).astype(np.int32)
    reasons = ["eos" if n > 0 and int(row[n - 1]) in eos else "length" for row, n in zip(tokens, n_new)]
    logprobs = None
    if gc.logprobs:
        logprobs = np.asarray(out["logprobs"])[:B, :R, :max_new].reshape(B * R, max_new)
        logprobs = np.where(np.arange(max_new)[None, :] < n_new[:, None], logprobs, 0.0).astype(np.float32)
    return BeamOutput(np.concatenate([prompt, tokens], axis=1), P_in, n_new, reasons, logprobs, scores)

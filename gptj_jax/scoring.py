"""Log-likelihoods of given continuations: lm-evaluation-harness's ``loglikelihood`` and
``loglikelihood_rolling`` on the model's plain forward (no KV cache).

Axis letters: ``B`` rows of a batch, ``T`` input tokens, ``C`` scored positions, ``D`` n_embd, ``V`` vocab.

* :func:`score` ``(config, params, [(context ids, continuation ids), ...]) -> [ScoreResult]``: the
  log-probability of every continuation token given everything before it, their sum, and whether every
  continuation token is the argmax of its logits (lm-eval's ``is_greedy``).
* :func:`rolling_windows` / :func:`score_rolling`: the log-likelihood of whole texts longer than the
  model's window, cut into lm-eval's disjoint rolling windows.

The rule is lm-eval's Hugging Face backend (``HFLM._loglikelihood_tokens``), token for token: the model
reads ``(context + continuation)[-(n_positions + 1):][:-1]`` (left truncation keeps the last
``n_positions + 1`` tokens of the pair; the continuation must fit in ``n_positions``) and the last
``len(continuation)`` positions of its output are scored against the continuation. The context must not
be empty (the first continuation token would have nothing to be predicted from): lm-eval's callers put
the EOS id there (``context_enc = [eot_token_id]`` for an empty context string), and so must callers
of :func:`score`. The continuation is scored as given, against the full ``vocab_size``-way softmax (no
suppression of GPT-J's 143 extra ids).

How it runs: requests are sorted longest first (as lm-eval's ``Collator``), cut into batches of
``batch_size``, and each batch is right-padded into a bucket (rows and lengths rounded up by
``generation.bucket``; rows past the batch are all padding). One jitted function per
``(rows, length, scored positions)`` bucket runs the trunk, gathers the hidden states of the scored
positions only (``[B, C, D]``; lm-eval's multiple-choice continuations are a few tokens of a long
context) and reduces the LM head on the device: it returns ``[B, C]`` float32 target log-probs and a
``[B, C]`` bool greedy flag, never ``[B, T, V]`` logits. The reduction walks the vocabulary in blocks
of ``vocab_block`` columns (running max, rescaled sum of exponentials, first argmax, target logit), so
the largest logits buffer is ``[B, C, vocab_block]`` float32 instead of ``[B, C, V]``: at 8 x 512 on the
162M config the compiled program's temporary memory is 0.45 GB against 1.65 GB with the whole vocabulary
in one block, at the same speed on the CPU (blocks of 4096 to 16800 columns measured alike; see
``scripts/bench_score.py``). On a mesh whose ``mp`` axis splits the vocabulary the head runs in one block
(the logits are already split over the devices; slicing the vocabulary would gather it).

Right padding needs no mask trick: pads come after every real token, so causal attention never lets a
real position see one, and positions are ``0 .. L-1`` per row whatever the bucket. Batches are
dispatched one after another without waiting; the host collects the small results at the end.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .config import GPTJConfig
from .generation import bucket
from .model import GPTJModel
from .quantize import dequantize

Array = jax.Array
Params = Any

SAFE_ID = 0  # what the model is fed at pad positions (always in the vocabulary)
MIN_LENGTH = 8  # smallest length bucket
VOCAB_BLOCK = 8192  # default LM-head columns per step of the on-device reduction (see the module docstring)

# How many times each compiled function was traced (tests check a second call in the same bucket adds none).
TRACE_COUNTS: collections.Counter = collections.Counter()


class ScoringError(ValueError):
    """Bad input to :func:`score` / :func:`score_rolling`; the message names the request and the problem."""


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """The score of one (context, continuation) request.

    ``logprobs [n]`` float32: log-probability of each continuation token given all tokens before it;
    ``sum``: their sum (accumulated in float64); ``is_greedy``: every continuation token is the argmax of
    its logits (the first maximum on ties, as ``torch.argmax``), lm-eval's second ``loglikelihood`` value.
    """

    logprobs: np.ndarray
    sum: float
    is_greedy: bool


# ---------------------------------------------------------------------------------------- device side
def _head_reduce(h: Array, kernel: Array, bias: Array, targets: Array, vocab_block: int) -> tuple[Array, Array]:
    """``log_softmax(h @ kernel + bias)`` at ``targets`` and ``argmax == targets``, without ``[B, C, V]``.

    h ``[B, C, D]`` (compute dtype), kernel ``[D, V]``, bias ``[V]``, targets ``[B, C]`` int32. The head is
    the model's (``GPTJForCausalLM.lm_head``: float32 matmul of float32 copies). The vocabulary is walked in
    blocks of ``vocab_block`` columns (a ``fori_loop`` over the whole blocks, the remainder once), keeping
    per position the running max ``m``, ``s = sum(exp(logit - m))``, the first argmax and the target logit.
    Returns (logprobs ``[B, C]`` float32, greedy ``[B, C]`` bool).
    """
    V = kernel.shape[1]
    h = h.astype(jnp.float32)
    shape = targets.shape  # [B, C]

    def update(carry, start, width):
        m, s, arg, tgt = carry
        k = lax.dynamic_slice_in_dim(kernel, start, width, axis=1).astype(jnp.float32)  # [D, W]
        b = lax.dynamic_slice_in_dim(bias, start, width, axis=0).astype(jnp.float32)  # [W]
        logits = jnp.einsum("BCD,DW->BCW", h, k, preferred_element_type=jnp.float32) + b  # [B, C, W]
        block_max = jnp.max(logits, axis=-1)  # [B, C]
        block_arg = jnp.argmax(logits, axis=-1).astype(jnp.int32) + start  # first max within the block
        new_m = jnp.maximum(m, block_max)
        s = s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(logits - new_m[..., None]), axis=-1)
        arg = jnp.where(block_max > m, block_arg, arg)  # strictly greater: an earlier block wins ties
        local = targets - start
        inside = (local >= 0) & (local < width)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, width - 1)[..., None], axis=-1)[..., 0]
        tgt = jnp.where(inside, picked, tgt)
        return new_m, s, arg, tgt

    carry = (
        jnp.full(shape, -jnp.inf, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros(shape, jnp.int32),
        jnp.zeros(shape, jnp.float32),
    )
    width = min(vocab_block, V)
    full = V // width
    if full == 1:
        carry = update(carry, 0, width)
    else:
        carry = lax.fori_loop(0, full, lambda i, c: update(c, i * width, width), carry)
    if V - full * width:
        carry = update(carry, full * width, V - full * width)
    m, s, arg, tgt = carry
    return tgt - (m + jnp.log(s)), arg == targets


@functools.partial(jax.jit, static_argnames=("config", "dtype", "vocab_block"))
def _score_batch(
    params: Params, tokens: Array, lengths: Array, index: Array, targets: Array, *,
    config: GPTJConfig, dtype: Any, vocab_block: int,
) -> tuple[Array, Array]:
    """tokens ``[B, T]`` right-padded (row b real up to ``lengths[b]``), index / targets ``[B, C]``: the
    positions to score and the token expected at each. Returns (logprobs, greedy) ``[B, C]``."""
    TRACE_COUNTS["score"] += 1
    T = tokens.shape[1]
    mask = jnp.arange(T, dtype=jnp.int32)[None, :] < lengths[:, None]  # [B, T]
    tokens = jnp.where(mask, tokens, SAFE_ID)
    params = dequantize(params)  # int8 weights (quantize.py) -> float, inside this jit
    h = GPTJModel(config, dtype=dtype).apply(
        {"params": params["transformer"]}, tokens, attention_mask=mask
    ).last_hidden_state  # [B, T, D] float32 after ln_f
    h = jnp.take_along_axis(h, index[..., None], axis=1).astype(dtype)  # [B, C, D], as the head sees it
    head = params["lm_head"]
    return _head_reduce(h, head["kernel"], head["bias"], targets, vocab_block)


# ---------------------------------------------------------------------------------------- host side
def _ids(value: Any, where: str, vocab_size: int) -> np.ndarray:
    """A list / 1-D array of token ids as int64, each in ``[0, vocab_size)``."""
    if isinstance(value, (str, bytes)):
        raise ScoringError(f"{where} must be a list of token ids, got a string {value[:40]!r}")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise ScoringError(f"{where} must be a list of token ids: {e}") from None
    if arr.ndim != 1:
        raise ScoringError(f"{where} must be a flat list of token ids, got shape {arr.shape}")
    if arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer)):
        raise ScoringError(f"{where} must hold integer token ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise ScoringError(f"{where}[{i}] = {int(arr[i])} is outside the vocabulary [0, {vocab_size})")
    return arr


def _check_common(config: Any, params: Any, batch_size: Any, dtype: Any) -> Any:
    if not isinstance(config, GPTJConfig):
        raise ScoringError(f"config must be a GPTJConfig, got {type(config).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ScoringError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    try:
        embedding = params["transformer"]["wte"]["embedding"]
        head = params["lm_head"]
        if "kernel" not in head or "bias" not in head:
            raise KeyError("lm_head")
    except (KeyError, TypeError):
        raise ScoringError(
            "params are not a GPT-J causal-LM tree (need transformer/wte/embedding and lm_head/kernel, bias)"
        ) from None
    if dtype is None:
        dtype = np.dtype(embedding.dtype)
        dtype = jnp.float32 if dtype == np.float64 else dtype
    return jnp.dtype(dtype)


def score(
    config: GPTJConfig,
    params: Params,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    mesh: Any = None,
    dtype: Any = None,
    vocab_block: Optional[int] = None,
) -> list[ScoreResult]:
    """Score ``(context ids, continuation ids)`` pairs; one :class:`ScoreResult` per request, in order.

    Args:
      config, params: a causal-LM model (``params`` with ``transformer`` and ``lm_head``).
      requests: pairs of token-id lists. The context must not be empty (put the EOS id there, as lm-eval
        does for an empty context string); the continuation must not be empty and must fit in
        ``config.n_positions`` tokens. Longer pairs are cut on the left, keeping the last
        ``n_positions + 1`` tokens (lm-eval's HF backend). Ids must lie in ``[0, vocab_size)``.
      batch_size: requests per forward pass (the last batch may be smaller; rows and lengths are bucketed).
      mesh: a ``jax.sharding.Mesh``: params are placed with ``sharding.shard_params`` and each batch is
        split over the batch axes (rows rounded up to a multiple of their size).
      dtype: compute dtype (default: the embedding's dtype). The LM head and its log-softmax are float32.
      vocab_block: LM-head columns per step of the on-device reduction (default :data:`VOCAB_BLOCK`; the
        whole vocabulary in one step on a mesh that splits it over ``mp``). It changes memory, not results
        beyond float32 rounding.

    Raises :class:`ScoringError` naming the request for an empty part, an id outside the vocabulary or a
    continuation longer than ``n_positions``, before anything runs on the device.
    """
    dtype = _check_common(config, params, batch_size, dtype)
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence):
        raise ScoringError(f"requests must be a list of (context ids, continuation ids) pairs, got {type(requests).__name__}")
    n_pos, V = config.n_positions, config.vocab_size
    inputs, conts = [], []
    for i, req in enumerate(requests):
        if isinstance(req, (str, bytes)) or not isinstance(req, Sequence) or len(req) != 2:
            raise ScoringError(f"request {i} must be a (context ids, continuation ids) pair, got {req!r:.80}")
        ctx = _ids(req[0], f"request {i}: context", V)
        cont = _ids(req[1], f"request {i}: continuation", V)
        if cont.size == 0:
            raise ScoringError(f"request {i}: the continuation is empty (nothing to score)")
        if ctx.size == 0:
            eos = config.eos_token_ids[0] if config.eos_token_ids else "the EOS id"
            raise ScoringError(
                f"request {i}: the context is empty; the first continuation token needs a token before it "
                f"(lm-eval puts the EOS id there: pass [{eos}] as the context)"
            )
        if cont.size > n_pos:
            raise ScoringError(
                f"request {i}: the continuation has {cont.size} tokens, more than the model's n_positions {n_pos}"
            )
        window = np.concatenate([ctx, cont])[-(n_pos + 1):]  # left truncation, as lm-eval's HF backend
        inputs.append(window)  # the model reads window[:-1]; window[1:] are the targets
        conts.append(cont)
    if not inputs:
        return []

    if vocab_block is None:
        vocab_block = VOCAB_BLOCK
    if isinstance(vocab_block, bool) or not isinstance(vocab_block, (int, np.integer)) or vocab_block < 1:
        raise ScoringError(f"vocab_block must be an integer >= 1, got {vocab_block!r}")
    row_multiple = 1
    if mesh is None:  # numpy leaves would be copied to the device at every call
        params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), params)
    else:
        from . import sharding

        try:
            sharding.validate_config(config, mesh, "causal_lm")
        except ValueError as e:
            raise ScoringError(str(e)) from None
        row_multiple = sharding.axis_size(mesh, sharding.logical_to_mesh(("batch",))[0])
        if sharding.axis_size(mesh, sharding.logical_to_mesh(("vocab",))[0]) > 1:
            vocab_block = V  # the vocabulary is already split over the devices; slicing it would gather it
        params = sharding.shard_params(params, mesh, config, "causal_lm")
    vocab_block = int(min(vocab_block, V))

    # lm-eval's Collator order: longest first (ties by tokens), so each batch's first row sets its length
    order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i]), tuple(inputs[i])))
    pending = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        L = [len(inputs[i]) - 1 for i in rows]  # input tokens per row
        n = [len(conts[i]) for i in rows]  # scored positions per row: the last n of its input
        T_b = min(bucket(max(L), MIN_LENGTH), n_pos)  # every L <= n_pos
        C_b = min(bucket(max(n), MIN_LENGTH), T_b)
        B_b = bucket(len(rows))
        B_b = -(-B_b // row_multiple) * row_multiple
        tokens = np.full((B_b, T_b), SAFE_ID, np.int32)
        lengths = np.zeros((B_b,), np.int32)
        index = np.zeros((B_b, C_b), np.int32)
        targets = np.zeros((B_b, C_b), np.int32)
        for r, i in enumerate(rows):
            window, length, count = inputs[i], L[r], n[r]
            tokens[r, :length] = window[:-1]
            lengths[r] = length
            index[r, :count] = np.arange(length - count, length)
            targets[r, :count] = window[-count:]
        args = (tokens, lengths, index, targets)
        if mesh is not None:
            from . import sharding

            args = sharding.shard_batch(mesh, *args)
        out = _score_batch(params, *args, config=config, dtype=dtype, vocab_block=vocab_block)
        pending.append((rows, n, out))  # dispatched; read back after every batch is queued

    results: list[Optional[ScoreResult]] = [None] * len(inputs)
    for rows, n, out in pending:
        logprobs, greedy = (np.asarray(x) for x in jax.device_get(out))  # [B_b, C_b]
        for r, i in enumerate(rows):
            lp = logprobs[r, :n[r]].astype(np.float32)
            results[i] = ScoreResult(lp, float(lp.sum(dtype=np.float64)), bool(greedy[r, :n[r]].all()))
    return results


# ---------------------------------------------------------------------------------------- rolling windows
def rolling_windows(
    tokens: Sequence[int], prefix_token: int, max_len: int, context_len: int = 1
) -> list[tuple[list[int], list[int]]]:
    """lm-eval's ``get_rolling_token_windows`` followed by ``make_disjoint_window``: (context, continuation)
    pairs whose continuations cover ``tokens`` exactly once, in order.

    The first window predicts the first ``min(max_len, len(tokens))`` tokens from ``[prefix_token]`` and
    the tokens before each; every later window predicts up to ``max_len - context_len + 1`` new tokens,
    its context being the ``max_len + 1 - len(continuation)`` tokens before them (so context + continuation
    minus the last token fills ``max_len`` positions whenever the text is long enough). No tokens: no windows.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ScoringError(f"max_len must be an integer >= 1, got {max_len!r}")
    if isinstance(context_len, bool) or not isinstance(context_len, (int, np.integer)) or not 1 <= context_len <= max_len:
        raise ScoringError(f"context_len must be an integer in [1, max_len={max_len}], got {context_len!r}")
    tokens = [int(t) for t in tokens]
    if not tokens:
        return []
    pred_len = max_len - context_len + 1
    first = min(max_len, len(tokens))
    windows = [([int(prefix_token)] + tokens[: first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, pred_len)
        end = predicted + n
        windows.append((tokens[end - max_len - 1: end - 1], tokens[end - n: end]))  # end > max_len here
        predicted = end
    # make_disjoint_window: drop from the context the tokens the continuation already holds
    return [(ctx[: len(ctx) - (len(cont) - 1)], cont) for ctx, cont in windows]


def score_rolling(
    config: GPTJConfig,
    params: Params,
    token_lists: Sequence[Sequence[int]],
    *,
    prefix_token: Optional[int] = None,
    batch_size: int = 8,
    mesh: Any = None,
    dtype: Any = None,
    vocab_block: Optional[int] = None,
) -> list[float]:
    """Log-likelihood of each whole text (lm-eval's ``loglikelihood_rolling``): the sum of the log-probs of
    every token, scored in :func:`rolling_windows` of ``config.n_positions`` (``context_len=1``), the first
    token conditioned on ``prefix_token`` (default: the config's first EOS id, 50256 for GPT-J). An empty
    text scores 0.0. The windows of all texts are batched together by :func:`score`.
    """
    if prefix_token is None:
        if not config.eos_token_ids:
            raise ScoringError("prefix_token is needed: the config has no eos_token_id")
        prefix_token = config.eos_token_ids[0]
    if isinstance(prefix_token, bool) or not isinstance(prefix_token, (int, np.integer)) or not (
        0 <= prefix_token < config.vocab_size
    ):
        raise ScoringError(f"prefix_token {prefix_token!r} is outside the vocabulary [0, {config.vocab_size})")
    if isinstance(token_lists, (str, bytes)) or not isinstance(token_lists, Sequence):
        raise ScoringError(f"token_lists must be a list of token-id lists, got {type(token_lists).__name__}")
    requests, owner = [], []
    for t, tokens in enumerate(token_lists):
        ids = _ids(tokens, f"text {t}", config.vocab_size)
        for pair in rolling_windows(ids.tolist(), int(prefix_token), config.n_positions):
            requests.append(pair)
            owner.append(t)
    results = score(config, params, requests, batch_size=batch_size, mesh=mesh, dtype=dtype,
                    vocab_block=vocab_block)
    totals = [0.0] * len(token_lists)
    for t, result in zip(owner, results):
        totals[t] += result.sum
    return totals

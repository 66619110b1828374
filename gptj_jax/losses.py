"""The losses and the FLOPs accounting, one copy each.

:func:`token_cross_entropy` is the one cross entropy: the model heads (``model.py``), the train step
(``train/step.py``) and the explicit ``shard_map`` forward (``tp.py``) all call it. Per token, in
float32::

    m    = max(logits)                     (no gradient; 0 when not finite, as jax.nn.logsumexp)
    S    = sum(exp(logits - m))
    ce   = (log(S) + m) - logits[target]   (= logsumexp(logits) - logits[target], optax's value)
    z    = z_loss * log(S)^2               (mesh-transformer-jax's z-loss, on the shifted logits)

With ``vocab_axis`` the last dimension of ``logits`` is this device's slice of the vocabulary inside
``shard_map``: one ``pmax`` of ``m`` and one ``psum`` of ``(S, target logit)`` over those mesh axes;
the full vocabulary is never gathered.

:func:`blockwise_cross_entropy` is the same per-token loss computed from the hidden states and the
``lm_head`` kernel without ever holding the ``[..., V]`` logits (the training loss; the train config's
``loss_block_size``): the vocabulary is walked in blocks of ``block_size`` columns keeping a running
max ``m`` and sum ``S`` (online log-sum-exp) and picking the target logit from the block that holds it;
its ``jax.custom_vjp`` backward walks the blocks again, recomputing each block's logits to form
``dlogits = g_logS * softmax + g_target * onehot`` and the block's share of ``dh``, ``dkernel`` and
``dbias``. Peak memory is one ``[..., block]`` float32 block instead of three ``[..., V]`` arrays
(logits, their exponentials and their gradient). Inside ``shard_map`` (``vocab_axis``) each device walks
its shard of the vocabulary in the same blocks, then one ``pmax`` and one ``psum`` combine the shards.

FLOPs (PaLM's accounting, 2 per multiply-add, attention's two ``[T, T]`` matmuls not cut by the causal
mask, the embedding lookup free): :func:`forward_flops_per_token` and :func:`train_flops_per_token`
(3x the forward: backward is twice the forward; no remat) used by ``plan`` and the train loop's MFU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax import lax

from .config import GPTJConfig

Array = jax.Array
AxisNames = Union[None, str, Sequence[str]]


class TokenLoss(NamedTuple):
    """Per-token terms of :func:`token_cross_entropy`, each shaped like the targets ``[...]``."""

    ce: Array  # float32 cross entropy, 0 where not valid
    z: Array  # float32 z-loss term, 0 where not valid
    valid: Array  # bool: the target is counted (not ignore_index)

    def mean(self) -> Array:
        """Mean cross entropy over the counted tokens (0 when none is counted)."""
        return jnp.sum(self.ce) / jnp.maximum(self.valid.sum(), 1)


def _axes(vocab_axis: AxisNames) -> tuple[str, ...]:
    if vocab_axis is None:
        return ()
    if isinstance(vocab_axis, str):
        return (vocab_axis,)
    return tuple(vocab_axis)


def token_cross_entropy(
    logits: Array,
    targets: Array,
    *,
    ignore_index: Optional[int] = None,
    z_loss: float = 0.0,
    vocab_axis: AxisNames = None,
) -> TokenLoss:
    """Cross entropy (and z-loss) of every token. logits ``[..., V]`` (any float), targets ``[...]`` int.

    ``ignore_index``: targets equal to it are not counted (``ce`` and ``z`` are 0 there, ``valid``
    False). ``vocab_axis``: mesh axis name(s) over which the last dim of ``logits`` is split inside
    ``shard_map`` (device ``i`` holds ids ``[i * V_local, (i + 1) * V_local)``; ``targets`` are
    global ids); None or ``()`` for whole logits.
    """
    axes = _axes(vocab_axis)
    logits = logits.astype(jnp.float32)
    valid = jnp.ones(targets.shape, bool) if ignore_index is None else targets != ignore_index
    safe = targets if ignore_index is None else jnp.where(valid, targets, 0)
    m = lax.stop_gradient(jnp.max(logits, axis=-1))  # [...]
    if axes:
        m = lax.pmax(m, axes)
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, jnp.zeros((), m.dtype)))
    sum_exp = jnp.sum(jnp.exp(logits - m[..., None]), axis=-1)  # [...]
    if axes:
        rows = logits.shape[-1]
        local = safe - lax.axis_index(axes) * rows
        hit = (local >= 0) & (local < rows)
        target = jnp.take_along_axis(logits, jnp.clip(local, 0, rows - 1)[..., None], axis=-1)[..., 0]
        sums = lax.psum(jnp.stack([sum_exp, jnp.where(hit, target, 0.0)]), axes)  # [2, ...]
        sum_exp, target = sums[0], sums[1]
    else:
        target = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    log_s = jnp.log(sum_exp)
    ce = (log_s + m) - target
    z = z_loss * jnp.square(log_s)
    if ignore_index is not None:
        ce = jnp.where(valid, ce, 0.0)
        z = jnp.where(valid, z, 0.0)
    return TokenLoss(ce, z, valid)


# ---------------------------------------------------------------------------------------- blockwise
def _block_logits(h: Array, kernel: Array, bias: Array) -> Array:
    """h ``[N, D]`` float32 @ kernel block ``[S, D, Vb]`` + bias ``[S, Vb]`` -> ``[N, S, Vb]`` float32."""
    return lax.dot_general(h, kernel, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) + bias


def _walk_blocks(n_cols: int, block: int, body, carry, first_static: bool = True):
    """Run ``carry = body(start, size, carry)`` over the column blocks ``[start, start + size)`` of
    ``[0, n_cols)``: the first block statically when ``first_static`` (its result gives the carry the
    varying-axes type of the block computation inside ``shard_map``), the other full blocks in a
    ``fori_loop`` (one block live at a time), the remainder statically."""
    n_full, tail = divmod(n_cols, block)
    first = 1 if first_static else 0
    if n_full and first_static:
        carry = body(0, block, carry)
    if n_full > first:
        carry = lax.fori_loop(first, n_full, lambda j, c: body(j * block, block, c), carry)
    if tail:
        carry = body(n_full * block, tail, carry)
    return carry


def _cols(x: Array, start, size: int) -> Array:
    """``x[..., start:start + size]`` (``start`` may be traced)."""
    return lax.dynamic_slice_in_dim(x, start, size, axis=x.ndim - 1)


def _onehot(local: Array, start, size: int, shards: int, cols: int) -> Array:
    """``[N, S, size]`` bool: True at the target's column. ``local`` ``[N]``: target id minus this
    device's first id (may fall outside ``[0, S * cols)``: then no column is True)."""
    shard = jnp.arange(shards, dtype=jnp.int32)[:, None]  # [S, 1]
    col = start + jnp.arange(size, dtype=jnp.int32)[None, :]  # [1, size]
    return (shard * cols + col)[None] == local[:, None, None]


def _varying_axes(x: Array) -> frozenset:
    """The manual mesh axes ``x`` varies over inside ``shard_map`` (its type's ``vma``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def _vary_alike(*xs: Array) -> list[Array]:
    """``xs`` cast to vary over the union of their manual mesh axes (unchanged outside ``shard_map``)."""
    union = frozenset().union(*(_varying_axes(x) for x in xs))
    out = []
    for x in xs:
        missing = tuple(sorted(union - _varying_axes(x)))
        out.append(lax.pcast(x, missing, to="varying") if missing else x)
    return out


def _first_id(axes: tuple[str, ...], n_local: int) -> Array:
    return lax.axis_index(axes) * n_local if axes else jnp.zeros((), jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _blockwise_stats(block: int, axes: tuple[str, ...], h: Array, kernel: Array, bias: Array, targets: Array):
    """``(log S, m, target logit)`` per token, each ``[N]`` float32, from h ``[N, D]``, kernel ``[S, D, V']``,
    bias ``[S, V']`` (all float32) and global target ids ``[N]``; see :func:`blockwise_cross_entropy`."""
    return _blockwise_fwd(block, axes, h, kernel, bias, targets)[0]


def _blockwise_fwd(block, axes, h, kernel, bias, targets):
    n = h.shape[0]
    shards, cols = kernel.shape[0], kernel.shape[2]
    local = targets - _first_id(axes, shards * cols)

    def body(start, size, carry):
        m, s, t = carry
        logits = _block_logits(h, _cols(kernel, start, size), _cols(bias, start, size))  # [N, S, size]
        m_new = jnp.maximum(m, jnp.max(logits, axis=(1, 2)))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, jnp.zeros((), jnp.float32))
        s = s * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(logits - m_safe[:, None, None]), axis=(1, 2))
        hit = _onehot(local, start, size, shards, cols)
        t = t + jnp.sum(jnp.where(hit, logits, 0.0), axis=(1, 2))
        return m_new, s, t

    neg = jnp.full((n,), -jnp.inf, jnp.float32)
    zero = jnp.zeros((n,), jnp.float32)
    m, s, t = _walk_blocks(cols, block, body, (neg, zero, zero))
    if axes:  # combine the vocabulary shards: one pmax, one psum
        m_all = lax.pmax(m, axes)
        m_safe = jnp.where(jnp.isfinite(m_all), m_all, jnp.zeros((), jnp.float32))
        sums = lax.psum(jnp.stack([s * jnp.exp(m - m_safe), t]), axes)
        s, t, m = sums[0], sums[1], m_safe
    else:
        m = jnp.where(jnp.isfinite(m), m, jnp.zeros((), jnp.float32))
    log_s = jnp.log(s)
    return (log_s, m, t), (h, kernel, bias, targets, log_s + m)


def _blockwise_bwd(block, axes, res, cts):
    h, kernel, bias, targets, lse = res
    g_log_s, _, g_t = cts  # m carries no gradient (stop_gradient, as in token_cross_entropy)
    shards, cols = kernel.shape[0], kernel.shape[2]
    local = targets - _first_id(axes, shards * cols)

    def body(start, size, carry):
        dh, dk, db = carry
        k = _cols(kernel, start, size)
        logits = _block_logits(h, k, _cols(bias, start, size))  # [N, S, size]
        probs = jnp.exp(logits - lse[:, None, None])
        hit = _onehot(local, start, size, shards, cols)
        dl = g_log_s[:, None, None] * probs + jnp.where(hit, g_t[:, None, None], 0.0)  # [N, S, size]
        dh = dh + lax.dot_general(dl, k, (((1, 2), (0, 2)), ((), ())), preferred_element_type=jnp.float32)
        dk_block = lax.dot_general(h, dl, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)  # [D, S, size]
        dk = lax.dynamic_update_slice_in_dim(dk, jnp.transpose(dk_block, (1, 0, 2)), start, axis=2)
        db = lax.dynamic_update_slice_in_dim(db, jnp.sum(dl, axis=0), start, axis=1)
        return dh, dk, db

    init = (jnp.zeros_like(h), jnp.zeros_like(kernel), jnp.zeros_like(bias))
    # Outside shard_map every block runs in the loop: a statically computed first block would fix the
    # gradient carry's layout to its matmul's, and XLA:TPU (which stores a [4096, 50400] float32 kernel
    # column-major) would then copy the whole kernel gradient (0.77 GiB at GPT-J-6B size) into the
    # output's layout; a zero-initialised carry takes the output's layout.
    first_static = bool(axes) or bool(_varying_axes(h))
    dh, dk, db = _walk_blocks(cols, block, body, init, first_static=first_static)
    return dh, dk, db, None


_blockwise_stats.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_cross_entropy(
    hidden: Array,
    kernel: Array,
    bias: Optional[Array],
    targets: Array,
    *,
    block_size: int,
    ignore_index: Optional[int] = None,
    z_loss: float = 0.0,
    vocab_axis: AxisNames = None,
    vocab_shards: int = 1,
) -> TokenLoss:
    """:func:`token_cross_entropy` of ``logits = hidden @ kernel + bias`` without the ``[..., V]`` logits.

    hidden ``[..., D]``, kernel ``[D, V]``, bias ``[V]`` or None, targets ``[...]`` int; all computed in
    float32 (hidden, kernel and bias are cast), as the model's float32 ``lm_head``. ``block_size`` (> 0):
    vocabulary columns per block (the last block takes the remainder). ``vocab_axis``: as in
    :func:`token_cross_entropy` (kernel and bias are this device's ``V / mp`` columns inside ``shard_map``).
    ``vocab_shards``: under ``jit`` with the vocabulary split over that many devices (GSPMD), blocks are
    taken inside each device's contiguous ``V / vocab_shards`` columns, so a block never straddles two
    devices and the kernel is never gathered. Gradients flow to hidden, kernel and bias (a
    ``jax.custom_vjp`` that recomputes each block's logits).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    axes = _axes(vocab_axis)
    d, v = kernel.shape
    if v % vocab_shards:
        raise ValueError(f"vocab_shards={vocab_shards} does not divide the kernel's {v} vocabulary columns")
    if hidden.shape[-1] != d:
        raise ValueError(f"hidden states [..., {hidden.shape[-1]}] do not match the kernel [{d}, {v}]")
    lead = targets.shape
    h = hidden.astype(jnp.float32).reshape(-1, d)  # [N, D]
    # [S, D, V/S]: the shard axis leads, so with one shard this is the kernel's own layout (a [D, 1, V] view
    # costs XLA:TPU a relayout copy of the whole kernel and of its gradient)
    k = jnp.transpose(kernel.astype(jnp.float32).reshape(d, vocab_shards, v // vocab_shards), (1, 0, 2))
    b = (jnp.zeros((v,), jnp.float32) if bias is None else bias.astype(jnp.float32)).reshape(vocab_shards, -1)
    valid = jnp.ones(lead, bool) if ignore_index is None else targets != ignore_index
    safe = (targets if ignore_index is None else jnp.where(valid, targets, 0)).astype(jnp.int32).reshape(-1)
    block = min(block_size, v // vocab_shards)
    # Inside shard_map the inputs vary over different mesh axes (h over the batch axes, the kernel over
    # the vocabulary axes); cast them all to vary over the union, so that the backward's per-device
    # partial gradients (dh per vocabulary shard, dkernel per batch shard) are summed by the transposes
    # of these casts (psums), as plain autodiff would.
    h, k, b, safe = _vary_alike(h, k, b, safe)
    log_s, m, target = _blockwise_stats(block, axes, h, k, b, safe)
    log_s, m, target = log_s.reshape(lead), lax.stop_gradient(m).reshape(lead), target.reshape(lead)
    ce = (log_s + m) - target
    z = z_loss * jnp.square(log_s)
    if ignore_index is not None:
        ce = jnp.where(valid, ce, 0.0)
        z = jnp.where(valid, z, 0.0)
    return TokenLoss(ce, z, valid)


def causal_lm_loss(logits: Array, labels: Array, ignore_index: int = -100) -> Array:
    """HF's causal-LM loss: logits[:, :-1] ``[B, T-1, V]`` against labels[:, 1:], ``ignore_index``
    skipped, mean over the counted tokens. Scalar float32."""
    return token_cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=ignore_index).mean()


# ---------------------------------------------------------------------------------------- FLOPs
def forward_flops_per_token(config: GPTJConfig, seq: int) -> int:
    """Forward matmul FLOPs of one token attending to ``seq`` keys: ``2 * N + 4 * n_layer * n_embd * seq``.

    N counts every matmul weight of the causal LM (lm_head in, the embedding lookup out); the
    second term is q.k and p.v, 2 FLOPs per multiply-add each.
    """
    n_matmul = config.num_params("causal_lm") - config.vocab_size * config.n_embd
    return 2 * n_matmul + 4 * config.n_layer * config.n_embd * seq


def train_flops_per_token(config: GPTJConfig, seq: int) -> float:
    """Training FLOPs per token (forward + backward, no remat): 3x :func:`forward_flops_per_token`,
    i.e. ``6 * N + 12 * n_layer * n_embd * seq``."""
    return 3.0 * forward_flops_per_token(config, seq)

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

FLOPs (PaLM's accounting, 2 per multiply-add, attention's two ``[T, T]`` matmuls not cut by the causal
mask, the embedding lookup free): :func:`forward_flops_per_token` and :func:`train_flops_per_token`
(3x the forward: backward is twice the forward; no remat) used by ``plan`` and the train loop's MFU.
"""

from __future__ import annotations

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

"""mesh-transformer-jax's optimizer chain in optax.

mtj (``device_train.py`` with ``util.py``) builds::

    scale(1 / gradient_accumulation_steps) -> clip_by_global_norm(1.0) -> scale_by_adam()
    -> additive_weight_decay(wd)   # g + wd * p, only where len(p.shape) > 1
    -> scale(-1) -> scale_by_schedule(gpt3_schedule(warmup_steps, anneal_steps, lr, end_lr))

and applies it to the *sum* of the micro-batch gradients, so the first ``scale`` turns the sum into a mean.
The schedule (``gpt3_schedule``) at optimizer step ``s`` (0 for the first update) is::

    warmup_pct = clip(s, 0, warmup_steps) / warmup_steps
    anneal_pct = clip(s - warmup_steps, 0, anneal_steps) / anneal_steps
    lr(s) = warmup_pct * lr - (lr - end_lr) * (1 - cos(pi * anneal_pct)) / 2

a linear ramp from 0, then a half cosine down to ``end_lr`` that stays there. The weight decay term is
scaled by ``lr(s)`` too (it comes before the schedule). ``warmup_steps = 0`` means no warmup (mtj would
divide by zero).

Parameters and optimizer state are kept in ``param_dtype`` (float32 by default) whatever the compute dtype:
the model casts the float32 master weights to bfloat16 for its matmuls, and the gradients arrive in float32.

:class:`OptimizerConfig` holds every setting of the chain, taken from a :class:`TrainConfig`; it is frozen and
hashable, so the training loop caches its compiled step functions on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gptj_jax.train.config import TrainConfig


def mtj_schedule(warmup_steps: int, anneal_steps: int, lr: float, end_lr: float) -> optax.Schedule:
    """``gpt3_schedule`` of mesh-transformer-jax: step (int array) -> learning rate (float32 array)."""
    if anneal_steps <= 0:
        raise ValueError(f"anneal_steps must be > 0, got {anneal_steps}")

    def schedule(step: Any) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        if warmup_steps > 0:
            warmup_pct = jnp.clip(step, 0, warmup_steps) / warmup_steps
        else:
            warmup_pct = jnp.float32(1.0)
        anneal_pct = jnp.clip(step - warmup_steps, 0, anneal_steps) / anneal_steps
        return warmup_pct * lr - (lr - end_lr) * (1 - jnp.cos(jnp.pi * anneal_pct)) / 2

    return schedule


def weight_decay_mask(params: Any) -> Any:
    """True for leaves with 2 or more dims (kernels, embeddings), False for biases and LayerNorm (mtj's rule)."""
    return jax.tree.map(lambda p: len(p.shape) > 1, params)


def mtj_optimizer(
    *,
    lr_schedule: optax.Schedule,
    weight_decay: float,
    gradient_accumulation_steps: int = 1,
    clip_norm: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """The mtj chain; feed it the **sum** of the micro-batch gradients (it divides by their count)."""
    return optax.chain(
        optax.scale(1.0 / gradient_accumulation_steps),
        optax.clip_by_global_norm(clip_norm),
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.scale(-1.0),
        optax.scale_by_schedule(lr_schedule),
    )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Every setting of the optimizer (hashable): the schedule, the chain and the dtype of its state."""

    warmup_steps: int
    anneal_steps: int
    lr: float
    end_lr: float
    weight_decay: float
    grad_accum: int
    clip_norm: float
    b1: float
    b2: float
    eps: float
    param_dtype: str  # of the master parameters and the optimizer state (a gptj_jax.dtypes name)

    @classmethod
    def from_train_config(cls, cfg: TrainConfig) -> OptimizerConfig:
        """The training config's optimizer keys, with ``anneal_steps`` and ``end_lr`` defaults filled in."""
        return cls(
            warmup_steps=cfg.warmup_steps,
            anneal_steps=cfg.anneal_steps_value,
            lr=cfg.lr,
            end_lr=cfg.end_lr_value,
            weight_decay=cfg.weight_decay,
            grad_accum=cfg.gradient_accumulation_steps,
            clip_norm=cfg.clip_norm,
            b1=cfg.adam_b1,
            b2=cfg.adam_b2,
            eps=cfg.adam_eps,
            param_dtype=cfg.param_dtype,
        )

    def build(self) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """``(optimizer, schedule)``: :func:`mtj_optimizer` over :func:`mtj_schedule` with these settings."""
        schedule = mtj_schedule(self.warmup_steps, self.anneal_steps, self.lr, self.end_lr)
        optimizer = mtj_optimizer(
            lr_schedule=schedule,
            weight_decay=self.weight_decay,
            gradient_accumulation_steps=self.grad_accum,
            clip_norm=self.clip_norm,
            b1=self.b1,
            b2=self.b2,
            eps=self.eps,
        )
        return optimizer, schedule

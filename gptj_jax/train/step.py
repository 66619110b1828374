"""The jitted train and eval steps.

Training state is a plain dict (a pytree)::

    {"step": int32 [],              optimizer steps taken
     "params": params pytree,       param_dtype (float32) master weights
     "opt_state": optax state,      same dtype, sharded like the params
     "rng": uint32 [2]}             dropout key, split once per step

A batch is ``[k, b, seq + 1]`` tokens (k = gradient_accumulation_steps micro-batches of b rows, b the
global micro-batch). Each record predicts ``seq`` tokens: inputs ``rec[:, :-1]``, targets ``rec[:, 1:]``.
The micro-batch gradients are summed in float32 by a ``lax.scan`` and the optimizer (``optimizer.py``,
mtj's chain) divides by k.

Loss per token: ``losses.token_cross_entropy`` (float32), plus mtj's optional z-loss
``z * log(sum(exp(l - max(l))))^2``. With ``loss_block_size > 0`` it is ``losses.blockwise_cross_entropy``
on the final hidden states and the ``lm_head`` params instead: the same numbers (to float32 rounding)
without ever holding the ``[b, seq, V]`` logits. Two forwards: ``gspmd`` (the linen model under jit; XLA
places the collectives from the param and batch shardings) and ``shard_map`` (``tp.shard_map_loss``: the
explicit Megatron forward; logits stay split over the vocabulary on ``mp`` and the loss is vocab-parallel:
one ``pmax`` and one ``psum`` over ``mp``, never gathering V).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptj_jax import sharding as sh
from gptj_jax.config import GPTJConfig
from gptj_jax.dtypes import DTYPES
from gptj_jax.losses import blockwise_cross_entropy, token_cross_entropy
from gptj_jax.model import GPTJModel, model_for

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step functions (hashable)."""

    model: GPTJConfig
    dtype: str = "float32"  # compute dtype
    remat: str = "none"
    forward: str = "gspmd"  # or "shard_map"
    z_loss: float = 0.0
    grad_accum: int = 1
    loss_block_size: int = 0  # > 0: blockwise cross entropy over this many vocabulary columns at a time
    lora: Optional[Any] = None  # lora.LoraSpec: train adapters on a frozen base passed to the step
    lora_base_quantize: Optional[str] = None  # "int8": the base is quantize.py's int8 tree
    lora_base_dtype: Optional[str] = None  # the float dtype an int8 base dequantizes to (None: float32)

    def __post_init__(self) -> None:
        if self.loss_block_size < 0:
            raise ValueError(f"loss_block_size must be >= 0 (0: full logits), got {self.loss_block_size}")

    @property
    def deterministic(self) -> bool:
        m = self.model
        return m.resid_pdrop == 0 and m.embd_pdrop == 0 and m.attn_pdrop == 0


# ---------------------------------------------------------------------------------------- losses
class _CausalLMTrunk(nn.Module):
    """``GPTJForCausalLM`` without its ``lm_head`` matmul: the final hidden states ``[B, T, D]`` float32.

    Its ``GPTJModel`` sits at the same scope (``transformer``) as in the causal LM, so it takes the same
    params and draws the same dropout masks.
    """

    config: GPTJConfig
    dtype: Any = jnp.float32
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, input_ids: Array, deterministic: bool) -> Array:
        model = GPTJModel(self.config, self.dtype, remat_policy=self.remat_policy, name="transformer")
        return model(input_ids, deterministic=deterministic).last_hidden_state


def make_loss_fn(cfg: StepConfig, mesh: Mesh, train: bool = True) -> Callable[..., tuple[Array, dict]]:
    """``loss(params, tokens [b, seq+1] int32, rng) -> (mean ce + mean z, {"ce", "z"})`` for one micro-batch.
    With ``cfg.lora``: ``loss(adapters, tokens, rng, base)`` (LoRA dropout only when ``train``; the loss over
    the full logits: the blockwise loss reads the lm_head params directly, which LoRA's context does not see)."""
    dtype = DTYPES[cfg.dtype]
    if cfg.lora is not None and cfg.forward != "gspmd":
        raise ValueError("LoRA (lora_rank > 0) runs with forward=gspmd only")
    if cfg.forward == "gspmd" and cfg.loss_block_size and cfg.lora is None:
        trunk = _CausalLMTrunk(cfg.model, dtype, cfg.remat)
        vocab_shards = sh.axis_size(mesh, sh.logical_to_mesh(("vocab",))[0])

        def blockwise_loss(params, tokens, rng, base=None):
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            rngs = None if cfg.deterministic else {"dropout": rng}
            variables = {"params": {"transformer": params["transformer"]}}
            h = trunk.apply(variables, inputs, cfg.deterministic, rngs=rngs)  # [b, seq, D] float32
            head = params["lm_head"]
            ce, z, _ = blockwise_cross_entropy(
                h.astype(dtype), head["kernel"], head["bias"], targets, block_size=cfg.loss_block_size,
                z_loss=cfg.z_loss, vocab_shards=vocab_shards,
            )
            return jnp.mean(ce) + jnp.mean(z), {"ce": jnp.mean(ce), "z": jnp.mean(z)}

        return blockwise_loss
    if cfg.forward == "gspmd":
        module = model_for(cfg.model, "causal_lm", dtype=dtype, remat_policy=cfg.remat)

        def apply(params, inputs, rngs, rng, base):
            if cfg.lora is None:
                return module.apply({"params": params}, inputs, deterministic=cfg.deterministic, rngs=rngs).logits
            from gptj_jax.lora import lora_context
            from gptj_jax.quantize import dequantize

            with lora_context(params, cfg.lora, rng=jax.random.fold_in(rng, 0x10AA), deterministic=not train):
                return module.apply({"params": dequantize(base)}, inputs, deterministic=cfg.deterministic,
                                    rngs=rngs).logits

        def loss(params, tokens, rng, base=None):
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            rngs = None if cfg.deterministic else {"dropout": rng}
            logits = apply(params, inputs, rngs, rng, base)
            ce, z, _ = token_cross_entropy(logits, targets, z_loss=cfg.z_loss)
            return jnp.mean(ce) + jnp.mean(z), {"ce": jnp.mean(ce), "z": jnp.mean(z)}

        return loss

    from gptj_jax import tp as tpmod

    if not cfg.deterministic:
        raise ValueError("forward=shard_map has no dropout: set resid_pdrop, embd_pdrop and attn_pdrop to 0 or use forward=gspmd")
    if cfg.remat != "none":
        raise ValueError(f"forward=shard_map does not rematerialise (remat={cfg.remat!r}): use remat=none or forward=gspmd")
    sharded = tpmod.shard_map_loss(
        cfg.model, mesh, dtype, sh.DEFAULT_RULES, z_loss=cfg.z_loss, ignore_index=None, block_size=cfg.loss_block_size
    )

    def loss(params, tokens, rng, base=None):  # no mask: every row is a full record, positions 0..seq-1
        ce, z = sharded(params, tokens[:, :-1], tokens[:, 1:])
        return ce + z, {"ce": ce, "z": z}

    return loss


# ---------------------------------------------------------------------------------------- shardings
def batch_spec_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a ``[k, b, seq + 1]`` train batch: rows over the batch axes."""
    return sh.logical_sharding(mesh, (None, "batch", "length"))


def state_shardings(cfg: StepConfig, mesh: Mesh, optimizer: optax.GradientTransformation, param_dtype: Any) -> dict:
    """NamedSharding pytree of the train state on ``mesh`` (params by the rules, optimizer state like its params)."""
    params_sh = sh.param_shardings(cfg.model, mesh, "causal_lm")
    if cfg.lora is not None:  # the adapters: each split like its base kernel's matching axis (lora.py)
        from gptj_jax.lora import adapter_shardings

        params_sh = adapter_shardings(cfg.model, cfg.lora, mesh)
    abstract = jax.eval_shape(
        lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, param_dtype), _trained_shapes(cfg))
    )
    opt_sh = sh.opt_state_shardings(optimizer, abstract, params_sh)
    replicated = NamedSharding(mesh, P())
    return {"step": replicated, "params": params_sh, "opt_state": opt_sh, "rng": replicated}


def _trained_shapes(cfg: StepConfig) -> Any:
    """Shapes of what the optimizer trains: the params, or with LoRA the adapters."""
    if cfg.lora is not None:
        from gptj_jax.lora import adapter_shapes

        return adapter_shapes(cfg.model, cfg.lora)
    return _param_shapes(cfg.model)


def base_shardings(cfg: StepConfig, mesh: Mesh) -> Any:
    """With LoRA: the shardings of the frozen base (by the rules; an int8 base's scales with their kernels)."""
    shardings = sh.param_shardings(cfg.model, mesh, "causal_lm")
    if cfg.lora_base_quantize:
        from gptj_jax import quantize

        shapes = _param_shapes(cfg.model)
        if cfg.lora_base_dtype:  # the int8 leaves carry the dtype they dequantize to: match the loaded base's
            shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, DTYPES[cfg.lora_base_dtype]), shapes)
        shardings = quantize.shardings(quantize.abstract_params(shapes), shardings)
    return shardings


@functools.lru_cache(maxsize=8)
def _param_shapes(config: GPTJConfig) -> Any:
    from gptj_jax.model import init_params

    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def abstract_state(cfg: StepConfig, mesh: Mesh, optimizer: optax.GradientTransformation, param_dtype: Any) -> dict:
    """``ShapeDtypeStruct`` pytree (with shardings) of the train state: the restore target."""
    shardings = state_shardings(cfg, mesh, optimizer, param_dtype)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype), _trained_shapes(cfg))
    opt = jax.eval_shape(optimizer.init, params)
    tree = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": params,
        "opt_state": opt,
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    return jax.tree.map(lambda s, shd: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shd), tree, shardings)


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int, shardings: dict) -> dict:
    """A fresh train state from (sharded) params: optimizer state created in its shards, step 0."""
    opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)
    rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(seed), 1), shardings["rng"])
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    return {"step": step, "params": params, "opt_state": opt_state, "rng": rng}


# ---------------------------------------------------------------------------------------- steps
def make_train_step(
    cfg: StepConfig,
    mesh: Mesh,
    optimizer: optax.GradientTransformation,
    lr_schedule: Optional[optax.Schedule],
    shardings: dict,
) -> Callable[[dict, Array], tuple[dict, dict]]:
    """Jitted ``train_step(state, batch [k, b, seq+1]) -> (state, metrics)``; donates the old state.

    metrics (float32 scalars): ``loss`` (mean cross entropy, the number to watch), ``z_loss``, ``grad_norm``
    (global norm of the mean gradient, before clipping), ``lr`` (the rate this update used).
    """
    loss_fn = make_loss_fn(cfg, mesh)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: dict, batch: Array, base: Any = None) -> tuple[dict, dict]:
        params = state["params"]  # with LoRA: the adapters; the frozen base comes as ``base``
        rng, step_rng = jax.random.split(state["rng"])
        tokens = batch.astype(jnp.int32)  # [k, b, seq+1]

        def micro(carry, xs):
            grads, ce, z = carry
            toks, i = xs
            (_, aux), g = grad_fn(params, toks, jax.random.fold_in(step_rng, i), base)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (grads, ce + aux["ce"], z + aux["z"]), None

        k = tokens.shape[0]
        if k == 1:  # no accumulator: the gradient goes straight to the optimizer
            (_, aux), grads = grad_fn(params, tokens[0], jax.random.fold_in(step_rng, 0), base)
            ce, z = aux["ce"], aux["z"]
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            init = (zeros, jnp.float32(0), jnp.float32(0))
            (grads, ce, z), _ = lax.scan(micro, init, (tokens, jnp.arange(k)))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            "loss": ce / k,
            "z_loss": z / k,
            "grad_norm": optax.tree.norm(grads) / k,
            "lr": lr_schedule(state["step"]) if lr_schedule is not None else jnp.float32(0),
        }
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state, "rng": rng}
        return new_state, metrics

    in_shardings = (shardings, batch_spec_sharding(mesh))
    if cfg.lora is not None:
        in_shardings += (base_shardings(cfg, mesh),)
    return jax.jit(
        step,
        in_shardings=in_shardings,
        out_shardings=(shardings, NamedSharding(mesh, P())),
        donate_argnums=(0,),
    )


def make_eval_step(cfg: StepConfig, mesh: Mesh, params_shardings: Any) -> Callable[[Any, Array], Array]:
    """Jitted ``eval_step(params, batch [b, seq+1]) -> [2]`` float32 (sum of token cross entropies, token count)."""
    cfg = dataclasses.replace(cfg, z_loss=0.0, remat="none")
    if not cfg.deterministic:
        cfg = dataclasses.replace(cfg, model=cfg.model.replace(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    loss_fn = make_loss_fn(cfg, mesh, train=False)

    def step(params, batch, base=None):
        tokens = batch.astype(jnp.int32)
        _, aux = loss_fn(params, tokens, jax.random.PRNGKey(0), base)
        n = jnp.float32(tokens.shape[0] * (tokens.shape[1] - 1))
        return jnp.stack([aux["ce"] * n, n])

    in_shardings = (params_shardings, sh.logical_sharding(mesh, ("batch", "length")))
    if cfg.lora is not None:
        in_shardings += (base_shardings(cfg, mesh),)
    return jax.jit(step, in_shardings=in_shardings, out_shardings=NamedSharding(mesh, P()))

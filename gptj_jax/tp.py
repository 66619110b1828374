"""The GPT-J forward and loss on a mesh, two ways: ``jit`` (XLA's SPMD partitioner) and ``shard_map``.

``impl="jit"`` runs the linen model (``model.py``) under ``jax.jit`` with sharded params and batch;
XLA decides where the collectives go. ``impl="shard_map"`` is the Megatron layout mesh-transformer-jax
used, written out with explicit collectives, per device:

* wte is split over the vocabulary on ``mp``: each device embeds the ids in its vocab range, zeros
  the rest, and one ``psum`` over ``mp`` assembles the embeddings.
* q/k/v and fc_in are column-parallel (each device computes ``n_head / mp`` whole heads and
  ``n_inner / mp`` MLP units), out_proj and fc_out are row-parallel (their outputs are partial
  sums). GPT-J's parallel residual lets the attention and MLP partial sums be added locally, so
  each block needs **one** ``psum`` over ``mp``.
* lm_head is column-parallel over the vocabulary; logits stay split ``[B, T, V / mp]``, and the
  loss is ``losses.token_cross_entropy`` with ``vocab_axis``: ``pmax`` of the row max, then one
  ``psum`` of the target logit and the sum of exponentials; the full logits are never gathered. With
  ``block_size`` it is ``losses.blockwise_cross_entropy`` on the same shard, in vocabulary blocks, so
  not even the local ``[b, T, V/mp]`` logits exist.
  :func:`shard_map_loss` is that wiring, shared by :func:`make_loss` and the train step.
* Dimensions split over ``fsdp`` (the ``embed`` side of every matrix) are ``all_gather``-ed right
  before use (ZeRO-3 / FSDP); the backward pass turns those into reduce-scatters.

Which mesh axes play these roles is read from the rules table (``sharding.DEFAULT_RULES``):
``heads``, ``mlp`` and ``vocab`` must map to the same axes (the tensor-parallel axes); every other
split dimension is gathered. The block calls ``model.layer_norm`` and ``model.attend``, so the
numerics are ``model.py``'s (LayerNorm, softmax, logits in float32) and the two paths agree to
float32 rounding.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from . import sharding as sh
from .config import GPTJConfig
from .losses import blockwise_cross_entropy, causal_lm_loss, token_cross_entropy
from .model import ACT_FNS, apply_rotary, attend, layer_norm, logical_axes, model_for, rotary_sin_cos

Array = jax.Array
IMPLS = ("jit", "shard_map")
TP_NAMES = ("heads", "mlp", "vocab")  # logical axes kept local (split) in the shard_map forward


class Layout(NamedTuple):
    """Mesh axes playing each role in the shard_map forward (tuples, possibly empty)."""

    tp: tuple[str, ...]  # where heads / mlp / vocab are split: psum / pmax axes
    batch: tuple[str, ...]  # where rows are split: the loss's psum axes


def layout_of(mesh: Mesh, rules: sh.Rules = sh.DEFAULT_RULES) -> Layout:
    """Read the tensor-parallel and batch axes from the rules; raise if heads / mlp / vocab disagree.

    Mesh axes of size 1 are left out: they split nothing, so no collective runs over them.
    """
    targets = {name: sh.as_axes(sh.logical_to_mesh((name,), rules)[0]) for name in TP_NAMES}
    if len(set(targets.values())) != 1:
        raise ValueError(
            f"the shard_map forward needs heads, mlp and vocab split over the same mesh axes, "
            f"but the rules give {targets}"
        )
    batch = sh.as_axes(sh.logical_to_mesh(("batch",), rules)[0])
    for axes in (targets["heads"], batch):
        for a in axes:
            if a not in mesh.axis_names:
                raise ValueError(f"rules name mesh axis {a!r}, not in the mesh's {tuple(mesh.axis_names)}")
    keep = lambda axes: tuple(a for a in axes if int(mesh.shape[a]) > 1)
    return Layout(tp=keep(targets["heads"]), batch=keep(batch))


def shard_map_specs(config: GPTJConfig, mesh: Mesh, rules: sh.Rules = sh.DEFAULT_RULES) -> tuple[Any, P, P]:
    """(param specs, batch spec, logits spec) for the shard_map path, without size-1 mesh axes."""
    strip = lambda spec: sh.drop_trivial_axes(spec, mesh)
    params = jax.tree.map(strip, sh.param_specs(config, "causal_lm", rules), is_leaf=lambda x: isinstance(x, P))
    return params, strip(sh.logical_to_mesh(sh.BATCH_AXES, rules)), strip(sh.logical_to_mesh(sh.LOGITS_AXES, rules))


# ---------------------------------------------------------------------------------------- collectives
def _psum(x: Any, axes: tuple[str, ...]) -> Any:
    return lax.psum(x, axes) if axes else x


def _gather_leaf(x: Array, logical: P, spec: P) -> Array:
    """All-gather every dimension of a local param shard that is split but not tensor-parallel."""
    for dim, (name, target) in enumerate(zip(tuple(logical), tuple(spec))):
        axes = sh.as_axes(target)
        if axes and name not in TP_NAMES:
            x = lax.all_gather(x, axes, axis=dim, tiled=True)
    return x


def _gather(tree: Any, logical: Any, specs: Any) -> Any:
    return jax.tree.map(_gather_leaf, tree, logical, specs, is_leaf=lambda x: isinstance(x, P))


def _tp_index(axes: tuple[str, ...]) -> Array:
    return lax.axis_index(axes) if axes else jnp.zeros((), jnp.int32)


# ---------------------------------------------------------------------------------------- local math
def _dense(x: Array, kernel: Array, bias: Optional[Array], dtype: Any) -> Array:
    """flax ``nn.Dense`` on a local shard: inputs and kernel in ``dtype``, ``[..., I] @ [I, O]``."""
    y = lax.dot_general(x.astype(dtype), kernel.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())))
    if bias is not None:
        y = y + bias.astype(dtype)
    return y


def _ln(config: GPTJConfig, p: dict[str, Array], x: Array) -> Array:
    """The model's LayerNorm module (float32) applied to ``x`` with params ``p``."""
    return layer_norm(config, jnp.float32, "ln").apply({"params": p}, x.astype(jnp.float32))


def _embed(emb: Array, ids: Array, layout: Layout, dtype: Any) -> Array:
    """Vocab-parallel lookup. emb ``[V/mp, D]`` local rows, ids ``[b, T]`` -> ``[b, T, D]`` (one psum)."""
    rows = emb.shape[0]
    local = ids - _tp_index(layout.tp) * rows
    hit = (local >= 0) & (local < rows)
    x = jnp.take(emb.astype(dtype), jnp.clip(local, 0, rows - 1), axis=0)  # [b, T, D]
    return _psum(jnp.where(hit[..., None], x, jnp.zeros((), dtype)), layout.tp)


def _block(
    config: GPTJConfig, p: dict[str, Any], x: Array, sin: Array, cos: Array, allowed: Array, layout: Layout, dtype: Any
) -> Array:
    """One GPT-J block on local shards: ``x + psum(attn_partial + mlp_partial) + fc_out.bias``. x ``[b, T, D]``."""
    b, T, _ = x.shape
    h = _ln(config, p["ln_1"], x).astype(dtype)  # [b, T, D]
    a = p["attn"]

    def heads(name: str) -> Array:
        return _dense(h, a[name]["kernel"], None, dtype).reshape(b, T, -1, config.head_dim)  # [b, T, N/mp, H]

    q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
    q = apply_rotary(q.astype(jnp.float32), sin, cos).astype(dtype)
    k = apply_rotary(k.astype(jnp.float32), sin, cos).astype(dtype)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [b, N/mp, T, H]: attend's (the cache's) layout
    ctx = attend(q, k, v, allowed)[0].reshape(b, T, -1)  # [b, T, D/mp]
    attn = _dense(ctx, a["out_proj"]["kernel"], None, dtype)  # [b, T, D] partial over mp

    m = p["mlp"]
    u = ACT_FNS[config.activation_function](_dense(h, m["fc_in"]["kernel"], m["fc_in"]["bias"], dtype))  # [b, T, F/mp]
    ff = _dense(u, m["fc_out"]["kernel"], None, dtype)  # [b, T, D] partial over mp
    return _psum(attn + ff, layout.tp) + m["fc_out"]["bias"].astype(dtype) + x


def local_hidden(
    config: GPTJConfig, params: Any, logical: Any, specs: Any,
    ids: Array, mask: Array, pos: Array, layout: Layout, dtype: Any,
) -> tuple[Array, dict[str, Array]]:
    """Per-device trunk: ids / mask / pos ``[b, T]`` -> (the lm_head's input ``[b, T, D]`` float32 (ln_f's
    output rounded to ``dtype``, as the model's float32 head sees it), this device's lm_head
    ``{"kernel": [D, V/mp], "bias": [V/mp]}``)."""
    if config.scan_layers:
        raise ValueError("the explicit shard_map forward (tp.py) runs unrolled blocks: use scan_layers=False with it")
    t, tl, ts = params["transformer"], logical["transformer"], specs["transformer"]
    wte = _gather(t["wte"], tl["wte"], ts["wte"])["embedding"]  # [V/mp, D]
    x = _embed(wte, ids, layout, dtype)  # [b, T, D]
    T = ids.shape[1]
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]  # [T, S]
    allowed = mask.astype(bool)[:, None, :] & causal[None]  # [b, T, S]
    sin, cos = rotary_sin_cos(pos, config.rotary_dims)  # [b, T, R/2]
    for i in range(config.n_layer):
        name = f"h_{i}"
        layer = _gather(t[name], tl[name], ts[name])
        x = _block(config, layer, x, sin, cos, allowed, layout, dtype)
    x = _ln(config, _gather(t["ln_f"], tl["ln_f"], ts["ln_f"]), x)  # [b, T, D] float32
    head = _gather(params["lm_head"], logical["lm_head"], specs["lm_head"])
    return x.astype(dtype).astype(jnp.float32), head


def local_logits(
    config: GPTJConfig, params: Any, logical: Any, specs: Any,
    ids: Array, mask: Array, pos: Array, layout: Layout, dtype: Any,
) -> Array:
    """Per-device forward: ids / mask / pos ``[b, T]`` -> logits ``[b, T, V/mp]`` float32."""
    h, head = local_hidden(config, params, logical, specs, ids, mask, pos, layout, dtype)
    return lax.dot_general(
        h, head["kernel"].astype(jnp.float32), (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32
    ) + head["bias"].astype(jnp.float32)  # [b, T, V/mp]


# ---------------------------------------------------------------------------------------- builders
def _defaults(ids: Array, mask: Optional[Array], pos: Optional[Array]) -> tuple[Array, Array]:
    if mask is None:
        mask = jnp.ones(ids.shape, jnp.int32)
    mask = mask.astype(jnp.int32)
    if pos is None:
        pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    return mask, pos


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r} is not one of {IMPLS}")


def make_forward(
    config: GPTJConfig, mesh: Mesh, impl: str = "jit", dtype: Any = jnp.float32, rules: sh.Rules = sh.DEFAULT_RULES
):
    """A jitted ``f(params, input_ids, attention_mask, position_ids) -> logits [B, T, V]`` float32.

    ``attention_mask`` / ``position_ids`` may be None (all ones / ``cumsum(mask) - 1``). Logits come
    out split like ``sharding.logits_sharding(mesh)`` (rows over the batch axes, vocab over mp).
    Cached per (config, mesh, impl, dtype, rules): the same object comes back, so repeated calls do
    not retrace.
    """
    _check_impl(impl)
    return _make_forward(config, mesh, impl, jnp.dtype(dtype), tuple(rules))


@functools.lru_cache(maxsize=64)
def _make_forward(config: GPTJConfig, mesh: Mesh, impl: str, dtype: Any, rules: sh.Rules):
    sh.validate_config(config, mesh, "causal_lm", rules)
    out_sharding = sh.logits_sharding(mesh, rules)
    if impl == "jit":
        module = model_for(config, "causal_lm", dtype=dtype)

        def fwd(params, ids, mask=None, pos=None):
            mask, pos = _defaults(ids, mask, pos)
            return module.apply({"params": params}, ids, attention_mask=mask, position_ids=pos).logits

        return jax.jit(fwd, out_shardings=out_sharding)

    layout = layout_of(mesh, rules)
    logical = logical_axes(config, "causal_lm")
    specs, batch_spec, logits_spec = shard_map_specs(config, mesh, rules)
    local = functools.partial(local_logits, config, logical=logical, specs=specs, layout=layout, dtype=dtype)
    mapped = jax.shard_map(
        lambda params, ids, mask, pos: local(params, ids=ids, mask=mask, pos=pos),
        mesh=mesh,
        in_specs=(specs, batch_spec, batch_spec, batch_spec),
        out_specs=logits_spec,
    )

    def fwd(params, ids, mask=None, pos=None):
        mask, pos = _defaults(ids, mask, pos)
        return mapped(params, ids, mask, pos)

    return jax.jit(fwd, out_shardings=out_sharding)


def make_loss(
    config: GPTJConfig, mesh: Mesh, impl: str = "jit", dtype: Any = jnp.float32, rules: sh.Rules = sh.DEFAULT_RULES,
    *, block_size: int = 0,
):
    """A jitted ``f(params, input_ids, labels, attention_mask, position_ids) -> scalar`` causal-LM loss.

    HF's loss (shifted, labels -100 ignored, mean over counted tokens). ``impl="shard_map"`` is
    :func:`shard_map_loss` (the vocab-parallel cross-entropy on the vocab-split logits) with
    ``labels[:, 1:]`` as targets. ``block_size > 0``: ``losses.blockwise_cross_entropy`` in vocabulary
    blocks of that many columns instead (the same value; no ``[B, T, V]`` logits). Differentiable
    (``jax.grad`` works through both impls) and usable inside another ``jit``. Cached like
    :func:`make_forward`.
    """
    _check_impl(impl)
    if block_size < 0:
        raise ValueError(f"block_size must be >= 0 (0: full logits), got {block_size}")
    return _make_loss(config, mesh, impl, jnp.dtype(dtype), tuple(rules), block_size)


@functools.lru_cache(maxsize=64)
def _make_loss(config: GPTJConfig, mesh: Mesh, impl: str, dtype: Any, rules: sh.Rules, block_size: int = 0):
    sh.validate_config(config, mesh, "causal_lm", rules)
    if impl == "jit" and block_size:
        trunk = model_for(config, "base", dtype=dtype)
        vocab_shards = sh.axis_size(mesh, sh.logical_to_mesh(("vocab",), rules)[0])

        def blockwise(params, ids, labels, mask=None, pos=None):
            mask, pos = _defaults(ids, mask, pos)
            h = trunk.apply({"params": params["transformer"]}, ids, attention_mask=mask, position_ids=pos)
            head = params["lm_head"]
            return blockwise_cross_entropy(
                h.last_hidden_state[:, :-1].astype(dtype), head["kernel"], head["bias"], labels[:, 1:],
                block_size=block_size, ignore_index=-100, vocab_shards=vocab_shards,
            ).mean()

        return jax.jit(blockwise)
    if impl == "jit":
        module = model_for(config, "causal_lm", dtype=dtype)

        def loss(params, ids, labels, mask=None, pos=None):
            mask, pos = _defaults(ids, mask, pos)
            logits = module.apply({"params": params}, ids, attention_mask=mask, position_ids=pos).logits
            return causal_lm_loss(logits, labels)

        return jax.jit(loss)

    sharded = shard_map_loss(config, mesh, dtype, rules, ignore_index=-100, block_size=block_size)

    def loss(params, ids, labels, mask=None, pos=None):
        return sharded(params, ids, labels[:, 1:], mask, pos)[0]

    return jax.jit(loss)


def shard_map_loss(
    config: GPTJConfig,
    mesh: Mesh,
    dtype: Any = jnp.float32,
    rules: sh.Rules = sh.DEFAULT_RULES,
    *,
    z_loss: float = 0.0,
    ignore_index: Optional[int] = -100,
    block_size: int = 0,
) -> Callable[..., tuple[Array, Array]]:
    """``f(params, ids, targets, mask=None, pos=None) -> (ce, z)``: the shard_map forward and its loss.

    ids / mask / pos ``[B, T]`` (mask / pos default as in :func:`make_forward`); targets ``[B, T']``
    global ids with ``T' <= T``: position ``t`` is scored against ``targets[:, t]`` and positions past
    ``T'`` are not scored (HF's shift passes ``labels[:, 1:]``; the train step passes the next
    tokens). ``ce`` and ``z`` are float32 scalars: the means over the counted tokens (targets other
    than ``ignore_index``) of the whole global batch of ``losses.token_cross_entropy`` with
    ``vocab_axis`` and ``z_loss``. Beyond the forward's collectives: one ``pmax`` and one ``psum`` over
    the tensor-parallel axes, one ``psum`` over the batch axes. Not jitted; differentiable.

    ``block_size > 0``: the loss is ``losses.blockwise_cross_entropy`` on the device's shard of the
    vocabulary, in blocks of that many columns: the ``[b, T, V/mp]`` logits are never formed.
    """
    layout = layout_of(mesh, rules)
    logical = logical_axes(config, "causal_lm")
    specs, batch_spec, _ = shard_map_specs(config, mesh, rules)

    def local(params, ids, targets, mask, pos):  # per device: [b, T] rows
        if block_size:
            h, head = local_hidden(config, params, logical, specs, ids, mask, pos, layout, dtype)  # [b, T, D]
            loss = blockwise_cross_entropy(
                h[:, : targets.shape[1]], head["kernel"], head["bias"], targets, block_size=block_size,
                ignore_index=ignore_index, z_loss=z_loss, vocab_axis=layout.tp,
            )
        else:
            logits = local_logits(config, params, logical, specs, ids, mask, pos, layout, dtype)  # [b, T, V/mp]
            loss = token_cross_entropy(
                logits[:, : targets.shape[1]], targets, ignore_index=ignore_index, z_loss=z_loss, vocab_axis=layout.tp
            )
        terms = [jnp.sum(loss.ce), jnp.sum(loss.valid).astype(jnp.float32)]
        if z_loss:
            terms.append(jnp.sum(loss.z))
        sums = _psum(jnp.stack(terms), layout.batch)  # one psum over the batch axes
        count = jnp.maximum(sums[1], 1.0)
        return sums[0] / count, (sums[2] / count if z_loss else jnp.zeros((), jnp.float32))

    mapped = jax.shard_map(
        local, mesh=mesh, in_specs=(specs, batch_spec, batch_spec, batch_spec, batch_spec), out_specs=(P(), P())
    )

    def loss(params, ids, targets, mask=None, pos=None):
        mask, pos = _defaults(ids, mask, pos)
        return mapped(params, ids, targets, mask, pos)

    return loss


def _put_batch(mesh: Mesh, rules: sh.Rules, *arrays: Any) -> list[Any]:
    """Host arrays -> the batch sharding; jax arrays (e.g. multi-process global batches) pass through."""
    return [
        a if a is None or isinstance(a, jax.Array) else sh.shard_batch(mesh, a, rules=rules)[0]
        for a in arrays
    ]


def forward(
    params: Any,
    input_ids: Any,
    attention_mask: Any = None,
    position_ids: Any = None,
    *,
    config: GPTJConfig,
    mesh: Mesh,
    impl: str = "jit",
    dtype: Any = jnp.float32,
    rules: sh.Rules = sh.DEFAULT_RULES,
) -> Array:
    """Causal-LM logits ``[B, T, V]`` float32 of a sharded forward (params from ``shard_params``).

    input_ids / attention_mask / position_ids ``[B, T]``: host arrays are split over the batch axes;
    jax arrays (e.g. from ``distributed.global_batch``) are used as they are.
    """
    ids, mask, pos = _put_batch(mesh, rules, input_ids, attention_mask, position_ids)
    return make_forward(config, mesh, impl, dtype, rules)(params, ids, mask, pos)


def loss(
    params: Any,
    input_ids: Any,
    labels: Any,
    attention_mask: Any = None,
    position_ids: Any = None,
    *,
    config: GPTJConfig,
    mesh: Mesh,
    impl: str = "jit",
    dtype: Any = jnp.float32,
    rules: sh.Rules = sh.DEFAULT_RULES,
) -> Array:
    """HF causal-LM loss (scalar float32) of a sharded forward; see :func:`make_loss`."""
    ids, lab, mask, pos = _put_batch(mesh, rules, input_ids, labels, attention_mask, position_ids)
    return make_loss(config, mesh, impl, dtype, rules)(params, ids, lab, mask, pos)


# ---------------------------------------------------------------------------------------- HLO
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Count collective ops in compiled HLO text (``jitted.lower(...).compile().as_text()``).

    Async pairs (``all-reduce-start`` / ``-done``) count once. Returns every kind in
    :data:`COLLECTIVES`, zeros included.
    """
    counts = {kind: 0 for kind in COLLECTIVES}
    for m in _COLLECTIVE_RE.finditer(hlo_text):
        counts[m.group(1)] += 1
    return counts


def compiled_collectives(jitted: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
    """``count_collectives`` of ``jitted`` compiled for ``args`` (arrays or ``ShapeDtypeStruct``)."""
    return count_collectives(jitted.lower(*args, **kwargs).compile().as_text())


def expected_forward_collectives(config: GPTJConfig, mesh: Mesh, rules: sh.Rules = sh.DEFAULT_RULES) -> dict[str, int]:
    """What the shard_map forward should compile to, before XLA merges anything.

    ``all-reduce``: 1 for the embedding + 1 per block when the tensor-parallel axes have > 1 device.
    ``all-gather``: one per (param, fsdp-split dim) when the gathered axes have > 1 device
    (7 per block with the default rules: q, k, v, out_proj, fc_in and fc_out kernels, fc_out bias;
    plus wte and lm_head kernel).
    """
    layout = layout_of(mesh, rules)
    counts = {kind: 0 for kind in COLLECTIVES}
    if sh.axis_size(mesh, layout.tp) > 1:
        counts["all-reduce"] = 1 + config.n_layer
    logical = jax.tree.leaves(logical_axes(config, "causal_lm"), is_leaf=lambda x: isinstance(x, P))
    specs = jax.tree.leaves(sh.param_specs(config, "causal_lm", rules), is_leaf=lambda x: isinstance(x, P))
    for lg, sp in zip(logical, specs):
        for name, target in zip(tuple(lg), tuple(sp)):
            if name not in TP_NAMES and sh.axis_size(mesh, target) > 1:
                counts["all-gather"] += 1
    return counts


def abstract_batch(mesh: Mesh, batch: int, seq: int, rules: sh.Rules = sh.DEFAULT_RULES) -> jax.ShapeDtypeStruct:
    """A ``ShapeDtypeStruct`` for ``[batch, seq]`` int32 ids with the batch sharding (for AOT lowering)."""
    return jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sh.batch_sharding(mesh, batch, rules))

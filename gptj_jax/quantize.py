"""int8 weight-only quantization: per-output-channel symmetric int8 matmul weights, dequantized in the step.

    config, params = gptj_jax.load("EleutherAI/gpt-j-6B", mesh=mesh, dtype="bfloat16", quantize="int8")
    gptj_jax.generate(config, params, ids)          # every jitted step dequantizes as it goes

What is quantized (:func:`quantized_paths`): every Dense kernel of the blocks (``attn/{q,k,v,out}_proj``,
``mlp/fc_in``, ``mlp/fc_out``); with ``embeddings=True`` also ``transformer/wte/embedding`` and
``lm_head/kernel``. LayerNorms, biases and the other heads stay in their float dtype.

Scheme (``int8``): a kernel ``W [in, out]`` becomes ``q = round(W / s)`` clipped to ``[-127, 127]`` int8 with
``s [out] = max_i |W[i, :]| / 127`` float32 (one scale per output channel, symmetric, no zero point); the
embedding ``[V, D]`` gets one scale per token row (its "output" is a row). A :class:`QuantizedArray`
``{q, scale}`` takes the float leaf's place in the params tree; it is a pytree, so ``jax.jit``,
``device_put``, sharding and ``jax.tree.map`` see its two arrays, and ``scale`` is sharded like the
kernel's output axis (:func:`shardings`). :func:`dequantize` turns a tree back into float leaves
(``q * s`` in float32, cast to the leaf's original dtype); the model steps (``generation.forward_cached``,
``scoring``) call it *inside* their jitted function, so XLA fuses convert-multiply into the matmul's
operand and no float copy of the model is kept (in ``generate``'s decode loop the dequantization is in the
loop body, per step). Device bytes: about half of bfloat16 for the quantized kernels (plus 4 bytes per
output channel).

Why not qwix (Google's ``qwix.quantize_model`` / PTQ, evaluated first): it quantizes by intercepting
``jax.lax.dot_general`` / ``einsum`` calls of a *wrapped* module, and its quantized params are
``WithAux(QArray)`` leaves that only its wrapped module can consume. Here (1) the LM head's matmul is a
``functools.partial(lax.dot_general, preferred_element_type=float32)`` bound at import, which its
interception does not see (so ``lm_head`` could not be quantized), and ``nn.Embed``'s gather is no dot at
all; (2) every consumer of params would have to build qwix's wrapped module instead of ours:
``generation``, ``scoring``, ``tp.py``'s explicit shard_map forward (which reads the params tree directly,
no module), the train step, the converters and ``sharding.shard_params``'s tree check; (3) the loader
must quantize tensor by tensor as it streams onto the mesh with the scale sharded like the weight, which
``qwix.quantize_params`` (a whole tree at once, needing the abstract quantized tree of a traced wrapped
model) does not do. A 2-array pytree and one ``dequantize`` call at the top of each step cover all of it.

int4 / fp8 are not implemented (see docs/quantization.md).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
SCHEMES = ("int8",)
QMAX = 127

# our param path (``table.flatten`` spelling) -> the axis the scales run along (the output channel)
_BLOCK_KERNEL = re.compile(r"transformer/h_\d+/(attn/(q|k|v|out)_proj|mlp/fc_(in|out))/kernel")
_EMBEDDINGS = {"transformer/wte/embedding": 0, "lm_head/kernel": 1}


@flax.struct.dataclass
class QuantizedArray:
    """An int8 weight: ``q`` int8 of the weight's shape, ``scale`` float32 ``[shape[channel_axis]]``.

    ``weight ~= q * scale`` broadcast along ``channel_axis``; ``dtype`` is the float dtype it came from (and
    dequantizes to)."""

    q: Array
    scale: Array
    channel_axis: int = flax.struct.field(pytree_node=False)
    dtype: Any = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def ndim(self) -> int:
        return len(self.q.shape)

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes) + int(self.scale.nbytes)

    def dequantize(self, dtype: Any = None) -> Array:
        """``q * scale`` (float32 product) in ``dtype`` (default: the original dtype), the weight's shape."""
        shape = [1] * self.ndim
        shape[self.channel_axis] = self.shape[self.channel_axis]
        w = self.q.astype(jnp.float32) * self.scale.reshape(shape)
        return w.astype(dtype or self.dtype)


def is_quantized_leaf(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def check_scheme(scheme: Optional[str], where: str = "quantize") -> Optional[str]:
    """``scheme`` if it is one we implement (or None); else ValueError naming it and the choices."""
    if scheme is None or scheme in SCHEMES:
        return scheme
    extra = " (int4 / fp8 are not implemented; see docs/quantization.md)" if str(scheme).lower() in (
        "int4", "fp8", "float8", "nf4", "int2") else ""
    raise ValueError(f"{where}={scheme!r} is not a quantization scheme; the one scheme is 'int8'{extra}")


def channel_axis(path: str, embeddings: bool = False) -> Optional[int]:
    """The scale axis of param ``path`` (``transformer/h_0/attn/q_proj/kernel``) if it is quantized, else None."""
    if _BLOCK_KERNEL.fullmatch(path):
        return 1
    if embeddings:
        return _EMBEDDINGS.get(path)
    return None


def quantized_paths(paths: Any, embeddings: bool = False) -> list[str]:
    """The members of ``paths`` that :func:`quantize_params` quantizes."""
    return [p for p in paths if channel_axis(p, embeddings) is not None]


@functools.partial(jax.jit, static_argnames=("axis", "out_shardings"))
def _quantize(x: Array, axis: int, out_shardings: Any = None) -> tuple[Array, Array]:
    x32 = x.astype(jnp.float32)
    reduce = tuple(i for i in range(x.ndim) if i != axis)
    amax = jnp.max(jnp.abs(x32), axis=reduce)  # [shape[axis]]
    scale = jnp.where(amax > 0, amax / QMAX, jnp.float32(1.0))
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    q = jnp.clip(jnp.round(x32 / scale.reshape(shape)), -QMAX, QMAX).astype(jnp.int8)
    if out_shardings is not None:
        q = jax.lax.with_sharding_constraint(q, out_shardings[0])
        scale = jax.lax.with_sharding_constraint(scale, out_shardings[1])
    return q, scale


def scale_sharding(sharding: Any, axis: int) -> Any:
    """The sharding of the scales of a weight placed with ``sharding``: its ``axis`` entry of the spec."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (axis + 1 - len(sharding.spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[axis]))
    return sharding


def quantize_array(x: Array, axis: int, scheme: str = "int8") -> QuantizedArray:
    """One weight -> :class:`QuantizedArray` (``axis``: the output-channel axis), placed like ``x``
    (``q`` with ``x``'s sharding, ``scale`` with that of ``x``'s ``axis``)."""
    check_scheme(scheme)
    x = jnp.asarray(x)
    sharding = getattr(x, "sharding", None)
    outs = None
    if isinstance(sharding, jax.sharding.NamedSharding):
        outs = (sharding, scale_sharding(sharding, axis))
    q, scale = _quantize(x, axis=axis, out_shardings=outs)
    return QuantizedArray(q, scale, axis, np.dtype(x.dtype))


def quantize_params(params: Any, scheme: str = "int8", *, embeddings: bool = False) -> Any:
    """A params tree with its matmul weights (and, with ``embeddings``, ``wte`` and ``lm_head``) as
    :class:`QuantizedArray`; the other leaves unchanged. Each new leaf is sharded like the old one."""
    from gptj_jax.convert import table

    check_scheme(scheme)
    flat = table.flatten(params)
    out = {}
    for path, x in flat.items():
        axis = channel_axis(path, embeddings)
        out[path] = quantize_array(x, axis, scheme) if axis is not None and not is_quantized_leaf(x) else x
    return table.unflatten(out)


def is_quantized(params: Any) -> bool:
    """True when any leaf of ``params`` is a :class:`QuantizedArray`."""
    return any(is_quantized_leaf(x) for x in jax.tree.leaves(params, is_leaf=is_quantized_leaf))


def dequantize(params: Any, dtype: Any = None) -> Any:
    """Every :class:`QuantizedArray` of ``params`` as a float array (``dtype``, default its original dtype);
    other leaves unchanged. Call it inside the jitted step that uses the weights."""
    if not is_quantized(params):
        return params
    return jax.tree.map(
        lambda x: x.dequantize(dtype) if is_quantized_leaf(x) else x, params, is_leaf=is_quantized_leaf
    )


def shardings(params: Any, param_shardings: Any) -> Any:
    """``param_shardings`` (a tree like the float params) reshaped like the (partly) quantized ``params``:
    each quantized leaf gets ``QuantizedArray(kernel sharding, scale sharding)``."""
    return jax.tree.map(
        lambda x, s: QuantizedArray(s, scale_sharding(s, x.channel_axis), x.channel_axis, x.dtype)
        if is_quantized_leaf(x) else s,
        params, param_shardings, is_leaf=is_quantized_leaf,
    )


def abstract_params(params: Any, scheme: str = "int8", *, embeddings: bool = False) -> Any:
    """ShapeDtypeStructs of the quantized tree of (abstract or real) float ``params``, nothing computed:
    for byte counts of large models (``jax.eval_shape``)."""
    from gptj_jax.convert import table

    check_scheme(scheme)
    out = {}
    for path, x in table.flatten(params).items():
        axis = channel_axis(path, embeddings)
        if axis is None:
            out[path] = jax.ShapeDtypeStruct(x.shape, x.dtype)
        else:
            out[path] = QuantizedArray(
                jax.ShapeDtypeStruct(x.shape, jnp.int8), jax.ShapeDtypeStruct((x.shape[axis],), jnp.float32),
                axis, np.dtype(x.dtype),
            )
    return table.unflatten(out)


def param_bytes(params: Any) -> int:
    """Bytes of every array of ``params`` (global size: a sharded leaf counts once), quantized or not."""
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


def device_bytes(params: Any) -> int:
    """Bytes the arrays of ``params`` hold on their devices (every shard of every leaf, replicas counted)."""
    return int(sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards))

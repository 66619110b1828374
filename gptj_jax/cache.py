"""The KV cache: one layout, a plain pytree passed into the model and returned updated.

Layout (``B`` rows, ``N`` heads, ``S`` cache slots, ``H`` head dim, ``T`` new tokens)::

    {
      "layers":  [{"k": [B, N, S, H], "v": [B, N, S, H]}, ...]   # one dict per layer, heads first
      "mask":    [B, S] bool     # slot holds a real (non-pad) token
      "index":   [B] int32       # next slot to write, per row
      "lengths": [B] int32       # real tokens seen per row = position id of the row's next token
    }

With ``config.scan_layers`` the layers are stacked instead (what ``nn.scan`` reads and writes, no
per-step stacking copy): ``"layers": {"k": [L, B, N, S, H], "v": [L, B, N, S, H]}`` (logical axis
``layers`` first, :data:`CACHE_AXES` ``"stacked_kv"``). Everything else is the same.

int8 KV cache (``init_cache(..., kv_cache="int8")``; ``--kv-cache int8``): each layer's ``k`` / ``v`` are int8
and the layer also holds ``"k_scale"`` / ``"v_scale"`` ``[B, N, S, 1]`` float32 (stacked ``[L, B, N, S, 1]``):
one symmetric scale per (row, head, slot) vector over ``H``, ``k ~= q * scale`` with ``scale = max|k| / 127``
(:func:`quantize_kv`). The model quantizes the new tokens' K/V before writing them and dequantizes the whole
buffer in the compute dtype when it reads it (:func:`dequantize_kv`), the current tokens included, so prefill
and decode see the same values. ``kv_cache=None`` (the default) keeps K/V in the compute dtype and adds no
keys. Bytes per token and layer: ``2 N (H + 4)`` against ``2 N H x itemsize`` (:func:`cache_bytes`).

A model call with ``T`` new tokens writes row ``b``'s K/V at slots ``index[b] .. index[b] + T - 1``
(:func:`write_kv`, :func:`write_mask`); new token ``t`` of row ``b`` sees key slot ``s`` iff
``mask[b, s]`` and ``s <= index[b] + t``. A left-padded batch writes its pads into slots that stay
masked, so rows that started together advance together; rows filled at different times (decode slots
of an engine, :func:`insert`) each keep their own ``index``. Positions are absolute per row
(``lengths[b] + cumsum(mask) - 1``), independent of slots, which is what rotary embeddings need.

Heads first (``[B, N, S, H]``): the attention dots have their batch axes (B, N) leading, so XLA reads the
cache as stored instead of transposing all of it at every decode step (with ``[B, S, N, H]`` that
transpose took 24 ms of a 75 ms step for a 162M model at batch 16 on the CPU).

:data:`CACHE_AXES` names the logical axes of every array (``sharding.cache_shardings`` maps them onto a
mesh: rows over the batch axes, heads over ``mp``). :func:`take_rows` (gather rows, e.g. reorder beams)
and :func:`insert` (copy a prefilled cache into rows of a bigger one) are the row helpers.

Writing past ``S`` is not detected inside jit (the write is clamped), so callers size the cache up
front; ``generate`` checks ``prompt + max_new_tokens <= S``.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from .config import GPTJConfig

Cache = dict[str, Any]
Array = jax.Array

KV_CACHE_SCHEMES = ("int8",)  # values of kv_cache= / --kv-cache; None: K/V in the compute dtype
KV_QMAX = 127  # int8 K/V lie in [-127, 127] (symmetric, no zero point)
SCALE_NAMES = ("k_scale", "v_scale")  # the int8 cache's extra per-layer arrays

# Logical axis names of the cache arrays ("kv" is every layer's k and v; "kv_scale" the int8 cache's scales,
# whose last axis has size 1 and is never split).
CACHE_AXES: dict[str, tuple[Optional[str], ...]] = {
    "kv": ("batch", "heads", "cache_length", "head_dim"),  # [B, N, S, H]
    "stacked_kv": ("layers", "batch", "heads", "cache_length", "head_dim"),  # [L, B, N, S, H] (scan_layers)
    "kv_scale": ("batch", "heads", "cache_length", None),  # [B, N, S, 1] (kv_cache="int8")
    "stacked_kv_scale": ("layers", "batch", "heads", "cache_length", None),  # [L, B, N, S, 1]
    "mask": ("batch", "cache_length"),  # [B, S]
    "index": ("batch",),  # [B]
    "lengths": ("batch",),  # [B]
}


def check_kv_cache(kv_cache: Optional[str], where: str = "kv_cache") -> Optional[str]:
    """``kv_cache`` if it is a KV cache scheme we implement (``"int8"``) or None; else ValueError naming
    ``where`` (the keyword or flag) and the choices."""
    if kv_cache is None or (isinstance(kv_cache, str) and kv_cache in KV_CACHE_SCHEMES):
        return kv_cache
    raise ValueError(
        f"{where}={kv_cache!r} is not a KV cache scheme; the one scheme is 'int8' (leave it unset for K/V in the "
        "compute dtype)"
    )


def kv_cache_scheme(cache: Cache) -> Optional[str]:
    """``"int8"`` when ``cache``'s layers hold int8 K/V with scales, None when K/V are in a float dtype."""
    layer = cache["layers"] if isinstance(cache["layers"], dict) else cache["layers"][0]
    return "int8" if "k_scale" in layer else None


def init_cache(
    config: GPTJConfig, batch_size: int, max_len: int, dtype: Any = jnp.float32, kv_cache: Optional[str] = None
) -> Cache:
    """An empty cache: ``batch_size`` rows of ``max_len`` slots (nothing valid).

    K/V are zeros in ``dtype`` (the compute dtype); with ``kv_cache="int8"`` they are int8 zeros plus float32
    ``k_scale`` / ``v_scale`` zeros ``[B, N, S, 1]`` per layer (see the module docstring), and ``dtype`` is only
    the dtype the model dequantizes them to.
    """
    check_kv_cache(kv_cache)
    if max_len <= 0 or batch_size <= 0:
        raise ValueError(f"cache needs batch_size > 0 and max_len > 0, got {batch_size} and {max_len}")
    shape = (batch_size, config.n_head, max_len, config.head_dim)
    scale_shape = shape[:-1] + (1,)

    def layer(lead: tuple[int, ...]) -> dict[str, Array]:
        if kv_cache == "int8":
            kv = {name: jnp.zeros(lead + shape, jnp.int8) for name in ("k", "v")}
            return {**kv, **{name: jnp.zeros(lead + scale_shape, jnp.float32) for name in SCALE_NAMES}}
        return {"k": jnp.zeros(lead + shape, dtype), "v": jnp.zeros(lead + shape, dtype)}

    layers: Any = layer((config.n_layer,)) if config.scan_layers else [layer(()) for _ in range(config.n_layer)]
    return {
        "layers": layers,
        "mask": jnp.zeros((batch_size, max_len), dtype=bool),
        "index": jnp.zeros((batch_size,), jnp.int32),
        "lengths": jnp.zeros((batch_size,), jnp.int32),
    }


def cache_len(cache: Cache) -> int:
    """Number of slots ``S`` (static)."""
    return cache["mask"].shape[1]


def cache_bytes(
    config: GPTJConfig, batch_size: int, max_len: int, dtype: Any = jnp.float32, kv_cache: Optional[str] = None
) -> int:
    """Bytes held by the K/V buffers (and, for ``kv_cache="int8"``, their scales) of
    ``init_cache(config, batch_size, max_len, dtype, kv_cache)``."""
    check_kv_cache(kv_cache)
    per_slot = config.n_embd * jnp.dtype(dtype).itemsize  # one layer's K (or V) of one token
    if kv_cache == "int8":
        per_slot = config.n_embd + config.n_head * 4  # int8 values + one float32 scale per head
    return 2 * config.n_layer * batch_size * max_len * per_slot


def _axes_of(name: str, stacked: bool) -> tuple[Optional[str], ...]:
    kind = "kv_scale" if name in SCALE_NAMES else "kv"
    return CACHE_AXES["stacked_" + kind if stacked else kind]


def cache_axes(cache: Cache) -> Cache:
    """A pytree like ``cache`` whose leaves are the logical axis names (tuples) of its arrays."""
    if isinstance(cache["layers"], dict):  # stacked (scan_layers)
        layers: Any = {name: _axes_of(name, True) for name in cache["layers"]}
    else:
        layers = [{name: _axes_of(name, False) for name in layer} for layer in cache["layers"]]
    return {
        "layers": layers,
        "mask": CACHE_AXES["mask"],
        "index": CACHE_AXES["index"],
        "lengths": CACHE_AXES["lengths"],
    }


def check_cache(config: GPTJConfig, cache: Cache) -> None:
    """Raise ValueError unless ``cache`` has this module's layout for ``config`` (static shapes only)."""
    B, S = cache["mask"].shape
    want = (B, config.n_head, S, config.head_dim)
    stacked = isinstance(cache["layers"], dict)
    if stacked != config.scan_layers:
        have, need = ("stacked", "a list of layers") if stacked else ("a list of layers", "stacked")
        raise ValueError(
            f"cache layers are {have} but the model (scan_layers={config.scan_layers}) needs {need}: "
            "make the cache with cache.init_cache(config, ...) of the same config"
        )
    if stacked:
        got = tuple(cache["layers"]["k"].shape)
        if got != (config.n_layer,) + want:
            raise ValueError(
                f"cache K/V shape {got} is not the stacked cache layout [L, B, N, S, H] = {(config.n_layer,) + want}"
            )
    elif len(cache["layers"]) != config.n_layer:
        raise ValueError(f"cache has {len(cache['layers'])} layers, the model {config.n_layer}")
    got = tuple(cache["layers"]["k"].shape[1:] if stacked else cache["layers"][0]["k"].shape)
    if got != want:
        raise ValueError(
            f"cache K/V shape {got} is not the cache layout [B, N, S, H] = {want} (see cache.init_cache)"
        )
    layers = [cache["layers"]] if stacked else cache["layers"]
    lead = (config.n_layer,) if stacked else ()
    for i, layer in enumerate(layers):
        names = set(layer)
        if names not in ({"k", "v"}, {"k", "v", *SCALE_NAMES}):
            raise ValueError(
                f"cache layer {i} holds {sorted(names)}; a layer holds k, v (and k_scale, v_scale for an int8 cache)"
            )
        if "k_scale" in layer:
            for name in ("k", "v"):
                if layer[name].dtype != jnp.int8:
                    raise ValueError(f"cache layer {i} has scales but its {name!r} is {layer[name].dtype}, not int8")
            for name in SCALE_NAMES:
                if tuple(layer[name].shape) != lead + want[:-1] + (1,):
                    raise ValueError(
                        f"cache layer {i} {name!r} shape {tuple(layer[name].shape)} is not the int8 cache's scale "
                        f"layout {'[L, B, N, S, 1]' if stacked else '[B, N, S, 1]'} = {lead + want[:-1] + (1,)}"
                    )
    for name in ("index", "lengths"):
        if tuple(cache[name].shape) != (B,):
            raise ValueError(f"cache[{name!r}] has shape {tuple(cache[name].shape)}, expected [B] = {(B,)}")


# ---------------------------------------------------------------------------------------- writes
# Rows up to which write_kv writes each row with its own dynamic_update_slice instead of one scatter (accelerators).
UNROLLED_WRITE_ROWS = 16


def write_kv(buf: Array, new: Array, index: Array, *, unrolled_rows: int = UNROLLED_WRITE_ROWS) -> Array:
    """Row ``b`` of ``new [B, N, T, H]`` into ``buf [B, N, S, H]`` at slots ``index[b] .. index[b] + T - 1``.

    ``index [B]`` int32. In place when ``buf`` is donated. Up to ``unrolled_rows`` rows: one
    ``dynamic_update_slice`` per row (static row, traced slot); more rows: one scatter (the per-row update
    vmapped), which XLA:TPU expands into a while loop over the rows and, measured on a v5e at batch 4, then
    moves each layer's cache out to alternate memory and back (``docs/benchmarks.md``, decode step bytes).
    The model passes :func:`unrolled_write_rows` of the backend it compiles for: XLA:CPU compiles the
    unrolled updates several times slower, so on CPU every batch takes the scatter.
    """
    new = new.astype(buf.dtype)
    if buf.shape[0] > unrolled_rows:
        return jax.vmap(lambda b, n, i: lax.dynamic_update_slice(b, n, (0, i, 0)))(buf, new, index)
    zero = jnp.zeros((), index.dtype)
    for b in range(buf.shape[0]):
        buf = lax.dynamic_update_slice(buf, new[b : b + 1], (b, zero, index[b], zero))
    return buf


def unrolled_write_rows(backend: str) -> int:
    """The ``unrolled_rows`` of :func:`write_kv` for ``backend``: 0 on ``"cpu"``, :data:`UNROLLED_WRITE_ROWS`
    on accelerators."""
    return 0 if backend == "cpu" else UNROLLED_WRITE_ROWS


def write_mask(mask: Array, new: Array, index: Array) -> Array:
    """Row ``b`` of ``new [B, T]`` bool into ``mask [B, S]`` at slots ``index[b] ..``; ``index [B]``."""
    return jax.vmap(lambda m, n, i: lax.dynamic_update_slice(m, n.astype(m.dtype), (i,)))(mask, new, index)


# ---------------------------------------------------------------------------------------- int8 K/V
def quantize_kv(x: Array) -> tuple[Array, Array]:
    """K or V ``[B, N, T, H]`` -> (``q`` int8 ``[B, N, T, H]``, ``scale`` float32 ``[B, N, T, 1]``).

    Symmetric per (row, head, token) vector over ``H``: ``scale = max|x| / 127`` (1 for an all-zero vector),
    ``q = round(x / scale)`` clipped to ``[-127, 127]``; ``|x - q * scale| <= scale / 2`` elementwise.
    """
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / KV_QMAX, jnp.float32(1.0))
    q = jnp.clip(jnp.round(x32 / scale), -KV_QMAX, KV_QMAX).astype(jnp.int8)
    return q, scale


def dequantize_kv(q: Array, scale: Array, dtype: Any) -> Array:
    """``q * scale`` (float32 product, ``scale`` broadcast over the last axis) in ``dtype``."""
    return (q.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)


# ---------------------------------------------------------------------------------------- rows
def take_rows(cache: Cache, rows: Array) -> Cache:
    """The cache of rows ``rows [R]`` (int, repeats allowed): every array gathered along its row axis.

    Reorders beams (row ``r`` of the result is row ``rows[r]`` of ``cache``) and repeats prompts
    (``rows = repeat(arange(B), n)``). Returns a cache of ``R`` rows.
    """
    if isinstance(cache["layers"], dict):  # stacked (scan_layers): rows are axis 1 of k / v
        rest = {name: value for name, value in cache.items() if name != "layers"}
        out = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), rest)
        out["layers"] = {name: jnp.take(x, rows, axis=1) for name, x in cache["layers"].items()}
        return out
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), cache)


def insert(cache: Cache, prefix: Cache, slot: Array) -> Cache:
    """Copy ``prefix`` (a cache of ``b`` rows and ``S_p <= S`` slots, e.g. from a prefill) into rows
    ``slot .. slot + b - 1`` of ``cache`` (``S`` slots).

    The rows get the prefix's K/V in slots ``[0, S_p)``, its mask there and ``False`` in ``[S_p, S)`` (so
    whatever an earlier occupant left is never seen), and its ``index`` and ``lengths``. ``slot`` may be
    traced (int32 scalar). Pure: jit it with ``cache`` donated to update in place.
    """
    b, s_p = prefix["mask"].shape
    B, S = cache["mask"].shape
    if kv_cache_scheme(prefix) != kv_cache_scheme(cache):
        have, want = (kv_cache_scheme(c) or "float" for c in (prefix, cache))
        raise ValueError(f"cannot insert a prefix with a {have} KV cache into a {want} one (kv_cache must match)")
    if s_p > S or b > B:
        raise ValueError(f"cannot insert a prefix of {b} rows x {s_p} slots into a cache of {B} rows x {S} slots")
    slot = jnp.asarray(slot, jnp.int32)
    zero = jnp.zeros((), jnp.int32)

    def put(dst: Array, src: Array, row_axis: int = 0) -> Array:
        start = (zero,) * row_axis + (slot,) + (zero,) * (dst.ndim - 1 - row_axis)
        return lax.dynamic_update_slice(dst, src.astype(dst.dtype), start)

    mask = jnp.zeros((b, S), bool).at[:, :s_p].set(prefix["mask"])
    if isinstance(cache["layers"], dict):  # stacked: rows are axis 1
        layers: Any = {name: put(cache["layers"][name], prefix["layers"][name], 1) for name in cache["layers"]}
    else:
        layers = [
            {name: put(layer[name], src[name]) for name in layer}
            for layer, src in zip(cache["layers"], prefix["layers"])
        ]
    return {
        "layers": layers,
        "mask": put(cache["mask"], mask),
        "index": put(cache["index"], prefix["index"]),
        "lengths": put(cache["lengths"], prefix["lengths"]),
    }

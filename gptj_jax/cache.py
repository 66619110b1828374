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

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .config import GPTJConfig

Cache = dict[str, Any]
Array = jax.Array

# Logical axis names of the cache arrays ("kv" is every layer's k and v).
CACHE_AXES: dict[str, tuple[str, ...]] = {
    "kv": ("batch", "heads", "cache_length", "head_dim"),  # [B, N, S, H]
    "stacked_kv": ("layers", "batch", "heads", "cache_length", "head_dim"),  # [L, B, N, S, H] (scan_layers)
    "mask": ("batch", "cache_length"),  # [B, S]
    "index": ("batch",),  # [B]
    "lengths": ("batch",),  # [B]
}


def init_cache(config: GPTJConfig, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
    """An empty cache: ``batch_size`` rows of ``max_len`` slots (K/V zeros in ``dtype``; nothing valid)."""
    if max_len <= 0 or batch_size <= 0:
        raise ValueError(f"cache needs batch_size > 0 and max_len > 0, got {batch_size} and {max_len}")
    shape = (batch_size, config.n_head, max_len, config.head_dim)
    if config.scan_layers:
        stacked = (config.n_layer,) + shape
        layers: Any = {"k": jnp.zeros(stacked, dtype), "v": jnp.zeros(stacked, dtype)}
    else:
        layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.n_layer)]
    return {
        "layers": layers,
        "mask": jnp.zeros((batch_size, max_len), dtype=bool),
        "index": jnp.zeros((batch_size,), jnp.int32),
        "lengths": jnp.zeros((batch_size,), jnp.int32),
    }


def cache_len(cache: Cache) -> int:
    """Number of slots ``S`` (static)."""
    return cache["mask"].shape[1]


def cache_bytes(config: GPTJConfig, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> int:
    """Bytes held by the k/v buffers of ``init_cache(config, batch_size, max_len, dtype)``."""
    return 2 * config.n_layer * batch_size * max_len * config.n_embd * jnp.dtype(dtype).itemsize


def cache_axes(cache: Cache) -> Cache:
    """A pytree like ``cache`` whose leaves are the logical axis names (tuples) of its arrays."""
    if isinstance(cache["layers"], dict):  # stacked (scan_layers)
        layers: Any = {name: CACHE_AXES["stacked_kv"] for name in cache["layers"]}
    else:
        layers = [{name: CACHE_AXES["kv"] for name in layer} for layer in cache["layers"]]
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
    for name in ("index", "lengths"):
        if tuple(cache[name].shape) != (B,):
            raise ValueError(f"cache[{name!r}] has shape {tuple(cache[name].shape)}, expected [B] = {(B,)}")


# ---------------------------------------------------------------------------------------- writes
def write_kv(buf: Array, new: Array, index: Array) -> Array:
    """Row ``b`` of ``new [B, N, T, H]`` into ``buf [B, N, S, H]`` at slots ``index[b] .. index[b] + T - 1``.

    ``index [B]`` int32. In place when ``buf`` is donated. Up to :data:`UNROLLED_WRITE_ROWS` rows: one
    ``dynamic_update_slice`` per row (static row, traced slot); more rows: one scatter (the per-row update
    vmapped), which XLA:TPU expands into a while loop over the rows and, measured on a v5e at batch 4, then
    moves each layer's cache out to alternate memory and back (``docs/benchmarks.md``, decode step bytes).
    """
    new = new.astype(buf.dtype)
    if buf.shape[0] > UNROLLED_WRITE_ROWS:
        return jax.vmap(lambda b, n, i: lax.dynamic_update_slice(b, n, (0, i, 0)))(buf, new, index)
    zero = jnp.zeros((), index.dtype)
    for b in range(buf.shape[0]):
        buf = lax.dynamic_update_slice(buf, new[b : b + 1], (b, zero, index[b], zero))
    return buf


# Rows up to which write_kv writes each row with its own dynamic_update_slice instead of one scatter.
UNROLLED_WRITE_ROWS = 16


def write_mask(mask: Array, new: Array, index: Array) -> Array:
    """Row ``b`` of ``new [B, T]`` bool into ``mask [B, S]`` at slots ``index[b] ..``; ``index [B]``."""
    return jax.vmap(lambda m, n, i: lax.dynamic_update_slice(m, n.astype(m.dtype), (i,)))(mask, new, index)


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

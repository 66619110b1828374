"""The KV cache: a plain pytree passed into the model and returned updated.

Layout (``B`` batch, ``S`` cache slots, ``N`` heads, ``H`` head dim)::

    {
      "layers":  [{"k": [B, S, N, H], "v": [B, S, N, H]}, ...]   # one dict per layer, compute dtype
                                                                # ([B, N, S, H] with layout="BNSH")
      "mask":    [B, S] bool     # slot holds a real (non-pad) token
      "index":   [] int32        # next slot to write; the same for every row
      "lengths": [B] int32       # real tokens seen per row = position id of the row's next token
    }

Rows share the slot index: a left-padded batch writes its pads into slots and masks them out,
so every row advances one slot per decode step. Positions are absolute per row (``lengths``),
independent of slots, which is what rotary embeddings need for left padding.
Two K/V layouts: ``"BSNH"`` (the default, what ``sharding.cache_shardings`` expects) and ``"BNSH"``
(heads first, used by ``generate``): with heads first the attention dots find their batch axes
(B, N) leading, so XLA reads the cache as stored instead of transposing all of it at every decode
step (on the CPU, for a 162M model at batch 16, that transpose took 24 ms of a 75 ms step). The model
is told the layout (``GPTJForCausalLM(..., cache_layout=...)``); ``check_cache_layout`` catches a
mismatch whenever the shapes tell the layouts apart (``S != N``).
Writing past ``S`` is not detected inside jit (``dynamic_update_slice`` would clamp), so callers
size the cache up front; ``generate`` checks ``prompt + max_new_tokens <= S``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from .config import GPTJConfig

Cache = dict[str, Any]


CACHE_LAYOUTS = ("BSNH", "BNSH")


def init_cache(
    config: GPTJConfig, batch_size: int, max_len: int, dtype: Any = jnp.float32, layout: str = "BSNH"
) -> Cache:
    """An empty cache with ``max_len`` slots per row (zeros; nothing valid); K/V in ``layout``."""
    if max_len <= 0 or batch_size <= 0:
        raise ValueError(f"cache needs batch_size > 0 and max_len > 0, got {batch_size} and {max_len}")
    if layout not in CACHE_LAYOUTS:
        raise ValueError(f"cache layout {layout!r} is not one of {CACHE_LAYOUTS}")
    if layout == "BSNH":
        shape = (batch_size, max_len, config.n_head, config.head_dim)
    else:
        shape = (batch_size, config.n_head, max_len, config.head_dim)
    return {
        "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.n_layer)],
        "mask": jnp.zeros((batch_size, max_len), dtype=bool),
        "index": jnp.zeros((), jnp.int32),
        "lengths": jnp.zeros((batch_size,), jnp.int32),
    }


def cache_len(cache: Cache) -> int:
    """Number of slots ``S`` (static)."""
    return cache["mask"].shape[1]


def cache_bytes(config: GPTJConfig, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> int:
    """Bytes held by the k/v buffers of ``init_cache(config, batch_size, max_len, dtype)``."""
    return 2 * config.n_layer * batch_size * max_len * config.n_embd * jnp.dtype(dtype).itemsize


def check_cache_layout(config: GPTJConfig, cache: Cache, layout: str) -> None:
    """Raise ValueError if the K/V arrays do not have the shape of ``layout`` (static shapes only)."""
    if layout not in CACHE_LAYOUTS:
        raise ValueError(f"cache layout {layout!r} is not one of {CACHE_LAYOUTS}")
    B, S = cache["mask"].shape
    N, H = config.n_head, config.head_dim
    want = (B, S, N, H) if layout == "BSNH" else (B, N, S, H)
    got = tuple(cache["layers"][0]["k"].shape)
    if got != want:
        raise ValueError(f"cache K/V shape {got} is not the {layout} layout {want} (see cache.init_cache(layout=))")

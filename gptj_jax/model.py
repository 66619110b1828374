"""GPT-J in Flax linen, numerically matching transformers' ``modeling_gptj.py``.

Axis letters in einsums and shape comments:
  B batch, T new tokens (query length), S key length (T without a cache, cache slots with one),
  D n_embd, N heads, H head dim, F n_inner, V vocab, R rotary dims.

Parameters are a plain pytree named like the HF state dict (``transformer/h_0/attn/q_proj/kernel``),
Dense kernels are ``[in, out]``. Every parameter carries logical axis names (``embed``, ``heads``,
``mlp``, ``vocab``, ``norm``, ``classes``) through ``nn.with_logical_partitioning``; the mesh rules
live in ``sharding.py`` and nothing here names a mesh axis.

LayerNorm, attention softmax and logits are computed in float32 whatever ``dtype`` is.

``layer_norm`` and ``attend`` (scores, mask, softmax, weighted values) are the pieces ``tp.py``'s
explicit shard_map forward reuses; ``HEADS`` is the one head registry (linen class, HF architecture,
top-level param keys) and ``head_of`` reads a params tree's head from it. Losses are ``losses.py``'s.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator, NamedTuple, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from .cache import Cache, check_cache, dequantize_kv, quantize_kv, unrolled_write_rows, write_kv, write_mask
from .config import ATTENTION_IMPLS, GPTJConfig
from .losses import causal_lm_loss, token_cross_entropy

Array = jax.Array
Dtype = Any

# Finite, so a fully masked row gives a uniform softmax instead of NaN; scores are always float32.
MASK_VALUE = float(np.finfo(np.float32).min)

ACT_FNS = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

_f32_dot = functools.partial(lax.dot_general, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _grad_barrier(x: Array) -> Array:
    """Identity whose gradient passes an ``optimization_barrier``, so that the residual stream's gradient is
    materialised once per block instead of the chain of later blocks' residual-gradient adds (and LayerNorm
    backward terms) being fused into every consumer (quadratic in ``n_layer``). XLA:CPU removes
    optimization barriers before fusion (its compiled step has none), so on CPU this changes nothing and the
    chain is recomputed (``docs/benchmarks.md``, CPU step). No effect on values or on the forward pass."""
    return x


def _grad_barrier_fwd(x: Array) -> tuple[Array, None]:
    return x, None


def _grad_barrier_bwd(_: None, g: Array) -> tuple[Array]:
    return (lax.optimization_barrier(g),)


_grad_barrier.defvjp(_grad_barrier_fwd, _grad_barrier_bwd)


def _init(config: GPTJConfig, names: tuple[Optional[str], ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


def _zeros(names: tuple[Optional[str], ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names: tuple[Optional[str], ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


# ---------------------------------------------------------------------------------------- outputs
@flax.struct.dataclass
class ModelOutput:
    last_hidden_state: Array  # [B, T, D] after ln_f
    hidden_states: Optional[tuple[Array, ...]] = None  # n_layer + 1 of [B, T, D], last one after ln_f
    attentions: Optional[tuple[Array, ...]] = None  # n_layer of [B, N, T, S]
    cache: Optional[Cache] = None


@flax.struct.dataclass
class CausalLMOutput:
    logits: Array  # [B, T, V] float32 (or [B, logits_to_keep, V])
    loss: Optional[Array] = None
    hidden_states: Optional[tuple[Array, ...]] = None
    attentions: Optional[tuple[Array, ...]] = None
    cache: Optional[Cache] = None


@flax.struct.dataclass
class SequenceClassifierOutput:
    logits: Array  # [B, num_labels] float32, at the last non-pad token of each row
    loss: Optional[Array] = None
    hidden_states: Optional[tuple[Array, ...]] = None
    attentions: Optional[tuple[Array, ...]] = None
    cache: Optional[Cache] = None


@flax.struct.dataclass
class QuestionAnsweringOutput:
    start_logits: Array  # [B, T] float32
    end_logits: Array  # [B, T] float32
    loss: Optional[Array] = None
    hidden_states: Optional[tuple[Array, ...]] = None
    attentions: Optional[tuple[Array, ...]] = None


# ---------------------------------------------------------------------------------------- rotary
def rotary_sin_cos(position_ids: Array, rotary_dims: int) -> tuple[Array, Array]:
    """sin and cos of ``position * inv_freq``, each ``[B, T, R/2]`` float32 (as HF's table rows)."""
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, rotary_dims, 2, dtype=np.float32) / np.float32(rotary_dims)))
    angles = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, R/2]
    return jnp.sin(angles), jnp.cos(angles)


def rotate_every_two(x: Array) -> Array:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) on the last axis (GPT-J's interleaved pairs)."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return jnp.stack((-x2, x1), axis=-1).reshape(x.shape)


def apply_rotary(x: Array, sin: Array, cos: Array) -> Array:
    """Rotate the first R dims of each head. x ``[B, T, N, H]``, sin/cos ``[B, T, R/2]``."""
    rot = sin.shape[-1] * 2
    sin = jnp.repeat(sin, 2, axis=-1)[:, :, None, :]  # [B, T, 1, R] pairwise: s0 s0 s1 s1 ...
    cos = jnp.repeat(cos, 2, axis=-1)[:, :, None, :]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x_rot = x_rot * cos + rotate_every_two(x_rot) * sin
    return jnp.concatenate([x_rot, x_pass], axis=-1)


# ---------------------------------------------------------------------------------------- layers
def attend(
    q: Array,
    k: Array,
    v: Array,
    allowed: Array,
    *,
    dropout: Optional[Callable[[Array], Array]] = None,
    query_block: int = 0,
) -> tuple[Array, Array]:
    """Scaled dot-product attention, softmax in float32. Returns ``(out [B, T, N, H] in v's dtype,
    probs [B, N, T, S] float32)``.

    q ``[B, T, N, H]``; k, v ``[B, N, S, H]`` (heads first, the cache layout of ``cache.py``); allowed
    ``[B, T, S]`` bool (False scores get :data:`MASK_VALUE`). ``dropout`` is applied to the probabilities
    that weight v (the returned probs are before it). ``N`` may be a device's share of the heads (``tp.py``).
    ``query_block`` (> 0 and < T): :func:`attend_query_blocks` (same numbers, one block of query rows'
    scores live at a time in the forward and the backward); no ``dropout`` then.
    """
    if 0 < query_block < q.shape[1]:
        if dropout is not None:
            raise ValueError("attention in query blocks (attention_query_block > 0) has no attention dropout: "
                             "set attn_pdrop to 0 or attention_query_block to 0")
        return attend_query_blocks(q, k, v, allowed, query_block)
    H = q.shape[-1]
    # k first: its minor axis (H) is the contracted one, so it feeds the dot as stored.
    scores = jnp.einsum("BNSH,BTNH->BNTS", k, q, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(H**-0.5)
    scores = jnp.where(allowed[:, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, N, T, S] float32
    weights = probs if dropout is None else dropout(probs)
    return jnp.einsum("BNTS,BNSH->BTNH", weights.astype(v.dtype), v), probs


def attend_query_blocks(q: Array, k: Array, v: Array, allowed: Array, block: int) -> tuple[Array, Array]:
    """:func:`attend` (no dropout) over blocks of ``block`` query rows: the same ``(out [B, T, N, H],
    probs [B, N, T, S])``, exactly (each query row's softmax runs over all its keys either way).

    The full blocks run in a ``lax.scan`` whose body is a ``jax.checkpoint``: the backward recomputes one
    block's float32 ``[B, N, block, S]`` scores and probabilities at a time instead of keeping all ``T`` rows'
    (2 x 512 MiB per layer at batch 2, 16 heads, T = S = 2048); the last ``T % block`` rows run as one more
    block. ``probs`` is only computed when the caller uses it.
    """
    B, T, N, H = q.shape
    S = k.shape[2]
    n, tail = divmod(T, block)
    one = jax.checkpoint(lambda qb, ab: attend(qb, k, v, ab))  # [B, t, N, H], [B, t, S] -> out, probs
    qs = jnp.moveaxis(q[:, : n * block].reshape(B, n, block, N, H), 1, 0)  # [n, B, block, N, H]
    masks = jnp.moveaxis(allowed[:, : n * block].reshape(B, n, block, S), 1, 0)  # [n, B, block, S]
    _, (out, probs) = lax.scan(lambda c, xs: (c, one(*xs)), None, (qs, masks))
    out = jnp.moveaxis(out, 0, 1).reshape(B, n * block, N, H)
    probs = jnp.moveaxis(probs, 0, 2).reshape(B, N, n * block, S)  # [n, B, N, block, S] -> [B, N, T', S]
    if tail:
        out_t, probs_t = one(q[:, n * block :], allowed[:, n * block :])
        out = jnp.concatenate([out, out_t], axis=1)
        probs = jnp.concatenate([probs, probs_t], axis=2)
    return out, probs


# ---------------------------------------------------------------------------------------- fused attention
# Which kernels a backend runs natively (``attention=`` in GPTJConfig; "xla" runs everywhere).
KERNEL_BACKENDS = {"cudnn": ("gpu", "cuda", "rocm"), "pallas_flash": ("tpu",), "splash": ("tpu",)}
_INTERPRET = contextvars.ContextVar("gptj_jax_interpret_kernels", default=False)
_BACKEND = contextvars.ContextVar("gptj_jax_attention_backend", default=None)


@contextlib.contextmanager
def attention_backend(platform: str) -> Iterator[None]:
    """Within this context attention is chosen and checked for ``platform`` (``"tpu"``, ``"gpu"``, ``"cpu"``)
    instead of jax's default backend: for ahead-of-time compiles for another platform (deviceless TPU
    compiles through ``jax.experimental.topologies``). Wrap the tracing call (``jit(...).lower``)."""
    token = _BACKEND.set(platform)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def target_backend() -> str:
    """The platform the model is traced for: the one :func:`attention_backend` names, else jax's default."""
    return _BACKEND.get() or jax.default_backend()


@contextlib.contextmanager
def interpret_kernels() -> Iterator[None]:
    """Within this context the Pallas kernels (``pallas_flash``, ``splash``) run in Pallas' TPU interpret
    mode on any backend (slow; for tests on CPU). Wrap the *tracing* call (``apply``, the first ``jit`` call)."""
    token = _INTERPRET.set(True)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def resolve_attention(
    config: GPTJConfig, q_len: int, dtype: Dtype = jnp.float32, *, need_probs: bool = False,
    dropout: bool = False, backend: Optional[str] = None,
) -> str:
    """The attention implementation a forward of ``q_len`` new tokens uses: ``config.attention`` made concrete.

    ``auto``: ``xla`` on CPU, when attention probabilities are returned or dropped out, and for single-token
    decode; on GPU ``cudnn`` for a float16/bfloat16 ``dtype`` and head dim <= 256; on TPU ``splash`` when
    the head dim and ``q_len`` are multiples of 128; ``xla`` otherwise. An explicit kernel on a backend that
    cannot run it (``cudnn`` on CPU, ``splash`` off TPU outside :func:`interpret_kernels`), or with
    ``need_probs`` / ``dropout``, is a ValueError: no silent fallback. Decode (``q_len == 1``) always uses
    ``xla``: the kernels are built for long query blocks and the einsum path reads the cache once.
    """
    impl = config.attention
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention {impl!r} is not one of {list(ATTENTION_IMPLS)}")
    backend = backend or target_backend()
    if impl == "xla" or q_len == 1:
        return "xla"
    if impl == "auto":
        if need_probs or dropout:
            return "xla"
        if backend in KERNEL_BACKENDS["cudnn"] and config.head_dim <= 256 and jnp.dtype(dtype) in (
            jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)
        ):
            return "cudnn"
        if backend == "tpu" and config.head_dim % 128 == 0 and q_len % 128 == 0:
            return "splash"
        return "xla"
    interpreted = impl in ("pallas_flash", "splash") and _INTERPRET.get()
    if backend not in KERNEL_BACKENDS[impl] and not interpreted:
        raise ValueError(
            f"attention={impl!r} needs a {'/'.join(KERNEL_BACKENDS[impl])} backend but jax's backend is {backend!r}; "
            f"use attention='xla' or 'auto' (it picks what the backend runs)"
            + (" or run it under gptj_jax.model.interpret_kernels()" if impl != "cudnn" else "")
        )
    if need_probs:
        raise ValueError(f"attention={impl!r} does not return attention probabilities: use attention='xla' for output_attentions")
    if dropout:
        raise ValueError(f"attention={impl!r} has no attention dropout (attn_pdrop > 0): use attention='xla' to train with it")
    return impl


def _kernel_block(n: int, preferred: int) -> int:
    """The largest block <= ``preferred`` that divides ``n`` (a power of two from 128 down; ``n`` itself if small)."""
    block = preferred
    while block > 128 and n % block:
        block //= 2
    return block if n % block == 0 else n


def fused_attend(
    q: Array,
    k: Array,
    v: Array,
    q_segment: Array,
    kv_segment: Array,
    impl: str,
    *,
    interpret: Optional[bool] = None,
    dpa_implementation: str = "cudnn",
) -> Array:
    """Causal attention through a fused kernel. Returns ``out [B, T, N, H]`` in v's dtype.

    q ``[B, T, N, H]`` (rotary already applied); k, v ``[B, N, S, H]`` (the cache layout) whose slot ``s``
    is aligned with query ``t = s`` (a fresh prefill or training: ``S >= T``, query ``t`` sees slots ``<= t``).
    q_segment ``[B, T]``, kv_segment ``[B, S]`` int32: 1 for real tokens, 0 for pads; a query sees a key
    iff the key is not after it and their segments are equal. For real tokens this is exactly
    :func:`attend`'s mask (causal and key padding); a pad query sees the pads before it instead of
    :func:`attend`'s uniform row over every slot (no row is empty, so no NaN; pad rows are never read).
    Scores scale by ``1/sqrt(H)`` and softmax statistics are float32 in every kernel.

    ``impl``: ``cudnn`` (``jax.nn.dot_product_attention``; ``dpa_implementation="xla"`` runs its XLA
    reference, e.g. on CPU), ``pallas_flash`` (Pallas TPU ``flash_attention`` with ``sm_scale=1/sqrt(H)``;
    its default 1.0 would be wrong), ``splash`` (``make_splash_mha`` with a ``CausalMask``; it has no scale,
    so q is pre-scaled in float32). ``interpret`` runs the Pallas kernels in interpret mode (None: as
    :func:`interpret_kernels` says). No kernel serves single-token decode: see :func:`resolve_attention`.
    """
    B, T, N, H = q.shape
    S = k.shape[2]
    scale = float(H) ** -0.5
    if interpret is None:
        interpret = _INTERPRET.get()
    if impl == "cudnn":
        # jax.nn.dot_product_attention takes [B, T, N, H] for all three.
        same = q_segment[:, :, None] == kv_segment[:, None, :]  # [B, T, S]
        causal = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]  # [T, S]
        out = jax.nn.dot_product_attention(
            q, jnp.swapaxes(k, 1, 2).astype(q.dtype), jnp.swapaxes(v, 1, 2).astype(q.dtype),
            mask=(same & causal[None])[:, None], scale=scale, implementation=dpa_implementation,
        )
        return out.astype(v.dtype)
    qh = jnp.swapaxes(q, 1, 2)  # [B, N, T, H]
    if impl == "pallas_flash":
        from jax.experimental.pallas import tpu as pltpu
        from jax.experimental.pallas.ops.tpu import flash_attention as fa

        bq, bk = _kernel_block(T, 512), _kernel_block(S, 512)
        blocks = fa.BlockSizes(
            block_q=bq, block_k_major=bk, block_k=bk, block_b=1, block_q_major_dkv=bq, block_k_major_dkv=bk,
            block_k_dkv=bk, block_q_dkv=bq, block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq,
        )
        ctx = pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext()
        with ctx:
            out = fa.flash_attention(
                qh, k.astype(q.dtype), v.astype(q.dtype), segment_ids=fa.SegmentIds(q_segment, kv_segment),
                causal=True, sm_scale=scale, block_sizes=blocks,
            )
    elif impl == "splash":
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

        bq, bk = _kernel_block(T, 512), _kernel_block(S, 512)
        blocks = sk.BlockSizes(
            block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
            block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk,
        )
        mask = sm.MultiHeadMask([sm.CausalMask((T, S)) for _ in range(N)])
        kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks, interpret=bool(interpret))
        qs = (qh.astype(jnp.float32) * jnp.float32(scale)).astype(q.dtype)
        out = jax.vmap(kernel)(qs, k.astype(q.dtype), v.astype(q.dtype), segment_ids=sk.SegmentIds(q_segment, kv_segment))
    else:
        raise ValueError(f"fused_attend has no kernel {impl!r}; expected 'cudnn', 'pallas_flash' or 'splash'")
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)  # [B, T, N, H]


class GPTJAttention(nn.Module):
    """Causal self-attention; K/V go through ``cache.py``'s layout (``[B, N, S, H]``) with or without a cache.

    ``attention_impl`` (a concrete name from :func:`resolve_attention`): ``xla`` is :func:`attend`; a kernel
    (:func:`fused_attend`) serves training / scoring (no cache) and prefill into a cache whose rows all start
    at slot 0 (checked at run time with ``lax.cond``: a prefill that continues a filled cache takes the
    einsum path). Single-token decode always takes the einsum path (the kernels do not serve decode).
    """

    config: GPTJConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(
        self,
        x: Array,  # [B, T, D]
        sin: Array,  # [B, T, R/2]
        cos: Array,
        allowed: Array,  # [B, T, S] bool
        layer_cache: Optional[dict[str, Array]],  # {"k","v": [B, N, S, H]} (+ int8: "k_scale","v_scale" [B, N, S, 1])
        cache_index: Optional[Array],  # [B] int32: slot of each row's first new token
        deterministic: bool,
        segments: Optional[Array] = None,  # [B, T] int32 1 real / 0 pad: the kernels' segment ids
    ) -> tuple[Array, Optional[dict[str, Array]], Optional[Array]]:
        cfg = self.config
        B, T, _ = x.shape
        N, H = cfg.n_head, cfg.head_dim

        def proj(name: str) -> Array:
            dense = nn.Dense(
                cfg.n_embd, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=_init(cfg, ("embed", "heads")), name=name,
            )
            return dense(x).reshape(B, T, N, H)  # [B, T, N, H]

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        # Rotary in float32, then back to the compute dtype.
        q = apply_rotary(q.astype(jnp.float32), sin, cos).astype(self.dtype)
        k = apply_rotary(k.astype(jnp.float32), sin, cos).astype(self.dtype)

        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, N, T, H]: the cache layout
        k_new, v_new = k, v
        new_cache = None
        write = functools.partial(write_kv, unrolled_rows=unrolled_write_rows(target_backend()))
        if layer_cache is not None and "k_scale" in layer_cache:  # int8 cache (cache.py): quantize, write, dequantize
            new_cache, stored = {}, {}
            for name, x in (("k", k), ("v", v)):
                xq, xs = quantize_kv(x)  # [B, N, T, H] int8, [B, N, T, 1] float32
                new_cache[name] = write(layer_cache[name], xq, cache_index)  # [B, N, S, H]
                new_cache[name + "_scale"] = write(layer_cache[name + "_scale"], xs, cache_index)  # [B, N, S, 1]
                stored[name] = dequantize_kv(xq, xs, self.dtype)  # the new tokens as stored (what a kernel sees)
            k_new, v_new = stored["k"], stored["v"]
            k = dequantize_kv(new_cache["k"], new_cache["k_scale"], self.dtype)
            v = dequantize_kv(new_cache["v"], new_cache["v_scale"], self.dtype)
        elif layer_cache is not None:
            k = write(layer_cache["k"], k, cache_index)  # [B, N, S, H]
            v = write(layer_cache["v"], v, cache_index)
            new_cache = {"k": k, "v": v}
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        impl = self.attention_impl
        if impl == "xla":
            dropout = functools.partial(nn.Dropout(cfg.attn_pdrop), deterministic=deterministic)
            if cfg.attention_query_block and (deterministic or cfg.attn_pdrop == 0):
                dropout = None  # the identity (the module above still claims its name: same dropout streams)
            out, probs = attend(q, k, v, allowed, dropout=dropout, query_block=cfg.attention_query_block)
        else:
            if segments is None:
                raise ValueError(f"attention {impl!r} needs the segment ids ([B, T] 1 real / 0 pad)")
            probs = None
            fused = functools.partial(fused_attend, q, k_new, v_new, segments, segments, impl)
            if layer_cache is None:
                out = fused()
            else:  # a kernel only when every row starts at slot 0 (its keys are exactly the new tokens)
                out = lax.cond(jnp.all(cache_index == 0), fused, lambda: attend(q, k, v, allowed)[0])
        out = out.reshape(B, T, N * H)
        out = nn.Dense(
            cfg.n_embd, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_init(cfg, ("heads", "embed")), name="out_proj",
        )(out)  # [B, T, D]
        out = nn.Dropout(cfg.resid_pdrop)(out, deterministic=deterministic)
        return out, new_cache, probs


class GPTJMLP(nn.Module):
    config: GPTJConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:  # [B, T, D] -> [B, T, D]
        cfg = self.config
        h = nn.Dense(
            cfg.inner_dim, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_init(cfg, ("embed", "mlp")), bias_init=_zeros(("mlp",)), name="fc_in",
        )(x)  # [B, T, F]
        h = ACT_FNS[cfg.activation_function](h)
        h = nn.Dense(
            cfg.n_embd, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_init(cfg, ("mlp", "embed")), bias_init=_zeros(("embed",)), name="fc_out",
        )(h)  # [B, T, D]
        return nn.Dropout(cfg.resid_pdrop)(h, deterministic=deterministic)


def layer_norm(cfg: GPTJConfig, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    """GPT-J's LayerNorm module (``layer_norm_epsilon``, computed in float32, params ``scale`` / ``bias``)."""
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_epsilon, dtype=jnp.float32, param_dtype=param_dtype, use_fast_variance=False,
        scale_init=_ones(("norm",)), bias_init=_zeros(("norm",)), name=name,
    )


class GPTJBlock(nn.Module):
    """Parallel residual: ``x + attn(ln_1(x)) + mlp(ln_1(x))``."""

    config: GPTJConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, sin, cos, allowed, layer_cache, cache_index, deterministic: bool = True, segments=None):
        x = _grad_barrier(x)
        h = layer_norm(self.config, self.param_dtype, "ln_1")(x.astype(jnp.float32)).astype(self.dtype)
        attn_out, new_cache, probs = GPTJAttention(
            self.config, self.dtype, self.param_dtype, self.attention_impl, name="attn"
        )(h, sin, cos, allowed, layer_cache, cache_index, deterministic, segments)
        ff = GPTJMLP(self.config, self.dtype, self.param_dtype, name="mlp")(h, deterministic)
        return attn_out + ff + x, new_cache, probs  # [B, T, D]


def _block_class(remat_policy: str, scanned: bool = False) -> type[nn.Module]:
    """GPTJBlock, rematerialised per block under ``remat_policy`` (a key of :data:`REMAT_POLICIES`)."""
    if REMAT_POLICIES.get(remat_policy, "missing") == "missing":
        raise ValueError(f"remat_policy {remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
    if remat_policy == "none":
        return GPTJBlock
    # Under nn.scan the loop already keeps XLA from merging recomputation across blocks (prevent_cse off).
    return nn.remat(GPTJBlock, policy=REMAT_POLICIES[remat_policy], static_argnums=(7,), prevent_cse=not scanned)


class GPTJScanBlock(nn.Module):
    """One block as an ``nn.scan`` body: carry ``x``, scanned layer cache, per-layer outputs.

    Its GPTJBlock shares its scope (``nn.share_scope``), so the stacked params are
    ``transformer/h/{ln_1,attn,mlp}/...`` with a leading ``[n_layer]`` axis (logical name ``layers``).
    Returns ``(x, (new layer cache, probs, block input))``: probs / input are None unless asked for.
    """

    config: GPTJConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str = "none"
    deterministic: bool = True
    output_hidden_states: bool = False
    output_attentions: bool = False

    @nn.compact
    def __call__(self, x, layer_cache, sin, cos, allowed, cache_index, segments):
        block = _block_class(self.remat_policy, scanned=True)(
            self.config, self.dtype, self.param_dtype, self.attention_impl, name="block"
        )
        nn.share_scope(self, block)
        y, new_cache, probs = block(x, sin, cos, allowed, layer_cache, cache_index, self.deterministic, segments)
        return y, (new_cache, probs if self.output_attentions else None, x if self.output_hidden_states else None)


# ---------------------------------------------------------------------------------------- base model
class GPTJModel(nn.Module):
    """The GPT-J trunk: embedding, ``n_layer`` blocks, final LayerNorm.

    ``remat_policy`` (``none``, ``full``, ``dots``, ``dots_no_batch``) rematerialises each block in the
    backward pass; it changes memory and speed, not results. ``config.attention`` picks the attention
    implementation (:func:`resolve_attention`); ``config.scan_layers`` runs the blocks under ``nn.scan``
    (params stacked ``transformer/h/...`` ``[n_layer, ...]``, cache layers stacked, see ``cache.py``). ``cache`` (``cache.init_cache``) gets the new
    tokens of row ``b`` at its slots ``cache["index"][b]`` onwards and is returned updated.
    """

    config: GPTJConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"

    @nn.compact
    def __call__(
        self,
        input_ids: Optional[Array] = None,  # [B, T] int
        attention_mask: Optional[Array] = None,  # [B, T] 1 for real tokens, 0 for pads
        position_ids: Optional[Array] = None,  # [B, T]; default cumsum(mask) - 1 (+ cache lengths)
        token_type_ids: Optional[Array] = None,  # [B, T]; embedded with wte and added, as in HF
        inputs_embeds: Optional[Array] = None,  # [B, T, D]
        cache: Optional[Cache] = None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ModelOutput:
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        wte = nn.Embed(
            cfg.vocab_size, cfg.n_embd, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=_init(cfg, ("vocab", "embed")), name="wte",
        )
        if inputs_embeds is None:
            inputs_embeds = wte(input_ids)  # [B, T, D]
        x = inputs_embeds.astype(self.dtype)
        B, T = x.shape[:2]
        if token_type_ids is not None:
            x = x + wte(token_type_ids)
        x = nn.Dropout(cfg.embd_pdrop)(x, deterministic=deterministic)

        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        if cache is None:
            key_mask = attention_mask.astype(bool)  # [B, S=T]
            cache_index, offsets = None, jnp.zeros((B,), jnp.int32)
            q_slots, k_slots = jnp.arange(T)[None, :], jnp.arange(T)  # [1, T], [S]
        else:
            check_cache(cfg, cache)
            cache_index = cache["index"]  # [B]
            key_mask = write_mask(cache["mask"], attention_mask.astype(bool), cache_index)  # [B, S]
            offsets = cache["lengths"]
            q_slots, k_slots = cache_index[:, None] + jnp.arange(T), jnp.arange(key_mask.shape[1])  # [B, T], [S]
        allowed = key_mask[:, None, :] & (k_slots[None, None, :] <= q_slots[:, :, None])  # [B, T, S]
        if position_ids is None:
            position_ids = jnp.maximum(offsets[:, None] + jnp.cumsum(attention_mask, axis=1) - 1, 0)  # [B, T]
        sin, cos = rotary_sin_cos(position_ids, cfg.rotary_dims)

        impl = resolve_attention(
            cfg, T, self.dtype, need_probs=output_attentions, dropout=cfg.attn_pdrop > 0 and not deterministic
        )
        segments = attention_mask if impl != "xla" else None

        hidden_states, attentions, new_layers = [], [], []
        if cfg.scan_layers:
            _block_class(self.remat_policy)  # validates the policy name
            scan = nn.scan(
                GPTJScanBlock, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.n_layer, metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, (new_layers, probs, inputs) = scan(
                cfg, self.dtype, self.param_dtype, impl, self.remat_policy, deterministic, output_hidden_states,
                output_attentions, name="h",
            )(x, cache["layers"] if cache is not None else None, sin, cos, allowed, cache_index, segments)
            if output_hidden_states:
                hidden_states = list(inputs)  # [L, B, T, D] -> L of [B, T, D]
            if output_attentions:
                attentions = list(probs)
        else:
            block_cls = _block_class(self.remat_policy)
            for i in range(cfg.n_layer):
                if output_hidden_states:
                    hidden_states.append(x)
                layer_cache = cache["layers"][i] if cache is not None else None
                x, layer_new, probs = block_cls(cfg, self.dtype, self.param_dtype, impl, name=f"h_{i}")(
                    x, sin, cos, allowed, layer_cache, cache_index, deterministic, segments
                )
                new_layers.append(layer_new)
                if output_attentions:
                    attentions.append(probs)
        x = layer_norm(cfg, self.param_dtype, "ln_f")(x.astype(jnp.float32))  # [B, T, D] float32
        if output_hidden_states:
            hidden_states.append(x)

        new_cache = None
        if cache is not None:
            new_cache = {
                "layers": new_layers,
                "mask": key_mask,
                "index": cache_index + T,
                "lengths": offsets + attention_mask.sum(axis=1),
            }
        return ModelOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            cache=new_cache,
        )


def _dense_f32(features: int, use_bias: bool, cfg: GPTJConfig, param_dtype: Dtype, names, name: str) -> nn.Dense:
    """A head projection whose matmul accumulates and returns float32 (logits in float32)."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=jnp.float32, param_dtype=param_dtype, dot_general=_f32_dot,
        kernel_init=_init(cfg, names), bias_init=_zeros(names[1:]), name=name,
    )


class GPTJForCausalLM(nn.Module):
    """GPT-J with its (untied, biased) LM head. ``logits_to_keep=k > 0`` computes logits for the last k
    positions only (prefill needs just the last one). ``cache``: see ``GPTJModel``."""

    config: GPTJConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"

    @nn.compact
    def __call__(
        self,
        input_ids: Optional[Array] = None,
        attention_mask: Optional[Array] = None,
        position_ids: Optional[Array] = None,
        token_type_ids: Optional[Array] = None,
        inputs_embeds: Optional[Array] = None,
        labels: Optional[Array] = None,  # [B, T] int, -100 ignored
        cache: Optional[Cache] = None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        out = GPTJModel(self.config, self.dtype, self.param_dtype, self.remat_policy, name="transformer")(
            input_ids, attention_mask, position_ids, token_type_ids, inputs_embeds, cache,
            deterministic, output_hidden_states, output_attentions,
        )
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = _dense_f32(
            self.config.vocab_size, True, self.config, self.param_dtype, ("embed", "vocab"), "lm_head"
        )(h.astype(self.dtype))  # [B, T, V] float32
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits, loss, out.hidden_states, out.attentions, out.cache)


class GPTJForSequenceClassification(nn.Module):
    """Linear ``score`` (no bias) on the last non-pad token of each row; loss by ``problem_type``."""

    config: GPTJConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"

    @nn.compact
    def __call__(
        self,
        input_ids: Optional[Array] = None,
        attention_mask: Optional[Array] = None,
        position_ids: Optional[Array] = None,
        token_type_ids: Optional[Array] = None,
        inputs_embeds: Optional[Array] = None,
        labels: Optional[Array] = None,  # [B] int (single label), [B] / [B, C] float (regression, multi-label)
        cache: Optional[Cache] = None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> SequenceClassifierOutput:
        cfg = self.config
        out = GPTJModel(cfg, self.dtype, self.param_dtype, self.remat_policy, name="transformer")(
            input_ids, attention_mask, position_ids, token_type_ids, inputs_embeds, cache,
            deterministic, output_hidden_states, output_attentions,
        )
        h = out.last_hidden_state
        B, T = h.shape[:2]
        logits = _dense_f32(cfg.num_labels, False, cfg, self.param_dtype, ("embed", "classes"), "score")(
            h.astype(self.dtype)
        )  # [B, T, C]
        if cfg.pad_token_id is None and B != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined (config.pad_token_id).")
        if cfg.pad_token_id is not None and input_ids is not None:
            non_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            last = jnp.argmax(jnp.arange(T, dtype=jnp.int32) * non_pad, axis=-1)  # rightmost non-pad token
        else:
            last = jnp.full((B,), T - 1)
        pooled = logits[jnp.arange(B), last]  # [B, C]
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(cfg, pooled, labels)
        return SequenceClassifierOutput(pooled, loss, out.hidden_states, out.attentions, out.cache)


def sequence_classification_loss(cfg: GPTJConfig, pooled: Array, labels: Array) -> Array:
    """HF's rule: regression (MSE) when num_labels == 1, single-label CE for integer labels, else BCE."""
    problem = cfg.problem_type
    if problem is None:
        if cfg.num_labels == 1:
            problem = "regression"
        elif jnp.issubdtype(labels.dtype, jnp.integer):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        if cfg.num_labels == 1:
            return jnp.mean((pooled.reshape(-1) - labels.reshape(-1).astype(jnp.float32)) ** 2)
        return jnp.mean((pooled - labels.astype(jnp.float32)) ** 2)
    if problem == "single_label_classification":
        return token_cross_entropy(pooled.reshape(-1, cfg.num_labels), labels.reshape(-1), ignore_index=-100).mean()
    return jnp.mean(optax.sigmoid_binary_cross_entropy(pooled, labels.astype(jnp.float32)))


class GPTJForQuestionAnswering(nn.Module):
    """``qa_outputs`` (D -> 2, with bias) giving start and end logits per token."""

    config: GPTJConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"

    @nn.compact
    def __call__(
        self,
        input_ids: Optional[Array] = None,
        attention_mask: Optional[Array] = None,
        position_ids: Optional[Array] = None,
        token_type_ids: Optional[Array] = None,
        inputs_embeds: Optional[Array] = None,
        start_positions: Optional[Array] = None,  # [B] int
        end_positions: Optional[Array] = None,  # [B] int
        deterministic: bool = True,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> QuestionAnsweringOutput:
        out = GPTJModel(self.config, self.dtype, self.param_dtype, self.remat_policy, name="transformer")(
            input_ids, attention_mask, position_ids, token_type_ids, inputs_embeds, None,
            deterministic, output_hidden_states, output_attentions,
        )
        h = out.last_hidden_state
        logits = _dense_f32(2, True, self.config, self.param_dtype, ("embed", "classes"), "qa_outputs")(
            h.astype(self.dtype)
        )  # [B, T, 2]
        start, end = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            T = start.shape[1]  # positions outside [0, T) are clamped to T and ignored, as in HF
            s = jnp.clip(start_positions.reshape(-1), 0, T)
            e = jnp.clip(end_positions.reshape(-1), 0, T)
            loss = (
                token_cross_entropy(start, s, ignore_index=T).mean() + token_cross_entropy(end, e, ignore_index=T).mean()
            ) / 2
        return QuestionAnsweringOutput(start, end, loss, out.hidden_states, out.attentions)


# ---------------------------------------------------------------------------------------- heads
class Head(NamedTuple):
    """One model head: the registry entry every part of the package reads (converters, sharding, tests)."""

    name: str  # "causal_lm", ...
    module: type[nn.Module]  # the linen class
    architecture: str  # the Hugging Face class name (config.json "architectures")
    keys: tuple[str, ...]  # its top-level param keys besides "transformer" (none for the bare model)
    num_classes: Callable[[GPTJConfig], Optional[int]]  # size of its "classes" axis, None without one
    classes_field: str = ""  # what that size is called in error messages


HEADS: dict[str, Head] = {
    h.name: h
    for h in (
        Head("base", GPTJModel, "GPTJModel", (), lambda config: None),
        Head("causal_lm", GPTJForCausalLM, "GPTJForCausalLM", ("lm_head",), lambda config: None),
        Head(
            "sequence_classification", GPTJForSequenceClassification, "GPTJForSequenceClassification", ("score",),
            lambda config: config.num_labels, "num_labels",
        ),
        Head(
            "question_answering", GPTJForQuestionAnswering, "GPTJForQuestionAnswering", ("qa_outputs",),
            lambda config: 2, "the 2 qa_outputs",
        ),
    )
}


def head_of(params: Any) -> str:
    """Which head (a key of :data:`HEADS`) a params tree is for, from its top-level keys.

    ``{"transformer", "lm_head"}`` is ``causal_lm``; a tree with ``wte`` at the top and no
    ``transformer`` is the bare model (``base``). Raises ValueError naming the keys otherwise.
    """
    keys = set(params)
    prefix = f"cannot tell the head of params with top-level keys {sorted(keys)}"
    if "transformer" not in keys:
        if "wte" in keys:
            return "base"
        raise ValueError(f"{prefix}: they have neither 'transformer' nor 'wte'")
    extra = keys - {"transformer"}
    for head in HEADS.values():
        if head.keys and extra == set(head.keys):
            return head.name
    known = ", ".join(repr(k) for h in HEADS.values() for k in h.keys)
    if not extra:
        raise ValueError(f"{prefix}: 'transformer' but no head ({known})")
    raise ValueError(f"{prefix}: unknown {sorted(extra)} next to 'transformer' (heads: {known})")


# ---------------------------------------------------------------------------------------- helpers
def model_for(config: GPTJConfig, head: str = "causal_lm", **kwargs: Any) -> nn.Module:
    """The linen module for ``head`` (one of ``HEADS``); kwargs go to the module (dtype, param_dtype...)."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {sorted(HEADS)}")
    return HEADS[head].module(config, **kwargs)


def _init_fn(config: GPTJConfig, head: str, param_dtype: Dtype):
    module = model_for(config, head, param_dtype=param_dtype)
    dummy = jnp.zeros((1, 1), jnp.int32)

    def init(rng: Array):
        return module.init(rng, dummy)["params"]

    return init


def init_params(config: GPTJConfig, rng: Array, head: str = "causal_lm", param_dtype: Dtype = jnp.float32):
    """Random parameters (HF's init: normal(initializer_range), zero biases, unit LayerNorm) as a plain pytree."""
    return nn.meta.unbox(jax.jit(_init_fn(config, head, param_dtype))(rng))


def logical_axes(config: GPTJConfig, head: str = "causal_lm") -> Any:
    """Pytree like the params whose leaves are ``PartitionSpec`` of logical axis names (no arrays made)."""
    boxed = jax.eval_shape(_init_fn(config, head, jnp.float32), jax.random.PRNGKey(0))
    return nn.get_partition_spec(boxed)

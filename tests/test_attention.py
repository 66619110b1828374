"""Attention implementations (``GPTJConfig.attention``) against today's einsum path (``model.attend``).

On CPU the TPU kernels run in Pallas' interpret mode (``fused_attend(..., interpret=True)`` and
``model.interpret_kernels()`` for whole-model runs) and ``cudnn``'s entry point,
``jax.nn.dot_product_attention``, runs its ``xla`` implementation; ``cudnn`` itself on CPU is a clear error.
Shapes: head dim 256 (GPT-J's) and 128, causal, left-padded rows, partial rotary applied to q/k before
the kernel. Only real (non-pad) query rows are compared: pad rows are never read (see ``fused_attend``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptj_jax
from gptj_jax import model as M
from gptj_jax.cache import init_cache

TOL = 1e-5


def _qkv(B: int, T: int, N: int, H: int, rotary: int, pads: list[int], seed: int = 0):
    """q [B, T, N, H], k/v [B, N, T, H] with rotary on the first ``rotary`` dims, the mask and segments."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) for _ in range(3))
    mask = np.ones((B, T), np.int32)
    for b, pad in enumerate(pads):
        mask[b, :pad] = 0
    pos = jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0))
    sin, cos = M.rotary_sin_cos(pos, rotary)
    q, k = M.apply_rotary(q, sin, cos), M.apply_rotary(k, sin, cos)
    allowed = mask[:, None, :].astype(bool) & (np.arange(T)[None, :] <= np.arange(T)[:, None])[None]
    return q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, jnp.asarray(allowed)


def _real_rows_error(out, ref, mask) -> float:
    real = np.asarray(mask).astype(bool)[:, :, None, None]  # [B, T, 1, 1]
    return float(np.max(np.where(real, np.abs(np.asarray(out) - np.asarray(ref)), 0.0)))


@pytest.mark.parametrize("H", [256, 128])
@pytest.mark.parametrize("impl", ["splash", "pallas_flash", "cudnn"])
def test_kernel_matches_einsum_attention(impl, H):
    """Each kernel (Pallas in interpret mode; cudnn's entry point with implementation="xla") equals
    model.attend on real rows within 1e-5 float32: causal, rows left-padded by 0 / 37 tokens, rotary 64."""
    B, T, N = 2, 128, 2
    q, k, v, mask, allowed = _qkv(B, T, N, H, rotary=64, pads=[0, 37])
    ref, _ = M.attend(q, k, v, allowed)
    seg = jnp.asarray(mask)
    out = M.fused_attend(q, k, v, seg, seg, impl, interpret=True, dpa_implementation="xla")
    assert out.shape == (B, T, N, H) and out.dtype == jnp.float32
    err = _real_rows_error(out, ref, mask)
    assert err <= TOL, f"{impl} H={H}: max error {err:.3g} > {TOL}"
    assert np.isfinite(np.asarray(out)).all()  # pad rows too: no empty softmax row


def test_kernel_gradients_match_einsum_attention():
    """The splash kernel's backward (training) equals the einsum path's gradients on real rows."""
    q, k, v, mask, allowed = _qkv(2, 128, 2, 128, rotary=64, pads=[0, 20], seed=1)
    w = jnp.asarray(mask, jnp.float32)[:, :, None, None]
    seg = jnp.asarray(mask)

    def loss_ref(q, k, v):
        return jnp.sum(M.attend(q, k, v, allowed)[0] * w)

    def loss_splash(q, k, v):
        return jnp.sum(M.fused_attend(q, k, v, seg, seg, "splash", interpret=True) * w)

    g_ref = jax.grad(loss_ref, (0, 1, 2))(q, k, v)
    g_spl = jax.grad(loss_splash, (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_spl, g_ref):
        err = float(jnp.abs(a - b).max())
        assert err <= TOL, f"d{name}: max error {err:.3g}"


def _lm_config(**changes) -> gptj_jax.GPTJConfig:
    base = dict(vocab_size=101, n_positions=256, n_embd=512, n_layer=2, n_head=2, rotary_dim=64)
    return gptj_jax.GPTJConfig(**{**base, **changes})  # head dim 256


def _batch(T: int = 128):
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, 101, (2, T)), jnp.int32)
    mask = jnp.ones((2, T), jnp.int32).at[1, :41].set(0)
    return ids, mask


@pytest.mark.parametrize("impl", ["splash", "pallas_flash"])
def test_model_with_kernel_matches_xla(impl):
    """A whole GPTJForCausalLM with attention=impl (interpret mode) gives xla's logits on real rows,
    without a cache (training / scoring), as a prefill into a fresh cache, and for the next decode step."""
    cfg = _lm_config(attention="xla")
    params = gptj_jax.init_params(cfg, jax.random.PRNGKey(0))
    ids, mask = _batch()
    ref_model, kern_model = M.GPTJForCausalLM(cfg), M.GPTJForCausalLM(cfg.replace(attention=impl))
    ref = ref_model.apply({"params": params}, ids, mask)
    ref_pre = ref_model.apply({"params": params}, ids, mask, cache=init_cache(cfg, 2, 136))
    # jitted, as generate and the train step run it (eager op-by-op dispatch around the interpret-mode
    # kernel's host callbacks hung once under a loaded xdist run)
    with M.interpret_kernels():
        out = jax.jit(kern_model.apply)({"params": params}, ids, mask)
        pre = jax.jit(kern_model.apply)({"params": params}, ids, mask, cache=init_cache(cfg, 2, 136))
    real = np.asarray(mask).astype(bool)[:, :, None]
    assert float(np.max(np.where(real, np.abs(np.asarray(out.logits - ref.logits)), 0))) <= TOL
    assert float(np.max(np.where(real, np.abs(np.asarray(pre.logits - ref_pre.logits)), 0))) <= TOL
    nxt = ids[:, -1:]
    one = jnp.ones((2, 1), jnp.int32)
    dec = kern_model.apply({"params": params}, nxt, one, cache=pre.cache)
    dec_ref = ref_model.apply({"params": params}, nxt, one, cache=ref_pre.cache)
    assert float(jnp.abs(dec.logits - dec_ref.logits).max()) <= TOL


def test_auto_picks_xla_on_cpu():
    assert jax.default_backend() == "cpu"
    cfg = _lm_config()
    assert cfg.attention == "auto"
    assert M.resolve_attention(cfg, 2048, jnp.bfloat16) == "xla"
    # what auto picks elsewhere, by backend and shape
    assert M.resolve_attention(cfg, 2048, jnp.bfloat16, backend="gpu") == "cudnn"
    assert M.resolve_attention(cfg, 2048, jnp.float32, backend="gpu") == "xla"  # cuDNN needs 16-bit inputs
    assert M.resolve_attention(cfg, 2048, jnp.bfloat16, backend="tpu") == "splash"
    assert M.resolve_attention(cfg, 100, jnp.bfloat16, backend="tpu") == "xla"  # not a multiple of 128
    assert M.resolve_attention(cfg, 1, jnp.bfloat16, backend="tpu") == "xla"  # decode: the einsum path
    assert M.resolve_attention(cfg, 2048, jnp.bfloat16, need_probs=True, backend="tpu") == "xla"


def test_cudnn_on_cpu_is_a_clear_error():
    cfg = _lm_config(attention="cudnn")
    params = gptj_jax.init_params(cfg.replace(attention="xla"), jax.random.PRNGKey(0))
    ids, mask = _batch()
    with pytest.raises(ValueError, match=r"attention='cudnn' needs a gpu/cuda/rocm backend but jax's backend is 'cpu'"):
        M.GPTJForCausalLM(cfg).apply({"params": params}, ids, mask)


def test_pallas_kernel_on_cpu_without_interpret_is_a_clear_error():
    cfg = _lm_config(attention="splash")
    params = gptj_jax.init_params(cfg.replace(attention="xla"), jax.random.PRNGKey(0))
    ids, mask = _batch()
    with pytest.raises(ValueError, match=r"attention='splash' needs a tpu backend but jax's backend is 'cpu'"):
        M.GPTJForCausalLM(cfg).apply({"params": params}, ids, mask)


def test_kernel_with_output_attentions_is_a_clear_error():
    cfg = _lm_config(attention="splash")
    params = gptj_jax.init_params(cfg.replace(attention="xla"), jax.random.PRNGKey(0))
    ids, mask = _batch()
    with M.interpret_kernels(), pytest.raises(ValueError, match="does not return attention probabilities"):
        M.GPTJForCausalLM(cfg).apply({"params": params}, ids, mask, output_attentions=True)


def test_attention_config_validated_and_not_in_config_json(tmp_path):
    with pytest.raises(gptj_jax.ConfigError, match=r"attention 'flash' is not one of \['auto', 'xla', 'cudnn', 'pallas_flash', 'splash'\]"):
        _lm_config(attention="flash")
    cfg = _lm_config(attention="splash", scan_layers=True)
    assert "attention" not in cfg.to_hf_dict() and "scan_layers" not in cfg.to_hf_dict()
    assert gptj_jax.GPTJConfig.from_pretrained(cfg.save_pretrained(tmp_path)) == cfg.replace(attention="auto", scan_layers=False)

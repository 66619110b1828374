"""``GPTJConfig.attention_query_block``: the einsum attention over blocks of query rows (``model.attend_query_blocks``)
gives today's logits, attention probabilities and gradients (float32, 1e-5), with left padding and remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptj_jax
from gptj_jax import model as M
from gptj_jax.train.config import load_train_config, model_config_for

TOL = 1e-5
T = 23  # query blocks of 8: two full blocks in the scan and a last block of 7 rows


def _config(**changes) -> gptj_jax.GPTJConfig:
    base = dict(vocab_size=101, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, attention="xla")
    return gptj_jax.GPTJConfig(**{**base, **changes})


def _batch():
    rng = np.random.default_rng(5)
    ids = jnp.asarray(rng.integers(0, 101, (2, T)), jnp.int32)
    mask = jnp.ones((2, T), jnp.int32).at[1, :6].set(0)  # row 1 left-padded by 6 tokens
    weights = jnp.asarray(rng.standard_normal((2, T, 101)), jnp.float32)
    return ids, mask, weights


def _max_diff(a, b) -> float:
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.max(jnp.abs(x - y)), a, b))
    return float(max(leaves))


def _max_rel_diff(a, b) -> float:
    """Largest difference per array over that array's largest magnitude (at least 1)."""
    rel = jax.tree.map(lambda x, y: jnp.max(jnp.abs(x - y)) / jnp.maximum(1.0, jnp.max(jnp.abs(y))), a, b)
    return float(max(jax.tree.leaves(rel)))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_query_blocks_match_full_attention(remat):
    """Logits, attention probabilities and parameter gradients of a 2-layer causal LM with
    ``attention_query_block=8`` equal those of the unblocked einsum attention within 1e-5 (jitted; gradients
    relative to each array's largest magnitude)."""
    ids, mask, weights = _batch()
    params = gptj_jax.init_params(_config(), jax.random.PRNGKey(0))
    results = {}
    for block in (0, 8):
        module = M.model_for(_config(attention_query_block=block), "causal_lm", remat_policy=remat)

        def loss(p, module=module):
            out = module.apply({"params": p}, ids, mask)
            return jnp.sum(out.logits * weights), out.logits

        (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        probs = jax.jit(lambda p, module=module: module.apply({"params": p}, ids, mask, output_attentions=True).attentions)(params)
        results[block] = (logits, probs, grads, value)
    (logits0, probs0, grads0, value0), (logits8, probs8, grads8, value8) = results[0], results[8]
    assert logits8.shape == (2, T, 101) and len(probs8) == 2 and probs8[0].shape == (2, 4, T, T)
    assert _max_diff(logits8, logits0) <= TOL
    assert _max_diff(probs8, probs0) <= TOL
    assert _max_rel_diff(grads8, grads0) <= TOL, _max_rel_diff(grads8, grads0)  # gradients reach ~20 here
    assert abs(float(value8) - float(value0)) <= TOL * max(1.0, abs(float(value0)))
    assert float(jnp.max(jnp.abs(grads0["transformer"]["h_0"]["attn"]["q_proj"]["kernel"]))) > 1e-3  # attention trains


def test_query_blocks_attend_equals_attend_directly():
    """``model.attend(..., query_block=5)`` on [2, 12, 2, 16] q (blocks 5, 5 and 2) gives ``attend``'s output and
    probabilities, the key mask left-padding row 1."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 12, 2, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 2, 12, 16)), jnp.float32) for _ in range(2))
    causal = np.tril(np.ones((12, 12), bool))
    allowed = np.stack([causal, causal & (np.arange(12) >= 3)[None, :]])
    out, probs = M.attend(q, k, v, jnp.asarray(allowed))
    out5, probs5 = M.attend(q, k, v, jnp.asarray(allowed), query_block=5)
    assert out5.shape == out.shape and probs5.shape == probs.shape == (2, 2, 12, 12)
    assert float(jnp.max(jnp.abs(out5 - out))) <= TOL and float(jnp.max(jnp.abs(probs5 - probs))) <= TOL


def test_query_blocks_config_key_and_errors():
    """The train key reaches the model config (not config.json); negative values and attention dropout in
    training are clear errors; dropout stays allowed when deterministic."""
    required = ["total_steps=1", "model_dir=/tmp/unused", "train_set=/tmp/unused"]
    cfg = load_train_config(None, required + ["layers=2", "d_model=64", "n_heads=4", "n_vocab=101", "pe_rotary_dims=8",
                                              "seq=16", "attention_query_block=8"])
    model_cfg = model_config_for(cfg)
    assert model_cfg.attention_query_block == 8
    assert "attention_query_block" not in model_cfg.to_hf_dict()
    with pytest.raises(gptj_jax.ConfigError, match="attention_query_block must be an integer >= 0, got -1"):
        _config(attention_query_block=-1)
    with pytest.raises(Exception, match="key 'attention_query_block' must be >= 0, got -2"):
        load_train_config(None, required + ["attention_query_block=-2"])
    ids, mask, _ = _batch()
    config = _config(attention_query_block=8, attn_pdrop=0.1)
    params = gptj_jax.init_params(config, jax.random.PRNGKey(0))
    module = M.model_for(config, "causal_lm")
    eval_logits = jax.jit(lambda p: module.apply({"params": p}, ids, mask).logits)(params)  # dropout: identity
    unblocked = M.model_for(config.replace(attention_query_block=0), "causal_lm")
    ref = jax.jit(lambda p: unblocked.apply({"params": p}, ids, mask).logits)(params)
    assert _max_diff(eval_logits, ref) <= TOL
    with pytest.raises(ValueError, match="attention in query blocks .* has no attention dropout"):
        jax.jit(lambda p: module.apply({"params": p}, ids, mask, deterministic=False,
                                       rngs={"dropout": jax.random.PRNGKey(1)}))(params)

"""Parity of our Flax GPT-J against transformers' PyTorch GPT-J on random weights.

Float32 logits and per-layer hidden states within 1e-4 (max abs), losses within 1e-5, at the
real (non-pad) positions of left-padded batches. Each config changes one thing HF's code
branches on or that ports got wrong (rotary_dim vs head dim, odd head count, n_inner,
activation, epsilon, vocab not a multiple of 8).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_model, left_padded_batch, params_of

from gptj_jax import (
    GPTJConfig,
    GPTJForCausalLM,
    GPTJForQuestionAnswering,
    GPTJForSequenceClassification,
    GPTJModel,
    init_cache,
    init_params,
    logical_axes,
)

CONFIGS = {
    # rotary_dim < head_dim (8), gelu_new, vocab 101
    "rot_lt_head": GPTJConfig(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
    # rotary_dim == head_dim (16), odd head count, relu
    "rot_eq_head_odd_heads": GPTJConfig(
        vocab_size=97, n_positions=64, n_embd=48, n_layer=2, n_head=3, rotary_dim=16, activation_function="relu"
    ),
    # custom n_inner, silu, epsilon != 1e-5
    "n_inner_silu_eps": GPTJConfig(
        vocab_size=120, n_positions=64, n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_inner=40,
        activation_function="silu", layer_norm_epsilon=1e-6,
    ),
    # exact gelu, 5 heads, vocab 203
    "gelu_five_heads": GPTJConfig(
        vocab_size=203, n_positions=64, n_embd=40, n_layer=2, n_head=5, rotary_dim=8, activation_function="gelu",
        layer_norm_epsilon=3e-5,
    ),
    # tanh, three layers, rotary over only 2 dims, small n_inner
    "tanh_three_layers": GPTJConfig(
        vocab_size=64, n_positions=64, n_embd=24, n_layer=3, n_head=2, rotary_dim=2, n_inner=24,
        activation_function="tanh",
    ),
}

LENGTHS = [9, 5, 1, 7]


def _max_err(ours, ref, mask=None) -> float:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    diff = np.abs(ours - ref)
    if mask is not None:
        diff = diff[mask.astype(bool)]
    return float(diff.max())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def causal_pair(request):
    cfg = CONFIGS[request.param]
    hf = hf_model(cfg, "causal_lm", seed=hash(request.param) % 1000)
    return cfg, hf, params_of(hf)


def test_causal_lm_logits_hidden_states_attentions_and_loss(causal_pair):
    cfg, hf, params = causal_pair
    ids, mask, pos = left_padded_batch(cfg.vocab_size, LENGTHS, seed=1)
    labels = ids.copy()
    labels[mask == 0] = -100
    labels[0, -2] = -100
    with torch.no_grad():
        ref = hf(
            torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
            labels=torch.tensor(labels), output_hidden_states=True, output_attentions=True,
        )
    out = GPTJForCausalLM(cfg).apply(
        {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(pos),
        labels=jnp.asarray(labels), output_hidden_states=True, output_attentions=True,
    )
    assert out.logits.dtype == jnp.float32
    assert out.logits.shape == (len(LENGTHS), max(LENGTHS), cfg.vocab_size)
    assert _max_err(out.logits, ref.logits, mask) <= 1e-4
    assert len(out.hidden_states) == len(ref.hidden_states) == cfg.n_layer + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert _max_err(ours, theirs, mask) <= 1e-4
    assert len(out.attentions) == cfg.n_layer
    qmask = mask.astype(bool)  # compare the attention rows of real query tokens
    for ours, theirs in zip(out.attentions, ref.attentions):
        ours, theirs = np.asarray(ours), theirs.numpy()
        assert np.abs(ours - theirs).transpose(0, 2, 1, 3)[qmask].max() <= 1e-5
    assert abs(float(out.loss) - float(ref.loss)) <= 1e-5


def test_default_positions_are_cumsum_of_mask(causal_pair):
    """Without position_ids we use cumsum(mask) - 1, what HF generate passes for left padding."""
    cfg, hf, params = causal_pair
    ids, mask, pos = left_padded_batch(cfg.vocab_size, LENGTHS, seed=2)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits
    out = GPTJForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert _max_err(out.logits, ref, mask) <= 1e-4
    # and with no mask at all, plain arange like HF's own default
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits
    out = GPTJForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids))
    assert _max_err(out.logits, ref) <= 1e-4


def test_inputs_embeds_and_token_type_ids():
    cfg = CONFIGS["rot_lt_head"]
    hf = hf_model(cfg, "causal_lm", seed=3)
    params = params_of(hf)
    ids, mask, pos = left_padded_batch(cfg.vocab_size, [6, 4], seed=3)
    tt = np.random.RandomState(0).randint(0, cfg.vocab_size, ids.shape)
    embeds = params["transformer"]["wte"]["embedding"][ids]
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                 token_type_ids=torch.tensor(tt)).logits
        ref_plain = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits
    model = GPTJForCausalLM(cfg)
    out = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                      token_type_ids=jnp.asarray(tt))
    assert _max_err(out.logits, ref, mask) <= 1e-4
    out = model.apply({"params": params}, inputs_embeds=jnp.asarray(embeds), attention_mask=jnp.asarray(mask))
    assert _max_err(out.logits, ref_plain, mask) <= 1e-4
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model.apply({"params": params}, jnp.asarray(ids), inputs_embeds=jnp.asarray(embeds))


def test_base_model_matches_gptjmodel():
    cfg = CONFIGS["gelu_five_heads"]
    hf = hf_model(cfg, "base", seed=4)
    params = params_of(hf)
    assert "wte" in params and "transformer" not in params
    ids, mask, pos = left_padded_batch(cfg.vocab_size, [8, 3], seed=4)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    out = GPTJModel(cfg).apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert _max_err(out.last_hidden_state, ref.last_hidden_state, mask) <= 1e-4


@pytest.mark.parametrize(
    "num_labels,problem_type,label_kind",
    [
        (1, None, "float"),  # inferred regression
        (3, None, "int"),  # inferred single-label
        (3, None, "multi"),  # inferred multi-label (float labels)
        (3, "regression", "float3"),
        (3, "single_label_classification", "int"),
        (4, "multi_label_classification", "multi"),
    ],
)
def test_sequence_classification_logits_and_loss(num_labels, problem_type, label_kind):
    pad = 0
    cfg = CONFIGS["rot_lt_head"].replace(num_labels=num_labels, problem_type=problem_type, pad_token_id=pad)
    hf = hf_model(cfg, "sequence_classification", seed=5)
    params = params_of(hf)
    assert params["score"]["kernel"].shape == (cfg.n_embd, num_labels)
    ids, mask, pos = left_padded_batch(cfg.vocab_size, [7, 4, 2], seed=5)
    ids[ids == pad] = 1
    ids[mask == 0] = pad  # pads carry pad_token_id, so the last non-pad token is found from input_ids
    ids[2, -1] = pad  # and one row is right-padded by one: the rightmost non-pad token is still used
    mask[2, -1] = 0
    rng = np.random.RandomState(5)
    labels = {
        "float": rng.randn(3).astype(np.float32),
        "float3": rng.randn(3, num_labels).astype(np.float32),
        "int": rng.randint(0, num_labels, 3).astype(np.int64),
        "multi": (rng.rand(3, num_labels) > 0.5).astype(np.float32),
    }[label_kind]
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                 labels=torch.tensor(labels))
    out = GPTJForSequenceClassification(cfg).apply(
        {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(pos),
        labels=jnp.asarray(labels),
    )
    assert out.logits.shape == (3, num_labels)
    assert _max_err(out.logits, ref.logits) <= 1e-4
    assert abs(float(out.loss) - float(ref.loss)) <= 1e-5


def test_sequence_classification_without_pad_token():
    cfg = CONFIGS["rot_lt_head"].replace(num_labels=2, pad_token_id=None)
    hf = hf_model(cfg, "sequence_classification", seed=6)
    params = params_of(hf)
    ids = np.random.RandomState(6).randint(0, cfg.vocab_size, (1, 6))
    with torch.no_grad():
        ref = hf(torch.tensor(ids), labels=torch.tensor([1]))
    model = GPTJForSequenceClassification(cfg)
    out = model.apply({"params": params}, jnp.asarray(ids), labels=jnp.asarray([1]))
    assert _max_err(out.logits, ref.logits) <= 1e-4
    assert abs(float(out.loss) - float(ref.loss)) <= 1e-5
    with pytest.raises(ValueError, match="no padding token"):
        model.apply({"params": params}, jnp.asarray(np.concatenate([ids, ids])))


def test_question_answering_logits_and_loss():
    cfg = CONFIGS["n_inner_silu_eps"]
    hf = hf_model(cfg, "question_answering", seed=7)
    params = params_of(hf)
    ids, mask, pos = left_padded_batch(cfg.vocab_size, [8, 6, 8], seed=7)
    start = np.array([7, 3, 100])  # 100 is past the end: clamped to T and ignored, as in HF
    end = np.array([7, 5, -4])  # -4 clamps to 0
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                 start_positions=torch.tensor(start), end_positions=torch.tensor(end))
    out = GPTJForQuestionAnswering(cfg).apply(
        {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(pos),
        start_positions=jnp.asarray(start), end_positions=jnp.asarray(end),
    )
    assert _max_err(out.start_logits, ref.start_logits, mask) <= 1e-4
    assert _max_err(out.end_logits, ref.end_logits, mask) <= 1e-4
    assert abs(float(out.loss) - float(ref.loss)) <= 1e-5


# bf16 compute (params kept in float32, matmuls and the residual stream in bfloat16, LayerNorm /
# softmax / logits in float32) against the float32 reference. bfloat16 has an 8-bit mantissa
# (relative step 2^-8 = 0.4%); through 2 layers the logits drift by at most ~2% of their spread.
BF16_REL_TOL = 0.03


def test_bf16_compute_close_to_float32(causal_pair):
    cfg, hf, params = causal_pair
    ids, mask, pos = left_padded_batch(cfg.vocab_size, LENGTHS, seed=8)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()
    out = GPTJForCausalLM(cfg, dtype=jnp.bfloat16).apply(
        {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)
    )
    assert out.logits.dtype == jnp.float32
    err = _max_err(out.logits, ref, mask)
    spread = float(np.abs(ref[mask.astype(bool)]).max())
    assert err <= BF16_REL_TOL * spread, (err, spread)
    # and it is bf16 that did the work: the error is not float32-small
    assert err > 1e-5
    # bf16 params too (param_dtype), still within the same bound
    bf16_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    out = GPTJForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply(
        {"params": bf16_params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)
    )
    assert _max_err(out.logits, ref, mask) <= BF16_REL_TOL * spread


def test_cached_decoding_equals_full_forward(causal_pair):
    """Prefill a left-padded prompt into the cache, then feed one token at a time."""
    cfg, hf, params = causal_pair
    lengths, steps = [6, 3, 1, 5], 6
    ids, mask, _ = left_padded_batch(cfg.vocab_size, lengths, seed=9)
    new = np.random.RandomState(9).randint(0, cfg.vocab_size, (len(lengths), steps))
    model = GPTJForCausalLM(cfg)
    apply = jax.jit(lambda p, x, m, c: model.apply({"params": p}, x, attention_mask=m, cache=c))
    cache = init_cache(cfg, len(lengths), ids.shape[1] + steps + 2)
    out = apply(params, jnp.asarray(ids), jnp.asarray(mask), cache)
    cache = out.cache
    full_ids, full_mask = ids, mask
    with torch.no_grad():
        ref = hf(torch.tensor(full_ids), attention_mask=torch.tensor(full_mask),
                 position_ids=torch.tensor(np.maximum(np.cumsum(full_mask, 1) - 1, 0))).logits.numpy()
    assert _max_err(out.logits, ref, full_mask) <= 1e-4
    for t in range(steps):
        tok = new[:, t:t + 1]
        out = apply(params, jnp.asarray(tok), jnp.ones((len(lengths), 1), jnp.int32), cache)
        cache = out.cache
        full_ids = np.concatenate([full_ids, tok], 1)
        full_mask = np.concatenate([full_mask, np.ones_like(tok)], 1)
        with torch.no_grad():
            ref = hf(torch.tensor(full_ids), attention_mask=torch.tensor(full_mask),
                     position_ids=torch.tensor(np.maximum(np.cumsum(full_mask, 1) - 1, 0))).logits.numpy()
        assert _max_err(out.logits[:, 0], ref[:, -1]) <= 1e-4
    assert np.asarray(cache["index"]).tolist() == [ids.shape[1] + steps] * len(lengths)  # per-row index
    np.testing.assert_array_equal(np.asarray(cache["lengths"]), np.array(lengths) + steps)


def test_cache_rows_insert_and_take_rows(causal_pair):
    """Prompts prefilled alone (each into a cache of its own length) and inserted into rows of one bigger
    cache (``cache.insert``; one row refilled after a longer prompt left its K/V there) decode in one model
    call, each row at its own slot (per-row index), with the logits of transformers on that prompt alone;
    ``cache.take_rows`` (beam reordering) moves the rows' caches with them."""
    from gptj_jax.cache import insert, take_rows

    cfg, hf, params = causal_pair
    model = GPTJForCausalLM(cfg)
    apply = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c))
    rng = np.random.RandomState(12)
    prompts = [rng.randint(0, cfg.vocab_size, n) for n in (5, 2, 7)]
    cache = init_cache(cfg, 4, 16)
    for p, slot in [(prompts[2], 0), (prompts[0], 3), (prompts[1], 0), (prompts[2], 1)]:  # row 0: 7 tokens, then 2
        prefix = model.apply({"params": params}, jnp.asarray(p[None]), cache=init_cache(cfg, 1, len(p))).cache
        cache = jax.jit(insert)(cache, prefix, jnp.int32(slot))
    rows = {0: prompts[1], 1: prompts[2], 3: prompts[0]}  # row 2 stays empty
    assert np.asarray(cache["index"]).tolist() == [2, 7, 0, 5]
    assert np.asarray(cache["lengths"]).tolist() == [2, 7, 0, 5]
    seqs = {r: list(p) for r, p in rows.items()}
    for _ in range(3):
        tok = rng.randint(0, cfg.vocab_size, (4,))
        out = apply(params, jnp.asarray(tok[:, None]), cache)
        cache = out.cache
        for r in rows:
            seqs[r].append(int(tok[r]))
            with torch.no_grad():
                ref = hf(torch.tensor([seqs[r]])).logits.numpy()[0, -1]
            assert _max_err(out.logits[r, 0], ref) <= 1e-4, r
    order = jnp.asarray([3, 3, 1, 0])
    tok = rng.randint(0, cfg.vocab_size, (4,))
    want = apply(params, jnp.asarray(tok[:, None]), cache).logits  # every row, as it is
    got = apply(params, jnp.asarray(tok[np.asarray(order)][:, None]), take_rows(cache, order)).logits
    np.testing.assert_allclose(np.asarray(got), np.asarray(want)[np.asarray(order)], atol=1e-6)


def test_logits_to_keep_gives_last_positions():
    cfg = CONFIGS["rot_lt_head"]
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids, mask, _ = left_padded_batch(cfg.vocab_size, [5, 3], seed=10)
    model = GPTJForCausalLM(cfg)
    full = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    last = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask), logits_to_keep=1).logits
    assert last.shape == (2, 1, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, -1]), atol=1e-6)


def test_dropout_is_active_only_when_not_deterministic():
    cfg = CONFIGS["rot_lt_head"].replace(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 8)))
    model = GPTJForCausalLM(cfg)
    a = model.apply({"params": params}, ids).logits
    b = model.apply({"params": params}, ids, deterministic=True).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}).logits
    d = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)}).logits
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-3
    assert np.abs(np.asarray(c) - np.asarray(d)).max() > 1e-3
    # the same key gives the same mask
    e = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}).logits
    np.testing.assert_array_equal(np.asarray(c), np.asarray(e))


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_changes_nothing_numerically(policy):
    cfg = CONFIGS["rot_lt_head"]
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 8)))

    def loss(p, model):
        return model.apply({"params": p}, ids, labels=ids).loss

    l0, g0 = jax.value_and_grad(loss)(params, GPTJForCausalLM(cfg))
    l1, g1 = jax.value_and_grad(loss)(params, GPTJForCausalLM(cfg, remat_policy=policy))
    assert abs(float(l0) - float(l1)) <= 1e-6
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    with pytest.raises(ValueError, match="remat_policy"):
        GPTJForCausalLM(cfg, remat_policy="sometimes").apply({"params": params}, ids)


def test_every_param_has_logical_axes_of_its_rank():
    cfg = CONFIGS["gelu_five_heads"]
    for head in ("base", "causal_lm", "sequence_classification", "question_answering"):
        params = init_params(cfg, jax.random.PRNGKey(0), head)
        axes = logical_axes(cfg, head)
        flat_p = jax.tree_util.tree_leaves_with_path(params)
        flat_a = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
        assert len(flat_p) == len(flat_a)
        for path, leaf in flat_p:
            spec = flat_a[path]
            assert len(spec) == leaf.ndim, (path, spec, leaf.shape)
            assert all(name is not None for name in spec), (path, spec)
    axes = logical_axes(cfg)
    assert tuple(axes["transformer"]["h_0"]["attn"]["q_proj"]["kernel"]) == ("embed", "heads")
    assert tuple(axes["lm_head"]["kernel"]) == ("embed", "vocab")
    assert tuple(axes["transformer"]["wte"]["embedding"]) == ("vocab", "embed")


def test_init_params_shapes_and_count():
    cfg = CONFIGS["n_inner_silu_eps"]
    params = init_params(cfg, jax.random.PRNGKey(0))
    count = sum(x.size for x in jax.tree.leaves(params))
    assert count == cfg.num_params("causal_lm")
    assert params["transformer"]["h_1"]["mlp"]["fc_in"]["kernel"].shape == (cfg.n_embd, cfg.n_inner)
    std = float(np.std(np.asarray(params["transformer"]["h_0"]["attn"]["q_proj"]["kernel"])))
    assert abs(std - cfg.initializer_range) < 0.005

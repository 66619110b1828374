"""The optimizer is mesh-transformer-jax's chain: schedule, weight-decay mask, the whole update, and
gradient accumulation (k micro-batches of b == one batch of k*b)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptj_jax.config import GPTJConfig
from gptj_jax.train.config import load_train_config
from gptj_jax.train.optimizer import OptimizerConfig, mtj_optimizer, mtj_schedule, weight_decay_mask


def mtj_lr(step, warmup, anneal, lr, end_lr):
    """gpt3_schedule from mesh-transformer-jax util.py, in plain Python."""
    warmup_pct = min(max(step, 0), warmup) / warmup
    anneal_pct = min(max(step - warmup, 0), anneal) / anneal
    return warmup_pct * lr - (lr - end_lr) * (1 - math.cos(math.pi * anneal_pct)) / 2


@pytest.mark.parametrize("step", [0, 1, 1500, 2999, 3000, 3001, 50_000, 151_500, 302_999, 303_000, 350_000])
def test_schedule_matches_mtj_6b_recipe(step):
    # 6B_roto_256.json: warmup 3000, anneal 300000, lr 1.2e-4, end_lr 1.2e-5
    sched = mtj_schedule(3000, 300_000, 1.2e-4, 1.2e-5)
    expected = mtj_lr(step, 3000, 300_000, 1.2e-4, 1.2e-5)
    assert float(sched(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_schedule_shape():
    sched = mtj_schedule(10, 100, 1.0, 0.1)
    assert float(sched(0)) == 0.0  # mtj's first update has lr 0
    assert float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(60)) == pytest.approx(0.55)  # half way down the cosine: (1 + 0.1) / 2
    assert float(sched(110)) == pytest.approx(0.1)
    assert float(sched(10_000)) == pytest.approx(0.1)  # constant after annealing
    assert float(mtj_schedule(0, 100, 1.0, 0.1)(0)) == pytest.approx(1.0)  # no warmup: no division by zero


def test_weight_decay_mask_only_on_matrices():
    from gptj_jax.model import init_params

    cfg = GPTJConfig(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, rotary_dim=4)
    params = init_params(cfg, jax.random.PRNGKey(0))
    mask = weight_decay_mask(params)
    flat = {"/".join(str(k.key) for k in path): (leaf, m) for (path, leaf), m in
            zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(mask))}
    assert flat["transformer/wte/embedding"][1] and flat["lm_head/kernel"][1]
    assert flat["transformer/h_0/attn/q_proj/kernel"][1] and flat["transformer/h_0/mlp/fc_in/kernel"][1]
    assert not flat["lm_head/bias"][1] and not flat["transformer/h_0/mlp/fc_in/bias"][1]
    assert not flat["transformer/h_0/ln_1/scale"][1] and not flat["transformer/ln_f/bias"][1]
    for leaf, m in flat.values():
        assert m == (leaf.ndim >= 2)


def test_chain_matches_mtj_update_by_hand():
    """scale(1/k) -> clip 1.0 -> Adam -> + wd * p on >= 2-dim -> * -lr(step), checked over 4 steps."""
    rng = np.random.RandomState(0)
    params = {"w": rng.randn(4, 3).astype(np.float32), "b": rng.randn(3).astype(np.float32)}
    k, wd, b1, b2, eps = 2, 0.1, 0.9, 0.999, 1e-8
    sched = mtj_schedule(2, 5, 1e-2, 1e-3)
    opt = mtj_optimizer(lr_schedule=sched, weight_decay=wd, gradient_accumulation_steps=k)
    state = opt.init(params)
    p = {n: v.astype(np.float64) for n, v in params.items()}
    mu = {n: np.zeros_like(v) for n, v in p.items()}
    nu = {n: np.zeros_like(v) for n, v in p.items()}
    cur = dict(params)
    for t in range(4):
        grads = {n: (rng.randn(*v.shape) * (3.0 if t % 2 else 0.1)).astype(np.float32) for n, v in params.items()}
        updates, state = opt.update(grads, state, cur)
        cur = jax.tree.map(lambda a, u: np.asarray(a + u), cur, updates)
        g = {n: v.astype(np.float64) / k for n, v in grads.items()}
        norm = math.sqrt(sum((v**2).sum() for v in g.values()))
        g = {n: v * min(1.0, 1.0 / norm) for n, v in g.items()}
        lr = mtj_lr(t, 2, 5, 1e-2, 1e-3)
        for n in p:
            mu[n] = b1 * mu[n] + (1 - b1) * g[n]
            nu[n] = b2 * nu[n] + (1 - b2) * g[n] ** 2
            u = (mu[n] / (1 - b1 ** (t + 1))) / (np.sqrt(nu[n] / (1 - b2 ** (t + 1))) + eps)
            if p[n].ndim > 1:
                u = u + wd * p[n]
            p[n] = p[n] - lr * u
        for n in p:
            np.testing.assert_allclose(cur[n], p[n], rtol=1e-5, atol=1e-7)


def test_optimizer_config_from_train_config_builds_the_mtj_chain():
    """The training keys -> OptimizerConfig (defaults of anneal_steps / end_lr filled in, hashable: the loop's
    compile cache key) -> the same chain and schedule as mtj_optimizer / mtj_schedule, bit for bit."""
    cfg = load_train_config(None, ["train_set=x", "model_dir=y", "total_steps=100", "warmup_steps=10", "lr=1e-2",
                                   "weight_decay=0.1", "gradient_accumulation_steps=2", "adam_b2=0.95"])
    ocfg = OptimizerConfig.from_train_config(cfg)
    assert ocfg == OptimizerConfig(warmup_steps=10, anneal_steps=90, lr=1e-2, end_lr=1e-2, weight_decay=0.1,
                                   grad_accum=2, clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-8, param_dtype="float32")
    assert hash(ocfg) == hash(OptimizerConfig.from_train_config(cfg))
    opt, sched = ocfg.build()
    ref_sched = mtj_schedule(10, 90, 1e-2, 1e-2)
    ref = mtj_optimizer(lr_schedule=ref_sched, weight_decay=0.1, gradient_accumulation_steps=2, b2=0.95)
    rng = np.random.RandomState(0)
    params = {"w": rng.randn(4, 3).astype(np.float32), "b": rng.randn(3).astype(np.float32)}
    state, ref_state = opt.init(params), ref.init(params)
    for t in range(12):
        assert float(sched(t)) == float(ref_sched(t))
        grads = {n: rng.randn(*v.shape).astype(np.float32) for n, v in params.items()}
        updates, state = opt.update(grads, state, params)
        ref_updates, ref_state = ref.update(grads, ref_state, params)
        for n in params:
            np.testing.assert_array_equal(np.asarray(updates[n]), np.asarray(ref_updates[n]))


def _run_steps(k, make_opt, sched, tokens, steps):
    from gptj_jax import sharding as sh
    from gptj_jax.train import step as step_lib

    cfg = GPTJConfig(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
    mesh = sh.make_mesh()
    scfg = step_lib.StepConfig(cfg, "float32", grad_accum=k)
    opt = make_opt(k)
    shardings = step_lib.state_shardings(scfg, mesh, opt, jnp.float32)
    state = step_lib.init_state(sh.init_sharded_params(cfg, mesh, jax.random.PRNGKey(0)), opt, 0, shardings)
    fn = step_lib.make_train_step(scfg, mesh, opt, sched, shardings)
    out = []
    for s in range(steps):
        state, m = fn(state, tokens[s].reshape(k, tokens.shape[1] // k, tokens.shape[2]))
        out.append(((float(m["loss"]), float(m["grad_norm"])), jax.device_get(state["params"])))
    return out


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def test_grad_accumulation_equals_big_batch():
    """k=4 micro-batches of b=2 give the same summed-then-scaled gradient as one batch of 8 (<= 1e-6).

    Checked through the train step with a linear optimizer (the mtj chain's scale(1/k), then SGD with
    lr 1), so the parameter change *is* the mean gradient.
    """
    import optax

    tokens = np.random.RandomState(1).randint(0, 128, (1, 8, 17)).astype(np.uint16)
    make = lambda k: optax.chain(optax.scale(1.0 / k), optax.sgd(1.0))
    (m1, p1), = _run_steps(1, make, None, tokens, 1)
    (m4, p4), = _run_steps(4, make, None, tokens, 1)
    np.testing.assert_allclose(m1, m4, rtol=1e-6)
    assert _max_diff(p1, p4) <= 1e-6, _max_diff(p1, p4)


def test_grad_accumulation_with_mtj_chain():
    """The same with the full mtj chain over two steps: loss and grad norm to 1e-6; parameters to 1e-5
    (Adam divides float32 rounding of nearly cancelling gradients by their tiny second moment)."""
    tokens = np.random.RandomState(1).randint(0, 128, (2, 8, 17)).astype(np.uint16)
    sched = mtj_schedule(0, 10, 1e-3, 1e-4)
    make = lambda k: mtj_optimizer(lr_schedule=sched, weight_decay=0.1, gradient_accumulation_steps=k)
    r1 = _run_steps(1, make, sched, tokens, 2)
    r4 = _run_steps(4, make, sched, tokens, 2)
    for (m1, p1), (m4, p4) in zip(r1, r4):
        np.testing.assert_allclose(m1, m4, rtol=1e-6)
        assert _max_diff(p1, p4) <= 1e-5, _max_diff(p1, p4)

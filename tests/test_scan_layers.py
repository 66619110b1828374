"""``GPTJConfig.scan_layers``: the blocks under ``nn.scan`` with stacked params (``transformer/h/...``).

Logits equal the unrolled model, the train step and generation work, HF / mesh-transformer-jax / our
checkpoints round-trip bit-exactly through the stacked layout (``gptj_jax.load`` stacks after the
per-layer tables, the writers unstack before them), and on 8 simulated devices (this file run as a
script is the worker) results equal one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import hf_model, left_padded_batch, params_of
from convert_helpers import CONFIG as CONVERT_CONFIG
from convert_helpers import QUIET, assert_dirs_identical, same_bits

import gptj_jax
from gptj_jax import model as M
from gptj_jax.convert import table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = gptj_jax.GPTJConfig(vocab_size=101, n_positions=64, n_embd=32, n_layer=3, n_head=4, rotary_dim=4)
SCAN = CFG.replace(scan_layers=True)


def _params():
    return jax.tree.map(jnp.asarray, params_of(hf_model(CFG, scale=3.0)))


def _max_err(a, b) -> float:
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_stacked_layout_and_logical_axes():
    params = gptj_jax.init_params(SCAN, jax.random.PRNGKey(0))
    assert "h" in params["transformer"] and "h_0" not in params["transformer"]
    assert params["transformer"]["h"]["attn"]["q_proj"]["kernel"].shape == (3, 32, 32)
    assert params["transformer"]["h"]["mlp"]["fc_in"]["bias"].shape == (3, 128)
    axes = M.logical_axes(SCAN)["transformer"]["h"]
    assert tuple(axes["attn"]["q_proj"]["kernel"]) == ("layers", "embed", "heads")
    assert tuple(axes["ln_1"]["scale"]) == ("layers", "norm")
    from gptj_jax import sharding as sh

    assert sh.logical_to_mesh(("layers", "embed", "heads")) == jax.sharding.PartitionSpec(None, "fsdp", "mp")


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_logits_equal_unrolled(remat):
    params = _params()
    stacked = table.stack_layers(params)
    ids, mask, _ = left_padded_batch(CFG.vocab_size, [9, 5, 2])
    ref = M.GPTJForCausalLM(CFG).apply({"params": params}, ids, mask, output_hidden_states=True, output_attentions=True)
    out = M.GPTJForCausalLM(SCAN, remat_policy=remat).apply(
        {"params": stacked}, ids, mask, output_hidden_states=True, output_attentions=True
    )
    assert _max_err(out.logits, ref.logits) <= 1e-5
    assert len(out.hidden_states) == 4 and _max_err(out.hidden_states, ref.hidden_states) <= 1e-5
    assert len(out.attentions) == 3 and _max_err(out.attentions, ref.attentions) <= 1e-5
    assert float(np.abs(np.asarray(ref.logits)).max()) > 1.0  # not trivially equal


def test_stack_unstack_inverse_and_errors():
    params = _params()
    back = table.unstack_layers(table.stack_layers(params))
    assert list(table.flatten(back)) == list(table.flatten(params))
    assert all(same_bits(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
    broken = {**params, "transformer": {k: v for k, v in params["transformer"].items() if k != "h_1"}}
    with pytest.raises(gptj_jax.convert.CheckpointError, match=r"cannot stack layers \['h_0', 'h_2'\]"):
        table.stack_layers(broken)


def test_scanned_train_step_equals_unrolled():
    from gptj_jax import sharding as sh
    from gptj_jax.train import step as train_step

    params = params_of(hf_model(CFG, scale=3.0))  # host arrays: the step donates its state
    tokens = np.random.RandomState(2).randint(0, CFG.vocab_size, (1, 4, 13)).astype(np.int32)
    mesh = sh.make_mesh(devices=jax.devices()[:1])
    results = {}
    for cfg, p in ((CFG, params), (SCAN, table.stack_layers(params))):
        scfg = train_step.StepConfig(model=cfg, remat="dots")
        shardings = train_step.state_shardings(scfg, mesh, optax.sgd(0.1), jnp.float32)
        state = train_step.init_state(sh.shard_params(p, mesh, cfg), optax.sgd(0.1), 0, shardings)
        step = train_step.make_train_step(scfg, mesh, optax.sgd(0.1), optax.constant_schedule(0.1), shardings)
        state, metrics = step(state, tokens)
        results[cfg.scan_layers] = (jax.device_get(table.unstack_layers(state["params"])), float(metrics["loss"]))
    (p_ref, loss_ref), (p_scan, loss_scan) = results[False], results[True]
    assert abs(loss_ref - loss_scan) <= 1e-5
    assert _max_err(p_ref, params) > 1e-3  # the step moved the params
    assert _max_err(p_scan, p_ref) <= 1e-6


def test_scanned_generation_equals_unrolled():
    params = _params()
    ids, mask, _ = left_padded_batch(CFG.vocab_size, [7, 3])
    kw = dict(max_new_tokens=6, eos_token_id=[], return_logprobs=True)
    ref = gptj_jax.generate(CFG, params, ids, mask, **kw)
    out = gptj_jax.generate(SCAN, table.stack_layers(params), ids, mask, **kw)
    assert np.array_equal(np.asarray(out.sequences), np.asarray(ref.sequences))
    assert float(np.abs(np.asarray(out.logprobs) - np.asarray(ref.logprobs)).max()) <= 1e-5
    cache = gptj_jax.init_cache(SCAN, 2, 16)
    assert cache["layers"]["k"].shape == (3, 2, 4, 16, 8)
    with pytest.raises(ValueError, match=r"cache layers are a list of layers but the model \(scan_layers=True\) needs stacked"):
        M.GPTJForCausalLM(SCAN).apply({"params": table.stack_layers(params)}, ids, mask, cache=gptj_jax.init_cache(CFG, 2, 16))


def test_hf_mtj_ours_round_trip_bit_exact_through_stacked_layout(tmp_path):
    cfg = CONVERT_CONFIG
    scan = cfg.replace(scan_layers=True)
    hf_dir = str(tmp_path / "hf")
    hf_model(cfg).save_pretrained(hf_dir)
    # HF -> stacked -> HF
    _, stacked = gptj_jax.load(hf_dir, config=scan)
    assert stacked["transformer"]["h"]["attn"]["q_proj"]["kernel"].shape == (cfg.n_layer, cfg.n_embd, cfg.n_embd)
    gptj_jax.save_pretrained(str(tmp_path / "hf2"), scan, stacked)
    assert_dirs_identical(hf_dir, str(tmp_path / "hf2"))
    # ours (orbax) -> stacked -> ours
    gptj_jax.convert.save_flax(str(tmp_path / "ours"), scan, stacked)
    _, again = gptj_jax.load(str(tmp_path / "ours"), config=scan)
    assert all(same_bits(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(stacked)))
    # mtj -> stacked -> HF -> mtj
    gptj_jax.convert.convert(hf_dir, str(tmp_path / "mtj"), to="mtj", shards=2, **QUIET)
    _, from_mtj = gptj_jax.load(str(tmp_path / "mtj"), config=scan)
    assert all(same_bits(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(from_mtj), jax.tree.leaves(stacked)))
    gptj_jax.save_pretrained(str(tmp_path / "hf3"), scan, from_mtj)
    gptj_jax.convert.convert(str(tmp_path / "hf3"), str(tmp_path / "mtj2"), to="mtj", shards=2, **QUIET)
    for root, _, files in os.walk(tmp_path / "mtj"):
        for name in files:
            if name.endswith(".npz"):
                rel = os.path.relpath(os.path.join(root, name), tmp_path / "mtj")
                a, b = np.load(os.path.join(root, name)), np.load(os.path.join(tmp_path / "mtj2", rel))
                assert sorted(a.files) == sorted(b.files)
                assert all(same_bits(a[k], b[k]) for k in a.files), rel


def test_scan_layers_training_run_loads_converts_and_evaluates(tmp_path, capsys):
    """A `scan_layers: true` training run saves its params stacked (``transformer/h/...`` [n_layer, ...]):
    gptj_jax.load reads them per layer and stacked, `gptj-jax convert` writes an HF model from them, and
    `gptj-jax eval --scan-layers --attention xla` evaluates it scanned."""
    import torch
    import transformers

    from gptj_jax.cli import main
    from gptj_jax.train.config import load_train_config
    from gptj_jax.train.data import write_records
    from gptj_jax.train.loop import train

    rows = (np.random.RandomState(0).randint(0, 128, (16, 1)) + np.arange(17)[None, :]) % 128
    write_records(str(tmp_path / "data"), rows, num_bytes=16 * 17 * 3)
    run = str(tmp_path / "run")
    cfg = load_train_config(None, [
        "layers=2", "d_model=32", "n_heads=4", "n_vocab=128", "pe_rotary_dims=4", "n_positions=64", "seq=16",
        "dtype=float32", "progress=false", "scan_layers=true", "total_steps=2", "per_replica_batch=4", "lr=1e-2",
        f"train_set={tmp_path / 'data'}", f"model_dir={run}",
    ])
    trained = jax.device_get(train(cfg)["final_params"])
    assert trained["transformer"]["h"]["attn"]["q_proj"]["kernel"].shape == (2, 32, 32)  # stored as trained
    ids, mask, _ = left_padded_batch(128, [9, 4])
    config = gptj_jax.GPTJConfig.from_pretrained(run)
    ref = np.asarray(M.GPTJForCausalLM(config.replace(scan_layers=True)).apply({"params": trained}, ids, mask).logits)
    per_layer = table.unstack_layers(trained)

    cfg_u, unrolled = gptj_jax.load(run)
    assert not cfg_u.scan_layers and sorted(table.flatten(unrolled)) == sorted(table.flatten(per_layer))
    assert all(same_bits(np.asarray(a), b) for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(per_layer)))
    assert _max_err(M.GPTJForCausalLM(cfg_u).apply({"params": unrolled}, ids, mask).logits, ref) <= 1e-6

    cfg_s, stacked = gptj_jax.load(run, config=config.replace(scan_layers=True))
    assert stacked["transformer"]["h"]["mlp"]["fc_in"]["kernel"].shape == (2, 32, 128)
    assert all(same_bits(np.asarray(a), b) for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(trained)))
    assert _max_err(M.GPTJForCausalLM(cfg_s).apply({"params": stacked}, ids, mask).logits, ref) <= 1e-6

    assert main(["convert", run, str(tmp_path / "hf"), "--to", "hf"]) == 0
    _, from_hf = gptj_jax.load(str(tmp_path / "hf"))
    assert all(same_bits(np.asarray(a), b) for a, b in zip(jax.tree.leaves(from_hf), jax.tree.leaves(per_layer)))
    hf = transformers.GPTJForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        hf_logits = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert float(np.abs(hf_logits - ref)[mask.astype(bool)].max()) <= 1e-4

    # eval: the mean next-token cross entropy of the trained params over all 16 records, scanned or not
    logits = M.GPTJForCausalLM(config.replace(scan_layers=True)).apply({"params": trained}, rows[:, :16]).logits
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    want = -float(np.take_along_axis(np.asarray(logp), rows[:, 1:, None], axis=-1).mean())
    capsys.readouterr()
    printed = []
    for extra in ([], ["--scan-layers", "--attention", "xla"]):
        assert main(["eval", "--model", run, "--data", str(tmp_path / "data"), "--batch-size", "4", *extra]) == 0
        printed.append(capsys.readouterr().out)
        assert "(256 tokens)" in printed[-1]
        assert abs(float(printed[-1].split("loss ")[1].split()[0]) - want) <= 1e-4, (printed[-1], want)
    assert printed[0] == printed[1]
    assert main(["eval", "--model", run, "--data", str(tmp_path / "data"), "--scan-layers", "--attention", "splash"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attention='splash' needs a tpu backend but jax's backend is 'cpu'" in err[0], err


# ============================================================================ the 8-device worker
MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4)]
MESH_CFG = dict(vocab_size=256, n_positions=64, n_embd=128, n_layer=2, n_head=8, rotary_dim=4, scan_layers=True)


def mesh_worker() -> dict:
    jax.config.update("jax_num_cpu_devices", 8)
    from gptj_jax import sharding as sh
    from gptj_jax.train import step as train_step

    cfg = gptj_jax.GPTJConfig(**MESH_CFG)
    params = jax.device_get(gptj_jax.init_params(cfg, jax.random.PRNGKey(0)))
    rng = np.random.RandomState(1)
    B, T = 8, 12
    ids = rng.randint(0, cfg.vocab_size, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    for row, pad in enumerate([0, 2, 0, 4, 1, 0, 6, 3]):
        mask[row, :pad] = 0
    tokens = rng.randint(0, cfg.vocab_size, (1, B, T + 1)).astype(np.int32)
    module = M.GPTJForCausalLM(cfg)
    apply = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m).logits)

    def run(mesh):
        p = sh.shard_params(params, mesh, cfg) if mesh is not None else params
        logits = np.asarray(apply(p, ids, mask))
        gen = gptj_jax.generate(cfg, p, ids, mask, max_new_tokens=4, eos_token_id=[], return_logprobs=True, mesh=mesh)
        m = mesh or sh.make_mesh(devices=jax.devices()[:1])
        scfg = train_step.StepConfig(model=cfg, remat="full")
        shardings = train_step.state_shardings(scfg, m, optax.sgd(0.1), jnp.float32)
        state = train_step.init_state(sh.shard_params(params, m, cfg), optax.sgd(0.1), 0, shardings)
        step = train_step.make_train_step(scfg, m, optax.sgd(0.1), optax.constant_schedule(0.1), shardings)
        state, metrics = step(state, tokens)
        return logits, np.asarray(gen.sequences), np.asarray(gen.logprobs), jax.device_get(state["params"]), float(metrics["loss"])

    ref = run(None)
    out = {}
    for shape in MESHES:
        got = run(sh.make_mesh(*shape))
        out["x".join(map(str, shape))] = {
            "logits_err": float(np.abs(got[0] - ref[0]).max()),
            "tokens_equal": bool(np.array_equal(got[1], ref[1])),
            "logprob_err": float(np.abs(got[2] - ref[2]).max()),
            "train_param_err": _max_err(got[3], ref[3]),
            "train_moved": _max_err(got[3], params),
            "loss_err": abs(got[4] - ref[4]),
        }
    return out


@pytest.fixture(scope="module")
def mesh_results() -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.path.join(REPO, "tests"), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "mesh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=["dp%d-fsdp%d-mp%d" % m for m in MESHES])
def test_scanned_on_8_devices_equals_one_device(mesh_results, shape):
    r = mesh_results["x".join(map(str, shape))]
    assert r["logits_err"] <= 1e-5, r
    assert r["tokens_equal"] and r["logprob_err"] <= 1e-5, r
    assert r["train_moved"] > 1e-3 and r["train_param_err"] <= 1e-6 and r["loss_err"] <= 1e-5, r


if __name__ == "__main__" and sys.argv[1:] == ["mesh"]:
    print(json.dumps(mesh_worker()))

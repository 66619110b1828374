"""LoRA / QLoRA fine-tuning (``gptj-jax train`` with ``lora_rank``), PEFT export (``convert --to peft``), merged
export (``--to hf --merge-lora``), ``load(base, adapter=...)``, exact resume after kill -9, and bad input."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptj_jax
from gptj_jax import lora
from gptj_jax.convert import table
from gptj_jax.train.config import TrainConfigError, load_train_config
from gptj_jax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train_loop import TINY, read_metrics, synthetic_data  # noqa: E402

BASE_CFG = gptj_jax.GPTJConfig(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)


def _hash_dir(path: str) -> str:
    h = hashlib.sha256()
    for f in sorted(glob.glob(os.path.join(path, "*"))):
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random-init base (HF directory), learnable synthetic data, and LoRA / QLoRA runs of 8 steps on it."""
    tmp = tmp_path_factory.mktemp("lora")
    base = str(tmp / "base")
    gptj_jax.save_pretrained(base, BASE_CFG, gptj_jax.init_params(BASE_CFG, jax.random.PRNGKey(3)))
    data = synthetic_data(str(tmp / "data"))
    base_hash = _hash_dir(base)
    runs = {}
    for name, extra in (("lora", []), ("qlora", ["lora_base_quantize=int8"])):
        cfg = _cfg(tmp / name, data, base, "total_steps=8", *extra)
        runs[name] = (cfg, train(cfg))
    return {"tmp": tmp, "base": base, "data": data, "runs": runs, "base_hash": base_hash}


def _cfg(run_root, data, base, *overrides):
    return load_train_config(None, TINY + [
        f"train_set={data}", f"model_dir={run_root}/run", "per_replica_batch=4", "lr=1e-2", f"model={base}",
        "lora_rank=4", "lora_alpha=8", "ckpt_every=4", *overrides,
    ])


def _ours(config, params, adapters, spec, ids):
    model = gptj_jax.GPTJForCausalLM(config)
    with lora.lora_context(adapters, spec):
        return np.asarray(model.apply({"params": params}, ids).logits)


IDS = np.array([[5, 17, 99, 3, 64, 1, 0, 127, 42, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


# ---------------------------------------------------------------------------------------- training
def test_lora_on_demo_corpus_lowers_validation_loss(tmp_path):
    """A demo-size random-init base (configs/demo-tiny.yaml's model) fine-tuned with LoRA r=8 on the demo
    fables: the validation loss falls; only the adapters trained (the base is unchanged on disk and in memory)."""
    from gptj_jax.train.data import prepare

    files = sorted(glob.glob(os.path.join(ROOT, "data", "demo", "train", "*.txt")))
    val_files = sorted(glob.glob(os.path.join(ROOT, "data", "demo", "val", "*.txt")))
    prepare(files[:2], str(tmp_path / "train"), seq=32, workers=1, progress=False)
    prepare(val_files[:1], str(tmp_path / "val"), seq=32, workers=1, progress=False)
    config = gptj_jax.GPTJConfig.preset("gptj-tiny")
    base_params = gptj_jax.init_params(config, jax.random.PRNGKey(0))
    gptj_jax.save_pretrained(str(tmp_path / "base"), config, base_params)
    cfg = load_train_config(os.path.join(ROOT, "configs", "demo-tiny.yaml"), [
        f"train_set={tmp_path / 'train'}", f"val_set.fables={tmp_path / 'val'}", f"model_dir={tmp_path / 'run'}",
        "seq=32", "per_replica_batch=8", "total_steps=24", "warmup_steps=0", "lr=1e-2", "ckpt_every=100",
        "val_every=4", "val_batches=2", "progress=false", "peak_flops=1e11", f"model={tmp_path / 'base'}",
        "lora_rank=8", "lora_alpha=16",
    ])
    summary = train(cfg)
    vals = [r["val_fables_loss"] for r in read_metrics(cfg.model_dir) if "val_fables_loss" in r]
    print("val losses", vals)
    # blocks only (embedding and head frozen at random): a steady fall, every evaluation below the previous one
    assert len(vals) == 6 and all(b < a for a, b in zip(vals, vals[1:])) and vals[-1] < vals[0] - 0.15, vals
    base_after = jax.device_get(summary["base_params"])
    for p, x in table.flatten(base_params).items():
        assert np.array_equal(np.asarray(x), np.asarray(table.flatten(base_after)[p])), p
    adapters = table.flatten(jax.device_get(summary["final_params"]))
    assert len(adapters) == 2 * 6 * config.n_layer and all(p.endswith(("/lora_a", "/lora_b")) for p in adapters)
    assert all(np.abs(x).max() > 0 for p, x in adapters.items() if p.endswith("/lora_b"))  # trained from zeros


def test_only_adapters_train_and_the_base_stays_bit_identical(setup):
    for name, (cfg, summary) in setup["runs"].items():
        rows = [r["loss"] for r in read_metrics(cfg.model_dir) if "loss" in r]
        assert rows[-1] < rows[0], (name, rows)
        state = jax.device_get(summary["final_params"])
        assert set(table.flatten(state)) == {f"{p}/{w}" for p in lora.make_spec(BASE_CFG, 4, 8).paths
                                             for w in ("lora_a", "lora_b")}
        # the checkpoint holds the adapters only, plus lora.json naming the base
        info = json.load(open(os.path.join(cfg.model_dir, "lora.json")))
        assert info["base"] == setup["base"] and info["rank"] == 4 and info["alpha"] == 8.0
        assert sorted(os.listdir(os.path.join(cfg.model_dir, "8", "params"))) and not os.path.exists(
            os.path.join(cfg.model_dir, "8", "params", "transformer", "wte"))
    _, lora_summary = setup["runs"]["lora"]
    _, base = gptj_jax.load(setup["base"], dtype="float32")
    for p, x in table.flatten(base).items():
        assert np.array_equal(np.asarray(x), np.asarray(table.flatten(lora_summary["base_params"])[p])), p
    assert _hash_dir(setup["base"]) == setup["base_hash"]
    from gptj_jax.quantize import is_quantized_leaf

    qbase = table.flatten(setup["runs"]["qlora"][1]["base_params"])
    assert is_quantized_leaf(qbase["transformer/h_0/mlp/fc_in/kernel"])


def test_optimizer_state_is_under_2_percent_of_full_fine_tuning_on_162m():
    from gptj_jax.train.optimizer import OptimizerConfig

    config = gptj_jax.GPTJConfig.preset("gptj-162m")
    cfg = load_train_config(None, ["train_set=x", "model_dir=y", "total_steps=10", "model_config=gptj-162m",
                                   "lora_rank=8", "model=z"])
    optimizer, _ = OptimizerConfig.from_train_config(cfg).build()
    params = jax.eval_shape(lambda: gptj_jax.init_params(config, jax.random.PRNGKey(0)))
    adapters = lora.adapter_shapes(config, lora.make_spec(config, 8, 16))

    def nbytes(tree):
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

    full, small = nbytes(jax.eval_shape(optimizer.init, params)), nbytes(jax.eval_shape(optimizer.init, adapters))
    print(f"162M optimizer state: full {full / 2**20:.1f} MiB, LoRA r=8 {small / 2**20:.2f} MiB ({small / full:.2%})")
    assert small <= 0.02 * full, (small, full)


# ---------------------------------------------------------------------------------------- export
def test_peft_export_loads_in_peft_and_matches_ours(setup, tmp_path):
    import peft
    import torch
    import transformers

    from gptj_jax.cli import main

    cfg, summary = setup["runs"]["lora"]
    out = str(tmp_path / "peft")
    assert main(["convert", cfg.model_dir, out, "--to", "peft", "--quiet"]) == 0
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    hf = transformers.GPTJForCausalLM.from_pretrained(setup["base"], torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(IDS)).logits.numpy()
    config, base = gptj_jax.load(setup["base"], dtype="float32")
    adapters, spec, _, _ = lora.run_adapters(cfg.model_dir)
    ours = _ours(config, base, adapters, spec, IDS)
    assert np.abs(ours - _ours(config, base, jax.tree.map(np.zeros_like, adapters), spec, IDS)).max() > 1e-3
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # load(base, adapter=PEFT dir) merges it: the same logits
    config, merged = gptj_jax.load(setup["base"], dtype="float32", adapter=out)
    logits = np.asarray(gptj_jax.GPTJForCausalLM(config).apply({"params": merged}, IDS).logits)
    np.testing.assert_allclose(logits, ours, atol=1e-4, rtol=0)


def test_merged_hf_export_equals_base_plus_adapter(setup, tmp_path):
    import torch
    import transformers

    from gptj_jax.cli import main

    cfg, _ = setup["runs"]["lora"]
    out = str(tmp_path / "merged")
    assert main(["convert", cfg.model_dir, out, "--to", "hf", "--merge-lora", "--quiet"]) == 0
    hf = transformers.GPTJForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(IDS)).logits.numpy()
    config, base = gptj_jax.load(setup["base"], dtype="float32")
    adapters, spec, _, _ = lora.run_adapters(cfg.model_dir)
    np.testing.assert_allclose(theirs, _ours(config, base, adapters, spec, IDS), atol=1e-4, rtol=0)


def test_qlora_merge_must_say_how(setup, tmp_path, capsys):
    from gptj_jax.cli import main

    cfg, _ = setup["runs"]["qlora"]
    out = str(tmp_path / "merged")
    assert main(["convert", cfg.model_dir, out, "--to", "hf", "--merge-lora"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gptj-jax convert: error: LoraError:" in err[0], err
    assert "int8-quantized base" in err[0] and "--merge-into float" in err[0] and "--merge-into dequantized" in err[0]
    assert not os.path.exists(out)
    # said: merged into the dequantized int8 base it trained against, equal to our QLoRA forward
    assert main(["convert", cfg.model_dir, out, "--to", "hf", "--merge-lora", "--merge-into", "dequantized",
                 "--quiet"]) == 0
    from gptj_jax.quantize import dequantize

    config, merged = gptj_jax.load(out, dtype="float32")
    adapters, spec, _, _ = lora.run_adapters(cfg.model_dir)
    qbase = jax.tree.map(lambda x: x.astype(jnp.float32), dequantize(setup["runs"]["qlora"][1]["base_params"]))
    got = np.asarray(gptj_jax.GPTJForCausalLM(config).apply({"params": merged}, IDS).logits)
    np.testing.assert_allclose(got, _ours(config, qbase, adapters, spec, IDS), atol=1e-4, rtol=0)
    with pytest.raises(lora.LoraError, match="merging an adapter into an int8-quantized base is not done silently"):
        gptj_jax.load(setup["base"], adapter=cfg.model_dir, quantize="int8")


# ---------------------------------------------------------------------------------------- resume
_SCRIPT = """
import json, sys
from gptj_jax.train.config import load_train_config
from gptj_jax.train.loop import train
train(load_train_config(None, json.loads(sys.argv[1])))
"""


def test_resume_after_kill_9_is_bit_exact(setup, tmp_path):
    """A LoRA run (with LoRA dropout) killed with SIGKILL after a checkpoint, resumed by the same command, ends
    bit-identical to an uninterrupted run of the same length."""
    common = ["lora_dropout=0.1", "ckpt_every=2", "shuffle=true", "seed=5", "gradient_accumulation_steps=2",
              "async_checkpointing=true"]
    killed = _cfg(tmp_path / "killed", setup["data"], setup["base"], "total_steps=400", *common)
    argv = [a for a in TINY] + [f"train_set={setup['data']}", f"model_dir={killed.model_dir}", "per_replica_batch=4",
                                "lr=1e-2", f"model={setup['base']}", "lora_rank=4", "lora_alpha=8", "total_steps=400",
                                *common]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, json.dumps(argv)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not os.path.isdir(os.path.join(killed.model_dir, "4")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    steps = sorted(int(n) for n in os.listdir(killed.model_dir) if n.isdigit())
    k = steps[-1]
    resumed = train(_cfg(tmp_path / "killed", setup["data"], setup["base"], f"total_steps={k + 3}", *common))
    assert resumed["start_step"] == k and resumed["step"] == k + 3
    full = train(_cfg(tmp_path / "full", setup["data"], setup["base"], f"total_steps={k + 3}", *common))
    a, b = table.flatten(jax.device_get(full["final_params"])), table.flatten(jax.device_get(resumed["final_params"]))
    assert sorted(a) == sorted(b)
    for p in a:
        assert np.array_equal(a[p], b[p]), p


# ---------------------------------------------------------------------------------------- bad input
def test_bad_lora_settings_are_one_clear_error(setup, tmp_path):
    with pytest.raises(TrainConfigError, match=r"lora_targets 'nothing/.*' matches no kernel of the model; kernel "
                                               r"paths look like transformer/h_0/attn/q_proj/kernel"):
        train(_cfg(tmp_path / "a", setup["data"], setup["base"], "total_steps=2", "lora_targets=nothing/.*"))
    with pytest.raises(TrainConfigError, match=r"lora_rank 64 is larger than a dimension of "
                                               r"transformer/h_0/attn/q_proj/kernel \[32, 32\] \(in, out\)"):
        train(_cfg(tmp_path / "b", setup["data"], setup["base"], "total_steps=2", "lora_rank=64"))
    with pytest.raises(TrainConfigError, match="key 'lora_rank' needs key 'model'"):
        load_train_config(None, TINY + ["train_set=x", "model_dir=y", "total_steps=1", "lora_rank=4"])
    with pytest.raises(TrainConfigError, match="key 'lora_base_quantize' must be null or 'int8', got 'int4'"):
        _cfg(tmp_path / "c", setup["data"], setup["base"], "total_steps=2", "lora_base_quantize=int4")


def test_adapter_for_another_base_names_the_shapes(setup, tmp_path):
    from gptj_jax.cli import main

    cfg, _ = setup["runs"]["lora"]
    out = str(tmp_path / "peft")
    assert main(["convert", cfg.model_dir, out, "--to", "peft", "--quiet"]) == 0
    other = BASE_CFG.replace(n_embd=64, n_head=4)
    gptj_jax.save_pretrained(str(tmp_path / "other"), other, gptj_jax.init_params(other, jax.random.PRNGKey(0)))
    with pytest.raises(lora.LoraError, match=r"adapter for transformer/h_0/attn/q_proj/kernel has lora_a \[32, 4\] and "
                                             r"lora_b \[4, 32\] but the base kernel is \[64, 64\] \(in, out\)"):
        gptj_jax.load(str(tmp_path / "other"), adapter=out)
    with pytest.raises(lora.LoraError, match="not a PEFT adapter directory|neither a PEFT adapter"):
        gptj_jax.load(setup["base"], adapter=setup["base"])


_MESH_SCRIPT = """
import json, sys
import jax, numpy as np
from gptj_jax.train.config import load_train_config
from gptj_jax.train.loop import train
s = train(load_train_config(None, json.loads(sys.argv[1])))
flat = {}
def walk(d, p=""):
    for k, v in d.items():
        walk(v, p + k + "/") if isinstance(v, dict) else flat.__setitem__(p + k, np.asarray(v).tolist())
walk(jax.device_get(s["final_params"]))
print(json.dumps({"loss": s["loss"], "adapters": flat}))
"""


def test_qlora_on_a_4_device_mesh_matches_one_device(setup, tmp_path):
    """QLoRA with the int8 base split over mp=4 (kernels and their scales sharded, adapters replicated) trains
    the same adapters as one device (float32; only reduction order differs)."""
    results = []
    for devices, mesh in ((1, []), (4, ["mesh=mp=4"])):
        argv = TINY + [f"train_set={setup['data']}", f"model_dir={tmp_path / str(devices)}", "per_replica_batch=4",
                       "lr=1e-2", f"model={setup['base']}", "lora_rank=4", "lora_alpha=8", "total_steps=4",
                       "shuffle=false", "lora_base_quantize=int8", *mesh]
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, json.dumps(argv)], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    one, four = results
    assert abs(one["loss"] - four["loss"]) < 1e-5, (one["loss"], four["loss"])
    assert sorted(one["adapters"]) == sorted(four["adapters"])
    for p in one["adapters"]:
        np.testing.assert_allclose(np.array(four["adapters"][p]), np.array(one["adapters"][p]), atol=1e-5, rtol=0)
    assert any(np.abs(np.array(v)).max() > 0 for p, v in one["adapters"].items() if p.endswith("lora_b"))


_SHARDING_SCRIPT = """
import json, sys
import jax, numpy as np
from gptj_jax.convert import table
from gptj_jax.train.config import load_train_config
from gptj_jax.train.loop import train
s = train(load_train_config(None, json.loads(sys.argv[1])))
def info(x):
    return {"value": np.asarray(jax.device_get(x)).tolist(), "replicated": x.sharding.is_fully_replicated,
            "shard": list(x.sharding.shard_shape(x.shape))}
adapters = {p: info(x) for p, x in table.flatten(s["final_params"]).items()}
base = {p: info(x) for p, x in table.flatten(s["base_params"]).items() if p + "/lora_a" in adapters}
for v in base.values():
    del v["value"]
print(json.dumps({"loss": s["loss"], "adapters": adapters, "base": base}))
"""


def test_lora_adapters_shard_like_their_base_on_an_8_device_mesh(setup, tmp_path):
    """On fsdp=2 x mp=4 every adapter is split like its base kernel (lora_a [in, r] along the kernel's input axis,
    lora_b [r, out] along its output axis, the rank unsplit), not replicated; training gives the adapters of one
    device (the same 4 rows per step: per_replica_batch x dp x fsdp) up to reduction order: the gradients are summed
    over fsdp's halves of the batch and the adapters' partial products across devices, and Adam divides a near-zero
    gradient by its own size, so an element can move by a fraction of one step (lr 1e-2) more or less."""
    results = []
    for devices, extra in ((1, ["per_replica_batch=4"]), (8, ["per_replica_batch=2", "mesh=dp=1,fsdp=2,mp=4"])):
        argv = TINY + [f"train_set={setup['data']}", f"model_dir={tmp_path / str(devices)}", "lr=1e-2",
                       f"model={setup['base']}", "lora_rank=4", "lora_alpha=8", "total_steps=4", "shuffle=false", *extra]
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        proc = subprocess.run([sys.executable, "-c", _SHARDING_SCRIPT, json.dumps(argv)], capture_output=True,
                              text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    one, eight = results
    assert len(eight["base"]) == 2 * 6  # 2 blocks x q/k/v/out_proj, fc_in, fc_out
    for kernel, b in eight["base"].items():
        assert not b["replicated"], kernel  # every target kernel is split over fsdp and mp
        a, bb = eight["adapters"][kernel + "/lora_a"], eight["adapters"][kernel + "/lora_b"]
        assert not a["replicated"] and not bb["replicated"], kernel
        assert a["shard"] == [b["shard"][0], 4] and bb["shard"] == [4, b["shard"][1]], (kernel, a["shard"], bb["shard"],
                                                                                        b["shard"])
    assert eight["adapters"]["transformer/h_0/attn/q_proj/kernel/lora_a"]["shard"] == [16, 4]  # 32 / fsdp 2
    assert eight["adapters"]["transformer/h_0/attn/q_proj/kernel/lora_b"]["shard"] == [4, 8]  # 32 / mp 4
    assert eight["adapters"]["transformer/h_0/mlp/fc_out/kernel/lora_a"]["shard"] == [32, 4]  # 128 / mp 4
    assert all(v["replicated"] for v in one["adapters"].values())
    assert abs(one["loss"] - eight["loss"]) < 1e-5, (one["loss"], eight["loss"])
    assert sorted(one["adapters"]) == sorted(eight["adapters"])
    for p in one["adapters"]:
        np.testing.assert_allclose(np.array(eight["adapters"][p]["value"]), np.array(one["adapters"][p]["value"]),
                                   atol=1e-4, rtol=0)
    assert any(np.abs(np.array(v["value"])).max() > 0 for p, v in one["adapters"].items() if p.endswith("lora_b"))


def test_qlora_on_a_bfloat16_base_trains(setup, tmp_path):
    """lora_base_quantize=int8 with lora_base_dtype=bfloat16 (docs/colab-tpu.md's QLoRA): the int8 leaves of the
    loaded base dequantize to bfloat16, and the step's base shardings must say so (they said float32: a pytree
    metadata mismatch before the first step)."""
    from gptj_jax.quantize import is_quantized_leaf

    cfg = _cfg(tmp_path, setup["data"], setup["base"], "total_steps=2", "lora_base_quantize=int8",
               "lora_base_dtype=bfloat16")
    summary = train(cfg)
    kernel = table.flatten(summary["base_params"])["transformer/h_0/mlp/fc_in/kernel"]
    assert is_quantized_leaf(kernel) and kernel.dtype == jnp.bfloat16 and kernel.q.dtype == jnp.int8
    losses = [r["loss"] for r in read_metrics(cfg.model_dir) if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses)), losses

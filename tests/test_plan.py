"""``gptj-jax plan``: AOT-compiled per-device memory agrees with the analytic counts; errors are one line.

The planning runs happen in subprocesses (``python -m gptj_jax.cli plan ...``): the verb simulates
as many CPU devices as the mesh has, which must happen before JAX starts. Bad input is checked
in-process through ``cli.main``, which fails before any device is touched.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {"model_type": "gptj", "vocab_size": 256, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 8,
          "rotary_dim": 4}
MESH = "dp=1,fsdp=2,mp=4"
B, S = 8, 32


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("plan") / "config.json"
    path.write_text(json.dumps(CONFIG))
    return str(path)


def _plan(config_file: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "gptj_jax.cli", "plan", "--config", config_file, "--mesh", MESH,
         "--batch", str(B), "--seq", str(S), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )


def _json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _expected_param_bytes_per_device(itemsize: int, fsdp: int = 2, mp: int = 4) -> int:
    d, v, f, L = CONFIG["n_embd"], CONFIG["vocab_size"], 4 * CONFIG["n_embd"], CONFIG["n_layer"]
    split = (v * d + L * (4 * d * d + 2 * d * f) + d * v) // (fsdp * mp)  # every matrix: fsdp x mp
    vectors = L * (f // mp + d // fsdp + 2 * d) + 2 * d + v // mp  # fc_in / fc_out bias, ln_1, ln_f, lm_head bias
    return (split + vectors) * itemsize


@pytest.mark.slow
def test_inference_plan_matches_analytic_counts(config_file):
    plan = _json(_plan(config_file, "--dtype", "float32", "--json"))
    assert plan["mesh"] == {"dp": 1, "fsdp": 2, "mp": 4} and plan["devices"] == 8
    a = plan["analytic"]
    assert a["params"] == _expected_param_bytes_per_device(4)
    # k and v: [B / (dp*fsdp), n_head / mp, S, head_dim] per layer; mask [B/2, S] bool, lengths [B/2], index [B/2]
    kv = 2 * CONFIG["n_layer"] * (B // 2) * S * (CONFIG["n_head"] // 4) * 8 * 4
    assert a["kv_cache"] == kv + (B // 2) * S + (B // 2) * 4 + (B // 2) * 4  # index: per row now (was [] = 4)
    prefill, decode = plan["steps"]
    assert (prefill["name"], decode["name"]) == ("prefill", "decode")
    # The compiled arguments are params + cache + this device's slice of the batch and the cache
    # bookkeeping (mask, lengths, index): within a few KiB of the analytic state.
    state = a["params"] + a["kv_cache"]
    assert 0 <= prefill["argument"] - state <= 8 * 1024, (prefill["argument"], state)
    assert prefill["alias"] == a["kv_cache"] or prefill["alias"] >= 0.99 * a["kv_cache"]  # the donated cache
    assert plan["peak"] == max(prefill["peak"], decode["peak"]) > state
    compiled_flops = (prefill["flops_per_device"] + decode["flops_per_device"]) * 8
    assert 0.7 < compiled_flops / plan["flops_analytic"] < 1.4, (compiled_flops, plan["flops_analytic"])
    assert [r["hardware"] for r in plan["fits"]][:2] == ["TPU v2-8", "TPU v3-8"]
    assert all(r["verdict"] == r["verdict_analytic"] == "fits" for r in plan["fits"])  # a tiny model fits everywhere
    assert plan["analytic_peak"] == sum(a.values())
    v48 = next(r for r in plan["fits"] if r["hardware"] == "TPU v4-8")  # 4 devices: need scaled by 8 / 4
    assert v48["scaled"] and v48["need"] == 2 * plan["peak"]


def test_scan_layers_and_attention_flags_reach_the_compiled_steps(config_file):
    """``plan --scan-layers --attention xla``: the same state, compiled with the blocks under nn.scan; the
    note names the attention each step uses."""
    unrolled = _json(_plan(config_file, "--dtype", "float32", "--json"))
    scanned = _json(_plan(config_file, "--dtype", "float32", "--json", "--scan-layers", "--attention", "xla"))
    assert scanned["analytic"] == unrolled["analytic"]
    for a, b in zip(scanned["steps"], unrolled["steps"]):
        assert a["argument"] == b["argument"] and not a["error"]  # stacked params: the same bytes
    assert scanned["notes"][-1] == ("attention xla: xla for the 32-token prefill, xla for single-token decode; "
                                    "blocks under nn.scan (scan_layers)")
    assert unrolled["notes"][-1] == "attention auto: xla for the 32-token prefill, xla for single-token decode"


@pytest.mark.slow
def test_compile_for_v5e_1_attention_splash_train_step(tmp_path):
    """``plan --compile-for v5e-1 --train --attention splash``: the splash kernel compiles into the training
    step (head dim 128, 2048 tokens) and needs fewer temporaries than the einsum path's ``[B, H, S, S]``
    float32 scores. Two deviceless XLA:TPU compiles of a 2-layer model (about 1.5 min each on a loaded CPU)."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "gptj", "vocab_size": 512, "n_positions": 2048, "n_embd": 256,
                                  "n_layer": 2, "n_head": 2, "rotary_dim": 64}))
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    plans = {}
    for attention in ("splash", "xla"):
        proc = subprocess.run(
            [sys.executable, "-m", "gptj_jax.cli", "plan", "--config", str(config), "--compile-for", "v5e-1", "--train",
             "--batch", "1", "--seq", "2048", "--attention", attention, "--json"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
        )
        plans[attention] = _json(proc)
    (splash,), (xla,) = plans["splash"]["steps"], plans["xla"]["steps"]
    assert not splash["error"] and not xla["error"]
    assert plans["splash"]["notes"][-1] == "attention splash: splash for the 2048-token training step"
    assert splash["argument"] == xla["argument"]
    assert splash["temp"] < 0.8 * xla["temp"], (splash["temp"], xla["temp"])  # measured 8.39 vs 11.31 MB


@pytest.mark.slow
def test_train_plan_counts_optimizer_state_and_gradients(config_file):
    plan = _json(_plan(config_file, "--train", "--json"))
    a = plan["analytic"]
    assert plan["param_dtype"] == "float32" and plan["dtype"] == "bfloat16"
    assert a["params"] == _expected_param_bytes_per_device(4)
    assert a["grads"] == a["params"]  # float32 gradients, split like the params
    # Adam's mu and nu mirror the params (plus a few scalars: counts).
    assert 2 * a["params"] <= a["opt_state"] <= 2 * a["params"] + 64
    (train,) = plan["steps"]
    state = a["params"] + a["opt_state"]
    assert 0 <= train["argument"] - state <= 8 * 1024  # + step, rng and the token batch
    assert train["alias"] >= 0.99 * state  # the train state is donated
    compiled_flops = train["flops_per_device"] * 8
    assert 0.7 < compiled_flops / plan["flops_analytic"] < 1.6, (compiled_flops, plan["flops_analytic"])


@pytest.mark.slow
def test_markdown_report(config_file):
    proc = _plan(config_file)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    for text in ("### Per-device memory, analytic", "| kv_cache |", "| prefill |", "### FLOPs per step",
                 "| TPU v2-8 | 8 | 8.00 GiB |", "| TPU v4-8 | 4 |", "| 8x H100 80GB |", "Cross-check"):
        assert text in out, text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mesh", "dp=1,tp=8"], "unknown mesh axis 'tp' in 'dp=1,tp=8'; the axes are dp, fsdp, mp"),
        (["--mesh", "dp=-1,mp=2"], "plan needs every axis size (no -1)"),
        (["--mesh", "mp=16"], "mesh axis mp=16 does not divide n_head=8"),
        (["--mesh", "dp=4,mp=2", "--batch", "6"], "batch size 6 does not split over the batch axes dp=4 x fsdp=1 = 4"),
        (["--mesh", "mp=2", "--seq", "65"], "--seq 65 exceeds the model's n_positions=64"),
        (["--attention", "splash"], "attention='splash' needs a tpu backend but jax's backend is 'cpu'"),
        (["--attention", "cudnn", "--train"], "attention='cudnn' needs a gpu/cuda/rocm backend but jax's backend is 'cpu'"),
    ],
)
def test_bad_input_is_one_line_error(config_file, capsys, argv, message):
    from gptj_jax import cli

    with pytest.MonkeyPatch.context() as mp:
        # Keep the in-process JAX on its single device: the errors come before any simulation.
        mp.setattr("gptj_jax.plan.simulated_devices", _no_simulation)
        code = cli.main(["plan", "--config", config_file, "--seq", "32", *argv])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err, err
    assert len(err.strip().splitlines()) == 1


def _no_simulation(n: int) -> list:
    import jax

    devices = jax.devices()
    if len(devices) < n:
        raise ValueError(f"--seq check should have failed first (asked for {n} devices)")
    return devices[:n]


def test_simulation_refuses_a_started_backend_with_too_few_devices():
    import jax

    from gptj_jax.plan import simulated_devices

    n = len(jax.devices()) + 7
    with pytest.raises(RuntimeError, match=rf"the mesh needs {n} devices but JAX already started with"):
        simulated_devices(n)


# ---------------------------------------------------------------------------------------- hardware x mode
# The hardware table's per-device figures, copied from the vendors' data sheets (sources in plan.py):
# (devices, memory GiB, bf16 TFLOP/s, int8 TOP/s, bandwidth GB/s).
NEW_ROWS = {
    "TPU v5e-1": (1, 16, 197, 393, 819),
    "TPU v5e-4": (4, 16, 197, 393, 819),
    "TPU v5e-8": (8, 16, 197, 393, 819),
    "TPU v6e-1": (1, 32, 918, 1836, 1638),
    "TPU v6e-8": (8, 32, 918, 1836, 1638),
    "TPU v5p-8": (4, 95, 459, 918, 2765),
    "T4 16GB": (1, 16, 65, 130, 320),
    "L4 24GB": (1, 24, 121, 242, 300),
    "A10G 24GB": (1, 24, 125, 250, 600),
    "A100 40GB": (1, 40, 312, 624, 1555),
    "A100 80GB": (1, 80, 312, 624, 2039),
    "H100 80GB": (1, 80, 989, 1979, 3350),
    "H200 141GB": (1, 141, 989, 1979, 4800),
}
# GPT-J-6B: d 4096, f 16384, 28 layers, vocab 50400. Params: embedding, per block q/k/v/out (no bias), fc_in and
# fc_out (with bias), ln_1 (scale, bias); ln_f; lm_head with bias: 6,050,882,784.
D6, F6, L6, V6 = 4096, 16384, 28, 50400
N6 = V6 * D6 + L6 * (4 * D6 * D6 + 2 * D6 * F6 + F6 + D6 + 2 * D6) + 2 * D6 + D6 * V6 + V6
GIB = 1024**3


def _modes(*extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "gptj_jax.cli", "plan", "--config", "gptj-6b", "--modes", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_hardware_rows_match_the_table():
    table = _json(_modes("--json"))
    rows = {r["hardware"]: r for r in table["hosts"]}
    for name, (devices, mem, bf16, int8, bw) in NEW_ROWS.items():
        r = rows[name]
        assert (r["devices"], r["memory"], r["bf16_flops"], r["int8_flops"], r["bandwidth"]) == (
            devices, mem * GIB, bf16 * 1e12, int8 * 1e12, bw * 1e9), name
    # the old rows are still there, TPU v2 / v3 per TensorCore (a JAX device)
    assert (rows["TPU v2-8"]["devices"], rows["TPU v2-8"]["memory"], rows["TPU v2-8"]["int8_flops"]) == (8, 8 * GIB, None)
    assert (rows["TPU v3-8"]["memory"], rows["TPU v4-8"]["devices"], rows["TPU v4-8"]["memory"]) == (16 * GIB, 4, 32 * GIB)
    md = _modes()
    assert md.returncode == 0, md.stderr[-4000:]
    for text in ("| TPU v5e-1 | 1 | 16.00 GiB | 197 | 393 | 819 |", "| T4 16GB | 1 | 16.00 GiB | 65 | 130 | 320 |",
                 "| H200 141GB | 1 | 141.00 GiB | 989 | 1979 | 4800 |", "| TPU v2-8 | 8 | 8.00 GiB | 22.5 | - | 300 |",
                 # rows x 2048 per mode (bf16, int8, full, LoRA, QLoRA), then batch-1 decode tokens/s (bf16, int8)
                 "| TPU v5e-1 | 2 x 2048 | 8 x 2048 | no (91.96 GiB) | 1 x 2048 | 3 x 2048 | 70 | 135 |",
                 "| TPU v5e-8 | 116 x 2048 | 122 x 2048 | 8 x 2048 | 40 x 2048 | 40 x 2048 | 561 | 1082 |"):
        assert text in md.stdout, text


def test_modes_table_for_gptj_6b_on_v5e_1():
    """GPT-J-6B on one v5e chip (16 GiB, 90% usable): the analytic figures, recomputed here from the shapes."""
    table = _json(_modes("--json"))
    assert table["params"] == N6 == 6_050_882_784 and table["lora_params"] == L6 * 8 * (4 * 2 * D6 + 2 * (D6 + F6))
    v5e = next(r for r in table["hosts"] if r["key"] == "v5e-1")["modes"]
    budget = 0.9 * 16 * GIB
    kv_row = 2 * L6 * 2048 * D6 * 2  # bfloat16 K and V of one 2048-token row: 0.4375 MiB / token
    # prefill of one 2048-token row, one block: (10 D + 2 F) bf16 + 16 heads' float32 scores and probs; + logits
    act_infer = 2048 * ((10 * D6 + 2 * F6) * 2 + 2 * 16 * 2048 * 4) + V6 * 4
    bf16 = 2 * N6
    assert v5e["bf16"]["need_min_batch"] == bf16 + kv_row + act_infer
    rows = int((budget - bf16 - act_infer) // kv_row)
    assert (v5e["bf16"]["fits"], v5e["bf16"]["batch"], v5e["bf16"]["seq"]) == (True, rows, 2048) and rows == 2
    # int8: block matmuls 1 byte + float32 scale per output channel; embedding and lm_head bfloat16
    mats = L6 * (4 * D6 * D6 + 2 * D6 * F6)
    int8 = mats + 4 * L6 * (4 * D6 + F6 + D6) + 2 * (N6 - mats)
    assert v5e["int8"]["need_min_batch"] == int8 + kv_row + act_infer + 2 * (4 * D6 * D6 + 2 * D6 * F6)
    assert int8 / bf16 < 0.54
    assert v5e["bf16"]["decode_tokens_per_s"] == pytest.approx(819e9 / (bf16 - 2 * V6 * D6))  # ~70 tokens/s
    assert v5e["int8"]["decode_tokens_per_s"] == pytest.approx(819e9 / (int8 - 2 * V6 * D6))
    # full fine-tuning: 16 bytes per param (f32 params, grads, Adam mu + nu) alone exceed the chip
    assert not v5e["full"]["fits"] and v5e["full"]["batch"] == 0 and v5e["full"]["need_min_batch"] > 16 * N6
    # LoRA on a bfloat16 base fits 1 x 2048 (remat full); QLoRA (int8 base) fits more rows
    assert (v5e["lora"]["fits"], v5e["lora"]["batch"]) == (True, 1)
    assert v5e["lora"]["need_min_batch"] < budget
    assert v5e["qlora"]["fits"] and v5e["qlora"]["batch"] > 1
    # v5e-8 is the smallest TPU here on which full fine-tuning fits (8 rows of 2048, fsdp over 8 chips)
    fits_full = {r["key"] for r in table["hosts"] if r["modes"]["full"]["fits"]}
    assert "v5e-8" in fits_full and not fits_full & {"v5e-1", "v5e-4", "v6e-1", "t4", "l4", "a10g", "a100-40",
                                                      "a100-80", "h100", "v2-8"}


def test_modes_full_fine_tuning_rows_per_device_with_the_blockwise_loss():
    """``plan --modes --loss-block-size 8192``: the most 2048-token rows per device for GPT-J-6B full fine-tuning
    (remat full) on v3-8, v4-8 and v5e-8, recomputed here: float32 params + grads + Adam (16 bytes per param) split
    over the devices; per row each block's bfloat16 input, one block's activations (10 D + 2 F bfloat16 values and
    16 heads' float32 scores and probabilities per token) and three float32 8192-column logits blocks; once, the
    bfloat16 lm_head kernel."""
    seq, block = 2048, 8192
    table = _json(_modes("--json", "--loss-block-size", str(block), "--hardware", "v3-8,v4-8,v5e-8"))
    full_logits = _json(_modes("--json", "--loss-block-size", "0", "--hardware", "v3-8,v4-8,v5e-8"))
    assert table["loss_block_size"] == block and full_logits["loss_block_size"] == 0
    per_row = (L6 * seq * D6 * 2 + seq * ((10 * D6 + 2 * F6) * 2 + 2 * 16 * seq * 4) + 3 * seq * block * 4)
    per_row_full = per_row - 3 * seq * block * 4 + 3 * seq * V6 * 4
    expected = {}
    for key, devices, memory in (("v3-8", 8, 16 * GIB), ("v4-8", 4, 32 * GIB), ("v5e-8", 8, 16 * GIB)):
        free = 0.9 * memory - 16 * N6 / devices
        expected[key] = (int((free - V6 * D6 * 2) // per_row), int(free // per_row_full))
    assert expected == {"v3-8": (1, 1), "v4-8": (4, 2), "v5e-8": (1, 1)}
    for blockwise, full in zip(table["hosts"], full_logits["hosts"]):
        rows, rows_full = expected[blockwise["key"]]
        cell = blockwise["modes"]["full"]
        assert (cell["batch_per_device"], cell["batch"], cell["seq"]) == (rows, rows * blockwise["devices"], seq)
        assert full["modes"]["full"]["batch_per_device"] == rows_full
    md = _modes("--loss-block-size", str(block), "--hardware", "v3-8,v4-8,v5e-8")
    assert md.returncode == 0, md.stderr[-2000:]
    assert "| TPU v4-8 | 117 x 2048 | 122 x 2048 | 16 x 2048 |" in md.stdout
    assert ("Full fine-tuning rows per device at context 2048: TPU v3-8 1, TPU v4-8 4, TPU v5e-8 1." in md.stdout)
    assert "blockwise loss in 8192-column vocabulary blocks" in md.stdout


# ---------------------------------------------------------------------------------------- compiled for a TPU
# These compile GPT-J-6B's real steps for a TPU v5e-1 with libtpu (deviceless; `pip install
# 'gptj-jax[tpu-aot]'`, which `make install` includes). Without libtpu they fail with its error message.
# LoRA on a bfloat16 base is checked analytically above (test_modes_table_for_gptj_6b_on_v5e_1); its compiled
# step (and int8 / QLoRA's) on a small config below; GPT-J-6B's compiled LoRA figures are in docs/benchmarks.md.
@pytest.fixture(scope="module")
def v5e_1_plans() -> dict:
    """``plan --compile-for v5e-1`` of GPT-J-6B at 1 x 2048, inference and training, compiled in two processes at
    once (each compile is mostly one thread; about 65 s and 35 s of CPU). Without libtpu both fail with the
    verb's one-line error, which the tests' assertion messages show."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    argv = [sys.executable, "-m", "gptj_jax.cli", "plan", "--config", "gptj-6b", "--compile-for", "v5e-1",
            "--batch", "1", "--seq", "2048", "--json"]
    procs = {name: subprocess.Popen(argv + extra, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for name, extra in (("inference", []), ("train", ["--train"]))}
    return {name: proc.communicate(timeout=1200) + (proc.returncode,) for name, proc in procs.items()}


def _compiled(plans: dict, name: str) -> dict:
    out, err, code = plans[name]
    assert code == 0, err[-2000:]
    return json.loads(out)


@pytest.mark.slow
def test_compiled_for_v5e_1_bf16_inference_fits_at_1x2048(v5e_1_plans):
    plan = _compiled(v5e_1_plans, "inference")
    assert plan["target"] == "v5e-1" and plan["devices"] == 1 and "XLA:TPU" in plan["notes"][0]
    assert "TPU v5 lite" in plan["notes"][0]
    a = plan["analytic"]
    assert a["params"] == 2 * N6  # bfloat16, one device
    assert a["kv_cache"] == 2 * L6 * 2048 * D6 * 2 + 2048 + 4 + 4  # k/v + mask [1, 2048] + index + lengths
    prefill, decode = plan["steps"]
    assert not prefill["error"] and not decode["error"]
    state = a["params"] + a["kv_cache"]
    assert 0 <= prefill["argument"] - state <= 32 * 1024 and 0 <= decode["argument"] - state <= 32 * 1024
    assert decode["alias"] >= 0.99 * a["kv_cache"]  # the cache is updated in place
    (fit,) = plan["fits"]
    assert fit["hardware"] == "TPU v5e-1" and fit["verdict"] == "fits" and plan["peak"] < 0.9 * 16 * GIB
    # the analytic peak (state + one block's prefill activations) within 15% of XLA:TPU's
    assert 0.85 <= plan["analytic_vs_compiled"] <= 1.15, plan["analytic_vs_compiled"]
    compiled_flops = prefill["flops_per_device"] + decode["flops_per_device"]
    assert 0.85 < compiled_flops / plan["flops_analytic"] < 1.15


@pytest.mark.slow
def test_compiled_for_v5e_1_full_fine_tuning_does_not_fit(v5e_1_plans):
    plan = _compiled(v5e_1_plans, "train")
    (train,) = plan["steps"]
    assert "RESOURCE_EXHAUSTED" in train["error"] and "HBM" in train["error"]
    a = plan["analytic"]
    assert a["params"] == 4 * N6 and 2 * a["params"] <= a["opt_state"] <= 2 * a["params"] + 64
    assert 0 <= train["argument"] - (a["params"] + a["opt_state"]) <= 32 * 1024  # f32 params + Adam state
    (fit,) = plan["fits"]
    assert fit["verdict"] == fit["verdict_analytic"] == "no"
    assert train["temp"] > 16 * GIB  # the temporaries the compiler asked for alone exceed the chip


def test_compile_for_without_libtpu_is_one_clear_error():
    # A Python where `import libtpu` fails, as in a venv without the tpu-aot extra.
    code = ("import sys; sys.modules['libtpu'] = None\n"
            "from gptj_jax import cli\n"
            "sys.exit(cli.main(['plan', '--config', 'gptj-6b', '--compile-for', 'v5e-1']))")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert err == ["gptj-jax plan: error: RuntimeError: --compile-for v5e-1 needs libtpu (XLA:TPU's compiler), which "
                   "is not installed: pip install 'gptj-jax[tpu-aot]'"], proc.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mode", "lora", "--lora-rank", "0"], "--lora-rank must be >= 1, got 0"),
        (["--mode", "qlora", "--forward", "shard_map"], "--mode qlora: LoRA trains with --forward gspmd only"),
        (["--mode", "lora", "--lora-rank", "65"], "lora_rank 65 is larger than a dimension of "
                                                  "transformer/h_0/attn/q_proj/kernel [64, 64] (in, out)"),
        (["--compile-for", "v5e-8", "--mesh", "mp=4"], "--mesh 'mp=4' has 4 devices; TPU v5e-8 has 8"),
        (["--train", "--mode", "bf16"], "--train with --mode bf16: bf16 is an inference mode"),
        (["--modes", "--lora-rank", "0"], "--lora-rank must be >= 1, got 0"),
        (["--modes", "--hardware", "v5e-1,tpu-v5e"], "unknown hardware 'tpu-v5e'; known: v2-8, v3-8, v4-8, v5e-1,"),
    ],
)
def test_plan_mode_errors_are_one_line(config_file, capsys, argv, message):
    from gptj_jax import cli

    code = cli.main(["plan", "--config", config_file, "--seq", "32", *argv])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err, err
    assert len(err.strip().splitlines()) == 1


def test_cli_choices_are_the_planner_tables():
    # cli/plan.py repeats the names so that `gptj-jax plan --help` imports no jax: they must stay the same.
    from gptj_jax import plan
    from gptj_jax.cli import plan as cli_plan

    assert cli_plan.TPU_TARGETS == plan.TPU_TARGETS == ("v2-8", "v3-8", "v4-8", "v5e-1", "v5e-4", "v5e-8", "v6e-1",
                                                        "v6e-8", "v5p-8")
    assert cli_plan.MODES == tuple(plan.MODES)


# ---------------------------------------------------------------------------------------- int8 / LoRA / QLoRA compiled
# The int8 inference, LoRA and QLoRA steps compiled by XLA:TPU for a v5e-1 (libtpu, deviceless) on a small config
# (2 blocks at width 256: seconds per compile); GPT-J-6B's figures are measured once and recorded in
# docs/benchmarks.md ("Memory: int8 weights, LoRA, QLoRA").
SMALL = {"model_type": "gptj", "vocab_size": 1024, "n_positions": 256, "n_embd": 256, "n_layer": 2, "n_head": 4,
         "rotary_dim": 16}
DS, FS, LS, VS = 256, 1024, 2, 1024
NS = VS * DS + LS * (4 * DS * DS + 2 * DS * FS + FS + DS + 2 * DS) + 2 * DS + DS * VS + VS
MATS_S = LS * (4 * DS * DS + 2 * DS * FS)  # the block kernels int8 quantizes
INT8_S = MATS_S + 4 * LS * (4 * DS + FS + DS) + 2 * (NS - MATS_S)  # + float32 scale per output channel; rest bf16
ADAPTERS_S = LS * 8 * (4 * 2 * DS + 2 * (DS + FS))  # rank 8 on q/k/v/out_proj, fc_in, fc_out


@pytest.fixture(scope="module")
def v5e_1_small_modes(tmp_path_factory) -> dict:
    """``plan --compile-for v5e-1 --mode int8 | lora | qlora`` of SMALL at 2 x 256 (training with remat full), three
    processes at once."""
    path = tmp_path_factory.mktemp("plan-modes") / "small.json"
    path.write_text(json.dumps(SMALL))
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    # --attention xla: the einsum path these figures describe (auto is splash for a TPU prefill / train step,
    # whose temporaries at this small size are 0)
    argv = [sys.executable, "-m", "gptj_jax.cli", "plan", "--config", str(path), "--compile-for", "v5e-1",
            "--batch", "2", "--seq", "256", "--json", "--attention", "xla"]
    procs = {mode: subprocess.Popen(argv + ["--mode", mode] + ([] if mode == "int8" else ["--remat", "full"]), cwd=REPO,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mode in ("int8", "lora", "qlora")}
    return {mode: proc.communicate(timeout=1200) + (proc.returncode,) for mode, proc in procs.items()}


@pytest.mark.slow
def test_compiled_for_v5e_1_int8_inference(v5e_1_small_modes):
    plan = _compiled(v5e_1_small_modes, "int8")
    assert plan["target"] == "v5e-1" and plan["param_dtype"] == "bfloat16"
    a = plan["analytic"]
    assert a["params"] == INT8_S  # int8 kernels + their float32 scales, the rest bfloat16
    assert a["dequantized"] == 2 * (4 * DS * DS + 2 * DS * FS)  # one block's kernels in bfloat16
    assert a["kv_cache"] == 2 * LS * 2 * 256 * DS * 2 + 2 * 256 + 2 * 4 + 2 * 4  # k/v, mask, index, lengths
    prefill, decode = plan["steps"]
    assert not prefill["error"] and not decode["error"]
    state = a["params"] + a["kv_cache"]
    # the compiled arguments are the int8 tree and the cache (+ the token batch): the int8 weights are what the
    # program takes, no bfloat16 copy
    assert 0 <= prefill["argument"] - state <= 32 * 1024 and 0 <= decode["argument"] - state <= 32 * 1024
    assert decode["alias"] >= 0.99 * a["kv_cache"]
    # XLA:TPU's own figures, as reported (at this size the prefill's temporaries are 0 since the per-row cache
    # write is in place): the peak is their sum
    for step in (prefill, decode):
        assert step["peak"] == step["argument"] + step["output"] - step["alias"] + step["temp"] + step["code"]
        assert step["flops_per_device"] > 0
    assert plan["fits"][0]["verdict"] == "fits"


@pytest.mark.slow
def test_compiled_for_v5e_1_lora_and_qlora(v5e_1_small_modes):
    lora, qlora = _compiled(v5e_1_small_modes, "lora"), _compiled(v5e_1_small_modes, "qlora")
    for plan, base in ((lora, 2 * NS), (qlora, INT8_S)):
        a = plan["analytic"]
        assert plan["train"] and plan["param_dtype"] == "float32"
        assert a["params"] == 4 * ADAPTERS_S and a["grads"] == a["params"]  # float32 adapters only
        assert 2 * a["params"] <= a["opt_state"] <= 2 * a["params"] + 64  # Adam's mu and nu of the adapters
        assert a["base"] == base  # the frozen base: bfloat16, or int8 + scales
        (train,) = plan["steps"]
        assert not train["error"]
        trained = a["params"] + a["opt_state"]
        assert 0 <= train["argument"] - (trained + a["base"]) <= 32 * 1024  # + step, rng and the token batch
        # the adapters' state is donated (updated in place), the frozen base is not
        assert 0.99 * trained <= train["alias"] <= trained + 32 * 1024 < a["base"]  # (+ step and rng)
        assert plan["fits"][0]["verdict"] == "fits"
    assert qlora["analytic"]["dequantized"] == 2 * (4 * DS * DS + 2 * DS * FS)
    assert lora["steps"][0]["argument"] - qlora["steps"][0]["argument"] == 2 * NS - INT8_S


def test_bad_mode_names_are_one_clear_error(config_file, capsys):
    from gptj_jax import cli
    from gptj_jax.config import GPTJConfig
    from gptj_jax.plan import make_plan

    with pytest.raises(ValueError, match=r"^--mode 'int4' is not one of bf16, int8, full, lora, qlora$"):
        make_plan(GPTJConfig(**{k: v for k, v in CONFIG.items() if k != "model_type"}), {"dp": 1, "fsdp": 1, "mp": 1},
                  1, 8, mode="int4")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--config", config_file, "--mode", "int4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # argparse's own message (the choices are quoted or not depending on the Python version)
    assert re.search(r"argument --mode: invalid choice: 'int4' \(choose from '?bf16'?, '?int8'?, '?full'?, '?lora'?, "
                     r"'?qlora'?\)", err), err

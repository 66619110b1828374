"""``gptj-jax plan``: AOT-compiled per-device memory agrees with the analytic counts; errors are one line.

The planning runs happen in subprocesses (``python -m gptj_jax.cli plan ...``): the verb simulates
as many CPU devices as the mesh has, which must happen before JAX starts. Bad input is checked
in-process through ``cli.main``, which fails before any device is touched.
"""

from __future__ import annotations

import json
import os
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

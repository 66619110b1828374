"""The training loop: loss falls on the demo corpus, exact resume, checkpoints that survive SIGKILL mid-save,
SIGTERM saves and exits, NaN stops naming the step, metrics and TensorBoard files, the checkpoint is
readable by the converter, and ``gptj-jax eval`` prints loss / perplexity / bits per byte."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from gptj_jax.train.config import load_train_config
from gptj_jax.train.data import write_records
from gptj_jax.train.loop import TrainingDiverged, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["layers=2", "d_model=32", "n_heads=4", "n_vocab=128", "pe_rotary_dims=4", "n_positions=64", "seq=16",
        "dtype=float32", "progress=false", "peak_flops=1e11"]


def synthetic_data(directory: str, n: int = 48, seq: int = 16, seed: int = 0) -> str:
    """Learnable records: each row counts up from a random start, modulo 128."""
    rng = np.random.RandomState(seed)
    rows = (rng.randint(0, 128, (n, 1)) + np.arange(seq + 1)[None, :]) % 128
    write_records(directory, rows, num_bytes=n * (seq + 1) * 3)
    return directory


def make_cfg(tmp_path, *overrides: str, data: str | None = None):
    data = data or synthetic_data(str(tmp_path / "data"))
    return load_train_config(None, TINY + [f"train_set={data}", f"model_dir={tmp_path / 'run'}", "total_steps=4",
                                           "per_replica_batch=4", "lr=1e-3", *overrides])


def params_of(summary) -> dict:
    return jax.device_get(summary["final_params"])


def assert_identical(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(x, y)


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------- the demo corpus
def test_loss_falls_on_demo_corpus(tmp_path):
    from gptj_jax.train.data import prepare

    train_files = sorted(glob.glob(os.path.join(ROOT, "data", "demo", "train", "*.txt")))
    data = str(tmp_path / "demo")
    prepare(train_files[:2], data, seq=32, workers=1, progress=False)
    cfg = load_train_config(os.path.join(ROOT, "configs", "demo-tiny.yaml"), [
        f"train_set={data}", f"model_dir={tmp_path / 'run'}", "seq=32", "per_replica_batch=8", "total_steps=25",
        "warmup_steps=0", "lr=3e-3", "ckpt_every=100", "val_set={}", "progress=false", "peak_flops=1e11",
    ])
    summary = train(cfg)
    rows = [r for r in read_metrics(cfg.model_dir) if "loss" in r]
    first, last = rows[0]["loss"], np.mean([r["loss"] for r in rows[-3:]])
    assert first > 10.0  # ~ln(50400) from a random init
    assert last < first - 2.0, (first, last)
    assert summary["step"] == 25


# ---------------------------------------------------------------------------------------- resume
def test_resume_is_exact(tmp_path):
    """6 steps in one run == 3 steps, stop, then the same command to 6: bit-identical parameters, and the
    resumed steps see the same batches (same losses) and the same dropout masks."""
    data = synthetic_data(str(tmp_path / "data"))
    common = ["dropout=0.1", "ckpt_every=3", "shuffle=true", "seed=7", "gradient_accumulation_steps=2"]
    full = train(make_cfg(tmp_path / "a", *common, "total_steps=6", data=data))
    first = train(make_cfg(tmp_path / "b", *common, "total_steps=3", data=data))
    assert first["step"] == 3
    resumed = train(make_cfg(tmp_path / "b", *common, "total_steps=6", data=data))
    assert resumed["start_step"] == 3 and resumed["step"] == 6
    assert_identical(params_of(full), params_of(resumed))
    losses_a = [r["loss"] for r in read_metrics(tmp_path / "a" / "run") if "loss" in r]
    losses_b = [r["loss"] for r in read_metrics(tmp_path / "b" / "run") if "loss" in r]
    assert losses_a == losses_b  # the data position (and RNG) was restored, not restarted


def test_resume_drops_a_torn_metrics_line_and_names_other_bad_lines(tmp_path):
    """A kill in the middle of a metrics.jsonl write leaves a torn last line: resuming drops it with a warning
    (rewriting the file through a temporary sibling); a bad line elsewhere is an error naming file and line."""
    data = synthetic_data(str(tmp_path / "data"))
    cfg = make_cfg(tmp_path, "ckpt_every=3", "total_steps=3", data=data)
    train(cfg)
    path = os.path.join(cfg.model_dir, "metrics.jsonl")
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"step": 4, "loss": 1.2}\n{"step": 5, "lo')  # step 4 past the checkpoint, then a torn step 5
    with pytest.warns(UserWarning, match=r"metrics.jsonl:5: dropping a torn last line .*not valid JSON"):
        summary = train(make_cfg(tmp_path, "ckpt_every=3", "total_steps=5", data=data))
    assert summary["start_step"] == 3 and summary["step"] == 5
    assert [r["step"] for r in read_metrics(cfg.model_dir) if "loss" in r] == [1, 2, 3, 4, 5]
    assert sorted(n for n in os.listdir(cfg.model_dir) if n.startswith("metrics")) == ["metrics.jsonl"]
    # a broken line that is not the last one is not silently dropped
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    lines[1] = lines[1][:20] + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    from gptj_jax.train.loop import MetricsFileError

    with pytest.raises(MetricsFileError, match=rf"{path}:2: not valid JSON \(.*\); fix or delete that line"):
        train(make_cfg(tmp_path, "ckpt_every=3", "total_steps=6", data=data))


def test_checkpoint_is_a_flax_checkpoint_and_eval_prints(tmp_path, capsys):
    from gptj_jax.cli import main
    from gptj_jax.convert import flax as flax_ckpt

    cfg = make_cfg(tmp_path, "ckpt_every=2", "keep_last=1", "keep_every=2", "total_steps=5")
    summary = train(cfg)
    steps = sorted(int(d) for d in os.listdir(cfg.model_dir) if d.isdigit())
    assert steps == [2, 4, 5]  # keep_last=1 plus every keep_every=2
    config, params = flax_ckpt.restore(cfg.model_dir)  # the converter reads the newest step
    assert config.n_embd == 32
    assert_identical(params, params_of(summary))
    metrics = read_metrics(cfg.model_dir)
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2, 3, 4, 5]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time", "mfu"):
        assert key in metrics[-1]
    assert glob.glob(os.path.join(cfg.model_dir, "tensorboard", "events.out.tfevents.*")) or not _importable("tensorboardX")
    assert main(["eval", "--model", cfg.model_dir, "--data", cfg.train_set, "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "loss" in out and "perplexity" in out and "bits per byte" in out
    if _importable("matplotlib"):
        sys.path.insert(0, os.path.join(ROOT, "scripts"))
        from plot_metrics import main as plot_main

        assert plot_main([cfg.model_dir, "--smooth", "2"]) == 0
        with open(os.path.join(cfg.model_dir, "loss.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_validation_rows_bf16_compute_remat(tmp_path):
    """val_<name>_loss rows every val_every steps; bfloat16 compute with remat keeps float32 master params."""
    val = synthetic_data(str(tmp_path / "val"), n=8, seed=1)
    cfg = make_cfg(tmp_path, f"val_set.held={val}", "val_every=2", "val_batches=1", "dtype=bfloat16", "remat=full")
    summary = train(cfg)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(summary["final_params"]))
    rows = [r for r in read_metrics(cfg.model_dir) if "val_held_loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[1]["val_held_ppl"] == pytest.approx(np.exp(rows[1]["val_held_loss"]))


def test_nan_stops_naming_the_step(tmp_path):
    # lr 1e30 blows the parameters up after the first update: the second step's loss is not finite.
    cfg = make_cfg(tmp_path, "lr=1e30", "warmup_steps=0", "ckpt_every=1", "total_steps=10", "async_checkpointing=false")
    with pytest.raises(TrainingDiverged, match=r"at step (\d+).*last good checkpoint is step") as info:
        train(cfg)
    bad = int(info.value.args[0].split("at step ")[1].split(";")[0])
    saved = sorted(int(d) for d in os.listdir(cfg.model_dir) if d.isdigit())
    assert saved and max(saved) < bad  # the diverged state was never saved


# ---------------------------------------------------------------------------------------- signals
def _train_script(tmp_path, patch: str = "") -> str:
    """A script running ``gptj-jax train CONFIG`` after executing ``patch`` (top-level Python)."""
    script = tmp_path / "run_train.py"
    script.write_text("import sys\n" + patch + "\nfrom gptj_jax.cli import main\nsys.exit(main(['train', sys.argv[1]]))\n")
    return str(script)


def _config_file(tmp_path, overrides: list[str]) -> str:
    path = tmp_path / "cfg.yaml"
    lines = [line.replace("=", ": ", 1) for line in overrides]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _wait_for(predicate, proc, timeout=240.0) -> None:
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


def _steps_logged(run_dir) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if '"loss"' in line)


def test_sigterm_saves_and_exits(tmp_path):
    data = synthetic_data(str(tmp_path / "data"))
    run = str(tmp_path / "run")
    cfg_file = _config_file(tmp_path, TINY + [f"train_set: {data}", f"model_dir: {run}", "total_steps: 100000",
                                              "ckpt_every: 100000", "per_replica_batch: 4"])
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "gptj_jax.cli", "train", cfg_file], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _steps_logged(run) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in out
    saved = sorted(int(d) for d in os.listdir(run) if d.isdigit())
    assert len(saved) == 1 and saved[0] >= 3
    # The same command resumes from it.
    summary = train(load_train_config(cfg_file, [f"total_steps={saved[0] + 1}"]))
    assert summary["start_step"] == saved[0] and summary["step"] == saved[0] + 1


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    """Kill -9 the process while step 4's checkpoint is being written (after its files, before orbax's
    atomic rename): step 2 stays the newest restorable checkpoint and the next run resumes from it."""
    data = synthetic_data(str(tmp_path / "data"))
    run = str(tmp_path / "run")
    cfg_file = _config_file(tmp_path, TINY + [f"train_set: {data}", f"model_dir: {run}", "total_steps: 6",
                                              "ckpt_every: 2", "per_replica_batch: 4"])
    patch = textwrap.dedent("""
        import os, signal
        from orbax.checkpoint._src.path import atomicity
        _finalize = atomicity.AtomicRenameTemporaryPath.finalize
        async def finalize(self, *a, **k):
            if "/4" in str(self.get_final()):
                os.kill(os.getpid(), signal.SIGKILL)
            return await _finalize(self, *a, **k)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    """)
    script = _train_script(tmp_path, patch)
    proc = subprocess.run([sys.executable, script, cfg_file], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    finished = sorted(int(d) for d in os.listdir(run) if d.isdigit())
    assert finished == [2]
    assert any("tmp" in d for d in os.listdir(run))  # the half-written step 4
    summary = train(load_train_config(cfg_file, ["progress=false"]))
    assert summary["start_step"] == 2 and summary["step"] == 6
    # and it equals an uninterrupted run
    clean = train(load_train_config(cfg_file, [f"model_dir={tmp_path / 'clean'}"]))
    assert_identical(params_of(summary), params_of(clean))


def test_bench_section_replaces_only_training(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from bench_train import write_section

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Convert\nkeep me\n\n## Training\nold\n\n## Sharding\nkeep too\n")
    write_section(str(doc), "## Training\n\nnew table\n\n")
    text = doc.read_text()
    assert "keep me" in text and "keep too" in text and "new table" in text and "old" not in text
    write_section(str(tmp_path / "fresh.md"), "## Training\n\nt\n")
    assert (tmp_path / "fresh.md").read_text().startswith("# Benchmarks\n\n## Training")

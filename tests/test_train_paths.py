"""Remote paths (``model_dir: gs://bucket/run``, ``train_set: gs://bucket/data``) and start-up path checks.

No network here, so ``gs://`` is served by a local stand-in: an fsspec filesystem registered for the ``gs``
protocol that keeps the bucket in a temporary directory. Everything above it is the real code: etils.epath (which
orbax uses too) picks it for ``gs://`` as it would pick gcsfs, and tensorboardX gets a writer for ``gs://``
through its own ``register_writer_factory`` hook. The one patch at a boundary is orbax's ``CheckpointManager``:
it records the directory it is given and writes into the bucket's local directory, because orbax's arrays go
through tensorstore's own GCS driver, which needs the network.
"""

from __future__ import annotations

import glob
import json
import os
import pickle

import jax
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from gptj_jax.config import GPTJConfig
from gptj_jax.train import loop
from gptj_jax.train.config import TrainConfigError, load_train_config
from gptj_jax.train.data import DataError, TokenRecords, write_records
from gptj_jax.train.loop import train

TINY = ["layers=2", "d_model=32", "n_heads=4", "n_vocab=128", "pe_rotary_dims=4", "n_positions=64", "seq=16",
        "dtype=float32", "progress=false", "peak_flops=1e11", "per_replica_batch=4", "lr=1e-3"]


def _records(n: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    return (rng.randint(0, 128, (n, 1)) + np.arange(17)[None, :]) % 128


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """``gs://BUCKET/PATH`` is ``<returned dir>/BUCKET/PATH`` for etils.epath and tensorboardX; the test runs in an
    empty working directory (where a path mistaken for a local one would appear as ``./gs:``)."""
    import importlib

    from etils.epath import backend
    from tensorboardX import record_writer

    root = tmp_path / "gcs"
    root.mkdir()

    def local(path: str) -> str:
        path = str(path)
        if path.startswith(str(root)):  # fsspec strips a path more than once
            return path.rstrip("/")
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
        return os.path.join(str(root), path.lstrip("/")).rstrip("/")

    class FakeGCS(LocalFileSystem):
        protocol = ("gs", "gcs")
        read_only = False

        @classmethod
        def _strip_protocol(cls, path):
            return local(path)

        def _open(self, path, mode="rb", **kwargs):
            if self.read_only and mode[0] in "wax":
                raise PermissionError(f"403 Forbidden: no write access to {path}")
            return super()._open(path, mode, **kwargs)

        def makedirs(self, path, exist_ok=False):
            if self.read_only and not os.path.isdir(local(path)):
                raise PermissionError(f"403 Forbidden: no write access to {path}")
            return super().makedirs(path, exist_ok=exist_ok)

    class TensorBoardFactory:  # tensorboardX's hook for a URL scheme (its own gs:// writer needs the network)
        opened: list = []

        def open(self, path):
            self.opened.append(path)
            return open(local(path), "wb")

        def directory_check(self, path):
            os.makedirs(local(path), exist_ok=True)

    registry = importlib.import_module("fsspec.registry")._registry  # what fsspec.register_implementation fills
    monkeypatch.setitem(registry, "gs", FakeGCS)
    monkeypatch.setitem(registry, "gcs", FakeGCS)
    monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", TensorBoardFactory())
    backend.fsspec_backend._get_filesystem.cache_clear()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root, FakeGCS, TensorBoardFactory
    backend.fsspec_backend._get_filesystem.cache_clear()
    assert os.listdir(cwd) == []  # nothing went to a local ./gs:/... directory


@pytest.fixture
def orbax_dirs(gcs, monkeypatch):
    """The directories orbax's CheckpointManager is given; it writes a ``gs://`` one into the stand-in bucket."""
    import orbax.checkpoint as ocp

    root = gcs[0]
    real = ocp.CheckpointManager
    seen: list = []

    def manager(directory, *args, **kwargs):
        seen.append(directory)
        if str(directory).startswith("gs://"):
            directory = os.path.join(str(root), str(directory)[len("gs://"):])
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(ocp, "CheckpointManager", manager)
    return seen


def _steps_called() -> int:
    info = loop._steps.cache_info()
    return info.hits + info.misses


def test_gs_model_dir_and_data_reach_orbax_and_the_writers_unchanged(gcs, orbax_dirs, tmp_path):
    root, _, tb = gcs
    write_records(str(root / "bucket" / "data"), _records())  # = gs://bucket/data
    write_records(str(root / "bucket" / "val"), _records(8, seed=1))
    keys = TINY + ["ckpt_every=2", "val_every=2", "val_batches=1", "tensorboard=true"]
    remote = train(load_train_config(None, keys + ["model_dir=gs://bucket/run", "train_set=gs://bucket/data",
                                                   "val_set.held=gs://bucket/val", "total_steps=4"]))
    assert orbax_dirs == ["gs://bucket/run"]  # not abspath'ed into ./gs:/bucket/run
    run = root / "bucket" / "run"
    assert sorted(int(d) for d in os.listdir(run) if d.isdigit()) == [2, 4]
    assert GPTJConfig.from_pretrained("gs://bucket/run") == remote["model_config"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val_held_loss" in r] == [2, 4]
    assert tb.opened and all(p.startswith("gs://bucket/run/tensorboard/events.out.tfevents.") for p in tb.opened)
    assert glob.glob(str(run / "tensorboard" / "events.out.tfevents.*"))

    # the same run on local paths: the records read from gs:// are the same batches
    write_records(str(tmp_path / "data"), _records())
    write_records(str(tmp_path / "val"), _records(8, seed=1))
    local = train(load_train_config(None, keys + [f"model_dir={tmp_path / 'run'}", f"train_set={tmp_path / 'data'}",
                                                  f"val_set.held={tmp_path / 'val'}", "total_steps=4"]))
    assert orbax_dirs[-1] == str(tmp_path / "run")  # a local path goes to orbax absolute, as before
    for a, b in zip(jax.tree.leaves(jax.device_get(remote["final_params"])),
                    jax.tree.leaves(jax.device_get(local["final_params"]))):
        assert np.array_equal(a, b)

    # resuming reads config.json and rewrites metrics.jsonl through gs://
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"step": 5, "loss": 9.0}\n')
    resumed = train(load_train_config(None, keys + ["model_dir=gs://bucket/run", "train_set=gs://bucket/data",
                                                    "val_set.held=gs://bucket/val", "total_steps=6"]))
    assert resumed["start_step"] == 4 and resumed["step"] == 6
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows if r["step"] == 5 and "loss" in r] != [9.0]  # the stale row was dropped


def test_unwritable_gs_model_dir_fails_before_compiling(gcs, orbax_dirs, tmp_path):
    root, fake_fs, _ = gcs
    write_records(str(tmp_path / "data"), _records())
    write_records(str(root / "bucket" / "data"), _records())
    fake_fs.read_only = True
    before = _steps_called()
    with pytest.raises(TrainConfigError, match=r"key 'model_dir': cannot write to gs://bucket/run \(PermissionError: "
                                               r"403 Forbidden"):
        train(load_train_config(None, TINY + ["model_dir=gs://bucket/run", f"train_set={tmp_path / 'data'}",
                                              "total_steps=2"]))
    assert _steps_called() == before and orbax_dirs == []  # nothing compiled, no checkpoint manager
    fake_fs.read_only = False
    with pytest.raises(DataError, match="val_set.held gs://bucket/nope does not exist"):
        train(load_train_config(None, TINY + ["model_dir=gs://bucket/run", "train_set=gs://bucket/data",
                                              "val_set.held=gs://bucket/nope", "total_steps=2"]))
    assert _steps_called() == before


def test_remote_token_records_read_like_local_ones(gcs, tmp_path):
    root = gcs[0]
    rows = _records(40)
    write_records(str(root / "bucket" / "d"), rows)
    remote = TokenRecords("gs://bucket/d", key="train_set")
    assert len(remote) == 40 and remote.seq == 16
    np.testing.assert_array_equal(remote.rows(0, 40), rows.astype(np.uint16))
    again = pickle.loads(pickle.dumps(remote))  # grain workers get a pickled copy
    np.testing.assert_array_equal(again[37], rows[37].astype(np.uint16))
    (root / "bucket" / "d" / "tokens-00000.bin").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match=r"gs://bucket/d/tokens-00000.bin: missing or not 1360 bytes"):
        TokenRecords("gs://bucket/d")


def test_config_json_round_trips_through_gs(gcs):
    from etils import epath

    root = gcs[0]
    cfg = GPTJConfig.preset("gptj-tiny")
    assert cfg.save_pretrained("gs://bucket/model") == "gs://bucket/model/config.json"
    assert (root / "bucket" / "model" / "config.json").is_file()
    assert GPTJConfig.from_pretrained("gs://bucket/model") == cfg
    assert GPTJConfig.from_pretrained(epath.Path("gs://bucket/model/config.json")) == cfg
    with pytest.raises(FileNotFoundError, match="no config.json at gs://bucket/nothing"):
        GPTJConfig.from_pretrained("gs://bucket/nothing")


def test_local_paths_that_cannot_be_written_fail_before_compiling(tmp_path):
    write_records(str(tmp_path / "data"), _records())
    (tmp_path / "file").write_text("not a directory\n")
    before = _steps_called()
    with pytest.raises(TrainConfigError, match=rf"key 'model_dir': cannot write to {tmp_path / 'file' / 'run'} "
                                               r"\((FileExistsError|NotADirectoryError)"):
        train(load_train_config(None, TINY + [f"model_dir={tmp_path / 'file' / 'run'}",
                                              f"train_set={tmp_path / 'data'}", "total_steps=2"]))
    # a TensorBoard directory the writer cannot open: one clear error, also before compiling
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tensorboard").write_text("a file where the event directory goes\n")
    with pytest.raises(TrainConfigError, match=rf"key 'tensorboard': cannot write TensorBoard files to "
                                               rf"{tmp_path / 'run' / 'tensorboard'} \("):
        train(load_train_config(None, TINY + [f"model_dir={tmp_path / 'run'}", f"train_set={tmp_path / 'data'}",
                                              "total_steps=2", "tensorboard=true"]))
    assert _steps_called() == before
    assert (tmp_path / "run" / "tensorboard").read_text() == "a file where the event directory goes\n"

"""Training config: keys, types, overrides, mtj configs, the docs' key tables, and bad input giving one clear
error line (unknown key, missing data dir, seq larger than n_positions). Data preparation: test_train_data.py."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from gptj_jax.cli import main
from gptj_jax.train.config import TrainConfig, TrainConfigError, keys_markdown, load_train_config, model_config_for
from gptj_jax.train.data import write_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQ = ["train_set=x", "model_dir=y", "total_steps=1"]


def cli_error(capsys, argv) -> str:
    """Run the CLI, check it failed with exactly one stderr line, return that line."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------------------------------- config
def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 3e-4\nseq: 128\ntrain_set: a\nmodel_dir: b\ntotal_steps: 10\nval_set: {pile: v}\n")
    cfg = load_train_config(str(f), ["lr=1e-3", "val_set.other=w", "name=123", "shuffle=false", "keep_every=null"])
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    assert load_train_config(str(f)).lr == 3e-4  # YAML 1.1 reads 3e-4 as a string: accepted for float keys
    assert cfg.val_set == {"pile": "v", "other": "w"}
    assert cfg.name == "123" and cfg.shuffle is False and cfg.keep_every is None


@pytest.mark.parametrize("override, message", [
    ("learning_rate=1e-4", "unknown key 'learning_rate'"),
    ("seq=abc", "key 'seq' must be an integer"),
    ("lr=fast", "key 'lr' must be a number"),
    ("val_set=[a, b]", "key 'val_set' must be a mapping"),
    ("shuffle=3", "key 'shuffle' must be true/false"),
    ("remat=some", "key 'remat' must be one of"),
    ("per_replica_batch=0", "key 'per_replica_batch' must be > 0"),
    ("norm=rmsnorm", "key 'norm' must be 'layernorm'"),
    ("mesh=dp=2,mp=4", None),
    ("mesh=mp=4", None),
])
def test_key_errors_name_the_key(override, message):
    if message is None:
        load_train_config(None, REQ + [override])
        return
    with pytest.raises(TrainConfigError, match=message):
        load_train_config(None, REQ + [override])


def test_unknown_key_in_file_names_file_and_suggests(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train_set": "a", "model_dir": "b", "total_step": 5}))
    with pytest.raises(TrainConfigError, match=r"c.json: unknown key 'total_step'; did you mean total_steps"):
        load_train_config(str(f))


def test_missing_required_key():
    with pytest.raises(TrainConfigError, match="missing required key 'total_steps'"):
        load_train_config(None, ["train_set=x", "model_dir=y"])


def test_missing_required_keys_are_all_reported(capsys, tmp_path):
    with pytest.raises(TrainConfigError,
                       match=r"config: missing required keys 'total_steps' \(.*\); 'model_dir' \(.*\); 'train_set' \("):
        load_train_config(None, ["lr=1e-3"])
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1.0e-3\nseq: 64\n")
    line = cli_error(capsys, ["train", str(f)])
    assert line.startswith(f"gptj-jax train: error: TrainConfigError: {f}: missing required keys 'total_steps' (")
    assert "; 'model_dir' (" in line and "; 'train_set' (" in line
    with pytest.raises(TrainConfigError, match=r"missing required keys 'model_dir' \(.*\); 'train_set' \("):
        load_train_config(None, ["total_steps=1"])


def test_mesh_and_cores_per_replica_must_agree():
    with pytest.raises(TrainConfigError, match="mp=4 but cores_per_replica is 2"):
        load_train_config(None, REQ + ["mesh=dp=2,mp=4", "cores_per_replica=2"])


def test_mtj_config_keys_map_to_the_model():
    cfg = load_train_config(os.path.join(ROOT, "configs", "mtj_tiny_roto.json"))
    model = model_config_for(cfg)
    assert (model.n_layer, model.n_embd, model.n_head, model.vocab_size, model.rotary_dim) == (2, 64, 4, 50400, 8)
    assert cfg.gradient_accumulation_steps == 2 and cfg.cores_per_replica == 2
    assert cfg.val_set == {"fables": "out/mtj_tiny_roto/data/val"}


def test_seq_larger_than_n_positions():
    cfg = load_train_config(None, REQ + ["model_config=gptj-tiny", "seq=512"])  # gptj-tiny: n_positions 256
    with pytest.raises(TrainConfigError, match=r"key 'seq' \(512\) is larger than the model's n_positions \(256\)"):
        model_config_for(cfg)


def test_shape_keys_must_match_a_loaded_checkpoint():
    from gptj_jax.config import GPTJConfig

    cfg = load_train_config(None, REQ + ["d_model=128", "model=/some/ckpt"])
    with pytest.raises(TrainConfigError, match="key 'd_model' is 128 but the checkpoint"):
        model_config_for(cfg, GPTJConfig.preset("gptj-tiny"))


def test_docs_key_tables_are_generated_from_train_config():
    """docs/training.md holds exactly keys_markdown()'s tables (paste its output there after changing a key)."""
    with open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8") as f:
        doc = f.read()
    for mtj in (True, False):
        marker = re.escape(f"<!-- generated by gptj_jax.train.config.keys_markdown(mtj={mtj});")
        found = re.search(marker + r"[^\n]*-->\n(.*?)<!-- end of generated table -->", doc, re.S)
        assert found is not None, f"docs/training.md has no keys_markdown(mtj={mtj}) block"
        assert found.group(1) == keys_markdown(mtj), f"docs/training.md is stale; paste:\n{keys_markdown(mtj)}"
    documented = re.findall(r"^\| `(\w+)` \|", doc, re.M)
    assert documented == [f.name for f in dataclasses.fields(TrainConfig)]  # every key once, in order


def test_finetune_recipe_config_loads():
    cfg = load_train_config(os.path.join(ROOT, "configs", "finetune-6b-v3-8.yaml"))
    assert cfg.cores_per_replica == 8 or (cfg.mesh and "mp=8" in cfg.mesh)
    assert cfg.dtype == "bfloat16" and cfg.param_dtype == "float32"


# ---------------------------------------------------------------------------------------- CLI errors
def test_cli_unknown_key_one_line(capsys, tmp_path):
    line = cli_error(capsys, ["train", os.path.join(ROOT, "configs", "demo-tiny.yaml"), "bogus_key=1"])
    assert "unknown key 'bogus_key'" in line and line.startswith("gptj-jax train: error:")


def test_cli_missing_data_dir_one_line(capsys, tmp_path):
    line = cli_error(capsys, ["train", os.path.join(ROOT, "configs", "demo-tiny.yaml"),
                              f"train_set={tmp_path / 'nope'}", f"model_dir={tmp_path / 'run'}"])
    assert f"train_set {tmp_path / 'nope'} does not exist" in line


def test_cli_seq_larger_than_n_positions_one_line(capsys, tmp_path):
    data = tmp_path / "data"
    write_records(str(data), np.zeros((4, 513), np.uint16))
    line = cli_error(capsys, ["train", os.path.join(ROOT, "configs", "demo-tiny.yaml"), "seq=512",
                              f"train_set={data}", f"model_dir={tmp_path / 'run'}"])
    assert "key 'seq' (512) is larger than the model's n_positions (256)" in line


def test_cli_data_prepared_for_other_seq(capsys, tmp_path):
    data = tmp_path / "data"
    write_records(str(data), np.zeros((4, 65), np.uint16))
    line = cli_error(capsys, ["train", os.path.join(ROOT, "configs", "demo-tiny.yaml"), f"train_set={data}",
                              f"model_dir={tmp_path / 'run'}", "val_set={}"])
    assert "prepared with --seq 64 but the config has seq=128" in line

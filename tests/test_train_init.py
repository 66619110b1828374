"""The `model` key: fine-tuning starts from an HF directory, one of our checkpoints, or an mtj checkpoint.

mtj's schedule gives the first update a learning rate of 0 (and the weight decay is scaled by it), so after one
step the parameters are still exactly the loaded ones: a direct check that loading put every tensor in place.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import hf_model, params_of

from gptj_jax.config import GPTJConfig
from gptj_jax.convert import table
from gptj_jax.train.config import TrainConfigError, load_train_config
from gptj_jax.train.data import write_records
from gptj_jax.train.loop import train

CFG = GPTJConfig(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
KEYS = ["seq=16", "dtype=float32", "progress=false", "peak_flops=1e11", "per_replica_batch=4", "lr=1e-3",
        "warmup_steps=2", "total_steps=1"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    model = hf_model(CFG, seed=3)
    model.save_pretrained(path)
    rows = (np.random.RandomState(0).randint(0, 128, (16, 1)) + np.arange(17)[None, :]) % 128
    write_records(str(path / "data"), rows)
    return path, params_of(model)


def _check_same(summary, expected):
    got = table.flatten(jax.device_get(summary["final_params"]))
    want = table.flatten(expected)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6, err_msg=key)


def test_start_from_hf_dir_then_from_our_run(hf_dir, tmp_path):
    path, expected = hf_dir
    s = train(load_train_config(None, KEYS + [f"model={path}", f"train_set={path / 'data'}",
                                              f"model_dir={tmp_path / 'a'}"]))
    _check_same(s, expected)
    # our run directory (its newest step) is a starting point too
    s2 = train(load_train_config(None, KEYS + [f"model={tmp_path / 'a'}", f"train_set={path / 'data'}",
                                               f"model_dir={tmp_path / 'b'}"]))
    _check_same(s2, expected)


def test_start_from_mtj_checkpoint(hf_dir, tmp_path):
    from gptj_jax.convert.pipeline import convert

    path, expected = hf_dir
    mtj_dir = tmp_path / "mtj"
    convert(str(path), str(mtj_dir), to="mtj", dtype="float32", shards=2, verbose=False, tokenizer=False)
    shape = ["layers=2", "d_model=32", "n_heads=4", "n_vocab=128", "pe_rotary_dims=4", "n_positions=64"]
    s = train(load_train_config(None, KEYS + shape + [f"model={mtj_dir}", f"train_set={path / 'data'}",
                                                      f"model_dir={tmp_path / 'run'}"]))
    _check_same(s, expected)


def test_shape_keys_disagreeing_with_the_checkpoint(hf_dir, tmp_path):
    path, _ = hf_dir
    with pytest.raises(TrainConfigError, match="key 'd_model' is 64 but the checkpoint in 'model'"):
        train(load_train_config(None, KEYS + ["d_model=64", f"model={path}", f"train_set={path / 'data'}",
                                              f"model_dir={tmp_path / 'run'}"]))

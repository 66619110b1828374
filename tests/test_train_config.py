"""Training config and data preparation: keys, types, overrides, mtj configs, and bad input giving one
clear error line (unknown key, missing data dir, empty corpus, seq larger than n_positions)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zstandard

from gptj_jax.cli import main
from gptj_jax.train.config import TrainConfigError, load_train_config, model_config_for
from gptj_jax.train.data import DataError, TokenRecords, eval_batches, prepare, train_loader, write_records

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


def test_cli_empty_corpus_one_line(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = cli_error(capsys, ["prepare", "--input", str(empty), "--output", str(tmp_path / "out"), "--seq", "64",
                              "--workers", "1", "--no-progress"])
    assert "fewer than one record of seq + 1 = 65 tokens" in line
    assert not os.path.exists(tmp_path / "out")


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


# ---------------------------------------------------------------------------------------- prepare
def test_prepare_formats_eos_and_packing(tmp_path):
    from gptj_jax.tokenizer import load_tokenizer

    tok = load_tokenizer()
    docs = ["Hello world. " * 20, "The fox and the crow.", "A third document, a little longer than the second."]
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": docs[1]}) + "\n\n" + json.dumps({"text": docs[2]}) + "\n")
    with open(tmp_path / "c.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress((json.dumps({"text": docs[1]}) + "\n").encode()))
    inputs = [str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.jsonl.zst")]
    index = prepare(inputs, str(tmp_path / "out"), seq=15, workers=2, progress=False)
    stream = []
    for d in docs + [docs[1]]:
        stream += tok(d)["input_ids"] + [50256]
    n = len(stream) // 16
    assert index["num_records"] == n and index["num_documents"] == 4 and index["dropped_tokens"] == len(stream) - 16 * n
    records = TokenRecords(str(tmp_path / "out"))
    got = np.concatenate([records[i] for i in range(len(records))])
    np.testing.assert_array_equal(got, np.array(stream[: 16 * n], np.uint16))
    with pytest.raises(DataError, match="already holds a prepared data set"):
        prepare(inputs, str(tmp_path / "out"), seq=15, workers=1, progress=False)


def test_prepare_bad_jsonl_names_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with a string 'text' field"):
        prepare([str(tmp_path / "bad.jsonl")], str(tmp_path / "out"), seq=8, workers=1, progress=False)


# ---------------------------------------------------------------------------------------- loaders
def test_loader_deterministic_and_resumable(tmp_path):
    write_records(str(tmp_path / "d"), np.arange(40 * 5).reshape(40, 5))
    records = TokenRecords(str(tmp_path / "d"))

    def take(it, n):
        return [next(it)[:, 0].tolist() for _ in range(n)]

    a = take(iter(train_loader(records, 4, seed=3)), 25)  # crosses epoch boundaries (10 batches per epoch)
    assert a == take(iter(train_loader(records, 4, seed=3)), 25)
    assert a != take(iter(train_loader(records, 4, seed=4)), 25)
    assert sorted(sum(a[:10], [])) == [5 * i for i in range(40)]  # each epoch is a permutation
    it = iter(train_loader(records, 4, seed=3))
    take(it, 7)
    state = it.get_state()
    fresh = iter(train_loader(records, 4, seed=3))
    fresh.set_state(state)
    assert take(fresh, 18) == a[7:]


def test_eval_batches_in_order(tmp_path):
    write_records(str(tmp_path / "d"), np.arange(10 * 3).reshape(10, 3))
    records = TokenRecords(str(tmp_path / "d"))
    batches = list(eval_batches(records, 4, None))
    assert [b[:, 0].tolist() for b in batches] == [[0, 3, 6, 9], [12, 15, 18, 21]]
    assert [b[:, 0].tolist() for b in eval_batches(records, 4, None, process_index=1, process_count=2)] == [[6, 9], [18, 21]]
    with pytest.raises(DataError, match="fewer than one batch of 16"):
        list(eval_batches(records, 16, None))


def test_prepare_non_utf8_jsonl_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8 \(byte 13 of the line: invalid continuation"):
        prepare([str(bad)], str(tmp_path / "out"), seq=8, workers=1, progress=False)
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.tmp-prepare")
    zst = tmp_path / "bad.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(bad.read_bytes()))
    with pytest.raises(DataError, match=r"bad.jsonl.zst:2: not valid UTF-8"):
        prepare([str(zst)], str(tmp_path / "out"), seq=8, workers=1, progress=False)


def test_prepare_non_utf8_txt_is_repaired_with_a_warning(tmp_path):
    from gptj_jax.tokenizer import load_tokenizer

    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Un caf\u00e9 cr\u00e8me, s'il vous pla\u00eet. ".encode("latin-1") * 4)
    with pytest.warns(UserWarning, match=r"latin1.txt: not valid UTF-8 \(byte 6: invalid continuation byte\); "
                                         r"invalid bytes replaced with U\+FFFD"):
        index = prepare([str(latin)], str(tmp_path / "out"), seq=8, workers=1, progress=False)
    stream = load_tokenizer()(latin.read_bytes().decode("utf-8", errors="replace"))["input_ids"] + [50256]
    assert index["num_tokens"] == len(stream)
    np.testing.assert_array_equal(TokenRecords(str(tmp_path / "out"))[0], np.array(stream[:9], np.uint16))


def test_prepare_output_that_is_a_file_fails_first_and_leaves_nothing(capsys, tmp_path):
    (tmp_path / "a.txt").write_text("Some text to tokenize. " * 50)
    target = tmp_path / "notes.txt"
    target.write_text("the user's own file\n")
    line = cli_error(capsys, ["prepare", "--input", str(tmp_path / "a.txt"), "--output", str(target), "--seq", "8",
                              "--workers", "1", "--no-progress"])
    assert f"--output {target} is a file, not a directory" in line
    assert target.read_text() == "the user's own file\n"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "notes.txt"]  # no notes.txt.tmp-prepare left behind
    # checked before any input is read: a broken input is not reached
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="is a file, not a directory"):
        prepare([str(tmp_path / "broken.jsonl")], str(target), seq=8, workers=1, progress=False)

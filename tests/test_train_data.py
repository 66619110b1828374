"""Data preparation and the loaders: ``gptj-jax prepare`` (formats, EOS and packing, bad input giving one clear
error), :class:`TokenRecords`, the resumable train loader and the in-order eval batches."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zstandard

from gptj_jax.cli import main
from gptj_jax.train.data import DataError, TokenRecords, eval_batches, prepare, train_loader, write_records


def cli_error(capsys, argv) -> str:
    """Run the CLI, check it failed with exactly one stderr line, return that line."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------------------------------- prepare
def test_cli_empty_corpus_one_line(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = cli_error(capsys, ["prepare", "--input", str(empty), "--output", str(tmp_path / "out"), "--seq", "64",
                              "--workers", "1", "--no-progress"])
    assert "fewer than one record of seq + 1 = 65 tokens" in line
    assert not os.path.exists(tmp_path / "out")


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

"""``gptj_jax.convert.convert`` and ``gptj-jax convert``: HF <-> Flax <-> mesh-transformer-jax.

Issue 3's "Must show" list: bit-identical HF -> Flax -> HF for float32 / bfloat16 / float16 sources
(single, sharded and .bin inputs) that load in transformers with the source's logits; HF -> mtj -> HF
exact for float32; and each bad input failing with one line naming file, tensor and shapes while
DST stays untouched. mesh-transformer-jax specifics (leaf order, mp, slim/full) are in test_mtj.py.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import hf_model
from convert_helpers import BATCH, CONFIG, QUIET, TORCH_DTYPES, assert_dirs_identical, hf_logits, same_bits

from gptj_jax import cli
from gptj_jax.convert import CheckpointError, convert, detect_format, mtj, restore_flax, table
from gptj_jax.convert.io import CheckpointReader


@pytest.fixture(scope="module")
def model():
    return hf_model(CONFIG, "causal_lm", seed=7)


@pytest.fixture(scope="module")
def sources(model, tmp_path_factory):
    """The same model as HF checkpoints of each kind: {(dtype, kind): dir}."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for dtype, kind in [("float32", "safetensors"), ("bfloat16", "sharded"), ("float16", "bin"), ("bfloat16", "bin-sharded")]:
        m = copy.deepcopy(model).to(TORCH_DTYPES[dtype])
        path = root / f"{dtype}-{kind}"
        if kind == "safetensors":
            m.save_pretrained(path)
        elif kind == "sharded":
            m.save_pretrained(path, max_shard_size="20KB")
            assert (path / "model.safetensors.index.json").is_file()
        else:  # transformers 5 writes no .bin: write what transformers 4 did
            m.config.save_pretrained(path)
            state = m.state_dict()
            if kind == "bin":
                torch.save(state, path / "pytorch_model.bin")
            else:
                names, weight_map = list(state), {}
                for k, part in enumerate(np.array_split(np.arange(len(names)), 2)):
                    file = f"pytorch_model-{k + 1:05d}-of-00002.bin"
                    torch.save({names[i]: state[names[i]] for i in part}, path / file)
                    weight_map.update({names[i]: file for i in part})
                total = sum(t.numel() * t.element_size() for t in state.values())
                (path / "pytorch_model.bin.index.json").write_text(
                    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
                )
        out[(dtype, kind)] = str(path)
    return out


# ------------------------------------------------------------------------------------ HF -> Flax -> HF
@pytest.mark.parametrize(
    "dtype,kind", [("float32", "safetensors"), ("bfloat16", "sharded"), ("float16", "bin"), ("bfloat16", "bin-sharded")]
)
def test_hf_flax_hf_is_bit_identical_and_keeps_logits(dtype, kind, sources, tmp_path):
    src = sources[(dtype, kind)]
    flax_dir, back = tmp_path / "flax", tmp_path / "back"
    s1 = convert(src, flax_dir, to="flax", **QUIET)
    assert detect_format(str(flax_dir)) == "flax"
    assert s1.dtype == dtype and s1.tensors == len(table.expected_shapes(CONFIG, "causal_lm"))
    assert s1.parameters == CONFIG.num_params("causal_lm")
    s2 = convert(flax_dir, back, to="hf", max_shard_size="30KB", **QUIET)
    assert s2.bytes == s1.bytes == CONFIG.num_params("causal_lm") * np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).itemsize
    assert (back / "model.safetensors.index.json").is_file()
    assert_dirs_identical(src, str(back))
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == dtype
    assert cfg["architectures"] == ["GPTJForCausalLM"]
    assert torch.equal(hf_logits(str(back)), hf_logits(src))


def test_flax_checkpoint_gives_transformers_logits(model, sources, tmp_path):
    """Our model on the Flax checkpoint's params matches transformers (float32, <= 1e-4)."""
    import jax.numpy as jnp

    from gptj_jax.model import model_for

    convert(sources[("float32", "safetensors")], tmp_path / "flax", to="flax", **QUIET)
    config, params = restore_flax(tmp_path / "flax")
    assert config == CONFIG
    ids, mask, pos = BATCH
    ours = model_for(config, "causal_lm").apply(
        {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(pos)
    ).logits
    np.testing.assert_allclose(np.asarray(ours), hf_logits(sources[("float32", "safetensors")]).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("head,cls", [("sequence_classification", "GPTJForSequenceClassification"), ("question_answering", "GPTJForQuestionAnswering")])
def test_head_weights_travel(head, cls, tmp_path):
    m = hf_model(CONFIG, head, seed=3)
    m.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "flax", to="flax", **QUIET)
    convert(tmp_path / "flax", tmp_path / "back", to="hf", **QUIET)
    assert_dirs_identical(str(tmp_path / "src"), str(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == [cls]
    assert torch.equal(hf_logits(str(tmp_path / "back"), cls), hf_logits(str(tmp_path / "src"), cls))
    with pytest.raises(CheckpointError, match="causal LMs only"):
        convert(tmp_path / "flax", tmp_path / "mtj", to="mtj", **QUIET)
    assert not (tmp_path / "mtj").exists()


def test_dtype_cast_and_tokenizer_files(sources, tmp_path, capsys):
    """--dtype casts every tensor; HF output carries the tokenizer; progress and summary are shown."""
    import transformers

    s = convert(sources[("float32", "safetensors")], tmp_path / "bf16", to="hf", dtype="bfloat16")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("converted hf -> hf: 25 tensors, ") and "bfloat16" in line and " s (" in line
    assert s.dtype == "bfloat16" and s.bytes == 2 * CONFIG.num_params("causal_lm")
    with CheckpointReader(tmp_path / "bf16") as r, CheckpointReader(sources[("float32", "safetensors")]) as src:
        for name in r.names:
            assert same_bits(r.read(name), src.read(name).astype(ml_dtypes.bfloat16)), name
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "bf16"))
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert len(tok) == 50400


def test_flax_run_dir_converts_newest_step(model, sources, tmp_path):
    """A training run's <run>/<step>/params items (config.json in the run dir): the newest step converts."""
    from gptj_jax.convert import from_pretrained, save_flax

    config, params = from_pretrained(sources[("float32", "safetensors")])
    zeros = jax.tree_util.tree_map(np.zeros_like, params)
    save_flax(tmp_path / "run" / "200", config, params)
    save_flax(tmp_path / "run" / "30", config, zeros)
    for step in ("200", "30"):
        os.replace(tmp_path / "run" / step / "config.json", tmp_path / "run" / "config.json")
    assert detect_format(str(tmp_path / "run")) == "flax"
    convert(tmp_path / "run", tmp_path / "hf", to="hf", **QUIET)
    assert_dirs_identical(sources[("float32", "safetensors")], str(tmp_path / "hf"))


def test_hf_mtj_hf_is_exact_for_float32(sources, tmp_path):
    src = sources[("float32", "safetensors")]
    convert(src, tmp_path / "mtj", to="mtj", shards=4, **QUIET)
    assert detect_format(str(tmp_path / "mtj")) == "mtj"
    assert sorted(os.listdir(tmp_path / "mtj" / "step_0")) == [f"shard_{s}" for s in range(4)]
    convert(tmp_path / "mtj", tmp_path / "back", to="hf", config=os.path.join(src, "config.json"), **QUIET)
    assert_dirs_identical(src, str(tmp_path / "back"))
    assert torch.equal(hf_logits(str(tmp_path / "back")), hf_logits(src))


# -------------------------------------------------------------------------------------------- CLI
def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(["convert", *argv, "--quiet", "--no-tokenizer"])
    return code, capsys.readouterr().err.strip()


def test_cli_converts(sources, tmp_path, capsys):
    code, err = _cli([sources[("bfloat16", "sharded")], str(tmp_path / "out"), "--to", "flax"], capsys)
    assert code == 0, err
    code, err = _cli([str(tmp_path / "out"), str(tmp_path / "hf"), "--to", "hf", "--dtype", "float32", "--max-shard-size", "1GB"], capsys)
    assert code == 0, err
    assert os.listdir(tmp_path / "hf") and (tmp_path / "hf" / "model.safetensors").is_file()


def test_cli_registered_in_main_entry_point(sources, tmp_path, capsys):
    assert "convert" in cli.COMMANDS
    code = cli.main(["convert", sources[("float16", "bin")], str(tmp_path / "o"), "--to", "hf", "--quiet", "--no-tokenizer"])
    assert code == 0
    assert_dirs_identical(sources[("float16", "bin")], str(tmp_path / "o"))


# ----------------------------------------------------------------------------------------- bad input
def _assert_fails_cleanly(argv: list[str], dst, capsys, *patterns: str) -> str:
    """Exit code 1, one stderr line containing every pattern, DST untouched, no temp dirs left."""
    before = sorted(os.listdir(dst)) if os.path.isdir(dst) else None
    code, err = _cli(argv, capsys)
    assert code == 1
    assert len(err.splitlines()) == 1, err
    for pattern in patterns:
        assert pattern in err, (pattern, err)
    after = sorted(os.listdir(dst)) if os.path.isdir(dst) else None
    assert before == after
    parent = os.path.dirname(os.path.abspath(dst))
    assert not [n for n in os.listdir(parent) if n.startswith(f".{os.path.basename(dst)}.")], os.listdir(parent)
    return err


def test_missing_shard_listed_in_index(sources, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(sources[("bfloat16", "sharded")], src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["transformer.h.1.mlp.fc_in.weight"]
    os.remove(src / victim)
    _assert_fails_cleanly(
        [str(src), str(tmp_path / "dst"), "--to", "flax"], tmp_path / "dst", capsys,
        "model.safetensors.index.json", f"lists shard {victim}", "does not exist",
    )


def test_truncated_safetensors(sources, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(sources[("float32", "safetensors")], src)
    with open(src / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(src / "model.safetensors") - 1000)
    _assert_fails_cleanly(
        [str(src), str(tmp_path / "dst"), "--to", "hf"], tmp_path / "dst", capsys,
        "CheckpointError", "model.safetensors: truncated file: tensor 'transformer.wte.weight' (128, 32) F32 needs bytes",
    )


def test_shape_disagrees_with_config(sources, tmp_path, capsys):
    cfg = json.loads(open(os.path.join(sources[("float32", "safetensors")], "config.json")).read())
    cfg["n_inner"] = 64
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    _assert_fails_cleanly(
        [sources[("float32", "safetensors")], str(tmp_path / "dst"), "--to", "flax", "--config", str(tmp_path / "cfg.json")],
        tmp_path / "dst", capsys,
        "model.safetensors: tensor 'transformer.h.0.mlp.fc_in.weight' has shape (128, 32) but the config implies (64, 32)",
    )


def test_unknown_source_layout(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.pt").write_text("?")
    _assert_fails_cleanly(
        [str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "hf"], tmp_path / "dst", capsys,
        "unknown source layout (holds weights.pt)", "expected an HF directory",
    )


def test_dst_exists_without_overwrite(sources, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    src = sources[("float32", "safetensors")]
    _assert_fails_cleanly([src, str(dst), "--to", "hf"], dst, capsys, f"{dst}: destination exists", "--overwrite")
    assert (dst / "keep.txt").read_text() == "mine"
    code, err = _cli([src, str(dst), "--to", "hf", "--overwrite"], capsys)
    assert code == 0, err
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()


def test_failure_midway_leaves_existing_dst_untouched(sources, tmp_path, capsys):
    """A conversion failing after it began writing keeps the old DST, even with --overwrite: the new one
    replaces it only when complete. The failure: a flipped byte in the data of a late mtj leaf, which only
    the zip CRC check at read time can see (headers and shapes are fine)."""
    src = sources[("float32", "safetensors")]
    dst = tmp_path / "dst"
    shutil.copytree(sources[("bfloat16", "sharded")], dst)
    convert(src, tmp_path / "mtj", to="mtj", shards=2, **QUIET)
    leaf = mtj.leaf_paths(CONFIG).index("causal_transformer_shard/~/projection_shard/~/linear/w")
    starts = np.cumsum([0] + mtj.file_split(mtj.leaf_counts(CONFIG)[0]))
    file_index = int(np.searchsorted(starts, leaf, side="right") - 1)
    key = f"arr_{leaf - starts[file_index]}"
    victim = tmp_path / "mtj" / "step_0" / "shard_1" / f"{file_index}.npz"
    with np.load(victim) as z:
        data = z[key].tobytes()
    raw = bytearray(victim.read_bytes())
    at = raw.find(data) + len(data) // 2
    raw[at] ^= 0xFF
    victim.write_bytes(bytes(raw))
    _assert_fails_cleanly(
        [str(tmp_path / "mtj"), str(dst), "--to", "hf", "--overwrite", "--config", os.path.join(src, "config.json")],
        dst, capsys, f"shard_1/{file_index}.npz: cannot read {key}", "projection_shard/~/linear/w", "CRC",
    )
    assert_dirs_identical(sources[("bfloat16", "sharded")], str(dst))


def test_mtj_source_without_config(sources, tmp_path, capsys):
    convert(sources[("float32", "safetensors")], tmp_path / "mtj", to="mtj", shards=2, **QUIET)
    _assert_fails_cleanly(
        [str(tmp_path / "mtj"), str(tmp_path / "dst"), "--to", "hf"], tmp_path / "dst", capsys,
        "mesh-transformer-jax checkpoint carries no config", "--config",
    )


# ------------------------------------------------------------------------------------ tied embeddings
@pytest.fixture(scope="module")
def tied_source(tmp_path_factory):
    """A GPTJForCausalLM built with tie_word_embeddings=True, saved by transformers (no lm_head.weight)."""
    m = hf_model(CONFIG.replace(tie_word_embeddings=True), "causal_lm", seed=9)
    assert m.lm_head.weight is m.transformer.wte.weight
    path = tmp_path_factory.mktemp("tied")
    m.save_pretrained(path)
    with CheckpointReader(path) as reader:
        assert "lm_head.weight" not in reader.names
    return str(path)


def _tied_hf_output(path) -> None:
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    with CheckpointReader(path) as reader:
        assert "lm_head.weight" not in reader.names and "lm_head.bias" in reader.names


def test_tied_checkpoint_converts_to_flax_hf_and_mtj(tied_source, tmp_path):
    """HF (tied) -> Flax -> HF and HF -> mtj -> HF: the output is tied again, bit-identical to the source,
    and transformers gives the source's logits; the source as read for training has lm_head = wte."""
    from gptj_jax.convert import open_source

    want = hf_logits(tied_source)
    source = open_source(tied_source)
    try:
        tensors = dict(source.iter_tensors())
    finally:
        source.close()
    assert same_bits(tensors["lm_head.weight"], tensors["transformer.wte.weight"])

    convert(tied_source, tmp_path / "flax", to="flax", **QUIET)
    assert json.loads((tmp_path / "flax" / "config.json").read_text())["tie_word_embeddings"] is True
    _, params = restore_flax(tmp_path / "flax")
    assert np.array_equal(np.asarray(params["lm_head"]["kernel"]), np.asarray(params["transformer"]["wte"]["embedding"]).T)
    convert(tmp_path / "flax", tmp_path / "back", to="hf", **QUIET)
    _tied_hf_output(tmp_path / "back")
    assert_dirs_identical(tied_source, str(tmp_path / "back"))
    assert torch.equal(hf_logits(str(tmp_path / "back")), want)

    convert(tied_source, tmp_path / "mtj", to="mtj", shards=2, **QUIET)
    convert(tmp_path / "mtj", tmp_path / "from_mtj", to="hf", config=os.path.join(tied_source, "config.json"), **QUIET)
    _tied_hf_output(tmp_path / "from_mtj")
    assert_dirs_identical(tied_source, str(tmp_path / "from_mtj"))
    assert torch.equal(hf_logits(str(tmp_path / "from_mtj")), want)


def test_tied_config_with_different_lm_head_writes_both(tied_source, tmp_path):
    """A Flax checkpoint whose config says tied but whose lm_head differs from wte^T converts to HF with
    tie_word_embeddings false and both tensors, which transformers loads as stored."""
    from gptj_jax.convert import save_flax

    config, params = restore_flax(_flax_of(tied_source, tmp_path))
    params["lm_head"]["kernel"] = np.asarray(params["lm_head"]["kernel"]) + 1.0
    save_flax(tmp_path / "untied", config, params)
    assert json.loads((tmp_path / "untied" / "config.json").read_text())["tie_word_embeddings"] is False
    (tmp_path / "cfg.json").write_text(json.dumps(config.to_hf_dict()))  # a config that says tied
    convert(tmp_path / "untied", tmp_path / "hf", to="hf", config=tmp_path / "cfg.json", **QUIET)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    with CheckpointReader(tmp_path / "hf") as reader:
        assert np.array_equal(reader.read("lm_head.weight"), params["lm_head"]["kernel"].T)
        assert "transformer.wte.weight" in reader.names
    hf_logits(str(tmp_path / "hf"))  # loads with no missing or unexpected keys


def _flax_of(src: str, tmp_path) -> str:
    convert(src, tmp_path / "flax", to="flax", **QUIET)
    return str(tmp_path / "flax")


# ---------------------------------------------------------------------------------- SRC / DST / --shards
def test_shards_must_be_at_least_one(sources, tmp_path, capsys):
    _assert_fails_cleanly(
        [sources[("float32", "safetensors")], str(tmp_path / "dst"), "--to", "mtj", "--shards", "0"], tmp_path / "dst",
        capsys, "CheckpointError", "--shards", "must be an integer >= 1, got 0",
    )


@pytest.mark.parametrize("layout", ["same", "dst is the parent", "dst inside src", "dst links to the parent"])
def test_destination_overlapping_source_is_refused(layout, sources, tmp_path, capsys):
    """DST equal to SRC, holding it or inside it (real paths compared) fails before anything is read or
    written, even with --overwrite, and the source survives."""
    src = tmp_path / "parent" / "model"
    shutil.copytree(sources[("float32", "safetensors")], src)
    (tmp_path / "parent" / "notes.txt").write_text("mine")
    dst = {
        "same": src,
        "dst is the parent": tmp_path / "parent",
        "dst inside src": src / "converted",
        "dst links to the parent": tmp_path / "link",
    }[layout]
    os.symlink(tmp_path / "parent", tmp_path / "link")
    before = sorted(os.listdir(src))
    err = _assert_fails_cleanly(
        [str(src), str(dst), "--to", "hf", "--overwrite"], dst, capsys, "CheckpointError", str(src), str(dst),
    )
    assert "choose a DST outside SRC" in err
    assert sorted(os.listdir(src)) == before and (tmp_path / "parent" / "notes.txt").read_text() == "mine"
    assert_dirs_identical(sources[("float32", "safetensors")], str(src))


# ---------------------------------------------------------------------------------- Flax storage vs docs
def test_flax_params_are_stored_uncompressed_as_documented(sources, tmp_path):
    """Every array of a written Flax checkpoint is zarr v2 with no compressor (read from the OCDBT store
    orbax wrote), and docs/checkpoint-format.md says so."""
    import tensorstore as ts

    convert(sources[("float32", "safetensors")], tmp_path / "flax", to="flax", **QUIET)
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{tmp_path / 'flax' / 'params'}"}).result()
    metas = [k for k in kv.list().result() if k.endswith(b"/.zarray")]
    assert len(metas) == len(table.expected_shapes(CONFIG, "causal_lm"))
    for key in metas:
        meta = json.loads(kv.read(key).result().value)
        assert meta["zarr_format"] == 2 and meta["compressor"] is None and meta["filters"] is None, (key, meta)
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "checkpoint-format.md"), encoding="utf-8").read()
    layout = doc[doc.index("<ckpt>/params/"):]
    layout = layout[: layout.index("```")]
    assert "uncompressed" in layout and '"compressor": null' in layout and "zarr v2" in layout, layout
    assert "zstd" not in layout and "zarr3" not in layout, layout


# ------------------------------------------------------------------------------ killed writers' leftovers
def _big_source(root) -> str:
    """A ~140 MB float32 checkpoint saved by transformers: big enough that a conversion is still writing
    when the test kills it."""
    import transformers
    from conftest import hf_config

    cfg = CONFIG.replace(vocab_size=16384, n_embd=512, n_layer=6, n_head=8, rotary_dim=16)
    torch.manual_seed(0)
    transformers.GPTJForCausalLM(hf_config(cfg)).save_pretrained(root / "big")
    return str(root / "big")


def _siblings(dst) -> list[str]:
    parent, base = os.path.dirname(dst), os.path.basename(dst)
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{base}.tmp-") or n.startswith(f".{base}.old-"))


def test_rerun_removes_temp_dir_of_killed_convert(sources, tmp_path, capsys):
    """`gptj-jax convert` killed with -9 mid-write leaves its temporary sibling; the next write to the same
    DST removes it and says so on stderr. A sibling whose writer is alive, one with no marker of ours and
    one whose marker names another host are left alone; so is a stale `.old-` sibling while DST is missing."""
    import signal
    import subprocess
    import sys
    import time

    from gptj_jax.convert import staging

    src, dst = _big_source(tmp_path), str(tmp_path / "out")
    # A live writer of the same DST (another process, inside staged_dir until its stdin closes).
    live_code = "import sys; from gptj_jax.convert.staging import staged_dir\n" \
                "with staged_dir(sys.argv[1]) as tmp:\n    print(tmp, flush=True); sys.stdin.read(); raise SystemExit(3)"
    live = subprocess.Popen([sys.executable, "-c", live_code, dst], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        live_tmp = live.stdout.readline().strip()
        assert os.path.isdir(live_tmp)

        cmd = [sys.executable, "-m", "gptj_jax.cli", "convert", src, dst, "--to", "hf", "--quiet", "--no-tokenizer"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        stale = None
        while stale is None and time.monotonic() < deadline and proc.poll() is None:
            for name in _siblings(dst):
                path = str(tmp_path / name)
                if path != live_tmp and any(not n.startswith(".") for n in os.listdir(path)):  # writing weights
                    stale = path
            time.sleep(0.002)
        assert stale is not None, proc.communicate()
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        assert not os.path.exists(dst) and os.path.isdir(stale)  # killed mid-write: the leftover this is about
        mine = tmp_path / ".out.tmp-mine"  # not ours: no marker
        mine.mkdir()
        (mine / "keep.txt").write_text("mine")

        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        assert not os.path.exists(stale)
        lines = [line for line in rerun.stderr.splitlines() if "stale" in line]
        assert len(lines) == 1, rerun.stderr
        assert f"removed stale {stale} (" in lines[0] and f"left by process {proc.pid} on " in lines[0], lines
        assert re.search(r"\(\d+(\.\d)? (GB|MB|kB|B) on disk\)", lines[0]), lines
        assert os.path.isdir(live_tmp) and (mine / "keep.txt").read_text() == "mine"
        assert detect_format(dst) == "hf"

        # Markers naming the killed process: on another host (kept), and a parked old DST (kept while DST
        # is missing, removed by the next write once DST is back).
        record = json.loads(open(os.path.join(live_tmp, staging.MARKER)).read())
        assert record["pid"] == live.pid
        other_host = tmp_path / ".out.tmp-otherhost"
        other_host.mkdir()
        (other_host / staging.MARKER).write_text(json.dumps(dict(record, pid=proc.pid, host=record["host"] + "-x")))
        old = tmp_path / ".out.old-killed"
        (old / "data").mkdir(parents=True)
        (old / "data" / "config.json").write_text("{}")
        (old / staging.MARKER).write_text(json.dumps(dict(record, pid=proc.pid)))
        os.rename(dst, tmp_path / "away")
        capsys.readouterr()
        convert(sources[("float32", "safetensors")], dst, to="hf", **QUIET)
        assert f"keeping {old}" in capsys.readouterr().err and (old / "data" / "config.json").is_file()
        convert(sources[("float32", "safetensors")], dst, to="hf", overwrite=True, **QUIET)
        assert f"removed stale {old} (" in capsys.readouterr().err and not old.exists()
        assert other_host.is_dir() and mine.is_dir() and os.path.isdir(live_tmp)
    finally:
        live.communicate("", timeout=60)
    assert live.returncode == 3 and not os.path.exists(live_tmp)

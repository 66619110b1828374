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
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import hf_model
from convert_helpers import BATCH, CONFIG, QUIET, TORCH_DTYPES, assert_dirs_identical, hf_logits, same_bits

from gptj_jax.convert import CheckpointError, convert, detect_format, mtj, restore_flax, table
from gptj_jax.convert import cli as convert_cli
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
    code = convert_cli.main(argv + ["--quiet", "--no-tokenizer"])
    return code, capsys.readouterr().err.strip()


def test_cli_converts(sources, tmp_path, capsys):
    code, err = _cli([sources[("bfloat16", "sharded")], str(tmp_path / "out"), "--to", "flax"], capsys)
    assert code == 0, err
    code, err = _cli([str(tmp_path / "out"), str(tmp_path / "hf"), "--to", "hf", "--dtype", "float32", "--max-shard-size", "1GB"], capsys)
    assert code == 0, err
    assert os.listdir(tmp_path / "hf") and (tmp_path / "hf" / "model.safetensors").is_file()


def test_cli_registered_in_main_entry_point(sources, tmp_path, capsys):
    from gptj_jax import cli

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

"""Hugging Face Flax checkpoints (``flax_model.msgpack``, Transformers 4.x ``FlaxGPTJForCausalLM``): read and write.

Issue 11's HF Flax items: a msgpack written to the reference layout (``shared/reference/hf-flax-format.md``)
by flax.serialization itself, single and sharded (as Transformers 4.x ``save_pretrained`` wrote it),
chunked arrays included, with and without the ``transformer/`` prefix, reads back exact; our
``--to hf-flax`` output is the bytes flax.serialization writes for the same tree (shards and index as
Transformers cut them); HF -> hf-flax -> HF is bit-exact with transformers' logits; a truncated file, a
corrupt header or a misshapen tensor is one error line naming file and tensor, and nothing is written.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import flax.serialization
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import hf_model
from convert_helpers import BATCH, CONFIG, QUIET, TORCH_DTYPES, assert_dirs_identical, hf_logits, same_bits
from flax.traverse_util import flatten_dict, unflatten_dict

from gptj_jax import cli
from gptj_jax.convert import CheckpointError, HFFlaxReader, HFFlaxWriter, convert, detect_format
from gptj_jax.convert.hf_flax import scan

LAYER = ("ln_1/scale", "ln_1/bias", "attn/q_proj/kernel", "attn/k_proj/kernel", "attn/v_proj/kernel",
         "attn/out_proj/kernel", "mlp/fc_in/kernel", "mlp/fc_in/bias", "mlp/fc_out/kernel", "mlp/fc_out/bias")


def flax_flat(model, dtype=np.float32) -> dict[str, np.ndarray]:
    """FlaxGPTJForCausalLM's params for a transformers GPT-J, as the reference doc lists them (in the Flax
    model's init order): ``{"transformer/h/0/attn/q_proj/kernel": [in, out] array, ...}``."""
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    def get(name: str, transpose: bool = False) -> np.ndarray:
        array = state[name].T if transpose else state[name]
        return np.ascontiguousarray(array).astype(dtype)

    flat = {"transformer/wte/embedding": get("transformer.wte.weight")}
    for i in range(CONFIG.n_layer):
        for leaf in LAYER:
            module, kind = leaf.rsplit("/", 1)
            torch_name = f"transformer.h.{i}.{module.replace('/', '.')}." + ("bias" if kind == "bias" else "weight")
            flat[f"transformer/h/{i}/{leaf}"] = get(torch_name, transpose=kind == "kernel")
    flat["transformer/ln_f/scale"] = get("transformer.ln_f.weight")
    flat["transformer/ln_f/bias"] = get("transformer.ln_f.bias")
    flat["lm_head/kernel"] = get("lm_head.weight", transpose=True)
    flat["lm_head/bias"] = get("lm_head.bias")
    return flat


def ours(key: str) -> str:
    """Our param path for an HF-Flax key (written out here, independent of the package's table)."""
    parts = key.split("/")
    k = parts.index("h") if "h" in parts else -1
    if k >= 0:
        parts[k : k + 2] = [f"h_{parts[k + 1]}"]
    return "/".join(parts)


def write_single(directory, flat: dict, config_from) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "flax_model.msgpack"), "wb") as f:
        f.write(flax.serialization.to_bytes(unflatten_dict(flat, sep="/")))
    shutil.copy(os.path.join(config_from, "config.json"), directory)


def transformers_shards(flat: dict, max_bytes: int) -> tuple[dict[str, dict], dict]:
    """Transformers 4.x ``flax_shard_checkpoint``: cut the flat params in order, a new shard when the next
    tensor would pass ``max_bytes``; ``({shard file: flat shard}, index)``."""
    blocks, current, size, total = [], {}, 0, 0
    for key, array in flat.items():
        if size + array.nbytes > max_bytes:
            blocks.append(current)
            current, size = {}, 0
        current[key] = array
        size += array.nbytes
        total += array.nbytes
    blocks.append(current)
    shards = {f"flax_model-{k + 1:05d}-of-{len(blocks):05d}.msgpack": block for k, block in enumerate(blocks)}
    weight_map = {key: file for file, block in shards.items() for key in block}
    return shards, {"metadata": {"total_size": total}, "weight_map": weight_map}


def write_sharded(directory, flat: dict, config_from, max_bytes: int = 20_000) -> dict:
    """What Transformers 4.x ``save_pretrained(max_shard_size=...)`` wrote: each shard
    ``to_bytes(unflatten_dict(shard, sep="/"))``, the index ``json.dumps(indent=2, sort_keys=True)``."""
    os.makedirs(directory, exist_ok=True)
    shards, index = transformers_shards(flat, max_bytes)
    assert len(shards) > 2
    for file, shard in shards.items():
        with open(os.path.join(directory, file), "wb") as f:
            f.write(flax.serialization.to_bytes(unflatten_dict(shard, sep="/")))
    with open(os.path.join(directory, "flax_model.msgpack.index.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    shutil.copy(os.path.join(config_from, "config.json"), directory)
    return index


@pytest.fixture(scope="module")
def model():
    return hf_model(CONFIG, "causal_lm", seed=11)


@pytest.fixture(scope="module")
def sources(model, tmp_path_factory):
    """The model as HF directories: {(dtype, kind): dir}."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for dtype, kind in [("float32", "single"), ("bfloat16", "sharded"), ("float16", "single")]:
        path = root / f"{dtype}-{kind}"
        copy.deepcopy(model).to(TORCH_DTYPES[dtype]).save_pretrained(
            path, **({"max_shard_size": "20KB"} if kind == "sharded" else {})
        )
        out[(dtype, kind)] = str(path)
    return out


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what building the models printed
    code = cli.main(["convert", *argv, "--quiet", "--no-tokenizer"])
    return code, capsys.readouterr().err.strip()


# --------------------------------------------------------------------------- reading what flax wrote
@pytest.mark.parametrize("layout", ["single", "sharded", "single-chunked", "sharded-chunked"])
def test_reads_flax_serialization_output_exactly(layout, model, sources, tmp_path, monkeypatch):
    """Files written by flax.serialization.to_bytes (as Transformers 4.x saved them) read back bit-exact,
    whole and by blocks, and convert to an HF directory bit-identical to the model's own."""
    src = sources[("float32", "single")]
    flat = flax_flat(model)
    if layout.endswith("chunked"):
        monkeypatch.setattr(flax.serialization, "MAX_CHUNK_SIZE", 1000)  # arrays over 1000 bytes chunk
    path = tmp_path / "flax"
    if layout.startswith("single"):
        write_single(path, flat, src)
        files = [path / "flax_model.msgpack"]
    else:
        index = write_sharded(path, flat, src)
        files = [path / f for f in sorted(set(index["weight_map"].values()))]
    raw = b"".join(f.read_bytes() for f in files)
    assert (b"__msgpack_chunked_array__" in raw) == layout.endswith("chunked")
    assert detect_format(str(path)) == "hf-flax"

    with HFFlaxReader(path) as reader:
        assert reader.head == "causal_lm" and sorted(reader.paths) == sorted(ours(k) for k in flat)
        for key, want in flat.items():
            p = ours(key)
            assert reader.shape(p) == want.shape and reader.dtype(p) == want.dtype
            assert reader.key_of(p) == key
            assert same_bits(reader.read(p), want), key
        wte, fc_in = "transformer/wte/embedding", "transformer/h/1/mlp/fc_in/kernel"
        assert reader.entry(wte).chunked == layout.endswith("chunked")
        for key, index in [
            (wte, (slice(16, 48), slice(None))),  # a row block (of a 17-chunk array when chunked)
            (wte, (slice(None), slice(8, 16))),  # a column block
            (wte, (slice(127, 2, -7), slice(1, 30, 3))),
            (wte, (5,)),
            (fc_in, (slice(None), slice(64, 96))),
        ]:
            assert same_bits(reader.read_slice(ours(key), index), flat[key][index]), (key, index)

    back = tmp_path / "back"
    convert(path, back, to="hf", **QUIET)
    assert_dirs_identical(src, str(back))


@pytest.mark.parametrize("prefixed", [True, False])
def test_base_model_file_with_or_without_prefix(prefixed, model, sources, tmp_path):
    """FlaxGPTJModel saved its tree without ``transformer/`` (and without lm_head); Transformers 4.x read
    either form into either class. Ours: the prefixed causal LM file read with head="base" takes its
    ``transformer/`` subtree and ignores lm_head; the unprefixed file is a base model."""
    flat = flax_flat(model)
    base = {k.removeprefix("transformer/"): v for k, v in flat.items() if k.startswith("transformer/")}
    write_single(tmp_path / "flax", flat if prefixed else base, sources[("float32", "single")])
    with HFFlaxReader(tmp_path / "flax", head="base" if prefixed else None) as reader:
        assert reader.head == "base" and reader.prefixed == prefixed
        assert reader.ignored == (["lm_head/kernel", "lm_head/bias"] if prefixed else [])
        assert sorted(reader.paths) == sorted(ours(k) for k in base)
        for key, want in base.items():
            assert same_bits(reader.read(ours(key)), want), key
    if not prefixed:  # the convert pipeline writes it as an HF GPTJModel
        convert(tmp_path / "flax", tmp_path / "hf", to="hf", **QUIET)
        assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["GPTJModel"]
        convert(tmp_path / "hf", tmp_path / "again", to="hf-flax", **QUIET)
        assert (tmp_path / "again" / "flax_model.msgpack").read_bytes() == (tmp_path / "flax" / "flax_model.msgpack").read_bytes()


def test_unprefixed_causal_lm_file_reads_as_causal_lm(model, sources, tmp_path):
    flat = flax_flat(model)
    bare = {k.removeprefix("transformer/"): v for k, v in flat.items()}
    write_single(tmp_path / "flax", bare, sources[("float32", "single")])
    with HFFlaxReader(tmp_path / "flax") as reader:
        assert reader.head == "causal_lm" and not reader.prefixed
        assert reader.key_of("transformer/h_1/attn/v_proj/kernel") == "h/1/attn/v_proj/kernel"
        for key, want in flat.items():
            assert same_bits(reader.read(ours(key)), want), key


def test_reader_params_give_transformers_logits(model, sources, tmp_path):
    """Our model on the params read from a flax-written file matches transformers (float32, <= 1e-4)."""
    import jax.numpy as jnp

    from gptj_jax.convert.table import unflatten
    from gptj_jax.model import model_for

    write_single(tmp_path / "flax", flax_flat(model), sources[("float32", "single")])
    with HFFlaxReader(tmp_path / "flax") as reader:
        params = unflatten(dict(reader.iter_tensors()))
    ids, mask, pos = BATCH
    logits = model_for(CONFIG, "causal_lm").apply(
        {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(pos)
    ).logits
    np.testing.assert_allclose(np.asarray(logits), hf_logits(sources[("float32", "single")]).numpy(), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- what we write
def test_single_file_output_is_flax_serialization_bytes(model, sources, tmp_path, capsys):
    """``gptj-jax convert --to hf-flax``: flax_model.msgpack is byte for byte ``flax.serialization.to_bytes``
    of the FlaxGPTJForCausalLM param tree; config.json, generation_config.json and the tokenizer come along."""
    import transformers

    src = sources[("float32", "single")]
    assert cli.main(["convert", src, str(tmp_path / "out"), "--to", "hf-flax", "--quiet"]) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    data = (out / "flax_model.msgpack").read_bytes()
    assert data == flax.serialization.to_bytes(unflatten_dict(flax_flat(model), sep="/"))
    assert not (out / "flax_model.msgpack.index.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GPTJForCausalLM"] and cfg["torch_dtype"] == "float32"
    assert cfg["tie_word_embeddings"] is False
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == CONFIG.eos_token_id
    assert transformers.AutoTokenizer.from_pretrained(str(out))("Hello world")["input_ids"] == [15496, 995]
    assert detect_format(str(out)) == "hf-flax"


def test_sharded_output_matches_transformers_sharding(model, sources, tmp_path):
    """Above --max-shard-size: shards cut and named as Transformers 4.x did, each the to_bytes of its nested
    dict (and restoring with msgpack_restore to exactly its params), the index byte for byte."""
    src = sources[("bfloat16", "sharded")]
    summary = convert(src, tmp_path / "out", to="hf-flax", max_shard_size="20KB", **QUIET)
    assert summary.dst_format == "hf-flax" and summary.dtype == "bfloat16"
    flat = flax_flat(model, ml_dtypes.bfloat16)
    shards, index = transformers_shards(flat, 20_000)
    assert summary.bytes == index["metadata"]["total_size"] == 2 * CONFIG.num_params("causal_lm")
    out = tmp_path / "out"
    assert (out / "flax_model.msgpack.index.json").read_text() == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert sorted(os.listdir(out)) == sorted([*shards, "flax_model.msgpack.index.json", "config.json", "generation_config.json"])
    for file, shard in shards.items():
        data = (out / file).read_bytes()
        assert data == flax.serialization.to_bytes(unflatten_dict(shard, sep="/")), file
        restored = flatten_dict(flax.serialization.msgpack_restore(data), sep="/")
        assert list(restored) == list(shard)
        for key, array in shard.items():
            assert same_bits(np.asarray(restored[key]), array), key


def test_writer_chunks_big_arrays_as_flax_does(model, tmp_path, monkeypatch):
    """HFFlaxWriter stores an array above ``chunk_size`` as flax's chunked map, byte for byte (flax's
    MAX_CHUNK_SIZE lowered to match), written in any order; the reader reads it back exactly."""
    flat = flax_flat(model)
    monkeypatch.setattr(flax.serialization, "MAX_CHUNK_SIZE", 1000)
    writer = HFFlaxWriter(tmp_path / "w", [(k, a.shape, a.dtype) for k, a in flat.items()], chunk_size=1000)
    for key in reversed(list(flat)):
        writer.write(key, flat[key])
    assert writer.close() == [str(tmp_path / "w" / "flax_model.msgpack")]
    data = (tmp_path / "w" / "flax_model.msgpack").read_bytes()
    assert data == flax.serialization.to_bytes(unflatten_dict(flat, sep="/"))
    entries = scan(tmp_path / "w" / "flax_model.msgpack")
    assert list(entries) == list(flat)
    assert len(entries["transformer/wte/embedding"].spans) == 128 * 32 * 4 // 1000 + 1
    assert len(entries["transformer/h/0/ln_1/scale"].spans) == 1


@pytest.mark.parametrize("dtype,kind", [("float32", "single"), ("bfloat16", "sharded"), ("float16", "single")])
def test_hf_to_hf_flax_to_hf_is_bit_exact(dtype, kind, sources, tmp_path):
    src = sources[(dtype, kind)]
    s1 = convert(src, tmp_path / "flax", to="hf-flax", max_shard_size="30KB", **QUIET)
    assert (tmp_path / "flax" / "flax_model.msgpack.index.json").is_file()
    assert s1.dtype == dtype and s1.parameters == CONFIG.num_params("causal_lm")
    s2 = convert(tmp_path / "flax", tmp_path / "back", to="hf", **QUIET)
    assert s2.src_format == "hf-flax" and s2.bytes == s1.bytes
    assert_dirs_identical(src, str(tmp_path / "back"))
    assert torch.equal(hf_logits(str(tmp_path / "back")), hf_logits(src))


def test_dtype_cast_on_the_way(model, sources, tmp_path):
    convert(sources[("float32", "single")], tmp_path / "bf16", to="hf-flax", dtype="bfloat16", **QUIET)
    with HFFlaxReader(tmp_path / "bf16") as reader:
        for key, want in flax_flat(model).items():
            assert same_bits(reader.read(ours(key)), want.astype(ml_dtypes.bfloat16)), key
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_tied_source_reads_and_writes_both_tensors(tmp_path):
    """A tied HF checkpoint (no lm_head.weight) written as hf-flax holds lm_head/kernel = wte.T and says
    tie_word_embeddings: false; a tied config over a file without lm_head/kernel reads it as wte.T."""
    m = hf_model(CONFIG.replace(tie_word_embeddings=True), "causal_lm", seed=9)
    m.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "flax", to="hf-flax", **QUIET)
    assert json.loads((tmp_path / "flax" / "config.json").read_text())["tie_word_embeddings"] is False
    with HFFlaxReader(tmp_path / "flax") as reader:
        assert not reader.tied
        wte = reader.read("transformer/wte/embedding")
        assert same_bits(reader.read("lm_head/kernel"), np.ascontiguousarray(wte.T))

    flat = flax_flat(m)
    del flat["lm_head/kernel"]
    write_single(tmp_path / "tied", flat, str(tmp_path / "src"))
    with HFFlaxReader(tmp_path / "tied") as reader:
        assert reader.tied and reader.shape("lm_head/kernel") == (32, 128)
        assert same_bits(reader.read("lm_head/kernel"), np.ascontiguousarray(wte.T))
        assert same_bits(reader.read_slice("lm_head/kernel", (slice(None), slice(8, 24))), wte.T[:, 8:24])
    convert(tmp_path / "tied", tmp_path / "hf", to="hf", **QUIET)
    assert_dirs_identical(str(tmp_path / "src"), str(tmp_path / "hf"))


def test_detection_prefers_pytorch_weights(sources, tmp_path):
    """A directory with both (like the hub's EleutherAI/gpt-j-6B main branch) is read as HF PyTorch."""
    path = tmp_path / "both"
    shutil.copytree(sources[("float32", "single")], path)
    convert(sources[("float32", "single")], tmp_path / "flax", to="hf-flax", **QUIET)
    shutil.copy(tmp_path / "flax" / "flax_model.msgpack", path)
    assert detect_format(str(path)) == "hf"


# --------------------------------------------------------------------------- bad input
def _assert_fails_cleanly(argv: list[str], dst, capsys, *patterns: str) -> str:
    """Exit code 1, one stderr line containing every pattern, DST not created, no temp dirs left."""
    code, err = _cli(argv, capsys)
    assert code == 1
    assert len(err.splitlines()) == 1, err
    for pattern in patterns:
        assert pattern in err, (pattern, err)
    assert not os.path.exists(dst)
    parent = os.path.dirname(os.path.abspath(dst))
    assert not [n for n in os.listdir(parent) if n.startswith(f".{os.path.basename(dst)}.")], os.listdir(parent)
    return err


@pytest.fixture()
def flax_dir(sources, tmp_path):
    convert(sources[("float32", "single")], tmp_path / "flax", to="hf-flax", **QUIET)
    return tmp_path / "flax"


def test_truncated_in_tensor_data(flax_dir, tmp_path, capsys):
    file = flax_dir / "flax_model.msgpack"
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 100)
    _assert_fails_cleanly(
        [str(flax_dir), str(tmp_path / "dst"), "--to", "hf"], tmp_path / "dst", capsys,
        "CheckpointError", f"{file}: truncated file: tensor 'lm_head/bias' (128,) float32 needs bytes "
        f"{size - 512}..{size} but the file has {size - 100}",
    )


def test_truncated_in_a_header(flax_dir, tmp_path, capsys):
    file = flax_dir / "flax_model.msgpack"
    start = scan(file)["lm_head/bias"].spans[0][0]
    with open(file, "r+b") as f:
        f.truncate(start - 5)  # inside lm_head/bias's ExtType header
    _assert_fails_cleanly(
        [str(flax_dir), str(tmp_path / "dst"), "--to", "hf"], tmp_path / "dst", capsys,
        f"{file}: truncated file: it ends at byte {start - 5} inside the msgpack header of 'lm_head/bias'",
    )


def test_misshapen_tensor(model, sources, tmp_path, capsys):
    """A tensor whose shape disagrees with config.json, single and sharded (the error names the shard)."""
    flat = flax_flat(model)
    flat["transformer/h/1/mlp/fc_in/kernel"] = flat["transformer/h/1/mlp/fc_in/kernel"][:, :64].copy()
    write_single(tmp_path / "single", flat, sources[("float32", "single")])
    _assert_fails_cleanly(
        [str(tmp_path / "single"), str(tmp_path / "dst"), "--to", "flax"], tmp_path / "dst", capsys,
        f"{tmp_path / 'single' / 'flax_model.msgpack'}: tensor 'transformer/h/1/mlp/fc_in/kernel' has shape (32, 64) "
        "but the config implies (32, 128)",
    )
    index = write_sharded(tmp_path / "sharded", flat, sources[("float32", "single")])
    shard = index["weight_map"]["transformer/h/1/mlp/fc_in/kernel"]
    _assert_fails_cleanly(
        [str(tmp_path / "sharded"), str(tmp_path / "dst"), "--to", "hf-flax"], tmp_path / "dst", capsys,
        f"{tmp_path / 'sharded' / shard}: tensor 'transformer/h/1/mlp/fc_in/kernel' has shape (32, 64)",
    )


def _header_of(file, key: str) -> tuple[bytearray, int]:
    """The file's bytes and the offset of ``key``'s array header (0x93 shape dtype bin-length)."""
    raw = bytearray(file.read_bytes())
    start = scan(file)[key].spans[0][0]
    head = b"\x93\x92\x20\x20\xa7float32\xc5\x10\x00"  # ([32, 32], "float32", bin16 of 4096 bytes)
    assert raw[start - len(head) : start] == head
    return raw, start - len(head)


def test_byte_count_disagrees_with_shape(flax_dir, tmp_path, capsys):
    file = flax_dir / "flax_model.msgpack"
    raw, at = _header_of(file, "transformer/h/0/attn/q_proj/kernel")
    raw[at + 3] = 0x1F  # shape [32, 31]; the data still holds 32 x 32 floats
    file.write_bytes(bytes(raw))
    _assert_fails_cleanly(
        [str(flax_dir), str(tmp_path / "dst"), "--to", "hf"], tmp_path / "dst", capsys,
        f"{file}: tensor 'transformer/h/0/attn/q_proj/kernel': header gives 4096 bytes for shape (32, 31) float32, "
        "which needs 3968",
    )


@pytest.mark.parametrize("damage,message", [
    ("dtype", "unsupported array dtype 'floatXX'"),
    ("type", "unknown msgpack type byte 0xc1"),
    ("length", "ExtType length"),
])
def test_corrupt_header(damage, message, flax_dir, tmp_path, capsys):
    file = flax_dir / "flax_model.msgpack"
    key = "transformer/h/1/attn/k_proj/kernel"
    raw, at = _header_of(file, key)
    assert raw[at - 4] == 0xC8 and raw[at - 1] == 0x01  # ext16 marker, 2 length bytes, ExtType code 1
    if damage == "dtype":
        raw[at + 10 : at + 12] = b"XX"  # "float32" -> "floatXX"
    elif damage == "type":
        raw[at - 4] = 0xC1  # the value's type byte: never used by msgpack
    else:
        raw[at - 2] ^= 0x01  # the ExtType's length
    file.write_bytes(bytes(raw))
    pos = {"dtype": at + 4, "type": at - 4, "length": at - 4}[damage]
    where = f"'{key}'"
    _assert_fails_cleanly(
        [str(flax_dir), str(tmp_path / "dst"), "--to", "hf"], tmp_path / "dst", capsys,
        f"{file}: corrupt msgpack header at byte {pos} in {where}: {message}",
    )
    with pytest.raises(CheckpointError, match="corrupt msgpack header"):
        HFFlaxReader(flax_dir)


def test_shard_missing_and_index_disagreeing(model, sources, tmp_path, capsys):
    index = write_sharded(tmp_path / "flax", flax_flat(model), sources[("float32", "single")])
    victim = index["weight_map"]["transformer/h/1/attn/q_proj/kernel"]
    os.rename(tmp_path / "flax" / victim, tmp_path / victim)
    _assert_fails_cleanly(
        [str(tmp_path / "flax"), str(tmp_path / "dst"), "--to", "hf"], tmp_path / "dst", capsys,
        "flax_model.msgpack.index.json: lists shard", victim, "does not exist",
    )
    os.rename(tmp_path / victim, tmp_path / "flax" / victim)
    first = index["weight_map"]["transformer/wte/embedding"]
    assert first != victim
    index["weight_map"]["transformer/h/1/attn/q_proj/kernel"] = first
    (tmp_path / "flax" / "flax_model.msgpack.index.json").write_text(json.dumps(index))
    _assert_fails_cleanly(
        [str(tmp_path / "flax"), str(tmp_path / "dst"), "--to", "hf"], tmp_path / "dst", capsys,
        "tensor 'transformer/h/1/attn/q_proj/kernel' is listed for this shard", "but is not in it",
    )


def test_head_without_flax_class_is_refused(tmp_path, capsys):
    hf_model(CONFIG, "sequence_classification", seed=3).save_pretrained(tmp_path / "src")
    _assert_fails_cleanly(
        [str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "hf-flax"], tmp_path / "dst", capsys,
        "GPTJForSequenceClassification checkpoint cannot be written as hf-flax",
    )

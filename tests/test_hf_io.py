"""HF checkpoints <-> our params: ``gptj_jax.convert.from_pretrained`` / ``save_pretrained``.

Directories are written by transformers' own ``save_pretrained`` (or ``torch.save`` for ``.bin``,
which transformers 5 no longer writes) and read back by transformers' ``from_pretrained``.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import HF_CLASSES, TINY, hf_model, left_padded_batch

from gptj_jax.config import ConfigError, GPTJConfig
from gptj_jax.convert import CheckpointError, from_pretrained, read_param, save_pretrained, table
from gptj_jax.convert.io import CheckpointReader, SafetensorsFile, parse_size

HEADS = list(HF_CLASSES)
CONFIG = TINY.replace(pad_token_id=0)  # sequence classification pools at the last non-pad token
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def assert_params_equal_state_dict(params, state_dict) -> None:
    """Every HF tensor equals our leaf (transposed as the table says), bit for bit and in dtype."""
    flat = table.flatten(params)
    names = [n for n in state_dict if not table.is_ignored_hf(n)]
    assert len(flat) == len(names)
    for name in names:
        path, transform = table.hf_to_ours(name)
        ours = np.asarray(flat[path])
        theirs = table.apply_transform(_np(state_dict[name]), transform)
        assert ours.dtype == theirs.dtype, name
        assert ours.shape == theirs.shape, name
        assert np.array_equal(ours.view(np.uint8), np.ascontiguousarray(theirs).view(np.uint8)), name


def _hf_load(cls_name: str, path: str, **kwargs):
    import transformers

    model, info = getattr(transformers, cls_name).from_pretrained(path, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    return model


@pytest.fixture(scope="module")
def hf_models():
    """One tiny random transformers model per head (float32, eval)."""
    return {head: hf_model(CONFIG, head, seed=i) for i, head in enumerate(HEADS)}


@pytest.fixture(scope="module")
def saved(hf_models, tmp_path_factory):
    """Each model saved by transformers as model.safetensors."""
    out = {}
    for head, model in hf_models.items():
        path = str(tmp_path_factory.mktemp(f"hf_{head}"))
        model.save_pretrained(path)
        out[head] = path
    return out


# ---------------------------------------------------------------------------------------------- table
def test_table_both_directions_agree():
    for head in HEADS:
        shapes = table.expected_shapes(CONFIG, head)
        assert len(shapes) == len(set(shapes))
        for name, shape in shapes.items():
            path, transform = table.hf_to_ours(name)
            assert table.ours_to_hf(path) == (name, transform)
            assert table.expected_param_shapes(CONFIG, head)[path] == table.transform_shape(shape, transform)
    assert table.hf_to_ours("transformer.h.11.attn.q_proj.weight") == ("transformer/h_11/attn/q_proj/kernel", "T")
    assert table.ours_to_hf("h_0/mlp/fc_out/bias") == ("h.0.mlp.fc_out.bias", "")
    assert table.is_ignored_hf("transformer.h.3.attn.masked_bias") and table.is_ignored_hf("h.0.attn.bias")
    with pytest.raises(KeyError, match="not a GPT-J tensor"):
        table.hf_to_ours("transformer.h.0.attn.c_attn.weight")


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (17, 4099), (4100, 33), (64, 64)])
def test_transpose_copy(shape):
    a = np.random.RandomState(0).randn(*shape).astype(ml_dtypes.bfloat16)
    t = table.transpose_copy(a)
    assert t.flags.c_contiguous and t.dtype == a.dtype
    assert np.array_equal(t, a.T)
    assert np.array_equal(table.transpose_copy(a, rows=2, cols=3), a.T)


def test_expected_shapes_match_transformers(hf_models):
    for head, model in hf_models.items():
        theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert table.expected_shapes(CONFIG, head) == theirs


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("200KB") == 200_000
    assert parse_size("1GiB") == 2**30
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot parse"):
        parse_size("five gigs")


# ------------------------------------------------------------------------------------------ HF -> ours
@pytest.mark.parametrize("head", HEADS)
def test_read_safetensors_every_head(head, hf_models, saved):
    config, params = from_pretrained(saved[head])
    assert config == GPTJConfig.from_pretrained(saved[head])
    assert table.head_of(params) == head
    assert table.architecture_of(params) == HF_CLASSES[head]
    assert_params_equal_state_dict(params, hf_models[head].state_dict())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_read_half_precision_keeps_dtype_bits(dtype, hf_models, tmp_path):
    model = copy.deepcopy(hf_models["causal_lm"]).to(TORCH_DTYPES[dtype])
    model.save_pretrained(tmp_path)
    _, params = from_pretrained(tmp_path)
    assert_params_equal_state_dict(params, model.state_dict())
    _, params32 = from_pretrained(tmp_path, dtype="float32")
    wte = np.asarray(params32["transformer"]["wte"]["embedding"])
    assert wte.dtype == np.float32
    assert np.array_equal(wte, _np(model.state_dict()["transformer.wte.weight"]).astype(np.float32))


def test_read_sharded_safetensors(hf_models, tmp_path):
    model = hf_models["causal_lm"]
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    _, params = from_pretrained(tmp_path)
    assert_params_equal_state_dict(params, model.state_dict())


def _write_bin(state_dict: dict, directory, shards: int = 1) -> None:
    """What transformers 4 wrote with safe_serialization=False: pytorch_model.bin, or shards + index."""
    names = list(state_dict)
    if shards == 1:
        torch.save(state_dict, os.path.join(directory, "pytorch_model.bin"))
        return
    weight_map = {}
    for k, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({names[i]: state_dict[names[i]] for i in part}, os.path.join(directory, file))
        weight_map.update({names[i]: file for i in part})
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("shards", [1, 3])
def test_read_bin_with_old_buffers(shards, hf_models, tmp_path):
    model = hf_models["causal_lm"]
    model.config.save_pretrained(tmp_path)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    # Old GPT-J checkpoints carry these buffers; transformers ignores them and so must we.
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8, dtype=torch.bool))
    state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e9)
    _write_bin(state, tmp_path, shards)
    _, params = from_pretrained(tmp_path)
    assert_params_equal_state_dict(params, state)


def test_read_param_slices_lazily(saved, hf_models):
    """The partitioned loader's entry point: a slice of our layout, read from the file's layout."""
    state = hf_models["causal_lm"].state_dict()
    with CheckpointReader(saved["causal_lm"]) as reader:
        q = read_param(reader, "transformer/h_1/attn/q_proj/kernel", (slice(None), slice(8, 16)))
        assert q.shape == (CONFIG.n_embd, 8)
        np.testing.assert_array_equal(q, state["transformer.h.1.attn.q_proj.weight"].numpy().T[:, 8:16])
        wte = read_param(reader, "transformer/wte/embedding", (slice(10, 20),), dtype="bfloat16")
        assert wte.dtype == np.dtype(ml_dtypes.bfloat16) and wte.shape == (10, CONFIG.n_embd)
        np.testing.assert_array_equal(
            wte, state["transformer.wte.weight"].numpy()[10:20].astype(ml_dtypes.bfloat16)
        )


# ------------------------------------------------------------------------------------------ ours -> HF
@pytest.mark.parametrize("head", HEADS)
def test_save_loads_in_transformers_every_head(head, hf_models, saved, tmp_path):
    config, params = from_pretrained(saved[head])
    save_pretrained(tmp_path, config, params)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    assert cfg["tie_word_embeddings"] is False
    assert cfg["architectures"] == [HF_CLASSES[head]]
    assert cfg["torch_dtype"] == "float32"
    assert os.path.isfile(tmp_path / "generation_config.json")
    reloaded = _hf_load(HF_CLASSES[head], str(tmp_path)).state_dict()
    for name, tensor in hf_models[head].state_dict().items():
        assert torch.equal(reloaded[name], tensor), name


def test_save_sharded_and_bin(hf_models, saved, tmp_path):
    config, params = from_pretrained(saved["causal_lm"], dtype="bfloat16")
    save_pretrained(tmp_path / "st", config, params, max_shard_size="20KB")
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all(os.path.isfile(tmp_path / "st" / f) for f in files)
    for f in files:  # every shard within the limit unless it holds a single bigger tensor
        with SafetensorsFile(tmp_path / "st" / f) as st:
            assert len(st.keys()) == 1 or os.path.getsize(tmp_path / "st" / f) <= 20_000 + 4096
    save_pretrained(tmp_path / "bin", config, params, safe_serialization=False)
    assert os.path.isfile(tmp_path / "bin" / "pytorch_model.bin")
    want = {k: v.to(torch.bfloat16) for k, v in hf_models["causal_lm"].state_dict().items()}
    for sub in ("st", "bin"):
        got = _hf_load("GPTJForCausalLM", str(tmp_path / sub)).state_dict()
        assert got["lm_head.weight"].dtype == torch.bfloat16
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), (sub, name)
        assert json.loads((tmp_path / sub / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_save_into_existing_dir_replaces_stale_shards(saved, tmp_path):
    config, params = from_pretrained(saved["causal_lm"])
    save_pretrained(tmp_path, config, params, max_shard_size="20KB")
    save_pretrained(tmp_path, config, params)
    assert sorted(f for f in os.listdir(tmp_path) if "safetensors" in f) == ["model.safetensors"]
    assert not [f for f in os.listdir(tmp_path.parent) if f.startswith(f".{tmp_path.name}.tmp")]


def test_save_rejects_params_that_disagree_with_config(saved, tmp_path):
    config, params = from_pretrained(saved["causal_lm"])
    bad = config.replace(n_inner=2 * config.n_embd)
    with pytest.raises(CheckpointError, match=r"transformer/h_0/mlp/fc_in/kernel.*\(32, 128\).*\(32, 64\)"):
        save_pretrained(tmp_path / "out", bad, params)
    assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------------------------------------ bad input
def _copy_with_state(saved_dir: str, dst, mutate) -> str:
    """dst = saved_dir's config + a model.safetensors whose state dict went through ``mutate``."""
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(saved_dir, "model.safetensors"))
    mutate(state)
    os.makedirs(dst, exist_ok=True)
    save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(saved_dir, "config.json")) as f:
        (dst / "config.json").write_text(f.read())
    return str(dst)


def test_missing_tensor(saved, tmp_path):
    path = _copy_with_state(saved["causal_lm"], tmp_path, lambda s: s.pop("transformer.h.1.mlp.fc_out.bias"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor 'transformer\.h\.1\.mlp\.fc_out\.bias', expected shape \(32,\)"):
        from_pretrained(path)


def test_extra_tensor(saved, tmp_path):
    def add(state):
        state["transformer.h.0.attn.c_proj.weight"] = torch.zeros(3, 4)

    path = _copy_with_state(saved["causal_lm"], tmp_path, add)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'transformer\.h\.0\.attn\.c_proj\.weight' \(3, 4\)"):
        from_pretrained(path)


def test_misshapen_tensor(saved, tmp_path):
    def shrink(state):
        state["transformer.h.0.mlp.fc_in.weight"] = state["transformer.h.0.mlp.fc_in.weight"][:100].clone()

    path = _copy_with_state(saved["causal_lm"], tmp_path, shrink)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'transformer\.h\.0\.mlp\.fc_in\.weight' has shape \(100, 32\) but the config implies \(128, 32\)",
    ):
        from_pretrained(path)


def test_missing_shard_listed_in_index(hf_models, tmp_path):
    hf_models["causal_lm"].save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["lm_head.weight"]
    os.remove(tmp_path / victim)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: lists shard {victim} .* does not exist"):
        from_pretrained(tmp_path)


def test_truncated_safetensors(saved, tmp_path):
    path = _copy_with_state(saved["causal_lm"], tmp_path, lambda s: None)
    file = os.path.join(path, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated file: tensor '.*' \(\d+(, \d+)*,?\) F32 needs bytes"):
        from_pretrained(path)


def test_config_missing_required_key(saved, tmp_path):
    path = _copy_with_state(saved["causal_lm"], tmp_path, lambda s: None)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["n_embd"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: missing required key\(s\) \['n_embd'\]"):
        from_pretrained(path)


def test_no_weights(tmp_path):
    CONFIG.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no weights found"):
        from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------- logits parity
def test_logits_after_round_trips(hf_models, saved, tmp_path):
    """HF file -> ours gives HF's logits (<= 1e-4); ours -> HF file -> transformers gives them exactly."""
    import jax.numpy as jnp

    from gptj_jax.model import model_for

    ids, mask, pos = left_padded_batch(CONFIG.vocab_size, [7, 4], seed=3)
    ids = np.where(mask == 1, ids % (CONFIG.vocab_size - 1) + 1, 0)  # pad id 0 only where padded
    for head in ("causal_lm", "sequence_classification", "question_answering"):
        hf = hf_models[head]
        with torch.no_grad():
            want = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
        config, params = from_pretrained(saved[head])
        out = model_for(config, head).apply(
            {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(pos)
        )
        if head == "question_answering":
            pairs = [(out.start_logits, want.start_logits), (out.end_logits, want.end_logits)]
        else:
            pairs = [(out.logits, want.logits)]
        for ours, theirs in pairs:
            np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4, rtol=0)

        save_pretrained(tmp_path / head, config, params)
        again = _hf_load(HF_CLASSES[head], str(tmp_path / head), attn_implementation="eager").eval()
        with torch.no_grad():
            got = again(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
        for key in ("start_logits", "end_logits") if head == "question_answering" else ("logits",):
            assert torch.equal(getattr(got, key), getattr(want, key)), (head, key)


def test_bin_without_torch_says_how_to_install(monkeypatch, tmp_path):
    from gptj_jax.convert import io

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ImportError, match=r"pip install gptj-jax\[torch\]"):
        io.TorchBinFile(tmp_path / "pytorch_model.bin")



# ------------------------------------------------------------------------------------ tied embeddings
def _causal_logits(config, params) -> np.ndarray:
    import jax.numpy as jnp

    from gptj_jax.model import model_for

    ids, mask, pos = _tied_batch()
    return np.asarray(model_for(config, "causal_lm").apply(
        {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(pos)
    ).logits)


def _tied_batch():
    ids, mask, pos = left_padded_batch(CONFIG.vocab_size, [7, 4], seed=3)
    return np.where(mask == 1, ids % (CONFIG.vocab_size - 1) + 1, 0), mask, pos


def _torch_logits(model) -> torch.Tensor:
    ids, mask, pos = _tied_batch()
    with torch.no_grad():
        return model.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A GPTJForCausalLM with tie_word_embeddings=True saved by transformers (no lm_head.weight in the file)."""
    model = hf_model(CONFIG.replace(tie_word_embeddings=True), "causal_lm", seed=21)
    assert model.lm_head.weight is model.transformer.wte.weight
    path = str(tmp_path_factory.mktemp("tied"))
    model.save_pretrained(path)
    with CheckpointReader(path) as reader:
        assert "lm_head.weight" not in reader.names and "lm_head.bias" in reader.names
    return model, path


def test_tied_checkpoint_loads_with_transformers_logits(tied, tmp_path):
    """from_pretrained on a tied checkpoint: lm_head kernel = wte^T, lm_head.bias from the file, logits
    within 1e-4 of transformers'; save_pretrained writes it back tied and transformers gets identical logits."""
    model, path = tied
    config, params = from_pretrained(path)
    assert config.tie_word_embeddings is True
    wte = model.transformer.wte.weight.detach().numpy()
    assert np.array_equal(np.asarray(params["lm_head"]["kernel"]), wte.T)
    assert np.array_equal(np.asarray(params["lm_head"]["bias"]), model.lm_head.bias.detach().numpy())
    want = _torch_logits(model)
    np.testing.assert_allclose(_causal_logits(config, params), want.numpy(), atol=1e-4, rtol=0)

    save_pretrained(tmp_path / "out", config, params)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    with CheckpointReader(tmp_path / "out") as reader:
        assert "lm_head.weight" not in reader.names and "lm_head.bias" in reader.names
    again = _hf_load("GPTJForCausalLM", str(tmp_path / "out"), attn_implementation="eager")
    assert torch.equal(_torch_logits(again), want)


@pytest.mark.parametrize("edit", ["both differ", "no wte"])
def test_tied_config_other_layouts_load_as_transformers(edit, tied, tmp_path):
    """tie_word_embeddings: true with both tensors in the file (different values): transformers 5 keeps
    both, untied; with lm_head.weight but no wte: wte is lm_head.weight. We load what transformers loads."""
    import shutil

    import transformers
    from safetensors.numpy import load_file, save_file

    _, path = tied
    shutil.copytree(path, tmp_path / "src")
    tensors = load_file(str(tmp_path / "src" / "model.safetensors"))
    other = np.random.RandomState(0).randn(CONFIG.vocab_size, CONFIG.n_embd).astype(np.float32)
    if edit == "both differ":
        tensors["lm_head.weight"] = other
    else:
        tensors["lm_head.weight"] = tensors.pop("transformer.wte.weight")
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    theirs, info = transformers.GPTJForCausalLM.from_pretrained(
        str(tmp_path / "src"), attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    config, params = from_pretrained(tmp_path / "src")
    assert np.array_equal(np.asarray(params["lm_head"]["kernel"]), theirs.lm_head.weight.detach().numpy().T)
    assert np.array_equal(np.asarray(params["transformer"]["wte"]["embedding"]), theirs.transformer.wte.weight.detach().numpy())
    np.testing.assert_allclose(_causal_logits(config, params), _torch_logits(theirs).numpy(), atol=1e-4, rtol=0)


def test_save_untied_params_with_tied_config_writes_both(tied, tmp_path):
    """A config that says tied, but params whose lm_head differs from wte^T: tie_word_embeddings false,
    both tensors written, and transformers reproduces our logits."""
    _, path = tied
    config, params = from_pretrained(path)
    params["lm_head"]["kernel"] = np.asarray(params["lm_head"]["kernel"]) * 1.5
    save_pretrained(tmp_path / "out", config, params)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    with CheckpointReader(tmp_path / "out") as reader:
        assert np.array_equal(reader.read("lm_head.weight"), params["lm_head"]["kernel"].T)
    again = _hf_load("GPTJForCausalLM", str(tmp_path / "out"), attn_implementation="eager")
    np.testing.assert_allclose(_torch_logits(again).numpy(), _causal_logits(config, params), atol=1e-4, rtol=0)


def test_tied_checkpoint_loads_sharded(tied):
    """The sharded load (gptj_jax.load onto a mesh) ties lm_head to wte too."""
    import jax

    from gptj_jax import load
    from gptj_jax import sharding as sh

    model, path = tied
    mesh = sh.make_mesh(1, 1, jax.device_count())
    config, params = load(path, mesh=mesh)
    assert np.array_equal(np.asarray(params["lm_head"]["kernel"]), model.transformer.wte.weight.detach().numpy().T)
    np.testing.assert_allclose(_causal_logits(config, jax.device_get(params)), _torch_logits(model).numpy(), atol=1e-4, rtol=0)

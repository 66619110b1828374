"""mesh-transformer-jax checkpoints: leaf order, file split, mp 1/2/4/8, slim and full, reader and writer.

The reader is checked against checkpoints from two independent builders: ``mtj.write`` (our writer)
and ``_build_like_mtj`` below, which lays params out as haiku modules, builds the optimizer state
with optax exactly as mesh-transformer-jax's training script does, and flattens / splits with
``jax.tree_util`` and ``np.array_split`` the way its ``checkpoint.py`` does.
"""

from __future__ import annotations

import copy
import json
import os
import zipfile

import jax
import ml_dtypes
import numpy as np
import optax
import pytest
import torch
from conftest import TINY, hf_model
from convert_helpers import CONFIG, QUIET, assert_dirs_identical, hf_logits

from gptj_jax.config import ConfigError, GPTJConfig
from gptj_jax.convert import CheckpointError, convert, load_config, mtj
from gptj_jax.convert.io import CheckpointReader

BF16 = np.dtype(ml_dtypes.bfloat16)


def _counts(shard_dir) -> list[int]:
    out = []
    for i in range(16):
        with zipfile.ZipFile(os.path.join(shard_dir, f"{i}.npz")) as z:
            out.append(len(z.namelist()))
    return out


# --------------------------------------------------------------------------------- leaf order / split
def test_leaf_order_follows_tree_flatten_of_haiku_params():
    config = GPTJConfig(vocab_size=16, n_positions=8, n_embd=8, n_layer=28, n_head=2, rotary_dim=2)
    paths = mtj.leaf_paths(config)
    assert len(paths) == 286
    short = [p.replace(mtj.ROOT, "") for p in paths]
    layer_order = [int(p.split("/")[0][6:]) for p in short[2:-4:10]]
    assert layer_order == [0, 1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 2, 20, 21, 22, 23, 24, 25, 26, 27, 3, 4, 5, 6, 7, 8, 9]
    assert short[:12] == [
        "embedding_shard/~/linear/b", "embedding_shard/~/linear/w",
        "layer_0/~/linear/w", "layer_0/~/linear_1/w", "layer_0/~/linear_2/w", "layer_0/~/linear_3/w",
        "layer_0/~/linear_4/b", "layer_0/~/linear_4/w", "layer_0/~/linear_5/b", "layer_0/~/linear_5/w",
        "layer_0/~/replicated_layer_norm/offset", "layer_0/~/replicated_layer_norm/scale",
    ]
    assert short[-4:] == [
        "projection_shard/~/linear/b", "projection_shard/~/linear/w",
        "projection_shard/~/replicated_layer_norm/offset", "projection_shard/~/replicated_layer_norm/scale",
    ]
    # jax itself agrees: flatten a haiku-style {module: {param: leaf}} dict whose leaves are their paths.
    haiku: dict = {}
    for p in paths:
        module, param = p.rsplit("/", 1)
        haiku.setdefault(module, {})[param] = p
    assert jax.tree_util.tree_leaves(haiku) == paths


@pytest.mark.parametrize("layout,total,split", [("slim", 287, [18] * 15 + [17]), ("full", 861, [54] * 13 + [53] * 3)])
def test_28_layer_checkpoint_leaf_counts_and_file_split(layout, total, split, tmp_path):
    config = GPTJConfig(vocab_size=16, n_positions=8, n_embd=8, n_layer=28, n_head=2, rotary_dim=2)
    rng = np.random.RandomState(0)
    tensors = {n: rng.randn(*s).astype(np.float32) for n, s in mtj.table.expected_shapes(config, "causal_lm").items()}
    mtj.write(tmp_path, config, tensors.__getitem__, shards=2, dtype=np.float32, layout=layout)
    assert mtj.leaf_counts(config) == (287, 861)
    for s in range(2):
        assert _counts(tmp_path / "step_0" / f"shard_{s}") == split
    assert sum(split) == total
    with mtj.MtjReader(tmp_path, config) as reader:
        assert reader.layout == layout and reader.mp == 2
        for name, array in reader.iter_tensors():
            assert np.array_equal(array, tensors[name]), name


# ------------------------------------------------------------------------- writer checkpoints -> HF
@pytest.fixture(scope="module")
def model():
    return hf_model(CONFIG, "causal_lm", seed=11)


@pytest.fixture(scope="module")
def hf_sources(model, tmp_path_factory):
    """The model saved by transformers in float32 and in bfloat16, with its logits."""
    out = {}
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        path = str(tmp_path_factory.mktemp(f"src-{dtype}"))
        copy.deepcopy(model).to(torch_dtype).save_pretrained(path)
        out[dtype] = (path, hf_logits(path))
    return out


@pytest.mark.parametrize("mp", [1, 2, 4, 8])
@pytest.mark.parametrize("layout,dtype", [("slim", "bfloat16"), ("full", "float32")])
def test_writer_checkpoint_converts_to_hf_with_source_logits(mp, layout, dtype, hf_sources, tmp_path):
    src, logits = hf_sources[dtype]
    with CheckpointReader(src) as reader:
        mtj.write(tmp_path / "mtj", CONFIG, reader.read, shards=mp, dtype=BF16 if dtype == "bfloat16" else np.float32, layout=layout)
    shard = tmp_path / "mtj" / "step_0" / f"shard_{mp - 1}"
    with np.load(shard / "0.npz") as z:  # bfloat16 reaches disk as numpy's 2-byte void, as in the released files
        kinds = {z[k].dtype.kind + str(z[k].dtype.itemsize) for k in z.files}
    assert ("V2" in kinds) == (dtype == "bfloat16")
    summary = convert(tmp_path / "mtj", tmp_path / "hf", to="hf", config=os.path.join(src, "config.json"), **QUIET)
    assert summary.src_format == "mtj" and summary.dtype == dtype
    assert_dirs_identical(src, str(tmp_path / "hf"))
    assert torch.equal(hf_logits(str(tmp_path / "hf")), logits)


# ------------------------------------------------------------------ an independently built checkpoint
def _build_like_mtj(directory, hf_state: dict, config: GPTJConfig, mp: int, step: int, rng) -> None:
    """Lay ``hf_state`` out as mesh-transformer-jax did, with everything the reader must undo:
    a non-zero embedding bias split unevenly over shards, fc_out biases split unevenly, LayerNorm
    copies on shards > 0 left at their init (ones / zeros), Adam state from optax, step last."""
    d = config.n_embd
    shards: list[dict] = [{} for _ in range(mp)]

    def put(module: str, param: str, parts: list) -> None:
        for s in range(mp):
            shards[s].setdefault(mtj.ROOT + module, {})[param] = np.asarray(parts[s], np.float32)

    def split_sum(total: np.ndarray) -> list:
        parts = [rng.randn(*total.shape).astype(np.float32) for _ in range(mp - 1)]
        return parts + [total - sum(parts, np.zeros_like(total))]

    embed_bias = [0.01 * rng.randn(d).astype(np.float32) for _ in range(mp)]
    wte = hf_state["transformer.wte.weight"] - sum(embed_bias)
    put("embedding_shard/~/linear", "w", np.split(wte, mp, axis=0))
    put("embedding_shard/~/linear", "b", embed_bias)
    for i in range(config.n_layer):
        h = lambda n, i=i: hf_state[f"transformer.h.{i}.{n}"]  # noqa: E731
        for k, n in enumerate(["attn.q_proj", "attn.v_proj", "attn.k_proj"]):
            put(f"layer_{i}/~/linear" + (f"_{k}" if k else ""), "w", np.split(h(n + ".weight").T, mp, axis=1))
        put(f"layer_{i}/~/linear_3", "w", np.split(h("attn.out_proj.weight").T, mp, axis=0))
        put(f"layer_{i}/~/linear_4", "w", np.split(h("mlp.fc_in.weight").T, mp, axis=1))
        put(f"layer_{i}/~/linear_4", "b", np.split(h("mlp.fc_in.bias"), mp))
        put(f"layer_{i}/~/linear_5", "w", np.split(h("mlp.fc_out.weight").T, mp, axis=0))
        put(f"layer_{i}/~/linear_5", "b", split_sum(h("mlp.fc_out.bias")))
        put(f"layer_{i}/~/replicated_layer_norm", "scale", [h("ln_1.weight")] + [np.ones(d)] * (mp - 1))
        put(f"layer_{i}/~/replicated_layer_norm", "offset", [h("ln_1.bias")] + [np.zeros(d)] * (mp - 1))
    put("projection_shard/~/linear", "w", np.split(hf_state["lm_head.weight"].T, mp, axis=1))
    put("projection_shard/~/linear", "b", np.split(hf_state["lm_head.bias"], mp))
    ln_f = [(hf_state["transformer.ln_f.weight"], hf_state["transformer.ln_f.bias"])] + [(np.ones(d), np.zeros(d))] * (mp - 1)
    put("projection_shard/~/replicated_layer_norm", "scale", [w for w, _ in ln_f])
    put("projection_shard/~/replicated_layer_norm", "offset", [b for _, b in ln_f])
    # mesh-transformer-jax's optimizer (train.py): scale, clip, adam, weight decay, scale(-1), schedule.
    opt = optax.chain(
        optax.scale(1 / 16), optax.clip_by_global_norm(1.0), optax.scale_by_adam(),
        optax.add_decayed_weights(0.1), optax.scale(-1), optax.scale_by_schedule(lambda c: 1e-4),
    )
    step_dir = os.path.join(directory, f"step_{step}")
    for s in range(mp):
        opt_state = jax.tree_util.tree_map(lambda x: np.asarray(x) + 3.0, opt.init(shards[s]))  # non-zero moments
        leaves = jax.tree_util.tree_leaves({"opt_state": opt_state, "params": shards[s], "step": np.int32(step)})
        assert len(leaves) == mtj.leaf_counts(config)[1]
        os.makedirs(os.path.join(step_dir, f"shard_{s}"))
        for i, piece in enumerate(np.array_split(np.arange(len(leaves)), 16)):
            np.savez(os.path.join(step_dir, f"shard_{s}", f"{i}.npz"), *[leaves[j] for j in piece])
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"step": step, "checkpoints": [step], "aux": {str(step): {}}}, f)


def test_reader_on_checkpoint_built_like_mesh_transformer_jax(model, hf_sources, tmp_path):
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    _build_like_mtj(tmp_path / "mtj", state, CONFIG, mp=2, step=7, rng=np.random.RandomState(0))
    with mtj.MtjReader(tmp_path / "mtj", CONFIG) as reader:
        assert reader.layout == "full" and reader.mp == 2 and reader.step_dir.endswith("step_7")
        got = dict(reader.iter_tensors())
    assert sorted(got) == sorted(state)
    for name, want in state.items():
        if name == "transformer.wte.weight" or name.endswith("fc_out.bias"):  # folded / summed: float32 rounding
            np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-6, err_msg=name)
        else:
            assert np.array_equal(got[name], want), name
    convert(tmp_path / "mtj", tmp_path / "hf", to="hf", config=os.path.join(hf_sources["float32"][0], "config.json"), **QUIET)
    torch.testing.assert_close(hf_logits(str(tmp_path / "hf")), hf_sources["float32"][1], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------- layout / config
def test_newest_step_and_step_dir(hf_sources, tmp_path):
    src = hf_sources["float32"][0]
    with CheckpointReader(src) as reader:
        mtj.write(tmp_path / "m", CONFIG, reader.read, shards=1, dtype=np.float32, step=100)
        zeros = lambda name: np.zeros(reader.shape(name), np.float32)  # noqa: E731
        mtj.write(tmp_path / "m", CONFIG, zeros, shards=1, dtype=np.float32, step=50)
    (tmp_path / "m" / "meta.json").write_text(json.dumps({"step": 100, "checkpoints": [50, 100], "aux": {}}))
    assert mtj.resolve_step_dir(tmp_path / "m").endswith("step_100")
    assert mtj.resolve_step_dir(tmp_path / "m" / "step_50").endswith("step_50")
    with mtj.MtjReader(tmp_path / "m", CONFIG) as reader:
        assert np.any(reader.read("lm_head.weight"))


def test_mtj_config_json(tmp_path):
    """A mesh-transformer-jax training config (6B_roto_256.json) is read as GPT-J-6B; its mp is the default --shards."""
    six_b = {
        "layers": 28, "d_model": 4096, "n_heads": 16, "n_vocab": 50400, "norm": "layernorm", "pe": "rotary",
        "pe_rotary_dims": 64, "seq": 2048, "cores_per_replica": 8, "per_replica_batch": 1,
        "gradient_accumulation_steps": 16, "warmup_steps": 3000, "anneal_steps": 300000, "lr": 1.2e-4,
        "end_lr": 1.2e-5, "weight_decay": 0.1, "total_steps": 350000, "tpu_size": 256,
    }
    (tmp_path / "6B_roto_256.json").write_text(json.dumps(six_b))
    config, mp = load_config(tmp_path / "6B_roto_256.json")
    assert mp == 8
    assert config == GPTJConfig.preset("gptj-6b")
    assert mtj.config_from_mtj(mtj.config_to_mtj(config, 8)) == (config, 8)
    del six_b["d_model"]
    (tmp_path / "bad.json").write_text(json.dumps(six_b))
    with pytest.raises(ConfigError, match=r"bad\.json: missing required mesh-transformer-jax key\(s\) \['d_model'\]"):
        load_config(tmp_path / "bad.json")


def test_shards_default_from_mtj_config(hf_sources, tmp_path):
    src = hf_sources["bfloat16"][0]
    (tmp_path / "cfg.json").write_text(json.dumps(mtj.config_to_mtj(CONFIG, 4)))
    convert(src, tmp_path / "out", to="mtj", config=tmp_path / "cfg.json", **QUIET)
    assert sorted(os.listdir(tmp_path / "out" / "step_0")) == ["shard_0", "shard_1", "shard_2", "shard_3"]
    with pytest.raises(CheckpointError, match="--shards: n_head=8 does not split over 3 shards"):
        convert(src, tmp_path / "out3", to="mtj", shards=3, **QUIET)
    assert not (tmp_path / "out3").exists()


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def mtj_dir(hf_sources, tmp_path):
    with CheckpointReader(hf_sources["float32"][0]) as reader:
        mtj.write(tmp_path / "mtj", CONFIG, reader.read, shards=2, dtype=np.float32)
    return tmp_path / "mtj"


def _rewrite(file, arrays: list) -> None:
    np.savez(file, *arrays)


def _arrays(file) -> list:
    with np.load(file) as z:
        return [z[f"arr_{k}"] for k in range(len(z.files))]


def test_npz_with_wrong_leaf_count(mtj_dir, tmp_path):
    file = mtj_dir / "step_0" / "shard_0" / "3.npz"
    _rewrite(file, _arrays(file)[:-1])
    with pytest.raises(CheckpointError, match=r"shard_0: 26 leaves in its 16 npz files \(per file \[2, 2, 2, 1, .*expected 27 \(slim.* or 81 \(full.*n_layer=2"):
        convert(mtj_dir, tmp_path / "dst", to="hf", config=CONFIG, **QUIET)
    assert not (tmp_path / "dst").exists()


def test_npz_leaves_in_the_wrong_file(mtj_dir, tmp_path):
    """Same total, different split (leaf moved from file 3 to file 4): named by file."""
    a, b = mtj_dir / "step_0" / "shard_1" / "3.npz", mtj_dir / "step_0" / "shard_1" / "4.npz"
    la, lb = _arrays(a), _arrays(b)
    _rewrite(a, la[:-1])
    _rewrite(b, la[-1:] + lb)
    with pytest.raises(CheckpointError, match=r"shard_1/3\.npz: holds 1 leaves, expected 2"):
        convert(mtj_dir, tmp_path / "dst", to="hf", config=CONFIG, **QUIET)


def test_mtj_shape_disagrees_with_config(mtj_dir, tmp_path):
    with pytest.raises(
        CheckpointError,
        match=r"shard_0/0\.npz: arr_0 \(causal_transformer_shard/~/embedding_shard/~/linear/b -> wte bias\) "
        r"has shape \(32,\) but the config with 2 shards implies \(64,\)",
    ):
        convert(mtj_dir, tmp_path / "dst", to="hf", config=CONFIG.replace(n_embd=64), **QUIET)
    assert not (tmp_path / "dst").exists()


def test_shard_dirs_must_be_contiguous(mtj_dir, tmp_path):
    os.rename(mtj_dir / "step_0" / "shard_1", mtj_dir / "step_0" / "shard_2")
    with pytest.raises(CheckpointError, match=r"shard directories \['shard_0', 'shard_2'\] are not shard_0 \.\. shard_1"):
        mtj.MtjReader(mtj_dir, CONFIG)


def test_tiny_conftest_config_vocab_does_not_split(tmp_path):
    with pytest.raises(CheckpointError, match="vocab_size=101 does not split over 2 shards"):
        mtj.param_leaves(TINY, 2)


def test_bf16_embedding_bias_folds_in_float32(hf_sources, tmp_path):
    """A slim bfloat16 checkpoint with a non-zero embedding bias, converted to HF float32:
    wte == float32(w_bf16) + float32(sum of bias shards), exactly (the fold is not done in bfloat16)."""
    src = hf_sources["bfloat16"][0]
    with CheckpointReader(src) as reader:
        mtj.write(tmp_path / "mtj", CONFIG, reader.read, shards=2, dtype=BF16, layout="slim")
        w = reader.read("transformer.wte.weight")
    assert w.dtype == BF16
    rng = np.random.RandomState(3)
    biases = [(0.01 * rng.randn(CONFIG.n_embd)).astype(BF16) for _ in range(2)]
    for s in range(2):
        file = tmp_path / "mtj" / "step_0" / f"shard_{s}" / "0.npz"
        arrays = _arrays(file)
        assert arrays[0].dtype == np.dtype("V2") and arrays[0].shape == (CONFIG.n_embd,)  # leaf 0: the embedding bias
        arrays[0] = biases[s].view("V2")
        _rewrite(file, arrays)
    convert(tmp_path / "mtj", tmp_path / "hf", to="hf", dtype="float32", config=os.path.join(src, "config.json"), **QUIET)
    with CheckpointReader(tmp_path / "hf") as reader:
        got = reader.read("transformer.wte.weight")
    want = w.astype(np.float32) + (biases[0].astype(np.float32) + biases[1].astype(np.float32))
    assert got.dtype == np.float32
    assert np.array_equal(got, want), float(np.abs(got - want).max())

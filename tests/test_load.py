"""The one loader, ``gptj_jax.load``: every source format (HF safetensors and ``.bin``, single and sharded;
HF Flax ``flax_model.msgpack``, single and sharded; our orbax checkpoint; a training run directory; a
mesh-transformer-jax checkpoint with its config; a hub id in a local Hugging Face cache, two revisions),
each through ``gptj_jax.load`` (logits equal transformers', float32, <= 1e-4) and through
``gptj-jax generate --model`` in a subprocess (greedy text equal transformers'); placement on 8 simulated
devices (each device receives its blocks only, ``--mesh mp=8`` prints the single-device text); the
checkpoint's own tokenizer and ``--tokenizer``; bad input (a hub id or revision that is not there, a
mesh that cannot split the model, truncated or misshapen files): one error naming file / tensor / sizes,
and no device array left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import generate_cli, hf_model, left_padded_batch, params_of

import gptj_jax
from gptj_jax.convert import CheckpointError, convert, save_flax, table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(gptj_jax.__file__)))  # the package under test
# vocab 50400: GPT-J's tokenizer fits (the CLI); 8 heads and n_inner 128 split over mp=8.
CFG = gptj_jax.GPTJConfig(vocab_size=50400, n_positions=64, n_embd=32, n_layer=2, n_head=8, rotary_dim=4)
PROMPT = "Hello world, this is"
NEW = 8
EXTRA = list(range(50257, 50400))  # GPT-J's <|extratoken_k|> ids, suppressed by our generate with its tokenizer
OWNER_NAME = "owner/name"
COMMITS = {"main": "a" * 40, "float16": "b" * 40}


# ============================================================================ fixtures
@pytest.fixture(scope="module")
def hf():
    return hf_model(CFG, seed=0, scale=3.0)


@pytest.fixture(scope="module")
def batch():
    ids, mask, pos = left_padded_batch(CFG.vocab_size, [6, 3], seed=5)
    return ids, mask, pos


def _hf_logits(model, batch) -> np.ndarray:
    ids, mask, pos = batch
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


def _our_logits(config, params, batch) -> np.ndarray:
    import jax.numpy as jnp

    ids, mask, pos = batch
    model = gptj_jax.GPTJForCausalLM(config)
    out = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(pos))
    return np.asarray(out.logits)


def _hf_text(model) -> str:
    """Transformers' greedy continuation of PROMPT, GPT-J's extra tokens suppressed (as our generate does
    with GPT-J's tokenizer), decoded without special tokens."""
    tok = gptj_jax.load_tokenizer()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, suppress_tokens=EXTRA, pad_token_id=0)
    return PROMPT + tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def _write_bin(state: dict, directory: str, shards: int = 1) -> None:
    """pytorch_model.bin, or shards + pytorch_model.bin.index.json (transformers 4's layout)."""
    names = list(state)
    if shards == 1:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
        return
    weight_map = {}
    for k, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({names[i]: state[names[i]] for i in part}, os.path.join(directory, file))
        weight_map.update({names[i]: file for i in part})
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def _flax_tree(params: dict) -> dict:
    """Our params as FlaxGPTJForCausalLM's tree (``h_0`` -> ``h/0``), nested, as flax serializes it."""
    out: dict = {}
    for path, leaf in table.flatten(params).items():
        keys = re.sub(r"/h_(\d+)/", r"/h/\1/", path).split("/")
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = np.asarray(leaf)
    return out


def _write_hf_flax(params: dict, directory: str, shards: int = 1) -> None:
    """flax_model.msgpack written by flax.serialization (what Transformers 4.x used), or shards + index."""
    from flax.serialization import to_bytes

    os.makedirs(directory, exist_ok=True)
    CFG.save_pretrained(directory, architectures=["GPTJForCausalLM"])
    if shards == 1:
        with open(os.path.join(directory, "flax_model.msgpack"), "wb") as f:
            f.write(to_bytes(_flax_tree(params)))
        return
    flat = list(table.flatten(_flax_tree(params)).items())
    weight_map = {}
    for k, part in enumerate(np.array_split(np.arange(len(flat)), shards)):
        file = f"flax_model-{k + 1:05d}-of-{shards:05d}.msgpack"
        shard = table.unflatten({flat[i][0]: flat[i][1] for i in part})
        with open(os.path.join(directory, file), "wb") as f:
            f.write(to_bytes(shard))
        weight_map.update({flat[i][0]: file for i in part})
    with open(os.path.join(directory, "flax_model.msgpack.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def _blob(cache_repo: str, source: str) -> str:
    """Copy ``source`` into the cache's blobs/ under its sha256 (as huggingface_hub stores files)."""
    digest = hashlib.sha256(open(source, "rb").read()).hexdigest()
    os.makedirs(os.path.join(cache_repo, "blobs"), exist_ok=True)
    shutil.copy(source, os.path.join(cache_repo, "blobs", digest))
    return digest


def _snapshot(cache_repo: str, revision: str, files: dict) -> None:
    """refs/<revision> -> its commit; snapshots/<commit>/<name> -> ../../blobs/<sha> (relative links)."""
    commit = COMMITS[revision]
    snap = os.path.join(cache_repo, "snapshots", commit)
    os.makedirs(snap, exist_ok=True)
    for name, source in files.items():
        os.symlink(os.path.join("..", "..", "blobs", _blob(cache_repo, source)), os.path.join(snap, name))
    os.makedirs(os.path.join(cache_repo, "refs"), exist_ok=True)
    with open(os.path.join(cache_repo, "refs", revision), "w") as f:
        f.write(commit)


@pytest.fixture(scope="module")
def sources(hf, tmp_path_factory):
    """Every layout of the same weights: ``{kind: (path, load kwargs)}``, plus the hub cache."""
    root = tmp_path_factory.mktemp("sources")
    state = hf.state_dict()
    params = params_of(hf)
    out = {}

    def d(name: str) -> str:
        path = str(root / name)
        os.makedirs(path, exist_ok=True)
        return path

    hf.save_pretrained(d("safetensors"))
    out["safetensors"] = (str(root / "safetensors"), {})
    hf.save_pretrained(d("safetensors-sharded"), max_shard_size="2MB")
    assert os.path.isfile(root / "safetensors-sharded" / "model.safetensors.index.json")
    out["safetensors-sharded"] = (str(root / "safetensors-sharded"), {})
    for name, shards in (("bin", 1), ("bin-sharded", 3)):
        hf.config.save_pretrained(d(name))
        _write_bin(state, str(root / name), shards)
        out[name] = (str(root / name), {})
    _write_hf_flax(params, str(root / "hf-flax"))
    out["hf-flax"] = (str(root / "hf-flax"), {})
    _write_hf_flax(params, str(root / "hf-flax-sharded"), shards=3)
    out["hf-flax-sharded"] = (str(root / "hf-flax-sharded"), {})
    save_flax(str(root / "orbax"), CFG, params)
    out["orbax"] = (str(root / "orbax"), {})
    # a training run: numbered steps, the newest (2) holds the model, an older one other weights
    other = params_of(hf_model(CFG, seed=7))
    save_flax(str(root / "run" / "1"), CFG, other)
    save_flax(str(root / "run" / "2"), CFG, params)
    out["run"] = (str(root / "run"), {})
    convert(str(root / "safetensors"), str(root / "mtj"), to="mtj", shards=2, verbose=False)
    out["mtj"] = (str(root / "mtj"), {"config": str(root / "safetensors" / "config.json")})
    # the hub cache: owner/name, main = float32 safetensors + tokenizer files, float16 = a float16 .bin
    cache = str(root / "hub")
    repo = os.path.join(cache, "models--owner--name")
    tok_dir = d("tokenizer")
    from gptj_jax.tokenizer import save_tokenizer

    save_tokenizer(tok_dir)
    tok_config = os.path.join(tok_dir, "tokenizer_config.json")
    with open(tok_config) as f:
        data = json.load(f)
    with open(tok_config, "w") as f:  # tells this tokenizer from the built-in one (2048)
        json.dump({**data, "model_max_length": 1234}, f)
    main_files = {"config.json": str(root / "safetensors" / "config.json"),
                  "model.safetensors": str(root / "safetensors" / "model.safetensors")}
    main_files.update({name: os.path.join(tok_dir, name) for name in os.listdir(tok_dir)})
    _snapshot(repo, "main", main_files)
    half = d("half")
    hf.config.save_pretrained(half)
    torch.save({k: v.half() for k, v in state.items()}, os.path.join(half, "pytorch_model.bin"))
    _snapshot(repo, "float16", {"config.json": os.path.join(half, "config.json"),
                                "pytorch_model.bin": os.path.join(half, "pytorch_model.bin")})
    out["hub"] = (OWNER_NAME, {})
    return out, cache


@pytest.fixture
def hub_env(sources, monkeypatch):
    _, cache = sources
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


KINDS = ["safetensors", "safetensors-sharded", "bin", "bin-sharded", "hf-flax", "hf-flax-sharded", "orbax", "run",
         "mtj", "hub"]


# ============================================================================ every source, two ways
@pytest.mark.parametrize("kind", KINDS)
def test_load_every_source_matches_transformers(kind, sources, hf, batch, hub_env):
    path, kwargs = sources[0][kind]
    config, params = gptj_jax.load(path, **kwargs)
    assert config.n_embd == CFG.n_embd and config.vocab_size == CFG.vocab_size
    want = table.flatten(params_of(hf))
    got = table.flatten(params)
    assert sorted(got) == sorted(want)
    for p in want:  # exact values, float32, on one device
        assert got[p].dtype == np.float32 and np.array_equal(np.asarray(got[p]), want[p]), (kind, p)
        assert got[p].sharding.device_set == {jax.devices()[0]}
    np.testing.assert_allclose(_our_logits(config, params, batch), _hf_logits(hf, batch), atol=1e-4, rtol=0)
    # dtype= converts as it streams: bfloat16 leaves equal the float32 values rounded once
    _, half = gptj_jax.load(path, dtype="bfloat16", **kwargs)
    for p, leaf in table.flatten(half).items():
        assert leaf.dtype == ml_dtypes.bfloat16 and np.array_equal(np.asarray(leaf), want[p].astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("kind", KINDS)
def test_cli_generate_every_source_matches_transformers(kind, sources, hf):
    (path, kwargs), cache = sources[0][kind], sources[1]
    argv = ["--model", path, "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--greedy", "--quiet"]
    if "config" in kwargs:
        argv += ["--config", kwargs["config"]]
    proc = generate_cli(argv, env={"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == _hf_text(hf) + "\n"


def test_from_pretrained_is_load(sources, hf):
    path, _ = sources[0]["safetensors"]
    config, params = gptj_jax.from_pretrained(path, dtype="bfloat16")
    _, loaded = gptj_jax.load(path, dtype="bfloat16")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


# ============================================================================ hub
def test_hub_revisions(sources, hf, batch, hub_env):
    config, params = gptj_jax.load(OWNER_NAME)
    np.testing.assert_allclose(_our_logits(config, params, batch), _hf_logits(hf, batch), atol=1e-4, rtol=0)
    _, params16 = gptj_jax.load(OWNER_NAME, revision="float16")
    want = table.flatten(params_of(hf))
    for p, leaf in table.flatten(params16).items():
        assert leaf.dtype == np.float16 and np.array_equal(np.asarray(leaf), want[p].astype(np.float16)), p
    # the main snapshot carries tokenizer files: load_tokenizer takes them from there
    from gptj_jax.tokenizer import is_gptj_tokenizer

    tok = gptj_jax.load_tokenizer(OWNER_NAME)
    assert tok.model_max_length == 1234 and gptj_jax.load_tokenizer().model_max_length == 2048
    assert is_gptj_tokenizer(tok) and tok(PROMPT)["input_ids"] == gptj_jax.load_tokenizer()(PROMPT)["input_ids"]
    assert gptj_jax.load_tokenizer(OWNER_NAME, revision="float16").model_max_length == 2048  # no files there


def test_cli_hub_float16_revision(sources, hf):
    """``--revision float16`` reads the float16 .bin; ``--dtype float32`` computes in float32, so the text equals
    transformers' on the same (float16-rounded) weights."""
    cache = sources[1]
    argv = ["--model", OWNER_NAME, "--revision", "float16", "--dtype", "float32", "--prompt", PROMPT,
            "--max-new-tokens", str(NEW), "--greedy", "--quiet"]
    proc = generate_cli(argv, env={"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounded = hf_model(CFG, seed=0, scale=3.0)
    rounded.load_state_dict({k: v.half().float() for k, v in rounded.state_dict().items()})
    assert proc.stdout == _hf_text(rounded) + "\n"


@pytest.mark.parametrize("spec, revision, message", [
    ("owner/missing", None, "owner/missing: not in the Hugging Face cache"),
    (OWNER_NAME, "v9", "owner/name: revision 'v9' is not in the Hugging Face cache"),
])
def test_hub_not_there_one_line_nothing_placed(spec, revision, message, sources, hub_env):
    before = len(jax.live_arrays())
    with pytest.raises(CheckpointError) as err:
        gptj_jax.load(spec, revision=revision)
    text = str(err.value)
    assert message in text and hub_env in text and "HF_HUB_OFFLINE" in text and "\n" not in text, text
    if revision:
        assert "(cached revisions: float16, main)" in text
    assert len(jax.live_arrays()) == before
    argv = ["--model", spec, "--prompt", PROMPT] + (["--revision", revision] if revision else [])
    proc = generate_cli(argv, env={"HF_HUB_CACHE": hub_env, "HF_HUB_OFFLINE": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr
    assert proc.stdout == ""


def test_not_a_path_nor_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"/no/such/dir: no such directory, and not a Hugging Face hub id"):
        gptj_jax.load("/no/such/dir")
    with pytest.raises(ValueError, match="revision='float16' is for hub ids"):
        gptj_jax.load(str(tmp_path), revision="float16")


# ============================================================================ tokenizer
def _renamed_tokenizer(directory: str) -> None:
    """GPT-2's BPE plus 143 added tokens named ``<|x_k|>``: 50400 ids, but not GPT-J's tokenizer."""
    from transformers import AddedToken, GPT2TokenizerFast

    from gptj_jax.tokenizer import _read_bpe, bpe_data_dir

    vocab, merges = _read_bpe(bpe_data_dir())
    tok = GPT2TokenizerFast(vocab=dict(vocab), merges=list(merges), unk_token="<|endoftext|>",
                            bos_token="<|endoftext|>", eos_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    tok.add_tokens([AddedToken(f"<|x_{k}|>", special=False, normalized=True) for k in range(1, 144)])
    assert len(tok) == 50400
    tok.save_pretrained(directory)


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    """A model that always prefers id 50300 (an extra token): its text shows whether they are suppressed."""
    model = hf_model(CFG, seed=0, scale=3.0)
    with torch.no_grad():
        model.lm_head.bias[50300] = 1e4
    path = str(tmp_path_factory.mktemp("biased"))
    model.save_pretrained(path)
    return model, path


def test_checkpoint_tokenizer_is_used_and_decides_suppression(biased, tmp_path):
    model, path = biased
    from gptj_jax.tokenizer import is_gptj_tokenizer, save_tokenizer

    assert is_gptj_tokenizer(gptj_jax.load_tokenizer(path))  # no tokenizer files: GPT-J's
    argv = ["--model", path, "--prompt", PROMPT, "--max-new-tokens", "3", "--greedy", "--quiet"]
    plain = generate_cli(argv)
    assert plain.returncode == 0 and "<|" not in plain.stdout, plain.stderr  # GPT-J's: 50300 suppressed
    own = str(tmp_path / "own")
    shutil.copytree(path, own)
    _renamed_tokenizer(own)
    tok = gptj_jax.load_tokenizer(own)
    assert len(tok) == 50400 and not is_gptj_tokenizer(tok) and tok.decode([50300]) == "<|x_44|>"
    with_own = generate_cli(["--model", own, *argv[2:]])
    assert with_own.returncode == 0 and with_own.stdout == PROMPT + "<|x_44|>" * 3 + "\n", with_own.stderr
    gptj_dir = str(tmp_path / "gptj-tok")
    save_tokenizer(gptj_dir)
    overridden = generate_cli(["--model", own, "--tokenizer", gptj_dir, *argv[2:]])
    assert overridden.returncode == 0 and overridden.stdout == plain.stdout, overridden.stderr


# ============================================================================ 8 simulated devices
MESH_WORKER = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
import numpy as np
import gptj_jax
from gptj_jax import sharding as sh
from gptj_jax.convert import table
path = sys.argv[1]
mesh = sh.make_mesh(1, 1, 8)
stats = {}
config, params = gptj_jax.load(path, mesh=mesh, stats=stats)
_, single = gptj_jax.load(path)
flat, whole = table.flatten(params), table.flatten(single)
split = {p: tuple(x.sharding.shard_shape(x.shape)) != tuple(x.shape) for p, x in flat.items()}
out = {
    "total": sh.tree_bytes(params),
    "device0": sh.device_bytes(params, jax.devices()[0]),
    "devices": [sh.device_bytes(params, d) for d in jax.devices()],
    "equal": all(np.array_equal(np.asarray(flat[p]), np.asarray(whole[p])) for p in whole),
    "shardings": all(flat[p].sharding.is_equivalent_to(s, flat[p].ndim)
                     for p, s in table.flatten(sh.param_shardings(config, mesh)).items()),
    # per split leaf: the largest block put on any device vs the whole leaf, and what devices hold
    "split": {p: [list(stats["blocks"][p]), list(flat[p].shape),
                  max(list(s.data.shape) for s in flat[p].addressable_shards)]
              for p in flat if split[p]},
    "max_read": stats["max_read_bytes"], "largest": stats["largest_tensor_bytes"],
}
# a mesh that cannot split the model: one error, nothing placed
before = len(jax.live_arrays())
try:
    gptj_jax.load(path, mesh=sh.make_mesh(1, 1, 3, devices=jax.devices()[:3]))
    out["bad_mesh"] = None
except ValueError as e:
    out["bad_mesh"] = str(e)
out["left_behind"] = len(jax.live_arrays()) - before
print(json.dumps(out))
"""


@pytest.mark.parametrize("kind", ["safetensors", "bin", "hf-flax", "orbax"])
def test_sharded_placement_on_8_devices(kind, sources):
    path, _ = sources[0][kind]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", MESH_WORKER, path], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["equal"] and r["shardings"]
    # every device holds about 1/8 of the parameter bytes (replicated LayerNorms aside)
    assert abs(r["device0"] - r["total"] / 8) < 0.01 * r["total"], r
    assert max(r["devices"]) - min(r["devices"]) < 0.01 * r["total"]
    # no device was ever given a whole matrix the rules split: the largest block placed is 1/8 of it
    assert len(r["split"]) == 3 + 7 * CFG.n_layer  # wte, lm_head kernel + bias; q/k/v/out_proj, fc_in (+bias), fc_out
    for p, (block, shape, held) in r["split"].items():
        assert int(np.prod(block)) * 8 == int(np.prod(shape)), (p, block, shape)
        assert held == block, p
    assert r["max_read"] * 8 == r["largest"], r  # one 1/8 block at a time (orbax: of its chunks)
    assert "mesh axis mp=3 does not divide n_head=8" in r["bad_mesh"] and path in r["bad_mesh"], r["bad_mesh"]
    assert r["left_behind"] == 0


def test_cli_mesh_mp8_equals_one_device(sources):
    path, _ = sources[0]["bin"]
    argv = ["--model", path, "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--greedy", "--quiet"]
    one = generate_cli(argv)
    eight = generate_cli([*argv, "--mesh", "mp=8"], env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert one.returncode == 0 and eight.returncode == 0, (one.stderr[-2000:], eight.stderr[-2000:])
    assert eight.stdout == one.stdout and one.stdout.startswith(PROMPT)


# ============================================================================ bad input
def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _truncate(file: str, keep: int) -> None:
    with open(file, "r+b") as f:
        f.truncate(keep)


@pytest.mark.parametrize("kind, file, cut, pattern", [
    ("safetensors", "model.safetensors", 100,
     r"model\.safetensors: truncated file: tensor '[\w.]+' \(\d+(, \d+)?,?\) F32 needs bytes \d+\.\.\d+ "
     r"of the data section but the file holds only \d+"),
    ("bin", "pytorch_model.bin", 100,
     r"pytorch_model\.bin: truncated or corrupt PyTorch checkpoint: a zip archive of \d+ bytes with no readable "
     r"central directory at its end"),
    ("hf-flax", "flax_model.msgpack", 100,
     r"flax_model\.msgpack: truncated file: tensor 'lm_head/bias' \(50400,\) float32 needs bytes \d+\.\.\d+ but the "
     r"file has \d+"),
])
def test_truncated_file_one_line_nothing_placed(kind, file, cut, pattern, sources, tmp_path):
    path = _copy(sources[0][kind][0], tmp_path / kind)
    target = os.path.join(path, file)
    _truncate(target, os.path.getsize(target) - cut)
    before = len(jax.live_arrays())
    with pytest.raises(CheckpointError, match=pattern) as err:
        gptj_jax.load(path)
    assert "\n" not in str(err.value)
    assert len(jax.live_arrays()) == before
    proc = generate_cli(["--model", path, "--prompt", PROMPT, "--max-new-tokens", "8"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and re.search(pattern, lines[0]), proc.stderr


def test_bin_misshapen_tensor_is_named(sources, tmp_path, hf):
    """A .bin holding a misshapen tensor (a strided view, read as such): named with both shapes, nothing placed."""
    path = str(tmp_path / "short")
    os.makedirs(path)
    hf.config.save_pretrained(path)
    state = dict(hf.state_dict())
    state["transformer.h.1.mlp.fc_in.weight"] = state["transformer.h.1.mlp.fc_in.weight"][:, :16]  # a view
    torch.save(state, os.path.join(path, "pytorch_model.bin"))
    before = len(jax.live_arrays())
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: tensor 'transformer\.h\.1\.mlp\.fc_in\.weight' "
                                              r"has shape \(128, 16\) but the config implies \(128, 32\)"):
        gptj_jax.load(path)
    assert len(jax.live_arrays()) == before


@pytest.mark.parametrize("kind", ["safetensors", "hf-flax"])
def test_misshapen_tensor_one_line_nothing_placed(kind, sources, hf, tmp_path):
    bad = params_of(hf)
    bad["transformer"]["h_1"]["attn"]["v_proj"]["kernel"] = bad["transformer"]["h_1"]["attn"]["v_proj"]["kernel"][:, :16]
    path = str(tmp_path / kind)
    if kind == "hf-flax":
        _write_hf_flax(bad, path)
        pattern = r"flax_model\.msgpack: tensor 'transformer/h/1/attn/v_proj/kernel' has shape \(32, 16\) but the config implies \(32, 32\)"
    else:
        model = hf_model(CFG, seed=0, scale=3.0)
        model.save_pretrained(path)
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        state["transformer.h.1.attn.v_proj.weight"] = state["transformer.h.1.attn.v_proj.weight"][:16].contiguous()
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        pattern = r"model\.safetensors: tensor 'transformer\.h\.1\.attn\.v_proj\.weight' has shape \(16, 32\) but the config implies \(32, 32\)"
    before = len(jax.live_arrays())
    with pytest.raises(CheckpointError, match=pattern):
        gptj_jax.load(path)
    assert len(jax.live_arrays()) == before


def test_head_mismatch_and_base_selection(sources, hf):
    path, _ = sources[0]["safetensors"]
    with pytest.raises(CheckpointError, match=r"holds a GPTJForCausalLM \(head 'causal_lm'\), not the "
                                              r"GPTJForSequenceClassification that head='sequence_classification'"):
        gptj_jax.load(path, head="sequence_classification")
    _, base = gptj_jax.load(path, head="base")
    want = table.flatten(params_of(hf))
    got = table.flatten(base)
    assert sorted(got) == sorted(p[len("transformer/"):] for p in want if p.startswith("transformer/"))
    for p, leaf in got.items():
        assert np.array_equal(np.asarray(leaf), want["transformer/" + p])


def test_mtj_without_config_says_so(sources):
    path, _ = sources[0]["mtj"]
    with pytest.raises(CheckpointError, match="a mesh-transformer-jax checkpoint carries no config; pass config="):
        gptj_jax.load(path)


# ============================================================================ .bin reader
def test_bin_read_without_torch_load(sources, hf, tmp_path):
    """The .bin reader parses the zip itself: views, bfloat16 and bool storages read exactly, and
    storages are read at their offsets: the file is never memory-mapped (no file-backed pages pile up)."""
    from gptj_jax.convert.io import TorchBinFile

    state = {"a": torch.randn(3, 4), "c": torch.randn(5).to(torch.bfloat16), "m": torch.tensor(-1e9),
             "bool": torch.tril(torch.ones(1, 1, 4, 4, dtype=torch.bool)), "p": torch.nn.Parameter(torch.randn(2, 2))}
    state["t"] = torch.randn(4, 3).t()  # not C-contiguous
    state["view"] = state["a"][1:]  # shares a's storage at an offset
    file = str(tmp_path / "x.bin")
    torch.save(state, file)
    with TorchBinFile(file) as f:
        assert f.keys() == list(state)
        for name, tensor in state.items():
            want = tensor.detach()
            want = want.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if want.dtype == torch.bfloat16 else want.numpy()
            got = f.read(name)
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), name
        np.testing.assert_array_equal(f.read_slice("a", (slice(1, 3), slice(1, 3))), state["a"][1:3, 1:3].numpy())
        np.testing.assert_array_equal(f.read_slice("t", (slice(1, 3),)), state["t"][1:3].numpy())
        with open("/proc/self/maps") as maps:
            assert file not in maps.read()

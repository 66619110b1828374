"""GPTJConfig: same fields and defaults as transformers, config.json both ways, clear errors."""

import dataclasses
import json

import pytest
import transformers

from gptj_jax import ConfigError, GPTJConfig
from gptj_jax.config import RUNTIME_FIELDS


def test_defaults_match_transformers():
    ours, theirs = GPTJConfig(), transformers.GPTJConfig()
    for field in dataclasses.fields(GPTJConfig):
        if field.name in ("id2label",) or field.name in RUNTIME_FIELDS:  # attention, scan_layers: not HF's
            continue
        assert getattr(ours, field.name) == getattr(theirs, field.name), field.name
    assert ours.inner_dim == 4 * 4096 and ours.head_dim == 256
    assert ours.tie_word_embeddings is False


def test_preset_6b_matches_published_config():
    cfg = GPTJConfig.preset("gptj-6b")
    assert (cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.rotary_dim) == (50400, 4096, 28, 16, 64)
    assert 6.0e9 < cfg.num_params() < 6.1e9
    for name in ("gptj-tiny", "gptj-162m", "gptj-1.3b"):
        GPTJConfig.preset(name)
    assert 150e6 < GPTJConfig.preset("gptj-162m").num_params() < 170e6


def test_round_trip_with_transformers(tmp_path):
    ours = GPTJConfig(vocab_size=300, n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_inner=100,
                      activation_function="silu", layer_norm_epsilon=1e-6, pad_token_id=0, num_labels=3,
                      problem_type="single_label_classification", eos_token_id=[1, 2])
    ours.save_pretrained(tmp_path, architectures=["GPTJForCausalLM"], torch_dtype="float32")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["tie_word_embeddings"] is False and data["model_type"] == "gptj"
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert theirs.n_inner == 100 and theirs.num_labels == 3 and theirs.activation_function == "silu"
    assert theirs.tie_word_embeddings is False and theirs.eos_token_id == [1, 2]
    theirs.save_pretrained(tmp_path / "hf")
    back = GPTJConfig.from_pretrained(tmp_path / "hf")
    assert back == ours


@pytest.mark.parametrize(
    "change,message",
    [
        ({"n_head": 5}, r"n_embd \(64\) must be divisible by n_head \(5\)"),
        ({"rotary_dim": 7}, "rotary_dim must be a positive even integer"),
        ({"rotary_dim": 32}, r"rotary_dim \(32\) must be <= the head dim .* = 16"),
        ({"activation_function": "swish"}, "activation_function 'swish' is not supported"),
        ({"n_layer": 0}, "n_layer must be a positive integer"),
        ({"attn_pdrop": 1.5}, r"attn_pdrop must be in \[0, 1\)"),
        ({"problem_type": "ranking"}, "problem_type 'ranking'"),
    ],
)
def test_validation_names_the_field(change, message):
    base = dict(vocab_size=100, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
    base.update(change)
    with pytest.raises(ConfigError, match=message):
        GPTJConfig(**base)


def test_bad_config_json_names_file_and_key(tmp_path):
    good = GPTJConfig(vocab_size=100, n_embd=64, n_layer=2, n_head=4, rotary_dim=8).to_hf_dict()
    missing = dict(good)
    del missing["n_embd"]
    (tmp_path / "config.json").write_text(json.dumps(missing))
    with pytest.raises(ConfigError, match=r"config.json: missing required key\(s\) \['n_embd'\]"):
        GPTJConfig.from_pretrained(tmp_path)
    inconsistent = dict(good, n_head=6)
    (tmp_path / "config.json").write_text(json.dumps(inconsistent))
    with pytest.raises(ConfigError, match=r"config.json: n_embd \(64\) must be divisible by n_head \(6\)"):
        GPTJConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(good, model_type="gpt2")))
    with pytest.raises(ConfigError, match="model_type is 'gpt2'"):
        GPTJConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        GPTJConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPTJConfig.from_pretrained(tmp_path / "nowhere")


def test_hf_aliases_are_accepted():
    d = {"model_type": "gptj", "vocab_size": 100, "max_position_embeddings": 128, "hidden_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "rotary_dim": 8}
    cfg = GPTJConfig.from_dict(d)
    assert (cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head) == (128, 64, 2, 4)


def test_id2label_as_a_list_names_the_key_and_file(tmp_path):
    good = GPTJConfig(vocab_size=100, n_embd=64, n_layer=2, n_head=4, rotary_dim=8).to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(dict(good, id2label=["NEG", "POS"])))
    with pytest.raises(ConfigError, match=r"config.json: id2label must be a mapping of class id to label.*got a list"):
        GPTJConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(good, id2label={"zero": "NEG", "one": "POS"})))
    with pytest.raises(ConfigError, match="config.json: id2label keys must be integer class ids, got 'zero'"):
        GPTJConfig.from_pretrained(tmp_path)


def test_load_takes_a_path_or_a_preset_name(tmp_path):
    from gptj_jax.config import preset_names

    assert preset_names() == ["gptj-1.3b", "gptj-162m", "gptj-6b", "gptj-tiny"]
    assert GPTJConfig.load("gptj-tiny") == GPTJConfig.preset("gptj-tiny")
    ours = GPTJConfig(vocab_size=100, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
    ours.save_pretrained(tmp_path)
    assert GPTJConfig.load(tmp_path) == ours and GPTJConfig.load(str(tmp_path / "config.json")) == ours
    with pytest.raises(FileNotFoundError, match="gptj-7b: no such config.json .* presets: gptj-1.3b, gptj-162m"):
        GPTJConfig.load("gptj-7b")
    with pytest.raises(FileNotFoundError, match="no preset named 'gptj-7b'; presets: gptj-1.3b"):
        GPTJConfig.preset("gptj-7b")


def test_presets_ship_in_the_wheel(tmp_path):
    """A non-editable install (``pip install .``, what a Colab user does) has every preset: build the wheel from
    the package's source tree, install it into a temporary target and call ``preset`` from another directory."""
    import os
    import shutil
    import subprocess
    import sys

    import gptj_jax

    src_root = os.path.dirname(os.path.dirname(os.path.abspath(gptj_jax.__file__)))
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(src_root, name), src / name)
    shutil.copytree(os.path.join(src_root, "gptj_jax"), src / "gptj_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-w",
                          str(tmp_path / "wheel")], check=True, cwd=tmp_path, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("gptj_jax-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, cwd=tmp_path, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import json, gptj_jax\n"
            "from gptj_jax.config import GPTJConfig\n"
            "names = ['gptj-6b', 'gptj-162m', 'gptj-1.3b', 'gptj-tiny']\n"
            "print(json.dumps({'file': gptj_jax.__file__, 'n_layer': {n: GPTJConfig.preset(n).n_layer for n in names}}))\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(tmp_path / "site"))  # the installed wheel, not this checkout
    assert out["n_layer"] == {"gptj-6b": 28, "gptj-162m": 12, "gptj-1.3b": 24, "gptj-tiny": 2}

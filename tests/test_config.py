"""GPTJConfig: same fields and defaults as transformers, config.json both ways, clear errors."""

import dataclasses
import json

import pytest
import transformers

from gptj_jax import ConfigError, GPTJConfig


def test_defaults_match_transformers():
    ours, theirs = GPTJConfig(), transformers.GPTJConfig()
    for field in dataclasses.fields(GPTJConfig):
        if field.name in ("id2label",):
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

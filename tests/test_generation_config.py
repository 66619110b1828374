"""GenerationConfig: every knob validated once (errors name the field), numpy scalars and lists normalised,
unknown keys named with a suggestion, ``generation_config.json`` read as Transformers writes it, and
``gptj_jax.generate(generation_config=..., **overrides)`` equal to the keyword style.
"""

import json

import jax
import numpy as np
import pytest

import gptj_jax
from gptj_jax import GenerationConfig
from gptj_jax.generation_config import GenerationError, SamplingError


def test_defaults_and_normalisation():
    gc = GenerationConfig()
    assert (gc.max_new_tokens, gc.do_sample, gc.top_k, gc.num_beams, gc.seed, gc.eos_token_id) == (
        None, False, 0, 1, 0, None)
    npy = GenerationConfig(max_new_tokens=np.int64(9), temperature=np.float32(0.5), top_k=np.int32(7),
                           do_sample=np.bool_(True), eos_token_id=[np.int64(3), 4], seed=[np.uint64(2**63), 5],
                           bad_words_ids=[[1], np.array([2, 3])], stop_strings="###", early_stopping="never")
    assert npy.max_new_tokens == 9 and type(npy.max_new_tokens) is int
    assert npy.temperature == 0.5 and type(npy.temperature) is float and type(npy.top_k) is int
    assert npy.do_sample is True
    assert npy.eos_token_id == (3, 4) and npy.eos_ids == (3, 4)
    assert GenerationConfig(eos_token_id=5).eos_ids == (5,) and GenerationConfig(eos_token_id=[]).eos_ids == ()
    assert npy.seed == (2**63, 5) and npy.bad_words_ids == ((1,), (2, 3)) and npy.stop_strings == ("###",)
    hash(npy)  # hashable: every list became a tuple
    assert GenerationConfig(**npy.to_dict()) == npy
    assert json.loads(json.dumps(npy.to_dict()))["bad_words_ids"] == [[1], [2, 3]]


@pytest.mark.parametrize(
    "kw, field, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens", "max_new_tokens must be an integer >= 1, got 0"),
        (dict(max_new_tokens=5, min_new_tokens=6), "min_new_tokens", r"min_new_tokens \(6\) must be <= max_new_tokens"),
        (dict(do_sample="yes"), "do_sample", "do_sample must be True or False, got 'yes'"),
        (dict(temperature=-1.0), "temperature", "temperature must be a finite number >= 0"),
        (dict(do_sample=True, temperature=0.0), "temperature", "temperature 0 with sampling"),
        (dict(top_k=2.5), "top_k", "top_k must be an integer >= 0"),
        (dict(top_p=0.0), "top_p", r"top_p must be in \(0, 1\]"),
        (dict(min_p=1.5), "min_p", r"min_p must be in \[0, 1\]"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty", "repetition_penalty must be a finite number"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size", "no_repeat_ngram_size must be an integer >= 0"),
        (dict(bad_words_ids=[]), "bad_words_ids", "bad_words_ids must be a non-empty list of non-empty lists"),
        (dict(bad_words_ids=[[1], []]), "bad_words_ids", r"bad_words_ids\[1\] must be a non-empty list"),
        (dict(bad_words_ids=[[1, -2]]), "bad_words_ids", r"bad_words_ids\[0\]\[1\] = -2 is not a token id"),
        (dict(num_beams=0), "num_beams", "num_beams must be an integer >= 1"),
        (dict(num_beams=4, do_sample=True), "num_beams", "num_beams 4 with do_sample=True"),
        (dict(length_penalty=float("nan")), "length_penalty", "length_penalty must be a finite number"),
        (dict(early_stopping="sometimes"), "early_stopping", "early_stopping must be True, False or 'never'"),
        (dict(eos_token_id=-1), "eos_token_id", r"eos_token_id -1 is not a token id \(an integer >= 0\)"),
        (dict(eos_token_id=[1, "2"]), "eos_token_id", "eos_token_id '2' is not a token id"),
        (dict(pad_token_id=-3), "pad_token_id", "pad_token_id must be an integer >= 0, got -3"),
        (dict(stop_strings=["ok", ""]), "stop_strings", "stop_strings must be non-empty strings"),
        (dict(num_return_sequences=0), "num_return_sequences", "num_return_sequences must be an integer >= 1"),
        (dict(num_return_sequences=2), "num_return_sequences", "does not support num_return_sequences different"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences",
         r"num_return_sequences \(3\) must be <= num_beams \(2\)"),
        (dict(seed=-1), "seed", "seed must be an integer >= 0, got -1"),
        (dict(seed=2**64), "seed", r"seed must be an integer in \[0, 2\*\*64\)"),
        (dict(seed=[1, 2**64]), "seed", r"seed\[1\] must be an integer in \[0, 2\*\*64\)"),
        (dict(seed=[]), "seed", "seed must be an int or a non-empty list of ints"),
        (dict(logprobs=1), "logprobs", "logprobs must be True or False, got 1"),
        (dict(suppress_extra_tokens="auto"), "suppress_extra_tokens", "suppress_extra_tokens must be True or False"),
    ],
)
def test_bad_values_name_the_field(kw, field, match):
    with pytest.raises(GenerationError, match=match) as info:
        GenerationConfig(**kw)
    assert info.value.field == field
    with pytest.raises(GenerationError, match=match):  # replace validates again
        GenerationConfig().replace(**kw)


def test_sampling_fields_raise_sampling_error():
    with pytest.raises(SamplingError) as info:
        GenerationConfig(top_p=2.0)
    assert info.value.option == "top_p" and isinstance(info.value, GenerationError)


def test_unknown_key_names_it_with_a_suggestion():
    with pytest.raises(GenerationError, match=r"unknown generation option 'temprature' \(did you mean 'temperature'\?\)"):
        GenerationConfig.from_kwargs(temprature=0.5)
    with pytest.raises(GenerationError, match=r"unknown generation option 'frobnicate'; the options are: max_new_tokens"):
        GenerationConfig().replace(frobnicate=1)
    config = gptj_jax.GPTJConfig(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
    params = gptj_jax.init_params(config, jax.random.PRNGKey(0))
    with pytest.raises(GenerationError, match=r"'max_new_token' \(did you mean 'max_new_tokens'\?\)"):
        gptj_jax.generate(config, params, [[1, 2, 3]], max_new_token=5)


SAMPLED = dict(max_new_tokens=33, min_new_tokens=2, do_sample=True, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05,
               repetition_penalty=1.1, no_repeat_ngram_size=3, bad_words_ids=[[5], [6, 7]], eos_token_id=[50256, 198],
               pad_token_id=50256, num_return_sequences=2, stop_strings=["\n\n"])
BEAMS = dict(max_new_tokens=20, num_beams=4, length_penalty=0.8, early_stopping="never", num_return_sequences=3,
             eos_token_id=50256)


@pytest.mark.parametrize("knobs", [SAMPLED, BEAMS], ids=["sampled", "beams"])
def test_from_pretrained_reads_transformers_file(tmp_path, knobs):
    from transformers import GenerationConfig as HFGenerationConfig

    HFGenerationConfig(**knobs, max_length=100).save_pretrained(tmp_path)
    gc = GenerationConfig.from_pretrained(tmp_path)
    assert gc == GenerationConfig(**knobs)  # max_length (and transformers_version) are not ours: ignored
    assert GenerationConfig.from_pretrained(tmp_path / "generation_config.json") == gc  # the file's path works too
    assert GenerationConfig.from_pretrained(tmp_path, seed=9, max_new_tokens=5) == gc.replace(seed=9, max_new_tokens=5)


def test_from_pretrained_of_a_saved_model(tmp_path):
    """A GPT-J directory written by transformers' save_pretrained carries generation_config.json."""
    from conftest import TINY, hf_model

    hf_model(TINY).save_pretrained(tmp_path)
    gc = GenerationConfig.from_pretrained(tmp_path)
    assert gc.eos_token_id == 50256 and gc.max_new_tokens is None and not gc.do_sample


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"temperature": -2}', r"generation_config\.json: temperature must be a finite number >= 0, got -2"),
        ('{"num_beams": 2, "do_sample": true}', r"generation_config\.json: num_beams 2 with do_sample=True"),
        ("{not json", r"generation_config\.json: not a JSON file"),
        ("[1, 2]", r"generation_config\.json: expected a JSON object, got list"),
    ],
)
def test_from_pretrained_errors_name_the_file(tmp_path, content, match):
    (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(GenerationError, match=match):
        GenerationConfig.from_pretrained(tmp_path)


def test_from_pretrained_missing_file(tmp_path):
    with pytest.raises(GenerationError, match=rf"{tmp_path}/generation_config\.json: no such file"):
        GenerationConfig.from_pretrained(tmp_path)


def test_generate_with_a_config_equals_keywords():
    """``generate(..., generation_config=gc)`` equals the same knobs as keywords; keywords override the config."""
    config = gptj_jax.GPTJConfig(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
    params = gptj_jax.init_params(config, jax.random.PRNGKey(0))
    prompts = [[1, 2, 3], [4, 5]]
    kw = dict(max_new_tokens=10, do_sample=True, top_k=8, temperature=0.9, eos_token_id=[], seed=3,
              no_repeat_ngram_size=2)
    by_kw = gptj_jax.generate(config, params, prompts, **kw)
    gc = GenerationConfig(**kw)
    by_config = gptj_jax.generate(config, params, prompts, generation_config=gc)
    np.testing.assert_array_equal(by_config.sequences, by_kw.sequences)
    other_seed = gptj_jax.generate(config, params, prompts, None, gc, seed=4, return_logprobs=True)
    np.testing.assert_array_equal(other_seed.sequences,
                                  gptj_jax.generate(config, params, prompts, **dict(kw, seed=4)).sequences)
    assert not np.array_equal(other_seed.sequences, by_kw.sequences) and other_seed.logprobs.shape == (2, 10)
    with pytest.raises(GenerationError, match="max_new_tokens is not set"):
        gptj_jax.generate(config, params, prompts, generation_config=GenerationConfig())
    with pytest.raises(GenerationError, match="generation_config must be a GenerationConfig, got dict"):
        gptj_jax.generate(config, params, prompts, generation_config=kw)

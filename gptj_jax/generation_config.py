"""``GenerationConfig``: every generation knob, validated once, in one place.

A frozen dataclass. Construction checks every field (:class:`GenerationError` naming the field and the
value; :class:`SamplingError`, a subclass, for the sampling knobs) and normalises the values: numpy
scalars become Python numbers, lists become tuples (so a config is hashable). Unknown keys passed to
:meth:`GenerationConfig.from_kwargs` / :meth:`~GenerationConfig.replace` are an error naming the key,
with the nearest known name. :meth:`GenerationConfig.from_pretrained` reads a model directory's
``generation_config.json`` as Transformers writes it (known keys mapped, the others ignored).

What a config cannot know (the model's vocabulary size, the number of prompts, whether a tokenizer is
there) is checked where it is used: ``generation.generate`` checks ids against ``vocab_size``, one
seed per prompt, prompt lengths against ``n_positions``, and ``stop_strings`` needing a tokenizer.

This module imports no jax (the command line's ``--help`` stays fast).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from typing import Any, Optional, Union

import numpy as np

SEED_LIMIT = 2**64  # seeds are 64-bit: both 32-bit words go into the PRNG key (sampling.seed_key)
EARLY_STOPPING = (True, False, "never")


class GenerationError(ValueError):
    """Bad generation input (option out of range, empty or too long prompt...); the message names it.

    ``field`` is the option at fault when there is one (``"temperature"``, ``"seed"``...), else None.
    """

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


class SamplingError(GenerationError):
    """A sampling option (temperature, top_k, top_p, min_p, repetition_penalty) is out of range;
    ``option`` (and ``field``) hold its name."""

    def __init__(self, message: str, option: str):
        super().__init__(message, option)
        self.option = option


# ---------------------------------------------------------------------------------------- checks
def _number(value: Any, integer: bool) -> Any:
    """numpy scalars as Python numbers: ``np.integer`` always, ``np.floating`` only where floats are expected
    (``np.float32(3.0)`` for an integer option stays what it is, and fails the check)."""
    if isinstance(value, np.integer) or (not integer and isinstance(value, np.floating)):
        return value.item()
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A Python int or float (not bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(name: str, value: Any, low: int) -> int:
    value = _number(value, integer=True)
    if not _is_int(value) or value < low:
        raise GenerationError(f"{name} must be an integer >= {low}, got {value!r}", name.split("[")[0])
    return value


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, np.bool_):
        value = bool(value)
    if not isinstance(value, bool):
        raise GenerationError(f"{name} must be True or False, got {value!r}", name)
    return value


def _seed(name: str, value: Any) -> int:
    """A seed: any integer in ``[0, 2**64)`` (both 32-bit words go into the key, see ``sampling.seed_key``)."""
    value = _int(name, value, 0)
    if value >= SEED_LIMIT:
        raise GenerationError(f"{name} must be an integer in [0, 2**64), got {value}", name.split("[")[0])
    return value


def _token_ids(name: str, value: Any) -> tuple[int, ...]:
    """One id or a sequence of ids (each an integer >= 0) as a tuple."""
    ids = (value,) if not isinstance(value, (list, tuple, np.ndarray)) else tuple(value)
    out = []
    for e in ids:
        e = _number(e, integer=True)
        if not _is_int(e) or e < 0:
            raise GenerationError(f"{name} {e!r} is not a token id (an integer >= 0)", name)
        out.append(e)
    return tuple(out)


def check_sampling(
    do_sample: Any, temperature: Any, top_k: Any, top_p: Any, min_p: Any, repetition_penalty: Any
) -> tuple[bool, float, int, float, float, float]:
    """The sampling knobs, validated and normalised (numpy scalars to Python numbers): the one set of rules
    behind both :class:`GenerationConfig` and ``sampling.SamplingParams``. Raises :class:`SamplingError`.

    ``do_sample=False`` is greedy: temperature, top_k, top_p and min_p are checked but not used (as in
    Transformers); repetition penalty applies either way.
    """
    do_sample = _bool("do_sample", do_sample)
    t = _number(temperature, integer=False)
    if not _is_real(t) or not math.isfinite(t) or t < 0:
        raise SamplingError(f"temperature must be a finite number >= 0, got {t!r}", "temperature")
    if do_sample and t == 0:
        raise SamplingError("temperature 0 with sampling: use greedy decoding instead", "temperature")
    k = _number(top_k, integer=True)
    if not _is_int(k) or k < 0:
        raise SamplingError(f"top_k must be an integer >= 0 (0 turns it off), got {k!r}", "top_k")
    p = _number(top_p, integer=False)
    if not _is_real(p) or not 0.0 < p <= 1.0:
        raise SamplingError(f"top_p must be in (0, 1], got {p!r}", "top_p")
    m = _number(min_p, integer=False)
    if not _is_real(m) or not 0.0 <= m <= 1.0:
        raise SamplingError(f"min_p must be in [0, 1], got {m!r}", "min_p")
    r = _number(repetition_penalty, integer=False)
    if not _is_real(r) or not math.isfinite(r) or not r > 0:
        raise SamplingError(f"repetition_penalty must be a finite number > 0, got {r!r}", "repetition_penalty")
    return do_sample, float(t), k, float(p), float(m), float(r)


# ---------------------------------------------------------------------------------------- the config
@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Every generation knob (Transformers' names and meanings unless noted). Validated on construction.

    Length: ``max_new_tokens`` (>= 1; None = not set, which ``generate`` refuses), ``min_new_tokens``
    (EOS banned until a row has that many new tokens).
    Sampling: ``do_sample`` (False = greedy), ``temperature``, ``top_k`` (0 = off), ``top_p``, ``min_p``.
    Processors (greedy too): ``repetition_penalty`` (1 = off), ``no_repeat_ngram_size`` (0 = off; no
    n-gram of the row's tokens, prompt included, occurs twice), ``bad_words_ids`` (token sequences never
    generated; a one-token entry equal to an EOS id is dropped, as in Transformers).
    Beam search: ``num_beams`` (1 = off; not with ``do_sample``), ``length_penalty``, ``early_stopping``
    (True, False or ``"never"``).
    Ends: ``eos_token_id`` (an id or a tuple of ids; None = the model config's; ``()`` = no EOS),
    ``pad_token_id`` (written after a row ends; None = the model config's, else the first EOS id, else 0),
    ``stop_strings`` (a row also ends when its text contains one; needs a tokenizer).
    Output: ``num_return_sequences`` (rows per prompt; > 1 needs ``do_sample`` or beams, and at most
    ``num_beams`` with beams), ``seed`` (an int in ``[0, 2**64)``, or a tuple of one per prompt),
    ``logprobs`` (also return each chosen token's log-probability).
    ``suppress_extra_tokens``: ban ids >= 50257 (GPT-J's padding vocabulary); None = on for GPT-J's
    vocabulary and tokenizer (decided by ``generate``).
    """

    max_new_tokens: Optional[int] = None
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: Optional[tuple[tuple[int, ...], ...]] = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    eos_token_id: Union[None, int, tuple[int, ...]] = None
    pad_token_id: Optional[int] = None
    stop_strings: tuple[str, ...] = ()
    num_return_sequences: int = 1
    seed: Union[int, tuple[int, ...]] = 0
    logprobs: bool = False
    suppress_extra_tokens: Optional[bool] = None

    def __post_init__(self) -> None:
        set_ = _setter(self)
        if self.max_new_tokens is not None:
            set_("max_new_tokens", _int("max_new_tokens", self.max_new_tokens, 1))
        set_("min_new_tokens", _int("min_new_tokens", self.min_new_tokens, 0))
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise GenerationError(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})",
                "min_new_tokens",
            )
        names = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")
        for name, value in zip(names, check_sampling(*(getattr(self, n) for n in names))):
            set_(name, value)
        set_("no_repeat_ngram_size", _int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0))
        if self.bad_words_ids is not None:
            set_("bad_words_ids", _bad_words(self.bad_words_ids))
        set_("num_beams", _int("num_beams", self.num_beams, 1))
        if self.num_beams > 1 and self.do_sample:
            raise GenerationError(
                f"num_beams {self.num_beams} with do_sample=True (beam sampling) is not supported: pass "
                "do_sample=False for beam search, or num_beams=1 to sample",
                "num_beams",
            )
        lp = _number(self.length_penalty, integer=False)
        if not _is_real(lp) or not math.isfinite(lp):
            raise GenerationError(f"length_penalty must be a finite number, got {lp!r}", "length_penalty")
        set_("length_penalty", float(lp))
        es = bool(self.early_stopping) if isinstance(self.early_stopping, np.bool_) else self.early_stopping
        if not any(es is v or (isinstance(v, str) and es == v) for v in EARLY_STOPPING):
            raise GenerationError(f"early_stopping must be True, False or 'never', got {es!r}", "early_stopping")
        set_("early_stopping", es)
        if self.eos_token_id is not None:
            eos = _token_ids("eos_token_id", self.eos_token_id)
            single = not isinstance(self.eos_token_id, (list, tuple, np.ndarray))
            set_("eos_token_id", eos[0] if single else eos)
        if self.pad_token_id is not None:
            set_("pad_token_id", _int("pad_token_id", self.pad_token_id, 0))
        stops = self.stop_strings
        stops = () if stops is None else (stops,) if isinstance(stops, str) else tuple(stops)
        if any(not isinstance(s, str) or not s for s in stops):
            raise GenerationError(f"stop_strings must be non-empty strings, got {list(stops)!r}", "stop_strings")
        set_("stop_strings", stops)
        repeats = _int("num_return_sequences", self.num_return_sequences, 1)
        set_("num_return_sequences", repeats)
        if self.num_beams > 1 and repeats > self.num_beams:
            raise GenerationError(
                f"num_return_sequences ({repeats}) must be <= num_beams ({self.num_beams})", "num_return_sequences"
            )
        if self.num_beams == 1 and repeats > 1 and not self.do_sample:
            raise GenerationError(
                "greedy decoding (do_sample=False) does not support num_return_sequences different than 1 "
                f"(got {repeats}): every row would be the same; pass do_sample=True",
                "num_return_sequences",
            )
        if isinstance(self.seed, (list, tuple, np.ndarray)):
            if len(self.seed) == 0:
                raise GenerationError("seed must be an int or a non-empty list of ints (one per prompt), got []", "seed")
            set_("seed", tuple(_seed(f"seed[{i}]", s) for i, s in enumerate(self.seed)))
        else:
            set_("seed", _seed("seed", self.seed))
        set_("logprobs", _bool("logprobs", self.logprobs))
        if self.suppress_extra_tokens is not None:
            set_("suppress_extra_tokens", _bool("suppress_extra_tokens", self.suppress_extra_tokens))

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "GenerationConfig":
        """A config from keyword arguments; an unknown key is a :class:`GenerationError` naming it."""
        _check_keys(kwargs)
        return cls(**kwargs)

    def replace(self, **overrides: Any) -> "GenerationConfig":
        """A copy with ``overrides`` applied (validated again); an unknown key is an error naming it."""
        _check_keys(overrides)
        return dataclasses.replace(self, **overrides) if overrides else self

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **overrides: Any) -> "GenerationConfig":
        """Read ``generation_config.json`` from a model directory (or that file's path), like Transformers'
        ``GenerationConfig.from_pretrained``: the keys named like a field here are read (``null`` = the
        default), the others (``max_length``, ``transformers_version``, ...) ignored. Knobs the file leaves
        out keep this class's defaults (``top_k`` 0 = off, where Transformers' ``generate`` samples with
        50). ``overrides`` are applied on top. Errors name the file and the key.
        """
        path = os.fspath(path)
        file = os.path.join(path, "generation_config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise GenerationError(f"{file}: no such file (a model directory's generation_config.json)")
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GenerationError(f"{file}: not a JSON file ({e})") from None
        if not isinstance(data, dict):
            raise GenerationError(f"{file}: expected a JSON object, got {type(data).__name__}")
        values = {k: v for k, v in data.items() if k in FIELDS and v is not None}
        try:
            config = cls(**values)
        except GenerationError as e:
            raise GenerationError(f"{file}: {e}", e.field) from None
        return config.replace(**overrides)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (tuples as lists)."""
        def plain(value: Any) -> Any:
            return [plain(v) for v in value] if isinstance(value, tuple) else value

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    # ------------------------------------------------------------------------------------ views
    @property
    def eos_ids(self) -> Optional[tuple[int, ...]]:
        """``eos_token_id`` as a tuple (None: not set, use the model config's)."""
        if self.eos_token_id is None:
            return None
        return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else self.eos_token_id


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(GenerationConfig))


def _setter(obj: Any):
    """A setter for a frozen dataclass's fields (normalised values in ``__post_init__``)."""
    return lambda name, value: object.__setattr__(obj, name, value)


def _bad_words(value: Any) -> tuple[tuple[int, ...], ...]:
    """``bad_words_ids``: a non-empty list of non-empty lists of token ids, as tuples."""
    shape = "a non-empty list of non-empty lists of token ids, e.g. [[42], [7, 9]]"
    if not isinstance(value, (list, tuple)) or not value:
        raise GenerationError(f"bad_words_ids must be {shape}, got {value!r}", "bad_words_ids")
    words = []
    for i, word in enumerate(value):
        if not isinstance(word, (list, tuple, np.ndarray)) or len(word) == 0:
            raise GenerationError(f"bad_words_ids[{i}] must be a non-empty list of token ids, got {word!r}",
                                  "bad_words_ids")
        ids = []
        for j, e in enumerate(word):
            e = _number(e, integer=True)
            if not _is_int(e) or e < 0:
                raise GenerationError(f"bad_words_ids[{i}][{j}] = {e!r} is not a token id (an integer >= 0)",
                                      "bad_words_ids")
            ids.append(e)
        words.append(tuple(ids))
    return tuple(words)


def _check_keys(kwargs: dict[str, Any]) -> None:
    for key in kwargs:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise GenerationError(
                f"unknown generation option {key!r}{hint}; the options are: {', '.join(FIELDS)}", key
            )

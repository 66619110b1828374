"""GPTJConfig: the fields of Hugging Face's ``GPTJConfig`` with the same defaults and meaning.

``config.json`` is read and written in the Transformers format, so a directory saved by
``transformers`` loads here and one saved here loads in ``transformers``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Union

ACTIVATIONS = ("gelu_new", "relu", "silu", "gelu", "tanh")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
# How attention is computed (``GPTJConfig.attention``; see ``model.resolve_attention``).
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas_flash", "splash")
# Fields that choose how the model runs, not what it computes: not written to config.json.
RUNTIME_FIELDS = ("attention", "scan_layers", "attention_query_block")

# Fields that fix the shapes of the weights: a config.json without them is an error rather than
# silently taking the 6B defaults (which would then fail later with a confusing shape mismatch).
REQUIRED_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")

# HF aliases (``attribute_map`` in transformers' GPTJConfig).
_ALIASES = {
    "max_position_embeddings": "n_positions",
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
}


# The model presets shipped inside the package (``GPTJConfig.preset``): gptj_jax/presets/<name>.json.
PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")


class ConfigError(ValueError):
    """A config value is missing, of the wrong type, or inconsistent with another one."""


def _is_remote(path: str) -> bool:
    """True for a URL such as ``gs://bucket/dir`` (read through etils.epath), False for a local path."""
    return "://" in path


def read_json_config(path: Union[str, os.PathLike]) -> tuple[str, dict]:
    """``(file, dict)`` of a JSON config: the file itself, or ``config.json`` in a directory.

    ``path`` is local or a URL etils.epath reads (``gs://bucket/run``, an ``epath.Path``).
    """
    path = os.fspath(path)
    if _is_remote(path):
        from etils import epath

        p = epath.Path(path)
        file = os.fspath(p / "config.json") if p.is_dir() else path
        if not epath.Path(file).is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        text = epath.Path(file).read_text(encoding="utf-8")
    else:
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json at {path}")
        with open(file, encoding="utf-8") as f:
            text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return file, data


@dataclasses.dataclass(frozen=True)
class GPTJConfig:
    """Hyper-parameters of GPT-J; defaults are EleutherAI/gpt-j-6B's (and transformers').

    Frozen and hashable, so it can be a static argument of ``jax.jit``.
    """

    vocab_size: int = 50400
    n_positions: int = 2048
    n_embd: int = 4096
    n_layer: int = 28
    n_head: int = 16
    rotary_dim: Optional[int] = 64
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[Union[int, tuple[int, ...]]] = 50256
    pad_token_id: Optional[int] = None
    tie_word_embeddings: bool = False
    num_labels: int = 2
    problem_type: Optional[str] = None
    # (id, label) pairs; None means the HF default LABEL_0..LABEL_{num_labels-1}.
    id2label: Optional[tuple[tuple[int, str], ...]] = None
    # How the model runs (not written to config.json). attention: "xla" (einsum-softmax-einsum, the
    # reference), "cudnn" (jax.nn.dot_product_attention on GPU), "pallas_flash" / "splash" (Pallas TPU
    # kernels), "auto" (by backend and shape; "xla" on CPU). scan_layers: the blocks run under nn.scan
    # with params stacked on a leading "layers" axis (transformer/h/...), compiled once instead of n_layer times.
    attention: str = "auto"
    scan_layers: bool = False
    # > 0: the einsum attention ("xla") runs over blocks of this many query rows, each recomputed in the
    # backward (model.attend_query_blocks): same numbers, one block's float32 scores live at a time.
    attention_query_block: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.id2label, dict):
            pairs = tuple(sorted((int(k), str(v)) for k, v in self.id2label.items()))
            object.__setattr__(self, "id2label", pairs)
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        """Width of the MLP (``n_inner``, or ``4 * n_embd`` when it is None)."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def rotary_dims(self) -> int:
        """Dims of each head that get rotary embeddings (``rotary_dim``, or the whole head when None)."""
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def num_params(self, head: str = "causal_lm") -> int:
        """Parameter count for ``head`` in ("base", "causal_lm", "sequence_classification", "question_answering")."""
        d, f, v, n = self.n_embd, self.inner_dim, self.vocab_size, self.n_layer
        block = 4 * d * d + 2 * d * f + f + d + 2 * d
        base = v * d + n * block + 2 * d
        extra = {
            "base": 0,
            "causal_lm": d * v + v,
            "sequence_classification": d * self.num_labels,
            "question_answering": 2 * d + 2,
        }
        if head not in extra:
            raise ValueError(f"unknown head {head!r}; expected one of {sorted(extra)}")
        return base + extra[head]

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the field when a value is out of range or inconsistent."""
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"{self.n_embd} / {self.n_head} = {self.n_embd / self.n_head:g}"
            )
        if self.rotary_dim is not None:
            if not isinstance(self.rotary_dim, int) or self.rotary_dim <= 0 or self.rotary_dim % 2:
                raise ConfigError(f"rotary_dim must be a positive even integer, got {self.rotary_dim!r}")
            if self.rotary_dim > self.head_dim:
                raise ConfigError(
                    f"rotary_dim ({self.rotary_dim}) must be <= the head dim n_embd / n_head "
                    f"= {self.n_embd} / {self.n_head} = {self.head_dim}"
                )
        elif self.head_dim % 2:
            raise ConfigError(f"rotary_dim=None rotates the whole head, which needs an even head dim, got {self.head_dim}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ConfigError(f"n_inner must be a positive integer or None, got {self.n_inner!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(
                f"activation_function {self.activation_function!r} is not supported; expected one of {list(ACTIVATIONS)}"
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {p!r}")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or self.layer_norm_epsilon <= 0:
            raise ConfigError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"problem_type {self.problem_type!r} is not one of {list(PROBLEM_TYPES)}")
        if self.problem_type == "single_label_classification" and self.num_labels == 1:
            raise ConfigError("problem_type 'single_label_classification' needs num_labels > 1 (got 1)")
        for name in ("bos_token_id", "pad_token_id"):
            tok = getattr(self, name)
            if tok is not None and (not isinstance(tok, int) or tok < 0):
                raise ConfigError(f"{name} must be a non-negative integer or None, got {tok!r}")
        for tok in self.eos_token_ids:
            if not isinstance(tok, int) or tok < 0:
                raise ConfigError(f"eos_token_id must be a non-negative integer (or a list of them), got {self.eos_token_id!r}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"attention {self.attention!r} is not one of {list(ATTENTION_IMPLS)}")
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"scan_layers must be true or false, got {self.scan_layers!r}")
        if not isinstance(self.attention_query_block, int) or self.attention_query_block < 0:
            raise ConfigError(f"attention_query_block must be an integer >= 0, got {self.attention_query_block!r}")
        if self.id2label is not None and len(self.id2label) != self.num_labels:
            raise ConfigError(f"id2label has {len(self.id2label)} entries but num_labels is {self.num_labels}")

    def replace(self, **changes: Any) -> "GPTJConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json
    def to_hf_dict(self, architectures: Optional[list[str]] = None, torch_dtype: Optional[str] = None) -> dict:
        """The ``config.json`` dict transformers writes for GPT-J (``tie_word_embeddings`` always present)."""
        out: dict[str, Any] = {"model_type": "gptj"}
        if architectures:
            out["architectures"] = list(architectures)
        for field in dataclasses.fields(self):
            if field.name in ("num_labels", "id2label") or field.name in RUNTIME_FIELDS:
                continue
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        labels = self.id2label or tuple((i, f"LABEL_{i}") for i in range(self.num_labels))
        out["id2label"] = {str(i): name for i, name in labels}
        out["label2id"] = {name: i for i, name in labels}
        if torch_dtype is not None:
            out["torch_dtype"] = torch_dtype
            out["dtype"] = torch_dtype
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "GPTJConfig":
        """Build from an HF ``config.json`` dict. Unknown HF keys (``transformers_version``...) are ignored."""
        model_type = data.get("model_type", "gptj")
        if model_type != "gptj":
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'gptj'")
        data = {_ALIASES.get(k, k): v for k, v in data.items()}
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {missing}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names and k not in ("num_labels", "id2label")}
        id2label = data.get("id2label")
        if id2label is not None and not isinstance(id2label, dict):
            raise ConfigError(
                f"{source}: id2label must be a mapping of class id to label, e.g. {{\"0\": \"NEGATIVE\", "
                f"\"1\": \"POSITIVE\"}}, got a {type(id2label).__name__}: {id2label!r}"
            )
        if id2label:
            bad = [k for k in id2label if not str(k).strip().lstrip("-").isdigit()]
            if bad:
                raise ConfigError(f"{source}: id2label keys must be integer class ids, got {bad[0]!r}")
            kwargs["id2label"] = tuple(sorted((int(k), str(v)) for k, v in id2label.items()))
            kwargs["num_labels"] = len(id2label)
            if "num_labels" in data and data["num_labels"] != len(id2label):
                raise ConfigError(
                    f"{source}: num_labels is {data['num_labels']} but id2label has {len(id2label)} entries"
                )
            if all(name == f"LABEL_{i}" for i, name in kwargs["id2label"]):
                kwargs["id2label"] = None
        elif "num_labels" in data:
            kwargs["num_labels"] = data["num_labels"]
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:  # e.g. a list where an int belongs
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike]) -> "GPTJConfig":
        """Read an HF ``config.json`` (the file itself, or the directory holding it)."""
        file, data = read_json_config(path)
        return cls.from_dict(data, source=file)

    def save_pretrained(
        self,
        directory: Union[str, os.PathLike],
        architectures: Optional[list[str]] = None,
        torch_dtype: Optional[str] = None,
    ) -> str:
        """Write ``directory/config.json`` (atomically) and return its path.

        ``directory`` is local or a URL etils.epath writes (``gs://bucket/run``); an object store replaces
        the object in one piece, so the remote write needs no temporary file.
        """
        directory = os.fspath(directory)
        text = json.dumps(self.to_hf_dict(architectures, torch_dtype), indent=2, sort_keys=True) + "\n"
        if _is_remote(directory):
            from etils import epath

            target = epath.Path(directory)
            target.mkdir(parents=True, exist_ok=True)
            (target / "config.json").write_text(text, encoding="utf-8")
            return os.fspath(target / "config.json")
        os.makedirs(directory, exist_ok=True)
        file = os.path.join(directory, "config.json")
        tmp = file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, file)
        return file

    @classmethod
    def preset(cls, name: str) -> "GPTJConfig":
        """A model preset shipped in the package (``gptj_jax/presets/<name>.json``): see :func:`preset_names`."""
        names = preset_names()
        if name not in names:
            raise FileNotFoundError(f"no preset named {name!r}; presets: {', '.join(names)}")
        return cls.from_pretrained(os.path.join(PRESETS_DIR, f"{name}.json"))

    @classmethod
    def load(cls, name_or_path: Union[str, os.PathLike]) -> "GPTJConfig":
        """A ``config.json`` (the file, or the directory holding it) or, when no such path exists, a preset name."""
        text = os.fspath(name_or_path)
        if _is_remote(text) or os.path.exists(text):
            return cls.from_pretrained(text)
        if text in preset_names():
            return cls.preset(text)
        raise FileNotFoundError(
            f"{text}: no such config.json (file or directory) and no preset of that name; "
            f"presets: {', '.join(preset_names())}"
        )


def preset_names() -> list[str]:
    """Names of the presets :meth:`GPTJConfig.preset` knows (``gptj-1.3b``, ``gptj-162m``, ``gptj-6b``, ``gptj-tiny``)."""
    if not os.path.isdir(PRESETS_DIR):
        return []
    return sorted(f[: -len(".json")] for f in os.listdir(PRESETS_DIR) if f.endswith(".json"))

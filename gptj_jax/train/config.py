"""The training config: a JSON or YAML file of flat keys plus ``key=value`` overrides from the command line.

mesh-transformer-jax's keys keep their meaning (so an mtj config such as ``6B_roto_256.json`` runs with
only its data paths changed); our own keys add what mtj kept in code or flags. Every key, its type, its
default and its meaning is one row of :data:`KEYS`; an unknown key or a value of the wrong type is a
:class:`TrainConfigError` naming the key and the file (or ``command line``).

    cfg = load_train_config("configs/demo-tiny.yaml", ["total_steps=50", "val_set.demo=data/val"])

Batch arithmetic (as in mtj): one optimizer step consumes ``gradient_accumulation_steps`` micro-batches
of ``per_replica_batch * n_replicas`` sequences, where ``n_replicas = dp * fsdp`` (mtj's
``tpu_size / cores_per_replica``). Each sequence is ``seq`` tokens predicted from a ``seq + 1``-token record.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from typing import Any, Optional, Union

import yaml

from gptj_jax.config import GPTJConfig, preset_names


class TrainConfigError(ValueError):
    """A training config key is unknown, has the wrong type, or an invalid or inconsistent value."""


# (key, type, default, meaning). ``REQUIRED`` marks keys without a default.
REQUIRED = object()

MTJ_KEYS: tuple[tuple[str, Any, Any, str], ...] = (
    ("layers", Optional[int], None, "number of blocks (n_layer); with `model` it must match the checkpoint"),
    ("d_model", Optional[int], None, "model width (n_embd)"),
    ("n_heads", Optional[int], None, "attention heads (n_head)"),
    ("n_vocab", Optional[int], None, "vocabulary rows (vocab_size); 50400 for GPT-J"),
    ("norm", str, "layernorm", "only 'layernorm' (GPT-J)"),
    ("pe", str, "rotary", "only 'rotary' (GPT-J)"),
    ("pe_rotary_dims", Optional[int], None, "rotary dims per head (rotary_dim)"),
    ("seq", int, 2048, "tokens per training sequence; records are seq + 1 tokens"),
    ("cores_per_replica", Optional[int], None, "model-parallel width: the mesh's mp axis"),
    ("per_replica_batch", int, 1, "sequences per data-parallel replica per micro-batch"),
    ("gradient_accumulation_steps", int, 1, "micro-batches summed into one optimizer step"),
    ("warmup_steps", int, 0, "linear warmup from 0 to lr over this many steps"),
    ("anneal_steps", Optional[int], None, "cosine from lr to end_lr over this many steps after warmup "
     "(default: total_steps - warmup_steps); constant end_lr after"),
    ("lr", float, 1e-4, "peak learning rate"),
    ("end_lr", Optional[float], None, "learning rate after annealing (default: lr, i.e. no decay)"),
    ("weight_decay", float, 0.0, "additive weight decay, only on tensors with 2 or more dims"),
    ("total_steps", int, REQUIRED, "optimizer steps to train to (a resumed run continues up to it)"),
    ("ckpt_every", int, 500, "save a checkpoint every this many steps (and at total_steps, and on SIGTERM)"),
    ("keep_every", Optional[int], None, "also keep every checkpoint whose step is a multiple of this"),
    ("val_every", int, 500, "evaluate every val_set entry every this many steps"),
    ("val_batches", int, 100, "at most this many batches per validation set"),
    ("name", str, "gptj-jax", "run name (shown in logs)"),
    ("model_dir", str, REQUIRED, "where checkpoints, metrics.jsonl and TensorBoard files go: a local path or gs://bucket/dir"),
    ("train_set", str, REQUIRED, "a directory written by `gptj-jax prepare`, local or gs://"),
    ("val_set", dict, {}, "name -> directory written by `gptj-jax prepare`"),
    # mtj keys accepted for compatibility and not used by this trainer.
    ("tpu_size", Optional[int], None, "ignored: the device count comes from JAX (mtj: TPU cores)"),
    ("bucket", Optional[str], None, "ignored: mtj's GCS bucket (model_dir can be any path orbax writes)"),
    ("eval_harness_tasks", list, [], "ignored: lm-eval-harness tasks run by mtj"),
    ("wandb_project", Optional[str], None, "ignored: logging goes to metrics.jsonl and TensorBoard"),
    ("comment", Optional[str], None, "free text"),
)

OUR_KEYS: tuple[tuple[str, Any, Any, str], ...] = (
    ("model", Optional[str], None, "checkpoint to start from: an HF directory, our checkpoint or an mtj "
     "checkpoint; empty for a random init"),
    ("model_config", Optional[str], None, "for a random init: a preset name (gptj-tiny, gptj-162m...) or a "
     "config.json path; the mtj shape keys override its fields"),
    ("n_positions", Optional[int], None, "n_positions for a random init (default: max(seq, 2048))"),
    ("mesh", Optional[str], None, "mesh as 'dp=-1,fsdp=1,mp=1' (-1: the rest of the devices); default "
     "mp=cores_per_replica, dp = the rest"),
    ("dtype", str, "bfloat16", "compute dtype: float32, bfloat16 or float16"),
    ("param_dtype", str, "float32", "master parameter and optimizer state dtype"),
    ("remat", str, "none", "rematerialisation per block: none, dots, dots_no_batch, full"),
    ("forward", str, "gspmd", "gspmd (jit with shardings) or shard_map (explicit tensor parallelism, "
     "vocab-parallel loss)"),
    ("dropout", Optional[float], None, "sets resid_pdrop, embd_pdrop and attn_pdrop of the model (mtj: none)"),
    ("z_loss", float, 0.0, "coefficient of mtj's z-loss (mtj used 1e-4): z * log(sum(exp(logits - max)))^2"),
    ("seed", int, 0, "seed of the random init, the data order and dropout"),
    ("shuffle", bool, True, "shuffle training records (per epoch, from seed)"),
    ("data_workers", int, 0, "grain worker processes reading records (0: in the main process)"),
    ("adam_b1", float, 0.9, "Adam beta1 (mtj: optax default)"),
    ("adam_b2", float, 0.999, "Adam beta2"),
    ("adam_eps", float, 1e-8, "Adam epsilon"),
    ("clip_norm", float, 1.0, "global-norm gradient clip (mtj: 1.0)"),
    ("keep_last", int, 3, "keep this many most recent checkpoints (plus keep_every ones)"),
    ("async_checkpointing", bool, True, "write checkpoints in the background"),
    ("log_every", int, 1, "write a metrics row every this many steps"),
    ("peak_flops", Optional[float], None, "peak FLOP/s per device for MFU; measured on the spot when empty"),
    ("progress", bool, True, "show a progress bar"),
    ("tensorboard", bool, True, "write TensorBoard event files (needs tensorboardX)"),
)

KEYS = MTJ_KEYS + OUR_KEYS
_SPEC = {k: (t, d, m) for k, t, d, m in KEYS}

DTYPES = ("float32", "bfloat16", "float16")
REMATS = ("none", "dots", "dots_no_batch", "full")
FORWARDS = ("gspmd", "shard_map")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """All training keys (see :data:`KEYS` for meanings). Build with :func:`load_train_config`."""

    layers: Optional[int] = None
    d_model: Optional[int] = None
    n_heads: Optional[int] = None
    n_vocab: Optional[int] = None
    norm: str = "layernorm"
    pe: str = "rotary"
    pe_rotary_dims: Optional[int] = None
    seq: int = 2048
    cores_per_replica: Optional[int] = None
    per_replica_batch: int = 1
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 0
    anneal_steps: Optional[int] = None
    lr: float = 1e-4
    end_lr: Optional[float] = None
    weight_decay: float = 0.0
    total_steps: int = 0
    ckpt_every: int = 500
    keep_every: Optional[int] = None
    val_every: int = 500
    val_batches: int = 100
    name: str = "gptj-jax"
    model_dir: str = ""
    train_set: str = ""
    val_set: dict = dataclasses.field(default_factory=dict)
    tpu_size: Optional[int] = None
    bucket: Optional[str] = None
    eval_harness_tasks: list = dataclasses.field(default_factory=list)
    wandb_project: Optional[str] = None
    comment: Optional[str] = None
    model: Optional[str] = None
    model_config: Optional[str] = None
    n_positions: Optional[int] = None
    mesh: Optional[str] = None
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "none"
    forward: str = "gspmd"
    dropout: Optional[float] = None
    z_loss: float = 0.0
    seed: int = 0
    shuffle: bool = True
    data_workers: int = 0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    clip_norm: float = 1.0
    keep_last: int = 3
    async_checkpointing: bool = True
    log_every: int = 1
    peak_flops: Optional[float] = None
    progress: bool = True
    tensorboard: bool = True

    # ------------------------------------------------------------------ derived
    @property
    def end_lr_value(self) -> float:
        return self.lr if self.end_lr is None else self.end_lr

    @property
    def anneal_steps_value(self) -> int:
        if self.anneal_steps is not None:
            return self.anneal_steps
        return max(self.total_steps - self.warmup_steps, 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


assert [f.name for f in dataclasses.fields(TrainConfig)] == [k for k, *_ in KEYS], "KEYS and TrainConfig drifted"


# ---------------------------------------------------------------------------------------- types
def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping",
            list: "a list"}.get(tp, str(tp))


def _check_type(key: str, value: Any, source: str) -> Any:
    """Return ``value`` coerced to the key's type (int -> float for float keys) or raise naming the key."""
    tp = _SPEC[key][0]
    optional = typing.get_origin(tp) is Union
    base = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp
    if value is None:
        if optional:
            return None
        raise TrainConfigError(f"{source}: key {key!r} must be {_type_name(tp)}, got null")
    ok = False
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise TrainConfigError(f"{source}: key {key!r} must be a number, got {value!r} (str)") from None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif base is str:
        ok = isinstance(value, str)
    elif base is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    elif base is list:
        ok = isinstance(value, list)
    if not ok:
        what = "a mapping of names to directory strings" if base is dict else _type_name(tp)
        raise TrainConfigError(f"{source}: key {key!r} must be {what}, got {value!r} ({type(value).__name__})")
    return value


def _unknown(key: str, source: str) -> TrainConfigError:
    close = difflib.get_close_matches(key, [k for k, *_ in KEYS], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see docs/training.md for the keys"
    return TrainConfigError(f"{source}: unknown key {key!r}{hint}")


# ---------------------------------------------------------------------------------------- loading
def read_config_file(path: str) -> dict:
    """The key -> value mapping in a JSON (``.json``) or YAML file; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training config {path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise TrainConfigError(f"{path}: cannot parse ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"lr=3e-4"`` -> ``("lr", 0.0003)``; the value is parsed as YAML (numbers, true/false, null, {a: b}).

    ``val_set.NAME=DIR`` sets one entry of the ``val_set`` mapping.
    """
    if "=" not in text:
        raise TrainConfigError(f"command line: override {text!r} is not KEY=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not raw.strip():
        return key, None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    spec = _SPEC.get(key)
    if spec is not None and spec[0] in (str, Optional[str]) and value is not None:
        value = raw  # e.g. name=123 stays the string "123"
    if key.startswith("val_set."):
        value = raw
    return key, value


def load_train_config(path: Optional[str], overrides: list[str] = (), base: Optional[dict] = None) -> TrainConfig:
    """Read ``path`` (JSON or YAML; None for none), apply ``key=value`` overrides, check every key and value."""
    data: dict[str, tuple[Any, str]] = {}
    for key, value in (base or {}).items():
        data[key] = (value, "<defaults>")
    if path is not None:
        for key, value in read_config_file(path).items():
            data[str(key)] = (value, path)
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("val_set."):
            name = key.split(".", 1)[1]
            current = dict(data.get("val_set", ({}, "command line"))[0] or {})
            if value is None:
                current.pop(name, None)
            else:
                current[name] = str(value)
            data["val_set"] = (current, "command line")
        else:
            data[key] = (value, "command line")
    kwargs = {}
    for key, (value, source) in data.items():
        if key not in _SPEC:
            raise _unknown(key, source)
        kwargs[key] = _check_type(key, value, source)
    missing = [key for key, (_, default, _) in _SPEC.items() if default is REQUIRED and key not in kwargs]
    if len(missing) == 1:
        raise TrainConfigError(f"{path or 'config'}: missing required key {missing[0]!r} ({_SPEC[missing[0]][2]})")
    if missing:
        listed = "; ".join(f"{key!r} ({_SPEC[key][2]})" for key in missing)
        raise TrainConfigError(f"{path or 'config'}: missing required keys {listed}")
    cfg = TrainConfig(**kwargs)
    validate(cfg, path or "config")
    return cfg


def validate(cfg: TrainConfig, source: str = "config") -> None:
    """Range and consistency checks that need no model or devices; errors name the key."""
    positive = ("seq", "per_replica_batch", "gradient_accumulation_steps", "total_steps", "ckpt_every", "val_every",
                "val_batches", "keep_last", "log_every")
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise TrainConfigError(f"{source}: key {key!r} must be > 0, got {getattr(cfg, key)}")
    for key in ("layers", "d_model", "n_heads", "n_vocab", "pe_rotary_dims", "cores_per_replica", "anneal_steps",
                "keep_every", "n_positions", "tpu_size"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise TrainConfigError(f"{source}: key {key!r} must be > 0, got {value}")
    for key in ("warmup_steps", "data_workers"):
        if getattr(cfg, key) < 0:
            raise TrainConfigError(f"{source}: key {key!r} must be >= 0, got {getattr(cfg, key)}")
    for key in ("lr", "weight_decay", "z_loss", "clip_norm"):
        if getattr(cfg, key) < 0:
            raise TrainConfigError(f"{source}: key {key!r} must be >= 0, got {getattr(cfg, key)}")
    if cfg.end_lr is not None and cfg.end_lr < 0:
        raise TrainConfigError(f"{source}: key 'end_lr' must be >= 0, got {cfg.end_lr}")
    if cfg.norm != "layernorm":
        raise TrainConfigError(f"{source}: key 'norm' must be 'layernorm' (GPT-J), got {cfg.norm!r}")
    if cfg.pe != "rotary":
        raise TrainConfigError(f"{source}: key 'pe' must be 'rotary' (GPT-J), got {cfg.pe!r}")
    for key, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat", REMATS), ("forward", FORWARDS)):
        if getattr(cfg, key) not in allowed:
            raise TrainConfigError(f"{source}: key {key!r} must be one of {list(allowed)}, got {getattr(cfg, key)!r}")
    if not cfg.model_dir:
        raise TrainConfigError(f"{source}: key 'model_dir' is empty")
    if not cfg.train_set:
        raise TrainConfigError(f"{source}: key 'train_set' is empty")
    if cfg.mesh is not None:
        from gptj_jax.sharding import parse_mesh

        try:
            sizes = parse_mesh(cfg.mesh)
        except ValueError as e:
            raise TrainConfigError(f"{source}: key 'mesh': {e}") from None
        if cfg.cores_per_replica is not None and sizes["mp"] != cfg.cores_per_replica:
            raise TrainConfigError(
                f"{source}: key 'mesh' has mp={sizes['mp']} but cores_per_replica is {cfg.cores_per_replica}; "
                "drop one of them or make them agree"
            )
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        raise TrainConfigError(f"{source}: key 'dropout' must be in [0, 1), got {cfg.dropout}")
    if cfg.peak_flops is not None and cfg.peak_flops <= 0:
        raise TrainConfigError(f"{source}: key 'peak_flops' must be > 0, got {cfg.peak_flops}")


def mesh_sizes(cfg: TrainConfig) -> dict[str, int]:
    """``{"dp", "fsdp", "mp"}`` from ``mesh`` or ``cores_per_replica`` (dp = the rest of the devices)."""
    from gptj_jax.sharding import parse_mesh

    if cfg.mesh is not None:
        sizes = parse_mesh(cfg.mesh)
        if "dp=" not in cfg.mesh.replace(" ", "") and -1 not in sizes.values():
            sizes["dp"] = -1
        return sizes
    return {"dp": -1, "fsdp": 1, "mp": cfg.cores_per_replica or 1}


# ---------------------------------------------------------------------------------------- model shape
_ARCH = (("layers", "n_layer"), ("d_model", "n_embd"), ("n_heads", "n_head"), ("n_vocab", "vocab_size"),
         ("pe_rotary_dims", "rotary_dim"))


def model_config_for(cfg: TrainConfig, loaded: Optional[GPTJConfig] = None) -> GPTJConfig:
    """The GPTJConfig to train.

    With a checkpoint (``loaded``), the mtj shape keys that are set must agree with it (an error names the
    first that does not). For a random init: ``model_config`` (preset or file) or GPT-J-6B's defaults,
    with every set shape key replacing its field. ``seq`` must fit in ``n_positions``.
    """
    if loaded is not None:
        for key, field in _ARCH:
            value = getattr(cfg, key)
            if value is not None and value != getattr(loaded, field):
                raise TrainConfigError(
                    f"key {key!r} is {value} but the checkpoint in 'model' ({cfg.model}) has {field}={getattr(loaded, field)}"
                )
        model_cfg = loaded
    else:
        if cfg.model_config is None:
            base = GPTJConfig()
        elif os.path.exists(cfg.model_config) or "://" in cfg.model_config:
            base = GPTJConfig.from_pretrained(cfg.model_config)
        else:
            try:
                base = GPTJConfig.preset(cfg.model_config)
            except FileNotFoundError:
                raise TrainConfigError(
                    f"key 'model_config': {cfg.model_config!r} is neither a config.json path nor a preset "
                    f"({', '.join(preset_names())})"
                ) from None
        changes = {field: getattr(cfg, key) for key, field in _ARCH if getattr(cfg, key) is not None}
        if cfg.n_positions is not None:
            changes["n_positions"] = cfg.n_positions
        elif cfg.model_config is None:
            changes["n_positions"] = max(cfg.seq, 2048)
        try:
            model_cfg = base.replace(**changes)
        except ValueError as e:
            raise TrainConfigError(f"model shape from the config keys: {e}") from None
    if cfg.dropout is not None:
        model_cfg = model_cfg.replace(resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)
    if cfg.seq > model_cfg.n_positions:
        raise TrainConfigError(
            f"key 'seq' ({cfg.seq}) is larger than the model's n_positions ({model_cfg.n_positions}); "
            f"use seq <= {model_cfg.n_positions}"
        )
    return model_cfg

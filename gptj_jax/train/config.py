"""The training config: a JSON or YAML file of flat keys plus ``key=value`` overrides from the command line.

mesh-transformer-jax's keys keep their meaning (so an mtj config such as ``6B_roto_256.json`` runs with
only its data paths changed); our own keys add what mtj kept in code or flags. Every key, its type, its
default and its meaning is one field of :class:`TrainConfig` (the one source: the type checks, :data:`KEYS` and
the tables in docs/training.md, :func:`keys_markdown`, derive from it); an unknown key or a value of the wrong
type is a :class:`TrainConfigError` naming the key and the file (or ``command line``).

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

from gptj_jax.config import ATTENTION_IMPLS, GPTJConfig, preset_names
from gptj_jax.convert.mtj import MTJ_SHAPE_KEYS
from gptj_jax.dtypes import DTYPE_NAMES


class TrainConfigError(ValueError):
    """A training config key is unknown, has the wrong type, or an invalid or inconsistent value."""


REMATS = ("none", "dots", "dots_no_batch", "full")
FORWARDS = ("gspmd", "shard_map")


def _key(default: Any, help: str, *, mtj: bool = False, required: bool = False) -> Any:
    """One config key: its default, its meaning (``help``, the docs table), whether mesh-transformer-jax has it
    (``mtj``) and whether a config must set it (``required``: the default only fills the dataclass field)."""
    value = {"default_factory": type(default)} if isinstance(default, (dict, list)) else {"default": default}
    return dataclasses.field(**value, metadata={"help": help, "mtj": mtj, "required": required})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every training key: its type, default and meaning. Build with :func:`load_train_config`.

    mesh-transformer-jax's keys (``mtj=True``) come first, with mtj's meaning; then our own keys.
    """

    # ---- mesh-transformer-jax's keys
    layers: Optional[int] = _key(None, "number of blocks (`n_layer`); for a random init it sets the model, with "
                                 "`model` it must match the checkpoint", mtj=True)
    d_model: Optional[int] = _key(None, "model width (`n_embd`); as `layers`", mtj=True)
    n_heads: Optional[int] = _key(None, "attention heads (`n_head`); as `layers`", mtj=True)
    n_vocab: Optional[int] = _key(None, "vocabulary rows (`vocab_size`), 50400 for GPT-J; as `layers`", mtj=True)
    norm: str = _key("layernorm", "only `layernorm` (GPT-J)", mtj=True)
    pe: str = _key("rotary", "only `rotary` (GPT-J)", mtj=True)
    pe_rotary_dims: Optional[int] = _key(None, "rotary dims per head (`rotary_dim`); as `layers`", mtj=True)
    seq: int = _key(2048, "tokens per training sequence (records are `seq + 1` tokens); must be at most the model's "
                    "`n_positions`", mtj=True)
    cores_per_replica: Optional[int] = _key(None, "model-parallel width: the mesh's `mp` axis (tensor parallelism); "
                                            "`dp` is the rest of the devices", mtj=True)
    per_replica_batch: int = _key(1, "sequences per data-parallel replica per micro-batch: a micro-batch is "
                                  "`per_replica_batch * dp * fsdp` sequences", mtj=True)
    gradient_accumulation_steps: int = _key(1, "micro-batches per optimizer step (summed, then divided by their "
                                            "count)", mtj=True)
    warmup_steps: int = _key(0, "linear warmup from 0 to `lr` over this many steps (see the optimizer below)",
                             mtj=True)
    anneal_steps: Optional[int] = _key(None, "half cosine from `lr` to `end_lr` over this many steps after warmup "
                                       "(null: `total_steps - warmup_steps`); constant `end_lr` after", mtj=True)
    lr: float = _key(1e-4, "peak learning rate", mtj=True)
    end_lr: Optional[float] = _key(None, "learning rate after annealing (null: `lr`, i.e. no decay)", mtj=True)
    weight_decay: float = _key(0.0, "additive weight decay, only on tensors with 2 or more dims", mtj=True)
    total_steps: int = _key(0, "optimizer steps to train to (a resumed run continues up to it)", mtj=True,
                            required=True)
    ckpt_every: int = _key(500, "save a checkpoint every this many steps (and at total_steps, and on SIGTERM)",
                           mtj=True)
    keep_every: Optional[int] = _key(None, "also keep every checkpoint whose step is a multiple of this", mtj=True)
    val_every: int = _key(500, "evaluate every `val_set` entry every this many steps", mtj=True)
    val_batches: int = _key(100, "at most this many batches per validation set (its first ones)", mtj=True)
    name: str = _key("gptj-jax", "run name (shown in logs)", mtj=True)
    model_dir: str = _key("", "where checkpoints, metrics.jsonl and TensorBoard files go: a local path or "
                          "gs://bucket/dir", mtj=True, required=True)
    train_set: str = _key("", "a directory written by `gptj-jax prepare`, local or gs://", mtj=True, required=True)
    val_set: dict = _key({}, "name -> directory written by `gptj-jax prepare` (local or `gs://`)", mtj=True)
    tpu_size: Optional[int] = _key(None, "ignored: the device count comes from JAX (mtj: TPU cores)", mtj=True)
    bucket: Optional[str] = _key(None, "ignored: mtj's GCS bucket (`model_dir` can be any path orbax writes)",
                                 mtj=True)
    eval_harness_tasks: list = _key([], "lm-eval tasks run in-process on the current params every `val_every` steps "
                                    "(rows `harness_<task>_<metric>`; needs the `[eval]` extra)", mtj=True)
    wandb_project: Optional[str] = _key(None, "ignored: logging goes to metrics.jsonl and TensorBoard", mtj=True)
    comment: Optional[str] = _key(None, "free text", mtj=True)

    # ---- our keys
    eval_harness_limit: Optional[int] = _key(None, "at most this many documents per `eval_harness_tasks` task (null: "
                                             "all)")
    eval_harness_include_path: Optional[str] = _key(None, "a directory of extra lm-eval task YAML files for "
                                                    "`eval_harness_tasks`")
    model: Optional[str] = _key(None, "start from a checkpoint (anything `gptj_jax.load` reads): a hub id `owner/name`, HF or "
                                "HF Flax directory, gptj-jax checkpoint or run directory (newest step), or an mtj "
                                "checkpoint (its shape comes from the mtj shape keys); null: a random init")
    model_config: Optional[str] = _key(None, "for a random init: a preset (`gptj-tiny`, `gptj-162m`, `gptj-1.3b`, "
                                       "`gptj-6b`: `gptj_jax/presets/`) or a `config.json` path (null: GPT-J-6B); "
                                       "the mtj shape keys override its fields")
    n_positions: Optional[int] = _key(None, "`n_positions` for a random init without `model_config` (null: "
                                      "`max(seq, 2048)`)")
    mesh: Optional[str] = _key(None, "mesh as `dp=-1,fsdp=4,mp=2` (`-1`: the rest of the devices; an axis left "
                               "out is 1, `dp` the rest); null: `mp=cores_per_replica`, `dp` = the rest")
    dtype: str = _key("bfloat16", "compute dtype: `float32`, `bfloat16` or `float16`")
    param_dtype: str = _key("float32", "master parameter and optimizer state dtype")
    remat: str = _key("none", "rematerialisation per block: `none`, `dots`, `dots_no_batch`, `full`")
    attention: str = _key("auto", "attention implementation (the model config's `attention`): `auto` (by backend: "
                          "`xla` on CPU, `cudnn` on GPU, `splash` on TPU), `xla`, `cudnn`, `pallas_flash`, `splash`")
    attention_query_block: int = _key(0, "> 0: the einsum attention (`xla`) runs over blocks of this many query rows, "
                                      "each block's float32 scores recomputed in the backward (same numbers, a "
                                      "fraction of the attention memory; no attention dropout); 0: all rows at once")
    scan_layers: bool = _key(False, "run the blocks under `nn.scan` (params stacked on a leading `layers` axis; "
                             "one block compiled instead of `layers`); `forward: gspmd` only")
    forward: str = _key("gspmd", "`gspmd` (the linen model under `jit`, XLA places the collectives) or `shard_map` "
                        "(explicit Megatron layout from `gptj_jax/tp.py`, vocab-parallel loss; no dropout or remat)")
    dropout: Optional[float] = _key(None, "sets `resid_pdrop`, `embd_pdrop` and `attn_pdrop` of the model (null: the "
                                    "model's; mtj trained GPT-J without dropout)")
    z_loss: float = _key(0.0, "coefficient of mtj's z-loss (mtj used 1e-4): adds "
                         "`z * log(sum(exp(logits - max)))^2` per token")
    loss_block_size: int = _key(8192, "> 0: cross entropy in blocks of this many vocabulary columns (the backward "
                                "recomputes each block's logits), so the `[batch, seq, n_vocab]` logits are never "
                                "held; same loss and gradients (float32, 1e-5); 0: full logits. 8192 by measurement: "
                                "on TPU v5e the same memory at 2 rows, 1.23 / 2.45 GiB less at 4 / 8 rows of a "
                                "4-layer GPT-J-6B-width step, and 1.03-1.37x faster per step on CPU (162M); it costs "
                                "one more `lm_head` matmul (about 1% of GPT-J-6B's step FLOPs). See "
                                "docs/benchmarks.md")
    seed: int = _key(0, "seed of the random init, the data order and dropout")
    shuffle: bool = _key(True, "shuffle training records (per epoch, from `seed`)")
    data_workers: int = _key(0, "grain worker processes reading records (0: in the main process)")
    adam_b1: float = _key(0.9, "Adam beta1 (mtj: optax's default)")
    adam_b2: float = _key(0.999, "Adam beta2 (mtj: optax's default)")
    adam_eps: float = _key(1e-8, "Adam epsilon (mtj: optax's default)")
    clip_norm: float = _key(1.0, "global-norm gradient clip (mtj: 1.0)")
    keep_last: int = _key(3, "keep this many most recent checkpoints (plus the `keep_every` ones)")
    async_checkpointing: bool = _key(True, "write checkpoints in the background")
    log_every: int = _key(1, "write a `metrics.jsonl` row every this many steps")
    peak_flops: Optional[float] = _key(None, "peak FLOP/s per device for MFU (null: a matmul in the compute dtype is "
                                       "timed at startup)")
    progress: bool = _key(True, "show a progress bar")
    tensorboard: bool = _key(True, "write TensorBoard event files (when `tensorboardX` is installed)")
    # ---- LoRA (gptj_jax/lora.py): on when lora_rank > 0; needs `model` (the frozen base)
    lora_rank: int = _key(0, "LoRA rank r (0: full fine-tuning); only the adapters train, the `model` base is frozen")
    lora_alpha: float = _key(16.0, "LoRA alpha: the adapter output is scaled by `lora_alpha / lora_rank`")
    lora_dropout: float = _key(0.0, "dropout on the adapters' input, in [0, 1)")
    lora_targets: str = _key(r"transformer/h_\d+/(attn/(q|k|v|out)_proj|mlp/fc_(in|out))/kernel",
                             "regex matched in full against kernel paths: which kernels get adapters")
    lora_base_dtype: Optional[str] = _key(None, "dtype of the frozen base weights (null: `param_dtype`)")
    lora_base_quantize: Optional[str] = _key(None, "`int8`: the frozen base is int8 weight-only (QLoRA-style)")

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


_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)
KEYS: tuple[str, ...] = tuple(_FIELDS)  # every key, in the order of the docs
REQUIRED_KEYS: tuple[str, ...] = tuple(k for k, f in _FIELDS.items() if f.metadata["required"])


def key_help(key: str) -> str:
    """The meaning of a key (its row in docs/training.md)."""
    return _FIELDS[key].metadata["help"]


# ---------------------------------------------------------------------------------------- docs
def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def keys_markdown(mtj: bool) -> str:
    """The Markdown table of mesh-transformer-jax's keys (``mtj=True``) or of ours, as in docs/training.md.

    ``tests/test_train_config.py`` checks that the doc holds exactly this text.
    """
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, f in _FIELDS.items():
        if f.metadata["mtj"] != mtj:
            continue
        default = "required" if f.metadata["required"] else f"`{_yaml_value(_field_default(f))}`"
        meaning = f.metadata["help"].replace("|", "\\|")
        kind = _type_name(_TYPES[key])
        kind = kind.split(" ", 1)[1] if kind.startswith(("a ", "an ")) else kind  # "an integer" -> "integer"
        rows.append(f"| `{key}` | {kind} | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


# ---------------------------------------------------------------------------------------- types
def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping",
            list: "a list"}.get(tp, str(tp))


def _check_type(key: str, value: Any, source: str) -> Any:
    """Return ``value`` coerced to the key's type (int -> float for float keys) or raise naming the key."""
    tp = _TYPES[key]
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
    close = difflib.get_close_matches(key, KEYS, n=3)
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
    if _TYPES.get(key) in (str, Optional[str]) and value is not None:
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
        if key not in _FIELDS:
            raise _unknown(key, source)
        kwargs[key] = _check_type(key, value, source)
    missing = [key for key in REQUIRED_KEYS if key not in kwargs]
    if len(missing) == 1:
        raise TrainConfigError(f"{path or 'config'}: missing required key {missing[0]!r} ({key_help(missing[0])})")
    if missing:
        listed = "; ".join(f"{key!r} ({key_help(key)})" for key in missing)
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
    for key in ("warmup_steps", "data_workers", "loss_block_size", "attention_query_block"):
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
    for key, allowed in (("dtype", DTYPE_NAMES), ("param_dtype", DTYPE_NAMES), ("remat", REMATS), ("forward", FORWARDS),
                         ("attention", ATTENTION_IMPLS)):
        if getattr(cfg, key) not in allowed:
            raise TrainConfigError(f"{source}: key {key!r} must be one of {list(allowed)}, got {getattr(cfg, key)!r}")
    if cfg.scan_layers and cfg.forward == "shard_map":
        raise TrainConfigError(f"{source}: key 'scan_layers' needs 'forward: gspmd' (the shard_map forward is unrolled)")
    if cfg.lora_rank < 0:
        raise TrainConfigError(f"{source}: key 'lora_rank' must be >= 0, got {cfg.lora_rank}")
    if cfg.lora_rank and not cfg.model:
        raise TrainConfigError(f"{source}: key 'lora_rank' needs key 'model': the base checkpoint the adapters train on")
    if cfg.lora_base_dtype is not None and cfg.lora_base_dtype not in DTYPE_NAMES:
        raise TrainConfigError(f"{source}: key 'lora_base_dtype' must be one of {list(DTYPE_NAMES)}, got {cfg.lora_base_dtype!r}")
    if cfg.lora_base_quantize not in (None, "int8"):
        raise TrainConfigError(f"{source}: key 'lora_base_quantize' must be null or 'int8', got {cfg.lora_base_quantize!r}")
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
    if not all(isinstance(t, str) and t.strip() for t in cfg.eval_harness_tasks):
        raise TrainConfigError(f"{source}: key 'eval_harness_tasks' must be a list of task names, got "
                               f"{cfg.eval_harness_tasks!r}")
    if cfg.eval_harness_limit is not None and cfg.eval_harness_limit <= 0:
        raise TrainConfigError(f"{source}: key 'eval_harness_limit' must be > 0, got {cfg.eval_harness_limit}")


def mesh_sizes(cfg: TrainConfig) -> dict[str, int]:
    """``{"dp", "fsdp", "mp"}`` from ``mesh`` or ``cores_per_replica`` (dp = the rest of the devices)."""
    from gptj_jax.sharding import parse_mesh

    if cfg.mesh is not None:
        return parse_mesh(cfg.mesh, rest="dp")
    return {"dp": -1, "fsdp": 1, "mp": cfg.cores_per_replica or 1}


# ---------------------------------------------------------------------------------------- model shape


def model_config_for(cfg: TrainConfig, loaded: Optional[GPTJConfig] = None) -> GPTJConfig:
    """The GPTJConfig to train.

    With a checkpoint (``loaded``), the mtj shape keys that are set must agree with it (an error names the
    first that does not). For a random init: ``model_config`` (preset or file) or GPT-J-6B's defaults,
    with every set shape key replacing its field. ``seq`` must fit in ``n_positions``.
    """
    if loaded is not None:
        for key, field in MTJ_SHAPE_KEYS.items():
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
        changes = {field: getattr(cfg, key) for key, field in MTJ_SHAPE_KEYS.items() if getattr(cfg, key) is not None}
        if cfg.n_positions is not None:
            changes["n_positions"] = cfg.n_positions
        elif cfg.model_config is None:
            changes["n_positions"] = max(cfg.seq, 2048)
        try:
            model_cfg = base.replace(**changes)
        except ValueError as e:
            raise TrainConfigError(f"model shape from the config keys: {e}") from None
    model_cfg = model_cfg.replace(attention=cfg.attention, scan_layers=cfg.scan_layers,
                                  attention_query_block=cfg.attention_query_block)
    if cfg.dropout is not None:
        model_cfg = model_cfg.replace(resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)
    if cfg.seq > model_cfg.n_positions:
        raise TrainConfigError(
            f"key 'seq' ({cfg.seq}) is larger than the model's n_positions ({model_cfg.n_positions}); "
            f"use seq <= {model_cfg.n_positions}"
        )
    return model_cfg

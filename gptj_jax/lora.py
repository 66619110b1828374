"""LoRA adapters for GPT-J: targets, init, the forward hook, merging, and Hugging Face PEFT files.

A LoRA target is a Dense kernel ``W [in, out]`` of our params tree, chosen by a regex over param paths
(:data:`DEFAULT_TARGETS`: ``attn/{q,k,v,out}_proj`` and ``mlp/fc_{in,out}`` of every block). Each gets
``lora_a [in, r]`` (PEFT's kaiming-uniform init, bound ``1/sqrt(in)``) and ``lora_b [r, out]`` (zeros, so a
fresh adapter changes nothing); the layer computes ``x W (+ b) + (dropout(x) lora_a lora_b) * alpha / r``,
which is PEFT's ``LoraLayer`` (``lora_B(lora_A(dropout(x))) * scaling``) in our ``[in, out]`` layout.

The adapters are a tree of their own (``{"transformer": {"h_0": {"attn": {"q_proj": {"kernel": {"lora_a",
"lora_b"}}}}}}``), never part of the base params: :func:`lora_context` adds them at the Dense calls of the
unchanged linen model (``flax.linen.intercept_methods``), so the base (float, or int8 through
:mod:`gptj_jax.quantize`, dequantized in the step) is only read, and gradients exist for the adapters only.

PEFT (``peft.PeftModel.from_pretrained(GPTJForCausalLM, DIR)``): :func:`save_peft` writes
``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.transformer.h.0.attn.q_proj.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
``[out, r]`` (torch Linear layout: our matrices transposed); :func:`read_peft` reads such a directory back,
checking every shape against the base model's config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptj_jax.config import GPTJConfig

Array = jax.Array
DEFAULT_TARGETS = r"transformer/h_\d+/(attn/(q|k|v|out)_proj|mlp/fc_(in|out))/kernel"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
RUN_FILE = "lora.json"  # in a LoRA training run's model_dir: the spec and the base it refers to
PEFT_PREFIX = "base_model.model."


class LoraError(ValueError):
    """Bad LoRA settings or adapter files: targets matching nothing, a rank too large, shapes that disagree."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which kernels get adapters (``paths``, our param paths) and how: rank ``r``, ``alpha``, ``dropout``."""

    rank: int
    alpha: float
    dropout: float = 0.0
    paths: tuple[str, ...] = ()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def kernel_shapes(config: GPTJConfig, head: str = "causal_lm") -> dict[str, tuple[int, ...]]:
    """Every 2-D kernel of the model: ``{path: (in, out)}`` (the LoRA candidates)."""
    from gptj_jax.convert import table

    return {p: s for p, s in table.expected_param_shapes(config, head).items() if p.endswith("/kernel") and len(s) == 2}


def make_spec(config: GPTJConfig, rank: int, alpha: float, dropout: float = 0.0, targets: str = DEFAULT_TARGETS,
              head: str = "causal_lm") -> LoraSpec:
    """The :class:`LoraSpec` of ``targets`` (a regex matched in full against kernel paths such as
    ``transformer/h_0/attn/q_proj/kernel``). LoraError for a bad regex, one matching no kernel, a rank < 1
    or larger than a target's smaller dimension (naming the kernel and its shape), alpha <= 0, dropout
    outside [0, 1)."""
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise LoraError(f"lora_targets {targets!r} is not a valid regex ({e})") from None
    shapes = kernel_shapes(config, head)
    paths = tuple(p for p in shapes if pattern.fullmatch(p))
    if not paths:
        examples = ", ".join(list(shapes)[:3])
        raise LoraError(f"lora_targets {targets!r} matches no kernel of the model; kernel paths look like {examples}")
    if not isinstance(rank, int) or rank < 1:
        raise LoraError(f"lora_rank must be an integer >= 1, got {rank!r}")
    for p in paths:
        if rank > min(shapes[p]):
            raise LoraError(f"lora_rank {rank} is larger than a dimension of {p} {list(shapes[p])} (in, out)")
    if not alpha > 0:
        raise LoraError(f"lora_alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise LoraError(f"lora_dropout must be in [0, 1), got {dropout!r}")
    return LoraSpec(int(rank), float(alpha), float(dropout), paths)


def adapter_shapes(config: GPTJConfig, spec: LoraSpec, dtype: Any = jnp.float32) -> Any:
    """``ShapeDtypeStruct`` tree of the adapters: ``lora_a [in, r]``, ``lora_b [r, out]`` per target."""
    from gptj_jax.convert import table

    shapes = kernel_shapes(config)
    flat = {}
    for p in spec.paths:
        n_in, n_out = shapes[p]
        flat[p + "/lora_a"] = jax.ShapeDtypeStruct((n_in, spec.rank), dtype)
        flat[p + "/lora_b"] = jax.ShapeDtypeStruct((spec.rank, n_out), dtype)
    return table.unflatten(flat)


def adapter_logical_axes(config: GPTJConfig, spec: LoraSpec) -> Any:
    """Logical axis names of the adapters, a tree like :func:`adapter_shapes` of ``PartitionSpec`` leaves:
    ``lora_a [in, r]`` takes its base kernel's input-axis name, ``lora_b [r, out]`` its output-axis name, the
    rank axis none (e.g. ``q_proj`` ``("embed", "heads")`` -> ``lora_a ("embed", None)``, ``lora_b (None,
    "heads")``). :func:`adapter_shardings` maps them to the mesh by the rules of :mod:`gptj_jax.sharding`."""
    from jax.sharding import PartitionSpec as P

    from gptj_jax.convert import table
    from gptj_jax.model import logical_axes

    base = table.flatten(logical_axes(config, "causal_lm"))
    flat = {}
    for p in spec.paths:
        n_in, n_out = tuple(base[p])
        flat[p + "/lora_a"] = P(n_in, None)
        flat[p + "/lora_b"] = P(None, n_out)
    return table.unflatten(flat)


def adapter_shardings(config: GPTJConfig, spec: LoraSpec, mesh: Any, rules: Any = None) -> Any:
    """NamedSharding tree of the adapters on ``mesh``: each split like its base kernel's matching axis
    (:func:`adapter_logical_axes` through ``rules``, default ``sharding.DEFAULT_RULES``), so on an
    ``fsdp`` x ``mp`` mesh no device holds a whole adapter the base is split for."""
    from gptj_jax import sharding as sh

    rules = sh.DEFAULT_RULES if rules is None else rules
    return jax.tree.map(lambda names: sh.logical_sharding(mesh, tuple(names), rules),
                        adapter_logical_axes(config, spec))


def init_adapters(config: GPTJConfig, spec: LoraSpec, rng: Array, dtype: Any = jnp.float32) -> Any:
    """Fresh adapters: ``lora_a`` uniform in ``±1/sqrt(in)`` (PEFT's kaiming_uniform(a=sqrt(5))), ``lora_b`` zeros."""
    from gptj_jax.convert import table

    flat = table.flatten(adapter_shapes(config, spec, dtype))
    out = {}
    for i, (p, s) in enumerate(sorted(flat.items())):
        if p.endswith("/lora_a"):
            bound = 1.0 / np.sqrt(s.shape[0])
            out[p] = jax.random.uniform(jax.random.fold_in(rng, i), s.shape, dtype, -bound, bound)
        else:
            out[p] = jnp.zeros(s.shape, dtype)
    return table.unflatten(out)


def _flat_adapters(adapters: Any) -> dict[str, tuple[Array, Array]]:
    from gptj_jax.convert import table

    flat = table.flatten(adapters)
    return {p[: -len("/lora_a")]: (flat[p], flat[p[: -len("/lora_a")] + "/lora_b"])
            for p in flat if p.endswith("/lora_a")}


def lora_context(adapters: Any, spec: LoraSpec, *, rng: Optional[Array] = None, deterministic: bool = True):
    """A context manager under which every ``module.apply`` of our linen model adds the adapters at their
    Dense layers (``y += dropout(x) @ lora_a @ lora_b * alpha / r`` in the layer's compute dtype). Dropout
    (``spec.dropout``) needs ``rng`` and ``deterministic=False``; each target gets its own key."""
    flat = _flat_adapters(adapters)
    index = {p: i for i, p in enumerate(sorted(flat))}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path) + "/kernel"
        if path not in flat:
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        a, b = flat[path]
        if spec.dropout > 0 and not deterministic:
            if rng is None:
                raise LoraError("lora_dropout > 0 needs an rng when not deterministic")
            keep = jax.random.bernoulli(jax.random.fold_in(rng, index[path]), 1.0 - spec.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(x.dtype)
        dtype = module.dtype or y.dtype
        delta = (x.astype(dtype) @ a.astype(dtype)) @ b.astype(dtype)
        return y + (delta * jnp.asarray(spec.scaling, dtype)).astype(y.dtype)

    return nn.intercept_methods(interceptor)


def check_against(adapters: Any, config: GPTJConfig, where: str) -> None:
    """LoraError naming the kernel and both shapes when an adapter does not fit ``config``'s kernel."""
    shapes = kernel_shapes(config)
    flat = _flat_adapters(adapters)
    for p in [p for p in shapes if p in flat] + [p for p in flat if p not in shapes]:  # the model's order
        a, b = flat[p]
        if p not in shapes:
            raise LoraError(f"{where}: adapter for {p}, which the base model does not have")
        n_in, n_out = shapes[p]
        if a.shape[0] != n_in or b.shape[1] != n_out or a.shape[1] != b.shape[0]:
            raise LoraError(
                f"{where}: adapter for {p} has lora_a {list(a.shape)} and lora_b {list(b.shape)} but the base kernel "
                f"is {[n_in, n_out]} (in, out): the adapter was trained on another base model"
            )


def merge(params: Any, adapters: Any, spec: LoraSpec) -> Any:
    """``params`` with ``W + lora_a @ lora_b * alpha / r`` at every target (float32 sum, cast to W's dtype).
    LoraError when a target is an int8 :class:`~gptj_jax.quantize.QuantizedArray` (dequantize it first:
    :func:`gptj_jax.quantize.dequantize`, or merge into the float base)."""
    from gptj_jax.convert import table
    from gptj_jax.quantize import is_quantized_leaf

    flat = table.flatten(params)
    for p, (a, b) in _flat_adapters(adapters).items():
        w = flat[p]
        if is_quantized_leaf(w):
            raise LoraError(
                f"cannot merge the adapter into {p}: it is int8-quantized; merge into the float base, or dequantize it "
                "first (gptj_jax.quantize.dequantize) and say so"
            )
        delta = jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32) * jnp.float32(spec.scaling)
        flat[p] = (jnp.asarray(w, jnp.float32) + delta).astype(w.dtype)
    return table.unflatten(flat)


# ---------------------------------------------------------------------------------------- PEFT files
def _peft_module(path: str) -> str:
    """``transformer/h_0/attn/q_proj/kernel`` -> ``transformer.h.0.attn.q_proj`` (the torch module name)."""
    from gptj_jax.convert import table

    name, _ = table.ours_to_hf(path)
    return name[: -len(".weight")]


def peft_config(spec: LoraSpec, base: Optional[str]) -> dict:
    """``adapter_config.json`` for PEFT: LORA, CAUSAL_LM, r, lora_alpha, lora_dropout, and ``target_modules``
    as a regex matching exactly the adapted torch modules."""
    modules = sorted({_peft_module(p) for p in spec.paths})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": spec.rank,
        "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "target_modules": "^(" + "|".join(re.escape(m) for m in modules) + ")$",
    }


def save_peft(out: str, adapters: Any, spec: LoraSpec, base: Optional[str]) -> None:
    """Write a PEFT adapter directory at ``out`` (a temporary sibling renamed into place; ``out`` must not exist)."""
    import shutil

    from safetensors.numpy import save_file

    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; choose a new output directory")
    tmp = out.rstrip("/") + ".tmp-peft"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    tensors = {}
    for p, (a, b) in _flat_adapters(adapters).items():
        m = PEFT_PREFIX + _peft_module(p)
        tensors[m + ".lora_A.weight"] = np.ascontiguousarray(np.asarray(jax.device_get(a), np.float32).T)
        tensors[m + ".lora_B.weight"] = np.ascontiguousarray(np.asarray(jax.device_get(b), np.float32).T)
    save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(peft_config(spec, base), f, indent=2)
    os.rename(tmp, out)


def read_peft(path: str, config: GPTJConfig) -> tuple[Any, LoraSpec]:
    """``(adapters, spec)`` of a PEFT LoRA directory for a GPT-J of ``config``; LoraError naming the file and
    the shapes when it is not a LoRA adapter or does not fit the model."""
    from safetensors.numpy import load_file

    from gptj_jax.convert import table

    cfg_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_file):
        raise LoraError(f"{path}: no {CONFIG_FILE}; not a PEFT adapter directory")
    with open(cfg_file, encoding="utf-8") as f:
        pc = json.load(f)
    if pc.get("peft_type") != "LORA":
        raise LoraError(f"{cfg_file}: peft_type {pc.get('peft_type')!r}, only LORA adapters are read")
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise LoraError(f"{path}: no {WEIGHTS_FILE}")
    tensors = load_file(weights)
    by_module = {_peft_module(p): p for p in kernel_shapes(config)}
    flat, paths = {}, []
    for key, x in tensors.items():
        m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m is None:
            raise LoraError(f"{weights}: unexpected tensor {key!r} (only lora_A / lora_B weights are read)")
        module, which = m.groups()
        if module not in by_module:
            raise LoraError(f"{weights}: {key} adapts {module}, which a GPT-J of this config does not have")
        p = by_module[module]
        flat[p + ("/lora_a" if which == "A" else "/lora_b")] = x.T
        if which == "A":
            paths.append(p)
    rank = int(pc["r"])
    adapters = table.unflatten(flat)
    for p in paths:
        if p + "/lora_b" not in flat:
            raise LoraError(f"{weights}: {p} has lora_A but no lora_B")
    check_against(adapters, config, weights)
    for p in paths:
        if flat[p + "/lora_a"].shape[1] != rank:
            raise LoraError(f"{weights}: {p} lora_A has rank {flat[p + '/lora_a'].shape[1]}, adapter_config.json says r={rank}")
    spec = LoraSpec(rank, float(pc.get("lora_alpha", rank)), float(pc.get("lora_dropout", 0.0)), tuple(sorted(paths)))
    return adapters, spec


def save_run_file(model_dir: str, spec: LoraSpec, base: Optional[str], targets: str, base_dtype: Optional[str],
                  base_quantize: Optional[str]) -> None:
    """``model_dir/lora.json``: the spec and the base model the run's adapters belong to."""
    from gptj_jax.train import paths as run_paths

    data = {"base": base, "rank": spec.rank, "alpha": spec.alpha, "dropout": spec.dropout, "targets": targets,
            "paths": list(spec.paths), "base_dtype": base_dtype, "base_quantize": base_quantize}
    run_paths.write_text_atomic(run_paths.join(model_dir, RUN_FILE), json.dumps(data, indent=2) + "\n")


def read_run_file(model_dir: str) -> Optional[dict]:
    """The ``lora.json`` of a run directory, or None when the run is not a LoRA run."""
    path = os.path.join(model_dir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_adapters(model_dir: str) -> tuple[Any, LoraSpec, dict, int]:
    """``(adapters, spec, lora.json, step)`` of the newest checkpoint of a LoRA training run (host arrays)."""
    import orbax.checkpoint as ocp

    info = read_run_file(model_dir)
    if info is None:
        raise LoraError(f"{model_dir}: not a LoRA training run (no {RUN_FILE})")
    steps = sorted(int(n) for n in os.listdir(model_dir) if n.isdigit() and os.path.isdir(os.path.join(model_dir, n, "params")))
    if not steps:
        raise LoraError(f"{model_dir}: a LoRA run with no finished checkpoint")
    step = steps[-1]
    restored = ocp.PyTreeCheckpointer().restore(os.path.join(model_dir, str(step), "params"))
    adapters = jax.tree.map(np.asarray, restored)
    spec = LoraSpec(int(info["rank"]), float(info["alpha"]), float(info["dropout"]), tuple(info["paths"]))
    return adapters, spec, info, step


def read_adapter(path: str, config: GPTJConfig) -> tuple[Any, LoraSpec]:
    """``(adapters, spec)`` of a PEFT adapter directory or a LoRA training run directory, checked against
    ``config`` (LoraError naming the kernel and both shapes when they do not fit)."""
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return read_peft(path, config)
    if read_run_file(path) is not None:
        adapters, spec, _, _ = run_adapters(path)
        check_against(adapters, config, path)
        return adapters, spec
    raise LoraError(f"{path}: neither a PEFT adapter directory ({CONFIG_FILE}) nor a LoRA training run ({RUN_FILE})")


def merge_placed(params: Any, adapters: Any, spec: LoraSpec) -> Any:
    """:func:`merge` on placed params, each merged kernel keeping its sharding (one kernel at a time)."""
    from gptj_jax.convert import table
    from gptj_jax.quantize import is_quantized_leaf

    flat = table.flatten(params)
    scaling = spec.scaling

    def one(w, a, b):
        delta = a.astype(jnp.float32) @ b.astype(jnp.float32) * jnp.float32(scaling)
        return (w.astype(jnp.float32) + delta).astype(w.dtype)

    for p, (a, b) in _flat_adapters(adapters).items():
        w = flat[p]
        if is_quantized_leaf(w):
            raise LoraError(f"cannot merge the adapter into {p}: it is int8-quantized; load the base unquantized")
        flat[p] = jax.jit(one, out_shardings=w.sharding)(w, jnp.asarray(a), jnp.asarray(b))
    return table.unflatten(flat)


def export(run_dir: str, out: str, to: str, *, merge_into: Optional[str] = None, dtype: Any = None,
           tokenizer: bool = True) -> str:
    """``gptj-jax convert RUN_DIR OUT --to peft`` (the adapter directory) or ``--to hf --merge-lora`` (the base
    with the adapters merged, as an HF directory). A run trained on an int8 base (QLoRA) needs ``merge_into``:
    ``float`` (the base's original weights) or ``dequantized`` (the int8 weights it trained against)."""
    import shutil

    from gptj_jax.convert.hf import save_pretrained
    from gptj_jax.convert.load import load

    adapters, spec, info, step = run_adapters(run_dir)
    if to == "peft":
        if merge_into is not None:
            raise LoraError("--merge-into is for --to hf --merge-lora; a PEFT export holds the adapters only")
        save_peft(out, adapters, spec, info.get("base"))
        return out
    if to != "hf":
        raise LoraError(f"a LoRA run exports --to peft or --to hf --merge-lora, not --to {to}")
    if merge_into not in (None, "float", "dequantized"):
        raise LoraError(f"--merge-into must be 'float' or 'dequantized', got {merge_into!r}")
    if info.get("base_quantize") and merge_into is None:
        raise LoraError(
            f"{run_dir} trained its adapters on an int8-quantized base (lora_base_quantize: {info['base_quantize']}); "
            "say how to merge: --merge-into float (into the base's original weights) or --merge-into dequantized "
            "(into the int8 weights it trained against, dequantized)"
        )
    if merge_into == "dequantized" and not info.get("base_quantize"):
        raise LoraError(f"--merge-into dequantized: {run_dir} trained on a float base (no lora_base_quantize)")
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; choose a new output directory")
    from gptj_jax.config import GPTJConfig as _Config

    config = _Config.from_pretrained(os.path.join(run_dir, "config.json"))
    base_dtype = info.get("base_dtype") or "float32"
    config, params = load(info["base"], dtype=base_dtype if merge_into == "dequantized" else "float32",
                          config=config, head="causal_lm")
    check_against(adapters, config, run_dir)
    if merge_into == "dequantized":
        from gptj_jax.quantize import dequantize, quantize_params

        params = dequantize(quantize_params(params, info["base_quantize"]), jnp.float32)
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    merged = merge(params, adapters, spec)
    if dtype is not None:
        merged = jax.tree.map(lambda x: x.astype(dtype), merged)
    tmp = out.rstrip("/") + ".tmp-merge"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    save_pretrained(tmp, config, jax.device_get(merged))
    if tokenizer:
        from gptj_jax.tokenizer import load_tokenizer

        load_tokenizer(info["base"] if os.path.isdir(str(info["base"])) else None).save_pretrained(tmp)
    os.rename(tmp, out)
    return out

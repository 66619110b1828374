"""Checkpoint conversion: Hugging Face Transformers (PyTorch and Flax msgpack), our Flax (orbax) checkpoints,
mesh-transformer-jax.

Every format has one mapping table walked in both directions (:mod:`gptj_jax.convert.table` for
HF names <-> our params pytree, :data:`gptj_jax.convert.mtj.MTJ_ROWS` for mesh-transformer-jax
leaves <-> HF names) and streams tensors one at a time.

    load.load(source, mesh=, dtype=)                 any checkpoint or hub id -> (config, params), straight
                                                    onto a mesh (``gptj_jax.load``; ``load`` is the submodule)
    from_pretrained(dir) -> (config, params)        load(dir) on one device (the older name)
    save_pretrained(dir, config, params)            our params -> HF directory
    save_flax / restore_flax                        our orbax checkpoint format
    HFFlaxReader / HFFlaxWriter                     Transformers 4.x ``flax_model.msgpack``, streaming
    convert(src, dst, to="hf" | "hf-flax" | "flax" | "mtj")   any format to any, streaming, atomic
"""

from __future__ import annotations

import importlib
from typing import Any

# Every public name loads on first use (PEP 562): importing ``gptj_jax.convert`` imports no jax.
_LAZY = {
    "CheckpointError": ("gptj_jax.convert.errors", "CheckpointError"),
    "ConvertSummary": ("gptj_jax.convert.pipeline", "ConvertSummary"),
    "HFFlaxReader": ("gptj_jax.convert.hf_flax", "HFFlaxReader"),
    "HFFlaxWriter": ("gptj_jax.convert.hf_flax", "HFFlaxWriter"),
    "architecture_of": ("gptj_jax.convert.table", "architecture_of"),
    "convert": ("gptj_jax.convert.pipeline", "convert"),
    "detect_format": ("gptj_jax.convert.pipeline", "detect_format"),
    "expected_shapes": ("gptj_jax.convert.table", "expected_shapes"),
    "from_pretrained": ("gptj_jax.convert.load", "from_pretrained"),
    "head_of": ("gptj_jax.model", "head_of"),  # the one head registry lives next to the head classes
    "hf_to_ours": ("gptj_jax.convert.table", "hf_to_ours"),
    "load_config": ("gptj_jax.convert.pipeline", "load_config"),
    "open_source": ("gptj_jax.convert.pipeline", "open_source"),
    "ours_to_hf": ("gptj_jax.convert.table", "ours_to_hf"),
    "read_param": ("gptj_jax.convert.hf", "read_param"),
    "restore_flax": ("gptj_jax.convert.flax", "restore"),
    "save_flax": ("gptj_jax.convert.flax", "save"),
    "save_pretrained": ("gptj_jax.convert.hf", "save_pretrained"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'gptj_jax.convert' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = list(_LAZY)

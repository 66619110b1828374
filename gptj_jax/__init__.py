"""gptj-jax: GPT-J-6B in JAX/Flax, exact to Hugging Face Transformers.

Public API (see README.md):
  GPTJConfig                         config.json in/out, validation
  GPTJModel, GPTJForCausalLM,
  GPTJForSequenceClassification,
  GPTJForQuestionAnswering           linen modules
  init_params, logical_axes          random params / logical axis names of a config
  init_cache                         an empty KV cache (plain pytree)
  from_pretrained, save_pretrained   HF directories (safetensors / .bin, sharded) <-> (config, params)
  load_tokenizer                     GPT-J's tokenizer
  generate                           generation (the function; its module is ``gptj_jax.generation``)
  convert, sharding, generation      submodules, imported on first access

No public name is also the name of a submodule, so ``gptj_jax.generate`` is the function whatever was
imported before (importing a submodule sets an attribute of that name on the package).
"""

from __future__ import annotations

import importlib
from typing import Any

from .cache import init_cache
from .config import ConfigError, GPTJConfig
from .model import (
    GPTJForCausalLM,
    GPTJForQuestionAnswering,
    GPTJForSequenceClassification,
    GPTJModel,
    init_params,
    logical_axes,
    model_for,
)

__version__ = "0.1.0"

# Heavier pieces load on first use so `import gptj_jax` stays quick.
_LAZY = {
    "from_pretrained": ("gptj_jax.convert", "from_pretrained"),
    "save_pretrained": ("gptj_jax.convert", "save_pretrained"),
    "generate": ("gptj_jax.generation", "generate"),
    "load_tokenizer": ("gptj_jax.tokenizer", "load_tokenizer"),
}
# Submodules named in the README's API, imported on first attribute access.
_LAZY_MODULES = ("convert", "sharding", "generation")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
    elif name in _LAZY_MODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'gptj_jax' has no attribute {name!r}")
    globals()[name] = value  # later accesses skip __getattr__
    return value


__all__ = [
    "ConfigError",
    "GPTJConfig",
    "GPTJModel",
    "GPTJForCausalLM",
    "GPTJForSequenceClassification",
    "GPTJForQuestionAnswering",
    "init_params",
    "logical_axes",
    "model_for",
    "init_cache",
    *_LAZY,
    *_LAZY_MODULES,
]

"""gptj-jax: GPT-J-6B in JAX/Flax, exact to Hugging Face Transformers.

Public API (see README.md):
  GPTJConfig                         config.json in/out, validation
  GPTJModel, GPTJForCausalLM,
  GPTJForSequenceClassification,
  GPTJForQuestionAnswering           linen modules
  init_params, logical_axes          random params / logical axis names of a config
  init_cache                         an empty KV cache (plain pytree)
  load                               any checkpoint (hub id, HF, HF Flax, ours, run dir, mtj) -> (config,
                                     params), placed straight onto a device mesh
  from_pretrained, save_pretrained   load on one device (the older name) / params -> an HF directory
  load_tokenizer                     the checkpoint's tokenizer, else GPT-J's
  generate                           generation (the function; its module is ``gptj_jax.generation``)
  GenerationConfig                   every generation knob, validated; from_pretrained(dir) reads
                                     generation_config.json
  score, score_rolling, ScoreResult  log-likelihoods of continuations / whole texts (``gptj_jax.scoring``)
  convert, sharding, generation,
  scoring                            submodules, imported on first access

No public name is also the name of a submodule, so ``gptj_jax.generate`` is the function whatever was
imported before (importing a submodule sets an attribute of that name on the package).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Every public name loads on first use (PEP 562), so `import gptj_jax` (and the command line's
# `gptj-jax --help`) imports no jax until a name that needs it is touched.
_LAZY = {
    "ConfigError": ("gptj_jax.config", "ConfigError"),
    "GPTJConfig": ("gptj_jax.config", "GPTJConfig"),
    "GPTJModel": ("gptj_jax.model", "GPTJModel"),
    "GPTJForCausalLM": ("gptj_jax.model", "GPTJForCausalLM"),
    "GPTJForSequenceClassification": ("gptj_jax.model", "GPTJForSequenceClassification"),
    "GPTJForQuestionAnswering": ("gptj_jax.model", "GPTJForQuestionAnswering"),
    "init_params": ("gptj_jax.model", "init_params"),
    "logical_axes": ("gptj_jax.model", "logical_axes"),
    "model_for": ("gptj_jax.model", "model_for"),
    "init_cache": ("gptj_jax.cache", "init_cache"),
    "load": ("gptj_jax.convert.load", "load"),
    "from_pretrained": ("gptj_jax.convert", "from_pretrained"),
    "save_pretrained": ("gptj_jax.convert", "save_pretrained"),
    "generate": ("gptj_jax.generation", "generate"),
    "GenerationConfig": ("gptj_jax.generation_config", "GenerationConfig"),
    "score": ("gptj_jax.scoring", "score"),
    "score_rolling": ("gptj_jax.scoring", "score_rolling"),
    "ScoreResult": ("gptj_jax.scoring", "ScoreResult"),
    "load_tokenizer": ("gptj_jax.tokenizer", "load_tokenizer"),
}
# Submodules named in the README's API, imported on first attribute access.
_LAZY_MODULES = ("convert", "sharding", "generation", "scoring")


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


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [*_LAZY, *_LAZY_MODULES]

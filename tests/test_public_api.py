"""The public API: every name in README.md's "Public API" table (and ``gptj_jax.__all__``) is a stable
attribute of the documented kind, whatever was imported before (no public name is also a submodule name,
so importing a submodule cannot replace it), and ``gptj_jax.generate(...)`` works on every call.
"""

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys

import jax
import numpy as np

import gptj_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The documented kind of every public name (README's table and __all__).
KINDS = {
    "ConfigError": "class",
    "GPTJConfig": "class",
    "GPTJModel": "class",
    "GPTJForCausalLM": "class",
    "GPTJForSequenceClassification": "class",
    "GPTJForQuestionAnswering": "class",
    "init_params": "function",
    "logical_axes": "function",
    "model_for": "function",
    "init_cache": "function",
    "load": "function",
    "from_pretrained": "function",
    "save_pretrained": "function",
    "load_tokenizer": "function",
    "generate": "function",
    "beam_search": "function",
    "BeamOutput": "class",
    "GenerationConfig": "class",
    "score": "function",
    "score_rolling": "function",
    "ScoreResult": "class",
    "Engine": "class",
    "Scheduler": "class",
    "LLM": "class",
    "RequestOutput": "class",
    "QueueFullError": "class",
    "UnknownRequestError": "class",
    "engine": "module",
    "convert": "module",
    "convert.convert": "function",
    "sharding": "module",
    "generation": "module",
    "scoring": "module",
}


def _readme_names() -> list:
    """Names in the first column of README.md's "Public API" table, relative to ``gptj_jax``."""
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text.split("## Public API", 1)[1].split("\n## ", 1)[0]
    names = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        for code in re.findall(r"`([^`]+)`", first):
            name = code.split("(", 1)[0].strip()
            names.append(name[len("gptj_jax."):] if name.startswith("gptj_jax.") else name)
    return names


def _kind(obj) -> str:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if inspect.isfunction(obj):
        return "function"
    return type(obj).__name__


def _resolve(name: str):
    obj = gptj_jax
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _tiny():
    config = gptj_jax.GPTJConfig(vocab_size=1000, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
    return config, gptj_jax.init_params(config, jax.random.PRNGKey(0))


def test_readme_table_and_all_are_covered():
    names = _readme_names()
    assert "generate" in names and "sharding" in names and "convert.convert" in names, names
    assert set(names) <= set(KINDS), set(names) - set(KINDS)
    assert set(gptj_jax.__all__) <= set(KINDS), set(gptj_jax.__all__) - set(KINDS)


def test_public_names_stable_after_importing_every_submodule():
    """Import every submodule of the package first, then every public name (twice) has its documented kind."""
    imported = [
        importlib.import_module(info.name).__name__
        for info in pkgutil.walk_packages(gptj_jax.__path__, "gptj_jax.")
    ]
    assert "gptj_jax.generation" in imported and "gptj_jax.cli.generate" in imported
    for name in sorted(set(_readme_names()) | set(gptj_jax.__all__)):
        for _ in range(2):
            assert _kind(_resolve(name)) == KINDS[name], (name, _resolve(name))
    assert gptj_jax.generate is gptj_jax.generation.generate


def test_generate_through_the_package_twice():
    config, params = _tiny()
    first = gptj_jax.generate(config, params, [[1, 2, 3], [4, 5]], max_new_tokens=6)
    second = gptj_jax.generate(config, params, [[1, 2, 3], [4, 5]], max_new_tokens=6)
    np.testing.assert_array_equal(first.sequences, second.sequences)
    assert first.sequences.shape == (2, 3 + 6)


SUBPROCESS = """
import sys, inspect
sys.path.insert(0, {tests!r})
import {first}
import gptj_jax, jax
from test_public_api import KINDS, _kind, _readme_names, _resolve, _tiny
for name in sorted(set(_readme_names()) | set(gptj_jax.__all__)):
    for _ in range(2):
        assert _kind(_resolve(name)) == KINDS[name], (name, _resolve(name))
config, params = _tiny()
a = gptj_jax.generate(config, params, [[1, 2, 3]], max_new_tokens=4)
b = gptj_jax.generate(config, params, [[1, 2, 3]], max_new_tokens=4)
assert (a.sequences == b.sequences).all()
print("ok", type(gptj_jax.generate).__name__)
"""


def test_fresh_process_submodule_imported_first():
    """In a new process whose first import is a submodule, the public names are still the documented kinds."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for first in ("gptj_jax.generation", "gptj_jax.cli.generate", "gptj_jax.cli"):
        script = SUBPROCESS.format(tests=os.path.join(REPO, "tests"), first=first)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, (first, proc.stderr[-3000:])
        assert proc.stdout.strip() == "ok function", (first, proc.stdout)

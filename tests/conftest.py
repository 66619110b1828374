# Tests never reach the Hugging Face hub: everything they load is built or saved locally.
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests run on the CPU: with libtpu installed (the tpu-aot extra, for `plan --compile-for`), JAX would
# otherwise try to claim a TPU and take libtpu's machine-wide lock file. Set before jax is imported;
# subprocesses inherit it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

"""Shared fixtures. The helpers live in ``helpers.py`` (a plain module) and are re-exported here, so
test files keep ``from conftest import hf_model, ...``."""

import pytest  # noqa: E402
from helpers import (  # noqa: E402, F401  (re-exported for the test files)
    HF_CLASSES,
    TINY,
    generate_cli,
    hf_config,
    hf_model,
    left_padded_batch,
    padded_lm_batch,
    params_of,
)

from gptj_jax.config import GPTJConfig  # noqa: E402


@pytest.fixture
def tiny_config() -> GPTJConfig:
    return TINY

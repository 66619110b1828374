"""Checkpoint conversion: Hugging Face Transformers, our Flax (orbax) checkpoints, mesh-transformer-jax.

Every format has one mapping table walked in both directions (:mod:`gptj_jax.convert.table` for
HF names <-> our params pytree) and streams tensors one at a time.
"""

from gptj_jax.convert.errors import CheckpointError
from gptj_jax.convert.hf import from_pretrained, read_param, save_pretrained
from gptj_jax.convert.table import architecture_of, expected_shapes, head_of, hf_to_ours, ours_to_hf

__all__ = [
    "CheckpointError",
    "architecture_of",
    "expected_shapes",
    "from_pretrained",
    "head_of",
    "hf_to_ours",
    "ours_to_hf",
    "read_param",
    "save_pretrained",
]

"""Checkpoint conversion: Hugging Face Transformers, our Flax (orbax) checkpoints, mesh-transformer-jax.

Every format has one mapping table walked in both directions (:mod:`gptj_jax.convert.table` for
HF names <-> our params pytree, :data:`gptj_jax.convert.mtj.MTJ_ROWS` for mesh-transformer-jax
leaves <-> HF names) and streams tensors one at a time.

    from_pretrained(dir) -> (config, params)        HF directory -> our params
    save_pretrained(dir, config, params)            our params -> HF directory
    save_flax / restore_flax                        our orbax checkpoint format
    convert(src, dst, to="hf" | "flax" | "mtj")     any format to any, streaming, atomic
"""

from gptj_jax.convert.errors import CheckpointError
from gptj_jax.convert.flax import restore as restore_flax
from gptj_jax.convert.flax import save as save_flax
from gptj_jax.convert.hf import from_pretrained, read_param, save_pretrained
from gptj_jax.convert.pipeline import ConvertSummary, convert, detect_format, load_config, open_source
from gptj_jax.convert.table import architecture_of, expected_shapes, head_of, hf_to_ours, ours_to_hf

__all__ = [
    "CheckpointError",
    "ConvertSummary",
    "architecture_of",
    "convert",
    "detect_format",
    "expected_shapes",
    "from_pretrained",
    "head_of",
    "hf_to_ours",
    "load_config",
    "open_source",
    "ours_to_hf",
    "read_param",
    "restore_flax",
    "save_flax",
    "save_pretrained",
]

"""Helpers shared by test_convert.py and test_mtj.py: a tiny config that splits over 8 shards,
bit-exact comparison of HF directories, and logits of a directory loaded by transformers."""

from __future__ import annotations

import numpy as np
import torch
from helpers import TINY, left_padded_batch

from gptj_jax.convert import table
from gptj_jax.convert.io import CheckpointReader

# vocab and heads that split over 8 shards, so the same model serves the mtj tests.
CONFIG = TINY.replace(vocab_size=128, n_head=8, pad_token_id=0)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUIET = dict(verbose=False, tokenizer=False)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
        np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)
    )


def assert_dirs_identical(src: str, dst: str) -> None:
    """Every tensor of two HF directories is the same, bit for bit, dtype included."""
    with CheckpointReader(src) as a, CheckpointReader(dst) as b:
        names = [n for n in a.names if not table.is_ignored_hf(n)]
        assert sorted(names) == sorted(b.names)
        for name in names:
            assert same_bits(a.read(name), b.read(name)), name


def hf_logits(path: str, cls: str = "GPTJForCausalLM"):
    """Logits of a checkpoint directory loaded by transformers (eager attention, no missing keys)."""
    import transformers

    model, info = getattr(transformers, cls).from_pretrained(path, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys"), info
    ids, mask, pos = BATCH
    with torch.no_grad():
        out = model.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    return out.start_logits if cls == "GPTJForQuestionAnswering" else out.logits


def _batch():
    ids, mask, pos = left_padded_batch(CONFIG.vocab_size, [6, 3], seed=5)
    return np.where(mask == 1, ids % (CONFIG.vocab_size - 1) + 1, 0), mask, pos


BATCH = _batch()

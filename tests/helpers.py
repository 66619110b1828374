"""Test helpers (a plain module: ``conftest.py`` re-exports them for the test files, and helper modules
such as ``convert_helpers.py`` import them from here): tiny random GPT-J models built with transformers,
and our params for them.

``hf_model(config, head)`` builds a transformers model with random weights (eager attention so
attentions can be compared); ``params_of(hf)`` converts its state dict to our pytree through the
same mapping table the converters use (``gptj_jax.convert.table``).
"""

import os
import subprocess
import sys

import numpy as np

import gptj_jax
from gptj_jax.config import GPTJConfig
from gptj_jax.model import HEADS

# The transformers class of each head, from the package's head registry.
HF_CLASSES = {name: head.architecture for name, head in HEADS.items()}

TINY = GPTJConfig(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)


def hf_config(config: GPTJConfig):
    import transformers

    d = config.to_hf_dict()
    d.pop("model_type")
    hf = transformers.GPTJConfig(**d)
    hf._attn_implementation = "eager"
    return hf


def hf_model(config: GPTJConfig, head: str = "causal_lm", seed: int = 0, scale: float = 1.0):
    """A transformers GPT-J of class ``HF_CLASSES[head]`` with random weights (eval mode, float32).

    ``scale`` multiplies every weight matrix after init: > 1 makes logits spread out so greedy argmax
    decisions are far from ties.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[head])(hf_config(config)).eval()
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.mul_(scale)
    # Random LayerNorm and bias values, so the tests see them (HF inits them to ones and zeros).
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("ln_1.weight") or name.endswith("ln_f.weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def params_of(model):
    """Our params for a transformers GPT-J model (float32 numpy leaves), through the converter's table."""
    from gptj_jax.convert.table import apply_transform, hf_to_ours, is_ignored_hf, unflatten

    flat = {}
    for name, tensor in model.state_dict().items():
        if is_ignored_hf(name):
            continue
        path, transform = hf_to_ours(name)
        flat[path] = np.ascontiguousarray(apply_transform(tensor.detach().cpu().numpy(), transform))
    return unflatten(flat)


def left_padded_batch(vocab: int, lengths: list, seed: int = 0):
    """input_ids [B, T] with row b left-padded to T = max(lengths), the mask, and cumsum positions."""
    rng = np.random.RandomState(seed)
    T = max(lengths)
    ids = rng.randint(0, vocab, (len(lengths), T)).astype(np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
        ids[b, : T - n] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return ids, mask, pos


def padded_lm_batch(vocab: int, batch: int, length: int, seed: int):
    """(ids, mask, labels) ``[batch, length]`` int32 with rows left-padded by 0, 3, 0, 5, 1, 0, 7, 2, ...;
    labels are the ids with pads set to -100."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for row, pad in zip(range(batch), [0, 3, 0, 5, 1, 0, 7, 2] * (batch // 8 + 1)):
        mask[row, :pad] = 0
    labels = np.where(mask == 1, ids, -100).astype(np.int32)
    return ids, mask, labels


REPO = os.path.dirname(os.path.dirname(os.path.abspath(gptj_jax.__file__)))  # the package under test


def generate_cli(argv: list, env: dict = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``gptj-jax generate ARGV`` in a fresh interpreter (one CPU device unless ``env`` sets XLA_FLAGS)."""
    full = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    full.pop("XLA_FLAGS", None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "gptj_jax.cli", "generate", *argv], capture_output=True, text=True,
                          env=full, cwd=REPO, timeout=timeout)

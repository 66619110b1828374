"""The one dtype-name table: the names a user may write (``--dtype``, ``dtype:`` in a config) and what they mean.

Imports only NumPy and ``ml_dtypes`` (no jax), so the CLI can use it to build its flags cheaply.
``jnp.dtype(np.dtype(ml_dtypes.bfloat16))`` is ``jnp.bfloat16``, so the same table serves NumPy and jax.
"""

from __future__ import annotations

from typing import Any, Optional

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
DTYPE_NAMES: tuple[str, ...] = tuple(DTYPES)


def as_dtype(dtype: Any) -> Optional[np.dtype]:
    """``"bfloat16"`` / ``jnp.bfloat16`` / ``np.float16`` / None -> a NumPy dtype (or None)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; expected one of {list(DTYPES)}")
        return DTYPES[dtype]
    return np.dtype(dtype)


def dtype_name(dtype: Any) -> str:
    """NumPy dtype -> the name HF writes as ``torch_dtype`` (``float32``, ``bfloat16``, ``float16``)."""
    return np.dtype(dtype).name

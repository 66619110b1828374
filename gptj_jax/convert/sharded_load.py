"""Load a checkpoint straight into sharded arrays: each process reads only the slices its devices hold.

``load_hf_sharded(dir, mesh)`` walks the HF mapping table (:mod:`gptj_jax.convert.table`, through
:func:`gptj_jax.convert.hf.read_param`) and builds every parameter with
``jax.make_array_from_callback``: the callback runs once per *addressable* device and reads that
device's block from the safetensors file (the ``[:, cols]`` block of a column-parallel kernel is a
row range of the HF ``[out, in]`` tensor, read without touching the rest). With ``mp=8`` a host
holds at most 1/8 of any split weight at a time, so a host with less RAM than the model can load
it, and on a multi-host mesh each process reads only its own devices' slices. Blocks that several
local devices share (replicated LayerNorm, ``dp`` copies) are read once per tensor.

``load_flax_sharded(ckpt, mesh)`` does the same for our orbax checkpoints (``convert/flax.py``
layout): orbax restores into the target shardings and reads only the chunks each process needs.

``.bin`` (pickle) checkpoints cannot be read by slice; they are loaded tensor by tensor, each whole
tensor being held once on the host while its shards are cut.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any, Optional, Union

import jax
import numpy as np

from gptj_jax import sharding as sh
from gptj_jax.config import GPTJConfig
from gptj_jax.convert import table
from gptj_jax.convert.errors import CheckpointError
from gptj_jax.convert.hf import check_tensors, read_param
from gptj_jax.convert.io import CheckpointReader, as_dtype

PathLike = Union[str, os.PathLike]


def _key(index: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """A hashable ``((start, stop), ...)`` for a tuple of slices over ``shape``."""
    return tuple((s.indices(n)[0], s.indices(n)[1]) for s, n in zip(index, shape))


def load_hf_sharded(
    path: PathLike,
    mesh: jax.sharding.Mesh,
    *,
    config: Optional[GPTJConfig] = None,
    dtype: Any = None,
    rules: sh.Rules = sh.DEFAULT_RULES,
    stats: Optional[dict[str, Any]] = None,
) -> tuple[GPTJConfig, dict[str, Any]]:
    """Read an HF GPT-J directory into params sharded on ``mesh`` by ``rules``; returns ``(config, params)``.

    ``dtype`` casts every leaf (None keeps the file's dtype); ``config`` overrides ``config.json``.
    The head follows the tensors present, as in ``convert.hf.from_pretrained``. When ``stats`` is a
    dict it receives ``reads`` (slice reads done by this process), ``bytes_read``, ``max_read_bytes``
    (the largest single slice, the host-memory high-water mark of the load), ``largest_tensor_bytes``
    and ``seconds``.
    """
    t0 = time.perf_counter()
    path = os.fspath(path)
    if config is None:
        config = GPTJConfig.from_pretrained(path)
    np_dtype = as_dtype(dtype)
    reads, bytes_read, max_read, largest = 0, 0, 0, 0
    with CheckpointReader(path) as reader:
        names = [n for n in reader.names if not table.is_ignored_hf(n)]
        try:
            head = table.head_of_names(names)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        check_tensors(reader, config, head, names)
        shardings = table.flatten(sh.param_shardings(config, mesh, head, rules))
        flat: dict[str, jax.Array] = {}
        for our_path, shape in table.expected_param_shapes(config, head).items():
            name, _ = table.ours_to_hf(our_path)
            largest = max(largest, reader.nbytes(name))
            sharding = shardings[our_path]
            # How many local devices take each distinct block: a shared block is read once and
            # dropped after its last taker, so at most one block per tensor is held at a time.
            takers = Counter(_key(i, shape) for i in sharding.addressable_devices_indices_map(shape).values())
            blocks: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

            def block(index: tuple, our_path: str = our_path, shape: tuple[int, ...] = shape,
                      blocks: dict = blocks, takers: Counter = takers) -> np.ndarray:
                nonlocal reads, bytes_read, max_read
                key = _key(index, shape)
                array = blocks.get(key)
                if array is None:
                    array = np.ascontiguousarray(read_param(reader, our_path, index, np_dtype))
                    reads += 1
                    bytes_read += array.nbytes
                    max_read = max(max_read, array.nbytes)
                takers[key] -= 1
                if takers[key] > 0:
                    blocks[key] = array
                else:
                    blocks.pop(key, None)
                return array

            flat[our_path] = jax.make_array_from_callback(shape, sharding, block)
    if stats is not None:
        stats.update(
            reads=reads, bytes_read=bytes_read, max_read_bytes=max_read,
            largest_tensor_bytes=largest, seconds=time.perf_counter() - t0,
        )
    return config, table.unflatten(flat)


def load_flax_sharded(
    path: PathLike,
    mesh: jax.sharding.Mesh,
    *,
    config: Optional[GPTJConfig] = None,
    dtype: Any = None,
    rules: sh.Rules = sh.DEFAULT_RULES,
) -> tuple[GPTJConfig, dict[str, Any]]:
    """Restore our orbax checkpoint (or a run dir's newest step) directly into shardings on ``mesh``.

    Orbax reads only the chunks each process's devices hold. ``dtype`` casts on restore (None keeps
    the stored dtypes).
    """
    import orbax.checkpoint as ocp

    from gptj_jax.convert.flax import FlaxReader

    reader = FlaxReader(path, config)
    config, head = reader.config, reader.head
    shardings = table.flatten(sh.param_shardings(config, mesh, head, rules))
    np_dtype = as_dtype(dtype)
    target = table.unflatten({
        p: jax.ShapeDtypeStruct(reader.shape(p), np_dtype or reader.dtype(p), sharding=shardings[p])
        for p in reader.paths
    })
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(reader.params_dir, target)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CheckpointError(f"{reader.params_dir}: cannot restore onto mesh ({type(e).__name__}: {e})") from None
    return config, params

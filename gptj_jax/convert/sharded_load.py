"""Load a checkpoint straight into sharded arrays: each process reads only the slices its devices hold.

``load_hf_sharded(dir, mesh)`` walks the HF mapping table (:mod:`gptj_jax.convert.table`, through
:func:`gptj_jax.convert.hf.read_param`) and builds every parameter from per-device blocks: for each
*addressable* device it reads that device's block from the safetensors file (the ``[:, cols]`` block
of a column-parallel kernel is a row range of the HF ``[out, in]`` tensor, read without touching the
rest), copies it to the device and drops it before reading the next. With ``mp=8`` the host holds
at most 1/8 of any split weight at a time, so a host with less RAM than the model can load it, and
on a multi-host mesh each process reads only its own devices' slices. A block that several local
devices share (replicated LayerNorm, ``dp`` copies) is read once and copied to each.

``load_flax_sharded(ckpt, mesh)`` does the same for our orbax checkpoints (``convert/flax.py``
layout): orbax restores into the target shardings and reads only the chunks each process needs.

``.bin`` (pickle) checkpoints cannot be read by slice: ``CheckpointReader.read_slice`` reads the
whole tensor and cuts it, so each block read holds one whole tensor for a moment.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional, Union

import jax
import numpy as np

from gptj_jax import sharding as sh
from gptj_jax.config import GPTJConfig
from gptj_jax.convert import table
from gptj_jax.convert.errors import CheckpointError
from gptj_jax.convert.hf import checked_tensors, read_param
from gptj_jax.convert.io import CheckpointReader
from gptj_jax.dtypes import as_dtype

PathLike = Union[str, os.PathLike]


def _key(index: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """A hashable ``((start, stop), ...)`` for a tuple of slices over ``shape``."""
    return tuple((s.indices(n)[0], s.indices(n)[1]) for s, n in zip(index, shape))


def _assemble(shape: tuple[int, ...], sharding: jax.sharding.Sharding, read: Callable[[tuple], np.ndarray]) -> jax.Array:
    """A global array from per-device blocks, holding one host block at a time.

    (``jax.make_array_from_callback`` would first collect every local device's block on the host,
    i.e. the whole tensor when the process has all of its shards.) A block several local devices
    share is read once and copied to each of them.
    """
    takers: dict[tuple, list] = {}
    first_index: dict[tuple, tuple] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = _key(index, shape)
        takers.setdefault(key, []).append(device)
        first_index.setdefault(key, index)
    arrays = []
    for key, devices in takers.items():
        block = read(first_index[key])
        placed = [jax.device_put(block, d) for d in devices]
        jax.block_until_ready(placed)
        arrays.extend(placed)
        del block
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


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
        head, names = checked_tensors(reader, config, path)
        shardings = table.flatten(sh.param_shardings(config, mesh, head, rules))
        flat: dict[str, jax.Array] = {}

        def read(our_path: str, index: tuple) -> np.ndarray:
            nonlocal reads, bytes_read, max_read
            array = np.ascontiguousarray(read_param(reader, our_path, index, np_dtype))
            reads += 1
            bytes_read += array.nbytes
            max_read = max(max_read, array.nbytes)
            return array

        for our_path, shape in table.expected_param_shapes(config, head).items():
            name, _ = table.ours_to_hf(our_path)
            largest = max(largest, reader.nbytes(name))
            sharding = shardings[our_path]
            flat[our_path] = _assemble(shape, sharding, lambda index, p=our_path: read(p, index))
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

"""The one loader: any GPT-J checkpoint -> ``(config, params)`` placed straight onto a device mesh.

    config, params = gptj_jax.load("EleutherAI/gpt-j-6B", mesh=mesh, dtype="bfloat16")

Sources (:func:`resolve`; an existing local path first, then a hub id):

====================================== ==========================================================
source                                 detected by
====================================== ==========================================================
Hugging Face directory                 ``model.safetensors`` / ``pytorch_model.bin``, single or a
                                       sharded index of either (:mod:`gptj_jax.convert.io`)
HF Flax directory                      ``flax_model.msgpack`` or its index (:mod:`~gptj_jax.convert.hf_flax`)
our orbax checkpoint / training run    ``params/`` / numbered steps, the newest taken (:mod:`~gptj_jax.convert.flax`)
mesh-transformer-jax checkpoint        ``meta.json`` / ``step_<N>/`` / ``shard_0/``; needs ``config=``
hub id ``owner/name``                  ``huggingface_hub.snapshot_download`` of config, tokenizer files and
                                       the best weights (safetensors > ``.bin`` > ``flax_model.msgpack``);
                                       ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` honoured
====================================== ==========================================================

Order of work: resolve the source, read the config, open the checkpoint (headers, zip directory or
msgpack index pass: a truncated file fails here), check every tensor name and shape against the
config and the head, compute the shardings (a mesh that does not divide the model fails here).
Only then is anything placed, so every error leaves no device array behind; and should a read fail
half-way (a file changed under us), every array placed so far is deleted before the error propagates.

Placement (:class:`_Placer`): for each parameter, each distinct block among this process's devices
(``sharding.addressable_devices_indices_map``) is read from disk on its own (rows of the stored
tensor, or a column range of them read in chunks), copied to every device that holds it (a block
several devices share is read once), then cast to ``dtype`` and transposed to our ``[in, out]``
layout *on the device*; nothing is gathered on one device, and a float32 checkpoint becomes bfloat16
params with no float32 copy of the model anywhere. Blocks are read, one ahead in a thread, into one
reused host buffer as large as the largest block (a ring: a region is reused once the devices are done
with the blocks in it), so the host holds one largest block beyond the params. A block of whole rows
at a 64-byte-aligned file offset (every ``.bin`` tensor, whose storages torch aligns) is not copied at
all: a memory map of just that block goes to the device (on CPU, ``device_put`` uses it in place) and
is unmapped when the block is placed, so file-backed pages do not pile up either. Orbax checkpoints
are restored by orbax straight into the target shardings, a group of leaves of about the largest
leaf's size at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import numpy as np

from gptj_jax import sharding as sh
from gptj_jax.config import GPTJConfig
from gptj_jax.convert import table
from gptj_jax.convert.errors import CheckpointError
from gptj_jax.dtypes import as_dtype
from gptj_jax.model import HEADS

PathLike = Union[str, os.PathLike]
Params = dict[str, Any]

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
# Small files fetched from the hub beside the weights.
HUB_META_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
    "merges.txt", "special_tokens_map.json", "added_tokens.json",
)
# Weight layouts on the hub, best first: (single file, index file, shard glob).
HUB_WEIGHTS = (
    ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"),
    ("flax_model.msgpack", "flax_model.msgpack.index.json", "flax_model-*-of-*.msgpack"),
)


# ====================================================================================== sources
@dataclasses.dataclass(frozen=True)
class Source:
    """A located checkpoint: ``spec`` as given, ``path`` its local directory (a hub id's snapshot),
    ``repo_id`` / ``revision`` for a hub id; :attr:`format` (``hf``, ``hf-flax``, ``flax``, ``mtj``) is
    detected on first use."""

    spec: str
    path: str
    repo_id: Optional[str] = None
    revision: Optional[str] = None

    @functools.cached_property
    def format(self) -> str:
        from gptj_jax.convert.pipeline import detect_format

        try:
            return detect_format(self.path)
        except CheckpointError:
            if not os.path.isfile(os.path.join(self.path, "config.json")):
                raise
        # a config with nothing to load beside it
        raise CheckpointError(
            f"{self.path}: no weights found; expected model.safetensors, pytorch_model.bin or flax_model.msgpack "
            "(or the sharded index of one), or a gptj-jax params/ item or run steps"
        )


def is_hub_id(spec: str) -> bool:
    """True for ``owner/name`` that is not an existing local path."""
    return bool(HUB_ID.fullmatch(spec)) and not os.path.exists(spec)


def resolve(source: Union[PathLike, Source], revision: Optional[str] = None) -> Source:
    """Where ``source`` is: an existing local path, else a hub id (downloaded or found in the cache,
    :func:`hub_snapshot`), else FileNotFoundError naming it. The format is detected later (:attr:`Source.format`)."""
    if isinstance(source, Source):
        return source
    spec = os.fspath(source)
    if os.path.exists(spec):
        if revision is not None:
            raise ValueError(f"revision={revision!r} is for hub ids; {spec} is a local path")
        return Source(spec, spec)
    if not HUB_ID.fullmatch(spec):
        raise FileNotFoundError(f"{spec}: no such directory, and not a Hugging Face hub id (owner/name) either")
    return Source(spec, hub_snapshot(spec, revision), repo_id=spec, revision=revision)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, or as huggingface_hub read it at import."""
    from huggingface_hub import constants

    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> str:
    """The hub cache directory as huggingface_hub computes it, from the environment as it is now:
    ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expanduser(os.path.expandvars(cache))


def hub_weight_patterns(files: Any) -> Optional[list[str]]:
    """``allow_patterns`` for the best weights among a repo's ``files`` (None when there are none)."""
    files = set(files)
    for single, index, shards in HUB_WEIGHTS:
        if single in files:
            return [single]
        if index in files:
            return [index, shards]
    return None


def _not_cached(repo_id: str, revision: Optional[str], cache: str, why: str) -> CheckpointError:
    repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    if not os.path.isdir(repo_dir):
        return CheckpointError(f"{repo_id}: not in the Hugging Face cache {cache}, {why}")
    refs_dir = os.path.join(repo_dir, "refs")
    refs = sorted(os.listdir(refs_dir)) if os.path.isdir(refs_dir) else []
    return CheckpointError(
        f"{repo_id}: revision {revision or 'main'!r} is not in the Hugging Face cache {cache} (cached revisions: "
        f"{', '.join(refs) or 'none'}), {why}"
    )


def hub_snapshot(repo_id: str, revision: Optional[str] = None) -> str:
    """The local snapshot directory of hub model ``repo_id`` at ``revision`` (None: ``main``).

    Online, lists the repo's files and downloads (``snapshot_download(allow_patterns=...)``) only
    config, tokenizer files and the best weights (:data:`HUB_WEIGHTS`). Offline (``HF_HUB_OFFLINE``)
    or with the hub unreachable, returns the cached snapshot as it is. Raises CheckpointError naming
    the repo (and revision) when it does not exist, the revision does not, or it is not cached offline.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    cache = hub_cache()
    if hub_offline():
        why = "and HF_HUB_OFFLINE is set, so nothing is downloaded"
    else:
        try:
            files = HfApi().list_repo_files(repo_id, revision=revision)
        except RepositoryNotFoundError:
            raise CheckpointError(
                f"{repo_id}: no such model on the Hugging Face hub (or it is private or gated: log in with "
                "`hf auth login`)"
            ) from None
        except RevisionNotFoundError:
            raise CheckpointError(f"{repo_id}: revision {revision!r} does not exist on the Hugging Face hub") from None
        except Exception as e:  # connection refused, timeout, 5xx: fall back to the local cache below
            why = f"and the hub cannot be reached ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        else:
            weights = hub_weight_patterns(files)
            if weights is None:
                raise CheckpointError(
                    f"{repo_id} (revision {revision or 'main'!r}): no weights on the hub we can read; expected "
                    f"model.safetensors, pytorch_model.bin or flax_model.msgpack (or a sharded index of one), found "
                    f"{sorted(files)[:12]}"
                )
            return snapshot_download(
                repo_id, revision=revision, cache_dir=cache, allow_patterns=list(HUB_META_FILES) + weights
            )
    try:
        return snapshot_download(
            repo_id, revision=revision, cache_dir=cache, local_files_only=True, allow_patterns=["config.json"]
        )
    except LocalEntryNotFoundError:
        raise _not_cached(repo_id, revision, cache, why) from None


# ====================================================================================== configs
def source_config(source: Source, config: Union[None, PathLike, GPTJConfig] = None) -> GPTJConfig:
    """The model config of ``source``: ``config`` (a GPTJConfig, or a path to an HF ``config.json`` or an
    mtj training JSON) when given, else the checkpoint's own ``config.json`` (read before the weights are
    even looked at). mesh-transformer-jax checkpoints carry none: they need ``config``."""
    from gptj_jax.convert import flax as flax_ckpt
    from gptj_jax.convert.pipeline import load_config

    if isinstance(config, GPTJConfig):
        return config
    if config is not None:
        return load_config(config)[0]
    if os.path.isfile(os.path.join(source.path, "config.json")):
        return GPTJConfig.from_pretrained(source.path)
    if source.format == "mtj":
        raise CheckpointError(
            f"{source.spec}: a mesh-transformer-jax checkpoint carries no config; pass config= (--config) with its "
            "training config JSON (layers, d_model, n_heads, n_vocab, pe_rotary_dims, seq) or an HF config.json"
        )
    if source.format == "flax":
        params_dir, config_file = flax_ckpt.resolve(source.path)
        if config_file is None:
            raise CheckpointError(f"{source.spec}: no config.json next to {params_dir}; pass config=")
        return GPTJConfig.from_pretrained(config_file)
    return GPTJConfig.from_pretrained(source.path)


# ====================================================================================== readers
class _Tensors:
    """One checkpoint's parameters by our path, for the placement loop.

    ``paths`` maps each of our paths (of the requested head) to the path it is stored under;
    :meth:`stored` gives the stored shape, dtype and whether the stored layout is ours transposed;
    :meth:`read` one block of it (stored layout, stored dtype), into ``out`` (a reused staging buffer)
    where the format allows, else as a fresh NumPy array.
    """

    config: GPTJConfig
    head: str
    where: str
    paths: dict[str, str]

    def stored(self, path: str) -> tuple[tuple[int, ...], np.dtype, bool]:
        raise NotImplementedError

    def read(self, path: str, index: Optional[tuple], out: Optional[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def location(self, path: str) -> Any:
        """Where the stored tensor's C-order bytes lie (``io.Location``), or None."""
        return None

    def close(self) -> None:
        raise NotImplementedError


def _select_head(found: str, head: Optional[str], where: str) -> tuple[str, str]:
    """``(head, prefix)``: the head to load and the prefix its paths carry in a ``found``-head checkpoint.

    ``head=None`` takes the checkpoint's head; ``"base"`` can be taken out of any other head (the
    ``transformer/`` sub-tree, as transformers' ``GPTJModel.from_pretrained`` does); any other
    mismatch is an error naming both."""
    if head is None or head == found:
        return found, ""
    if head not in HEADS:
        raise ValueError(f"head={head!r} is not a head; expected one of {list(HEADS)}")
    if head == "base":
        return "base", table.PREFIX_OURS
    raise CheckpointError(
        f"{where}: holds a {HEADS[found].architecture} (head {found!r}), not the {HEADS[head].architecture} "
        f"that head={head!r} asks for; only the base model (head='base') can be taken out of another head"
    )


class _HFTensors(_Tensors):
    def __init__(self, path: str, config: GPTJConfig, head: Optional[str]):
        from gptj_jax.convert.hf import checked_tensors
        from gptj_jax.convert.io import CheckpointReader

        self.config, self.where = config, path
        self.reader = CheckpointReader(path)
        try:
            found, _ = checked_tensors(self.reader, config, path)
            self.head, prefix = _select_head(found, head, self.reader.index_file or self.reader.files[0])
            self.paths = {p: prefix + p for p in table.expected_param_shapes(config, self.head)}
        except BaseException:
            self.reader.close()
            raise

    def stored(self, path: str) -> tuple[tuple[int, ...], np.dtype, bool]:
        name, transform = table.ours_to_hf(self.paths[path])
        return self.reader.shape(name), self.reader.dtype(name), transform == table.TRANSPOSE

    def read(self, path: str, index: Optional[tuple], out: Optional[np.ndarray]) -> np.ndarray:
        name, _ = table.ours_to_hf(self.paths[path])
        return self.reader.read_slice(name, index, out)

    def location(self, path: str) -> Any:
        return self.reader.location(table.ours_to_hf(self.paths[path])[0])

    def close(self) -> None:
        self.reader.close()


class _HFFlaxTensors(_Tensors):
    def __init__(self, path: str, config: GPTJConfig, head: Optional[str]):
        from gptj_jax.convert import hf_flax

        self.config, self.where = config, path
        if head is not None and head not in hf_flax.HEADS:
            raise CheckpointError(
                f"{path}: head {head!r} cannot be read from an HF Flax checkpoint; Transformers' Flax GPT-J had "
                f"{list(hf_flax.HEADS)} only"
            )
        self.reader = hf_flax.HFFlaxReader(path, config, head)
        self.head = self.reader.head
        self.paths = {p: p for p in table.expected_param_shapes(config, self.head)}
        self._file: Any = None
        self._file_path: Optional[str] = None

    def stored(self, path: str) -> tuple[tuple[int, ...], np.dtype, bool]:
        return self.reader.shape(path), self.reader.dtype(path), False

    def read(self, path: str, index: Optional[tuple], out: Optional[np.ndarray]) -> np.ndarray:
        from gptj_jax.convert.io import read_region

        entry = self.reader.entry(path)
        if entry.chunked or self.reader.shape(path) != entry.shape:  # chunked, or tied (the other one transposed)
            return self.reader.read(path) if index is None else self.reader.read_slice(path, index)
        if self._file_path != entry.file:
            self.close()
            self._file, self._file_path = open(entry.file, "rb"), entry.file
        what = f"tensor {entry.key!r} {table.fmt_shape(entry.shape)}"
        return read_region(self._file, entry.file, what, entry.spans[0][0], entry.shape, entry.dtype, index, out)

    def location(self, path: str) -> Any:
        from gptj_jax.convert.io import Location

        entry = self.reader.entry(path)
        if entry.chunked or self.reader.shape(path) != entry.shape:
            return None
        return Location(entry.file, entry.spans[0][0], entry.shape, entry.dtype)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._file_path = None, None
        self.reader.close()


class _MtjTensors(_Tensors):
    """mesh-transformer-jax: each HF tensor is joined from the shards (and the embedding bias folded into
    ``wte`` in float32, rounded once to the load dtype) before its blocks are cut."""

    def __init__(self, path: str, config: GPTJConfig, head: Optional[str], dtype: Optional[np.dtype]):
        from gptj_jax.convert.mtj import MtjReader

        self.config, self.where = config, path
        self.reader = MtjReader(path, config)
        self.head, prefix = _select_head("causal_lm", head, self.reader.step_dir)
        self.paths = {p: prefix + p for p in table.expected_param_shapes(config, self.head)}
        self._dtype = dtype
        self._cached: tuple[Optional[str], Optional[np.ndarray]] = (None, None)

    def stored(self, path: str) -> tuple[tuple[int, ...], np.dtype, bool]:
        name, transform = table.ours_to_hf(self.paths[path])
        return self.reader.shape(name), self._dtype or self.reader.dtype(), transform == table.TRANSPOSE

    def read(self, path: str, index: Optional[tuple], out: Optional[np.ndarray]) -> np.ndarray:
        name, _ = table.ours_to_hf(self.paths[path])
        if self._cached[0] != name:  # the blocks of a tensor come one after another: join it once
            self._cached = (None, None)
            self._cached = (name, self.reader.read(name, self._dtype))
        array = self._cached[1]
        assert array is not None
        return np.ascontiguousarray(array if index is None else array[index])

    def close(self) -> None:
        self._cached = (None, None)
        self.reader.close()


# ====================================================================================== placement
@functools.lru_cache(maxsize=None)
def _finisher(transpose: bool, dtype: Optional[str]) -> Callable[[jax.Array], jax.Array]:
    """A jitted ``x -> cast(x, dtype)`` (then ``.T``) run where ``x`` lives; always a new buffer."""

    def finish(x: jax.Array) -> jax.Array:
        if dtype is not None:
            x = x.astype(dtype)
        return x.T if transpose else x

    return jax.jit(finish)


class _Block(NamedTuple):
    """One distinct block of a leaf: ``index`` over our layout (the block's ``shape``), the devices that hold
    it, and what to read (``stored_index`` over the stored layout, None for the whole tensor; the block's
    ``stored_shape``)."""

    path: str
    index: tuple
    shape: tuple[int, ...]
    devices: list
    stored_index: Optional[tuple]
    stored_shape: tuple[int, ...]


def _blocks(path: str, shape: tuple[int, ...], sharding: jax.sharding.Sharding, transpose: bool) -> list[_Block]:
    """The distinct blocks of leaf ``path`` among this process's devices, each with the devices holding it."""
    takers: dict[tuple, _Block] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if key not in takers:
            whole = all(a == 0 and b == n for (a, b), n in zip(key, shape))
            block_shape = tuple(b - a for a, b in key)
            takers[key] = _Block(
                path, tuple(index), block_shape, [],
                None if whole else (tuple(reversed(index)) if transpose else tuple(index)),
                block_shape[::-1] if transpose else block_shape,
            )
        takers[key].devices.append(device)
    return list(takers.values())


class _Placer:
    """Places leaves block by block (see the module docstring) with one block read ahead in a thread,
    recording every array it makes so that a failure can delete them all, and the load statistics.

    Blocks are read into one reused host buffer, a ring as large as the largest block (faulting in
    fresh pages for every tensor would cost as much as reading it): each block goes after the
    previous one, or back at the start when it does not fit, and a region is reused only after the
    blocks that were in it are finished on their devices. So the next block is read while the
    device finishes the last ones, and the host holds one largest block beyond the params.
    """

    def __init__(self, stats: Optional[dict[str, Any]]):
        self.created: list[jax.Array] = []  # every param array (and shard) made so far
        self.stats = stats
        self.blocks: dict[str, tuple[int, ...]] = {}
        self.largest = 0

    def run(
        self, leaves: list[tuple[str, tuple[int, ...], jax.sharding.Sharding, np.dtype, bool]],
        dtype: Optional[np.dtype], read: Callable[[str, Optional[tuple], Optional[np.ndarray]], np.ndarray],
        locate: Callable[[str], Any],
    ) -> dict[str, jax.Array]:
        """Place ``leaves`` (our path, our shape, sharding, stored dtype, stored transposed?) from
        ``read(path, stored index or None, staging buffer)``, or from a memory map of the block where
        ``locate(path)`` gives its file offset and the block is whole rows at an aligned offset (the
        map goes as soon as the block is placed); returns ``{path: array}``."""
        from concurrent.futures import ThreadPoolExecutor

        from gptj_jax.convert.io import ALIGN, aligned_empty, mapped_rows

        plan = []
        for path, shape, sharding, stored_dtype, transpose in leaves:
            out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(stored_dtype)
            finish = _finisher(transpose, None if out_dtype == np.dtype(stored_dtype) else out_dtype.name)
            self.largest = max(self.largest, int(np.prod(shape, dtype=np.int64)) * np.dtype(stored_dtype).itemsize)
            plan.extend((block, np.dtype(stored_dtype), finish) for block in _blocks(path, shape, sharding, transpose))
        sizes = [int(np.prod(b.stored_shape, dtype=np.int64)) * d.itemsize for b, d, _ in plan]
        capacity = max(sizes, default=0)
        ring = aligned_empty((capacity,), np.uint8)
        inflight: list[tuple[int, int, list[jax.Array]]] = []  # (start, end, results) of blocks in the ring
        cursor = 0

        def claim(k: int) -> int:
            """Where block ``k`` goes in the ring: after the last block, or at 0 when it does not fit there;
            the blocks it overlaps are awaited first (the device may still be reading them)."""
            nonlocal cursor
            start = cursor if cursor + sizes[k] <= capacity else 0
            end = start + sizes[k]
            busy = [f for f in inflight if f[0] < end and start < f[1]]
            jax.block_until_ready([y for f in busy for y in f[2]])
            inflight[:] = [f for f in inflight if not (f[0] < end and start < f[1])]
            cursor = -(-end // ALIGN) * ALIGN
            return start

        def fetch(k: int, start: int) -> np.ndarray:
            block, stored_dtype, _ = plan[k]
            where = locate(block.path)
            if where is not None:
                mapped = mapped_rows(where, block.stored_index)
                if mapped is not None:  # whole rows on an aligned offset: the page cache, no copy
                    return mapped
            staging = ring[start : start + sizes[k]].view(stored_dtype).reshape(block.stored_shape)
            return read(block.path, block.stored_index, staging)

        placed: dict[str, list[jax.Array]] = {}
        reads = bytes_read = max_read = 0
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptj-load") as pool:
            start = claim(0) if plan else 0
            future = pool.submit(fetch, 0, start) if plan else None
            try:
                for k, (block, _, finish) in enumerate(plan):
                    assert future is not None
                    host = future.result()
                    future = None
                    reads, bytes_read, max_read = reads + 1, bytes_read + host.nbytes, max(max_read, host.nbytes)
                    if block.path not in self.blocks or np.prod(block.shape) > np.prod(self.blocks[block.path]):
                        self.blocks[block.path] = block.shape
                    ys = []
                    for device in block.devices:
                        # on CPU device_put uses the host buffer in place; the finish (cast, transpose) is
                        # dispatched, not awaited: the device works while the next block is read
                        ys.append(finish(jax.device_put(host, device)))
                        self.created.append(ys[-1])
                    placed.setdefault(block.path, []).extend(ys)
                    del host
                    inflight.append((start, start + sizes[k], ys))
                    if k + 1 < len(plan):
                        start = claim(k + 1)
                        future = pool.submit(fetch, k + 1, start)
                jax.block_until_ready([y for f in inflight for y in f[2]])
            finally:
                if future is not None:
                    future.cancel()
                    if not future.cancelled():
                        future.exception()  # wait: the thread must not write the ring after we return
        out = {}
        for path, shape, sharding, _, _ in leaves:
            arrays = placed[path]
            if isinstance(sharding, jax.sharding.SingleDeviceSharding):
                out[path] = arrays[0]
            else:
                out[path] = jax.make_array_from_single_device_arrays(shape, sharding, arrays)
                self.created.append(out[path])
        if self.stats is not None:
            self.stats.update(reads=reads, bytes_read=bytes_read, max_read_bytes=max_read)
        return out

    def done(self, t0: float) -> None:
        self.created = []  # the params are the caller's now
        if self.stats is not None:
            self.stats.update(largest_tensor_bytes=self.largest, blocks=dict(self.blocks),
                              seconds=time.perf_counter() - t0)

    def abort(self) -> None:
        """Delete every array made so far (the error propagates; nothing stays placed)."""
        for array in reversed(self.created):
            if not array.is_deleted():
                array.delete()
        self.created = []


def _restore_orbax(
    source: Source, config: GPTJConfig, head: Optional[str], shardings: Callable[..., dict[str, Any]],
    dtype: Optional[np.dtype], placer: _Placer, post: Optional[Callable[[dict, list], None]] = None,
) -> tuple[str, dict[str, jax.Array]]:
    """Our orbax checkpoint restored by orbax into the target shardings, about the largest stored leaf at a time.

    A stacked item (a ``scan_layers`` training run) is restored stacked, into the stacked shardings
    (``shardings(head, True)``): kept so when ``config.scan_layers`` asks for that layout (and nothing is
    quantized), else cut into its layers on the devices (:func:`table.unstack_layers`; each layer then put
    in its per-layer sharding), which briefly holds one group of stacked leaves twice. ``out`` holds
    per-layer paths, or stacked ones (``transformer/h/...``) when kept stacked."""
    import orbax.checkpoint as ocp

    from gptj_jax.convert.flax import FlaxReader

    reader = FlaxReader(source.path, config)
    head, prefix = _select_head(reader.head, head, reader.params_dir)
    flat_shardings = shardings(head)
    keep_stacked = reader.stacked and config.scan_layers and post is None
    if reader.stacked:
        flat_shardings.update(shardings(head, True))
    # stored leaf (prefix-less) -> our per-layer paths in it, table order
    members: dict[str, list[str]] = {}
    for p in table.expected_param_shapes(config, head):
        members.setdefault(reader.where(prefix + p)[0][len(prefix):], []).append(p)
    budget = max(reader.nbytes(prefix + s) for s in members)
    groups: list[list[str]] = [[]]
    size = 0
    for s in members:
        if groups[-1] and size + reader.nbytes(prefix + s) > budget:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += reader.nbytes(prefix + s)
    out: dict[str, jax.Array] = {}
    reads = bytes_read = max_read = 0
    for group in groups:
        item = table.unflatten({prefix + s: 0 for s in group})
        args = table.unflatten({
            prefix + s: ocp.ArrayRestoreArgs(
                sharding=flat_shardings[s], dtype=dtype or reader.dtype(prefix + s), global_shape=reader.shape(prefix + s)
            )
            for s in group
        })
        try:
            restored = ocp.PyTreeCheckpointer().restore(
                reader.params_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
            )
        except (FileNotFoundError, ValueError, OSError) as e:
            raise CheckpointError(
                f"{reader.params_dir}: cannot restore {prefix + group[0]!r}... ({type(e).__name__}: {e})"
            ) from None
        restored = table.flatten(restored)
        flat = {s: restored[prefix + s] for s in group}
        for s, array in flat.items():
            placer.created.append(array)
            placer.largest = max(placer.largest, reader.nbytes(prefix + s))
            shards = {  # the distinct blocks
                tuple(i.indices(n)[:2] for i, n in zip(sd.index, array.shape)): sd.data.nbytes
                for sd in array.addressable_shards
            }
            reads, bytes_read = reads + len(shards), bytes_read + sum(shards.values())
            max_read = max([max_read, *shards.values()])
        if reader.stacked and not keep_stacked:
            stacked = flat
            flat = {p: jax.device_put(x, flat_shardings[p])
                    for p, x in table.flatten(table.unstack_layers(table.unflatten(stacked))).items()}
            placer.created.extend(flat.values())
            jax.block_until_ready(list(flat.values()))
            for s, array in stacked.items():
                if s not in flat:
                    array.delete()
        for p, array in flat.items():
            out[p] = array
            placer.blocks[p] = tuple(array.sharding.shard_shape(array.shape))
        jax.block_until_ready(list(flat.values()))
        if post is not None:  # quantize this group now, before the next is restored
            post(out, list(flat))
    if placer.stats is not None:
        placer.stats.update(reads=reads, bytes_read=bytes_read, max_read_bytes=max_read)
    return head, out


# ====================================================================================== load
def live_device_bytes() -> int:
    """Bytes of this process's live device buffers: every shard of ``jax.live_arrays()``, each buffer once
    (two arrays that alias one buffer, as orbax's restore returns, count once)."""
    seen: dict[tuple, int] = {}
    for a in jax.live_arrays():
        for s in a.addressable_shards:
            try:
                key = (s.device.id, s.data.unsafe_buffer_pointer())
            except Exception:  # a backend without buffer pointers: count it as its own buffer
                key = (s.device.id, id(s.data))
            seen[key] = int(s.data.nbytes)
    return sum(seen.values())


def load(
    source: Union[PathLike, Source],
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    dtype: Any = None,
    revision: Optional[str] = None,
    head: Optional[str] = None,
    rules: sh.Rules = sh.DEFAULT_RULES,
    config: Union[None, PathLike, GPTJConfig] = None,
    stats: Optional[dict[str, Any]] = None,
    quantize: Optional[str] = None,
    quantize_embeddings: bool = False,
    adapter: Optional[PathLike] = None,
) -> tuple[GPTJConfig, Params]:
    """Load any GPT-J checkpoint into ``(config, params)``, each leaf placed straight onto ``mesh``.

    Args:
      source: a local directory (HF safetensors / ``.bin``, HF Flax ``flax_model.msgpack``, our orbax
        checkpoint or training run directory, mesh-transformer-jax checkpoint) or a hub id ``owner/name``
        (see the module docstring).
      mesh: a ``jax.sharding.Mesh`` with axes ``dp``, ``fsdp``, ``mp``; leaves are sharded by ``rules``
        (each device receives only its block). None: everything on one device (the default one).
      dtype: ``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a dtype): every leaf is cast as it is
        placed; None keeps each tensor's stored dtype.
      revision: branch, tag or commit of a hub id (default ``main``).
      head: the head to load (``causal_lm``, ``sequence_classification``, ``question_answering`` or
        ``base``). None: the checkpoint's. ``base`` takes the base model out of any head; any other
        mismatch is an error.
      rules: logical-axis rules (:data:`gptj_jax.sharding.DEFAULT_RULES`).
      config: overrides the checkpoint's config (a GPTJConfig, or a path to an HF ``config.json`` or a
        mesh-transformer-jax training JSON); required for mesh-transformer-jax checkpoints.
      stats: a dict to receive ``reads`` (blocks read), ``bytes_read``, ``max_read_bytes`` (the largest
        block read), ``largest_tensor_bytes``, ``blocks`` (per leaf, the shape of the largest block put on
        any one device) and ``seconds``; with ``quantize``, also ``peak_live_bytes``: the most bytes of live
        jax arrays in the process seen after each tensor was placed (before it was quantized).
      quantize: ``"int8"``: every matmul weight becomes a :class:`gptj_jax.quantize.QuantizedArray` (int8 +
        float32 per-output-channel scales sharded like the weight) as soon as it is placed, tensor by tensor,
        so the device never holds more than the int8 model plus one float tensor (in ``dtype``). None: no
        quantization; anything else is a ValueError.
      quantize_embeddings: with ``quantize``, also quantize ``wte`` (per token row) and ``lm_head``.
      adapter: a LoRA adapter (a PEFT adapter directory, or a LoRA training run of ``gptj-jax train``) merged
        into the loaded weights (``W + A @ B * alpha / r``, each kernel keeping its sharding); its shapes are
        checked against the model first (a LoraError names the kernel and both shapes). Not with ``quantize``
        (merging into int8 weights is an error: merge, convert, then quantize the merged checkpoint).

    Returns ``(config, params)``: params a nested dict of ``jax.Array`` in our layout (kernels ``[in, out]``),
    e.g. ``params["transformer"]["h_0"]["attn"]["q_proj"]["kernel"]`` ``[n_embd, n_embd]``. With
    ``config.scan_layers`` (pass ``config=source_config(...).replace(scan_layers=True)``) the blocks are
    read per layer through the same tables and then stacked (``table.stack_layers``, on the devices, into
    the stacked shardings): ``params["transformer"]["h"]["attn"]["q_proj"]["kernel"]`` ``[n_layer, D, D]``;
    the stacking briefly holds the blocks twice.

    Raises FileNotFoundError for a path that does not exist (and is no hub id), CheckpointError for a
    checkpoint that is malformed, truncated or disagrees with the config (naming file, tensor and
    shapes) or a hub id / revision that cannot be found, ValueError for a mesh the model cannot be
    split over. All are raised before anything is placed.
    """
    t0 = time.perf_counter()
    src = resolve(source, revision)
    config = source_config(src, config)
    np_dtype = as_dtype(dtype)
    from gptj_jax import quantize as qz

    qz.check_scheme(quantize)
    if adapter is not None:
        from gptj_jax import lora

        if quantize:
            raise lora.LoraError(
                f"load(adapter={os.fspath(adapter)!r}, quantize={quantize!r}): merging an adapter into an int8-quantized "
                "base is not done silently; load without quantize (merged float weights), or export the merged model "
                "(gptj-jax convert RUN OUT --to hf --merge-lora) and load that with quantize"
            )
        adapters, spec = lora.read_adapter(os.fspath(adapter), config)
        config, params = load(src, mesh=mesh, dtype=dtype, head=head, rules=rules, config=config, stats=stats)
        return config, lora.merge_placed(params, adapters, spec)
    if head is not None and head not in HEADS:
        raise ValueError(f"head={head!r} is not a head; expected one of {list(HEADS)}")

    def shardings(head: str, stacked: bool = False) -> dict[str, jax.sharding.Sharding]:
        """Per-layer params' shardings by path (``stacked``: the stacked layout's, ``transformer/h/...``)."""
        if mesh is None:
            device = jax.config.jax_default_device
            single = jax.sharding.SingleDeviceSharding(
                device if isinstance(device, jax.Device) else jax.local_devices()[0]
            )
            return {p: single for p in table.model_param_shapes(config.replace(scan_layers=stacked), head)}
        try:
            return table.flatten(sh.param_shardings(config.replace(scan_layers=stacked), mesh, head, rules))
        except ValueError as e:
            raise ValueError(f"{src.spec}: cannot split the model over mesh {sh.describe_mesh(mesh)}: {e}") from None

    placer = _Placer(stats)
    peak = [0]

    def quantize_placed(out: dict, paths: list) -> None:
        """Replace the placed float arrays ``out[p]`` (p in ``paths``) that are quantized by their int8 form."""
        if stats is not None:
            import gc

            gc.collect()  # arrays only a reference cycle still holds are not held
            peak[0] = max(peak[0], live_device_bytes())
        for p in paths:
            axis = qz.channel_axis(p, quantize_embeddings)
            if axis is None:
                continue
            x = out[p]
            qa = qz.quantize_array(x, axis, quantize)
            jax.block_until_ready(qa)
            placer.created.extend([qa.q, qa.scale])
            out[p] = qa
            x.delete()
        if stats is not None:
            stats["peak_live_bytes"] = peak[0]

    post = quantize_placed if quantize else None
    if src.format == "flax":
        try:
            head, flat = _restore_orbax(src, config, head, shardings, np_dtype, placer, post)  # per layer or stacked
        except BaseException:
            placer.abort()
            raise
        placer.done(t0)
        return config, _stack_if_scanned(config, mesh, head, rules, table.unflatten(flat))

    tensors = _open(src, config, head, np_dtype)
    try:
        flat_shardings = shardings(tensors.head)
        leaves = []
        for path, shape in table.expected_param_shapes(config, tensors.head).items():
            _, stored_dtype, transpose = tensors.stored(path)
            leaves.append((path, shape, flat_shardings[path], stored_dtype, transpose))
        if post is None:
            flat = placer.run(leaves, np_dtype, tensors.read, tensors.location)
        else:  # one tensor at a time, each quantized as soon as it is placed
            flat, totals = {}, {"reads": 0, "bytes_read": 0, "max_read_bytes": 0}
            for leaf in leaves:
                flat.update(placer.run([leaf], np_dtype, tensors.read, tensors.location))
                post(flat, [leaf[0]])
                if stats is not None:
                    totals = {k: (max if k == "max_read_bytes" else sum)((totals[k], stats[k])) for k in totals}
            if stats is not None:
                stats.update(totals)
        placer.done(t0)
    except BaseException:
        placer.abort()
        raise
    finally:
        tensors.close()
    return config, _stack_if_scanned(config, mesh, tensors.head, rules, table.unflatten(flat))


def _stack_if_scanned(config: GPTJConfig, mesh: Optional[jax.sharding.Mesh], head: str, rules: sh.Rules,
                      params: Params) -> Params:
    """Per-layer params -> the stacked layout when ``config.scan_layers`` (else as they are; params read
    stacked from a ``scan_layers`` training run stay as they are)."""
    if not config.scan_layers or table.is_stacked(params):
        return params
    if mesh is None:
        return table.stack_layers(params)
    return jax.jit(table.stack_layers, out_shardings=sh.param_shardings(config, mesh, head, rules))(params)


def _open(src: Source, config: GPTJConfig, head: Optional[str], dtype: Optional[np.dtype]) -> _Tensors:
    """The reader of ``src``'s format: headers read and every tensor checked against ``config``."""
    if src.format == "hf":
        return _HFTensors(src.path, config, head)
    if src.format == "hf-flax":
        return _HFFlaxTensors(src.path, config, head)
    if src.format == "mtj":
        return _MtjTensors(src.path, config, head, dtype)
    raise CheckpointError(f"{src.spec}: unknown checkpoint format {src.format!r}")


def from_pretrained(
    path: PathLike, dtype: Any = None, *, config: Optional[GPTJConfig] = None
) -> tuple[GPTJConfig, Params]:
    """``load(path, dtype=dtype, config=config)`` (one device): the name kept from earlier releases."""
    return load(path, dtype=dtype, config=config)

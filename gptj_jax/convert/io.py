"""Tensor files on disk: lazy safetensors / PyTorch ``.bin`` readers and streaming writers.

Memory model: readers hand out one tensor (or one slice of a tensor) at a time as a NumPy array
that owns its memory; nothing else stays resident. bfloat16 comes back as ``ml_dtypes.bfloat16``.

Why we parse the safetensors header ourselves: ``safetensors`` 0.8.0's NumPy backend raises
``TypeError: data type 'bfloat16' not understood`` on BF16 tensors (NumPy has no bfloat16), and
its Flax backend returns device arrays. The format is a little-endian u64 header length, a JSON
header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` and the raw bytes; reading it
with ``readinto`` (whole tensors) and ``np.memmap`` (slices) is a few lines and handles every dtype.
Writing streams too: the header is computed from the plan (names, shapes, dtypes) up front, so each
tensor is written at its offset as it arrives and no shard is ever held in memory.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Iterator, Optional, Sequence, Union

import ml_dtypes
import numpy as np

from gptj_jax.convert.errors import CheckpointError
from gptj_jax.convert.table import fmt_shape

PathLike = Union[str, os.PathLike]
Index = tuple  # a tuple of slices / ints, as for ``array[index]``

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

_ST_TO_NP: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST: dict[np.dtype, str] = {v: k for k, v in _ST_TO_NP.items()}


def parse_size(size: Union[int, str]) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"200KiB"`` -> 204_800, ``1024`` -> 1024 (HF's convention: KB = 1000)."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size.upper().replace("IB", "iB"))
    if not m:
        raise ValueError(f"cannot parse size {size!r}; expected e.g. '5GB', '500MB', '200KiB' or an integer")
    number, unit, binary = float(m.group(1)), m.group(2), m.group(3)
    base = 1024 if binary else 1000
    power = "_KMGT".index(unit) if unit else 0
    value = int(number * base**power)
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def same_bits(a: Any, b: Any) -> bool:
    """True when two arrays have the same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    unsigned = np.dtype(f"u{a.dtype.itemsize}") if a.dtype.itemsize in (1, 2, 4, 8) else None
    if unsigned is None:
        return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    return bool(np.array_equal(a.view(unsigned), b.view(unsigned)))


# ============================================================================ safetensors
class SafetensorsFile:
    """One ``.safetensors`` file, read lazily: the header at open, tensor bytes only on request.

    The header is validated against the file size, so a truncated file fails here, naming the
    first tensor whose bytes are missing.
    """

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file does not exist") from None
        try:
            self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _parse_header(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(
                f"{self.path}: truncated or corrupt safetensors file (header claims {n} bytes, file has {size})"
            )
        try:
            header = json.loads(self._file.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        available = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                st_dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r}: malformed header entry {info!r}") from None
            if st_dtype not in _ST_TO_NP:
                raise CheckpointError(f"{self.path}: tensor {name!r}: unsupported dtype {st_dtype}")
            dtype = _ST_TO_NP[st_dtype]
            want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != want:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r}: header gives {end - begin} bytes for shape "
                    f"{fmt_shape(shape)} {st_dtype}, which needs {want}"
                )
            if end > available:
                raise CheckpointError(
                    f"{self.path}: truncated file: tensor {name!r} {fmt_shape(shape)} {st_dtype} needs bytes "
                    f"{begin}..{end} of the data section but the file holds only {available}"
                )
            self._entries[name] = (dtype, shape, begin, end)

    # ------------------------------------------------------------------ queries
    def keys(self) -> list[str]:
        """Tensor names in on-disk order."""
        return sorted(self._entries, key=lambda k: self._entries[k][2])

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[0]

    # ------------------------------------------------------------------ reads
    def read(self, name: str) -> np.ndarray:
        """The whole tensor as a NumPy array that owns its memory."""
        dtype, shape, begin, end = self._entry(name)
        out = np.empty(shape, dtype)
        if end > begin:
            self._file.seek(self._data_start + begin)
            got = self._file.readinto(memoryview(out.reshape(-1).view(np.uint8)))
            if got != end - begin:
                raise CheckpointError(
                    f"{self.path}: truncated file: tensor {name!r} {fmt_shape(shape)} read {got} of {end - begin} bytes"
                )
        return out

    def read_slice(self, name: str, index: Index) -> np.ndarray:
        """``tensor[index]`` reading only the pages the slice touches (a temporary memmap of the tensor)."""
        dtype, shape, begin, end = self._entry(name)
        if end == begin:
            return np.empty(shape, dtype)[index].copy()
        mm = np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)
        try:
            return np.array(mm[index])
        finally:
            del mm

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ============================================================================ torch .bin
def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError(
            "reading or writing PyTorch .bin checkpoints needs PyTorch: pip install gptj-jax[torch] "
            "(safetensors checkpoints do not)"
        ) from None
    return torch


def torch_to_numpy(tensor: Any) -> np.ndarray:
    """A CPU torch tensor -> NumPy (bfloat16 via an int16 view to ``ml_dtypes.bfloat16``); shares memory."""
    torch = _torch()
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def numpy_to_torch(array: np.ndarray) -> Any:
    """NumPy -> torch, bfloat16 included (contiguous copy only if needed)."""
    torch = _torch()
    array = np.ascontiguousarray(array)
    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


class TorchBinFile:
    """One ``pytorch_model*.bin`` file, opened with ``torch.load(mmap=True, weights_only=True)``.

    Tensors stay in the memory map until read; :meth:`read` copies one out.
    """

    def __init__(self, path: PathLike):
        torch = _torch()
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: file does not exist")
        try:
            try:
                state = torch.load(self.path, mmap=True, weights_only=True, map_location="cpu")
            except RuntimeError as e:
                if "zipfile" not in str(e) and "mmap" not in str(e):
                    raise
                # Pre-1.6 (non-zip) files cannot be memory-mapped: load them normally.
                state = torch.load(self.path, weights_only=True, map_location="cpu")
        except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, zipfile errors...
            raise CheckpointError(f"{self.path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{self.path}: expected a flat dict of tensors (a state dict)")
        self._state: dict[str, Any] = state

    def keys(self) -> list[str]:
        return list(self._state)

    def __contains__(self, name: str) -> bool:
        return name in self._state

    def _tensor(self, name: str) -> Any:
        try:
            return self._state[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensor(name).shape)

    def dtype(self, name: str) -> np.dtype:
        torch = _torch()
        t = self._tensor(name)
        if t.dtype == torch.bfloat16:
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(torch.empty((), dtype=t.dtype).numpy().dtype)

    def read(self, name: str) -> np.ndarray:
        try:
            return np.array(torch_to_numpy(self._tensor(name)))
        except CheckpointError:
            raise
        except Exception as e:  # a truncated zip member surfaces here, on first touch
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({type(e).__name__}: {e})") from None

    def read_slice(self, name: str, index: Index) -> np.ndarray:
        return np.array(torch_to_numpy(self._tensor(name))[index])

    def close(self) -> None:
        self._state = {}

    def __enter__(self) -> "TorchBinFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_tensor_file(path: PathLike) -> Union[SafetensorsFile, TorchBinFile]:
    """Open a ``.safetensors`` or ``.bin`` file by its extension."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    if path.endswith(".bin") or path.endswith(".pt") or path.endswith(".pth"):
        return TorchBinFile(path)
    raise CheckpointError(f"{path}: unknown tensor file type (expected .safetensors or .bin)")


# ============================================================================ HF directories
def find_weight_files(directory: PathLike) -> tuple[Optional[str], dict[str, list[str]]]:
    """Locate the weights of an HF checkpoint directory.

    Returns ``(index_file or None, {shard file path: [tensor names listed for it]})``; for an
    unsharded checkpoint the name lists are empty (read them from the file). Prefers, like
    transformers, ``model.safetensors``, then its index, then ``pytorch_model.bin``, then its index.
    Raises CheckpointError when there are no weights or an index lists a file that does not exist.
    """
    directory = os.fspath(directory)
    for single, index in ((SAFE_SINGLE, SAFE_INDEX), (BIN_SINGLE, BIN_INDEX)):
        if os.path.isfile(os.path.join(directory, single)):
            return None, {os.path.join(directory, single): []}
        index_path = os.path.join(directory, index)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a valid index file ({type(e).__name__}: {e})") from None
            files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(os.path.join(directory, file), []).append(name)
            for file, names in files.items():
                if not os.path.isfile(file):
                    raise CheckpointError(
                        f"{index_path}: lists shard {os.path.basename(file)} (holding {len(names)} tensors, "
                        f"e.g. {names[0]!r}) but {file} does not exist"
                    )
            return index_path, files
    raise CheckpointError(
        f"{directory}: no weights found; expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
    )


def has_hf_weights(directory: PathLike) -> bool:
    directory = os.fspath(directory)
    return any(os.path.isfile(os.path.join(directory, f)) for f in (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX))


class CheckpointReader:
    """Every tensor of an HF checkpoint directory, single-file or sharded, safetensors or ``.bin``.

    Shapes and dtypes are known after opening (headers only). At most one shard file is open at a
    time; :meth:`read` and :meth:`read_slice` return NumPy arrays in the file's layout and dtype.
    :meth:`tie` makes one name read as another tensor (a tied ``lm_head.weight`` reads ``wte``).
    """

    def __init__(self, directory: PathLike):
        self.directory = os.fspath(directory)
        self.index_file, listed = find_weight_files(self.directory)
        self._file_of: dict[str, str] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, np.dtype] = {}
        self._open_path: Optional[str] = None
        self._open: Optional[Union[SafetensorsFile, TorchBinFile]] = None
        self._tied: dict[str, str] = {}
        self.files = list(listed)
        for file, names in listed.items():
            handle = self._handle(file)
            present = handle.keys()
            if self.index_file is not None:
                missing = [n for n in names if n not in handle]
                if missing:
                    raise CheckpointError(
                        f"{file}: tensor {missing[0]!r} is listed for this shard in {self.index_file} but is not in it"
                    )
                unlisted = [n for n in present if n not in set(names)]
                if unlisted:
                    raise CheckpointError(
                        f"{file}: holds tensor {unlisted[0]!r} which {self.index_file} does not list"
                    )
            for name in present:
                if name in self._file_of:
                    raise CheckpointError(f"{file}: tensor {name!r} is also in {self._file_of[name]}")
                self._file_of[name] = file
                self._shape[name] = handle.shape(name)
                self._dtype[name] = handle.dtype(name)
        self._close_open()

    def _handle(self, file: str) -> Union[SafetensorsFile, TorchBinFile]:
        if self._open_path != file:
            self._close_open()
            self._open = open_tensor_file(file)
            self._open_path = file
        assert self._open is not None
        return self._open

    def _close_open(self) -> None:
        if self._open is not None:
            self._open.close()
        self._open, self._open_path = None, None

    @property
    def names(self) -> list[str]:
        """All tensor names, grouped by file (the order that reads each file once)."""
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return self.target(name) in self._file_of

    def tie(self, name: str, target: str) -> None:
        """From now on ``name`` reads as the tensor ``target`` (shape, dtype and bytes), whether or not
        the files hold a ``name`` of their own (transformers' tied weights: ``lm_head.weight`` is ``wte``)."""
        self.file_of(target)
        self._tied[name] = target

    def target(self, name: str) -> str:
        """The stored tensor that ``name`` reads: ``name`` itself unless :meth:`tie` redirected it."""
        return self._tied.get(name, name)

    def file_of(self, name: str) -> str:
        try:
            return self._file_of[self.target(name)]
        except KeyError:
            raise CheckpointError(f"{self.directory}: no tensor named {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        self.file_of(name)
        return self._shape[self.target(name)]

    def dtype(self, name: str) -> np.dtype:
        self.file_of(name)
        return self._dtype[self.target(name)]

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shape(name), dtype=np.int64)) * self.dtype(name).itemsize

    def read(self, name: str) -> np.ndarray:
        """The whole tensor (file layout and dtype)."""
        return self._handle(self.file_of(name)).read(self.target(name))

    def read_slice(self, name: str, index: Index) -> np.ndarray:
        """``tensor[index]`` (file layout), reading only what the slice needs from safetensors."""
        return self._handle(self.file_of(name)).read_slice(self.target(name), index)

    def iter_tensors(self, names: Optional[Sequence[str]] = None) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(name, array)`` one at a time, file by file."""
        order = {n: k for k, n in enumerate(self._file_of)}
        wanted = self.names if names is None else sorted(names, key=lambda n: order[self.target(n)])
        for name in wanted:
            yield name, self.read(name)

    def close(self) -> None:
        self._close_open()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ============================================================================ writers
TensorPlan = Sequence[tuple[str, tuple[int, ...], np.dtype]]


def plan_shards(plan: TensorPlan, max_shard_size: int) -> list[list[int]]:
    """Cut the plan (in order) into shards of at most ``max_shard_size`` bytes, as transformers does.

    A tensor bigger than the limit gets a shard of its own. Returns lists of plan indices.
    """
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(plan):
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def shard_names(prefix: str, ext: str, count: int) -> list[str]:
    """``model.safetensors`` or ``model-00001-of-00003.safetensors`` ... (transformers' names)."""
    if count == 1:
        return [f"{prefix}.{ext}"]
    return [f"{prefix}-{i + 1:05d}-of-{count:05d}.{ext}" for i in range(count)]


def _write_index(path: str, files: dict[str, str], total_size: int) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(files.items()))}, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


class SafetensorsWriter:
    """Write a planned set of tensors to ``model.safetensors`` or shards + ``model.safetensors.index.json``.

    Headers are computed from the plan at construction, so :meth:`write` puts each tensor's bytes
    at its final offset as it arrives (any order) and no shard is held in memory. Each file is
    written under a ``.tmp`` name and renamed by :meth:`close`.
    """

    def __init__(
        self,
        directory: PathLike,
        plan: TensorPlan,
        max_shard_size: Union[int, str] = "5GB",
        metadata: Optional[dict[str, str]] = None,
    ):
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self._plan = {name: (tuple(int(s) for s in shape), np.dtype(dtype)) for name, shape, dtype in plan}
        if len(self._plan) != len(plan):
            raise ValueError("duplicate tensor names in the write plan")
        shards = plan_shards(plan, parse_size(max_shard_size))
        names = shard_names("model", "safetensors", len(shards))
        self.files = [os.path.join(self.directory, n) for n in names]
        self._where: dict[str, tuple[int, int]] = {}  # name -> (file index, absolute offset)
        self._handles = []
        self.total_size = 0
        self._written: set[str] = set()
        for k, indices in enumerate(shards):
            header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
            offset = 0
            for i in indices:
                name, shape, dtype = plan[i]
                nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                st = _NP_TO_ST.get(np.dtype(dtype))
                if st is None:
                    raise ValueError(f"tensor {name!r}: dtype {np.dtype(dtype)} cannot be stored in safetensors")
                header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
            blob += b" " * (-len(blob) % 8)
            data_start = 8 + len(blob)
            for i in indices:
                name = plan[i][0]
                self._where[name] = (k, data_start + header[name]["data_offsets"][0])
            handle = open(self.files[k] + ".tmp", "wb")
            handle.write(struct.pack("<Q", len(blob)))
            handle.write(blob)
            handle.truncate(data_start + offset)
            self._handles.append(handle)
            self.total_size += offset

    def write(self, name: str, array: np.ndarray) -> None:
        """Write one tensor; its shape and dtype must match the plan."""
        if name not in self._plan:
            raise ValueError(f"tensor {name!r} is not in the write plan")
        shape, dtype = self._plan[name]
        if tuple(array.shape) != shape or array.dtype != dtype:
            raise ValueError(
                f"tensor {name!r}: planned {fmt_shape(shape)} {dtype}, got {fmt_shape(array.shape)} {array.dtype}"
            )
        k, offset = self._where[name]
        handle = self._handles[k]
        handle.seek(offset)
        array = np.ascontiguousarray(array)
        handle.write(memoryview(array.reshape(-1).view(np.uint8)))
        self._written.add(name)

    def close(self) -> list[str]:
        """Check every planned tensor was written, rename the files into place, write the index."""
        missing = [n for n in self._plan if n not in self._written]
        if missing:
            self.abort()
            raise ValueError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]!r}")
        for handle, file in zip(self._handles, self.files):
            handle.close()
            os.replace(file + ".tmp", file)
        self._handles = []
        if len(self.files) > 1:
            weight_map = {name: os.path.basename(self.files[k]) for name, (k, _) in self._where.items()}
            _write_index(os.path.join(self.directory, SAFE_INDEX), weight_map, self.total_size)
            return self.files + [os.path.join(self.directory, SAFE_INDEX)]
        return list(self.files)

    def abort(self) -> None:
        """Close and delete the partial files."""
        for handle, file in zip(self._handles, self.files):
            handle.close()
            if os.path.exists(file + ".tmp"):
                os.remove(file + ".tmp")
        self._handles = []


class TorchBinWriter:
    """Write a planned set of tensors to ``pytorch_model.bin`` or shards + ``pytorch_model.bin.index.json``.

    ``torch.save`` needs a whole shard, so one shard (at most ``max_shard_size`` bytes) is held until
    its last tensor arrives; feed tensors in plan order to keep it at one.
    """

    def __init__(self, directory: PathLike, plan: TensorPlan, max_shard_size: Union[int, str] = "5GB"):
        _torch()
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        shards = plan_shards(plan, parse_size(max_shard_size))
        self.files = [os.path.join(self.directory, n) for n in shard_names("pytorch_model", "bin", len(shards))]
        self._plan = {name: (tuple(int(s) for s in shape), np.dtype(dtype)) for name, shape, dtype in plan}
        self._shard_of = {plan[i][0]: k for k, indices in enumerate(shards) for i in indices}
        self._remaining = [len(indices) for indices in shards]
        self._pending: list[dict[str, Any]] = [{} for _ in shards]
        self.total_size = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for s, d in self._plan.values())

    def write(self, name: str, array: np.ndarray) -> None:
        torch = _torch()
        if name not in self._plan:
            raise ValueError(f"tensor {name!r} is not in the write plan")
        shape, dtype = self._plan[name]
        if tuple(array.shape) != shape or array.dtype != dtype:
            raise ValueError(
                f"tensor {name!r}: planned {fmt_shape(shape)} {dtype}, got {fmt_shape(array.shape)} {array.dtype}"
            )
        k = self._shard_of[name]
        self._pending[k][name] = numpy_to_torch(np.array(array))
        self._remaining[k] -= 1
        if self._remaining[k] == 0:
            tmp = self.files[k] + ".tmp"
            torch.save(self._pending[k], tmp)
            os.replace(tmp, self.files[k])
            self._pending[k] = {}

    def close(self) -> list[str]:
        """Check every planned tensor was written (all shards saved) and write the index."""
        missing = [n for n, k in self._shard_of.items() if self._remaining[k] and n not in self._pending[k]]
        if missing:
            raise ValueError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]!r}")
        if len(self.files) > 1:
            weight_map = {name: os.path.basename(self.files[k]) for name, k in self._shard_of.items()}
            _write_index(os.path.join(self.directory, BIN_INDEX), weight_map, self.total_size)
            return self.files + [os.path.join(self.directory, BIN_INDEX)]
        return list(self.files)

    def abort(self) -> None:
        self._pending = [{} for _ in self._pending]


def remove_weight_files(directory: PathLike, keep: Sequence[str] = ()) -> None:
    """Delete HF weight files (``model*.safetensors``, ``pytorch_model*.bin``, their indexes) not in ``keep``."""
    directory = os.fspath(directory)
    keep_names = {os.path.basename(k) for k in keep}
    pattern = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|pytorch_model(-\d{5}-of-\d{5})?\.bin)(\.index\.json)?$")
    for name in os.listdir(directory):
        if pattern.match(name) and name not in keep_names:
            os.remove(os.path.join(directory, name))

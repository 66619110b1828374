"""Tensor files on disk: lazy safetensors / PyTorch ``.bin`` readers and streaming writers.

Memory model: readers hand out one tensor (or one block of a tensor) at a time as a NumPy array
that owns its memory; nothing else stays resident. bfloat16 comes back as ``ml_dtypes.bfloat16``.
Both formats store each tensor as C-order bytes at a known file offset, so both read the same way
(:func:`read_region`): ``readinto`` of the rows a block spans straight into a fresh 64-byte-aligned
array (aligned so that ``jax.device_put`` on CPU can use it without a copy); a block that is a
column range reads its rows in chunks of :data:`CHUNK_BYTES` and keeps the columns. No file is
memory-mapped, so no file-backed pages pile up in the process (``RssFile``) as a model loads.

Why we parse the safetensors header ourselves: ``safetensors`` 0.8.0's NumPy backend raises
``TypeError: data type 'bfloat16' not understood`` on BF16 tensors (NumPy has no bfloat16), and
its Flax backend returns device arrays. The format is a little-endian u64 header length, a JSON
header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` and the raw bytes.

Why we read ``pytorch_model.bin`` without ``torch.load``: the file is a zip archive whose
``<archive>/data.pkl`` pickles the state dict and whose ``<archive>/data/<key>`` entries hold each
storage's raw bytes, stored uncompressed. ``torch.load(mmap=True)`` maps the whole file and every
page a read touches stays in the process as file-backed RSS until the map goes (a 24 GB
checkpoint's worth at the end of a load); reading the storages directly needs no torch at all, only
a restricted unpickler of ``data.pkl`` that records, per tensor, its storage key, dtype, offset,
shape and strides (and refuses any other pickled object). Files of the pre-1.6, non-zip format
still go through ``torch.load``.

Writing streams too: the safetensors header is computed from the plan (names, shapes, dtypes) up
front, so each tensor is written at its offset as it arrives and no shard is ever held in memory.
"""

from __future__ import annotations

import io as stdio  # this module is gptj_jax.convert.io
import json
import os
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from typing import Any, BinaryIO, Iterator, NamedTuple, Optional, Sequence, Union

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


# ============================================================================ reading bytes
CHUNK_BYTES = 8 << 20  # rows read at a time when a block keeps only some columns of each row
ALIGN = 64  # jax.device_put on CPU uses a NumPy buffer in place when it is 64-byte aligned


def aligned_empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """``np.empty(shape, dtype)`` whose data starts on an :data:`ALIGN`-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(tuple(shape))


def _unit_slices(index: Index, shape: tuple[int, ...]) -> Optional[tuple[slice, ...]]:
    """``index`` as one ``slice(start, stop)`` per dimension, or None when it is not plain unit-step slices."""
    index = tuple(index) if isinstance(index, tuple) else (index,)
    if len(index) > len(shape):
        return None
    out = []
    for i, n in zip(index + (slice(None),) * (len(shape) - len(index)), shape):
        if not isinstance(i, slice):
            return None
        start, stop, step = i.indices(n)
        if step != 1:
            return None
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def read_exact(f: BinaryIO, offset: int, out: memoryview, file: str, what: str) -> None:
    """Fill ``out`` with the bytes of ``f`` from ``offset`` (several ``readinto`` calls if the OS
    returns less, as Linux does above 2 GiB); CheckpointError naming ``file`` and ``what`` at EOF."""
    f.seek(offset)
    done = 0
    while done < len(out):
        got = f.readinto(out[done:])
        if not got:
            raise CheckpointError(f"{file}: truncated file: {what} read {done} of {len(out)} bytes")
        done += got


def read_region(
    f: BinaryIO, file: str, what: str, offset: int, shape: tuple[int, ...], dtype: np.dtype, index: Index = None,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """``tensor[index]`` of the C-order tensor ``shape``/``dtype`` stored at byte ``offset`` of ``f``.

    Returns ``out`` (a C-contiguous array of the block's shape and ``dtype``, e.g. a reused staging
    buffer) filled, or else a fresh aligned array (:func:`aligned_empty`). A block of whole rows
    (``index`` slices axis 0 only) is one ``readinto``; a block that keeps part of each row reads the
    rows it spans, :data:`CHUNK_BYTES` at a time, and copies the kept part out. Other indexes (ints,
    steps) read the whole tensor and index it.
    """
    shape = tuple(int(n) for n in shape)
    dtype = np.dtype(dtype)
    block = tuple(slice(0, n) for n in shape) if index is None else _unit_slices(index, shape)
    if block is None:
        whole = np.array(read_region(f, file, what, offset, shape, dtype)[index])
        if out is None:
            return whole
        out[...] = whole
        return out
    block_shape = tuple(s.stop - s.start for s in block)
    if out is None:
        out = aligned_empty(block_shape, dtype)
    elif out.shape != block_shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out is {fmt_shape(out.shape)} {out.dtype}, the block {fmt_shape(block_shape)} {dtype}")
    if out.size == 0:
        return out
    if not shape:  # a scalar
        read_exact(f, offset, memoryview(out.reshape(-1).view(np.uint8)), file, what)
        return out
    rows, rest = block[0], block[1:]
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    if all(s.start == 0 and s.stop == n for s, n in zip(rest, shape[1:])):
        read_exact(f, offset + rows.start * row_bytes, memoryview(out.reshape(-1).view(np.uint8)), file, what)
        return out
    per = max(1, CHUNK_BYTES // max(1, row_bytes))
    buf = np.empty((min(per, rows.stop - rows.start),) + shape[1:], dtype)
    for r in range(rows.start, rows.stop, per):
        n = min(per, rows.stop - r)
        read_exact(f, offset + r * row_bytes, memoryview(buf[:n].reshape(-1).view(np.uint8)), file, what)
        out[r - rows.start : r - rows.start + n] = buf[:n][(slice(None),) + rest]
    return out


class Location(NamedTuple):
    """A C-order tensor stored at byte ``offset`` of ``file``."""

    file: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype


def mapped_rows(loc: Location, index: Index = None) -> Optional[np.ndarray]:
    """``tensor[index]`` as a read-only memory map of the file, when the block is whole rows (``index``
    slices axis 0 only, or None) starting on an :data:`ALIGN`-byte boundary; None otherwise.

    The map covers the block alone and goes when the array is dropped, so its file-backed pages leave
    the process with it. On CPU ``jax.device_put`` uses such an array in place: a device computation
    then reads the page cache directly, with no copy into the process.
    """
    shape = tuple(loc.shape)
    block = tuple(slice(0, n) for n in shape) if index is None else _unit_slices(index, shape)
    if not shape or block is None or any(s.start != 0 or s.stop != n for s, n in zip(block[1:], shape[1:])):
        return None
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(loc.dtype).itemsize
    offset = loc.offset + block[0].start * row_bytes
    rows = block[0].stop - block[0].start
    if offset % ALIGN or rows * row_bytes == 0:
        return None
    return np.memmap(loc.file, dtype=loc.dtype, mode="r", offset=offset, shape=(rows,) + shape[1:])


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

    def location(self, name: str) -> Location:
        """Where the tensor's C-order bytes lie in the file."""
        dtype, shape, begin, _ = self._entry(name)
        return Location(self.path, self._data_start + begin, shape, dtype)

    # ------------------------------------------------------------------ reads
    def read(self, name: str) -> np.ndarray:
        """The whole tensor as a NumPy array that owns its memory."""
        return self.read_slice(name, None)

    def read_slice(self, name: str, index: Index, out: Optional[np.ndarray] = None) -> np.ndarray:
        """``tensor[index]`` reading only the rows the slice spans (:func:`read_region`; into ``out`` if given)."""
        dtype, shape, begin, end = self._entry(name)
        what = f"tensor {name!r} {fmt_shape(shape)}"
        return read_region(self._file, self.path, what, self._data_start + begin, shape, dtype, index, out)

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


# Storage classes a state dict's data.pkl names, and the dtypes they hold.
_TORCH_STORAGES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # the 30 bytes before each member's name


class _Storage(NamedTuple):
    key: str
    dtype: np.dtype
    numel: int


class _TensorRecord(NamedTuple):
    """One tensor of a ``.bin`` state dict: ``shape`` / ``strides`` (elements) over storage ``storage``
    from element ``start``; ``offset`` is the absolute byte offset of that storage in the file."""

    storage: _Storage
    start: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int = -1


def _rebuild_tensor(storage: _Storage, start: int, size: Any, stride: Any, *args: Any) -> _TensorRecord:
    return _TensorRecord(storage, int(start), tuple(int(n) for n in size), tuple(int(n) for n in stride))


def _rebuild_parameter(data: _TensorRecord, *args: Any) -> _TensorRecord:
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a ``.bin``'s ``data.pkl`` into :class:`_TensorRecord` s; refuses every other global."""

    _GLOBALS = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[(module, name)]
        if module == "torch" and name in _TORCH_STORAGES:
            return _TORCH_STORAGES[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a state dict of tensors")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], np.dtype)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return _Storage(str(pid[2]), pid[1], int(pid[4]))


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


class TorchBinFile:
    """One ``pytorch_model*.bin`` file, read without ``torch``: a zip archive of ``data.pkl`` (the
    state dict, unpickled by a restricted unpickler into storage keys, offsets, shapes and strides)
    and one stored (uncompressed) member per storage, read at its byte offset (:func:`read_region`).

    The archive's layout is checked at open: every storage member present, uncompressed, as large as
    the pickle says and inside the file, so a truncated file fails before anything is read. A file in
    the pre-1.6, non-zip format is loaded whole with ``torch.load`` (which then must be installed).
    """

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: file does not exist")
        self._file: Optional[BinaryIO] = None
        self._legacy: Optional[dict[str, np.ndarray]] = None
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if zipfile.is_zipfile(self.path):
            self._records = self._index_zip()
        elif magic == b"PK\x03\x04":
            size = os.path.getsize(self.path)
            raise CheckpointError(
                f"{self.path}: truncated or corrupt PyTorch checkpoint: a zip archive of {size} bytes with no "
                "readable central directory at its end"
            )
        else:
            self._legacy = self._load_legacy()
            self._records = {}

    # ------------------------------------------------------------------ opening
    def _index_zip(self) -> dict[str, _TensorRecord]:
        size = os.path.getsize(self.path)
        try:
            with zipfile.ZipFile(self.path) as z:
                members = {info.filename: info for info in z.infolist()}
                pickles = [n for n in members if n == "data.pkl" or n.endswith("/data.pkl")]
                if len(pickles) != 1:
                    raise CheckpointError(f"{self.path}: not a PyTorch checkpoint (zip without one data.pkl)")
                prefix = pickles[0][: -len("data.pkl")]
                if prefix + "byteorder" in members and z.read(prefix + "byteorder").strip() != b"little":
                    raise CheckpointError(f"{self.path}: big-endian PyTorch checkpoint; only little-endian is read")
                state = _StateDictUnpickler(stdio.BytesIO(z.read(pickles[0]))).load()
        except CheckpointError:
            raise
        except Exception as e:  # BadZipFile, UnpicklingError, EOFError, ...
            raise CheckpointError(f"{self.path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, _TensorRecord) for v in state.values()):
            raise CheckpointError(f"{self.path}: expected a flat dict of tensors (a state dict)")
        offsets: dict[str, int] = {}
        with open(self.path, "rb") as f:
            for name, record in state.items():
                key = record.storage.key
                if key not in offsets:
                    info = members.get(f"{prefix}data/{key}")
                    if info is None:
                        raise CheckpointError(f"{self.path}: tensor {name!r}: storage member data/{key} is missing")
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise CheckpointError(f"{self.path}: storage data/{key} is compressed; PyTorch stores them raw")
                    f.seek(info.header_offset)
                    header = f.read(_ZIP_LOCAL_HEADER.size)
                    if len(header) != _ZIP_LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                        raise CheckpointError(f"{self.path}: corrupt zip entry for storage data/{key}")
                    fields = _ZIP_LOCAL_HEADER.unpack(header)
                    offset = info.header_offset + _ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1]
                    want = record.storage.numel * record.storage.dtype.itemsize
                    if info.file_size != want:
                        raise CheckpointError(
                            f"{self.path}: storage data/{key} of tensor {name!r} holds {info.file_size} bytes, "
                            f"the pickle says {record.storage.numel} x {record.storage.dtype}"
                        )
                    if offset + want > size:
                        raise CheckpointError(
                            f"{self.path}: truncated file: tensor {name!r} {fmt_shape(record.shape)} needs bytes "
                            f"{offset}..{offset + want} but the file holds only {size}"
                        )
                    offsets[key] = offset
                extent = record.start + sum((n - 1) * st for n, st in zip(record.shape, record.strides)) + 1
                if any(n == 0 for n in record.shape):
                    extent = 0
                if record.start < 0 or extent > record.storage.numel or any(st < 0 for st in record.strides):
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} {fmt_shape(record.shape)} does not fit its storage data/{key} "
                        f"of {record.storage.numel} elements"
                    )
                state[name] = record._replace(offset=offsets[key])
        return dict(state)

    def _load_legacy(self) -> dict[str, np.ndarray]:
        torch = _torch()
        try:
            state = torch.load(self.path, weights_only=True, map_location="cpu")
        except Exception as e:  # RuntimeError, EOFError, UnpicklingError...
            raise CheckpointError(f"{self.path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{self.path}: expected a flat dict of tensors (a state dict)")
        return {name: torch_to_numpy(t.contiguous()) for name, t in state.items()}

    # ------------------------------------------------------------------ queries
    def keys(self) -> list[str]:
        return list(self._legacy if self._legacy is not None else self._records)

    def __contains__(self, name: str) -> bool:
        return name in (self._legacy if self._legacy is not None else self._records)

    def _record(self, name: str) -> _TensorRecord:
        try:
            return self._records[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        if self._legacy is not None:
            return tuple(self._legacy_array(name).shape)
        return self._record(name).shape

    def dtype(self, name: str) -> np.dtype:
        if self._legacy is not None:
            return self._legacy_array(name).dtype
        return self._record(name).storage.dtype

    def _legacy_array(self, name: str) -> np.ndarray:
        assert self._legacy is not None
        try:
            return self._legacy[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    # ------------------------------------------------------------------ reads
    def read(self, name: str) -> np.ndarray:
        """The whole tensor as a NumPy array that owns its memory."""
        return self.read_slice(name, None)

    def read_slice(self, name: str, index: Index, out: Optional[np.ndarray] = None) -> np.ndarray:
        """``tensor[index]``, reading only the rows the slice spans (into ``out`` if given; a tensor
        stored with other strides than C order, which ``state_dict()`` never saves, is read whole and indexed)."""
        if self._legacy is not None or self._record(name).strides != _c_strides(self._record(name).shape):
            if self._legacy is not None:
                array = self._legacy_array(name)
            else:
                array = self._strided(name)
            block = np.array(array if index is None else array[index])
            if out is None:
                return block
            out[...] = block
            return out
        record = self._record(name)
        dtype = record.storage.dtype
        what = f"tensor {name!r} {fmt_shape(record.shape)}"
        offset = record.offset + record.start * dtype.itemsize
        return read_region(self._open(), self.path, what, offset, record.shape, dtype, index, out)

    def location(self, name: str) -> Optional[Location]:
        """Where the tensor's bytes lie, for a C-order tensor of a zip checkpoint (else None)."""
        if self._legacy is not None:
            return None
        record = self._record(name)
        if record.strides != _c_strides(record.shape):
            return None
        dtype = record.storage.dtype
        return Location(self.path, record.offset + record.start * dtype.itemsize, record.shape, dtype)

    def _open(self) -> BinaryIO:
        if self._file is None:
            self._file = open(self.path, "rb")
        return self._file

    def _strided(self, name: str) -> np.ndarray:
        record = self._record(name)
        dtype = record.storage.dtype
        span = record.storage.numel - record.start
        what = f"tensor {name!r} {fmt_shape(record.shape)}"
        flat = read_region(self._open(), self.path, what, record.offset + record.start * dtype.itemsize, (span,), dtype)
        return np.lib.stride_tricks.as_strided(
            flat, record.shape, tuple(st * dtype.itemsize for st in record.strides), writeable=False
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

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

    def read_slice(self, name: str, index: Index, out: Optional[np.ndarray] = None) -> np.ndarray:
        """``tensor[index]`` (file layout), reading only the rows the slice spans; into ``out`` if given."""
        return self._handle(self.file_of(name)).read_slice(self.target(name), index, out)

    def location(self, name: str) -> Optional[Location]:
        """Where tensor ``name``'s C-order bytes lie (None for a ``.bin`` tensor stored otherwise)."""
        return self._handle(self.file_of(name)).location(self.target(name))

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


def write_index(path: str, files: dict[str, str], total_size: int) -> None:
    """A sharded checkpoint's index (``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``, keys
    sorted, indent 2, as transformers writes it) at ``path``, via a temp sibling."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(files.items()))}, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


class PlannedWriter:
    """What the streaming writers share: a plan of ``(name, shape, dtype)`` checked on every write, one
    ``FILE.tmp`` handle per output file (``self.files``), renamed into place by :meth:`_finish` once every
    planned tensor is written, or deleted by :meth:`abort`."""

    def _start(self, directory: PathLike, plan: TensorPlan) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        """Set up the plan, the directory and empty handle lists; returns the plan normalised."""
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        norm = [(name, tuple(int(s) for s in shape), np.dtype(dtype)) for name, shape, dtype in plan]
        self._plan = {name: (shape, dtype) for name, shape, dtype in norm}
        if len(self._plan) != len(norm):
            raise ValueError("duplicate tensor names in the write plan")
        self.files: list[str] = []
        self._handles: list[Any] = []
        self._written: set[str] = set()
        self.total_size = 0
        return norm

    def _checked(self, name: str, array: np.ndarray) -> np.ndarray:
        """``array`` as C-contiguous bytes-ready data, after checking it is the planned shape and dtype."""
        if name not in self._plan:
            raise ValueError(f"tensor {name!r} is not in the write plan")
        shape, dtype = self._plan[name]
        if tuple(array.shape) != shape or array.dtype != dtype:
            raise ValueError(
                f"tensor {name!r}: planned {fmt_shape(shape)} {dtype}, got {fmt_shape(array.shape)} {array.dtype}"
            )
        return np.ascontiguousarray(array)

    def _done(self, name: str) -> None:
        """Mark ``name`` written, once its bytes are (``close`` checks every planned tensor is)."""
        self._written.add(name)

    def _finish(self) -> None:
        """Check every planned tensor was written, then close the handles and rename the files into place."""
        missing = [name for name in self._plan if name not in self._written]
        if missing:
            self.abort()
            raise ValueError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]!r}")
        for handle, file in zip(self._handles, self.files):
            handle.close()
            os.replace(file + ".tmp", file)
        self._handles = []

    def abort(self) -> None:
        """Close and delete the partial files."""
        for handle in self._handles:
            handle.close()
        for file in self.files:
            if os.path.exists(file + ".tmp"):
                os.remove(file + ".tmp")
        self._handles = []


class SafetensorsWriter(PlannedWriter):
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
        plan = self._start(directory, plan)
        shards = plan_shards(plan, parse_size(max_shard_size))
        names = shard_names("model", "safetensors", len(shards))
        self.files = [os.path.join(self.directory, n) for n in names]
        self._where: dict[str, tuple[int, int]] = {}  # name -> (file index, absolute offset)
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
            # Spaces pad the header (the format allows any): the data starts on a 64-byte boundary, so
            # tensors whose sizes are multiples of 64 bytes (every GPT-J weight) stay aligned and a
            # loader can map them straight into a device buffer (io.mapped_rows).
            blob += b" " * (-(8 + len(blob)) % ALIGN)
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
        array = self._checked(name, array)
        k, offset = self._where[name]
        handle = self._handles[k]
        handle.seek(offset)
        handle.write(memoryview(array.reshape(-1).view(np.uint8)))
        self._done(name)

    def close(self) -> list[str]:
        """Check every planned tensor was written, rename the files into place, write the index."""
        self._finish()
        if len(self.files) > 1:
            weight_map = {name: os.path.basename(self.files[k]) for name, (k, _) in self._where.items()}
            write_index(os.path.join(self.directory, SAFE_INDEX), weight_map, self.total_size)
            return self.files + [os.path.join(self.directory, SAFE_INDEX)]
        return list(self.files)


class TorchBinWriter(PlannedWriter):
    """Write a planned set of tensors to ``pytorch_model.bin`` or shards + ``pytorch_model.bin.index.json``.

    ``torch.save`` needs a whole shard, so one shard (at most ``max_shard_size`` bytes) is held until
    its last tensor arrives; feed tensors in plan order to keep it at one. Each shard is saved to a
    ``.tmp`` sibling and renamed as soon as it is complete.
    """

    def __init__(self, directory: PathLike, plan: TensorPlan, max_shard_size: Union[int, str] = "5GB"):
        _torch()
        plan = self._start(directory, plan)
        shards = plan_shards(plan, parse_size(max_shard_size))
        self.files = [os.path.join(self.directory, n) for n in shard_names("pytorch_model", "bin", len(shards))]
        self._shard_of = {plan[i][0]: k for k, indices in enumerate(shards) for i in indices}
        self._remaining = [len(indices) for indices in shards]
        self._pending: list[dict[str, Any]] = [{} for _ in shards]
        self.total_size = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for s, d in self._plan.values())

    def write(self, name: str, array: np.ndarray) -> None:
        """Write one tensor (held until its shard is complete); its shape and dtype must match the plan."""
        torch = _torch()
        array = self._checked(name, array)
        k = self._shard_of[name]
        self._pending[k][name] = numpy_to_torch(np.array(array))
        self._done(name)
        self._remaining[k] -= 1
        if self._remaining[k] == 0:
            tmp = self.files[k] + ".tmp"
            torch.save(self._pending[k], tmp)
            os.replace(tmp, self.files[k])
            self._pending[k] = {}

    def close(self) -> list[str]:
        """Check every planned tensor was written (all shards saved) and write the index."""
        missing = [name for name in self._plan if name not in self._written]
        if missing:
            raise ValueError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]!r}")
        if len(self.files) > 1:
            weight_map = {name: os.path.basename(self.files[k]) for name, k in self._shard_of.items()}
            write_index(os.path.join(self.directory, BIN_INDEX), weight_map, self.total_size)
            return self.files + [os.path.join(self.directory, BIN_INDEX)]
        return list(self.files)

    def abort(self) -> None:
        """Drop the shards still held in memory (shards already saved are complete files)."""
        self._pending = [{} for _ in self._pending]


def remove_weight_files(directory: PathLike, keep: Sequence[str] = ()) -> None:
    """Delete HF weight files (``model*.safetensors``, ``pytorch_model*.bin``, their indexes) not in ``keep``."""
    directory = os.fspath(directory)
    keep_names = {os.path.basename(k) for k in keep}
    pattern = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|pytorch_model(-\d{5}-of-\d{5})?\.bin)(\.index\.json)?$")
    for name in os.listdir(directory):
        if pattern.match(name) and name not in keep_names:
            os.remove(os.path.join(directory, name))

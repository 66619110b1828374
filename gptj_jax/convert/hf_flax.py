"""Hugging Face Flax GPT-J checkpoints (``flax_model.msgpack``): a streaming reader and writer.

Transformers 4.x ``FlaxGPTJForCausalLM.save_pretrained`` wrote ``flax_model.msgpack`` (or
``flax_model-0000k-of-0000n.msgpack`` shards, each a nested dict of its own params, plus
``flax_model.msgpack.index.json`` = ``{"metadata": {"total_size": BYTES}, "weight_map": {key: shard}}``)
with ``flax.serialization.to_bytes``: one msgpack map of nested maps with string keys, each array an
ExtType 1 whose payload is itself msgpack of ``(shape list, dtype name, raw C-order bytes)``, each
array larger than :data:`MAX_CHUNK_SIZE` bytes a map ``{"__msgpack_chunked_array__": True, "shape":
{"0": d0, ...}, "chunks": {"0": flat array, ...}}``. Transformers v5 dropped Flax; this module reads
and writes the format without it (and without flax).

The param tree (kernels ``[in, out]``, as ours, so no tensor is transposed)::

    transformer/wte/embedding              [V, D]   <->  transformer/wte/embedding
    transformer/h/{i}/attn/q_proj/kernel   [D, D]   <->  transformer/h_{i}/attn/q_proj/kernel
    ...                                                  (every row of table.rows, ``h/{i}`` <-> ``h_{i}``)
    lm_head/kernel, lm_head/bias           [D, V], [V]

A base model (``FlaxGPTJModel``) saves the same tree without ``transformer/`` and ``lm_head``. As in
Transformers 4.x, a file with or without the ``transformer/`` prefix reads as either head.

Why a hand-written msgpack walker: ``msgpack.Unpacker`` hands each ExtType over as one ``bytes``
object (its read buffer holds the payload, then the ``bytes`` copy, then NumPy's array: two or three
copies of the biggest tensor, 826 MB each for GPT-J-6B's ``wte`` in float32), and
``flax.serialization.msgpack_restore`` needs the whole file in memory. :func:`scan` instead parses
only the headers of the restricted subset flax writes (maps, string keys, ExtType 1 / 3 arrays,
chunked-array maps, small scalars) and *seeks* over every payload, recording each tensor's file,
byte offset(s), shape and dtype. :class:`HFFlaxReader` then reads one tensor with ``readinto`` at its
offset (one copy, owned by the caller) or a block of it through a temporary ``np.memmap`` that is
unmapped right after, so mapped pages do not pile up. A truncated file, a corrupt header or a
tensor whose byte count disagrees with its shape fails in the index pass, before any tensor is read.

:class:`HFFlaxWriter` writes the same bytes ``flax.serialization.to_bytes`` would for the nested tree:
every header's size is known from the plan (map sizes are key counts, ExtType and bin lengths follow
from shapes), so all headers are laid out up front and each tensor is written at its offsets as it
arrives, in any order, and no shard is held in memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import ml_dtypes
import numpy as np

from gptj_jax.config import GPTJConfig
from gptj_jax.convert import table
from gptj_jax.convert.errors import CheckpointError
from gptj_jax.convert.io import Index, PlannedWriter, parse_size, plan_shards, shard_names, write_index
from gptj_jax.convert.table import fmt_shape

PathLike = Union[str, os.PathLike]

FLAX_SINGLE = "flax_model.msgpack"
FLAX_INDEX = "flax_model.msgpack.index.json"
# flax.serialization.MAX_CHUNK_SIZE: arrays above this many bytes are stored as chunked maps.
MAX_CHUNK_SIZE = 2**30
CHUNKED = "__msgpack_chunked_array__"
HEADS = ("causal_lm", "base")  # Transformers 4.x had FlaxGPTJModel and FlaxGPTJForCausalLM only
PREFIX = "transformer/"

# ====================================================================================== the table
# (our path template, HF-Flax key template), derived from table.rows: the same rows, with the
# layer index as a path component (``h/{i}``) instead of our module name ``h_{i}``.
ROWS: tuple[tuple[str, str], ...] = tuple(
    (ours, ours.replace("h_{i}/", "h/{i}/")) for ours, _, _ in table.rows("causal_lm") + table.rows("base")
)


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + r"(\d+)".join(re.escape(p) for p in template.split("{i}")) + "$")


_MATCHERS = [(_compile(ours), _compile(key), ours, key) for ours, key in ROWS]


def flax_key(path: str) -> str:
    """Our ``/``-joined param path -> its HF-Flax key (``transformer/h_3/attn/q_proj/kernel`` ->
    ``transformer/h/3/attn/q_proj/kernel``). Raises KeyError for a path no row matches."""
    for ours_re, _, _, key in _MATCHERS:
        m = ours_re.match(path)
        if m:
            return key.replace("{i}", m.group(1)) if m.groups() else key
    raise KeyError(f"{path!r} is not a GPT-J parameter path of an HF Flax checkpoint")


def our_path(key: str) -> str:
    """An HF-Flax key -> our param path; the inverse of :func:`flax_key` (KeyError if no row matches)."""
    for _, key_re, ours, _ in _MATCHERS:
        m = key_re.match(key)
        if m:
            return ours.replace("{i}", m.group(1)) if m.groups() else ours
    raise KeyError(f"{key!r} is not a GPT-J tensor key of an HF Flax checkpoint")


# ====================================================================================== msgpack index pass
@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one array lies in a msgpack file.

    ``spans`` are ``(byte offset, byte count)`` of the raw C-order bytes: one for a plain array, one
    per chunk (in order: their concatenation is the flat array) for a chunked one.
    """

    file: str
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    spans: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def chunked(self) -> bool:
        return len(self.spans) != 1


class _Value:
    """A non-array msgpack value in the tree (kept only to name it in an error)."""

    def __init__(self, kind: str):
        self.kind = kind


def _dtype_of(name: str) -> Optional[np.dtype]:
    """The NumPy dtype flax wrote as ``arr.dtype.name`` (``bfloat16`` / float8 via ml_dtypes), or None."""
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError):
        return None
    if dtype.kind in "biufc" or (dtype.kind == "V" and hasattr(ml_dtypes, name) and dtype.names is None):
        return dtype if dtype.itemsize > 0 else None
    return None


class _Walker:
    """Parses the headers of one flax msgpack file, seeking over array payloads (see the module doc)."""

    MAX_DEPTH = 64
    MAX_STR = 1 << 16

    def __init__(self, path: str):
        self.path = path
        try:
            self.f = open(path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file does not exist") from None
        self.size = os.fstat(self.f.fileno()).st_size
        self.where = "the top-level map"

    # ---------------------------------------------------------------- primitives
    def _err(self, what: str, pos: int) -> CheckpointError:
        return CheckpointError(f"{self.path}: corrupt msgpack header at byte {pos} in {self.where}: {what}")

    def _truncated(self) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: truncated file: it ends at byte {self.size} inside the msgpack header of {self.where}"
        )

    def _take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise self._truncated()
        return data

    def _uint(self, n: int) -> int:
        return int.from_bytes(self._take(n), "big")

    def _length(self, marker: int, small: tuple[int, int, int]) -> int:
        """Length following a (8, 16, 32)-bit marker triple."""
        return self._uint({small[0]: 1, small[1]: 2, small[2]: 4}[marker])

    def _int(self) -> tuple[bool, int]:
        """An integer value (any msgpack int format); ``(False, type byte)`` if it is not one."""
        b = self._take(1)[0]
        if b <= 0x7F:
            return True, b
        if b >= 0xE0:
            return True, b - 0x100
        if 0xCC <= b <= 0xCF:
            return True, self._uint(1 << (b - 0xCC))
        if 0xD0 <= b <= 0xD3:
            n = 1 << (b - 0xD0)
            return True, int.from_bytes(self._take(n), "big", signed=True)
        return False, b

    def _text(self, n: int, pos: int) -> str:
        if n > self.MAX_STR:
            raise self._err(f"a string of {n} bytes", pos)
        try:
            return self._take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise self._err("a string that is not UTF-8", pos) from None

    # ---------------------------------------------------------------- values
    def value(self, path: str, depth: int) -> Any:
        """Parse one value at key path ``path``: a dict (map), a TensorEntry, a scalar or a _Value."""
        pos = self.f.tell()
        b = self._take(1)[0]
        if b <= 0x7F or b >= 0xE0:
            return b if b <= 0x7F else b - 0x100
        if 0x80 <= b <= 0x8F:
            return self._map(b & 0x0F, path, depth)
        if b in (0xDE, 0xDF):
            return self._map(self._uint(2 if b == 0xDE else 4), path, depth)
        if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
            n = b & 0x0F if b <= 0x9F else self._uint(2 if b == 0xDC else 4)
            return self._array(n, path, depth, pos)
        if 0xA0 <= b <= 0xBF or b in (0xD9, 0xDA, 0xDB):
            n = b & 0x1F if b <= 0xBF else self._length(b, (0xD9, 0xDA, 0xDB))
            return self._text(n, pos)
        if b in (0xC0, 0xC2, 0xC3):
            return {0xC0: None, 0xC2: False, 0xC3: True}[b]
        if b in (0xCA, 0xCB):
            return struct.unpack(">f" if b == 0xCA else ">d", self._take(4 if b == 0xCA else 8))[0]
        if 0xCC <= b <= 0xD3:
            self.f.seek(pos)
            return self._int()[1]
        if b in (0xC4, 0xC5, 0xC6):  # raw bytes at tree level: no array; skip over them
            n = self._length(b, (0xC4, 0xC5, 0xC6))
            if self.f.tell() + n > self.size:
                raise self._truncated()
            self.f.seek(n, 1)
            return _Value(f"raw bytes value ({n} bytes)")
        if 0xD4 <= b <= 0xD8 or b in (0xC7, 0xC8, 0xC9):
            n = 1 << (b - 0xD4) if b >= 0xD4 else self._length(b, (0xC7, 0xC8, 0xC9))
            code = self._take(1)[0]
            return self._ext(n, code, path, pos)
        raise self._err(f"unknown msgpack type byte 0x{b:02x}", pos)

    def _map(self, n: int, path: str, depth: int) -> Any:
        if depth > self.MAX_DEPTH:
            raise self._err(f"maps nested deeper than {self.MAX_DEPTH}", self.f.tell())
        out: dict[str, Any] = {}
        for _ in range(n):
            self.where = f"the keys of {path!r}" if path else "the top-level map"
            pos = self.f.tell()
            key = self.value(path, depth + 1)
            if isinstance(key, int) and not isinstance(key, bool):
                key = str(key)  # msgpack_restore accepts int keys (strict_map_key=False)
            if not isinstance(key, str):
                raise self._err(f"a map key of type {type(key).__name__}, expected a string", pos)
            if key in out:
                raise self._err(f"duplicate key {key!r}", pos)
            child = f"{path}/{key}" if path else key
            self.where = repr(child)
            out[key] = self.value(child, depth + 1)
        if CHUNKED in out:
            return self._unchunk(out, path)
        return out

    def _array(self, n: int, path: str, depth: int, pos: int) -> Any:
        if depth > self.MAX_DEPTH:
            raise self._err(f"arrays nested deeper than {self.MAX_DEPTH}", pos)
        if n > self.MAX_STR:
            raise self._err(f"a msgpack array of {n} elements where a tensor was expected", pos)
        items = [self.value(f"{path}/{k}", depth + 1) for k in range(n)]
        if any(isinstance(i, (dict, TensorEntry)) for i in items):
            raise self._err("a msgpack array of maps or arrays (flax writes lists as maps)", pos)
        return _Value(f"msgpack array of {n} elements")

    def _ext(self, n: int, code: int, path: str, pos: int) -> Any:
        start = self.f.tell()
        end = start + n
        if code == 2:  # a complex scalar: msgpack of (real, imag)
            if n > 32:
                raise self._err(f"a complex scalar of {n} bytes", pos)
            self._take(n)
            return _Value("complex scalar")
        if code not in (1, 3):
            raise self._err(f"unknown ExtType code {code} (flax writes 1: array, 2: complex, 3: scalar)", pos)
        head = self._take(1)[0]
        if head != 0x93:
            raise self._err(f"array payload starts with 0x{head:02x}, expected 0x93 (shape, dtype, bytes)", start)
        b = self._take(1)[0]
        if 0x90 <= b <= 0x9F:
            ndim = b & 0x0F
        elif b in (0xDC, 0xDD):
            ndim = self._uint(2 if b == 0xDC else 4)
        else:
            raise self._err(f"array shape is msgpack type 0x{b:02x}, expected an array of ints", start + 1)
        if ndim > 32:
            raise self._err(f"array of {ndim} dimensions", start + 1)
        shape = []
        for _ in range(ndim):
            at = self.f.tell()
            ok, d = self._int()
            if not ok or d < 0:
                raise self._err("array shape holds something other than a non-negative int", at)
            shape.append(d)
        at = self.f.tell()
        b = self._take(1)[0]
        if 0xA0 <= b <= 0xBF:
            name = self._text(b & 0x1F, at)
        elif b in (0xD9, 0xC4):
            name = self._text(self._uint(1), at)
        else:
            raise self._err(f"array dtype name is msgpack type 0x{b:02x}, expected a string", at)
        dtype = _dtype_of(name)
        if dtype is None:
            raise self._err(f"unsupported array dtype {name!r}", at)
        at = self.f.tell()
        b = self._take(1)[0]
        if b not in (0xC4, 0xC5, 0xC6):
            raise self._err(f"array data is msgpack type 0x{b:02x}, expected bin", at)
        length = self._length(b, (0xC4, 0xC5, 0xC6))
        data = self.f.tell()
        if data + length != end:
            raise self._err(f"ExtType length {n} disagrees with its contents ({data - start} header + {length} data bytes)", pos)
        want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if length != want:
            raise CheckpointError(
                f"{self.path}: tensor {path!r}: header gives {length} bytes for shape {fmt_shape(shape)} {dtype.name}, "
                f"which needs {want}"
            )
        if end > self.size:
            raise CheckpointError(
                f"{self.path}: truncated file: tensor {path!r} {fmt_shape(shape)} {dtype.name} needs bytes "
                f"{data}..{end} but the file has {self.size}"
            )
        self.f.seek(end)
        return TensorEntry(self.path, path, tuple(shape), dtype, ((data, length),))

    def _unchunk(self, node: dict[str, Any], path: str) -> TensorEntry:
        def fail(what: str) -> CheckpointError:
            return CheckpointError(f"{self.path}: chunked array {path!r}: {what}")

        shape_d, chunks_d = node.get("shape"), node.get("chunks")
        if set(node) != {CHUNKED, "shape", "chunks"} or not isinstance(shape_d, dict) or not isinstance(chunks_d, dict):
            raise fail(f"expected the keys {CHUNKED!r}, 'shape' and 'chunks' (maps), found {sorted(node)}")
        try:
            shape = tuple(shape_d[str(i)] for i in range(len(shape_d)))
            chunks = [chunks_d[str(i)] for i in range(len(chunks_d))]
        except KeyError as e:
            raise fail(f"'shape' / 'chunks' keys are not 0..n-1 (missing {e})") from None
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise fail(f"shape {shape} holds something other than non-negative ints")
        if not chunks or not all(isinstance(c, TensorEntry) and len(c.shape) == 1 for c in chunks):
            raise fail("its chunks are not 1-D arrays")
        dtypes = {c.dtype for c in chunks}
        if len(dtypes) != 1:
            raise fail(f"chunks of different dtypes {sorted(d.name for d in dtypes)}")
        dtype = chunks[0].dtype
        have, want = sum(c.shape[0] for c in chunks), int(np.prod(shape, dtype=np.int64))
        if have != want:
            raise fail(f"chunks hold {have} elements but shape {fmt_shape(shape)} needs {want}")
        return TensorEntry(self.path, path, shape, dtype, tuple(c.spans[0] for c in chunks))

    # ---------------------------------------------------------------- file
    def scan(self) -> dict[str, TensorEntry]:
        try:
            if self.size == 0:
                raise CheckpointError(f"{self.path}: empty file, expected a msgpack map")
            first = self.f.read(1)[0]
            self.f.seek(0)
            if not (0x80 <= first <= 0x8F or first in (0xDE, 0xDF)):
                raise self._err(f"the file starts with 0x{first:02x}, expected a msgpack map", 0)
            tree = self.value("", 0)
            self.where = "the end of the file"
            end = self.f.tell()
            if end != self.size:
                raise self._err(f"{self.size - end} bytes of trailing data after the top-level map", end)
        finally:
            self.f.close()
        out: dict[str, TensorEntry] = {}
        self._leaves(tree, "", out)
        return out

    def _leaves(self, node: Any, prefix: str, out: dict[str, TensorEntry]) -> None:
        if isinstance(node, TensorEntry):
            out[node.key] = node
            return
        if not isinstance(node, dict):
            kind = node.kind if isinstance(node, _Value) else f"{type(node).__name__} value {node!r}"
            raise CheckpointError(f"{self.path}: {prefix!r} holds a {kind}, not an array")
        for key, child in node.items():
            self._leaves(child, f"{prefix}/{key}" if prefix else key, out)


def scan(path: PathLike) -> dict[str, TensorEntry]:
    """Index one flax msgpack file: ``{"/"-joined key path: TensorEntry}`` in file order.

    Reads headers only (a few bytes per tensor) and seeks over the data. Raises CheckpointError naming
    the file and the key for a truncated file, a corrupt header, a non-array leaf, or an array whose
    byte count disagrees with its shape and dtype.
    """
    return _Walker(os.fspath(path)).scan()


# ====================================================================================== directories
def has_hf_flax_weights(directory: PathLike) -> bool:
    """True when ``directory`` holds ``flax_model.msgpack`` or ``flax_model.msgpack.index.json``."""
    directory = os.fspath(directory)
    return any(os.path.isfile(os.path.join(directory, f)) for f in (FLAX_SINGLE, FLAX_INDEX))


def find_flax_files(directory: PathLike) -> tuple[Optional[str], dict[str, list[str]]]:
    """``(index file or None, {msgpack file: [keys the index lists for it]})`` of an HF Flax directory.

    ``flax_model.msgpack`` wins over an index (as in Transformers 4.x); for it the key list is empty.
    Raises CheckpointError when there is neither, or the index is malformed or lists a missing shard.
    """
    directory = os.fspath(directory)
    single = os.path.join(directory, FLAX_SINGLE)
    if os.path.isfile(single):
        return None, {single: []}
    index_path = os.path.join(directory, FLAX_INDEX)
    if not os.path.isfile(index_path):
        raise CheckpointError(f"{directory}: no HF Flax weights; expected {FLAX_SINGLE} or {FLAX_INDEX}")
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            files.setdefault(os.path.join(directory, file), []).append(key)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: not a valid index file ({type(e).__name__}: {e})") from None
    for file, keys in files.items():
        if not os.path.isfile(file):
            raise CheckpointError(
                f"{index_path}: lists shard {os.path.basename(file)} (holding {len(keys)} tensors, e.g. {keys[0]!r}) "
                f"but {file} does not exist"
            )
    return index_path, files


def _read_exact(f: Any, offset: int, out: memoryview, file: str, key: str) -> None:
    f.seek(offset)
    done = 0
    while done < len(out):
        got = f.readinto(out[done:])
        if not got:
            raise CheckpointError(f"{file}: truncated file: tensor {key!r} read {done} of {len(out)} bytes at byte {offset}")
        done += got


class HFFlaxReader:
    """Every tensor of an HF Flax checkpoint (single ``flax_model.msgpack`` or sharded), by *our* param path.

    ``path`` is the directory (its ``config.json`` unless ``config`` is given) or a ``.msgpack`` file.
    ``head`` is ``"causal_lm"`` or ``"base"`` (None: ``causal_lm`` when the file has ``lm_head`` or the
    ``transformer/`` prefix, else ``base``). As in Transformers 4.x, a file without the ``transformer/``
    prefix reads as a causal LM's ``transformer/...`` params, and ``head="base"`` on a file with the
    prefix reads the ``transformer/`` subtree and ignores the rest (:attr:`ignored`). Opening runs the
    index pass over every file (:func:`scan`) and checks the tensors against ``config``
    (:func:`table.check_tree`: missing, unexpected and misshapen tensors, naming the file, the key and
    both shapes), so every error is raised before a tensor is read.

    Tied embeddings (``config.tie_word_embeddings``, causal LM): a missing ``lm_head/kernel`` [D, V]
    reads as ``wte`` [V, D] transposed, a missing ``wte`` as ``lm_head/kernel`` transposed (as the HF
    readers do); both present read as stored.

    Arrays come back in our layout and the stored dtype (bfloat16 as ``ml_dtypes.bfloat16``), each a
    fresh NumPy array the caller owns. At most one file handle is open at a time.
    """

    def __init__(self, path: PathLike, config: Optional[GPTJConfig] = None, head: Optional[str] = None):
        path = os.path.abspath(os.fspath(path))
        if os.path.isfile(path):
            self.directory = os.path.dirname(path)
            self.index_file, listed = None, {path: []}
        else:
            self.directory = path
            self.index_file, listed = find_flax_files(path)
        self.path = path
        self.files = list(listed)
        if config is None:
            config = GPTJConfig.from_pretrained(self.directory)
        self.config = config
        entries: dict[str, TensorEntry] = {}
        for file, keys in listed.items():
            found = scan(file)
            if self.index_file is not None:
                missing = [k for k in keys if k not in found]
                if missing:
                    raise CheckpointError(
                        f"{file}: tensor {missing[0]!r} is listed for this shard in {self.index_file} but is not in it"
                    )
                listed_keys = set(keys)
                unlisted = [k for k in found if k not in listed_keys]
                if unlisted:
                    raise CheckpointError(f"{file}: holds tensor {unlisted[0]!r} which {self.index_file} does not list")
            for key, entry in found.items():
                if key in entries:
                    raise CheckpointError(f"{file}: tensor {key!r} is also in {entries[key].file}")
                entries[key] = entry
        where = self.index_file or self.files[0]
        tops = {key.split("/", 1)[0] for key in entries}
        self.prefixed = "transformer" in tops
        if head is None:
            others = sorted(t for t in tops if t in ("score", "qa_outputs"))
            if others:
                raise CheckpointError(
                    f"{where}: holds {others[0]}/ tensors of a head Transformers' Flax GPT-J never had; "
                    "HF Flax checkpoints hold FlaxGPTJModel or FlaxGPTJForCausalLM params"
                )
            head = "causal_lm" if "lm_head" in tops or self.prefixed else "base"
        if head not in HEADS:
            raise CheckpointError(
                f"{where}: head {head!r} cannot be read from an HF Flax checkpoint; Transformers' Flax GPT-J "
                f"had {list(HEADS)} only"
            )
        self.head = head
        self.ignored: list[str] = []
        if head == "base" and self.prefixed:
            self.ignored = [k for k in entries if not k.startswith(PREFIX)]
            entries = {k: e for k, e in entries.items() if k.startswith(PREFIX)}
        expected_paths = table.expected_param_shapes(config, head)
        key_of = {p: self._file_key(p) for p in expected_paths}
        found_shapes: dict[str, tuple[int, ...]] = {k: e.shape for k, e in entries.items()}
        self._tied: dict[str, str] = {}
        if config.tie_word_embeddings and head == "causal_lm":
            pair = ("lm_head/kernel", "transformer/wte/embedding")
            for missing, present in (pair, pair[::-1]):
                if key_of[missing] not in entries and key_of[present] in entries:
                    self._tied[missing] = present
                    found_shapes[key_of[missing]] = entries[key_of[present]].shape[::-1]
        table.check_tree(
            found_shapes,
            {key_of[p]: shape for p, shape in expected_paths.items()},
            where=where,
            model=table.describe(config, head),
            locate=lambda k: entries[k].file if k in entries else where,
        )
        self._key_of = key_of
        self._entries = {p: entries[k] for p, k in key_of.items() if p not in self._tied}
        order = {file: i for i, file in enumerate(self.files)}
        stored = sorted(self._entries, key=lambda p: (order[self._entries[p].file], self._entries[p].spans[0][0]))
        self.paths: list[str] = stored + list(self._tied)
        self._file: Optional[Any] = None
        self._file_path: Optional[str] = None

    def _file_key(self, path: str) -> str:
        """The key in this checkpoint's files of our param ``path`` (prefix as the files have it)."""
        key = flax_key(path)
        ours_prefix = PREFIX if self.head != "base" else ""
        in_base = path.startswith(ours_prefix) and not path.startswith(("lm_head/", "score/", "qa_outputs/"))
        if not in_base:
            return key
        return (PREFIX if self.prefixed else "") + key[len(ours_prefix):]

    # ------------------------------------------------------------------ queries
    @property
    def tied(self) -> bool:
        """True when one of ``lm_head/kernel`` and ``wte`` is read as the other (transposed)."""
        return bool(self._tied)

    def __contains__(self, path: str) -> bool:
        return path in self._key_of

    def _entry(self, path: str) -> TensorEntry:
        try:
            return self._entries[self._tied.get(path, path)]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor for param {path!r}") from None

    def key_of(self, path: str) -> str:
        """The HF-Flax key (as in the files) that our param ``path`` reads."""
        self._entry(path)
        return self._key_of[self._tied.get(path, path)]

    def entry(self, path: str) -> TensorEntry:
        """Where ``path``'s bytes lie (file, offsets, stored shape and dtype; a tied path gives its target's)."""
        return self._entry(path)

    def file_of(self, path: str) -> str:
        return self._entry(path).file

    def shape(self, path: str) -> tuple[int, ...]:
        """Shape in our layout (a tied path: its target's shape reversed)."""
        shape = self._entry(path).shape
        return shape[::-1] if path in self._tied else shape

    def dtype(self, path: str) -> np.dtype:
        return self._entry(path).dtype

    def nbytes(self, path: str) -> int:
        return self._entry(path).nbytes

    # ------------------------------------------------------------------ reads
    def _handle(self, file: str) -> Any:
        if self._file_path != file:
            self.close()
            self._file = open(file, "rb", buffering=0)
            self._file_path = file
        return self._file

    def _read_flat(self, entry: TensorEntry, start: int, out: np.ndarray) -> None:
        """Elements ``[start, start + out.size)`` of the flat array into ``out`` (C-contiguous)."""
        itemsize = entry.dtype.itemsize
        view = memoryview(out.reshape(-1).view(np.uint8))
        lo, hi = start * itemsize, (start + out.size) * itemsize
        f = self._handle(entry.file)
        base = 0
        for offset, count in entry.spans:
            a, b = max(lo, base), min(hi, base + count)
            if a < b:
                _read_exact(f, offset + a - base, view[a - lo : b - lo], entry.file, entry.key)
            base += count

    def read(self, path: str) -> np.ndarray:
        """The whole tensor (our layout, stored dtype): one ``readinto`` per chunk, no other copy."""
        if path in self._tied:
            return table.transpose_copy(self.read(self._tied[path]))
        entry = self._entry(path)
        out = np.empty(entry.shape, entry.dtype)
        if out.size:
            self._read_flat(entry, 0, out)
        return out

    def read_slice(self, path: str, index: Index) -> np.ndarray:
        """``tensor[index]`` (our layout), reading only what the block needs.

        A plain array goes through a temporary ``np.memmap`` of its bytes (unmapped before returning, so
        only the pages the block touches are read and none stay mapped); a chunked one is read in row
        blocks of about 64 MB along axis 0, keeping the selected part of each.
        """
        index = tuple(index) if isinstance(index, tuple) else (index,)
        if path in self._tied:
            target = self._tied[path]
            padded = index + (slice(None),) * (2 - len(index))
            block = self.read_slice(target, tuple(reversed(padded)))
            return np.ascontiguousarray(block.T)
        entry = self._entry(path)
        if entry.nbytes == 0:
            return np.empty(entry.shape, entry.dtype)[index].copy()
        if not entry.chunked:
            mm = np.memmap(entry.file, dtype=entry.dtype, mode="r", offset=entry.spans[0][0], shape=entry.shape)
            try:
                return np.array(mm[index])
            finally:
                del mm
        if not entry.shape or len(index) > len(entry.shape) or not all(
            isinstance(i, (int, np.integer, slice)) for i in index
        ):
            return np.array(self.read(path)[index])  # fancy indexing of a chunked array: read it whole
        return self._read_chunked_slice(entry, index)

    def _read_chunked_slice(self, entry: TensorEntry, index: tuple) -> np.ndarray:
        shape = entry.shape
        first, rest = index[0], index[1:]
        row = int(np.prod(shape[1:], dtype=np.int64))
        if not isinstance(first, slice):
            r = int(first) + (shape[0] if first < 0 else 0)
            if not 0 <= r < shape[0]:
                raise IndexError(f"index {int(first)} is out of bounds for axis 0 with size {shape[0]}")
            buf = np.empty(shape[1:], entry.dtype)
            self._read_flat(entry, r * row, buf)
            return np.array(buf[rest])
        rows = range(*first.indices(shape[0]))
        step = abs(rows.step)
        per_block = max(1, (64 << 20) // max(1, row * entry.dtype.itemsize * step))
        parts = []
        for k in range(0, len(rows), per_block):
            sub = rows[k : k + per_block]
            lo, hi = min(sub[0], sub[-1]), max(sub[0], sub[-1]) + 1
            buf = np.empty((hi - lo,) + shape[1:], entry.dtype)
            self._read_flat(entry, lo * row, buf)
            parts.append(buf[[r - lo for r in sub]][(slice(None),) + rest])
        if not parts:
            return np.empty((0,) + shape[1:], entry.dtype)[(slice(None),) + rest].copy()
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def iter_tensors(self, paths: Optional[Sequence[str]] = None) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(path, array)`` one at a time, in file order (:attr:`paths` order)."""
        order = {p: k for k, p in enumerate(self.paths)}
        for path in self.paths if paths is None else sorted(paths, key=lambda p: order[p]):
            yield path, self.read(path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._file_path = None, None

    def __enter__(self) -> "HFFlaxReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ====================================================================================== writing
def _uint(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    for marker, size in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        if n < 1 << (8 * size):
            return bytes([marker]) + n.to_bytes(size, "big")
    raise ValueError(f"{n} does not fit in a msgpack uint64")


def _sized(n: int, fix: Optional[tuple[int, int]], markers: tuple[int, ...], sizes: tuple[int, ...]) -> bytes:
    """A msgpack length header: a fix form (``(base, limit)``) or the smallest of ``markers`` / ``sizes``."""
    if fix is not None and n < fix[1]:
        return bytes([fix[0] | n])
    for marker, size in zip(markers, sizes):
        if n < 1 << (8 * size):
            return bytes([marker]) + n.to_bytes(size, "big")
    raise ValueError(f"msgpack length {n} too large")


def _str(text: str) -> bytes:
    data = text.encode("utf-8")
    return _sized(len(data), (0xA0, 32), (0xD9, 0xDA, 0xDB), (1, 2, 4)) + data


def _map_header(n: int) -> bytes:
    return _sized(n, (0x80, 16), (0xDE, 0xDF), (2, 4))


def _array_header(n: int) -> bytes:
    return _sized(n, (0x90, 16), (0xDC, 0xDD), (2, 4))


def _bin_header(n: int) -> bytes:
    return _sized(n, None, (0xC4, 0xC5, 0xC6), (1, 2, 4))


def _ext_header(n: int, code: int) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fixed:
        return bytes([fixed[n], code])
    return _sized(n, None, (0xC7, 0xC8, 0xC9), (1, 2, 4)) + bytes([code])


def _array_prefix(shape: Sequence[int], dtype: np.dtype, nbytes: int) -> bytes:
    """Everything of flax's ExtType 1 encoding of an array but its raw bytes."""
    payload = b"\x93" + _array_header(len(shape)) + b"".join(_uint(int(d)) for d in shape)
    payload += _str(dtype.name) + _bin_header(nbytes)
    return _ext_header(len(payload) + nbytes, 1) + payload


class _Layout:
    """Byte layout of one msgpack file: header pieces ``(offset, bytes)`` and each tensor's data spans."""

    def __init__(self, plan: Sequence[tuple[str, tuple[int, ...], np.dtype]], chunk_size: int):
        self.pieces: list[tuple[int, bytes]] = []
        self.spans: dict[str, list[tuple[int, int]]] = {}
        self._buf = bytearray()
        self._start = 0
        self._chunk_size = chunk_size
        tree: dict[str, Any] = {}
        for key, shape, dtype in plan:
            node = tree
            parts = key.split("/")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ValueError(f"key {key!r}: {part!r} is both a tensor and a map")
            if parts[-1] in node:
                raise ValueError(f"key {key!r} planned twice (or is also a map)")
            node[parts[-1]] = (key, tuple(int(s) for s in shape), np.dtype(dtype))
        self._node(tree)
        self._flush()
        self.size = self._start

    def _emit(self, data: bytes) -> None:
        self._buf += data

    def _flush(self) -> None:
        if self._buf:
            self.pieces.append((self._start, bytes(self._buf)))
            self._start += len(self._buf)
            self._buf = bytearray()

    def _data(self, key: str, nbytes: int) -> None:
        self._flush()
        self.spans.setdefault(key, []).append((self._start, nbytes))
        self._start += nbytes

    def _node(self, node: dict[str, Any]) -> None:
        self._emit(_map_header(len(node)))
        for name, child in node.items():
            self._emit(_str(name))
            if isinstance(child, dict):
                self._node(child)
            else:
                self._leaf(*child)

    def _leaf(self, key: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        size = int(np.prod(shape, dtype=np.int64))
        nbytes = size * dtype.itemsize
        if nbytes <= self._chunk_size:
            self._emit(_array_prefix(shape, dtype, nbytes))
            self._data(key, nbytes)
            return
        # flax.serialization._chunk: flat chunks of int(MAX_CHUNK_SIZE / itemsize) elements
        per = max(1, int(self._chunk_size / dtype.itemsize))
        self._emit(_map_header(3) + _str(CHUNKED) + b"\xc3" + _str("shape") + _map_header(len(shape)))
        for i, d in enumerate(shape):
            self._emit(_str(str(i)) + _uint(d))
        starts = range(0, size, per)
        self._emit(_str("chunks") + _map_header(len(starts)))
        for j, start in enumerate(starts):
            count = min(per, size - start)
            self._emit(_str(str(j)) + _array_prefix((count,), dtype, count * dtype.itemsize))
            self._data(key, count * dtype.itemsize)


class HFFlaxWriter(PlannedWriter):
    """Write planned tensors as ``flax_model.msgpack``, or shards + ``flax_model.msgpack.index.json``.

    ``plan`` lists ``(HF-Flax key, shape, dtype)`` in tree order (keys ``/``-joined, e.g.
    ``transformer/h/0/attn/q_proj/kernel``). Shards are cut as Transformers 4.x
    ``flax_shard_checkpoint`` cuts them (in plan order, a new shard when the next tensor would pass
    ``max_shard_size``; a bigger tensor alone), named ``flax_model-0000k-of-0000n.msgpack``; each holds
    the nested dict of its own keys, exactly the bytes ``flax.serialization.to_bytes`` gives for it
    (arrays above ``chunk_size`` bytes as chunked maps). The index is
    ``json.dumps({"metadata": {"total_size": raw bytes}, "weight_map": {key: shard}}, indent=2,
    sort_keys=True) + "\\n"``, as Transformers wrote it.

    Headers are written at construction; :meth:`write` puts one tensor's bytes at its offsets (any
    order). Files are written under ``.tmp`` names and renamed by :meth:`close`.
    """

    def __init__(
        self,
        directory: PathLike,
        plan: Sequence[tuple[str, tuple[int, ...], Any]],
        max_shard_size: Union[int, str] = "5GB",
        *,
        chunk_size: int = MAX_CHUNK_SIZE,
    ):
        if not 0 < chunk_size <= 2**31:
            raise ValueError(f"chunk_size must be in 1..2**31, got {chunk_size}")
        plan = self._start(directory, plan)
        shards = plan_shards(plan, parse_size(max_shard_size))
        self.files = [os.path.join(self.directory, n) for n in shard_names("flax_model", "msgpack", len(shards))]
        self._where: dict[str, tuple[int, list[tuple[int, int]]]] = {}
        try:
            for k, indices in enumerate(shards):
                layout = _Layout([plan[i] for i in indices], chunk_size)
                for key, spans in layout.spans.items():
                    self._where[key] = (k, spans)
                handle = open(self.files[k] + ".tmp", "wb")
                self._handles.append(handle)
                for offset, data in layout.pieces:
                    handle.seek(offset)
                    handle.write(data)
                handle.truncate(layout.size)
                self.total_size += sum(count for spans in layout.spans.values() for _, count in spans)
        except BaseException:
            self.abort()
            raise

    def write(self, key: str, array: np.ndarray) -> None:
        """Write one tensor; its shape and dtype must match the plan."""
        data = memoryview(self._checked(key, array).reshape(-1).view(np.uint8))
        k, spans = self._where[key]
        handle = self._handles[k]
        pos = 0
        for offset, count in spans:
            handle.seek(offset)
            handle.write(data[pos : pos + count])
            pos += count
        self._done(key)

    def close(self) -> list[str]:
        """Check every planned tensor was written, rename the files into place, write the index; returns the files."""
        self._finish()
        if len(self.files) == 1:
            return list(self.files)
        index_path = os.path.join(self.directory, FLAX_INDEX)
        weight_map = {key: os.path.basename(self.files[k]) for key, (k, _) in self._where.items()}
        write_index(index_path, weight_map, self.total_size)
        return self.files + [index_path]


def plan_for(
    config: GPTJConfig, head: str, dtype_of: Mapping[str, np.dtype], *, where: str = "params"
) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """The write plan of an HF Flax checkpoint: ``(HF-Flax key, shape, dtype)`` for every param of
    ``head`` in table order (``wte``, layers, ``ln_f``, ``lm_head``), dtypes from ``dtype_of[our path]``.

    Raises CheckpointError (starting with ``where``) for a head Transformers' Flax GPT-J did not have.
    """
    if head not in HEADS:
        from gptj_jax.model import HEADS as ALL_HEADS

        raise CheckpointError(
            f"{where}: a {ALL_HEADS[head].architecture} checkpoint cannot be written as hf-flax: Transformers' "
            "Flax GPT-J had FlaxGPTJModel and FlaxGPTJForCausalLM only"
        )
    return [(flax_key(p), shape, np.dtype(dtype_of[p])) for p, shape in table.expected_param_shapes(config, head).items()]

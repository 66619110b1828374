"""mesh-transformer-jax checkpoints (the layout GPT-J-6B was released in): streaming reader and writer.

Layout (``shared/reference/mtj-checkpoint.md``)::

    <model_dir>/meta.json                    {"step": N, "checkpoints": [...], "aux": {...}}
    <model_dir>/step_<N>/shard_<s>/<i>.npz   s = 0..mp-1, i = 0..15; arrays arr_0, arr_1, ...

Each shard's state is flattened like ``jax.tree_flatten`` (dict keys sorted) and the leaf list is
cut into 16 contiguous files, the first ``n % 16`` holding one extra leaf. Slim checkpoints hold
``{params, step}``; full ones ``{opt_state, params, step}`` with the Adam state (count, mu, nu,
schedule count) first. bfloat16 is stored as the 2-byte void dtype ``V2``.

:data:`MTJ_ROWS` is the one mapping table, walked by the reader (join shards) and the writer
(split them): ``(module template, param, HF name, how shards join, transform)``. ``join``:

* ``0`` / ``1``: the shards are slices along that axis (of the mtj ``[in, out]`` layout);
* ``"sum"``: every shard holds a part and the effective value is their sum (the writer stores
  ``value / mp`` on each);
* ``"first"``: replicated LayerNorm, only shard 0's copy is used (the writer copies it to all);
* ``"fold"``: the embedding bias, summed over shards and added to every row of ``wte`` (the writer
  stores zeros).

Memory: the reader holds one HF tensor and its mp parts; the writer one npz file's leaves for every
shard (about 1/16 of the model) plus one HF tensor.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, Union

import ml_dtypes
import numpy as np

from gptj_jax.config import ConfigError, GPTJConfig
from gptj_jax.convert import table
from gptj_jax.convert.errors import CheckpointError

PathLike = Union[str, os.PathLike]
FILES_PER_SHARD = 16
ROOT = "causal_transformer_shard/~/"
BF16 = np.dtype(ml_dtypes.bfloat16)

# (module template, param, HF name template or None, join, transform mtj layout -> HF layout)
MTJ_ROWS: tuple[tuple[str, str, Optional[str], Union[int, str], str], ...] = (
    ("embedding_shard/~/linear", "b", None, "fold", ""),
    ("embedding_shard/~/linear", "w", "transformer.wte.weight", 0, ""),
    ("layer_{i}/~/linear", "w", "transformer.h.{i}.attn.q_proj.weight", 1, "T"),
    ("layer_{i}/~/linear_1", "w", "transformer.h.{i}.attn.v_proj.weight", 1, "T"),
    ("layer_{i}/~/linear_2", "w", "transformer.h.{i}.attn.k_proj.weight", 1, "T"),
    ("layer_{i}/~/linear_3", "w", "transformer.h.{i}.attn.out_proj.weight", 0, "T"),
    ("layer_{i}/~/linear_4", "b", "transformer.h.{i}.mlp.fc_in.bias", 0, ""),
    ("layer_{i}/~/linear_4", "w", "transformer.h.{i}.mlp.fc_in.weight", 1, "T"),
    ("layer_{i}/~/linear_5", "b", "transformer.h.{i}.mlp.fc_out.bias", "sum", ""),
    ("layer_{i}/~/linear_5", "w", "transformer.h.{i}.mlp.fc_out.weight", 0, "T"),
    ("layer_{i}/~/replicated_layer_norm", "offset", "transformer.h.{i}.ln_1.bias", "first", ""),
    ("layer_{i}/~/replicated_layer_norm", "scale", "transformer.h.{i}.ln_1.weight", "first", ""),
    ("projection_shard/~/linear", "b", "lm_head.bias", 0, ""),
    ("projection_shard/~/linear", "w", "lm_head.weight", 1, "T"),
    ("projection_shard/~/replicated_layer_norm", "offset", "transformer.ln_f.bias", "first", ""),
    ("projection_shard/~/replicated_layer_norm", "scale", "transformer.ln_f.weight", "first", ""),
)

EMBED_BIAS = ROOT + "embedding_shard/~/linear/b"


class Leaf(NamedTuple):
    """One param leaf of a shard: its haiku path, HF name (None for the embedding bias), join rule,
    transform, per-shard shape and full (joined, mtj-layout) shape."""

    path: str
    hf_name: Optional[str]
    join: Union[int, str]
    transform: str
    shard_shape: tuple[int, ...]
    full_shape: tuple[int, ...]


def check_mp(config: GPTJConfig, mp: int, where: str = "") -> None:
    """Raise CheckpointError unless heads, vocab and n_inner split evenly over ``mp`` shards."""
    prefix = f"{where}: " if where else ""
    if mp < 1:
        raise CheckpointError(f"{prefix}need at least one shard, got {mp}")
    for name, value in (("n_head", config.n_head), ("vocab_size", config.vocab_size), ("n_inner", config.inner_dim)):
        if value % mp:
            raise CheckpointError(f"{prefix}{name}={value} does not split over {mp} shards")


def param_leaves(config: GPTJConfig, mp: int) -> list[Leaf]:
    """The param leaves of one shard in ``jax.tree_flatten`` order (haiku module names sorted as text:
    ``embedding_shard``, ``layer_0``, ``layer_1``, ``layer_10``..., ``projection_shard``)."""
    check_mp(config, mp)
    hf_shapes = table.expected_shapes(config, "causal_lm")
    leaves = []
    for module, param, hf, join, transform in MTJ_ROWS:
        for i in range(config.n_layer) if "{i}" in module else [None]:
            mod = module.replace("{i}", str(i)) if i is not None else module
            name = hf.replace("{i}", str(i)) if (hf and i is not None) else hf
            full = table.transform_shape(hf_shapes[name], transform) if name else (config.n_embd,)
            shard = list(full)
            if isinstance(join, int):
                shard[join] //= mp
            leaves.append(Leaf(f"{ROOT}{mod}/{param}", name, join, transform, tuple(shard), tuple(full)))
    # tree_flatten sorts the module dict, then each module's param dict.
    return sorted(leaves, key=lambda leaf: tuple(leaf.path.rsplit("/", 1)))


def leaf_counts(config: GPTJConfig) -> tuple[int, int]:
    """Leaves per shard of ``(slim, full)`` checkpoints: params + step, and Adam state + params + step."""
    n = len(MTJ_ROWS) - 10 + 10 * config.n_layer
    return n + 1, 3 * n + 3


def file_split(n_leaves: int) -> list[int]:
    """Leaves per npz file: ``k, m = divmod(n, 16)``; the first m files hold k + 1."""
    k, m = divmod(n_leaves, FILES_PER_SHARD)
    return [k + 1 if i < m else k for i in range(FILES_PER_SHARD)]


# ================================================================================ config
# mtj config key -> GPTJConfig field: the model's shape (the training config's shape keys use this too).
MTJ_SHAPE_KEYS: dict[str, str] = {
    "layers": "n_layer",
    "d_model": "n_embd",
    "n_heads": "n_head",
    "n_vocab": "vocab_size",
    "pe_rotary_dims": "rotary_dim",
}
# A model converted from / to mtj takes n_positions from mtj's ``seq``. Training does not: there ``seq`` is
# the length of a training sequence, which only has to fit in n_positions (train/config.py).
MTJ_CONFIG_KEYS: dict[str, str] = {**MTJ_SHAPE_KEYS, "seq": "n_positions"}


def is_mtj_config(data: dict) -> bool:
    return "d_model" in data or "layers" in data


def config_from_mtj(data: dict, source: str = "<mtj config>") -> tuple[GPTJConfig, Optional[int]]:
    """A mesh-transformer-jax training config (``configs/6B_roto_256.json``) -> ``(GPTJConfig, cores_per_replica)``."""
    missing = [k for k in MTJ_CONFIG_KEYS if k not in data]
    if missing:
        raise ConfigError(f"{source}: missing required mesh-transformer-jax key(s) {missing}")
    if data.get("pe", "rotary") != "rotary":
        raise ConfigError(f"{source}: pe is {data['pe']!r}; GPT-J uses 'rotary'")
    if data.get("norm", "layernorm") != "layernorm":
        raise ConfigError(f"{source}: norm is {data['norm']!r}; GPT-J uses 'layernorm'")
    kwargs = {ours: data[theirs] for theirs, ours in MTJ_CONFIG_KEYS.items()}
    try:
        config = GPTJConfig(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    mp = data.get("cores_per_replica")
    return config, (int(mp) if mp is not None else None)


def config_to_mtj(config: GPTJConfig, mp: int) -> dict:
    """The model part of a mesh-transformer-jax config for ``config`` (inverse of :func:`config_from_mtj`)."""
    out: dict[str, Any] = {theirs: getattr(config, ours) for theirs, ours in MTJ_CONFIG_KEYS.items()}
    out["pe_rotary_dims"] = config.rotary_dims
    out.update(norm="layernorm", pe="rotary", cores_per_replica=mp)
    return out


# ================================================================================ layout on disk
def is_mtj_dir(path: PathLike) -> bool:
    """True for a model dir (``meta.json`` or ``step_*/shard_0``) or a step dir (``shard_0/``)."""
    path = os.fspath(path)
    if os.path.isdir(os.path.join(path, "shard_0")) or os.path.isfile(os.path.join(path, "meta.json")):
        return True
    return any(os.path.isdir(os.path.join(path, d, "shard_0")) for d in _step_dirs(path))


def _step_dirs(path: str) -> list[str]:
    if not os.path.isdir(path):
        return []
    return [d for d in os.listdir(path) if re.fullmatch(r"step_\d+.*", d) and os.path.isdir(os.path.join(path, d))]


def resolve_step_dir(path: PathLike) -> str:
    """The step directory to read: ``path`` itself if it holds ``shard_0/``; else the newest step of a
    model dir (``meta.json``'s newest checkpoint that exists, or the highest ``step_N``)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(os.path.join(path, "shard_0")):
        return path
    meta_file = os.path.join(path, "meta.json")
    if os.path.isfile(meta_file):
        try:
            with open(meta_file, encoding="utf-8") as f:
                meta = json.load(f)
            steps = [int(s) for s in meta.get("checkpoints", [])] + [int(meta["step"])]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{meta_file}: not a mesh-transformer-jax meta.json ({type(e).__name__}: {e})") from None
        for step in sorted(set(steps), reverse=True):
            candidate = os.path.join(path, f"step_{step}")
            if os.path.isdir(os.path.join(candidate, "shard_0")):
                return candidate
        raise CheckpointError(f"{meta_file}: lists steps {sorted(set(steps))} but no step_<N>/shard_0 exists for any")
    found = []
    for d in _step_dirs(path):
        m = re.match(r"step_(\d+)", d)
        if m and os.path.isdir(os.path.join(path, d, "shard_0")):
            found.append((int(m.group(1)), d))
    if not found:
        raise CheckpointError(f"{path}: not a mesh-transformer-jax checkpoint (no meta.json, step_<N>/ or shard_0/)")
    return os.path.join(path, max(found)[1])


def _as_stored(array: np.ndarray) -> np.ndarray:
    """``V2`` (how NumPy returns a saved bfloat16 array) -> bfloat16."""
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        return array.view(BF16)
    return array


def _npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from an open ``.npy`` stream, reading only its header."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:  # 2.0 (and 3.0, whose header reads the same way)
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(shape), np.dtype(dtype)


# ================================================================================ reader
class MtjReader:
    """Streams HF tensors out of a mesh-transformer-jax checkpoint, leaf by leaf, never building the model.

    ``config`` is required (the checkpoint carries none). The number of shards is the number of
    ``shard_<s>`` directories; slim and full checkpoints are told apart by the leaf count.
    """

    def __init__(self, path: PathLike, config: GPTJConfig):
        self.path = os.fspath(path)
        self.config = config
        self.step_dir = resolve_step_dir(self.path)
        shard_dirs = sorted(
            (int(m.group(1)), d)
            for d in os.listdir(self.step_dir)
            if (m := re.fullmatch(r"shard_(\d+)", d)) and os.path.isdir(os.path.join(self.step_dir, d))
        )
        if [s for s, _ in shard_dirs] != list(range(len(shard_dirs))):
            raise CheckpointError(
                f"{self.step_dir}: shard directories {[d for _, d in shard_dirs]} are not shard_0 .. shard_{len(shard_dirs) - 1}"
            )
        self.mp = len(shard_dirs)
        self.shard_dirs = [os.path.join(self.step_dir, d) for _, d in shard_dirs]
        check_mp(config, self.mp, self.step_dir)
        self.leaves = param_leaves(config, self.mp)
        slim, full = leaf_counts(config)
        counts0 = self._file_counts(0)
        total = sum(counts0)
        if total == slim:
            self.layout, self.offset = "slim", 0
        elif total == full:
            self.layout, self.offset = "full", 2 * len(self.leaves) + 2
        else:
            raise CheckpointError(
                f"{self.shard_dirs[0]}: {total} leaves in its {FILES_PER_SHARD} npz files (per file {counts0}), "
                f"expected {slim} (slim: params + step) or {full} (full: Adam state + params + step) for "
                f"n_layer={config.n_layer}; wrong --config or not a GPT-J checkpoint"
            )
        want = file_split(total)
        for s in range(self.mp):
            counts = counts0 if s == 0 else self._file_counts(s)
            for i, (got, expect) in enumerate(zip(counts, want)):
                if got != expect:
                    raise CheckpointError(
                        f"{self._file(s, i)}: holds {got} leaves, expected {expect} "
                        f"(a {total}-leaf shard is split {want})"
                    )
        self.n_leaves = total
        self._starts = np.cumsum([0] + want).tolist()
        self._open: dict[tuple[int, int], Any] = {}
        self.names = [leaf.hf_name for leaf in self.leaves if leaf.hf_name is not None]
        self._leaf_of = {leaf.hf_name: j for j, leaf in enumerate(self.leaves) if leaf.hf_name is not None}
        self._embed_bias_index = next(j for j, leaf in enumerate(self.leaves) if leaf.path == EMBED_BIAS)
        self._dtype: Optional[np.dtype] = None
        self._check_headers()

    def _check_headers(self) -> None:
        """Shape-check every param leaf of every shard from the npy headers alone (no data read), so a
        checkpoint that disagrees with the config fails before anything is written."""
        dtypes = set()
        for s in range(self.mp):
            for i in range(FILES_PER_SHARD):
                file = self._file(s, i)
                first, last = max(self._starts[i], self.offset), min(self._starts[i + 1], self.offset + len(self.leaves))
                if first >= last:
                    continue
                try:
                    with zipfile.ZipFile(file) as z:
                        headers = []
                        for index in range(first, last):
                            with z.open(f"arr_{index - self._starts[i]}.npy") as f:
                                headers.append((index, *_npy_header(f)))
                except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
                    raise CheckpointError(f"{file}: cannot read npy headers ({type(e).__name__}: {e})") from None
                for index, shape, dtype in headers:
                    leaf = self.leaves[index - self.offset]
                    if shape != leaf.shard_shape:
                        raise CheckpointError(
                            f"{file}: arr_{index - self._starts[i]} ({leaf.path} -> {leaf.hf_name or 'wte bias'}) has "
                            f"shape {table.fmt_shape(shape)} but the config with {self.mp} shards implies "
                            f"{table.fmt_shape(leaf.shard_shape)}"
                        )
                    dtypes.add(_as_stored(np.empty(0, dtype)).dtype)
        if len(dtypes) != 1:
            raise CheckpointError(f"{self.step_dir}: params stored in several dtypes {sorted(map(str, dtypes))}")
        self._dtype = dtypes.pop()

    def _file(self, shard: int, i: int) -> str:
        return os.path.join(self.shard_dirs[shard], f"{i}.npz")

    def _file_counts(self, shard: int) -> list[int]:
        counts = []
        for i in range(FILES_PER_SHARD):
            file = self._file(shard, i)
            if not os.path.isfile(file):
                raise CheckpointError(f"{file}: missing (each shard has {FILES_PER_SHARD} files 0.npz .. 15.npz)")
            try:
                with zipfile.ZipFile(file) as z:
                    counts.append(sum(1 for n in z.namelist() if n.endswith(".npy")))
            except zipfile.BadZipFile as e:
                raise CheckpointError(f"{file}: not a readable npz ({e})") from None
        return counts

    def _npz(self, shard: int, i: int) -> Any:
        key = (shard, i)
        if key not in self._open:
            # Keep at most one file index open per shard: reading walks the files in order.
            for other in [k for k in self._open if k[0] == shard]:
                self._open.pop(other).close()
            self._open[key] = np.load(self._file(shard, i))
        return self._open[key]

    def read_leaf(self, shard: int, j: int, expect: Optional[Leaf] = None) -> np.ndarray:
        """Param leaf ``j`` (index into :attr:`leaves`) of ``shard``, bfloat16 restored, shape checked."""
        index = self.offset + j
        i = int(np.searchsorted(self._starts, index, side="right") - 1)
        key = f"arr_{index - self._starts[i]}"
        leaf = expect or self.leaves[j]
        try:
            array = _as_stored(self._npz(shard, i)[key])
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise CheckpointError(f"{self._file(shard, i)}: cannot read {key} ({leaf.path}): {type(e).__name__}: {e}") from None
        if array.shape != leaf.shard_shape:
            raise CheckpointError(
                f"{self._file(shard, i)}: {key} ({leaf.path} -> {leaf.hf_name or 'wte bias'}) has shape "
                f"{table.fmt_shape(array.shape)} but the config with {self.mp} shards implies {table.fmt_shape(leaf.shard_shape)}"
            )
        return array

    def _join(self, j: int, sum_dtype: Optional[np.dtype] = None) -> np.ndarray:
        """Leaf ``j`` joined over shards. Summed leaves are added in float64 and rounded once, to
        ``sum_dtype`` (default: the stored dtype)."""
        leaf = self.leaves[j]
        parts = [self.read_leaf(s, j) for s in range(self.mp)]  # every shard's copy is shape-checked
        if leaf.join == "first":
            return parts[0]
        if leaf.join in ("sum", "fold"):
            # float64 makes the sum of the writer's value/mp parts exact for power-of-two mp.
            return np.sum([p.astype(np.float64) for p in parts], axis=0).astype(sum_dtype or parts[0].dtype)
        out = parts[0] if self.mp == 1 else np.concatenate(parts, axis=leaf.join)
        del parts
        return out

    def dtype(self, name: Optional[str] = None) -> np.dtype:
        """The stored dtype of the params (one for the whole checkpoint, from the npy headers)."""
        assert self._dtype is not None
        return self._dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return table.expected_shapes(self.config, "causal_lm")[name]

    def read(self, name: str, dtype: Any = None) -> np.ndarray:
        """The HF tensor ``name`` (HF layout), joined from all shards, in ``dtype`` (None: the stored dtype).

        ``transformer.wte.weight`` gets the embedding bias (summed over shards) added to every row in
        float32 (the bias sum rounded to float32 once), then rounded once to ``dtype``: a bfloat16
        checkpoint read as float32 is ``float32(w) + float32(sum of bias shards)`` exactly.
        """
        if name not in self._leaf_of:
            raise CheckpointError(f"{self.step_dir}: no tensor {name!r} in a mesh-transformer-jax checkpoint")
        out_dtype = np.dtype(dtype) if dtype is not None else self.dtype()
        leaf = self.leaves[self._leaf_of[name]]
        array = table.apply_transform(self._join(self._leaf_of[name], out_dtype), leaf.transform, contiguous=True)
        if name == "transformer.wte.weight":
            bias = self._join(self._embed_bias_index, np.dtype(np.float32))
            if np.any(bias):
                array = array.astype(np.float32)
                array += bias
        return array if array.dtype == out_dtype else array.astype(out_dtype)

    def iter_tensors(self, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
        """``(HF name, array)`` in leaf order, one tensor at a time, in ``dtype`` (None: stored)."""
        for name in self.names:
            yield name, self.read(name, dtype)

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open = {}

    def __enter__(self) -> "MtjReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ================================================================================ writer
def _split(array: np.ndarray, leaf: Leaf, mp: int, dtype: np.dtype) -> list[np.ndarray]:
    """HF-layout tensor -> the mp per-shard arrays of ``leaf`` (inverse of the reader's join)."""
    array = table.apply_transform(np.asarray(array), leaf.transform, contiguous=True)  # -> mtj [in, out] layout
    if leaf.join in ("first", "fold"):
        one = np.ascontiguousarray(array, dtype=dtype)
        return [one] * mp
    if leaf.join == "sum":
        one = (array.astype(np.float64) / mp).astype(dtype)
        return [one] * mp
    return [np.ascontiguousarray(p, dtype=dtype) for p in np.split(array, mp, axis=leaf.join)]


def write(
    directory: PathLike,
    config: GPTJConfig,
    read: Callable[[str], np.ndarray],
    *,
    shards: int = 1,
    dtype: Any = BF16,
    layout: str = "slim",
    step: int = 0,
    on_tensor: Optional[Callable[[str, np.ndarray], None]] = None,
) -> dict:
    """Write a mesh-transformer-jax checkpoint of a causal LM into ``directory``.

    ``read(hf_name)`` returns each HF tensor (HF layout) when the writer needs it, in leaf order.
    Writes ``meta.json`` and ``step_<step>/shard_<s>/<i>.npz``. ``layout="full"`` adds the Adam
    state leaves (zero moments, count = ``step``) in front, in float32 as mesh-transformer-jax keeps
    them. LayerNorm is replicated, summed biases are split as ``value / shards``, the embedding bias
    is zero. ``on_tensor(name, array)`` is called after each HF tensor is consumed.
    Returns the mesh-transformer-jax config dict for the checkpoint.
    """
    if layout not in ("slim", "full"):
        raise ValueError(f"layout must be 'slim' or 'full', got {layout!r}")
    directory = os.fspath(directory)
    dtype = np.dtype(dtype)
    mp = shards
    leaves = param_leaves(config, mp)
    state: list[tuple[str, Any]] = []  # (kind, payload) in flatten order
    if layout == "full":
        state.append(("const", np.asarray(step, np.int32)))
        state += [("zeros", leaf) for leaf in leaves]  # Adam mu
        state += [("zeros", leaf) for leaf in leaves]  # Adam nu
        state.append(("const", np.asarray(step, np.int32)))  # schedule count
    state += [("param", leaf) for leaf in leaves]
    state.append(("const", np.asarray(step, np.int32)))  # step
    split = file_split(len(state))
    step_dir = os.path.join(directory, f"step_{step}")
    shard_dirs = [os.path.join(step_dir, f"shard_{s}") for s in range(mp)]
    for d in shard_dirs:
        os.makedirs(d, exist_ok=True)
    pending: list[list[np.ndarray]] = [[] for _ in range(mp)]
    file_index, in_file = 0, 0
    for kind, payload in state:
        if kind == "const":
            parts = [payload] * mp
        elif kind == "zeros":
            zero = np.zeros(payload.shard_shape, np.float32)
            parts = [zero] * mp
        elif payload.hf_name is None:  # the embedding bias: folded into wte by readers
            parts = [np.zeros(payload.shard_shape, dtype)] * mp
        else:
            array = read(payload.hf_name)
            expected = table.transform_shape(payload.full_shape, payload.transform)
            if tuple(array.shape) != expected:
                raise CheckpointError(
                    f"tensor {payload.hf_name!r} has shape {table.fmt_shape(array.shape)}, expected {table.fmt_shape(expected)}"
                )
            parts = _split(array, payload, mp, dtype)
            if on_tensor is not None:
                on_tensor(payload.hf_name, array)
            del array
        for s in range(mp):
            pending[s].append(parts[s])
        in_file += 1
        if in_file == split[file_index]:
            for s in range(mp):
                np.savez(os.path.join(shard_dirs[s], f"{file_index}.npz"), *pending[s])
                pending[s] = []
            file_index, in_file = file_index + 1, 0
    with open(os.path.join(directory, "meta.json"), "w", encoding="utf-8") as f:
        json.dump({"step": step, "checkpoints": [step], "aux": {str(step): {}}}, f)
    return config_to_mtj(config, mp)


def leaf_paths(config: GPTJConfig, mp: int = 1) -> Sequence[str]:
    """Haiku paths of the param leaves in file order (for docs and tests)."""
    return [leaf.path for leaf in param_leaves(config, mp)]

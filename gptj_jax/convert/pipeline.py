"""``convert(src, dst, to=...)``: any of HF / HF Flax / Flax / mesh-transformer-jax to any, one tensor at a time.

Every source exposes HF tensor names and HF-layout arrays (:class:`Source`); every target consumes
them in a streaming way. Output goes to a temporary sibling of ``dst`` that is renamed into place
only when everything is written, so ``dst`` is untouched on error.

Peak memory (beyond the interpreter): HF, HF Flax and mtj targets hold one tensor plus its cast / transposed
copy (mtj: plus one npz file's leaves per shard); a Flax target holds the model once, in the target
dtype, as orbax writes a whole tree.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import time
from typing import Any, Iterator, Optional, Union

import numpy as np

from gptj_jax.config import GPTJConfig, read_json_config
from gptj_jax.convert import flax as flax_ckpt
from gptj_jax.convert import hf_flax, mtj, table
from gptj_jax.convert.errors import CheckpointError
from gptj_jax.convert.hf import checked_tensors, make_writer, write_config_files
from gptj_jax.convert.io import CheckpointReader, has_hf_weights, same_bits
from gptj_jax.convert.staging import staged_dir
from gptj_jax.dtypes import as_dtype, dtype_name
from gptj_jax.model import HEADS

PathLike = Union[str, os.PathLike]
FORMATS = ("hf", "hf-flax", "flax", "mtj")


# ====================================================================================== config
def load_config(path: PathLike) -> tuple[GPTJConfig, Optional[int]]:
    """An HF ``config.json`` or a mesh-transformer-jax JSON config -> ``(config, mp or None)``.

    A directory means its ``config.json``. The mtj kind is recognised by ``d_model`` / ``layers``.
    """
    file, data = read_json_config(path)
    if mtj.is_mtj_config(data):
        return mtj.config_from_mtj(data, source=file)
    return GPTJConfig.from_dict(data, source=file), None


# ====================================================================================== detection
def detect_format(path: PathLike) -> str:
    """``"hf"``, ``"hf-flax"``, ``"flax"`` or ``"mtj"`` for a checkpoint directory; CheckpointError otherwise.

    A directory with HF PyTorch weights is ``"hf"`` even when it also holds ``flax_model.msgpack`` (as the
    hub's ``EleutherAI/gpt-j-6B`` does); ``"hf-flax"`` needs ``flax_model.msgpack`` or its index and no
    PyTorch weights."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: source does not exist")
    if os.path.isdir(path):
        if has_hf_weights(path):
            return "hf"
        if hf_flax.has_hf_flax_weights(path):
            return "hf-flax"
        if flax_ckpt.is_flax_checkpoint(path):
            return "flax"
        if mtj.is_mtj_dir(path):
            return "mtj"
        entries = sorted(os.listdir(path))
        shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "") if entries else "nothing"
    else:
        shown = "a file"
    raise CheckpointError(
        f"{path}: unknown source layout (holds {shown}); expected an HF directory (config.json + "
        "model.safetensors / pytorch_model.bin, or a sharded index of either), an HF Flax directory (config.json + "
        "flax_model.msgpack or flax_model.msgpack.index.json), a gptj-jax Flax checkpoint "
        "(config.json + params/), or a mesh-transformer-jax model dir (meta.json + step_<N>/) or step dir (shard_0/ ...)"
    )


# ====================================================================================== sources
class Source(abc.ABC):
    """HF-named, HF-layout tensors from a checkpoint. ``names`` is the cheap read order.

    ``tied`` is True when the source's ``lm_head.weight`` *is* its ``transformer.wte.weight`` (an HF
    checkpoint with ``tie_word_embeddings: true`` storing one of the two: both read the same tensor).
    """

    format: str
    path: str
    config: GPTJConfig
    head: str
    names: list[str]
    tied: bool = False

    def shape(self, name: str) -> tuple[int, ...]:
        return table.expected_shapes(self.config, self.head)[name]

    @abc.abstractmethod
    def dtype(self, name: str) -> np.dtype:
        """The stored dtype of tensor ``name``."""

    @abc.abstractmethod
    def _read(self, name: str) -> np.ndarray:
        """One tensor, HF layout, stored dtype."""

    def read(self, name: str, dtype: Optional[np.dtype] = None) -> np.ndarray:
        """One tensor, any order (HF layout), cast to ``dtype`` (None: the stored dtype)."""
        return _cast(self._read(name), dtype)

    def iter_tensors(self, dtype: Optional[np.dtype] = None) -> Iterator[tuple[str, np.ndarray]]:
        """All tensors in :attr:`names` order, one at a time, cast to ``dtype`` (None: stored dtypes)."""
        for name in self.names:
            yield name, self.read(name, dtype)

    @abc.abstractmethod
    def close(self) -> None:
        """Release open files."""


class HFSource(Source):
    format = "hf"

    def __init__(self, path: str, config: Optional[GPTJConfig]):
        self.path = path
        self.config = config if config is not None else GPTJConfig.from_pretrained(path)
        self.reader = CheckpointReader(path)
        self.head, self.names = checked_tensors(self.reader, self.config, path)
        self.tied = self.reader.target("lm_head.weight") == self.reader.target("transformer.wte.weight")

    def dtype(self, name: str) -> np.dtype:
        return self.reader.dtype(name)

    def _read(self, name: str) -> np.ndarray:
        return self.reader.read(name)

    def close(self) -> None:
        self.reader.close()


class _OursPathSource(Source):
    """A source whose reader names tensors by our param paths (``transformer/h_0/attn/q_proj/kernel``):
    ``names`` are their HF names, each read through the mapping table's transform to the HF layout."""

    def _index(self) -> None:
        self._path_of = {table.ours_to_hf(p)[0]: p for p in self.reader.paths}
        self.names = list(self._path_of)

    def dtype(self, name: str) -> np.dtype:
        return self.reader.dtype(self._path_of[name])

    def _read_path(self, path: str) -> np.ndarray:
        """One tensor by our path, our layout, stored dtype."""
        return self.reader.read(path)

    def _read(self, name: str) -> np.ndarray:
        p = self._path_of[name]
        return table.apply_transform(self._read_path(p), table.ours_to_hf(p)[1], contiguous=True)


class HFFlaxSource(_OursPathSource):
    """A Transformers 4.x Flax checkpoint (``flax_model.msgpack``, single or sharded), read in file order."""

    format = "hf-flax"

    def __init__(self, path: str, config: Optional[GPTJConfig]):
        self.path = path
        self.reader = hf_flax.HFFlaxReader(path, config)
        self.config = self.reader.config
        self.head = self.reader.head
        self.tied = self.reader.tied
        self._index()

    def close(self) -> None:
        self.reader.close()


class FlaxSource(_OursPathSource):
    format = "flax"

    def __init__(self, path: str, config: Optional[GPTJConfig]):
        self.path = path
        self.reader = flax_ckpt.FlaxReader(path, config)
        self.config = self.reader.config
        self.head = self.reader.head
        self._index()

    def _read_path(self, path: str) -> np.ndarray:
        return self.reader.read([path])[path]

    def iter_tensors(self, dtype: Optional[np.dtype] = None) -> Iterator[tuple[str, np.ndarray]]:
        for p, array in self.reader.iter_leaves():
            name, transform = table.ours_to_hf(p)
            yield name, _cast(table.apply_transform(array, transform, contiguous=True), dtype)

    def close(self) -> None:
        """Nothing stays open: each orbax restore opens and closes the item."""


class MtjSource(Source):
    format = "mtj"
    head = "causal_lm"

    def __init__(self, path: str, config: GPTJConfig):
        self.path = path
        self.config = config
        self.reader = mtj.MtjReader(path, config)
        self.names = list(self.reader.names)

    def dtype(self, name: str) -> np.dtype:
        return self.reader.dtype()

    def _read(self, name: str) -> np.ndarray:
        return self.reader.read(name)

    def read(self, name: str, dtype: Optional[np.dtype] = None) -> np.ndarray:
        # The reader folds the embedding bias into wte in float32 and rounds once, to ``dtype``.
        return self.reader.read(name, dtype)

    def iter_tensors(self, dtype: Optional[np.dtype] = None) -> Iterator[tuple[str, np.ndarray]]:
        return self.reader.iter_tensors(dtype)

    def close(self) -> None:
        self.reader.close()


def open_source(src: PathLike, config: Union[None, PathLike, GPTJConfig] = None) -> Source:
    """Detect ``src``'s format and open it. ``config`` (a GPTJConfig or a path to an HF / mtj JSON
    config) overrides the checkpoint's own; mesh-transformer-jax sources need it."""
    src = os.fspath(src)
    fmt = detect_format(src)
    cfg: Optional[GPTJConfig]
    if config is None or isinstance(config, GPTJConfig):
        cfg = config
    else:
        cfg, _ = load_config(config)
    if fmt == "hf":
        return HFSource(src, cfg)
    if fmt == "hf-flax":
        return HFFlaxSource(src, cfg)
    if fmt == "flax":
        return FlaxSource(src, cfg)
    if cfg is None:
        raise CheckpointError(
            f"{src}: a mesh-transformer-jax checkpoint carries no config; pass config= (--config) with its "
            "training config JSON (layers, d_model, n_heads, n_vocab, pe_rotary_dims, seq) or an HF config.json"
        )
    return MtjSource(src, cfg)


# ====================================================================================== convert
@dataclasses.dataclass
class ConvertSummary:
    """What :func:`convert` did: HF tensors moved, parameters, output dtype, bytes written, seconds."""

    src: str
    dst: str
    src_format: str
    dst_format: str
    tensors: int
    parameters: int
    dtype: str
    bytes: int
    seconds: float

    def line(self) -> str:
        mb_s = self.bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"converted {self.src_format} -> {self.dst_format}: {self.tensors} tensors, {self.parameters:,} parameters, "
            f"{self.dtype}, {self.bytes / 1e9:.3f} GB in {self.seconds:.1f} s ({mb_s:.0f} MB/s) -> {self.dst}"
        )


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)
        self.parameters = 0
        self.bytes = 0
        self.tensors = 0

    def update(self, name: str, array: np.ndarray) -> None:
        self.tensors += 1
        self.parameters += int(array.size)
        self.bytes += int(array.nbytes)
        self.bar.set_postfix_str(name, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _cast(array: np.ndarray, dtype: Optional[np.dtype]) -> np.ndarray:
    return array.astype(dtype) if dtype is not None and array.dtype != dtype else array


def _tie_output(source: Source, dtype: Optional[np.dtype]) -> bool:
    """Whether an HF output is tied (``tie_word_embeddings: true``, no ``lm_head.weight``): the config
    says so and the output's ``lm_head.weight`` would equal its ``wte`` bit for bit."""
    if source.head != "causal_lm" or not source.config.tie_word_embeddings:
        return False
    if source.tied:
        return True
    return same_bits(source.read("lm_head.weight", dtype), source.read("transformer.wte.weight", dtype))


def _write_hf(
    tmp: str, source: Source, dtype: Optional[np.dtype], max_shard_size: Union[int, str],
    progress: _Progress, tokenizer: bool, safe_serialization: bool = True,
) -> np.dtype:
    tied = _tie_output(source, dtype)
    expected = table.expected_shapes(source.config, source.head)
    if tied:  # transformers ties lm_head.weight to wte on load and does not save it
        del expected["lm_head.weight"]
    plan = [(name, shape, dtype or source.dtype(name)) for name, shape in expected.items()]
    writer = make_writer(tmp, plan, max_shard_size, safe_serialization)
    try:
        for name, array in source.iter_tensors(dtype):
            if name not in expected:
                continue
            writer.write(name, array)
            progress.update(name, array)
            del array
        writer.close()
    except BaseException:
        writer.abort()
        raise
    out_dtype = dtype or source.dtype(next(iter(expected)))
    write_config_files(tmp, source.config, source.head, out_dtype, tied=tied)
    if tokenizer:
        from gptj_jax.tokenizer import save_tokenizer

        save_tokenizer(tmp)
    return out_dtype


def _write_hf_flax(
    tmp: str, source: Source, dtype: Optional[np.dtype], max_shard_size: Union[int, str], progress: _Progress,
    tokenizer: bool,
) -> np.dtype:
    """``flax_model.msgpack`` (or shards + index) as Transformers 4.x ``FlaxGPTJForCausalLM`` /
    ``FlaxGPTJModel`` saved it, streamed tensor by tensor; config files and tokenizer as for HF output.

    ``lm_head/kernel`` is always written and ``tie_word_embeddings`` is false (Transformers' Flax GPT-J
    had no working tied LM head: it applied ``wte.T`` without the head's bias)."""
    dtype_of = {table.hf_to_ours(name)[0]: dtype or source.dtype(name) for name in source.names}
    plan = hf_flax.plan_for(source.config, source.head, dtype_of, where=source.path)
    writer = hf_flax.HFFlaxWriter(tmp, plan, max_shard_size)
    try:
        for name, array in source.iter_tensors(dtype):
            path, transform = table.hf_to_ours(name)
            array = table.apply_transform(array, transform, contiguous=True)
            writer.write(hf_flax.flax_key(path), array)
            progress.update(name, array)
            del array
        writer.close()
    except BaseException:
        writer.abort()
        raise
    out_dtype = dtype_of[table.hf_to_ours("wte.weight" if source.head == "base" else "transformer.wte.weight")[0]]
    write_config_files(tmp, source.config, source.head, out_dtype, tied=False)
    if tokenizer:
        from gptj_jax.tokenizer import save_tokenizer

        save_tokenizer(tmp)
    return out_dtype


def _write_flax(tmp: str, source: Source, dtype: Optional[np.dtype], progress: _Progress) -> np.dtype:
    """Our orbax checkpoint: the params loaded onto one device by the one loader (:func:`gptj_jax.load`), as
    orbax writes a whole tree, then written."""
    from gptj_jax.convert.load import load

    config, params = load(source.path, dtype=dtype, config=source.config, head=source.head)
    flat = table.flatten(params)
    for path, leaf in flat.items():
        progress.update(table.ours_to_hf(path)[0], leaf)
    flax_ckpt.write_into(tmp, config, params)
    embed = table.hf_to_ours("wte.weight" if source.head == "base" else "transformer.wte.weight")[0]
    return np.dtype(flat[embed].dtype)


def _write_mtj(
    tmp: str, source: Source, dtype: Optional[np.dtype], shards: int, layout: str, progress: _Progress
) -> np.dtype:
    if source.head != "causal_lm":
        raise CheckpointError(
            f"{source.path}: a {HEADS[source.head].architecture} checkpoint cannot be written as mesh-transformer-jax, "
            "which holds causal LMs only"
        )
    out_dtype = dtype or source.dtype("transformer.wte.weight")
    mtj.check_mp(source.config, shards, "--shards")
    mtj.write(
        tmp, source.config, lambda name: source.read(name, out_dtype), shards=shards, dtype=out_dtype, layout=layout,
        on_tensor=progress.update,
    )
    return out_dtype


def check_paths(src: PathLike, dst: PathLike) -> None:
    """Raise CheckpointError when ``dst`` is ``src``, holds it, or lies inside it (real paths compared),
    where writing ``dst`` (or replacing it with ``--overwrite``) would destroy the source."""
    real_src, real_dst = os.path.realpath(os.fspath(src)), os.path.realpath(os.fspath(dst))
    if real_src == real_dst:
        how = "is the source"
    elif os.path.commonpath([real_src, real_dst]) == real_dst:
        how = "contains the source"
    elif os.path.commonpath([real_src, real_dst]) == real_src:
        how = "is inside the source"
    else:
        return
    raise CheckpointError(
        f"destination {os.fspath(dst)} ({real_dst}) {how} {os.fspath(src)} ({real_src}); choose a DST outside SRC"
    )


def convert(
    src: PathLike,
    dst: PathLike,
    to: str,
    config: Union[None, PathLike, GPTJConfig] = None,
    dtype: Any = None,
    max_shard_size: Union[int, str] = "5GB",
    shards: Optional[int] = None,
    overwrite: bool = False,
    *,
    mtj_layout: str = "slim",
    tokenizer: bool = True,
    safe_serialization: bool = True,
    verbose: bool = True,
) -> ConvertSummary:
    """Convert the checkpoint at ``src`` (format detected) to format ``to`` at ``dst``.

    Args:
      src: a hub id (``owner/name``), an HF directory, an HF Flax directory (``flax_model.msgpack``), a gptj-jax Flax checkpoint
        (or training run dir), or a
        mesh-transformer-jax model / step directory (slim or full).
      dst: output directory; must not exist unless ``overwrite``, and must not be ``src``, contain it or
        lie inside it (:func:`check_paths`). Stale temporary siblings of killed earlier writes to it are
        removed first (:func:`gptj_jax.convert.staging.clean_stale_siblings`).
      to: ``"hf"``, ``"hf-flax"``, ``"flax"`` or ``"mtj"``.
      config: GPTJConfig, or a path to an HF ``config.json`` or mesh-transformer-jax config JSON.
        Required for mtj sources; overrides the checkpoint's config otherwise. For mtj targets its
        ``cores_per_replica`` is the default for ``shards``.
      dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; None keeps the source's dtype.
      max_shard_size: HF and HF Flax output shard limit (``"5GB"``, ``"200MB"`` or bytes).
      shards: mp of an mtj output, >= 1 (default: the config's ``cores_per_replica``, else 1).
      mtj_layout: ``"slim"`` (params + step) or ``"full"`` (with zeroed Adam state) for mtj output.
      tokenizer: write GPT-J's tokenizer files into an HF or HF Flax output.
      safe_serialization: HF output as safetensors (default) or ``pytorch_model*.bin``.
      verbose: show a progress bar per tensor and print the summary line.

    Returns the :class:`ConvertSummary` (also printed as one line when ``verbose``).
    """
    if to not in FORMATS:
        raise ValueError(f"to must be one of {list(FORMATS)}, got {to!r}")
    start = time.perf_counter()
    src, dst = os.fspath(src), os.fspath(dst)
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int) or shards < 1):
        raise CheckpointError(f"--shards (shards=) must be an integer >= 1, got {shards!r}")
    from gptj_jax.convert.load import hub_snapshot, is_hub_id

    if is_hub_id(src):  # owner/name: its snapshot in the Hugging Face cache, fetched if need be
        src = hub_snapshot(src)
    check_paths(src, dst)  # before anything is read or written
    np_dtype = as_dtype(dtype)
    mp_from_config = None
    if config is not None and not isinstance(config, GPTJConfig):
        config, mp_from_config = load_config(config)
    if os.path.lexists(dst) and not overwrite:  # fail before reading anything
        raise CheckpointError(f"{dst}: destination exists; pass overwrite=True (--overwrite) to replace it")
    source = open_source(src, config)
    try:
        progress = _Progress(len(source.names), f"{source.format}->{to}", verbose)
        try:
            with staged_dir(dst, mode="replace", overwrite=overwrite) as tmp:
                if to == "hf":
                    out_dtype = _write_hf(tmp, source, np_dtype, max_shard_size, progress, tokenizer, safe_serialization)
                elif to == "hf-flax":
                    out_dtype = _write_hf_flax(tmp, source, np_dtype, max_shard_size, progress, tokenizer)
                elif to == "flax":
                    out_dtype = _write_flax(tmp, source, np_dtype, progress)
                else:
                    mp = shards if shards is not None else mp_from_config or 1
                    out_dtype = _write_mtj(tmp, source, np_dtype, mp, mtj_layout, progress)
        finally:
            progress.close()
    finally:
        source.close()
    summary = ConvertSummary(
        src=src, dst=dst, src_format=source.format, dst_format=to, tensors=progress.tensors,
        parameters=progress.parameters, dtype=dtype_name(out_dtype), bytes=progress.bytes,
        seconds=time.perf_counter() - start,
    )
    if verbose:
        print(summary.line(), flush=True)
    return summary

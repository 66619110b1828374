"""Our Flax checkpoint format: an orbax PyTree checkpoint of the params, plus ``config.json``.

Layout (documented for users in ``docs/checkpoint-format.md``)::

    <ckpt>/config.json        HF-format GPTJConfig, ``architectures`` naming the head
    <ckpt>/params/            orbax PyTree item (OCDBT, uncompressed): the params pytree,
                              nested dicts keyed exactly like the model (``transformer/h_0/attn/...``)

A training run (orbax ``CheckpointManager`` with an item named ``params``) writes the same item per
step, ``<run>/<step>/params/``, with ``config.json`` in ``<run>/`` or ``<run>/<step>/``; pointing
:func:`resolve` (and ``gptj-jax convert``) at ``<run>`` picks the newest step.

Reads go leaf group by leaf group with orbax's ``partial_restore``: into NumPy arrays for conversion
(:class:`FlaxReader`), so converting a Flax checkpoint to another format never holds the whole model,
and straight into the target shardings for :func:`gptj_jax.load`.

:func:`save` (and the converter) write the blocks per layer (``h_0 .. h_{L-1}``); a training run with
``scan_layers: true`` saves its params as they are in memory, stacked (``transformer/h/...`` with a
leading ``[n_layer]`` axis). :class:`FlaxReader` reads both: it tells the layout from the orbax metadata
and shows a stacked item per layer (:meth:`FlaxReader.where`), restoring each stacked leaf once.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import jax
import numpy as np

from gptj_jax.config import GPTJConfig
from gptj_jax.convert import table
from gptj_jax.convert.errors import CheckpointError
from gptj_jax.convert.staging import staged_dir
from gptj_jax.dtypes import dtype_name
from gptj_jax.model import HEADS

PathLike = Union[str, os.PathLike]
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
# orbax writes one of these at the root of every finished item.
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")


def _ocp() -> Any:
    import orbax.checkpoint as ocp

    return ocp


def _is_item(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in _ORBAX_MARKERS)


def _steps(directory: str) -> list[int]:
    """Numeric step subdirectories of a run that hold a finished ``params`` item, ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(n)
        for n in os.listdir(directory)
        if re.fullmatch(r"\d+", n) and _is_item(os.path.join(directory, n, PARAMS_DIR))
    )


def is_flax_checkpoint(path: PathLike) -> bool:
    """True for ``<ckpt>`` with ``params/`` (an orbax item) or a run directory of numbered steps."""
    path = os.fspath(path)
    return _is_item(os.path.join(path, PARAMS_DIR)) or bool(_steps(path))


def resolve(path: PathLike) -> tuple[str, Optional[str]]:
    """``(params item dir, config.json path or None)`` for a checkpoint dir or a run dir (newest step)."""
    path = os.path.abspath(os.fspath(path))
    if _is_item(os.path.join(path, PARAMS_DIR)):
        ckpt = path
    else:
        steps = _steps(path)
        if not steps:
            raise CheckpointError(f"{path}: not a gptj-jax Flax checkpoint (no {PARAMS_DIR}/ orbax item, no <step>/{PARAMS_DIR}/)")
        ckpt = os.path.join(path, str(steps[-1]))
    for candidate in (os.path.join(ckpt, CONFIG_FILE), os.path.join(os.path.dirname(ckpt), CONFIG_FILE)):
        if os.path.isfile(candidate):
            return os.path.join(ckpt, PARAMS_DIR), candidate
    return os.path.join(ckpt, PARAMS_DIR), None


def write_into(directory: str, config: GPTJConfig, params: Mapping[str, Any]) -> None:
    """Write ``config.json`` and ``params/`` into an existing (staging) directory; :func:`save` (and the
    converter) stage one and rename it into place.

    ``params/`` always holds ``lm_head/kernel``; ``config.json`` says ``tie_word_embeddings: true``
    only when ``config`` does and that kernel is ``wte`` transposed bit for bit.
    """
    from gptj_jax.convert.hf import lm_head_tied

    params = table.unstack_layers(params)  # scan_layers params are stored per layer, like every other
    head = table.head_of(params)
    leaves = table.flatten(params)
    embed = leaves["wte/embedding" if head == "base" else "transformer/wte/embedding"]
    config.replace(tie_word_embeddings=lm_head_tied(config, params)).save_pretrained(
        directory, architectures=[HEADS[head].architecture], torch_dtype=dtype_name(embed.dtype)
    )
    # jax arrays, not NumPy: orbax copies NumPy leaves before writing, CPU jax arrays it reads in place.
    tree = jax.tree_util.tree_map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x), dict(params))
    ocp = _ocp()
    # No zstd: weights barely compress (random fp16: 8%), and compressing costs ~10x the save time and
    # holds compressed copies in memory (+70% of the model measured at 768 MB). Any orbax restore
    # (StandardCheckpointer included) reads the result; compressed items written elsewhere read here too.
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, save_concurrent_gb=1)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(os.path.join(os.path.abspath(directory), PARAMS_DIR), args=ocp.args.PyTreeSave(tree))


def save(path: PathLike, config: GPTJConfig, params: Mapping[str, Any], *, overwrite: bool = False) -> None:
    """Save ``params`` (any head) and ``config`` as a gptj-jax Flax checkpoint at ``path``.

    Written in a temporary sibling directory and renamed into place; an existing ``path`` is an
    error unless ``overwrite``.
    """
    from gptj_jax.convert.hf import check_params

    check_params(config, params)
    with staged_dir(path, mode="replace", overwrite=overwrite) as tmp:
        write_into(tmp, config, params)


class FlaxReader:
    """Lazy reader of a Flax checkpoint: shapes from orbax metadata, leaves restored on demand.

    :attr:`paths` are the per-layer paths of the table (``transformer/h_0/...``) whatever the stored
    layout; :attr:`stacked` says whether the item stores the blocks stacked (a ``scan_layers`` training
    run), :attr:`stored_paths` the leaves as stored and :meth:`where` maps one to the other.
    ``read(paths)`` restores just the stored leaves holding ``paths`` (orbax ``partial_restore``) as
    NumPy arrays; a layer of a stacked leaf is a view of it (:func:`table.unstack_layers`).
    """

    def __init__(self, path: PathLike, config: Optional[GPTJConfig] = None):
        self.path = os.fspath(path)
        self.params_dir, config_file = resolve(self.path)
        if config is None:
            if config_file is None:
                raise CheckpointError(f"{self.path}: no {CONFIG_FILE} next to {self.params_dir}; pass config=")
            config = GPTJConfig.from_pretrained(config_file)
        self.config = config
        ocp = _ocp()
        try:
            meta = ocp.PyTreeCheckpointer().metadata(self.params_dir).item_metadata
        except (FileNotFoundError, ValueError, OSError) as e:
            raise CheckpointError(f"{self.params_dir}: cannot read orbax metadata ({type(e).__name__}: {e})") from None
        tree = meta.tree if hasattr(meta, "tree") else meta
        if not isinstance(tree, Mapping):
            raise CheckpointError(f"{self.params_dir}: orbax metadata is not a params tree")
        flat = table.flatten(tree)
        self._shape = {p: tuple(m.shape) for p, m in flat.items()}
        self._dtype = {p: np.dtype(m.dtype) for p, m in flat.items()}
        try:
            self.head = table.head_of(tree)
        except ValueError as e:
            raise CheckpointError(f"{self.params_dir}: {e}") from None
        self.stacked = table.is_stacked(tree)
        expected = table.model_param_shapes(config.replace(scan_layers=self.stacked), self.head)
        model = table.describe(config, self.head) + (" (blocks stacked)" if self.stacked else "")
        table.check_tree(self._shape, expected, where=self.params_dir, what="leaf", model=model)
        self.stored_paths = list(expected)
        self.paths = list(table.expected_param_shapes(config, self.head))
        self._where = {p: table.stacked_path(p) if self.stacked else (p, None) for p in self.paths}
        for p, (stored, layer) in self._where.items():
            if layer is not None:
                self._shape[p], self._dtype[p] = self._shape[stored][1:], self._dtype[stored]

    def where(self, path: str) -> tuple[str, Optional[int]]:
        """``(stored path, layer index)`` of a per-layer ``path``: ``(path, None)`` when the item stores it as
        is, ``("transformer/h/...", i)`` for layer ``i`` of a stacked item."""
        return self._where[path]

    def shape(self, path: str) -> tuple[int, ...]:
        """The shape of a per-layer path or of a stored leaf."""
        return self._shape[path]

    def dtype(self, path: str) -> np.dtype:
        return self._dtype[path]

    def nbytes(self, path: str) -> int:
        return int(np.prod(self._shape[path], dtype=np.int64)) * self._dtype[path].itemsize

    def read(self, paths: Sequence[str]) -> dict[str, np.ndarray]:
        """Restore the leaves at ``paths`` (per-layer paths, our layout) as NumPy arrays; each stored leaf
        they lie in is restored once."""
        stored = list(dict.fromkeys(self._where[p][0] for p in paths))
        restored = table.flatten(table.unstack_layers(table.unflatten(self._restore(stored))))
        return {p: restored[p] for p in paths}

    def _restore(self, paths: Sequence[str]) -> dict[str, np.ndarray]:
        """Restore the stored leaves at ``paths`` as NumPy arrays."""
        ocp = _ocp()
        item = table.unflatten({p: 0 for p in paths})
        restore_args = table.unflatten({p: ocp.RestoreArgs(restore_type=np.ndarray) for p in paths})
        try:
            restored = ocp.PyTreeCheckpointer().restore(
                self.params_dir,
                args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
            )
        except (FileNotFoundError, ValueError, OSError) as e:
            raise CheckpointError(
                f"{self.params_dir}: cannot restore {list(paths)[:3]}... ({type(e).__name__}: {e})"
            ) from None
        flat = table.flatten(restored)
        out = {}
        for p in paths:
            array = np.asarray(flat[p])
            if array.shape != self._shape[p]:
                raise CheckpointError(
                    f"{self.params_dir}: leaf {p!r} restored with shape {table.fmt_shape(array.shape)}, metadata says "
                    f"{table.fmt_shape(self._shape[p])}"
                )
            out[p] = array
        return out

    def groups(self, budget: int) -> list[list[str]]:
        """Per-layer paths in table order, cut into groups of stored leaves of at most ``budget`` bytes (a
        bigger leaf alone). A stacked leaf's layers stay in one group (it is restored once), so a stacked
        item's paths come stored leaf by stored leaf: every layer's ``q_proj``, then every layer's ``k_proj``..."""
        members: dict[str, list[str]] = {}
        for p in self.paths:
            members.setdefault(self._where[p][0], []).append(p)
        out: list[list[str]] = [[]]
        size = 0
        for stored, paths in members.items():
            n = self.nbytes(stored)
            if out[-1] and size + n > budget:
                out.append([])
                size = 0
            out[-1].extend(paths)
            size += n
        return [g for g in out if g]

    def iter_leaves(self, budget: Optional[int] = None) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(path, array)`` in :meth:`groups` order (table order unless stacked), restoring about
        ``budget`` bytes per orbax call (default: the largest stored leaf, so peak memory stays near two)."""
        budget = budget or max(self.nbytes(p) for p in self.stored_paths)
        for group in self.groups(budget):
            arrays = self.read(group)
            for p in group:
                yield p, arrays.pop(p)


def restore(path: PathLike, dtype: Any = None, *, config: Optional[GPTJConfig] = None) -> tuple[GPTJConfig, dict]:
    """``gptj_jax.load(path, dtype=dtype, config=config)`` of a Flax checkpoint (or a run dir's newest step)."""
    from gptj_jax.convert.load import load

    return load(path, dtype=dtype, config=config)

"""Hugging Face Transformers checkpoints <-> our params pytree.

Reading an HF GPT-J directory (``config.json`` plus ``model.safetensors``, ``pytorch_model.bin``, or a
sharded index of either) into ``(GPTJConfig, params)`` is :func:`gptj_jax.load` (``convert/load.py``),
which uses :func:`checked_tensors` here; ``save_pretrained(dir, config, params)`` writes a directory
that ``transformers`` loads with no missing or unexpected keys. Both walk :mod:`gptj_jax.convert.table`.

Tied embeddings (``tie_word_embeddings: true``) follow transformers (5.x): on load a missing
``lm_head.weight`` is ``transformer.wte.weight`` (our ``lm_head/kernel`` is ``wte`` transposed), a
missing ``wte`` is ``lm_head.weight``, and a file holding both keeps both (transformers then does not
tie them, even when they differ); ``lm_head.bias`` is read from the file. On save the flag is written true, and
``lm_head.weight`` left out, only when the config says tied and the params' ``lm_head/kernel``
equals ``wte`` transposed bit for bit; otherwise it is false and both tensors are written.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Optional, Union

import jax
import numpy as np

from gptj_jax.config import GPTJConfig
from gptj_jax.convert import table
from gptj_jax.convert.errors import CheckpointError
from gptj_jax.convert.io import CheckpointReader, Index, SafetensorsWriter, TorchBinWriter, same_bits
from gptj_jax.convert.staging import staged_dir
from gptj_jax.convert.table import architecture_of, head_of  # noqa: F401  (re-exported)
from gptj_jax.dtypes import as_dtype, dtype_name
from gptj_jax.model import HEADS

PathLike = Union[str, os.PathLike]
Params = dict[str, Any]


def check_tensors(
    reader: CheckpointReader, config: GPTJConfig, head: str, names: Optional[Iterable[str]] = None
) -> list[str]:
    """Check the checkpoint's tensors against the shapes ``config`` implies for ``head``.

    Returns the names to load in file order (ignored ``attn.bias`` buffers dropped). Raises
    CheckpointError naming the file, the HF key and both shapes for a missing, unexpected or
    misshapen tensor (:func:`table.check_tree`).
    """
    names = [n for n in (reader.names if names is None else names) if not table.is_ignored_hf(n)]
    table.check_tree(
        {name: reader.shape(name) for name in names},
        table.expected_shapes(config, head),
        where=reader.index_file or reader.files[0],
        model=table.describe(config, head),
        locate=reader.file_of,
    )
    return names


def checked_tensors(reader: CheckpointReader, config: GPTJConfig, path: str) -> tuple[str, list[str]]:
    """``(head, names to load)`` of an HF checkpoint: the head from its tensor names, every tensor
    checked against ``config`` (see :func:`check_tensors`); errors name ``path``.

    With ``config.tie_word_embeddings`` and a causal LM head, one of ``lm_head.weight`` and
    ``transformer.wte.weight`` missing from the files reads the other (:meth:`CheckpointReader.tie`),
    as transformers loads it, and is added to the names; with both present both are read as stored
    (transformers does not tie tensors that both exist, equal or not).
    """
    names = [n for n in reader.names if not table.is_ignored_hf(n)]
    try:
        head = table.head_of_names(names)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if config.tie_word_embeddings and head == "causal_lm":
        pair = [("lm_head.weight", "transformer.wte.weight"), ("transformer.wte.weight", "lm_head.weight")]
        for missing, present in pair:
            if missing not in reader and present in reader:
                reader.tie(missing, present)
                names.append(missing)
    return head, check_tensors(reader, config, head, names)


def read_param(
    reader: CheckpointReader, path: str, index: Optional[Index] = None, dtype: Any = None
) -> np.ndarray:
    """One parameter in *our* layout (``[in, out]`` kernels), or ``param[index]`` read lazily.

    ``path`` is our ``/``-joined path (``transformer/h_0/attn/q_proj/kernel``); ``index`` is a
    tuple of slices over our layout, translated to the file's layout (reversed for transposed
    kernels) so only the slice is read, e.g. the ``[:, 0:512]`` column block one device holds.
    """
    name, transform = table.ours_to_hf(path)
    if index is None:
        array = reader.read(name)
    else:
        index = tuple(index) if isinstance(index, tuple) else (index,)
        if transform == table.TRANSPOSE:
            index = tuple(reversed(index + (slice(None),) * (2 - len(index))))
        array = reader.read_slice(name, index)
    array = table.apply_transform(array, transform, contiguous=True)
    np_dtype = as_dtype(dtype)
    return array.astype(np_dtype) if np_dtype is not None and array.dtype != np_dtype else array


def check_params(config: GPTJConfig, params: Mapping[str, Any]) -> str:
    """Check a params tree against ``config``; returns its head. Raises CheckpointError naming path and shapes."""
    try:
        head = head_of(params)
    except ValueError as e:
        raise CheckpointError(f"params: {e}") from None
    found = {p: np.shape(leaf) for p, leaf in table.flatten(table.unstack_layers(params)).items()}
    table.check_tree(
        found, table.expected_param_shapes(config, head), where="params", what="leaf", model=table.describe(config, head)
    )
    return head


def generation_config_dict(config: GPTJConfig) -> dict:
    """The ``generation_config.json`` transformers derives from a GPT-J config."""
    out: dict[str, Any] = {"_from_model_config": True}
    if config.bos_token_id is not None:
        out["bos_token_id"] = config.bos_token_id
    if config.eos_token_id is not None:
        eos = config.eos_token_id
        out["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
    if config.pad_token_id is not None:
        out["pad_token_id"] = config.pad_token_id
    return out


def lm_head_tied(config: GPTJConfig, params: Mapping[str, Any]) -> bool:
    """True when ``config`` says tied, ``params`` are a causal LM and ``lm_head/kernel`` [D, V] equals
    ``transformer/wte/embedding`` [V, D] transposed, bit for bit (then transformers' tie reproduces it)."""
    if not config.tie_word_embeddings or "lm_head" not in params or "transformer" not in params:
        return False
    kernel, wte = params["lm_head"]["kernel"], params["transformer"]["wte"]["embedding"]
    if kernel.dtype != wte.dtype or tuple(kernel.shape) != tuple(wte.shape)[::-1]:
        return False
    if isinstance(kernel, jax.Array) or isinstance(wte, jax.Array):  # on device; may span processes
        import jax.numpy as jnp

        unsigned = jnp.dtype(f"uint{8 * np.dtype(kernel.dtype).itemsize}")
        bits = jax.lax.bitcast_convert_type
        return bool(jax.jit(lambda k, w: jnp.array_equal(bits(k, unsigned), bits(w, unsigned).T))(kernel, wte))
    return same_bits(np.asarray(kernel), np.asarray(wte).T)


def write_config_files(directory: str, config: GPTJConfig, head: str, dtype: Any, *, tied: bool = False) -> None:
    """``config.json`` (architectures, torch_dtype, ``tie_word_embeddings`` = ``tied``) and ``generation_config.json``.

    ``tied`` must be True only when ``lm_head.weight`` is left out because it equals ``wte``.
    """
    config = config.replace(tie_word_embeddings=tied)
    config.save_pretrained(directory, architectures=[HEADS[head].architecture], torch_dtype=dtype_name(dtype))
    with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation_config_dict(config), f, indent=2, sort_keys=True)
        f.write("\n")


def make_writer(
    directory: str,
    plan: list[tuple[str, tuple[int, ...], np.dtype]],
    max_shard_size: Union[int, str],
    safe_serialization: bool,
) -> Union[SafetensorsWriter, TorchBinWriter]:
    """A streaming safetensors writer (default) or a shard-at-a-time ``.bin`` writer."""
    if safe_serialization:
        return SafetensorsWriter(directory, plan, max_shard_size)
    return TorchBinWriter(directory, plan, max_shard_size)


def save_pretrained(
    path: PathLike,
    config: GPTJConfig,
    params: Mapping[str, Any],
    *,
    max_shard_size: Union[int, str] = "5GB",
    safe_serialization: bool = True,
) -> None:
    """Write ``params`` as an HF GPT-J checkpoint directory that ``transformers`` loads as is.

    Writes ``config.json`` (``architectures`` from the params' head, ``torch_dtype`` from the
    embedding's dtype, ``tie_word_embeddings`` true only when ``config`` says tied and ``lm_head/kernel``
    is ``wte`` transposed bit for bit, with ``lm_head.weight`` then left out, as transformers saves
    tied models; false otherwise), ``generation_config.json`` and
    ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` + index when larger than
    ``max_shard_size``; ``pytorch_model*.bin`` with ``safe_serialization=False``). Everything is
    written in a temporary sibling directory first; an existing ``path`` gets the new files and
    loses stale weight files. Tensors keep their dtypes.
    """
    head = check_params(config, params)
    tied = lm_head_tied(config, params)
    flat = table.flatten(table.unstack_layers(params))  # scan_layers params: written per layer
    plan = []
    for p in table.expected_param_shapes(config, head):
        name, transform = table.ours_to_hf(p)
        if tied and name == "lm_head.weight":
            continue
        leaf = flat[p]
        plan.append((name, table.transform_shape(tuple(np.shape(leaf)), transform), np.dtype(leaf.dtype)))
    embed = flat["wte/embedding" if head == "base" else "transformer/wte/embedding"]
    with staged_dir(path, mode="merge") as tmp:
        writer = make_writer(tmp, plan, max_shard_size, safe_serialization)
        try:
            for name, _, _ in plan:
                p, transform = table.hf_to_ours(name)
                writer.write(name, table.apply_transform(np.asarray(flat[p]), transform, contiguous=True))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        write_config_files(tmp, config, head, embed.dtype, tied=tied)

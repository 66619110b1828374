"""The one mapping table between our parameter pytree and Hugging Face GPT-J state-dict names.

Each row is ``(our path template, HF name template, transform)``. ``{i}`` stands for a layer
index. ``transform`` is ``"T"`` when the array is transposed between the two layouts (Flax Dense
kernels are ``[in, out]``, torch ``nn.Linear`` weights are ``[out, in]``) and ``""`` when it is
copied as is. ``T`` is its own inverse, so the reader (HF -> ours) and the writer (ours -> HF)
both walk these rows and cannot drift apart.

Our paths are ``/``-joined keys of the nested params dict, e.g. ``transformer/h_3/attn/q_proj/kernel``.

Heads (the keys of the registry :data:`gptj_jax.model.HEADS`, which also names each one's HF class):

=========================== ============================== ==============================
head                        HF architecture                extra tensors
=========================== ============================== ==============================
``base``                    ``GPTJModel``                  none; names carry no ``transformer.``
``causal_lm``               ``GPTJForCausalLM``            ``lm_head.weight`` [V, D], ``lm_head.bias`` [V]
``sequence_classification`` ``GPTJForSequenceClassification`` ``score.weight`` [num_labels, D]
``question_answering``      ``GPTJForQuestionAnswering``   ``qa_outputs.weight`` [2, D], ``.bias`` [2]
=========================== ============================== ==============================

:func:`check_tree` is the one check of a tensor tree (an HF checkpoint, a params pytree, a Flax
checkpoint's metadata) against the shapes a config implies: missing, unexpected and misshapen entries.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from gptj_jax.config import GPTJConfig
from gptj_jax.convert.errors import CheckpointError
from gptj_jax.model import HEADS, head_of  # noqa: F401  (head_of re-exported: the registry's one function)

TRANSPOSE = "T"
IDENTITY = ""

# Rows of the base model (GPTJModel), without the "transformer" prefix.
BASE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("wte/embedding", "wte.weight", IDENTITY),
    ("h_{i}/ln_1/scale", "h.{i}.ln_1.weight", IDENTITY),
    ("h_{i}/ln_1/bias", "h.{i}.ln_1.bias", IDENTITY),
    ("h_{i}/attn/q_proj/kernel", "h.{i}.attn.q_proj.weight", TRANSPOSE),
    ("h_{i}/attn/k_proj/kernel", "h.{i}.attn.k_proj.weight", TRANSPOSE),
    ("h_{i}/attn/v_proj/kernel", "h.{i}.attn.v_proj.weight", TRANSPOSE),
    ("h_{i}/attn/out_proj/kernel", "h.{i}.attn.out_proj.weight", TRANSPOSE),
    ("h_{i}/mlp/fc_in/kernel", "h.{i}.mlp.fc_in.weight", TRANSPOSE),
    ("h_{i}/mlp/fc_in/bias", "h.{i}.mlp.fc_in.bias", IDENTITY),
    ("h_{i}/mlp/fc_out/kernel", "h.{i}.mlp.fc_out.weight", TRANSPOSE),
    ("h_{i}/mlp/fc_out/bias", "h.{i}.mlp.fc_out.bias", IDENTITY),
    ("ln_f/scale", "ln_f.weight", IDENTITY),
    ("ln_f/bias", "ln_f.bias", IDENTITY),
)

# Rows of each head's own tensors (no prefix on either side), keyed by the names of model.HEADS.
HEAD_ROWS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "base": (),
    "causal_lm": (
        ("lm_head/kernel", "lm_head.weight", TRANSPOSE),
        ("lm_head/bias", "lm_head.bias", IDENTITY),
    ),
    "sequence_classification": (("score/kernel", "score.weight", TRANSPOSE),),
    "question_answering": (
        ("qa_outputs/kernel", "qa_outputs.weight", TRANSPOSE),
        ("qa_outputs/bias", "qa_outputs.bias", IDENTITY),
    ),
}

# Buffers that old checkpoints carry and transformers ignores on load
# (``_keys_to_ignore_on_load_unexpected`` of GPTJPreTrainedModel).
IGNORED_HF = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")

PREFIX_OURS = "transformer/"
PREFIX_HF = "transformer."


def rows(head: str) -> tuple[tuple[str, str, str], ...]:
    """All rows (templates, with the ``transformer`` prefix applied) for a model with ``head``."""
    if head not in HEAD_ROWS:
        raise ValueError(f"unknown head {head!r}; expected one of {list(HEADS)}")
    if head == "base":
        return BASE_ROWS
    prefixed = tuple((PREFIX_OURS + o, PREFIX_HF + h, t) for o, h, t in BASE_ROWS)
    return prefixed + HEAD_ROWS[head]


def _compile(template: str) -> re.Pattern:
    parts = template.split("{i}")
    return re.compile("^" + r"(\d+)".join(re.escape(p) for p in parts) + "$")


# (regex over HF names, regex over our paths, our template, HF template, transform), over every head.
_MATCHERS: list[tuple[re.Pattern, re.Pattern, str, str, str]] = []
for _head in HEADS:
    for _ours, _hf, _t in rows(_head):
        if not any(m[2] == _ours for m in _MATCHERS):
            _MATCHERS.append((_compile(_hf), _compile(_ours), _ours, _hf, _t))


def hf_to_ours(name: str) -> tuple[str, str]:
    """Map an HF state-dict name to ``(our path, transform)``.

    ``hf_to_ours("transformer.h.3.attn.q_proj.weight") == ("transformer/h_3/attn/q_proj/kernel", "T")``.
    Raises KeyError for a name no row matches (including the ignored ``attn.bias`` buffers).
    """
    for hf_re, _, ours, _, transform in _MATCHERS:
        m = hf_re.match(name)
        if m:
            return (ours.replace("{i}", m.group(1)) if m.groups() else ours), transform
    raise KeyError(f"{name!r} is not a GPT-J tensor name")


def ours_to_hf(path: str) -> tuple[str, str]:
    """Map our ``/``-joined param path to ``(HF name, transform)``; the inverse of :func:`hf_to_ours`."""
    for _, ours_re, _, hf, transform in _MATCHERS:
        m = ours_re.match(path)
        if m:
            return (hf.replace("{i}", m.group(1)) if m.groups() else hf), transform
    raise KeyError(f"{path!r} is not a GPT-J parameter path")


def is_ignored_hf(name: str) -> bool:
    """True for the ``attn.bias`` / ``attn.masked_bias`` buffers of old checkpoints (skipped on load)."""
    return IGNORED_HF.match(name) is not None


def _base_shapes(config: GPTJConfig) -> dict[str, tuple[int, ...]]:
    """HF shapes of the rows of BASE_ROWS for one layer template / the non-layer tensors."""
    d, f, v = config.n_embd, config.inner_dim, config.vocab_size
    return {
        "wte.weight": (v, d),
        "h.{i}.ln_1.weight": (d,),
        "h.{i}.ln_1.bias": (d,),
        "h.{i}.attn.q_proj.weight": (d, d),
        "h.{i}.attn.k_proj.weight": (d, d),
        "h.{i}.attn.v_proj.weight": (d, d),
        "h.{i}.attn.out_proj.weight": (d, d),
        "h.{i}.mlp.fc_in.weight": (f, d),
        "h.{i}.mlp.fc_in.bias": (f,),
        "h.{i}.mlp.fc_out.weight": (d, f),
        "h.{i}.mlp.fc_out.bias": (d,),
        "ln_f.weight": (d,),
        "ln_f.bias": (d,),
    }


def _head_shapes(config: GPTJConfig, head: str) -> dict[str, tuple[int, ...]]:
    d = config.n_embd
    return {
        "base": {},
        "causal_lm": {"lm_head.weight": (config.vocab_size, d), "lm_head.bias": (config.vocab_size,)},
        "sequence_classification": {"score.weight": (config.num_labels, d)},
        "question_answering": {"qa_outputs.weight": (2, d), "qa_outputs.bias": (2,)},
    }[head]


def expected_shapes(config: GPTJConfig, head: str) -> dict[str, tuple[int, ...]]:
    """``{HF name: HF shape}`` of every tensor a ``head`` checkpoint for ``config`` holds, in table order.

    E.g. for GPT-J-6B causal LM: ``transformer.wte.weight`` (50400, 4096),
    ``transformer.h.0.mlp.fc_in.weight`` (16384, 4096), ..., ``lm_head.bias`` (50400,).
    """
    if head not in HEAD_ROWS:
        raise ValueError(f"unknown head {head!r}; expected one of {list(HEADS)}")
    prefix = "" if head == "base" else PREFIX_HF
    base = _base_shapes(config)
    out: dict[str, tuple[int, ...]] = {}
    for _, hf, _ in BASE_ROWS:
        if "{i}" in hf:
            continue
        if hf == "ln_f.weight":  # keep table order: embedding, layers, final norm
            for i in range(config.n_layer):
                for _, hf_l, _ in BASE_ROWS:
                    if "{i}" in hf_l:
                        out[prefix + hf_l.replace("{i}", str(i))] = base[hf_l]
        out[prefix + hf] = base[hf]
    out.update(_head_shapes(config, head))
    return out


def transform_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    """The shape on the other side of ``transform`` (reversed for ``"T"``)."""
    return tuple(reversed(shape)) if transform == TRANSPOSE else tuple(shape)


def transpose_copy(array: np.ndarray, rows: int = 16, cols: int = 4096) -> np.ndarray:
    """``np.ascontiguousarray(array.T)`` for a 2-D NumPy array, tile by tile.

    NumPy's plain strided copy walks one side a full row apart per element; copying 16 x 4096
    tiles keeps both sides in cache and is 3-7x faster on GPT-J shapes (measured on 2 cores:
    one 1.3B layer 0.86 s -> 0.15 s, its 50400 x 2048 lm_head 2.5 s -> 0.36 s, float16).
    """
    out = np.empty(array.shape[::-1], array.dtype)
    for i in range(0, array.shape[0], rows):
        for j in range(0, array.shape[1], cols):
            out[j : j + cols, i : i + rows] = array[i : i + rows, j : j + cols].T
    return out


def apply_transform(array: Any, transform: str, contiguous: bool = False) -> Any:
    """Apply ``transform`` to an array (numpy, jax or torch 2-D: ``.T``); the same call goes both ways.

    ``contiguous=True`` (NumPy only) returns a C-contiguous copy for ``"T"`` (via
    :func:`transpose_copy`) instead of a strided view.
    """
    if transform == TRANSPOSE:
        if array.ndim != 2:
            raise ValueError(f"transpose expects a 2-D array, got shape {tuple(array.shape)}")
        return transpose_copy(array) if contiguous else array.T
    if transform != IDENTITY:
        raise ValueError(f"unknown transform {transform!r}")
    return array


def expected_param_shapes(config: GPTJConfig, head: str) -> dict[str, tuple[int, ...]]:
    """``{our path: shape}`` for ``head`` (kernels ``[in, out]``), derived from :func:`expected_shapes`."""
    out = {}
    for name, shape in expected_shapes(config, head).items():
        path, transform = hf_to_ours(name)
        out[path] = transform_shape(shape, transform)
    return out


def model_param_shapes(config: GPTJConfig, head: str) -> dict[str, tuple[int, ...]]:
    """``{our path: shape}`` of the params the model for ``config`` holds: :func:`expected_param_shapes`, with
    the blocks stacked (``transformer/h/...`` ``[n_layer, ...]``) when ``config.scan_layers``."""
    shapes = expected_param_shapes(config, head)
    if not config.scan_layers:
        return shapes
    stacked = stack_layers(unflatten(shapes), stack=lambda leaves: (len(leaves),) + tuple(leaves[0]))
    return flatten(stacked)


# ---------------------------------------------------------------------- checks
def fmt_shape(shape: Sequence[int]) -> str:
    """A shape as Python prints a tuple of ints: ``(2, 3)``, ``(5,)``, ``()`` (numpy / torch sizes too)."""
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def describe(config: GPTJConfig, head: str) -> str:
    """``"a GPT-J GPTJForCausalLM with n_layer=2, n_embd=32, n_inner=128, vocab_size=101"``: what
    :func:`expected_shapes` describes, for error messages."""
    return (
        f"a GPT-J {HEADS[head].architecture} with n_layer={config.n_layer}, n_embd={config.n_embd}, "
        f"n_inner={config.inner_dim}, vocab_size={config.vocab_size}"
    )


def check_tree(
    found: Mapping[str, Sequence[int]],
    expected: Mapping[str, Sequence[int]],
    *,
    where: str,
    what: str = "tensor",
    model: str = "",
    locate: Optional[Callable[[str], str]] = None,
) -> None:
    """Raise CheckpointError unless ``found`` holds exactly the names of ``expected``, with the same shapes.

    Both map a name (an HF key, a ``/``-joined leaf path, ...) to a shape. The first problem is
    reported: an unexpected name (in ``found``'s order), else a misshapen one, else a missing one (in
    ``expected``'s order). The message starts with the location (``locate(name)`` for a name in
    ``found``, e.g. its shard file; ``where`` otherwise), calls the entry ``what`` and gives its name
    and both shapes; ``model`` (see :func:`describe`) says what ``expected`` describes. When there is
    more than one problem it ends with all of them by kind (the first four names of each).
    """
    locate = locate or (lambda name: where)
    unexpected = [n for n in found if n not in expected]
    misshapen = [n for n in expected if n in found and tuple(found[n]) != tuple(expected[n])]
    missing = [n for n in expected if n not in found]
    if unexpected:
        name = unexpected[0]
        message = f"{locate(name)}: unexpected {what} {name!r} {fmt_shape(found[name])}"
        message += f": not part of {model}" if model else ""
    elif misshapen:
        name = misshapen[0]
        message = (
            f"{locate(name)}: {what} {name!r} has shape {fmt_shape(found[name])} but the config implies "
            f"{fmt_shape(expected[name])}"
        )
        message += f" ({model})" if model else ""
    elif missing:
        name = missing[0]
        message = f"{where}: missing {what} {name!r}, expected shape {fmt_shape(expected[name])}"
        message += f" for {model}" if model else ""
    else:
        return
    kinds = (("unexpected", unexpected), ("misshapen", misshapen), ("missing", missing))
    total = sum(len(names) for _, names in kinds)
    if total > 1:
        listed = (f"{kind} {names[:4]}{' ...' if len(names) > 4 else ''}" for kind, names in kinds if names)
        message += f"; {total} problems in all: " + ", ".join(listed)
    raise CheckpointError(message)


# ---------------------------------------------------------------------- pytree helpers
def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a/b/c": leaf}`` (insertion order)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` -> nested dicts."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        keys = path.split("/")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return out


# ---------------------------------------------------------------------- stacked layers (scan_layers)
# The one generic step between the per-layer layout every table above speaks (``h_{i}/...``) and the
# stacked layout of ``GPTJConfig.scan_layers`` (``h/...`` with a leading [n_layer] axis): readers map
# names through the tables per layer and then stack; writers unstack and then walk the tables.
_LAYER_KEY = re.compile(r"^h_(\d+)$")
STACKED_KEY = "h"


def _layer_parent(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """The dict holding the blocks: ``params["transformer"]`` or, for a bare model, ``params``."""
    return params["transformer"] if "transformer" in params and isinstance(params["transformer"], Mapping) else params


def is_stacked(params: Mapping[str, Any]) -> bool:
    """True when ``params`` holds the blocks stacked (``transformer/h/...``), as ``scan_layers`` models do."""
    return STACKED_KEY in _layer_parent(params)


def stack_layers(params: Mapping[str, Any], stack: Optional[Callable[[list], Any]] = None) -> dict[str, Any]:
    """Per-layer params (``h_0 .. h_{L-1}``) -> stacked (``h``, every leaf ``[L, ...]``), other keys as they are.

    ``stack`` joins the L leaves of one path (default: ``jnp.stack`` for jax arrays, ``np.stack`` otherwise).
    Raises CheckpointError when the layers are not ``h_0 .. h_{L-1}`` or differ in their leaves.
    """
    parent = _layer_parent(params)
    layers = sorted((int(m.group(1)), k) for k in parent if (m := _LAYER_KEY.match(k)))
    if [i for i, _ in layers] != list(range(len(layers))) or not layers:
        raise CheckpointError(f"cannot stack layers {[k for _, k in layers]}: expected h_0 .. h_N")
    flats = [flatten(parent[k]) for _, k in layers]
    for (_, key), flat in zip(layers, flats):
        if list(flat) != list(flats[0]):
            raise CheckpointError(f"cannot stack layers: {key} has leaves {list(flat)}, h_0 {list(flats[0])}")

    def default(leaves: list) -> Any:
        if isinstance(leaves[0], np.ndarray):
            return np.stack(leaves)
        import jax.numpy as jnp

        return jnp.stack(leaves)

    stack = stack or default
    stacked = unflatten({path: stack([flat[path] for flat in flats]) for path in flats[0]})
    first = layers[0][1]
    out_parent: dict[str, Any] = {}
    for key, value in parent.items():  # keep the table's order: the stack where h_0 was
        if key == first:
            out_parent[STACKED_KEY] = stacked
        elif not _LAYER_KEY.match(key):
            out_parent[key] = value
    if parent is params:
        return out_parent
    return {k: (out_parent if k == "transformer" else v) for k, v in params.items()}


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`stack_layers`: stacked ``h`` -> ``h_0 .. h_{L-1}`` (views / slices, no math).
    Params that are not stacked are returned as they are."""
    if not is_stacked(params):
        return dict(params)
    parent = _layer_parent(params)
    flat = flatten(parent[STACKED_KEY])
    n = {int(np.shape(leaf)[0]) for leaf in flat.values()}
    if len(n) != 1:
        raise CheckpointError(f"stacked layers disagree on the layer count: {sorted(n)}")
    out_parent: dict[str, Any] = {}
    for key, value in parent.items():
        if key == STACKED_KEY:
            for i in range(n.pop() if n else 0):
                out_parent[f"h_{i}"] = unflatten({path: leaf[i] for path, leaf in flat.items()})
        else:
            out_parent[key] = value
    if parent is params:
        return out_parent
    return {k: (out_parent if k == "transformer" else v) for k, v in params.items()}


_LAYER_PATH = re.compile(r"^((?:.*/)?)h_(\d+)/(.+)$")


def stacked_path(path: str) -> tuple[str, Optional[int]]:
    """Where a per-layer path lies in the stacked layout: ``transformer/h_3/attn/q_proj/kernel`` ->
    ``("transformer/h/attn/q_proj/kernel", 3)``; a path outside the blocks -> ``(path, None)``."""
    m = _LAYER_PATH.match(path)
    if m is None:
        return path, None
    return f"{m.group(1)}{STACKED_KEY}/{m.group(3)}", int(m.group(2))


def architecture_of(params: Mapping[str, Any]) -> str:
    """The HF class name for a params tree, e.g. ``GPTJForCausalLM``."""
    return HEADS[head_of(params)].architecture


def head_of_names(names: Iterable[str]) -> str:
    """Which head an HF checkpoint is for, from its tensor names (``lm_head.*`` -> causal_lm, ...).

    Raises ValueError when the names mix heads or fit none.
    """
    names = set(names)
    found = [
        head
        for head, head_rows in HEAD_ROWS.items()
        if head != "base" and any(r[1] in names for r in head_rows)
    ]
    if len(found) > 1:
        raise ValueError(f"checkpoint holds tensors of several heads: {found}")
    if found:
        return found[0]
    if any(n.startswith(PREFIX_HF) for n in names):
        # A prefixed checkpoint without head tensors: a GPTJForCausalLM missing lm_head is the
        # likeliest reading; report it as causal_lm so validation names the missing tensors.
        return "causal_lm"
    return "base"


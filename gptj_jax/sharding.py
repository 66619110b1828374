"""Meshes, the logical-axis rules table, and shardings for params, optimizer state, KV cache and batches.

The model names the axes of every parameter logically (``model.logical_axes``: ``embed``, ``heads``,
``mlp``, ``vocab``, ``norm``, ``classes``). One ordered table, :data:`DEFAULT_RULES`, maps each
logical name to a mesh axis of a ``("dp", "fsdp", "mp")`` mesh (MaxText's scheme): changing the
parallelism is editing the table, not the model.

The defaults mirror mesh-transformer-jax's Megatron split on ``mp``: q/k/v and fc_in are split by
output columns (``heads``, ``mlp``), out_proj and fc_out by input rows (the same names on their
first axis), wte and lm_head by vocabulary; ``fsdp`` splits the other (``embed``) dimension of every
matrix (ZeRO-3 style, all-gathered before use); batches are split over ``("dp", "fsdp")``; LayerNorm
is replicated. For a ``q_proj`` kernel ``[D, D]`` (logical ``("embed", "heads")``) each device holds
``[D / fsdp, D / mp]``.

Resolving a logical spec (MaxText's rule): for each dimension, the first rule for its name whose
mesh axes are not already used by an earlier dimension of the same array wins; a rule target of
``None`` means replicated. A logical name with no rule is an error.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .cache import cache_axes, init_cache
from .config import GPTJConfig
from .model import HEADS, head_of, logical_axes, model_for

MESH_AXES: tuple[str, str, str] = ("dp", "fsdp", "mp")

MeshAxes = Union[None, str, tuple[str, ...]]
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    # activations
    ("batch", ("dp", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("head_dim", None),
    ("layers", None),  # the stacked axis of scan_layers params and cache: every device holds every layer
    # parameters (names from model.py)
    ("vocab", "mp"),
    ("heads", "mp"),
    ("mlp", "mp"),
    ("embed", "fsdp"),
    ("norm", None),
    ("classes", None),
)

# Logical axes of the non-parameter arrays.
BATCH_AXES = ("batch", "length")  # input_ids, attention_mask, position_ids, labels [B, T]
LOGITS_AXES = ("batch", "length", "vocab")  # logits [B, T, V]
# The KV cache's logical axes are cache.CACHE_AXES (its one layout); cache_shardings maps them.

# Which config size each logical parameter axis splits, for error messages naming the numbers.
def _split_sizes(config: GPTJConfig, head: str) -> tuple[tuple[str, str, int], ...]:
    sizes = [
        ("heads", "n_head", config.n_head),
        ("mlp", "n_inner", config.inner_dim),
        ("vocab", "vocab_size", config.vocab_size),
        ("embed", "n_embd", config.n_embd),
        ("norm", "n_embd", config.n_embd),
    ]
    classes = HEADS[head].num_classes(config) if head in HEADS else None
    if classes is not None:
        sizes.append(("classes", HEADS[head].classes_field, classes))
    return tuple(sizes)


# ---------------------------------------------------------------------------------------- meshes
def parse_mesh(text: str, *, rest: Optional[str] = None) -> dict[str, int]:
    """``"dp=1,fsdp=2,mp=4"`` -> ``{"dp": 1, "fsdp": 2, "mp": 4}`` (missing axes are 1; ``-1`` = the rest).

    ``rest``: an axis that takes the rest of the devices (``-1``) when ``text`` does not name it and no
    axis is ``-1`` (``parse_mesh("mp=8", rest="dp")`` -> ``{"dp": -1, "fsdp": 1, "mp": 8}``).
    """
    if rest is not None and rest not in MESH_AXES:
        raise ValueError(f"rest={rest!r} is not a mesh axis; the axes are {', '.join(MESH_AXES)}")
    sizes = {name: 1 for name in MESH_AXES}
    seen = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"mesh entry {part!r} in {text!r} is not NAME=SIZE; e.g. 'dp=1,fsdp=1,mp=8'")
        name, value = (s.strip() for s in part.split("=", 1))
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r} in {text!r}; the axes are {', '.join(MESH_AXES)}")
        if name in seen:
            raise ValueError(f"mesh axis {name!r} given twice in {text!r}")
        seen.add(name)
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh axis {name}={value!r} in {text!r} is not an integer") from None
    if rest is not None and rest not in seen and -1 not in sizes.values():
        sizes[rest] = -1
    return sizes


def resolve_mesh_shape(dp: int = 1, fsdp: int = 1, mp: int = 1, n_devices: Optional[int] = None) -> tuple[int, int, int]:
    """Fill in a ``-1`` axis ("the rest") and check the product equals ``n_devices`` (default: all devices)."""
    if n_devices is None:
        n_devices = jax.device_count()
    sizes = {"dp": dp, "fsdp": fsdp, "mp": mp}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name}={size!r} must be a positive integer or -1 (the rest)")
    rest = [n for n, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"only one mesh axis may be -1 (the rest), got {', '.join(f'{n}=-1' for n in rest)}")
    if rest:
        known = math.prod(s for s in sizes.values() if s != -1)
        if n_devices % known:
            raise ValueError(
                f"cannot fill {rest[0]}=-1: the other axes multiply to {known}, which does not divide "
                f"the {n_devices} devices"
            )
        sizes[rest[0]] = n_devices // known
    shape = (int(sizes["dp"]), int(sizes["fsdp"]), int(sizes["mp"]))
    if math.prod(shape) != n_devices:
        raise ValueError(
            f"mesh dp={shape[0]} x fsdp={shape[1]} x mp={shape[2]} = {math.prod(shape)} devices, "
            f"but {n_devices} devices are available"
        )
    return shape


def make_mesh(dp: int = 1, fsdp: int = 1, mp: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ``("dp", "fsdp", "mp")`` mesh over ``devices`` (default ``jax.devices()``, every process's).

    ``-1`` on one axis means "the rest of the devices". The device order comes from
    ``mesh_utils.create_device_mesh`` so that on TPU the ``mp`` axis (the most communication)
    runs along ICI neighbours.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(dp, fsdp, mp, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        # Topology-aware placement can refuse some shapes (e.g. a TPU slice split oddly): plain order.
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def mesh_from_string(text: str, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """``make_mesh(**parse_mesh(text), devices=devices)``."""
    return make_mesh(**parse_mesh(text), devices=devices)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    """``{"dp": .., "fsdp": .., "mp": ..}`` of a mesh."""
    return {name: int(size) for name, size in mesh.shape.items()}


def describe_mesh(mesh: Mesh) -> str:
    """``"dp=1,fsdp=2,mp=4"``."""
    return ",".join(f"{k}={v}" for k, v in mesh_shape(mesh).items())


# ---------------------------------------------------------------------------------------- rules
def as_axes(target: MeshAxes) -> tuple[str, ...]:
    """A rule target (None, an axis name or a tuple of them) as a tuple of axis names."""
    if target is None:
        return ()
    if isinstance(target, str):
        return (target,)
    return tuple(target)


def validate_rules(rules: Rules, axis_names: Sequence[str] = MESH_AXES) -> None:
    """Raise ValueError for a rule targeting a mesh axis that does not exist."""
    for name, target in rules:
        for axis in as_axes(target):
            if axis not in axis_names:
                raise ValueError(
                    f"rule ({name!r}, {target!r}) names unknown mesh axis {axis!r}; the axes are {', '.join(axis_names)}"
                )


def logical_to_mesh(names: Sequence[Optional[str]], rules: Rules = DEFAULT_RULES) -> P:
    """One array's logical axis names -> a ``PartitionSpec`` of mesh axes, by the ordered rules."""
    validate_rules(rules)
    used: set[str] = set()
    out: list[MeshAxes] = []
    known = {name for name, _ in rules}
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in known:
            raise ValueError(f"logical axis {name!r} has no rule; rules cover {sorted(known)}")
        chosen: MeshAxes = None
        for rule_name, target in rules:
            if rule_name != name:
                continue
            axes = as_axes(target)
            if not axes:
                break  # an explicit "replicated" rule
            if used.isdisjoint(axes):
                chosen = axes[0] if len(axes) == 1 else axes
                used.update(axes)
                break
        out.append(chosen)
    return P(*out)


def drop_trivial_axes(spec: P, mesh: Mesh) -> P:
    """``spec`` without the mesh axes of size 1 (same layout; lets ``shard_map`` skip no-op collectives)."""
    out: list[MeshAxes] = []
    for target in tuple(spec):
        axes = tuple(a for a in as_axes(target) if int(mesh.shape[a]) > 1)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def _map_specs(fn, tree: Any) -> Any:
    return jax.tree.map(fn, tree, is_leaf=_is_spec)


def axis_size(mesh: Mesh, target: MeshAxes) -> int:
    """Product of the sizes of the mesh axes in ``target`` (1 for None)."""
    return math.prod(int(mesh.shape[a]) for a in as_axes(target))


def validate_config(config: GPTJConfig, mesh: Mesh, head: str = "causal_lm", rules: Rules = DEFAULT_RULES) -> None:
    """Raise ValueError naming the numbers when a mesh axis does not divide the size it splits.

    E.g. ``mesh axis mp=8 does not divide n_head=4 ('heads' is split over mp)``. Heads must split
    whole (``n_head % mp == 0``), not just the ``n_embd`` columns they occupy.
    """
    validate_rules(rules, tuple(mesh.axis_names))
    for logical, field, size in _split_sizes(config, head):
        target = logical_to_mesh((logical,), rules)[0]
        n = axis_size(mesh, target)
        if size % n:
            axes = " x ".join(f"{a}={mesh.shape[a]}" for a in as_axes(target))
            fits = [d for d in range(1, n + 1) if size % d == 0]
            raise ValueError(
                f"mesh axis {axes} does not divide {field}={size} ({logical!r} is split over "
                f"{' x '.join(as_axes(target))} by the rules); sizes up to {n} that divide it: {fits}"
            )


# ---------------------------------------------------------------------------------------- params
def param_specs(config: GPTJConfig, head: str = "causal_lm", rules: Rules = DEFAULT_RULES) -> Any:
    """PartitionSpec pytree (mesh axes) like the params of ``head``; no arrays are made."""
    return _map_specs(lambda spec: logical_to_mesh(tuple(spec), rules), logical_axes(config, head))


def param_shardings(config: GPTJConfig, mesh: Mesh, head: str = "causal_lm", rules: Rules = DEFAULT_RULES) -> Any:
    """NamedSharding pytree like the params of ``head`` on ``mesh`` (validated against the config)."""
    validate_config(config, mesh, head, rules)
    return _map_specs(lambda spec: NamedSharding(mesh, spec), param_specs(config, head, rules))


def shard_params(
    params: Any, mesh: Mesh, config: GPTJConfig, head: Optional[str] = None, rules: Rules = DEFAULT_RULES
) -> Any:
    """Place every leaf (numpy or jax) on ``mesh`` with its rule sharding; each device gets only its slice.

    ``head`` is read from the params' keys (``model.head_of``) when None. Leaves keep their dtype.
    Raises ValueError (``CheckpointError``) naming the leaf and both shapes when the tree is not the
    one ``config`` implies (a missing, unexpected or misshapen leaf).
    """
    from . import quantize
    from .convert import table

    head = head or head_of(params)
    shardings = param_shardings(config, mesh, head, rules)
    if quantize.is_quantized(params):  # QuantizedArray leaves: check the float shapes, place q and scale
        shardings = quantize.shardings(params, shardings)
        params_q, params = params, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if quantize.is_quantized_leaf(x) else x,
            params, is_leaf=quantize.is_quantized_leaf)
    keystr = lambda path: "".join(f"[{k!r}]" for k in path.split("/"))  # jax.tree_util.keystr's spelling
    table.check_tree(
        {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]},
        {keystr(p): shape for p, shape in table.model_param_shapes(config, head).items()},
        where=f"params (head {head!r}) do not match the config's parameter tree",
        what="leaf",
        model=table.describe(config, head),
    )
    if quantize.is_quantized(shardings):
        return jax.device_put(params_q, shardings)
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)


def init_sharded_params(
    config: GPTJConfig,
    mesh: Mesh,
    rng: jax.Array,
    head: str = "causal_lm",
    param_dtype: Any = jnp.float32,
    rules: Rules = DEFAULT_RULES,
) -> Any:
    """Random params created directly in their shards (``jit`` with ``out_shardings``): no full host copy.

    With JAX's partitionable threefry (the default) the values equal ``model.init_params``.
    """
    shardings = param_shardings(config, mesh, head, rules)
    module = model_for(config, head, param_dtype=param_dtype)

    def init(key: jax.Array) -> Any:
        return nn.meta.unbox(module.init(key, jnp.zeros((1, 1), jnp.int32))["params"])

    return jax.jit(init, out_shardings=shardings)(rng)


def shardings_like(tree: Any, params: Any, param_shardings: Any) -> Any:
    """Shardings for a tree (e.g. optax state) whose sub-trees mirror ``params``.

    A leaf whose key path ends with a param's key path and has that param's shape gets the param's
    sharding (Adam's mu / nu, gradients); every other leaf (step counts, scalars, factored
    statistics) is replicated. ``tree`` and ``params`` may hold arrays or ``ShapeDtypeStruct``.
    """
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shard = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(flat_params) != len(flat_shard):
        raise ValueError(f"params have {len(flat_params)} leaves but param_shardings {len(flat_shard)}")
    by_path = {_path_key(path): (np.shape(leaf), s) for (path, leaf), s in zip(flat_params, flat_shard)}
    mesh = flat_shard[0].mesh
    replicated = NamedSharding(mesh, P())
    max_len = max(len(k) for k in by_path)

    def pick(path, leaf):
        key = _path_key(path)
        shape = np.shape(leaf)
        for start in range(max(len(key) - max_len, 0), len(key)):
            hit = by_path.get(key[start:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def _path_key(path: Sequence[Any]) -> tuple[str, ...]:
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(f"[{k.idx}]")
        else:
            out.append(str(k))
    return tuple(out)


def opt_state_shardings(optimizer: Any, params: Any, param_shardings: Any) -> Any:
    """Shardings for ``optimizer.init(params)`` (an optax ``GradientTransformation``), computed abstractly."""
    abstract = jax.eval_shape(optimizer.init, params)
    return shardings_like(abstract, params, param_shardings)


# ---------------------------------------------------------------------------------------- data
def logical_sharding(mesh: Mesh, names: Sequence[Optional[str]], rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """NamedSharding for an array with the given logical axis names."""
    return NamedSharding(mesh, logical_to_mesh(names, rules))


def check_batch(mesh: Mesh, batch_size: int, rules: Rules = DEFAULT_RULES) -> None:
    """Raise ValueError when the batch does not split over the batch mesh axes."""
    target = logical_to_mesh(("batch",), rules)[0]
    n = axis_size(mesh, target)
    if batch_size % n:
        axes = " x ".join(f"{a}={mesh.shape[a]}" for a in as_axes(target))
        raise ValueError(
            f"batch size {batch_size} does not split over the batch axes {axes} = {n}; "
            f"use a batch that is a multiple of {n} (or a mesh with fewer data-parallel devices)"
        )


def batch_sharding(mesh: Mesh, batch_size: Optional[int] = None, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """NamedSharding for ``[B, T]`` batches (ids, masks, positions, labels): rows over ``("dp", "fsdp")``."""
    if batch_size is not None:
        check_batch(mesh, batch_size, rules)
    return logical_sharding(mesh, BATCH_AXES, rules)


def logits_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """NamedSharding for ``[B, T, V]`` logits: rows over the batch axes, vocab over ``mp``."""
    return logical_sharding(mesh, LOGITS_AXES, rules)


def shard_batch(mesh: Mesh, *arrays: Any, rules: Rules = DEFAULT_RULES) -> tuple[jax.Array, ...]:
    """``device_put`` each ``[B, T]`` (or ``[B]``) host array with the batch sharding (single process)."""
    out = []
    for a in arrays:
        check_batch(mesh, np.shape(a)[0], rules)
        names = BATCH_AXES[: np.ndim(a)] + (None,) * max(np.ndim(a) - 2, 0)
        out.append(jax.device_put(a, logical_sharding(mesh, names, rules)))
    return tuple(out)


def cache_shardings(config: GPTJConfig, mesh: Mesh, cache: Any, rules: Rules = DEFAULT_RULES) -> Any:
    """Shardings like ``cache`` (``cache.init_cache``'s layout; arrays, tracers or ``ShapeDtypeStruct``).

    The one cache sharding (generation, ``plan`` and the benchmarks use it): the logical axes of
    ``cache.CACHE_AXES`` through ``rules``, so with the defaults k / v ``[B, N, S, H]`` have rows over the
    batch axes and heads over ``mp``, an int8 cache's scales ``[B, N, S, 1]`` likewise, and mask ``[B, S]``,
    index ``[B]`` and lengths ``[B]`` are split by rows.
    """
    validate_config(config, mesh, "base", rules)
    check_batch(mesh, int(np.shape(cache["mask"])[0]), rules)
    return jax.tree.map(
        lambda names: logical_sharding(mesh, names, rules), cache_axes(cache), is_leaf=lambda x: isinstance(x, tuple)
    )


def init_sharded_cache(
    config: GPTJConfig, mesh: Mesh, batch_size: int, max_len: int, dtype: Any = jnp.float32, rules: Rules = DEFAULT_RULES,
    kv_cache: Optional[str] = None,
) -> Any:
    """An empty cache created directly in its shards (never whole on one device); ``kv_cache``: ``init_cache``'s."""
    make = functools.partial(init_cache, config, batch_size, max_len, dtype, kv_cache)
    shardings = cache_shardings(config, mesh, jax.eval_shape(make), rules)
    return jax.jit(make, out_shardings=shardings)()


def abstract_params(
    config: GPTJConfig, mesh: Mesh, head: str = "causal_lm", param_dtype: Any = jnp.float32, rules: Rules = DEFAULT_RULES
) -> Any:
    """``ShapeDtypeStruct`` params carrying their shardings (for AOT lowering; no arrays are made)."""
    module = model_for(config, head, param_dtype=param_dtype)
    boxed = jax.eval_shape(lambda k: module.init(k, jnp.zeros((1, 1), jnp.int32))["params"], jax.random.PRNGKey(0))
    return jax.tree.map(
        lambda s, shd: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shd),
        nn.meta.unbox(boxed),
        param_shardings(config, mesh, head, rules),
    )


# ---------------------------------------------------------------------------------------- accounting
def shard_shapes(tree: Any) -> Any:
    """Per-device shard shape of every leaf (global shape for leaves without a sharding)."""

    def one(x):
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            return tuple(np.shape(x))
        return tuple(sharding.shard_shape(tuple(x.shape)))

    return jax.tree.map(one, tree)


def device_bytes(tree: Any, device: Optional[Any] = None) -> int:
    """Bytes of ``tree``'s shards held by ``device`` (default: the first local device)."""
    device = device or jax.local_devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            if shard.device == device:
                total += shard.data.nbytes
    return total


def tree_bytes(tree: Any) -> int:
    """Global bytes of a tree of arrays or ``ShapeDtypeStruct``."""
    return sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def sharded_bytes(tree: Any, shardings: Any) -> int:
    """Per-device bytes (the largest over devices is the same for even splits) of ``tree`` under ``shardings``."""
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(leaves) != len(shards):
        raise ValueError(f"tree has {len(leaves)} leaves but shardings {len(shards)}")
    return sum(
        math.prod(s.shard_shape(tuple(np.shape(x)))) * np.dtype(x.dtype).itemsize for x, s in zip(leaves, shards)
    )


def unshard(tree: Any) -> Any:
    """Whole numpy copies of a tree of (possibly multi-process) arrays, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)

"""Per-device memory and FLOPs of a step on a mesh, before renting the hardware (``gptj-jax plan``).

The steps are compiled ahead of time on abstract inputs (``ShapeDtypeStruct`` with shardings; no
weights are made) for simulated CPU devices, and ``compiled.memory_analysis()`` gives the per-device
argument, output, temporary and aliased bytes. Analytic counts (params, optimizer state, gradients,
KV cache from the shardings; a rough activation estimate) are printed next to them as a cross-check,
followed by FLOPs per step and a fits / does-not-fit table for common accelerator hosts.

Steps:

* inference: ``prefill`` (the prompt ``[batch, seq]`` through the model, filling a ``seq``-slot KV
  cache, last-position logits) and ``decode`` (one token per row against the full cache), both the
  model call ``generate`` compiles (``generation.forward_cached``) with the cache of ``cache.init_cache``
  sharded by ``sharding.cache_shardings``.
* ``--train``: the fine-tuning step of ``gptj_jax.train.step`` (forward, backward, mtj's Adam chain,
  donated state) on a ``[grad_accum, batch, seq + 1]`` token batch.

CPU compilation is a proxy for TPU / GPU: XLA's CPU backend fuses differently and may upcast
bfloat16 matmuls, so temporaries are an estimate; params, optimizer state and cache are exact.

    n = check_mesh(config, sizes, batch, seq, train=True)      # everything checked, no device made yet
    plan = make_plan(config, sizes, batch, seq, train=True, devices=simulated_devices(n))
    print(format_plan(plan))                                    # or plan_dict(plan) (JSON); fits_table(plan)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from gptj_jax.dtypes import DTYPE_NAMES

GiB = 1024**3

# (name, devices per host, bytes of memory per device)
HARDWARE: tuple[tuple[str, int, int], ...] = (
    ("TPU v2-8", 8, 8 * GiB),
    ("TPU v3-8", 8, 16 * GiB),
    ("TPU v4-8", 4, 32 * GiB),
    ("TPU v5e-8", 8, 16 * GiB),
    ("8x A100 40GB", 8, 40 * GiB),
    ("8x A100 80GB", 8, 80 * GiB),
    ("8x H100 80GB", 8, 80 * GiB),
)
# A plan "fits" below this share of device memory; between it and 1.0 it is "tight" (runtime
# reservations, fragmentation and CPU-vs-accelerator fusion differences eat the rest).
HEADROOM = 0.9


@dataclasses.dataclass
class StepMemory:
    """One compiled step's per-device memory (bytes) and cost."""

    name: str
    argument: int
    output: int
    alias: int
    temp: int
    code: int
    flops_per_device: float
    compile_seconds: float

    @property
    def peak(self) -> int:
        """Live bytes at the step's peak: inputs + outputs not aliased to inputs + temporaries + code."""
        return self.argument + self.output - self.alias + self.temp + self.code


@dataclasses.dataclass
class Plan:
    """What ``gptj-jax plan`` prints."""

    config_name: str
    mesh: dict[str, int]
    batch: int
    seq: int
    train: bool
    dtype: str
    param_dtype: str
    analytic: dict[str, int]  # per-device bytes: params, opt_state, grads, kv_cache, activations (rough)
    steps: list[StepMemory]
    flops_analytic: float  # whole step, all devices
    notes: list[str]

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def peak(self) -> int:
        """Per-device peak over the compiled steps."""
        return max(s.peak for s in self.steps)

    @property
    def analytic_peak(self) -> int:
        """Per-device peak by the analytic counts: every state array plus the activation estimate."""
        return sum(self.analytic.values())


# ---------------------------------------------------------------------------------------- analytic
def analytic_flops(config: Any, batch: int, seq: int, train: bool) -> float:
    """Matmul FLOPs of one step, all devices: 2 per multiply-add, attention's two ``[T, T]`` matmuls
    uncut by the causal mask (PaLM's accounting); training is 3x the forward (``losses.py``).

    Inference counts the prefill of ``batch x seq`` tokens plus one decode token per row.
    """
    from gptj_jax.losses import forward_flops_per_token, train_flops_per_token

    if train:
        return batch * seq * train_flops_per_token(config, seq)
    per_token = forward_flops_per_token(config, seq)  # a decode token attends to seq keys too
    return float(batch * seq * per_token + batch * per_token)


def activation_estimate(config: Any, mesh: dict[str, int], batch: int, seq: int, train: bool, itemsize: int,
                        remat: str, loss_block_size: int = 0) -> int:
    """Rough per-device activation bytes (the cross-check for the compiled temporaries).

    Per block and local row, the forward keeps about ``T x (10 D + 2 F/mp) x itemsize`` (LN output,
    q/k/v, context, attention output, MLP in/out) plus float32 scores and probabilities
    ``2 x N/mp x T x T x 4``. Training without remat keeps every block's; with remat one block's plus
    each block's input. Inference holds one block's at a time. Training's float32 logits, their
    exponentials and their gradient are ``3 x T x V/mp x 4`` per row, or one ``loss_block_size``-column
    block of each with the blockwise loss.
    """
    rows = max(batch // (mesh["dp"] * mesh["fsdp"]), 1)
    mp = mesh["mp"]
    d, f, n = config.n_embd, config.inner_dim, config.n_head
    per_block = rows * seq * ((10 * d + 2 * f // mp) * itemsize + 2 * (n // mp) * seq * 4)
    cols = min(loss_block_size, config.vocab_size // mp) if train and loss_block_size else config.vocab_size // mp
    logits = rows * seq * cols * 4 * (3 if train else 1)
    if not train:
        return per_block + rows * (config.vocab_size // mp) * 4
    if remat == "none":
        return config.n_layer * per_block + logits
    return config.n_layer * rows * seq * d * itemsize + per_block + logits


# ---------------------------------------------------------------------------------------- steps
def _compile(name: str, jitted: Any, *args: Any) -> StepMemory:
    import time

    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return StepMemory(
        name=name,
        argument=int(mem.argument_size_in_bytes),
        output=int(mem.output_size_in_bytes),
        alias=int(mem.alias_size_in_bytes),
        temp=int(mem.temp_size_in_bytes),
        code=int(mem.generated_code_size_in_bytes),
        flops_per_device=float((cost or {}).get("flops", 0.0)),
        compile_seconds=seconds,
    )


def inference_steps(config: Any, mesh: Any, batch: int, seq: int, dtype: Any, param_dtype: Any) -> tuple[list[StepMemory], dict[str, int]]:
    """Compile prefill and decode on abstract inputs; returns their memory and the analytic cache / param bytes."""
    import jax
    import jax.numpy as jnp

    from gptj_jax import sharding as sh
    from gptj_jax.cache import init_cache
    from gptj_jax.generation import forward_cached

    params = sh.abstract_params(config, mesh, "causal_lm", param_dtype)
    cache_shape = jax.eval_shape(lambda: init_cache(config, batch, seq, dtype))
    cache_sh = sh.cache_shardings(config, mesh, cache_shape)
    cache = jax.tree.map(lambda s, shd: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shd), cache_shape, cache_sh)
    logits_sh = sh.logical_sharding(mesh, ("batch", "vocab"))

    def step(params, ids, mask, cache):  # generation's own model call: the program generate runs
        return forward_cached(params, ids, mask, cache, config=config, dtype=dtype)

    jitted = jax.jit(step, out_shardings=(logits_sh, cache_sh), donate_argnums=(3,))
    prompt = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sh.batch_sharding(mesh, batch))
    one = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=sh.batch_sharding(mesh, batch))
    steps = [
        _compile("prefill", jitted, params, prompt, prompt, cache),
        _compile("decode", jitted, params, one, one, cache),
    ]
    analytic = {
        "params": sh.sharded_bytes(params, sh.param_shardings(config, mesh)),
        "kv_cache": sh.sharded_bytes(cache_shape, cache_sh),
    }
    return steps, analytic


def train_steps(config: Any, mesh: Any, batch: int, seq: int, dtype: str, param_dtype: Any, remat: str,
                grad_accum: int, forward: str, loss_block_size: int = 0) -> tuple[list[StepMemory], dict[str, int]]:
    """Compile the fine-tuning step of ``gptj_jax.train.step`` on an abstract train state and batch."""
    import jax
    import jax.numpy as jnp

    from gptj_jax import sharding as sh
    from gptj_jax.train import step as train_step
    from gptj_jax.train.optimizer import mtj_optimizer, mtj_schedule

    cfg = train_step.StepConfig(model=config, dtype=dtype, remat=remat, forward=forward, grad_accum=grad_accum,
                                loss_block_size=loss_block_size)
    schedule = mtj_schedule(warmup_steps=100, anneal_steps=1000, lr=1e-5, end_lr=1e-6)
    optimizer = mtj_optimizer(lr_schedule=schedule, weight_decay=0.1, gradient_accumulation_steps=grad_accum)
    shardings = train_step.state_shardings(cfg, mesh, optimizer, param_dtype)
    state = train_step.abstract_state(cfg, mesh, optimizer, param_dtype)
    jitted = train_step.make_train_step(cfg, mesh, optimizer, schedule, shardings)
    tokens = jax.ShapeDtypeStruct((grad_accum, batch, seq + 1), jnp.int32,
                                  sharding=train_step.batch_spec_sharding(mesh))
    steps = [_compile("train", jitted, state, tokens)]
    params_bytes = sh.sharded_bytes(state["params"], shardings["params"])
    analytic = {
        "params": params_bytes,
        "opt_state": sh.sharded_bytes(state["opt_state"], shardings["opt_state"]),
        # float32 gradient accumulators, split like the params
        "grads": sh.sharded_bytes(
            jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), state["params"]), shardings["params"]
        ),
    }
    return steps, analytic


# ---------------------------------------------------------------------------------------- plan
def check_inputs(config: Any, batch: int, seq: int, dtype: str, param_dtype: Optional[str], train: bool,
                 grad_accum: int) -> str:
    """Validate the sizes and dtypes; returns the parameter dtype (default: float32 to train, else ``dtype``)."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype {dtype!r} is not one of {DTYPE_NAMES}")
    param_dtype = param_dtype or ("float32" if train else dtype)
    if param_dtype not in DTYPE_NAMES:
        raise ValueError(f"--param-dtype {param_dtype!r} is not one of {DTYPE_NAMES}")
    if batch < 1 or seq < 1 or grad_accum < 1:
        raise ValueError(f"--batch, --seq and --grad-accum must be >= 1, got {batch}, {seq} and {grad_accum}")
    if seq > config.n_positions:
        raise ValueError(f"--seq {seq} exceeds the model's n_positions={config.n_positions}")
    return param_dtype


def make_plan(
    config: Any,
    mesh_sizes: dict[str, int],
    batch: int,
    seq: int,
    *,
    train: bool = False,
    dtype: str = "bfloat16",
    param_dtype: Optional[str] = None,
    remat: str = "none",
    grad_accum: int = 1,
    forward: str = "gspmd",
    config_name: str = "",
    devices: Optional[list] = None,
    loss_block_size: Optional[int] = None,
) -> Plan:
    """Build the mesh on the (simulated) devices, compile the steps, and collect the numbers.

    ``param_dtype`` defaults to float32 for training (master weights) and to ``dtype`` for inference.
    ``loss_block_size``: the train step's (None: the train config's default; 0: full logits).
    """
    import jax
    import jax.numpy as jnp

    from gptj_jax import sharding as sh

    param_dtype = check_inputs(config, batch, seq, dtype, param_dtype, train, grad_accum)
    mesh = sh.make_mesh(mesh_sizes["dp"], mesh_sizes["fsdp"], mesh_sizes["mp"], devices=devices)
    sizes = sh.mesh_shape(mesh)
    sh.validate_config(config, mesh)
    sh.check_batch(mesh, batch)
    itemsize = jnp.dtype(dtype).itemsize
    if loss_block_size is None:
        from gptj_jax.train.config import TrainConfig

        loss_block_size = TrainConfig.__dataclass_fields__["loss_block_size"].default
    if train:
        steps, analytic = train_steps(config, mesh, batch, seq, dtype, jnp.dtype(param_dtype), remat, grad_accum, forward,
                                      loss_block_size)
    else:
        steps, analytic = inference_steps(config, mesh, batch, seq, jnp.dtype(dtype), jnp.dtype(param_dtype))
    analytic["activations"] = activation_estimate(config, sizes, batch, seq, train, itemsize, remat, loss_block_size)
    notes = [f"compiled for {jax.device_count()} simulated {jax.devices()[0].platform.upper()} devices"]
    return Plan(
        config_name=config_name, mesh=sizes, batch=batch, seq=seq, train=train, dtype=dtype,
        param_dtype=param_dtype, analytic=analytic, steps=steps,
        flops_analytic=analytic_flops(config, batch * grad_accum if train else batch, seq, train),
        notes=notes,
    )


def _verdict(share: float) -> str:
    return "fits" if share <= HEADROOM else "tight" if share <= 1.0 else "no"


def fits_table(plan: Plan, hardware: tuple[tuple[str, int, int], ...] = HARDWARE) -> list[dict[str, Any]]:
    """One row per host type: per-device need by the compiled peak and by the analytic peak (scaled
    when the host has a different device count), capacity, share used and verdicts (``fits`` below
    ``HEADROOM``, ``tight`` below 1.0, else ``no``)."""
    rows = []
    for name, n_dev, mem in hardware:
        scale = plan.devices / n_dev  # every large array is split over all devices
        need = int(plan.peak * scale)
        need_analytic = int(plan.analytic_peak * scale)
        rows.append(dict(
            hardware=name, devices=n_dev, memory=mem, scaled=n_dev != plan.devices,
            need=need, share=need / mem, verdict=_verdict(need / mem),
            need_analytic=need_analytic, share_analytic=need_analytic / mem,
            verdict_analytic=_verdict(need_analytic / mem),
        ))
    return rows


def _gib(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (GiB at most)."""
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The plan as plain JSON-able data (``--json``)."""
    out = dataclasses.asdict(plan)
    out["devices"] = plan.devices
    out["peak"] = plan.peak
    out["analytic_peak"] = plan.analytic_peak
    for step, s in zip(out["steps"], plan.steps):
        step["peak"] = s.peak
    out["fits"] = fits_table(plan)
    return out


def format_plan(plan: Plan) -> str:
    """The plan as markdown tables."""
    mesh = ",".join(f"{k}={v}" for k, v in plan.mesh.items())
    what = "training step" if plan.train else "inference (prefill + decode)"
    lines = [
        f"## plan: {plan.config_name or 'model'} {what}, mesh {mesh} ({plan.devices} devices), "
        f"batch {plan.batch} x seq {plan.seq}, compute {plan.dtype}, params {plan.param_dtype}",
        "",
        "### Per-device memory, analytic",
        "",
        "| what | bytes per device |",
        "|---|---|",
    ]
    for key, value in plan.analytic.items():
        label = "activations (rough estimate)" if key == "activations" else key
        lines.append(f"| {label} | {_gib(value)} |")
    state = sum(v for k, v in plan.analytic.items() if k in ("params", "opt_state", "kv_cache"))
    lines += [f"| persistent state (params + optimizer state + cache) | {_gib(state)} |", ""]
    lines += [
        "### Per-device memory, compiled (`memory_analysis()`)",
        "",
        "| step | arguments | outputs | aliased | temporaries | peak | compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in plan.steps:
        lines.append(
            f"| {s.name} | {_gib(s.argument)} | {_gib(s.output)} | {_gib(s.alias)} | {_gib(s.temp)} | "
            f"**{_gib(s.peak)}** | {s.compile_seconds:.1f} |"
        )
    args = plan.steps[0].argument
    lines += [
        "",
        f"Cross-check: analytic persistent state {_gib(state)} vs compiled arguments of "
        f"`{plan.steps[0].name}` {_gib(args)} (ratio {args / max(state, 1):.3f}; the arguments also hold the batch).",
        "",
        "### FLOPs per step",
        "",
        "| source | FLOPs |",
        "|---|---|",
        f"| analytic (2 per MAC, all devices) | {plan.flops_analytic:.3e} |",
    ]
    compiled_flops = sum(s.flops_per_device for s in plan.steps) * plan.devices
    lines.append(f"| compiled cost analysis (x {plan.devices} devices) | {compiled_flops:.3e} |")
    lines += [
        "",
        f"### Fits? ('fits' below {HEADROOM:.0%} of device memory, 'tight' below 100%)",
        "",
        f"Two per-device needs: the compiled peak ({_gib(plan.peak)}; XLA:CPU's buffer assignment, which is "
        "not memory-aware the way TPU / GPU scheduling and rematerialisation are, and upcasts bfloat16 matmuls, "
        f"so it overstates temporaries) and the analytic peak ({_gib(plan.analytic_peak)}; exact state + the rough "
        "activation estimate). The truth on an accelerator is expected between the two, close to the analytic one.",
        "",
        "| host | devices | memory / device | compiled peak | share | verdict | analytic peak | share | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in fits_table(plan):
        tilde = "~" if r["scaled"] else ""
        lines.append(
            f"| {r['hardware']} | {r['devices']} | {_gib(r['memory'])} | {tilde}{_gib(r['need'])} | {r['share']:.0%} | "
            f"{r['verdict']} | {tilde}{_gib(r['need_analytic'])} | {r['share_analytic']:.0%} | {r['verdict_analytic']} |"
        )
    if any(r["scaled"] for r in fits_table(plan)):
        lines += ["", f"~ : the host has a different device count than the {plan.devices}-device mesh; "
                      "need scaled by devices (re-plan with a matching mesh for an exact figure)."]
    lines += ["", *[f"Note: {n}." for n in plan.notes]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- devices
def check_mesh(config: Any, mesh_sizes: dict[str, int], batch: int, seq: int, *, train: bool = False,
               dtype: str = "bfloat16", param_dtype: Optional[str] = None, grad_accum: int = 1) -> int:
    """Check what :func:`make_plan` would (sizes, dtypes, the config and batch against the mesh) on an
    abstract mesh, before any device is simulated; returns the number of devices the mesh needs.

    ``mesh_sizes``: ``{"dp", "fsdp", "mp"}``, every size given (no ``-1``).
    """
    from jax.sharding import AbstractMesh

    from gptj_jax.sharding import MESH_AXES, check_batch, resolve_mesh_shape, validate_config

    n = math.prod(mesh_sizes.values())
    resolve_mesh_shape(**mesh_sizes, n_devices=n)
    abstract = AbstractMesh(tuple(mesh_sizes[a] for a in MESH_AXES), MESH_AXES)
    check_inputs(config, batch, seq, dtype, param_dtype, train, grad_accum)
    validate_config(config, abstract)
    check_batch(abstract, batch)
    return n


def simulated_devices(n: int) -> list:
    """``n`` devices to compile for: simulate ``n`` CPU devices if JAX is not started yet, else use the
    first ``n`` existing devices (error if there are fewer)."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
    devices = jax.devices()
    if len(devices) < n:
        raise RuntimeError(
            f"the mesh needs {n} devices but JAX already started with {len(devices)}; run `gptj-jax plan` in a "
            f"fresh process or set XLA_FLAGS=--xla_force_host_platform_device_count={n}"
        )
    return devices[:n]

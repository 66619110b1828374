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
* ``--mode int8``: prefill and decode of the int8 weight-only model (``quantize.py``'s tree: int8 kernels
  sharded like the float ones, their scales like the kernels' output axis; dequantized inside the step).
* ``--mode lora`` / ``qlora``: the LoRA train step: float32 adapters (sharded like their base kernels) and
  their Adam state donated, the frozen base (bfloat16, or int8 for QLoRA) a separate argument.

CPU compilation is a proxy for TPU / GPU: XLA's CPU backend fuses differently and may upcast
bfloat16 matmuls, so temporaries are an estimate; params, optimizer state and cache are exact.
``--compile-for v5e-1`` (:func:`tpu_devices`) compiles the same steps with libtpu's XLA:TPU for a TPU
topology's abstract devices instead (deviceless: no TPU needed); its ``memory_analysis()`` is what the
chip will hold, and a program that does not fit is refused at compile time (reported as such).

    n = check_mesh(config, sizes, batch, seq, train=True)      # everything checked, no device made yet
    plan = make_plan(config, sizes, batch, seq, train=True, devices=simulated_devices(n))
    plan = make_plan(config, sizes, batch, seq, devices=tpu_devices("v5e-1"), target="v5e-1")
    print(format_plan(plan))                                    # or plan_dict(plan) (JSON); fits_table(plan)

The hardware table (:data:`CHIPS`, :data:`HOSTS`: memory, bf16 / int8 peaks and bandwidth per device,
sources in comments) and the analytic hardware x mode table (:func:`modes_table`: bf16 / int8 inference,
full fine-tuning, LoRA, QLoRA; fits, the largest batch x context, batch-1 decode tokens/s) need no
compilation (``plan --modes``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

from gptj_jax.dtypes import DTYPE_NAMES

GiB = 1024**3
GB = 10**9
T = 10**12


# ---------------------------------------------------------------------------------------- hardware
@dataclasses.dataclass(frozen=True)
class Chip:
    """One JAX device's peaks: memory (bytes), dense bf16 FLOP/s, dense int8 OP/s (None: no int8 matmul
    unit; weight-only int8 still halves the bytes read) and memory bandwidth (bytes/s).

    A JAX device is a chip, except on TPU v2 / v3 where it is one of the chip's two TensorCores (the
    chip's figures halved). Memory is the vendor's capacity read as GiB (what the memory parts hold; the
    usable share is a little less: runtime reservations, T4's ECC; ``HEADROOM`` covers that). FLOP/s
    are dense (NVIDIA's sparsity figures halved).
    """

    name: str
    memory: int
    bf16_flops: float
    int8_flops: Optional[float]
    bandwidth: float


# Sources (vendor data sheets, per chip):
#  TPU v2: cloud.google.com/tpu/docs/v2 -- 45 TFLOP/s bf16, 16 GiB HBM, 600 GB/s per chip, 2 TensorCores.
#  TPU v3: cloud.google.com/tpu/docs/v3 -- 123 TFLOP/s bf16, 32 GiB HBM2, 900 GB/s per chip, 2 TensorCores.
#  TPU v4: cloud.google.com/tpu/docs/v4 -- 275 TFLOP/s bf16 and int8, 32 GiB HBM2, 1200 GB/s (megacore: 1 device).
#  TPU v5e: cloud.google.com/tpu/docs/v5e -- 197 TFLOP/s bf16, 393 TOP/s int8, 16 GB HBM2, 819 GB/s.
#  TPU v5p: cloud.google.com/tpu/docs/v5p -- 459 TFLOP/s bf16, 918 TOP/s int8, 95 GB HBM2e, 2765 GB/s (megacore).
#  TPU v6e: cloud.google.com/tpu/docs/v6e -- 918 TFLOP/s bf16, 1836 TOP/s int8, 32 GB HBM, 1638 GB/s.
#  T4: NVIDIA T4 data sheet -- 65 TFLOP/s fp16 tensor (Turing has no bf16: run float16), 130 TOP/s int8, 16 GB
#      GDDR6, 320 GB/s.
#  L4: NVIDIA L4 data sheet -- 121 TFLOP/s bf16, 242 TOP/s int8 (dense), 24 GB GDDR6, 300 GB/s.
#  A10G: AWS's A10 variant (g5 instances; AWS gives 24 GB, 600 GB/s); NVIDIA A10 data sheet -- 125 TFLOP/s bf16,
#      250 TOP/s int8 (dense).
#  A100: NVIDIA A100 data sheet -- 312 TFLOP/s bf16, 624 TOP/s int8 (dense); 40 GB HBM2 1555 GB/s (SXM4 40GB),
#      80 GB HBM2e 2039 GB/s (SXM4 80GB).
#  H100: NVIDIA H100 data sheet (SXM5) -- 989 TFLOP/s bf16, 1979 TOP/s int8 (dense), 80 GB HBM3, 3.35 TB/s.
#  H200: NVIDIA H200 data sheet (SXM) -- same compute as H100 SXM, 141 GB HBM3e, 4.8 TB/s.
CHIPS: dict[str, Chip] = {
    "v2": Chip("TPU v2 core", 8 * GiB, 22.5 * T, None, 300 * GB),
    "v3": Chip("TPU v3 core", 16 * GiB, 61.5 * T, None, 450 * GB),
    "v4": Chip("TPU v4", 32 * GiB, 275 * T, 275 * T, 1200 * GB),
    "v5e": Chip("TPU v5e", 16 * GiB, 197 * T, 393 * T, 819 * GB),
    "v5p": Chip("TPU v5p", 95 * GiB, 459 * T, 918 * T, 2765 * GB),
    "v6e": Chip("TPU v6e", 32 * GiB, 918 * T, 1836 * T, 1638 * GB),
    "t4": Chip("NVIDIA T4", 16 * GiB, 65 * T, 130 * T, 320 * GB),
    "l4": Chip("NVIDIA L4", 24 * GiB, 121 * T, 242 * T, 300 * GB),
    "a10g": Chip("NVIDIA A10G", 24 * GiB, 125 * T, 250 * T, 600 * GB),
    "a100-40": Chip("NVIDIA A100 40GB", 40 * GiB, 312 * T, 624 * T, 1555 * GB),
    "a100-80": Chip("NVIDIA A100 80GB", 80 * GiB, 312 * T, 624 * T, 2039 * GB),
    "h100": Chip("NVIDIA H100 80GB", 80 * GiB, 989 * T, 1979 * T, 3350 * GB),
    "h200": Chip("NVIDIA H200 141GB", 141 * GiB, 989 * T, 1979 * T, 4800 * GB),
}


@dataclasses.dataclass(frozen=True)
class Host:
    """A machine one rents: ``devices`` JAX devices of ``chip``. ``topology``: for TPUs, the arguments of
    ``jax.experimental.topologies.get_topology_desc`` (topology name, chips per host, chip config or None)
    that ``plan --compile-for KEY`` compiles for."""

    key: str
    name: str
    chip: Chip
    devices: int
    topology: Optional[tuple[str, tuple[int, int, int], Optional[str]]] = None


HOSTS: tuple[Host, ...] = (
    Host("v2-8", "TPU v2-8", CHIPS["v2"], 8, ("v2:2x2", (2, 2, 1), None)),
    Host("v3-8", "TPU v3-8", CHIPS["v3"], 8, ("v3:2x2", (2, 2, 1), None)),
    Host("v4-8", "TPU v4-8", CHIPS["v4"], 4, ("v4:2x2x1", (2, 2, 1), "megacore")),
    Host("v5e-1", "TPU v5e-1", CHIPS["v5e"], 1, ("v5e:1x1", (1, 1, 1), None)),
    Host("v5e-4", "TPU v5e-4", CHIPS["v5e"], 4, ("v5e:2x2", (2, 2, 1), None)),
    Host("v5e-8", "TPU v5e-8", CHIPS["v5e"], 8, ("v5e:2x4", (2, 4, 1), None)),
    Host("v6e-1", "TPU v6e-1", CHIPS["v6e"], 1, ("v6e:1x1", (1, 1, 1), None)),
    Host("v6e-8", "TPU v6e-8", CHIPS["v6e"], 8, ("v6e:2x4", (2, 4, 1), None)),
    Host("v5p-8", "TPU v5p-8", CHIPS["v5p"], 4, ("v5p:2x2x1", (2, 2, 1), "megacore")),
    Host("t4", "T4 16GB", CHIPS["t4"], 1),
    Host("l4", "L4 24GB", CHIPS["l4"], 1),
    Host("a10g", "A10G 24GB", CHIPS["a10g"], 1),
    Host("a100-40", "A100 40GB", CHIPS["a100-40"], 1),
    Host("a100-80", "A100 80GB", CHIPS["a100-80"], 1),
    Host("h100", "H100 80GB", CHIPS["h100"], 1),
    Host("h200", "H200 141GB", CHIPS["h200"], 1),
    Host("8xa100-40", "8x A100 40GB", CHIPS["a100-40"], 8),
    Host("8xa100-80", "8x A100 80GB", CHIPS["a100-80"], 8),
    Host("8xh100", "8x H100 80GB", CHIPS["h100"], 8),
)
HOST_KEYS: tuple[str, ...] = tuple(h.key for h in HOSTS)
TPU_TARGETS: tuple[str, ...] = tuple(h.key for h in HOSTS if h.topology is not None)

# (name, devices per host, bytes of memory per device): the fits table of a compiled plan
HARDWARE: tuple[tuple[str, int, int], ...] = tuple((h.name, h.devices, h.chip.memory) for h in HOSTS)


def host_by_key(key: str) -> Host:
    """The :data:`HOSTS` entry ``key`` (e.g. ``"v5e-1"``, ``"t4"``); ValueError listing the keys otherwise."""
    for host in HOSTS:
        if host.key == key:
            return host
    raise ValueError(f"unknown hardware {key!r}; known: {', '.join(HOST_KEYS)}")
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
    # Set when the compiler refused the step for lack of memory (XLA:TPU checks the HBM at compile
    # time): its message; ``argument`` is then this device's share of the inputs and ``temp`` the
    # temporaries the message names (0 if none).
    error: str = ""

    @property
    def peak(self) -> int:
        """Live bytes at the step's peak: inputs + outputs not aliased to inputs + temporaries + code
        (for a step the compiler refused: inputs + the temporaries it said it needed)."""
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
    target: str = ""  # the HOSTS key compiled for with libtpu (``--compile-for``); "" for simulated CPU devices

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
    block of each with the blockwise loss, which also holds a copy of the ``lm_head`` kernel in the compute
    dtype (``V/mp x D x itemsize``: XLA:TPU casts the float32 kernel for the matmul once, outside the block
    loop). The parts are summed although the loss's buffers and one block's are not live at the same time.
    """
    rows = max(batch // (mesh["dp"] * mesh["fsdp"]), 1)
    mp = mesh["mp"]
    d, f, n = config.n_embd, config.inner_dim, config.n_head
    per_block = rows * seq * ((10 * d + 2 * f // mp) * itemsize + 2 * (n // mp) * seq * 4)
    cols = min(loss_block_size, config.vocab_size // mp) if train and loss_block_size else config.vocab_size // mp
    logits = rows * seq * cols * 4 * (3 if train else 1)
    if train and loss_block_size:
        logits += config.vocab_size // mp * d * itemsize
    if not train:
        return per_block + rows * (config.vocab_size // mp) * 4
    if remat == "none":
        return config.n_layer * per_block + logits
    return config.n_layer * rows * seq * d * itemsize + per_block + logits


# ---------------------------------------------------------------------------------------- steps
def _required_bytes(message: str) -> int:
    """The bytes an XLA out-of-memory message says the program needs (``... required ... (81.49G) ...``,
    ``Used 97.3G of 15.75G hbm``); 0 when it names none."""
    import re

    units = {"K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}
    for pattern in (r"required[^(]*\((\d+(?:\.\d+)?)([KMGT])", r"Used (\d+(?:\.\d+)?)([KMGT])"):
        m = re.search(pattern, message)
        if m:
            return int(float(m.group(1)) * units[m.group(2)])
    return 0


def _compile(name: str, jitted: Any, *args: Any) -> StepMemory:
    import time

    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA:TPU refuses a program that does not fit its HBM: that is an answer
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        import jax

        message = str(e).strip().splitlines()[0]
        arguments = sum(  # this device's share of every input
            math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(args)
        )
        return StepMemory(name=name, argument=int(arguments), output=0, alias=0, temp=_required_bytes(message), code=0,
                          flops_per_device=0.0, compile_seconds=time.perf_counter() - t0, error=message)
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


def inference_steps(config: Any, mesh: Any, batch: int, seq: int, dtype: Any, param_dtype: Any,
                    quantize: Optional[str] = None) -> tuple[list[StepMemory], dict[str, int]]:
    """Compile prefill and decode on abstract inputs; returns their memory and the analytic cache / param bytes.

    ``quantize="int8"``: the params are the int8 tree of ``quantize.py`` (:func:`abstract_quantized`: each
    kernel's int8 values sharded like the kernel, its scales like the kernel's output axis), dequantized to
    ``param_dtype`` inside the step as ``generate`` does; the analytic counts then add ``dequantized``, one
    block's kernels in ``param_dtype`` on this device (the matmuls' operands if XLA does not fuse them)."""
    import jax
    import jax.numpy as jnp

    from gptj_jax import sharding as sh
    from gptj_jax.cache import init_cache
    from gptj_jax.generation import forward_cached

    params = sh.abstract_params(config, mesh, "causal_lm", param_dtype)
    if quantize:
        params = abstract_quantized(params, sh.param_shardings(config, mesh), quantize)
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
        "params": sh.sharded_bytes(params, jax.tree.map(lambda x: x.sharding, params)),
        "kv_cache": sh.sharded_bytes(cache_shape, cache_sh),
    }
    if quantize:
        analytic["dequantized"] = dequantized_block_bytes(config, mesh, param_dtype)
    return steps, analytic


def train_steps(config: Any, mesh: Any, batch: int, seq: int, dtype: str, param_dtype: Any, remat: str,
                grad_accum: int, forward: str, loss_block_size: int = 0, lora_rank: int = 0,
                base_quantize: Optional[str] = None) -> tuple[list[StepMemory], dict[str, int]]:
    """Compile the fine-tuning step of ``gptj_jax.train.step`` on an abstract train state and batch.

    ``lora_rank > 0``: the LoRA step instead (``lora_alpha`` 2 x rank, the default targets q/k/v/out_proj and
    fc_in/fc_out): the state trains the ``param_dtype`` adapters only, sharded like their base kernels, and
    the frozen base (in the compute ``dtype``; int8 with ``base_quantize="int8"``, QLoRA) is a third
    argument, never donated; the analytic counts add ``base`` (its bytes on this device) and, for an int8
    base, ``dequantized`` (one block's kernels in ``dtype``)."""
    import jax
    import jax.numpy as jnp

    from gptj_jax import sharding as sh
    from gptj_jax.train import step as train_step
    from gptj_jax.train.optimizer import mtj_optimizer, mtj_schedule

    spec, base = None, None
    if lora_rank:
        from gptj_jax.lora import make_spec

        spec = make_spec(config, lora_rank, alpha=2.0 * lora_rank)
        base = sh.abstract_params(config, mesh, "causal_lm", jnp.dtype(dtype))
        if base_quantize:
            base = abstract_quantized(base, sh.param_shardings(config, mesh), base_quantize)
    cfg = train_step.StepConfig(model=config, dtype=dtype, remat=remat, forward=forward, grad_accum=grad_accum,
                                loss_block_size=loss_block_size, lora=spec,
                                lora_base_quantize=base_quantize if spec else None,
                                lora_base_dtype=jnp.dtype(dtype).name if spec else None)
    schedule = mtj_schedule(warmup_steps=100, anneal_steps=1000, lr=1e-5, end_lr=1e-6)
    optimizer = mtj_optimizer(lr_schedule=schedule, weight_decay=0.1, gradient_accumulation_steps=grad_accum)
    shardings = train_step.state_shardings(cfg, mesh, optimizer, param_dtype)
    state = train_step.abstract_state(cfg, mesh, optimizer, param_dtype)
    jitted = train_step.make_train_step(cfg, mesh, optimizer, schedule, shardings)
    tokens = jax.ShapeDtypeStruct((grad_accum, batch, seq + 1), jnp.int32,
                                  sharding=train_step.batch_spec_sharding(mesh))
    steps = [_compile("train", jitted, state, tokens, *((base,) if spec else ()))]
    params_bytes = sh.sharded_bytes(state["params"], shardings["params"])
    analytic = {
        "params": params_bytes,
        "opt_state": sh.sharded_bytes(state["opt_state"], shardings["opt_state"]),
        # float32 gradient accumulators, split like the params
        "grads": sh.sharded_bytes(
            jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), state["params"]), shardings["params"]
        ),
    }
    if spec:
        analytic["base"] = sh.sharded_bytes(base, jax.tree.map(lambda x: x.sharding, base))
        if base_quantize:
            analytic["dequantized"] = dequantized_block_bytes(config, mesh, jnp.dtype(dtype))
    return steps, analytic


def abstract_quantized(params: Any, shardings: Any, scheme: str = "int8") -> Any:
    """``ShapeDtypeStruct`` tree (with shardings) of the ``scheme``-quantized ``params`` (float
    ``ShapeDtypeStruct`` params, :func:`sharding.abstract_params`) placed as ``load(..., quantize=scheme)`` places
    them on the mesh: each quantized kernel's int8 values with the kernel's sharding ``shardings``, its scales
    with the kernel's output axis (``quantize.shardings``); the other leaves as they were. Nothing is made."""
    import jax

    from gptj_jax import quantize

    shapes = quantize.abstract_params(params, scheme)
    placed = quantize.shardings(shapes, shardings)
    return jax.tree.map(lambda s, shd: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shd), shapes, placed)


def dequantized_block_bytes(config: Any, mesh: Any, dtype: Any) -> int:
    """Bytes on one device of one block's matmul kernels in ``dtype``, split as their shardings split them: what
    dequantizing one block of an int8 model holds (``mode_memory``'s ``dequantized``, for the mesh)."""
    import jax

    from gptj_jax import sharding as sh
    from gptj_jax.convert import table

    shardings = table.flatten(sh.param_shardings(config, mesh))
    kernels = {f"transformer/h_0/{name}/kernel": shape for name, shape in (
        (f"attn/{n}", (config.n_embd, config.n_embd)) for n in ("q_proj", "k_proj", "v_proj", "out_proj"))}
    kernels["transformer/h_0/mlp/fc_in/kernel"] = (config.n_embd, config.inner_dim)
    kernels["transformer/h_0/mlp/fc_out/kernel"] = (config.inner_dim, config.n_embd)
    return sh.sharded_bytes([jax.ShapeDtypeStruct(s, dtype) for s in kernels.values()],
                            [shardings[p] for p in kernels])


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
    target: str = "",
    mode: Optional[str] = None,
    loss_block_size: Optional[int] = None,
    lora_rank: int = 8,
) -> Plan:
    """Build the mesh on the (simulated) devices, compile the steps, and collect the numbers.

    ``param_dtype`` defaults to float32 for training (master weights) and to ``dtype`` for inference.
    ``devices``: simulated CPU devices (:func:`simulated_devices`) or abstract TPU devices
    (:func:`tpu_devices`, then ``target`` is their :data:`HOSTS` key). ``mode``: one of :data:`MODES`
    with a compiled step in :data:`STEP_BUILDERS` (default: ``"full"`` with ``train``, else ``"bf16"``,
    i.e. inference in ``dtype``). ``loss_block_size``: the train step's (None: the train config's
    default; 0: full logits; the LoRA step always takes the full logits). ``lora_rank``: the adapters'
    rank for ``lora`` / ``qlora``, whose frozen base is in ``dtype`` (int8 for ``qlora``) and whose
    ``param_dtype`` is the adapters'.
    """
    import jax.numpy as jnp

    from gptj_jax import sharding as sh
    from gptj_jax.model import attention_backend

    mode = check_mode(mode or ("full" if train else "bf16"))
    train = mode in TRAIN_MODES
    param_dtype = check_inputs(config, batch, seq, dtype, param_dtype, train, grad_accum)
    mesh = sh.make_mesh(mesh_sizes["dp"], mesh_sizes["fsdp"], mesh_sizes["mp"], devices=devices)
    sizes = sh.mesh_shape(mesh)
    sh.validate_config(config, mesh)
    sh.check_batch(mesh, batch)
    itemsize = jnp.dtype(dtype).itemsize
    if loss_block_size is None:
        loss_block_size = default_loss_block_size()
    if mode in ("lora", "qlora"):
        loss_block_size = 0  # the LoRA step computes the full logits (train/step.py)
    # traced for the devices compiled for: attention ``auto`` and the cache write follow their platform
    with attention_backend(mesh.devices.flat[0].platform):
        steps, analytic = STEP_BUILDERS[mode](config, mesh, batch, seq, dtype=dtype,
                                              param_dtype=jnp.dtype(param_dtype), remat=remat, grad_accum=grad_accum,
                                              forward=forward, loss_block_size=loss_block_size, lora_rank=lora_rank)
    analytic["activations"] = activation_estimate(config, sizes, batch, seq, train, itemsize, remat, loss_block_size)
    used = list(mesh.devices.flat)
    if target:
        notes = [f"compiled by XLA:TPU (libtpu, no TPU attached) for {host_by_key(target).name}: {len(used)} x "
                 f"{used[0].device_kind}"]
    else:
        notes = [f"compiled for {len(used)} simulated {used[0].platform.upper()} devices"]
    if any(s.error for s in steps):
        notes.append("a step the compiler refused for lack of memory does not fit: its peak is its inputs plus "
                     "the temporaries the compiler's message names")
    return Plan(
        config_name=config_name, mesh=sizes, batch=batch, seq=seq, train=train, dtype=dtype,
        param_dtype=param_dtype, analytic=analytic, steps=steps,
        flops_analytic=analytic_flops(config, batch * grad_accum if train else batch, seq, train),
        notes=notes, target=target,
    )


# Compiled steps per mode: ``builder(config, mesh, batch, seq, *, dtype, param_dtype, remat, grad_accum,
# forward, loss_block_size, lora_rank) -> (steps, analytic bytes per device)``: bf16 / int8 inference (prefill +
# decode; int8: the int8 tree of quantize.py, dequantized in the step), full fine-tuning, LoRA (bfloat16 frozen
# base) and QLoRA (int8 frozen base) training steps.
def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES` with a compiled step in :data:`STEP_BUILDERS`; else ValueError."""
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    if mode not in STEP_BUILDERS:
        raise ValueError(
            f"--mode {mode}: no compiled {MODES[mode]} step in this version of gptj_jax (compiled modes: "
            f"{', '.join(STEP_BUILDERS)}); `gptj-jax plan --modes` gives its analytic figures"
        )
    return mode


def _inference_builder(config: Any, mesh: Any, batch: int, seq: int, *, dtype: str, param_dtype: Any,
                       **_: Any) -> tuple[list[StepMemory], dict[str, int]]:
    import jax.numpy as jnp

    return inference_steps(config, mesh, batch, seq, jnp.dtype(dtype), param_dtype)


def _train_builder(config: Any, mesh: Any, batch: int, seq: int, *, dtype: str, param_dtype: Any, remat: str,
                   grad_accum: int, forward: str, loss_block_size: int = 0,
                   **_: Any) -> tuple[list[StepMemory], dict[str, int]]:
    return train_steps(config, mesh, batch, seq, dtype, param_dtype, remat, grad_accum, forward, loss_block_size)


def _no_stacked_int8(config: Any, mode: str) -> None:
    if config.scan_layers:
        raise ValueError(f"--mode {mode}: int8 quantizes the per-block kernels (transformer/h_N/...), which "
                         "scan_layers stacks; plan it with scan_layers false")


def _int8_builder(config: Any, mesh: Any, batch: int, seq: int, *, dtype: str, param_dtype: Any,
                  **_: Any) -> tuple[list[StepMemory], dict[str, int]]:
    import jax.numpy as jnp

    _no_stacked_int8(config, "int8")
    return inference_steps(config, mesh, batch, seq, jnp.dtype(dtype), param_dtype, quantize="int8")


def _lora_builder(config: Any, mesh: Any, batch: int, seq: int, *, dtype: str, param_dtype: Any, remat: str,
                  grad_accum: int, forward: str, lora_rank: int = 8, base_quantize: Optional[str] = None,
                  **_: Any) -> tuple[list[StepMemory], dict[str, int]]:
    if lora_rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {lora_rank}")
    if forward != "gspmd":
        raise ValueError(f"--mode {'qlora' if base_quantize else 'lora'}: LoRA trains with --forward gspmd only")
    return train_steps(config, mesh, batch, seq, dtype, param_dtype, remat, grad_accum, forward, 0,
                       lora_rank=lora_rank, base_quantize=base_quantize)


def _qlora_builder(config: Any, mesh: Any, batch: int, seq: int, **kwargs: Any) -> tuple[list[StepMemory], dict[str, int]]:
    _no_stacked_int8(config, "qlora")
    return _lora_builder(config, mesh, batch, seq, **kwargs, base_quantize="int8")


STEP_BUILDERS: dict[str, Callable[..., tuple[list[StepMemory], dict[str, int]]]] = {
    "bf16": _inference_builder,
    "int8": _int8_builder,
    "full": _train_builder,
    "lora": _lora_builder,
    "qlora": _qlora_builder,
}


def _verdict(share: float) -> str:
    return "fits" if share <= HEADROOM else "tight" if share <= 1.0 else "no"


def fits_table(plan: Plan, hardware: Optional[tuple[tuple[str, int, int], ...]] = None) -> list[dict[str, Any]]:
    """One row per host type: per-device need by the compiled peak and by the analytic peak (scaled
    when the host has a different device count), capacity, share used and verdicts (``fits`` below
    ``HEADROOM``, ``tight`` below 1.0, else ``no``). Default hosts: :data:`HARDWARE`, or only the
    compiled-for host of a ``--compile-for`` plan."""
    if hardware is None:
        if plan.target:
            host = host_by_key(plan.target)
            hardware = ((host.name, host.devices, host.chip.memory),)
        else:
            hardware = HARDWARE
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
    out["analytic_vs_compiled"] = plan.analytic_peak / max(plan.peak, 1)
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
    state = sum(v for k, v in plan.analytic.items() if k in ("params", "opt_state", "kv_cache", "base"))
    lines += [f"| persistent state (params + optimizer state + cache{' + frozen base' if 'base' in plan.analytic else ''})"
              f" | {_gib(state)} |", ""]
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
    refused = " (not counted: a step the compiler refused)" if any(s.error for s in plan.steps) else ""
    lines.append(f"| compiled cost analysis (x {plan.devices} devices){refused} | {compiled_flops:.3e} |")
    for s in plan.steps:
        if s.error:
            lines += ["", f"**{s.name} does not fit**: the compiler said: {s.error}"]
    if plan.target:
        ratio = plan.analytic_peak / max(plan.peak, 1)
        lines += ["", f"Analytic peak {_gib(plan.analytic_peak)} vs XLA:TPU's peak {_gib(plan.peak)}: "
                      f"ratio {ratio:.3f} ({(ratio - 1):+.1%})."]
    if plan.target:
        why = (f"Two per-device needs: XLA:TPU's peak ({_gib(plan.peak)}, what the chip will hold) and the analytic "
               f"peak ({_gib(plan.analytic_peak)}).")
    else:
        why = (f"Two per-device needs: the compiled peak ({_gib(plan.peak)}; XLA:CPU's buffer assignment, which is "
               "not memory-aware the way TPU / GPU scheduling and rematerialisation are, and upcasts bfloat16 matmuls, "
               f"so it overstates temporaries) and the analytic peak ({_gib(plan.analytic_peak)}; exact state + the "
               "rough activation estimate). The truth on an accelerator is expected between the two, close to the "
               "analytic one; `--compile-for` a TPU gives XLA:TPU's own figure.")
    lines += [
        "",
        f"### Fits? ('fits' below {HEADROOM:.0%} of device memory, 'tight' below 100%)",
        "",
        why,
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


def tpu_devices(target: str) -> list:
    """The abstract devices of TPU host ``target`` (a :data:`TPU_TARGETS` key, e.g. ``"v5e-1"``) for deviceless
    ahead-of-time compilation: libtpu's XLA:TPU compiles for them on a machine without a TPU
    (``jax.experimental.topologies.get_topology_desc``, as MaxText's ``train_compile.py`` does).

    Needs libtpu (``pip install 'gptj-jax[tpu-aot]'``); JAX itself stays on the CPU (nothing runs).
    """
    host = host_by_key(target)
    if host.topology is None:
        raise ValueError(f"--compile-for {target!r}: deviceless compilation is for TPUs only; TPU targets: "
                         f"{', '.join(TPU_TARGETS)}")
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"--compile-for {target} needs libtpu (XLA:TPU's compiler), which is not installed: "
            "pip install 'gptj-jax[tpu-aot]'"
        ) from e
    import os

    # libtpu takes a machine-wide lock file for the TPU it would drive; a compile-only use drives none, so it
    # does not need the lock (and would fail while another process holds it).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    from jax._src import xla_bridge
    from jax.experimental import topologies

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")  # run nothing on a TPU this host may have
    name, bounds, chip_config = host.topology
    extra = {"chip_config_name": chip_config} if chip_config else {}
    topology = topologies.get_topology_desc(platform="tpu", topology_name=name, chips_per_host_bounds=bounds, **extra)
    devices = list(topology.devices)
    if len(devices) != host.devices:
        raise RuntimeError(f"libtpu's topology {name!r} has {len(devices)} devices, the hardware table says "
                           f"{host.name} has {host.devices}")
    return devices


# ---------------------------------------------------------------------------------------- modes (analytic)
# What one runs on a host, and how its memory is counted (per device, bytes):
#   bf16 / int8 inference: weights + KV cache (bfloat16) + the prefill of one row of ``seq`` tokens
#       (one request at a time, as a server does; ``generate`` on a batch prefills all rows together:
#       compile that with ``plan --batch``). int8: every block matmul weight int8 with a float32 scale per
#       output channel, embedding and lm_head bfloat16 (``int8_embeddings`` quantizes them too), plus one
#       block's weights dequantized to bfloat16 as the matmuls' temporaries.
#   full fine-tuning: float32 params + float32 gradients + Adam's mu and nu (16 bytes / param) + activations.
#   LoRA / QLoRA: frozen base (bfloat16 / int8 as above) + rank-r adapters A [in, r], B [r, out] on q/k/v/out
#       and fc_in/fc_out of every block, float32 with float32 gradients and Adam state (16 bytes / adapter
#       param) + the same activations as full fine-tuning (the backward still runs through every block).
# Training activations use :func:`activation_estimate` with the chosen remat policy (default ``full``:
# what fits on a small chip). Devices > 1: inference splits weights, cache and heads over ``mp``
# (tensor parallel); training splits state over ``fsdp`` and rows over the devices.
MODES: dict[str, str] = {
    "bf16": "bf16 inference",
    "int8": "int8 weight-only inference",
    "full": "full fine-tuning",
    "lora": "LoRA (bf16 base)",
    "qlora": "QLoRA (int8 base)",
}
TRAIN_MODES: tuple[str, ...] = ("full", "lora", "qlora")
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")
# largest batch the search tries (rows per device for training)
MAX_BATCH = 4096


def _block_matrices(config: Any) -> dict[str, tuple[int, int]]:
    """``{name: (in, out)}`` of one block's matmul weights."""
    d, f = config.n_embd, config.inner_dim
    return {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "out_proj": (d, d), "fc_in": (d, f),
            "fc_out": (f, d)}


def weight_bytes(config: Any, scheme: str, int8_embeddings: bool = False) -> int:
    """Bytes of the causal LM's weights stored as ``scheme``: ``float32``, ``bfloat16`` or ``int8``
    (block matmul weights 1 byte per element + a float32 scale per output channel; the rest bfloat16;
    with ``int8_embeddings`` the embedding (scale per row) and lm_head (scale per vocab entry) too)."""
    n = config.num_params("causal_lm")
    if scheme in ("float32", "bfloat16"):
        return n * (4 if scheme == "float32" else 2)
    if scheme != "int8":
        raise ValueError(f"unknown weight scheme {scheme!r}; expected float32, bfloat16 or int8")
    mats = config.n_layer * sum(i * o for i, o in _block_matrices(config).values())
    scales = config.n_layer * sum(o for _, o in _block_matrices(config).values())
    if int8_embeddings:
        emb = 2 * config.vocab_size * config.n_embd
        mats += emb
        scales += 2 * config.vocab_size
    return mats + 4 * scales + 2 * (n - mats)


def lora_params(config: Any, rank: int) -> int:
    """Adapter parameters of rank ``rank`` on :data:`LORA_TARGETS` of every block: ``r * (in + out)`` each."""
    return config.n_layer * rank * sum(i + o for i, o in _block_matrices(config).values())


def decode_read_bytes(config: Any, scheme: str, int8_embeddings: bool = False) -> int:
    """Weight bytes a decode step reads: every weight but the embedding table (one row of it is read)."""
    emb = config.vocab_size * config.n_embd * (1 if scheme == "int8" and int8_embeddings else 2 if scheme != "float32" else 4)
    return weight_bytes(config, scheme, int8_embeddings) - emb


def default_loss_block_size() -> int:
    """The train config's default ``loss_block_size`` (the blockwise cross entropy's vocabulary block)."""
    from gptj_jax.train.config import TrainConfig

    return TrainConfig.__dataclass_fields__["loss_block_size"].default


def mode_memory(config: Any, mode: str, batch: int, seq: int, *, devices: int = 1, lora_rank: int = 8,
                remat: str = "full", int8_embeddings: bool = False,
                loss_block_size: Optional[int] = None) -> dict[str, int]:
    """Per-device bytes of ``mode`` (a :data:`MODES` key) at ``batch`` rows x ``seq`` tokens on ``devices``
    devices, by part (the rules above :data:`MODES`). Training needs ``batch`` divisible by ``devices``.
    ``loss_block_size``: full fine-tuning's loss (0: full logits; > 0: the blockwise loss in blocks of that
    many vocabulary columns; None: the train config's default)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    L, D = config.n_layer, config.n_embd
    if mode in ("bf16", "int8"):
        scheme = "bfloat16" if mode == "bf16" else "int8"
        parts = {
            "weights": weight_bytes(config, scheme, int8_embeddings) // devices,
            "kv_cache": 2 * L * batch * seq * D * 2 // devices,
            "activations": activation_estimate(config, {"dp": 1, "fsdp": 1, "mp": devices}, 1, seq, False, 2, remat),
        }
        if mode == "int8":
            parts["dequantized"] = 2 * sum(i * o for i, o in _block_matrices(config).values()) // devices
        return parts
    if batch % devices:
        raise ValueError(f"batch {batch} does not split over {devices} devices")
    n = config.num_params("causal_lm")
    # full fine-tuning takes the train config's loss (default: full logits); LoRA's step always computes the full
    # logits (train/step.py)
    if loss_block_size is None:
        loss_block_size = default_loss_block_size()
    activations = activation_estimate(config, {"dp": 1, "fsdp": devices, "mp": 1}, batch, seq, True, 2, remat,
                                      loss_block_size if mode == "full" else 0)
    if mode == "full":
        return {"weights": 4 * n // devices, "grads": 4 * n // devices, "opt_state": 8 * n // devices,
                "activations": activations}
    adapters = lora_params(config, lora_rank)
    base = weight_bytes(config, "bfloat16" if mode == "lora" else "int8", int8_embeddings) // devices
    parts = {"weights": base, "adapters": 4 * adapters, "grads": 4 * adapters, "opt_state": 8 * adapters,
             "activations": activations}
    if mode == "qlora":
        parts["dequantized"] = 2 * sum(i * o for i, o in _block_matrices(config).values()) // devices
    return parts


def largest_fit(config: Any, mode: str, host: Host, *, lora_rank: int = 8, remat: str = "full",
                int8_embeddings: bool = False, seq: Optional[int] = None,
                loss_block_size: Optional[int] = None) -> Optional[tuple[int, int]]:
    """The largest ``(batch, seq)`` of ``mode`` that fits ``host`` (below ``HEADROOM`` of each device's memory):
    the most rows at ``seq`` (default the model's ``n_positions``), else the longest context (a multiple of
    128) at the fewest rows; None if not even 128 tokens fit. Training rows come in multiples of the devices."""
    budget = HEADROOM * host.chip.memory
    seq = seq or config.n_positions
    unit = host.devices if mode in TRAIN_MODES else 1

    def fits(rows: int, t: int) -> bool:
        return sum(mode_memory(config, mode, rows * unit, t, devices=host.devices, lora_rank=lora_rank, remat=remat,
                               int8_embeddings=int8_embeddings, loss_block_size=loss_block_size).values()) <= budget

    if fits(1, seq):
        lo, hi = 1, MAX_BATCH  # fits(lo); search the largest
        if fits(hi, seq):
            return hi * unit, seq
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid, seq) else (lo, mid)
        return lo * unit, seq
    for t in range(seq - seq % 128, 0, -128):
        if fits(1, t):
            return unit, t
    return None


def decode_tokens_per_second(config: Any, mode: str, host: Host, int8_embeddings: bool = False) -> Optional[float]:
    """Batch-1 decode tokens/s bound by memory bandwidth: devices x bandwidth / weight bytes read per token
    (:func:`decode_read_bytes`; tensor parallel over the host's devices, communication ignored). None for
    training modes."""
    if mode not in ("bf16", "int8"):
        return None
    read = decode_read_bytes(config, "bfloat16" if mode == "bf16" else "int8", int8_embeddings)
    return host.devices * host.chip.bandwidth / read


def modes_table(config: Any, *, hosts: tuple[Host, ...] = HOSTS, lora_rank: int = 8, remat: str = "full",
                int8_embeddings: bool = False, seq: Optional[int] = None,
                loss_block_size: Optional[int] = None) -> dict[str, Any]:
    """Every host x mode: fits or not, the largest batch x context (and, training, rows per device), predicted
    batch-1 decode tokens/s; plus the per-mode memory at 1 row x ``seq`` on one device. ``loss_block_size``:
    full fine-tuning's loss (see :func:`mode_memory`). Plain JSON-able data (``plan --modes --json``)."""
    seq = seq or config.n_positions
    if loss_block_size is None:
        loss_block_size = default_loss_block_size()
    if loss_block_size < 0:
        raise ValueError(f"loss_block_size must be >= 0 (0: full logits), got {loss_block_size}")
    rows = []
    for host in hosts:
        cells = {}
        for mode in MODES:
            fit = largest_fit(config, mode, host, lora_rank=lora_rank, remat=remat, int8_embeddings=int8_embeddings,
                              seq=seq, loss_block_size=loss_block_size)
            unit = host.devices if mode in TRAIN_MODES else 1
            need = sum(mode_memory(config, mode, unit, seq, devices=host.devices, lora_rank=lora_rank, remat=remat,
                                   int8_embeddings=int8_embeddings, loss_block_size=loss_block_size).values())
            cells[mode] = {
                "fits": fit is not None and fit[1] == seq,
                "batch": fit[0] if fit else 0,
                "seq": fit[1] if fit else 0,
                "batch_per_device": (fit[0] if fit else 0) // unit if mode in TRAIN_MODES else None,
                "need_min_batch": need,  # per device at the fewest rows x seq
                "decode_tokens_per_s": decode_tokens_per_second(config, mode, host, int8_embeddings),
            }
        rows.append({"key": host.key, "hardware": host.name, "devices": host.devices,
                     "memory": host.chip.memory, "bf16_flops": host.chip.bf16_flops,
                     "int8_flops": host.chip.int8_flops, "bandwidth": host.chip.bandwidth, "modes": cells})
    memory = {mode: mode_memory(config, mode, 1, seq, lora_rank=lora_rank, remat=remat,
                                int8_embeddings=int8_embeddings, loss_block_size=loss_block_size) for mode in MODES}
    return {"seq": seq, "lora_rank": lora_rank, "remat": remat, "int8_embeddings": int8_embeddings,
            "loss_block_size": loss_block_size,
            "headroom": HEADROOM, "params": config.num_params("causal_lm"), "lora_params": lora_params(config, lora_rank),
            "memory_one_device": memory, "hosts": rows}


def format_modes(table: dict[str, Any], config_name: str = "") -> str:
    """:func:`modes_table` as markdown."""
    seq = table["seq"]
    lines = [
        f"## {config_name or 'model'}: hardware x mode (analytic), context {seq}, LoRA rank {table['lora_rank']} "
        f"({table['lora_params'] / 1e6:.1f}M adapter params), training remat {table['remat']}",
        "",
        f"### Memory per device, 1 row x {seq} on one device",
        "",
        "| mode | weights | KV cache | adapters + grads + Adam | activations | other | total |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, parts in table["memory_one_device"].items():
        train_state = parts.get("adapters", 0) + parts.get("grads", 0) + parts.get("opt_state", 0)
        lines.append(
            f"| {MODES[mode]} | {_gib(parts['weights'])} | {_gib(parts.get('kv_cache', 0))} | {_gib(train_state)} | "
            f"{_gib(parts['activations'])} | {_gib(parts.get('dequantized', 0))} | **{_gib(sum(parts.values()))}** |"
        )
    lines += [
        "",
        "Full fine-tuning's grads + Adam are over every parameter (float32); 'other' is one block's weights "
        "dequantized to bfloat16.",
        "",
        "### Hardware (per device)",
        "",
        "| host | devices | memory | bf16 TFLOP/s | int8 TOP/s | bandwidth GB/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in table["hosts"]:
        int8 = f"{r['int8_flops'] / T:g}" if r["int8_flops"] else "-"
        lines.append(f"| {r['hardware']} | {r['devices']} | {_gib(r['memory'])} | {r['bf16_flops'] / T:g} | {int8} | "
                     f"{r['bandwidth'] / GB:g} |")
    lines += [
        "",
        f"### Largest batch x context that fits (below {table['headroom']:.0%} of each device's memory)",
        "",
        "| host | " + " | ".join(MODES.values()) + " | decode tok/s, batch 1: bf16 | int8 |",
        "|---|" + "---|" * (len(MODES) + 2),
    ]
    for r in table["hosts"]:
        cells = []
        for mode in MODES:
            c = r["modes"][mode]
            if c["fits"]:
                cells.append(f"{c['batch']} x {c['seq']}")
            elif c["batch"]:
                cells.append(f"{c['batch']} x {c['seq']} only")
            else:
                cells.append(f"no ({_gib(c['need_min_batch'])})")
        tps = [f"{r['modes'][m]['decode_tokens_per_s']:.0f}" for m in ("bf16", "int8")]
        lines.append(f"| {r['hardware']} | " + " | ".join(cells + tps) + " |")
    lines += [
        "",
        "Cells: rows x context tokens (training: global rows, split over the devices); 'only': the full context "
        "does not fit, this shorter one does at the fewest rows; 'no': per-device need at the fewest rows. "
        "Decode tokens/s = devices x bandwidth / weight bytes read per token, an upper bound (the KV cache "
        "read and communication add to it). T4 has no bfloat16: use float16, same bytes. Training needs are "
        "state + an activation estimate, a lower bound: XLA may keep more live (GPT-J-6B full fine-tuning on a "
        "v5e-8 with full logits and einsum attention: 13.65 GiB analytic, 27.14 GiB compiled); `--compile-for` a "
        "TPU gives XLA:TPU's figure.",
    ]
    block = table.get("loss_block_size", 0)
    loss = (f"the blockwise loss in {block}-column vocabulary blocks (one block's float32 logits, exponentials and "
            "gradient per row, plus a compute-dtype copy of the lm_head kernel)" if block else
            "the full float32 [rows, seq, vocab] logits, their exponentials and their gradient")
    per_device = [f"{r['hardware']} {r['modes']['full']['batch_per_device']}" for r in table["hosts"]
                  if r["modes"]["full"]["fits"]]
    lines += [
        "",
        f"Full fine-tuning's loss: {loss} (`--loss-block-size`). Full fine-tuning rows per device at context {seq}: "
        + (", ".join(per_device) if per_device else "none fits") + ".",
    ]
    return "\n".join(lines)

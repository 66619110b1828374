"""The ``gptj-jax plan`` verb: flags in, :func:`gptj_jax.plan.make_plan` on simulated devices, tables out.

    gptj-jax plan --config gptj-6b --mesh dp=1,fsdp=1,mp=8 --batch 1 --seq 2048 [--train] [--json]
    gptj-jax plan --config gptj-6b --compile-for v5e-1 [--train]   # XLA:TPU via libtpu, no TPU needed
    gptj-jax plan --config gptj-6b --compile-for v5e-1 --train --attention splash --scan-layers
    gptj-jax plan --config gptj-6b --modes [--lora-rank 8]          # hardware x mode table, analytic, no compile
"""

from __future__ import annotations

import argparse

from gptj_jax.cli.command import Command, add_model_flags, model_flags
from gptj_jax.dtypes import DTYPE_NAMES

HELP = "per-device memory and FLOPs of a step on a mesh (AOT on simulated devices or a TPU topology)"
TPU_TARGETS = ("v2-8", "v3-8", "v4-8", "v5e-1", "v5e-4", "v5e-8", "v6e-1", "v6e-8", "v5p-8")  # = plan.TPU_TARGETS
MODES = ("bf16", "int8", "full", "lora", "qlora")  # = plan.MODES (no jax import for --help)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``plan`` flags to its sub-parser."""
    parser.add_argument("--config", required=True, help="config.json of the model, or a preset name (e.g. gptj-6b)")
    parser.add_argument("--mesh", default=None,
                        help="mesh sizes, e.g. dp=1,fsdp=1,mp=8 (default dp=1,fsdp=1,mp=1; with --compile-for: every "
                             "device on mp for inference, on fsdp for training)")
    parser.add_argument("--batch", type=int, default=1, help="global batch (rows) per step")
    parser.add_argument("--seq", type=int, default=2048, help="sequence length (cache slots for inference)")
    parser.add_argument("--train", action="store_true", help="plan the fine-tuning step instead of inference")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="compute dtype (default bfloat16)")
    parser.add_argument("--param-dtype", default=None, choices=DTYPE_NAMES,
                        help="parameter dtype (default: float32 for --train, else --dtype)")
    parser.add_argument("--remat", default=None, choices=("none", "full", "dots", "dots_no_batch"),
                        help="rematerialisation policy of the training step (default none; --modes: full)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per training step")
    parser.add_argument("--forward", default="gspmd", choices=("gspmd", "shard_map"),
                        help="training forward: XLA-partitioned or the explicit shard_map one")
    parser.add_argument("--loss-block-size", type=int, default=None,
                        help="training loss in blocks of this many vocabulary columns (default: the train config's "
                        "loss_block_size; 0: full logits); --modes: full fine-tuning's loss")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of markdown")
    parser.add_argument("--compile-for", default=None, choices=TPU_TARGETS, metavar="TPU",
                        help="compile for this TPU host's topology with libtpu (no TPU needed; pip install "
                             f"'gptj-jax[tpu-aot]'): {', '.join(TPU_TARGETS)}")
    parser.add_argument("--mode", default=None, choices=MODES,
                        help="what to compile: bf16 (inference in --dtype), int8 (int8 weights dequantized to "
                             "--param-dtype), full (= --train), lora (adapters on a frozen --dtype base) or qlora "
                             "(on an int8 base)")
    parser.add_argument("--modes", action="store_true",
                        help="print the analytic hardware x mode table (bf16 / int8 inference, full fine-tuning, LoRA, "
                             "QLoRA: fits, largest batch x context, batch-1 decode tokens/s) instead of compiling")
    parser.add_argument("--hardware", default=None, metavar="KEYS",
                        help="--modes: only these hosts, comma-separated keys (e.g. v5e-1,t4; default: all)")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA / QLoRA adapter rank (default 8)")
    parser.add_argument("--int8-embeddings", action="store_true",
                        help="--modes: int8 also quantizes the embedding and lm_head")
    add_model_flags(parser, quantize=False)  # --attention, --scan-layers: the compiled steps' (not --modes')


def run(args: argparse.Namespace) -> int:
    """Check the inputs, simulate the mesh's devices on CPU, compile, print the tables. Returns 0."""
    from gptj_jax import plan as plan_lib
    from gptj_jax.config import GPTJConfig
    from gptj_jax.model import resolve_attention
    from gptj_jax.sharding import parse_mesh

    flags = model_flags(args)
    config = GPTJConfig.load(args.config).replace(attention=flags["attention"], scan_layers=flags["scan_layers"])
    if args.modes:
        if args.lora_rank < 1:
            raise ValueError(f"--lora-rank must be >= 1, got {args.lora_rank}")
        if not 1 <= args.seq <= config.n_positions:
            raise ValueError(f"--seq {args.seq} must be in [1, n_positions={config.n_positions}]")
        hosts = plan_lib.HOSTS
        if args.hardware:
            hosts = tuple(plan_lib.host_by_key(key.strip()) for key in args.hardware.split(","))
        table = plan_lib.modes_table(config, hosts=hosts, lora_rank=args.lora_rank, remat=args.remat or "full",
                                     int8_embeddings=args.int8_embeddings, seq=args.seq,
                                     loss_block_size=args.loss_block_size)
        if args.json:
            import json

            print(json.dumps(table, indent=2))
        else:
            print(plan_lib.format_modes(table, str(args.config)))
        return 0
    if args.mode is not None and args.train and args.mode not in plan_lib.TRAIN_MODES:
        raise ValueError(f"--train with --mode {args.mode}: {args.mode} is an inference mode")
    mode = plan_lib.check_mode(args.mode or ("full" if args.train else "bf16"))
    if mode in ("lora", "qlora") and args.lora_rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {args.lora_rank}")
    train = mode in plan_lib.TRAIN_MODES
    if args.mesh is None and args.compile_for:
        n_dev = plan_lib.host_by_key(args.compile_for).devices
        sizes = {"dp": 1, "fsdp": n_dev if train else 1, "mp": 1 if train else n_dev}
    else:
        sizes = parse_mesh(args.mesh or "dp=1,fsdp=1,mp=1")
    if -1 in sizes.values():
        raise ValueError(f"--mesh {args.mesh!r}: plan needs every axis size (no -1): it simulates that many devices")
    n = plan_lib.check_mesh(config, sizes, args.batch, args.seq, train=train, dtype=args.dtype,
                            param_dtype=args.param_dtype, grad_accum=args.grad_accum)
    if args.compile_for:
        host = plan_lib.host_by_key(args.compile_for)
        if n != host.devices:
            raise ValueError(f"--mesh {args.mesh!r} has {n} devices; {host.name} has {host.devices}")
        devices = plan_lib.tpu_devices(args.compile_for)
    else:
        devices = plan_lib.simulated_devices(n)
    platform = devices[0].platform  # the attention choice (auto, or a kernel) is made for the devices compiled for
    forward = resolve_attention(config, args.seq, args.dtype, dropout=train and config.attn_pdrop > 0, backend=platform)
    plan = plan_lib.make_plan(  # traces for the devices' platform (model.attention_backend)
        config, sizes, args.batch, args.seq, train=train, dtype=args.dtype, param_dtype=args.param_dtype,
        remat=args.remat or "none", grad_accum=args.grad_accum, forward=args.forward, config_name=str(args.config),
        devices=devices, target=args.compile_for or "", mode=mode, loss_block_size=args.loss_block_size,
        lora_rank=args.lora_rank,
    )
    plan.notes.append(f"attention {config.attention}: {forward} for the {args.seq}-token "
                      f"{'training step' if train else 'prefill'}{'' if train else ', xla for single-token decode'}"
                      f"{'; blocks under nn.scan (scan_layers)' if config.scan_layers else ''}")
    if args.json:
        import json

        print(json.dumps(plan_lib.plan_dict(plan), indent=2))
    else:
        print(plan_lib.format_plan(plan))
    return 0


COMMAND = Command(HELP, add_arguments, run)

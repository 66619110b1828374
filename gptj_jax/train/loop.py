"""The training loop: one linear :func:`train` from a :class:`TrainConfig` to a trained checkpoint.

Reading order: mesh -> data -> model shape -> checkpoint manager -> state (restored, loaded or random)
-> loop (step, log, eval, save, stop on signal or NaN) -> final save.

Checkpoints (orbax ``CheckpointManager`` in ``model_dir``; ``model_dir/config.json`` is the model's HF
config, so ``gptj-jax convert model_dir ...`` reads the newest step)::

    model_dir/<step>/params/        the params pytree: the Flax checkpoint format of ``convert/flax.py``
    model_dir/<step>/train_state/   {"step", "rng", "opt_state"}
    model_dir/<step>/data/          grain iterator state (the data position), one file per process
    model_dir/<step>/meta/          JSON: step, tokens seen, the training config, the mesh

``model_dir`` may be local or a URL (``gs://bucket/run``): a URL goes to orbax, the config and metrics
writers and TensorBoard unchanged (see ``paths.py``), and before anything is compiled the run checks that it can
write there and read ``train_set`` / ``val_set``, so a bad path fails in seconds.

Saves are asynchronous (the next steps run while the files are written) and atomic (orbax writes a
temporary directory and renames it when complete: a run killed mid-save leaves the previous checkpoint as
the newest). Every ``ckpt_every`` steps, at ``total_steps``, and on SIGTERM / Ctrl-C. The last
``keep_last`` plus every ``keep_every``-th are kept. Running the same command again restores the newest
checkpoint (onto whatever mesh this run has) and continues exactly: same data order, same RNG.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import threading
import time
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp

from gptj_jax import sharding as sh
from gptj_jax.config import GPTJConfig
from gptj_jax.dtypes import DTYPES
from gptj_jax.losses import train_flops_per_token
from gptj_jax.train import data as data_lib
from gptj_jax.train import paths
from gptj_jax.train import step as step_lib
from gptj_jax.train.config import TrainConfig, TrainConfigError, mesh_sizes, model_config_for
from gptj_jax.train.evaluate import evaluate
from gptj_jax.train.optimizer import OptimizerConfig

METRICS_FILE = "metrics.jsonl"
# A remote metrics.jsonl cannot be appended to: it is rewritten whole at most this often (and at every
# checkpoint and at the end of the run).
REMOTE_FLUSH_SECS = 60.0


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


# ---------------------------------------------------------------------------------------- helpers
def measure_peak_flops(dtype: Any = jnp.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """Matmul FLOP/s of one device, measured now: ``[n, n] @ [n, n]`` repeated for about ``seconds``."""
    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while True:
        f(a).block_until_ready()
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and reps >= 3:
            return 2.0 * n**3 * reps / dt


def _manager(model_dir: str, cfg: TrainConfig) -> Any:
    import grain.python as grain
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_last,
        keep_period=cfg.keep_every,
        enable_async_checkpointing=cfg.async_checkpointing,
        create=True,
    )
    handlers = {
        "params": ocp.StandardCheckpointHandler(),
        "train_state": ocp.StandardCheckpointHandler(),
        "data": grain.PyGrainCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(model_dir, options=options, item_handlers=handlers)


def _save(mngr: Any, state: dict, iterator: Any, meta: dict, force: bool = False) -> bool:
    import grain.python as grain
    import orbax.checkpoint as ocp

    step = int(meta["step"])
    if step in mngr.all_steps():
        return False
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        train_state=ocp.args.StandardSave({"step": state["step"], "rng": state["rng"], "opt_state": state["opt_state"]}),
        data=grain.PyGrainCheckpointSave(iterator),
        meta=ocp.args.JsonSave(meta),
    )
    return mngr.save(step, args=args, force=force)


def _restore(mngr: Any, step: int, abstract: dict, iterator: Any) -> tuple[dict, dict]:
    import grain.python as grain
    import orbax.checkpoint as ocp

    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract["params"]),
        train_state=ocp.args.StandardRestore(
            {"step": abstract["step"], "rng": abstract["rng"], "opt_state": abstract["opt_state"]}
        ),
        data=grain.PyGrainCheckpointRestore(iterator),
        meta=ocp.args.JsonRestore(),
    )
    out = mngr.restore(step, args=args)
    ts = out["train_state"]
    state = {"step": ts["step"], "params": out["params"], "opt_state": ts["opt_state"], "rng": ts["rng"]}
    return state, dict(out["meta"])


def _checkpoint_config(path: str) -> Optional[GPTJConfig]:
    """The model config stored with the checkpoint (or hub id) ``path``; None for an mtj checkpoint (its
    shape comes from the mtj keys)."""
    from gptj_jax.convert.load import resolve, source_config

    try:
        source = resolve(path)
    except FileNotFoundError:
        raise TrainConfigError(f"key 'model': {path} does not exist (and is not a Hugging Face hub id)") from None
    if source.format == "mtj":
        return None
    return source_config(source)


@functools.lru_cache(maxsize=4)
def _steps(scfg: step_lib.StepConfig, mesh: Any, ocfg: OptimizerConfig) -> tuple:
    """(optimizer, schedule, state shardings, jitted train step, jitted eval step), cached so that another
    ``train`` call in the same process with the same settings (a resume, the demo, tests) compiles nothing."""
    optimizer, schedule = ocfg.build()
    shardings = step_lib.state_shardings(scfg, mesh, optimizer, DTYPES[ocfg.param_dtype])
    train_step = step_lib.make_train_step(scfg, mesh, optimizer, schedule, shardings)
    eval_step = step_lib.make_eval_step(scfg, mesh, shardings["params"])
    return optimizer, schedule, shardings, train_step, eval_step


def _harness(cfg: TrainConfig, model_cfg: GPTJConfig, mesh: Any, batch_size: int) -> Any:
    """The ``eval_harness_tasks`` runner (``gptj_jax.eval_harness``), its tasks and tokenizer checked now."""
    try:
        from gptj_jax.eval_harness import EvalHarnessError, TrainingHarness
    except ImportError as e:
        raise TrainConfigError(f"key 'eval_harness_tasks' needs lm-evaluation-harness ({e}): "
                               "pip install 'gptj-jax[eval]'") from None
    from gptj_jax.tokenizer import load_tokenizer

    try:
        return TrainingHarness(cfg.eval_harness_tasks, config=model_cfg, tokenizer=load_tokenizer(cfg.model),
                               mesh=mesh, dtype=cfg.dtype, batch_size=batch_size, limit=cfg.eval_harness_limit,
                               include_path=cfg.eval_harness_include_path)
    except EvalHarnessError as e:
        raise TrainConfigError(f"key 'eval_harness_tasks': {e}") from None


class _Stopper:
    """SIGTERM / SIGINT set a flag the loop checks after each step; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.signal: Optional[str] = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> "_Stopper":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


class MetricsFileError(ValueError):
    """``metrics.jsonl`` has a line that is not a JSON object (other than a torn last line); names file and line."""


def _kept_metrics_lines(text: str, path: str, resume_step: int) -> tuple[list[str], bool]:
    """The lines of a ``metrics.jsonl`` (``text``) a run resuming from ``resume_step`` keeps, and whether any was
    dropped: rows past ``resume_step`` (written by a killed run after its last checkpoint) and a torn last line
    (a kill in the middle of a write; dropped with a warning). Any other bad line is a MetricsFileError."""
    lines = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    kept, dropped = [], False
    for i, (lineno, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                warnings.warn(f"{path}:{lineno}: dropping a torn last line (a run killed while writing it?): "
                              f"not valid JSON ({e})", stacklevel=3)
                dropped = True
                continue
            raise MetricsFileError(f"{path}:{lineno}: not valid JSON ({e}); fix or delete that line to resume") from None
        if not isinstance(row, dict):
            raise MetricsFileError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
        if row.get("step", 0) <= resume_step:
            kept.append(line + "\n")
        else:
            dropped = True
    return kept, dropped


class _Logger:
    """metrics.jsonl (+ TensorBoard when tensorboardX is installed) on process 0.

    A local ``metrics.jsonl`` gets one appended line per row. A remote one (``gs://``: objects cannot be
    appended to) is kept in memory and rewritten whole every REMOTE_FLUSH_SECS, at ``flush()`` (each checkpoint)
    and at ``close()``. Opening it for a resumed run drops the rows past ``resume_step`` and a torn last line,
    rewriting the file atomically. A TensorBoard writer that cannot open its directory is a TrainConfigError.
    """

    def __init__(self, model_dir: str, resume_step: int, tensorboard: bool) -> None:
        self.enabled = jax.process_index() == 0
        self.path = paths.join(model_dir, METRICS_FILE)
        self.remote = paths.is_remote(model_dir)
        self.lines: list[str] = []  # remote: the whole file
        self.dirty = False
        self.last_flush = time.monotonic()
        self.tb = None
        if not self.enabled:
            return
        if paths.exists(self.path):  # drop rows a killed run wrote past the checkpoint we resume from
            kept, dropped = _kept_metrics_lines(paths.read_text(self.path, errors="replace"), self.path, resume_step)
            if dropped:
                paths.write_text_atomic(self.path, "".join(kept))
            if self.remote:
                self.lines = kept
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                tb_dir = paths.join(model_dir, "tensorboard")
                try:
                    self.tb = SummaryWriter(tb_dir)
                except Exception as e:  # any failure to open the writer: one clear error at start-up
                    raise TrainConfigError(
                        f"key 'tensorboard': cannot write TensorBoard files to {tb_dir} ({type(e).__name__}: {e}); "
                        "set tensorboard=false, or install what tensorboardX needs for that path "
                        "(google-cloud-storage for gs://, boto3 for s3://)"
                    ) from None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(row) + "\n"
        if self.remote:
            self.lines.append(line)
            self.dirty = True
            if time.monotonic() - self.last_flush >= REMOTE_FLUSH_SECS:
                self.flush()
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])

    def flush(self) -> None:
        """Write out what is buffered: the whole remote metrics.jsonl, and TensorBoard's queue."""
        if not self.enabled:
            return
        if self.remote and self.dirty:
            paths.write_text_atomic(self.path, "".join(self.lines))
            self.dirty = False
            self.last_flush = time.monotonic()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig) -> dict:
    """Train (or resume) as ``cfg`` says; returns a summary dict (``step``, ``loss``, ``stopped_by``...).

    Raises TrainConfigError / DataError for bad keys or data, TrainingDiverged on a NaN or inf loss.
    """
    from tqdm import tqdm

    # ---- mesh and batch sizes
    try:
        mesh = sh.make_mesh(**mesh_sizes(cfg))
    except ValueError as e:
        raise TrainConfigError(f"key 'mesh' / 'cores_per_replica': {e}") from None
    n_replicas = int(mesh.shape["dp"]) * int(mesh.shape["fsdp"])
    micro = cfg.per_replica_batch * n_replicas  # global rows per micro-batch
    k = cfg.gradient_accumulation_steps
    if micro % jax.process_count():
        raise TrainConfigError(f"global micro-batch {micro} does not split over {jax.process_count()} processes")

    # ---- model shape (a resumed run's own config.json, else the `model` checkpoint's, else the keys)
    # A local model_dir is made absolute; a URL (gs://bucket/run) is used as it is, everywhere.
    model_dir = paths.run_path(cfg.model_dir)
    saved_config = paths.join(model_dir, "config.json")
    try:
        resuming = paths.isfile(saved_config)
    except Exception as e:  # ImportError / ValueError / OSError from a URL's filesystem (no gcsfs...)
        raise TrainConfigError(f"key 'model_dir': cannot read {model_dir} ({type(e).__name__}: {e})") from None
    if resuming:
        model_cfg = model_config_for(cfg, GPTJConfig.from_pretrained(saved_config))
    elif cfg.model:
        model_cfg = model_config_for(cfg, _checkpoint_config(cfg.model))
    else:
        model_cfg = model_config_for(cfg)
    lora_spec = None
    if cfg.lora_rank:  # LoRA: adapters on the frozen `model` base (gptj_jax/lora.py)
        from gptj_jax.lora import LoraError, make_spec

        try:
            lora_spec = make_spec(model_cfg, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        except LoraError as e:
            raise TrainConfigError(str(e)) from None

    harness = _harness(cfg, model_cfg, mesh, micro) if cfg.eval_harness_tasks else None

    # ---- data
    train_records = data_lib.TokenRecords(cfg.train_set, key="train_set")
    data_lib.check_records(train_records, cfg.seq, "train_set")
    val_records = {}
    for name, directory in cfg.val_set.items():
        val_records[name] = data_lib.TokenRecords(directory, key=f"val_set.{name}")
        data_lib.check_records(val_records[name], cfg.seq, f"val_set.{name}")
        if len(val_records[name]) < micro:
            raise data_lib.DataError(
                f"val_set.{name} ({directory}) has {len(val_records[name])} records, fewer than one batch of {micro}"
            )

    # ---- model_dir: created and written to now, so a bad path fails here and not at the first checkpoint
    try:
        paths.check_writable(model_dir)
    except Exception as e:  # OSError, or ImportError / ValueError from a URL's filesystem (no gcsfs...)
        raise TrainConfigError(f"key 'model_dir': cannot write to {model_dir} ({type(e).__name__}: {e})") from None

    # ---- checkpoint manager and logs (before compiling: a TensorBoard writer that cannot open fails now)
    mngr = _manager(model_dir, cfg)
    latest = mngr.latest_step()
    try:
        logger = _Logger(model_dir, latest or 0, cfg.tensorboard)
    except BaseException:
        mngr.close()
        raise
    param_dtype = DTYPES[cfg.param_dtype]
    scfg = step_lib.StepConfig(model_cfg, cfg.dtype, cfg.remat, cfg.forward, cfg.z_loss, k, cfg.loss_block_size,
                               lora_spec, cfg.lora_base_quantize if lora_spec is not None else None,
                               (cfg.lora_base_dtype or cfg.param_dtype) if lora_spec is not None else None)
    try:
        optimizer, schedule, shardings, train_step, eval_step = _steps(scfg, mesh, OptimizerConfig.from_train_config(cfg))
    except ValueError as e:
        raise TrainConfigError(f"mesh {sh.describe_mesh(mesh)} does not fit the model: {e}") from None

    loader = data_lib.train_loader(train_records, k * micro // jax.process_count(), cfg.seed, cfg.shuffle,
                                   cfg.data_workers)
    iterator = iter(loader)

    # ---- state: restored, loaded or random
    meta: dict = {}
    base, step_args, eval_fn = None, (), eval_step
    if lora_spec is not None:  # the frozen base, loaded (and quantized) tensor by tensor onto the mesh
        from gptj_jax.convert.load import load

        _, base = load(cfg.model, mesh=mesh, dtype=DTYPES[cfg.lora_base_dtype or cfg.param_dtype], head="causal_lm",
                       config=model_cfg, quantize=cfg.lora_base_quantize)
        step_args = (base,)
        eval_fn = lambda p, b: eval_step(p, b, base)  # noqa: E731
    if latest is not None:
        abstract = step_lib.abstract_state(scfg, mesh, optimizer, param_dtype)
        state, meta = _restore(mngr, latest, abstract, iterator)
        source = f"resumed from {model_dir}/{latest}"
    else:
        if lora_spec is not None:
            from gptj_jax.lora import init_adapters, save_run_file

            params = jax.device_put(init_adapters(model_cfg, lora_spec, jax.random.PRNGKey(cfg.seed), param_dtype),
                                    shardings["params"])
            source = f"LoRA r={lora_spec.rank} on {len(lora_spec.paths)} kernels of {cfg.model} (frozen)"
            if jax.process_index() == 0:
                save_run_file(model_dir, lora_spec, cfg.model, cfg.lora_targets, cfg.lora_base_dtype,
                              cfg.lora_base_quantize)
        elif cfg.model:
            from gptj_jax.convert.load import load

            # each weight straight onto the mesh, in param_dtype; the config the keys checked is the one used
            _, params = load(cfg.model, mesh=mesh, dtype=param_dtype, head="causal_lm", config=model_cfg)
            source = f"loaded {cfg.model}"
        else:
            params = sh.init_sharded_params(model_cfg, mesh, jax.random.PRNGKey(cfg.seed), "causal_lm", param_dtype)
            source = f"random init (seed {cfg.seed})"
        state = step_lib.init_state(params, optimizer, cfg.seed, shardings)
        if jax.process_index() == 0:
            model_cfg.save_pretrained(model_dir, architectures=["GPTJForCausalLM"], torch_dtype=cfg.param_dtype)
    start = int(jax.device_get(state["step"]))
    tokens_seen = int(meta.get("tokens_seen", 0))

    batch_sharding = step_lib.batch_spec_sharding(mesh)
    eval_sharding = sh.logical_sharding(mesh, ("batch", "length"))
    tokens_per_step = k * micro * cfg.seq
    flops_per_step = train_flops_per_token(model_cfg, cfg.seq) * tokens_per_step
    peak = cfg.peak_flops or measure_peak_flops(DTYPES[cfg.dtype])
    peak_total = peak * jax.device_count()

    main = jax.process_index() == 0
    if main:
        print(
            f"[{cfg.name}] {source}; model n_layer={model_cfg.n_layer} n_embd={model_cfg.n_embd} "
            f"({model_cfg.num_params() / 1e6:.1f}M params); mesh {sh.describe_mesh(mesh)}; batch {k} x {micro} x "
            f"{cfg.seq} tokens; steps {start} -> {cfg.total_steps}; peak {peak / 1e12:.3f} TFLOP/s per device",
            flush=True,
        )

    def save(step: int, force: bool = False) -> None:
        meta = {"step": step, "tokens_seen": tokens_seen, "train_config": cfg.to_dict(), "mesh": sh.describe_mesh(mesh),
                "time": time.time()}
        _save(mngr, state, iterator, meta, force=force)
        logger.flush()

    def run_eval(step: int) -> dict:
        row: dict = {"step": step}
        for name, records in val_records.items():
            r = evaluate(state["params"], eval_fn, records, micro, cfg.val_batches, eval_sharding)
            row[f"val_{name}_loss"] = r["loss"]
            row[f"val_{name}_ppl"] = r["ppl"]
        if len(row) > 1:
            logger.write(row)
            if main:
                shown = " ".join(f"{k}={v:.4f}" for k, v in row.items() if k.endswith("_loss"))
                tqdm.write(f"step {step}: {shown}")
        return row

    summary: dict = {"start_step": start, "stopped_by": None, "step": start, "loss": None}
    bar = tqdm(total=cfg.total_steps, initial=start, desc=cfg.name, disable=not (cfg.progress and main),
               dynamic_ncols=True)
    try:
        with _Stopper() as stopper:
            step = start
            while step < cfg.total_steps:
                t0 = time.perf_counter()
                local = next(iterator)  # [k * micro / processes, seq + 1] uint16
                local = local.reshape(k, -1, local.shape[-1])
                batch = jax.make_array_from_process_local_data(batch_sharding, local)
                state, metrics = train_step(state, batch, *step_args)
                metrics = {name: float(v) for name, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                step += 1
                tokens_seen += tokens_per_step
                loss = metrics["loss"]
                if not math.isfinite(loss) or not math.isfinite(metrics["grad_norm"]):
                    mngr.wait_until_finished()
                    good = mngr.latest_step()
                    where = f"the last good checkpoint is step {good} in {model_dir}" if good is not None else "no checkpoint was saved"
                    raise TrainingDiverged(
                        f"loss is {loss} (grad norm {metrics['grad_norm']}) at step {step}; stopping without saving; {where}"
                    )
                summary.update(step=step, loss=loss)
                if step % cfg.log_every == 0 or step == cfg.total_steps:
                    mfu = flops_per_step / dt / peak_total
                    row = {"step": step, **metrics, "tokens_per_s": tokens_per_step / dt, "step_time": dt,
                           "mfu": mfu, "tokens_seen": tokens_seen}
                    if step == start + 1:
                        row["compile_step"] = True  # includes compilation: not a speed sample
                    logger.write(row)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{metrics['lr']:.2e}",
                                    tok_s=f"{tokens_per_step / dt:.0f}", mfu=f"{mfu:.1%}", refresh=False)
                bar.update(1)
                if step % cfg.val_every == 0 and val_records:
                    run_eval(step)
                if step % cfg.val_every == 0 and harness is not None:  # every process takes part
                    logger.write({"step": step, **harness.run(state["params"])})
                if stopper.signal is not None:
                    save(step, force=True)
                    summary["stopped_by"] = stopper.signal
                    if main:
                        tqdm.write(f"{stopper.signal}: saved step {step} to {model_dir}; exiting")
                    break
                if step % cfg.ckpt_every == 0 or step == cfg.total_steps:
                    save(step, force=True)
            if step == cfg.total_steps and step not in mngr.all_steps() and summary["stopped_by"] is None:
                save(step, force=True)
    finally:
        bar.close()
        mngr.wait_until_finished()
        mngr.close()
        logger.close()
    summary["final_params"] = state["params"]  # with LoRA: the adapters
    summary["base_params"] = base
    summary["model_config"] = model_cfg
    summary["mesh"] = mesh
    summary["latest_checkpoint"] = step
    return summary

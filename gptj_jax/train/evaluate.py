"""Evaluation: mean token cross entropy of params on prepared data, in the training loop and on its own.

    evaluate(params, eval_step, records, global_batch, max_batches, sharding)   one data set, compiled step given
    evaluate_checkpoint(model, data_dirs, ...)                                   load a checkpoint, build the mesh
                                                                                 and step, evaluate each data dir
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gptj_jax import sharding as sh
from gptj_jax.train import data as data_lib
from gptj_jax.train import step as step_lib


def evaluate(
    params: Any, eval_step: Any, records: data_lib.TokenRecords, global_batch: int, max_batches: Optional[int],
    sharding: Any,
) -> dict:
    """Mean token cross entropy over the first ``max_batches`` batches: ``{"loss", "ppl", "tokens"}``."""
    total = np.zeros(2, np.float64)
    for local in data_lib.eval_batches(records, global_batch, max_batches, jax.process_index(), jax.process_count()):
        batch = jax.make_array_from_process_local_data(sharding, local)
        total += np.asarray(eval_step(params, batch), np.float64)
    loss = float(total[0] / total[1])
    return {"loss": loss, "ppl": float(math.exp(min(loss, 700.0))), "tokens": int(total[1])}


def evaluate_checkpoint(model: str, data_dirs: Sequence[str], batch_size: int = 8, max_batches: Optional[int] = None,
                        dtype: str = "float32", mesh_text: Optional[str] = None,
                        config_path: Optional[str] = None, *, revision: Optional[str] = None,
                        attention: str = "auto", scan_layers: bool = False) -> list[dict]:
    """Loss (nats/token), perplexity and bits per byte of ``model`` on each prepared dir in ``data_dirs``.

    ``model``: anything :func:`gptj_jax.load` reads (a hub id, an HF or HF Flax directory, a gptj-jax
    checkpoint or training run dir (its newest step), or an mtj checkpoint with ``config_path``, its
    training JSON or an HF config.json; ``revision`` of a hub id), placed straight onto the mesh in float32. ``mesh_text`` as for
    :func:`gptj_jax.sharding.parse_mesh`; ``dp`` takes the devices left over unless it is named (default:
    all devices data-parallel). ``attention`` / ``scan_layers``: how the model runs (:class:`GPTJConfig`'s
    fields; scanned, the params are loaded stacked). Returns one ``{"data", "loss", "ppl", "bits_per_byte",
    "tokens"}`` per dir.
    """
    from gptj_jax.convert.load import load, resolve, source_config

    mesh = sh.make_mesh(**sh.parse_mesh(mesh_text or "", rest="dp"))
    source = resolve(model, revision)
    config = source_config(source, config_path).replace(attention=attention, scan_layers=scan_layers)
    config, params = load(source, mesh=mesh, dtype=jnp.float32, head="causal_lm", config=config)
    scfg = step_lib.StepConfig(config, dtype)
    eval_step = step_lib.make_eval_step(scfg, mesh, sh.param_shardings(config, mesh, "causal_lm"))
    sharding = sh.logical_sharding(mesh, ("batch", "length"))
    results = []
    for directory in data_dirs:
        records = data_lib.TokenRecords(directory, key="--data")
        if records.seq > config.n_positions:
            raise data_lib.DataError(
                f"--data {directory} was prepared with --seq {records.seq}, larger than the model's n_positions "
                f"({config.n_positions})"
            )
        sh.check_batch(mesh, batch_size)
        r = evaluate(params, eval_step, records, batch_size, max_batches, sharding)
        bpt = records.bytes_per_token
        r["bits_per_byte"] = r["loss"] / math.log(2) / bpt if bpt else float("nan")
        r["data"] = directory
        results.append(r)
    return results

"""Multi-host JAX: process-group initialization, CLI flags, and per-process batches.

On a multi-host TPU slice or GPU cluster every host runs the same program;
``jax.distributed.initialize`` connects them, after which ``jax.devices()`` lists every host's
devices and a mesh from ``sharding.make_mesh`` spans them all. Each process then feeds only the
batch rows its devices hold (:func:`process_rows`, :func:`global_batch`).

CLI verbs call :func:`add_distributed_args` on their parser and :func:`maybe_initialize` first
thing in ``run`` (before any JAX computation)::

    gptj-jax VERB ... --coordinator-address 10.0.0.2:1234 --num-processes 4 --process-id 0

Without flags, ``--distributed auto`` initializes when the environment says this is one of several
processes (multi-host TPU VM variables, SLURM or Open MPI with more than one task) and lets JAX
detect the rest; a single TPU VM (v2-8, v3-8) or a single GPU host needs no initialization.
``--cpu-devices N`` simulates N CPU devices in this process (testing, ``gptj-jax plan``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # jax is imported where it is used, so the CLI can add these flags without it
    import jax
    from jax.sharding import Mesh

    from . import sharding as sh

# Environment variables whose presence (with more than one host / task) means "multi-process".
_HOST_LIST_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")
_COUNT_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--coordinator-address``, ``--num-processes``, ``--process-id``, ``--local-device-ids``,
    ``--distributed {auto,on,off}`` and ``--cpu-devices`` to ``parser``."""
    g = parser.add_argument_group("multi-host")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordinator service (all processes pass the same one)")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="total number of processes")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's id, 0..N-1")
    g.add_argument("--local-device-ids", default=None, metavar="IDS",
                   help="comma-separated local device ids this process uses (default: all)")
    g.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                   help="auto: initialize when flags or the environment (multi-host TPU VM, SLURM, "
                        "Open MPI) say there are several processes; on: always (JAX detects the "
                        "cluster); off: never (default: auto)")
    g.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                   help="simulate N CPU devices in this process (testing and planning)")


def detect_multiprocess(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The name of the variable showing this is one of several processes, or None.

    Checks the multi-host TPU VM host lists (``TPU_WORKER_HOSTNAMES``, ``TPU_PROCESS_ADDRESSES``,
    more than one entry), ``MEGASCALE_COORDINATOR_ADDRESS``, and ``SLURM_NTASKS`` /
    ``OMPI_COMM_WORLD_SIZE`` greater than 1.
    """
    env = os.environ if environ is None else environ
    for var in _HOST_LIST_VARS:
        hosts = [h for h in env.get(var, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return var
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "MEGASCALE_COORDINATOR_ADDRESS"
    for var in _COUNT_VARS:
        value = env.get(var, "")
        if value.isdigit() and int(value) > 1:
            return var
    return None


def set_cpu_devices(n: int) -> None:
    """Simulate ``n`` CPU devices (must run before JAX creates its backends)."""
    if n < 1:
        raise ValueError(f"--cpu-devices must be >= 1, got {n}")
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as e:
        raise RuntimeError(
            f"cannot simulate {n} CPU devices: JAX's backend is already initialized ({e}); "
            "set it before any JAX computation, or use XLA_FLAGS=--xla_force_host_platform_device_count"
        ) from None


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    local_device_ids: Optional[Sequence[int]] = None,
    cpu_collectives: str = "gloo",
) -> None:
    """``jax.distributed.initialize`` with explicit values, or JAX's cluster detection for the ones left None.

    ``cpu_collectives`` picks the cross-process implementation for CPU devices
    (``jax_cpu_collectives_implementation``: ``gloo`` or ``mpi``).
    """
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} is not in 0..{num_processes - 1}")
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError(
            "pass --coordinator-address, --num-processes and --process-id together "
            f"(got coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, process_id={process_id!r})"
        )
    import jax

    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=list(local_device_ids) if local_device_ids is not None else None,
    )


def maybe_initialize(args: argparse.Namespace) -> bool:
    """Act on the flags of :func:`add_distributed_args`; True when ``jax.distributed`` was initialized.

    Call before any JAX computation. ``--cpu-devices`` is applied first.
    """
    if getattr(args, "cpu_devices", None):
        set_cpu_devices(args.cpu_devices)
    mode = getattr(args, "distributed", "auto")
    explicit = getattr(args, "coordinator_address", None) is not None or getattr(args, "num_processes", None) is not None
    if mode == "off":
        if explicit:
            raise ValueError("--distributed off contradicts --coordinator-address / --num-processes")
        return False
    if mode == "auto" and not explicit and detect_multiprocess() is None:
        return False
    ids = getattr(args, "local_device_ids", None)
    initialize(
        args.coordinator_address,
        args.num_processes,
        args.process_id,
        [int(i) for i in ids.split(",")] if ids else None,
    )
    return True


# ---------------------------------------------------------------------------------------- batches
def process_rows(mesh: Mesh, global_batch_size: int, rules: Optional[sh.Rules] = None) -> tuple[int, int]:
    """``(start, stop)``: the rows of a global ``[B, ...]`` batch this process's devices hold.

    Rows are split over the batch axes (``("dp", "fsdp")``); devices that differ only along other
    axes (``mp``) hold the same rows. Raises if this process's rows are not one contiguous range.
    ``rules``: the logical-axis rules (default ``sharding.DEFAULT_RULES``).
    """
    import jax

    from . import sharding as sh

    sharding = sh.batch_sharding(mesh, global_batch_size, sh.DEFAULT_RULES if rules is None else rules)
    blocks = sorted({
        index[0].indices(global_batch_size)[:2]
        for index in sharding.addressable_devices_indices_map((global_batch_size, 1)).values()
    })
    if any(prev[1] != nxt[0] for prev, nxt in zip(blocks, blocks[1:])):
        raise ValueError(
            f"process {jax.process_index()} holds rows {blocks} of the {global_batch_size}-row batch, not one "
            "contiguous range; order the mesh so each process's devices are neighbours along the batch axes"
        )
    lo, hi = blocks[0][0], blocks[-1][1]
    return lo, hi


def global_batch(mesh: Mesh, local_rows: Any, global_batch_size: int, rules: Optional[sh.Rules] = None) -> jax.Array:
    """Assemble a global ``[B, ...]`` array from this process's rows (``process_rows`` of them).

    Uses ``jax.make_array_from_process_local_data``; on one process it is a plain sharded
    ``device_put``.
    """
    import jax
    import numpy as np

    from . import sharding as sh

    rules = sh.DEFAULT_RULES if rules is None else rules
    local_rows = np.asarray(local_rows)
    lo, hi = process_rows(mesh, global_batch_size, rules)
    if local_rows.shape[0] != hi - lo:
        raise ValueError(
            f"process {jax.process_index()} must supply rows {lo}..{hi} ({hi - lo} rows) of the "
            f"{global_batch_size}-row batch, got {local_rows.shape[0]}"
        )
    names = sh.BATCH_AXES[: local_rows.ndim] + (None,) * max(local_rows.ndim - 2, 0)
    sharding = sh.logical_sharding(mesh, names, rules)
    global_shape = (global_batch_size,) + local_rows.shape[1:]
    return jax.make_array_from_process_local_data(sharding, local_rows, global_shape)

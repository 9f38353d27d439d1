"""One run over several processes (TPU pod slices, multi-node GPUs): JAX's multi-controller runtime.

Every process runs the same program. ``initialize`` joins them (``jax.distributed.initialize``):
on its own where JAX can tell (Cloud TPU VMs, Slurm job steps, Open MPI), or from an explicit
coordinator address, process count and id (flags, or JAXDIFF_COORDINATOR / JAXDIFF_NUM_PROCESSES
/ JAXDIFF_PROCESS_ID). Any other single process is left as it is.

The data axis then spans every device of every process. ``Batches`` gives each process only its
rows of the same seeded global batch, and ``jaxdiff.train.shard_batches`` assembles the global
array from them, so a run's numbers do not depend on how many processes share it.
"""

from __future__ import annotations

import argparse
import os
import secrets

import jax
import numpy as np
from etils import epath

from jaxdiff import data

ENV = {"coordinator": "JAXDIFF_COORDINATOR", "num_processes": "JAXDIFF_NUM_PROCESSES",
       "process_id": "JAXDIFF_PROCESS_ID"}


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (TPU pod slices, multi-node GPUs)")
    g.add_argument("--coordinator", default=os.environ.get(ENV["coordinator"]),
                   help=f"host:port of process 0, when JAX cannot find it itself (or ${ENV['coordinator']})")
    g.add_argument("--num-processes", type=int, default=_env_int("num_processes"),
                   help=f"processes in the run (or ${ENV['num_processes']})")
    g.add_argument("--process-id", type=int, default=_env_int("process_id"),
                   help=f"this process's index, 0..num-processes-1 (or ${ENV['process_id']})")


def _env_int(name):
    v = os.environ.get(ENV[name])
    return int(v) if v not in (None, "") else None


def _on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM (libtpu installed, TPU chips present), as JAX decided when it was imported: the
    flag its own cluster detection reads first. Private to JAX, so a JAX without it counts as no."""
    try:
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    except ImportError:
        return False
    return bool(running_in_cloud_tpu_vm)


def _cluster_detected() -> bool:
    """A run that JAX's own cluster detection will find: any Cloud TPU VM (a slice of one host is a
    run of one process; JAX reads the hosts of a larger slice from the VM's metadata), a Slurm job
    step of several tasks, an Open MPI job of several ranks."""
    return (_on_cloud_tpu_vm() or int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
            or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
    """Join the run's processes before anything else touches JAX's devices; a second call (another
    experiment in the same Python process) leaves the first one's run as it is."""
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator, --num-processes and --process-id go together: give all three "
                             f"(got {coordinator!r}, {num_processes!r}, {process_id!r})")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id must be in 0..{num_processes - 1}, got {process_id}")
        if num_processes > 1 and not jax.distributed.is_initialized():
            jax.distributed.initialize(coordinator, num_processes, process_id)
    elif _cluster_detected() and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def from_args(args) -> None:
    initialize(args.coordinator, args.num_processes, args.process_id)


def local_rows(batch_size: int) -> slice:
    """This process's rows of a global batch: process p of n holds rows p * B / n .. (p + 1) * B / n,
    the rows its devices take in the data axis (``jaxdiff.train.make_mesh`` orders devices by process)."""
    n = jax.process_count()
    if batch_size % n:
        raise ValueError(f"batch_size {batch_size} must be divisible by the {n} processes")
    local = batch_size // n
    return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


class Batches(data.Batches):
    """``data.Batches`` that gathers only this process's rows (``local_rows``) of each global batch.
    With one process it is ``data.Batches``."""

    def __init__(self, images, labels, batch_size: int, seed: int):
        super().__init__(images, labels, batch_size, seed)
        self.rows = local_rows(batch_size)

    def indices(self, index: int) -> np.ndarray:
        return super().indices(index)[self.rows]


def check_shared_folder(folder) -> None:
    """With several processes, ``folder`` must be one folder seen by all (a shared filesystem or a
    bucket): checkpoints are written by every process into it. Raises ValueError if not."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    folder = epath.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / ".jaxdiff-shared"
    token = np.frombuffer(secrets.token_bytes(8), np.uint32) if jax.process_index() == 0 else np.zeros(2, np.uint32)
    token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    if jax.process_index() == 0:
        marker.write_text(token.tobytes().hex())
    multihost_utils.sync_global_devices("jaxdiff: shared-folder marker written")
    seen = marker.read_text() if marker.exists() else None
    ok = np.asarray(multihost_utils.process_allgather(np.asarray([seen == token.tobytes().hex()])))
    multihost_utils.sync_global_devices("jaxdiff: shared-folder marker read")
    if jax.process_index() == 0:  # every process has read it (the barrier above)
        marker.unlink(missing_ok=True)
    if not ok.all():
        bad = [i for i, v in enumerate(ok.reshape(-1)) if not v]
        raise ValueError(f"{folder} is not one folder shared by all {jax.process_count()} processes (processes {bad} "
                         f"do not see what process 0 wrote there): use a shared filesystem or a gs:// bucket")

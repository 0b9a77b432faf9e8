"""Process groups for DistributedDataParallel: where a rank learns who it is, and a launcher.

A rank finds its place from the environment, in this order:

* **torchrun** (and a Kubernetes Job or PyTorchJob that sets torchrun's variables):
  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
* **SLURM** (``srun``): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the master
  address is ``MASTER_ADDR`` if set, else the first host of ``SLURM_JOB_NODELIST`` (from
  ``scontrol show hostnames``), and the port ``MASTER_PORT`` or 29500.
* Otherwise a single process (no process group).

:func:`launch` starts ``nproc`` local processes the way ``torchrun --standalone`` does:
it picks a free loopback port, sets the variables above in each child and waits for all;
when one fails, the others are stopped and the error is raised in the parent.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_process_group", "launch", "free_port", "cleanup"]


@dataclass(frozen=True)
class DistEnv:
    """Who this process is in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environ(cls, environ=None) -> DistEnv:
        env = os.environ if environ is None else environ
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
        if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
            addr = env.get("MASTER_ADDR") or _slurm_master(env.get("SLURM_JOB_NODELIST", ""))
            return cls(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       addr, int(env.get("MASTER_PORT", 29500)), "slurm")
        return cls()


def _slurm_master(nodelist: str) -> str:
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        return out[0] if out else "127.0.0.1"
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")[0]


def init_process_group(env: DistEnv, device: str = "cpu", timeout_s: float = 600) -> None:
    """Join the job's process group: NCCL on GPUs, gloo on CPUs. No-op for one process."""
    if not env.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on loopback (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(local_rank: int, fn, args, nproc: int, port: int, threads: int | None) -> None:
    os.environ.update({"RANK": str(local_rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(local_rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if threads:
        torch.set_num_threads(threads)
    fn(*args)


@contextlib.contextmanager
def without_dask_worker_environ():
    """Take out of ``os.environ``, for the duration, what a Dask Nanny wrote into it for its workers.

    Starting a ``LocalCluster`` sets ``distributed.nanny.pre-spawn-environ`` (``OMP_NUM_THREADS=1``,
    ``MALLOC_TRIM_THRESHOLD_=65536``, ...) in the *parent's* environment and leaves it there.
    A training process spawned afterwards inherited it: one thread, and a malloc that returns
    every large buffer to the kernel, so each step page-faults its gradients back in. SCALE on
    Leukemia at batch 256 trained at 1,953 cells/s with that malloc setting against 3,156
    without. Only variables that still hold Dask's value are removed.
    """
    try:
        import dask

        dask_env = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    except ImportError:
        dask_env = {}
    saved = {k: os.environ.pop(k) for k, v in dask_env.items() if os.environ.get(k) == str(v)}
    try:
        yield saved
    finally:
        os.environ.update(saved)


def launch(fn, args: tuple, nproc: int, *, threads_per_proc: int | None = None) -> None:
    """Run ``fn(*args)`` in ``nproc`` fresh processes that form one job on this machine.

    ``fn`` must be importable (a module-level function). Each child sees torchrun's
    variables, so ``DistEnv.from_environ()`` inside ``fn`` finds its rank. ``threads_per_proc``
    (default: cores // nproc) keeps the processes from oversubscribing the cores.
    """
    import torch.multiprocessing as mp

    if threads_per_proc is None:
        threads_per_proc = max(1, (os.cpu_count() or 1) // nproc)
    with without_dask_worker_environ():
        mp.start_processes(_child, args=(fn, args, nproc, free_port(), threads_per_proc), nprocs=nproc,
                           join=True, start_method="spawn")

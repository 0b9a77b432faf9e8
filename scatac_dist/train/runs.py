"""What every model's training run shares around the loop: starting the ranks, the hand-off
folder, and the rules for resuming.

* :func:`run_ranks` runs a model's rank entry point here, in ``nproc`` local processes, or
  as one rank of a ``torchrun``/``srun`` job.
* :func:`handoff_folder` holds the initial module and masks the ranks read.
* Checkpoints carry the run's fingerprint (the data and parameters that decide the
  computation); :func:`resume_mode` and :func:`resolve_resume` decide whether a run continues
  the newest checkpoint of a folder, :func:`restart_folder` is the store's own restart state
  for ``resume="auto"`` without a folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from .checkpoint import checkpoint_info
from .data import ShardedStream
from .dist import DistEnv, cleanup, init_process_group, launch
from .trainer import TrainConfig, fit

if TYPE_CHECKING:
    from ..store import Atlas

logger = logging.getLogger("scatac_dist")

__all__ = ["run_ranks", "rank_main", "handoff_folder", "resume_mode", "resolve_resume", "restart_folder", "describe_difference",
           "cores"]


def describe_difference(old: dict, new: dict) -> str:
    """The entries of two fingerprints that differ, in words (``seed: 0 in the checkpoint, 1
    now; ...``)."""
    def short(key, v):
        if key == "data" and isinstance(v, dict):
            shape = "x".join(str(s) for s in v.get("shape", []))
            return f"{v.get('path')} ({shape}, nnz {v.get('nnz')})"
        if isinstance(v, dict) and "n" in v:
            return f"{v['n']} ({v.get('sha1', '')[:8]})"
        return json.dumps(v)

    parts = [f"{key}: {short(key, old.get(key))} in the checkpoint, {short(key, new.get(key))} now"
             for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    return "; ".join(parts)


def resume_mode(resume: bool | str) -> str:
    """``"no"``, ``"yes"`` or ``"auto"`` from SCALE's ``resume`` (``False``/``True``/``"auto"``)."""
    modes = {False: "no", True: "yes", "no": "no", "yes": "yes", "auto": "auto"}
    if isinstance(resume, str):
        resume = resume.lower()
    if resume not in modes:
        raise ValueError(f"resume={resume!r}; use False, True or 'auto'")
    return modes[resume]


def restart_folder(atlas: Atlas, stage: str, fp: dict) -> Path:
    """The store's restart folder of ``stage`` (a model) for this fingerprint (state of other parameters
    or data there is discarded). The ranks of a torchrun/srun job all ask at once: a rank
    that loses the race to create the folder asks again."""
    for attempt in range(10):
        try:
            return atlas.resume_state(stage, fp)
        except OSError:
            if attempt == 9:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def resolve_resume(folder: str | None, fp: dict, mode: str, name: str = "training") -> bool:
    """Whether to continue the newest checkpoint in ``folder`` (``mode`` from :func:`resume_mode`).

    Raises
    ------
    InputError
        ``"yes"`` and no checkpoint there; ``"yes"`` or ``"auto"`` and the checkpoint has another
        fingerprint (the folder holds another run), or ``"auto"`` and it has none (written by
        a version without fingerprints: it cannot be told apart from another run's).
    """
    if mode == "no":
        return False
    info = checkpoint_info(folder) if folder else None
    if info is None:
        if mode == "yes":
            raise InputError(folder, "no checkpoint to resume from (no step-*.pt)",
                             "run without --resume to start, or with --resume auto to start fresh when there "
                             "is no checkpoint; pass the --checkpoint-dir of the run to continue")
        logger.info("%s: no checkpoint in %s; starting fresh", name, folder)
        return False
    old = info["fingerprint"]
    if old is None:
        if mode == "auto":
            raise InputError(folder, f"holds a checkpoint ({info['path'].name}) without a fingerprint, so it cannot "
                             "be told whether it was written for this data and these parameters",
                             "continue it with --resume yes, or give this run another --checkpoint-dir")
        logger.warning("%s: checkpoint without a fingerprint; continuing it as asked", info["path"])
        return True
    if old != fp:
        raise InputError(folder, f"holds the checkpoint of another run ({info['path'].name}, step {info['step']}): "
                         f"{describe_difference(old, fp)}",
                         "rerun with the data and parameters of that run to continue it, or give this run "
                         "another --checkpoint-dir (or remove that folder) to start fresh")
    logger.info("%s: resuming from %s (step %d)", name, info["path"], info["step"])
    return True


@contextlib.contextmanager
def handoff_folder(checkpoint_dir: str | None, prefix: str = "train") -> Iterator[Path]:
    """A temporary folder for the hand-off, inside ``checkpoint_dir`` when given (created if
    missing), so that every rank of a multi-node job sees it there.

    Its name holds the prefix, this host and PID (``<prefix>-<host>-<pid>-*``); hand-off folders there of
    processes of this host that no longer run (a killed job's) are removed first, since each
    holds a copy of the initial module."""
    host = socket.gethostname()
    if checkpoint_dir:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        for old in Path(checkpoint_dir).glob(f"{prefix}-{host}-*-*"):
            pid = old.name[len(f"{prefix}-{host}-"):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{prefix}-{host}-{os.getpid()}-", dir=checkpoint_dir,
                                     ignore_cleanup_errors=True) as tmp:
        yield Path(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it runs
        return True
    return True


def run_ranks(rank_fn, spec: dict, *, env: DistEnv, nproc: int = 1) -> dict | None:
    """Run ``rank_fn(spec)`` (a module-level function) in every rank: in this process, in
    ``nproc`` local processes (:func:`.dist.launch`), or, under ``torchrun``/``srun``, as this
    process's rank. ``rank_fn`` saves rank 0's result to ``spec["out"]``; returns it, or
    ``None`` in the other ranks of a ``torchrun``/``srun`` job."""
    if env.distributed:
        rank_fn(spec)  # this process is one rank of torchrun/srun: threads are the launcher's call
    elif nproc <= 1:
        # all the cores this process may use: a Dask LocalCluster started earlier leaves
        # OMP_NUM_THREADS=1 in the environment, and a process that starts torch after that
        # trains on one core (train.dist.without_dask_worker_environ has the measurements)
        prev = torch.get_num_threads()
        torch.set_num_threads(cores())
        try:
            rank_fn(spec)
        finally:
            torch.set_num_threads(prev)
    else:
        launch(rank_fn, (spec,), nproc)
    if env.rank != 0:
        return None
    return torch.load(spec["out"], map_location="cpu", weights_only=False)


def cores() -> int:
    """Cores this process may run on (the affinity mask, which SLURM and containers set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def rank_main(spec: dict, make_rows, make_module) -> None:
    """One rank of a model's training: join the process group, stream this rank's shard of
    ``make_rows(spec)`` (a reader), train ``make_module(spec)`` (:func:`.trainer.fit`) and save
    ``{"module": state dict, "summary": ...}`` to ``spec["out"]`` (rank 0), or, with
    ``spec["every_rank"]``, every rank to ``out.rank<r>.pt`` (for checks that ranks agree).
    ``spec["train"]`` holds the :class:`.trainer.TrainConfig`."""
    env = DistEnv.from_environ()
    cfg = TrainConfig(**spec["train"])
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(env.local_rank)
        cfg.device = f"cuda:{env.local_rank}"
    init_process_group(env, cfg.device)
    try:
        stream = ShardedStream(make_rows(spec), batch_size=cfg.batch_size, rank=env.rank, world=env.world_size,
                               seed=cfg.seed, buffer_chunks=cfg.buffer_chunks)
        module = make_module(spec)
        summary = fit(module, stream, cfg, env)
        out = Path(spec["out"])
        if spec.get("every_rank"):
            out = out.with_name(f"{out.stem}.rank{env.rank}{out.suffix}")
        if env.rank == 0 or spec.get("every_rank"):
            tmp = out.with_suffix(".tmp")
            torch.save({"module": module.cpu().state_dict(), "summary": summary}, tmp)
            tmp.replace(out)
    finally:
        cleanup()

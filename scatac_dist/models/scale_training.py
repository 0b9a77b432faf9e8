"""SCALE's training run: the initial module, the hand-off to the training processes and the
DDP rank entry point.

:meth:`scatac_dist.models.SCALE.fit` writes the masks and the initial module (seeded, its
prior fitted by a Gaussian mixture on the encoder's latents) into a hand-off folder
(:func:`handoff`). :func:`train` then runs :func:`train_rank` in every rank: in this
process, in ``nproc`` local processes (:func:`scatac_dist.train.launch`), or as one rank of
a ``torchrun``/``srun`` job that runs ``fit`` itself. Each rank streams its shard of the
store and trains (:func:`scatac_dist.train.fit`); rank 0 saves the trained module back into
the folder.

``train_rank(spec)`` is public so that tests and other launchers can start ranks directly;
``spec`` is a dict of plain values (store, masks, initial state, module and training
configuration), so it pickles to spawned processes.

Checkpoints and resume (:func:`resolve_resume`): every checkpoint carries the run's
:func:`fingerprint` (the counts, the cells and peaks used, and the parameters that decide
the computation). ``resume=True`` continues the newest checkpoint of ``checkpoint_dir``;
``resume="auto"`` continues it when there is one and starts fresh otherwise; both refuse a
checkpoint with another fingerprint. With ``"auto"`` and no ``checkpoint_dir`` the
checkpoints go to the store's restart state (:meth:`scatac_dist.store.Atlas.resume_state`),
removed once the outputs are published.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import InputError
from ..modules.scale import FULL_LAYERS, QUICK_LAYERS, SCALEModule
from ..train import DistEnv, ShardedStream, StoreRows, TrainConfig, cleanup, fit, init_process_group, launch
from ..train.checkpoint import checkpoint_info
from ._scale_outputs import encode_csr

if TYPE_CHECKING:
    from ..store import Atlas
    from .scale import SCALE

logger = logging.getLogger("scatac_dist")

__all__ = ["CACHE_BYTES", "CHECKPOINT_EVERY", "handoff", "train", "train_rank", "module_from", "fingerprint",
           "resume_mode", "resolve_resume", "restart_folder"]

#: decoded chunks a training rank keeps in memory: a small set is read from zarr once, not
#: every epoch; an atlas streams past the first 256 MiB (see :mod:`scatac_dist.train.data`)
CACHE_BYTES = 256 * 2**20

#: steps between checkpoints when checkpoints are kept (a ``checkpoint_dir``, or
#: ``resume="auto"``) and ``checkpoint_every`` is not given: a few seconds to minutes of
#: training, against a checkpoint write of the module and Adam's moments (about 1.2 GB at
#: 100k peaks)
CHECKPOINT_EVERY = 1000

#: SCALE's parameters that change what training computes (beyond the data, k and the number
#: of ranks); the stopping rule (``max_iter``, ``min_iter``, ``patience``) is not among them,
#: so a resumed run may train on with a larger budget
FINGERPRINT_PARAMS = ("n_latent", "batch_size", "lr_schedule", "kl_warmup", "weight_decay", "clip_norm", "seed",
                      "depth_norm", "depth_offset", "gmm_cells", "buffer_chunks")


def train_config(model: SCALE, fingerprint: dict | None = None) -> TrainConfig:
    """The training loop's options for ``model``: the rate schedule (2e-3 constant, or the
    paper-era code's x0.9 every 10 steps down to 2e-4) and the stopping rule. ``model`` has
    its checkpoint folder, ``checkpoint_every`` and ``resume`` (a bool) resolved
    (:func:`resolve_resume`)."""
    if model.lr_schedule not in ("paper", "constant"):
        raise ValueError(f"lr_schedule={model.lr_schedule!r}; use 'paper' or 'constant'")
    paper = model.lr_schedule == "paper"
    lr = train_config_lr(model)
    return TrainConfig(batch_size=model.batch_size, max_iter=model.max_iter, lr=lr,
                       lr_decay=0.9 if paper else 1.0, lr_decay_every=10, lr_min=2e-4 if paper else 0.0,
                       weight_decay=model.weight_decay, patience=model.patience, min_iter=model.min_iter,
                       clip_norm=model.clip_norm, seed=model.seed, device=model.device,
                       checkpoint_dir=model.checkpoint_dir, checkpoint_every=int(model.checkpoint_every or 0),
                       resume=bool(model.resume), fingerprint=fingerprint, progress=model.progress, buffer_chunks=model.buffer_chunks,
                       log_path=model.log_path)


def _digest(mask: np.ndarray) -> str:
    return hashlib.sha1(np.packbits(np.asarray(mask, bool)).tobytes()).hexdigest()


def fingerprint(model: SCALE, atlas: Atlas, cells: np.ndarray, peaks: np.ndarray, k: int, world: int,
                chunk_rows: int, median_open: float | None) -> dict:
    """What a checkpoint must match to be continued: the counts (:meth:`Atlas.identity`),
    the cells and peaks used (their number and a digest of the masks), k, the encoder, the
    learning rate, the number of ranks and the unit of sharding (both decide the order
    cells are seen in), the median open peaks, and :data:`FINGERPRINT_PARAMS`. Plain JSON
    values."""
    fp = {"data": atlas.identity(),
          "cells": {"n": int(np.count_nonzero(cells)), "sha1": _digest(cells)},
          "peaks": {"n": int(np.count_nonzero(peaks)), "sha1": _digest(peaks)},
          "n_clusters": int(k), "encoder": list(encoder_layers(model.hidden, model.quick)),
          "lr": train_config_lr(model), "world_size": int(world), "chunk_rows": int(chunk_rows),
          "median_open": median_open,
          **{name: getattr(model, name) for name in FINGERPRINT_PARAMS}}
    return json.loads(json.dumps(fp, default=str))


def train_config_lr(model: SCALE) -> float:
    """The initial learning rate: ``model.lr``, or SCALE's 2e-3."""
    return float(model.lr) if model.lr is not None else 2e-3


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


def restart_folder(atlas: Atlas, fp: dict) -> Path:
    """The store's restart folder of SCALE for this fingerprint (state of other parameters
    or data there is discarded). The ranks of a torchrun/srun job all ask at once: a rank
    that loses the race to create the folder asks again."""
    for attempt in range(10):
        try:
            return atlas.resume_state("scale", fp)
        except OSError:
            if attempt == 9:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def resolve_resume(folder: str | None, fp: dict, mode: str) -> bool:
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
        logger.info("SCALE: no checkpoint in %s; starting fresh", folder)
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
    logger.info("SCALE: resuming from %s (step %d)", info["path"], info["step"])
    return True


def encoder_layers(hidden: tuple[int, ...] | None, quick: bool) -> tuple[int, ...]:
    """The encoder's hidden sizes: ``hidden`` when given, else 1024-128 (``quick``) or the
    paper's 3200-1600-800-400."""
    if hidden:
        return tuple(int(h) for h in hidden)
    return QUICK_LAYERS if quick else FULL_LAYERS


def initial_module(model: SCALE, rows: StoreRows, k: int, median_open: float | None) -> SCALEModule:
    """The module before training: Xavier-normal weights from ``torch.manual_seed(seed)`` and,
    unless resuming, the prior's means and variances from a diagonal Gaussian mixture fitted
    to the encoder's latent means (:func:`gmm_init`)."""
    torch.manual_seed(model.seed)
    module = SCALEModule(rows.n_peaks, int(k), encoder_layers(model.hidden, model.quick), model.n_latent,
                         kl_warmup=model.kl_warmup,
                         input_scale=median_open if model.depth_norm else None,
                         depth_ref=median_open if model.depth_offset else None)
    if not model.resume:
        gmm_init(module, rows, int(k), seed=model.seed, max_cells=model.gmm_cells, encode_batch=model.encode_batch)
    return module


def gmm_init(module: SCALEModule, rows: StoreRows, k: int, *, seed: int = 0, max_cells: int = 20_000,
             encode_batch: int = 2048) -> None:
    """Set the prior from scikit-learn's diagonal ``GaussianMixture`` on the untrained
    encoder's latent means, as the authors do; on a seeded sample of ``max_cells`` cells."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    order = rng.permutation(rows.n_chunks)
    mus, have = [], 0
    for _, m, _cells in rows.iter_chunks([int(c) for c in order if rows.chunk_cells[c]]):
        mus.append(encode_csr(module, m, batch=encode_batch, joint=False)[0])  # the prior is not fitted yet
        have += m.shape[0]
        if have >= max_cells:
            break
    Z = np.concatenate(mus)
    if len(Z) > max_cells:
        Z = Z[rng.choice(len(Z), max_cells, replace=False)]
    gmm = GaussianMixture(n_components=k, covariance_type="diag", random_state=seed, reg_covar=1e-6)
    gmm.fit(Z)
    # like the authors, only the means and variances are taken; pi starts uniform
    module.prior.set_from(np.full(k, 1.0 / k), gmm.means_, gmm.covariances_)


@contextlib.contextmanager
def handoff_folder(checkpoint_dir: str | None) -> Iterator[Path]:
    """A temporary folder for the hand-off, inside ``checkpoint_dir`` when given (created if
    missing), so that every rank of a multi-node job sees it there.

    Its name holds this host and PID (``scale-<host>-<pid>-*``); hand-off folders there of
    processes of this host that no longer run (a killed job's) are removed first, since each
    holds a copy of the initial module."""
    host = socket.gethostname()
    if checkpoint_dir:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        for old in Path(checkpoint_dir).glob(f"scale-{host}-*-*"):
            pid = old.name[len(f"scale-{host}-"):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"scale-{host}-{os.getpid()}-", dir=checkpoint_dir,
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


def handoff(folder: Path, model: SCALE, rows: StoreRows, cells: np.ndarray, peaks: np.ndarray, k: int,
            median_open: float | None, fingerprint: dict | None = None) -> dict:
    """Build the initial module and write it, with the masks, into ``folder``; returns the spec
    :func:`train_rank` reads. ``model`` has its checkpoint options resolved (a bool
    ``resume``); ``fingerprint`` goes into every checkpoint.

    The module lives only in this call: the ranks rebuild it from ``init.pt``, and a copy kept
    by the caller while a rank trains in the same process would add the first layer's size
    (410 MB at 100k peaks) to the peak memory.
    """
    cfg = train_config(model, fingerprint)  # checked before any work
    module = initial_module(model, rows, k, median_open)
    np.savez(folder / "masks.npz", cells=cells, peaks=peaks)
    torch.save(module.state_dict(), folder / "init.pt")
    return {"store": str(rows.path), "mod": rows.mod, "chunk_rows": rows.chunk_rows,
            "masks": str(folder / "masks.npz"), "init": str(folder / "init.pt"), "out": str(folder / "out.pt"),
            "module": module.config(), "train": asdict(cfg)}


def train(spec: dict, *, env: DistEnv, nproc: int = 1) -> dict | None:
    """Run :func:`train_rank` on ``spec`` in every rank; returns rank 0's result
    (``{"module": state dict, "summary": ...}``), or ``None`` in the other ranks of a
    ``torchrun``/``srun`` job."""
    if env.distributed:
        train_rank(spec)  # this process is one rank of torchrun/srun: threads are the launcher's call
    elif nproc <= 1:
        # all the cores this process may use: a Dask LocalCluster started earlier leaves
        # OMP_NUM_THREADS=1 in the environment, and a process that starts torch after that
        # trains on one core (train.dist.without_dask_worker_environ has the measurements)
        prev = torch.get_num_threads()
        torch.set_num_threads(_cores())
        try:
            train_rank(spec)
        finally:
            torch.set_num_threads(prev)
    else:
        launch(train_rank, (spec,), nproc)
    if env.rank != 0:
        return None
    return torch.load(spec["out"], map_location="cpu", weights_only=False)


def train_rank(spec: dict) -> None:
    """One rank's training: join the process group, stream this rank's shard, train, save.

    With ``spec["every_rank"]`` every rank saves its module (``out.rank<r>.pt``), for checks
    that the ranks agree; otherwise rank 0 saves to ``spec["out"]``.
    """
    env = DistEnv.from_environ()
    cfg = TrainConfig(**spec["train"])
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(env.local_rank)
        cfg.device = f"cuda:{env.local_rank}"
    init_process_group(env, cfg.device)
    try:
        masks = np.load(spec["masks"])
        rows = StoreRows(spec["store"], mod=spec["mod"], cells=masks["cells"], peaks=np.flatnonzero(masks["peaks"]),
                         chunk_rows=spec["chunk_rows"], cache_bytes=CACHE_BYTES)
        stream = ShardedStream(rows, batch_size=cfg.batch_size, rank=env.rank, world=env.world_size,
                               seed=cfg.seed, buffer_chunks=cfg.buffer_chunks)
        module = module_from(spec["module"], torch.load(spec["init"], map_location="cpu", weights_only=False))
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


def module_from(config: dict, state: dict) -> SCALEModule:
    """A :class:`SCALEModule` holding ``state``'s tensors themselves: built on the meta device
    and assigned, so neither a random initialisation nor a second copy of the first layer
    (410 MB at 100k peaks) is made only to be overwritten."""
    with torch.device("meta"):
        module = SCALEModule(**{**config, "hidden": tuple(config["hidden"])})
    module.load_state_dict(state, assign=True)
    return module


def _cores() -> int:
    """Cores this process may run on (the affinity mask, which SLURM and containers set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)

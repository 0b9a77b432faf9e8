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

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..modules.scale import FULL_LAYERS, QUICK_LAYERS, SCALEModule
from ..train import DistEnv, StoreRows, TrainConfig, runs
from ..train.runs import rank_main, resume_mode, run_ranks
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


def restart_folder(atlas: Atlas, fp: dict) -> Path:
    """SCALE's restart folder in the store for this fingerprint (:func:`scatac_dist.train.restart_folder`)."""
    return runs.restart_folder(atlas, "scale", fp)


def resolve_resume(folder: str | None, fp: dict, mode: str) -> bool:
    """:func:`scatac_dist.train.resolve_resume` for SCALE."""
    return runs.resolve_resume(folder, fp, mode, name="SCALE")


def handoff_folder(checkpoint_dir: str | None):
    """:func:`scatac_dist.train.handoff_folder` with SCALE's prefix."""
    return runs.handoff_folder(checkpoint_dir, prefix="scale")


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
    """Run :func:`train_rank` on ``spec`` in every rank (:func:`scatac_dist.train.run_ranks`);
    returns rank 0's result (``{"module": state dict, "summary": ...}``), or ``None`` in the
    other ranks of a ``torchrun``/``srun`` job."""
    return run_ranks(train_rank, spec, env=env, nproc=nproc)


def train_rank(spec: dict) -> None:
    """One rank's training (:func:`scatac_dist.train.rank_main`): this rank's shard of the
    store's used cells and peaks, the initial module from the hand-off."""
    rank_main(spec, _rows, _module)


def _rows(spec: dict) -> StoreRows:
    masks = np.load(spec["masks"])
    return StoreRows(spec["store"], mod=spec["mod"], cells=masks["cells"], peaks=np.flatnonzero(masks["peaks"]),
                     chunk_rows=spec["chunk_rows"], cache_bytes=CACHE_BYTES)


def _module(spec: dict) -> SCALEModule:
    return module_from(spec["module"], torch.load(spec["init"], map_location="cpu", weights_only=False))


def module_from(config: dict, state: dict) -> SCALEModule:
    """A :class:`SCALEModule` holding ``state``'s tensors themselves: built on the meta device
    and assigned, so neither a random initialisation nor a second copy of the first layer
    (410 MB at 100k peaks) is made only to be overwritten."""
    with torch.device("meta"):
        module = SCALEModule(**{**config, "hidden": tuple(config["hidden"])})
    module.load_state_dict(state, assign=True)
    return module



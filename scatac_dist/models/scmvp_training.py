"""scMVP's training run: its inputs (cells, genes, peaks, IDF), the initial module, and the
DDP rank entry point.

The same stack as SCALE (:mod:`scatac_dist.train`): :meth:`scatac_dist.models.SCMVP.fit`
writes the masks and the initial module (its prior fitted by a Gaussian mixture on the
untrained encoder's latents) into a hand-off folder; :func:`scatac_dist.train.run_ranks`
runs :func:`train_rank` here, in ``nproc`` local processes or as one rank of a
``torchrun``/``srun`` job. Each rank streams its shard of the joint store
(:class:`scatac_dist.train.JointRows`: RNA and ATAC of the same cells side by side) and
trains (:func:`scatac_dist.train.fit`); rank 0 saves the trained module into the folder.
Checkpoints carry :func:`fingerprint`; resume follows :func:`scatac_dist.train.resolve_resume`.
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

from ..modules.scmvp import SCMVPModule
from ..train import (
    DistEnv,
    JointRows,
    SparseBatch,
    StoreRows,
    TrainConfig,
)
from ..train.runs import rank_main, run_ranks

if TYPE_CHECKING:
    from ..store import Atlas
    from .scmvp import SCMVP

logger = logging.getLogger("scatac_dist")

__all__ = ["CACHE_BYTES", "CHECKPOINT_EVERY", "FINGERPRINT_PARAMS", "joint_rows", "train_config", "fingerprint",
           "initial_module", "gmm_init", "handoff", "train", "train_rank", "module_from", "encode_rows"]

#: decoded chunks a rank keeps in memory (as SCALE's ranks)
CACHE_BYTES = 256 * 2**20
#: steps between checkpoints when checkpoints are kept and ``checkpoint_every`` is not given
CHECKPOINT_EVERY = 500
#: parameters that change what training computes (the stopping rule is not among them)
FINGERPRINT_PARAMS = ("n_latent", "width", "heads", "shared", "batch_size", "lr", "weight_decay", "clip_norm",
                      "seed", "tfidf_scale", "rna_weight", "atac_weight", "cycle", "gmm_cells",
                      "buffer_chunks")


def joint_rows(store, cells: np.ndarray, genes: np.ndarray, peaks: np.ndarray, chunk_rows: int,
               cache_bytes: int = 0) -> JointRows:
    """The training stream's reader: RNA counts of ``genes`` then binarised ATAC of ``peaks``
    (boolean masks over each modality's features), the cells ``cells``."""
    rna = StoreRows(store, mod="rna", cells=cells, peaks=np.flatnonzero(genes), binarize=False, chunk_rows=chunk_rows)
    atac = StoreRows(store, mod="atac", cells=cells, peaks=np.flatnonzero(peaks), binarize=True, chunk_rows=chunk_rows)
    return JointRows([rna, atac], cache_bytes=cache_bytes)


def train_config(model: SCMVP, steps_per_epoch: int, fingerprint: dict | None = None) -> TrainConfig:
    """The loop's options: Adam at ``model.lr``, ``max_epochs`` whole epochs (no early
    stopping: the paper trains a fixed number), clipping, checkpoints."""
    max_iter = int(model.max_epochs) * int(steps_per_epoch)
    if model.max_steps is not None:
        max_iter = min(max_iter, int(model.max_steps))
    return TrainConfig(batch_size=model.batch_size, max_iter=max_iter,
                       lr=float(model.lr), weight_decay=model.weight_decay, patience=int(model.max_epochs) + 1,
                       min_iter=0, clip_norm=model.clip_norm, seed=model.seed, device=model.device,
                       checkpoint_dir=model.checkpoint_dir, checkpoint_every=int(model.checkpoint_every or 0),
                       resume=bool(model.resume), fingerprint=fingerprint, progress=model.progress,
                       buffer_chunks=model.buffer_chunks, log_path=model.log_path)


def _digest(mask: np.ndarray) -> str:
    return hashlib.sha1(np.packbits(np.asarray(mask, bool)).tobytes()).hexdigest()


def fingerprint(model: SCMVP, atlas: Atlas, rna: Atlas, cells, genes, peaks, k: int, world: int,
                chunk_rows: int) -> dict:
    """What a checkpoint must match to be continued: both modalities' counts, the cells,
    genes and peaks used, k, the number of ranks, the unit of sharding and
    :data:`FINGERPRINT_PARAMS`."""
    fp = {"data": atlas.identity(), "rna": rna.identity(),
          **{name: {"n": int(np.count_nonzero(m)), "sha1": _digest(m)}
             for name, m in (("cells", cells), ("genes", genes), ("peaks", peaks))},
          "n_clusters": int(k), "world_size": int(world), "chunk_rows": int(chunk_rows),
          **{name: getattr(model, name) for name in FINGERPRINT_PARAMS}}
    return json.loads(json.dumps(fp, default=str))


def initial_module(model: SCMVP, rows: JointRows, k: int, idf: np.ndarray) -> SCMVPModule:
    """Xavier-normal weights from ``torch.manual_seed(seed)`` and, unless resuming, the prior
    from a diagonal Gaussian mixture on the untrained encoder's latent means (:func:`gmm_init`)."""
    torch.manual_seed(model.seed)
    n_genes, n_peaks = rows.widths
    module = SCMVPModule(n_genes, n_peaks, int(k), idf, n_latent=model.n_latent, width=model.width,
                         heads=model.heads, shared=model.shared, tfidf_scale=model.tfidf_scale, cycle=model.cycle,
                         rna_weight=model.rna_weight, atac_weight=model.atac_weight)
    if not model.resume:
        gmm_init(module, rows, int(k), seed=model.seed, max_cells=model.gmm_cells, batch=model.encode_batch)
    return module


@torch.no_grad()
def encode_rows(module: SCMVPModule, m, *, batch: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Latent means and ``log p(z, c)`` of the cells of a joint CSR block (eval mode)."""
    module.eval()
    dev = next(module.parameters()).device
    mus, joints = [], []
    for a in range(0, m.shape[0], batch):
        sub = m[a:a + batch]
        b = SparseBatch.from_csr(sub, np.arange(sub.shape[0])).to_device(dev, dense=False)
        mu, log_joint = module.embed(b["cols"], b["offsets"], b["values"])
        mus.append(mu.float().cpu().numpy())
        joints.append(log_joint.cpu().numpy())
    return np.concatenate(mus), np.concatenate(joints)


def gmm_init(module: SCMVPModule, rows: JointRows, k: int, *, seed: int = 0, max_cells: int = 20_000,
             batch: int = 2048) -> None:
    """The prior's means and variances from scikit-learn's diagonal ``GaussianMixture`` on
    the latent means of a seeded sample of ``max_cells`` cells (Methods: "The GMM algorithm
    is used to estimate the initial parameters"); ``pi`` starts uniform."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    order = rng.permutation(rows.n_chunks)
    mus, have = [], 0
    for _, m, _cells in rows.iter_chunks([int(c) for c in order if rows.chunk_cells[c]]):
        mus.append(encode_rows(module, m, batch=batch)[0])
        have += m.shape[0]
        if have >= max_cells:
            break
    Z = np.concatenate(mus)
    if len(Z) > max_cells:
        Z = Z[rng.choice(len(Z), max_cells, replace=False)]
    gmm = GaussianMixture(n_components=k, covariance_type="diag", random_state=seed, reg_covar=1e-6).fit(Z)
    module.prior.set_from(np.full(k, 1.0 / k), gmm.means_, gmm.covariances_)
    module.train()


def handoff(folder: Path, model: SCMVP, rows: JointRows, masks: dict[str, np.ndarray], k: int, idf: np.ndarray,
            steps_per_epoch: int, fingerprint: dict | None = None) -> dict:
    """Build the initial module and write it, with the masks, into ``folder``; returns the
    spec :func:`train_rank` reads (plain values: it pickles to spawned ranks)."""
    cfg = train_config(model, steps_per_epoch, fingerprint)
    module = initial_module(model, rows, k, idf)
    np.savez(folder / "masks.npz", **masks)
    torch.save(module.state_dict(), folder / "init.pt")
    return {"store": str(rows.path), "chunk_rows": rows.chunk_rows, "masks": str(folder / "masks.npz"),
            "init": str(folder / "init.pt"), "out": str(folder / "out.pt"), "module": module.config(),
            "train": asdict(cfg)}


def train(spec: dict, *, env: DistEnv, nproc: int = 1) -> dict | None:
    """:func:`train_rank` in every rank (:func:`scatac_dist.train.run_ranks`); rank 0's result."""
    return run_ranks(train_rank, spec, env=env, nproc=nproc)


def train_rank(spec: dict) -> None:
    """One rank's training (:func:`scatac_dist.train.rank_main`): this rank's shard of the
    joint store, the initial module from the hand-off."""
    rank_main(spec, _rows, _module)


def _rows(spec: dict) -> JointRows:
    masks = np.load(spec["masks"])
    return joint_rows(spec["store"], masks["cells"], masks["genes"], masks["peaks"], spec["chunk_rows"],
                      cache_bytes=CACHE_BYTES)


def _module(spec: dict) -> SCMVPModule:
    return module_from(spec["module"], torch.load(spec["init"], map_location="cpu", weights_only=False))


def module_from(config: dict, state: dict) -> SCMVPModule:
    """An :class:`SCMVPModule` holding ``state``'s tensors (built on the meta device, then assigned)."""
    cfg = dict(config)
    with torch.device("meta"):
        module = SCMVPModule(cfg.pop("n_genes"), cfg.pop("n_peaks"), cfg.pop("n_components"), **cfg)
    module.load_state_dict(state, assign=True)
    return module

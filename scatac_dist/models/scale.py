"""SCALE (Xiong et al., Nat Commun 2019): a VAE with a Gaussian-mixture prior, trained with
DistributedDataParallel on cells streamed from the store.

Reads ``X`` (binarised on the fly), ``obs['pass_qc']`` / ``var['pass_qc']`` if present.
Writes:

* ``obs['scale_used']``, ``var['scale_used']``: cells and peaks that passed SCALE's filters;
* ``obsm['X_scale']``: latent means (NaN for cells not used);
* ``obs['scale_gmm']``: the most probable mixture component, ``argmax_c p(z, c)`` at the
  latent mean; ``obs['scale_kmeans']``: k-means (seed 18, as in the paper) on ``X_scale``
  when ``n_clusters`` is given;
* ``varm['scale_decoder']``: decoder weights (peaks x latent); ``varm['scale_feature_peaks']``:
  peaks whose weight lies more than 2.5 SD from that feature's mean;
* ``var['scale_specificity']``, ``var['scale_specific_cluster']``, ``var['scale_specific']``:
  the Jensen-Shannon cluster-specificity score of each peak, its best cluster, and the top
  ``n_specific`` (200) peaks per cluster;
* with ``impute=True``: ``layers['scale_impute']`` (dense float32, written chunk by chunk)
  and ``layers['scale_binary']`` (the paper's binarisation rule, sparse CSR);
* ``uns/scatac_dist/scale``: parameters, timings, training summary.

Choices, with reasons (docs/architecture.md has the longer story):

* **Learning rate: 2e-3, constant** (``lr_schedule="constant"``, the default). The paper
  names Adam with weight decay 5e-4 but no rate. Its code starts at 2e-3 and multiplies by
  0.9 every 10 steps down to a floor of 2e-4 (``lr_schedule="paper"``); the maintained
  package uses a constant 2e-4 (``lr=2e-4``). We kept the paper-era starting rate and
  dropped the decay because the decayed rate learns too slowly to be useful within the
  30,000-step budget. Measured on Leukemia (quick mode, batch 32, seed 0), k-means ARI on
  the latent means: paper schedule 0.15 after 3,000 steps; constant 2e-4 0.02 after 1,500;
  constant 2e-3 0.62 after 3,000. Both the paper-era code and ours warm the KL weight up
  linearly over the first 200 steps and start from Xavier-normal weights.
* **Batch 32 by default, as in the paper; larger batches with the rate and budget scaled.**
  On 2 CPU cores a step on Leukemia (7,410 peaks) is bounded by passes over all 7.6 M
  first-layer weights (the gradient, the clipping norm, Adam), so cells/s grows with the
  batch: Leukemia trains at about 1,200 cells/s at batch 32 and 3,000 at batch 128
  (2026-11-30). For a batch ``B`` above 32, set the rate and budget by the rule we fixed
  before any run (nothing scales them automatically): ``lr`` 2e-3 x sqrt(B / 32), and the
  step floor and budget kept in cells seen (``min_iter`` 10,000 x 32 / B, ``max_iter`` six
  times that; every run stopped at the floor). Batch 128 (lr 4e-3, 2,500 / 15,000 steps)
  gives k-means ARI 0.677, 0.712 and 0.619 over seeds 0-2 on Leukemia, against 0.683, 0.711
  and 0.677 at batch 32; batch 256 (lr 6e-3, 1,250 / 7,500 steps) 0.678, 0.678 and 0.606.
  On BM0828 batch 128 is worse: 0.311, 0.322 and 0.315 against 0.356, 0.441 and 0.408 at
  batch 32 (Leiden 0.45 at both). On an atlas an epoch is thousands of steps and large
  batches cost nothing (``bench_scale.py epoch`` uses 256).
* **The mixture.** Without the authors' floor on ``gamma`` (see
  :mod:`scatac_dist.modules.scale`) the mixture degenerated: one component came to hold nearly
  every cell, the others lost their cells and shrank to mean 0 and variance 0, a few cells
  drifted out, and k-means on the latent means took them as clusters while Leiden did not;
  the longer the training, the worse (BM0828, seed 0: k-means ARI 0.40 after 5,000 steps,
  0.23 after 12,000). Raw variances slowed it; holding ``pi`` uniform or exempting the prior
  from weight decay did not stop it (both tried with log-variances). With the floor every
  component keeps its cells, but the components drift onto each other, so the mixture ends
  close to a single Gaussian (``obs['scale_gmm']`` is then a weak clustering; k-means on
  ``X_scale`` is the one to use, as in the paper).
* **Early stopping not before 10,000 steps** (``min_iter``). The paper stops after 10 epochs
  without improvement, within 30,000 steps; the authors' maintained code always runs all
  30,000. On a small set an epoch is a few steps (12 on Leukemia, 16 on BM0828), and the
  epoch loss's noise then outweighs its slow late improvement: the rule alone fired at 2,076
  steps on Leukemia (seed 0, k-means ARI 0.43) while the latent clusters were still forming.
  The floor was 5,000 steps until the ``gamma`` floor made longer training safe; with it,
  staged runs (seed 0) went from 0.64 at 5,000 steps to 0.66 at 10,000 on Leukemia, and from
  0.42 to 0.44 at 9,000 and 0.50 at 12,000 on BM0828. Over three seeds the longer floor gave
  Leukemia 0.690 (0.666 before) and BM0828 0.402 (0.408 before): no gain on BM0828. On an
  atlas an epoch is thousands of steps and the floor does not matter. ``min_iter=0`` gives
  the paper's rule alone.
* **Preprocessing** follows Methods: peaks with >= ``min_reads`` reads in >= ``min_cells``
  cells, then cells with counts >= kept peaks / 50, then binarisation. Prior QC masks
  (``pass_qc``) are respected.
* **``depth_norm``, off by default.** On BM0828 k-means loses clusters to a few cells that the
  encoder places 7-10 times the median distance from the rest. They are cells with many open
  peaks (3,100-10,000 of the 15,575 kept, against a median of 1,315), and k-means takes them
  as clusters of one cell while Leiden does not (seed 1 at steps 9,000-11,000: k-means ARI
  0.21-0.49 from one 100 steps to the next). ``depth_norm=True`` scales each cell's encoder
  input to the median number of open peaks, as the authors' maintained package normalises
  totals; the likelihood stays Bernoulli on the binary data. Over seeds 0-2 it raised Leiden
  ARI (BM0828 0.477 against 0.439, Leukemia 0.720 against 0.680) and lowered k-means
  (BM0828 0.376 against 0.402, Leukemia 0.662 against 0.690), so it is an option.
* **``depth_offset``, on by default: the one departure from the paper's model.** The decoder's
  logits in training get ``log(open_i / m)``, with ``open_i`` the cell's open (kept) peaks and
  ``m`` their median over the used cells: the library-size term of count VAEs, for a
  Bernoulli likelihood. Depth is then explained by an observed term and not by the latent:
  the cells with the most open peaks are no longer the far-out ones, though a cell or two
  still lies far out and k-means still gives one a cluster of its own
  (``benchmarks/scale_wander.py``). Outputs decoded from the
  latent (imputation, specificity) are at the median depth. Over seeds 0-2 (quick, batch 32,
  2026-12-01) k-means ARI on BM0828 went from 0.402 ± 0.035 to 0.571 ± 0.063 (0.573, 0.493,
  0.647; Leiden 0.514 against 0.439) and on Leukemia from 0.690 ± 0.015 to 0.702 ± 0.001
  (Leiden 0.743 against 0.680). ``depth_offset=False`` is the paper's decoder exactly.
* **K**: ``n_clusters``, or the Tracy-Widom estimate (:func:`scatac_dist.tl.estimate_k`).
* **GMM initialisation**: scikit-learn's diagonal ``GaussianMixture`` on the encoder's
  latent means before training, as the authors do; at atlas scale on a seeded sample of
  ``gmm_cells`` cells.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import torch
import zarr
from scipy.special import expit  # the sigmoid without exp's overflow warnings on very negative logits

from ..modules.scale import FULL_LAYERS, QUICK_LAYERS, SCALEModule
from ..store import Atlas, open_atlas
from ..train import DistEnv, ShardedStream, StoreRows, TrainConfig, cleanup, fit, init_process_group, launch

logger = logging.getLogger("scatac_dist")

__all__ = ["SCALE", "js_specificity", "feature_peaks", "binarize_imputed"]

# decoded chunks a training rank keeps in memory: a small set is read from zarr once, not
# every epoch; an atlas streams past the first 256 MiB (see train.data)
CACHE_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------- kernels


def feature_peaks(W: np.ndarray, n_sd: float = 2.5) -> np.ndarray:
    """Peaks x features booleans: weight more than ``n_sd`` SD from the feature's mean (Methods)."""
    mu, sd = W.mean(0, keepdims=True), W.std(0, keepdims=True)
    return np.abs(W - mu) > n_sd * sd


def js_specificity(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SCALE's cluster-specificity score of each peak, from ``M`` (peaks x clusters, mean accessibility).

    For peak ``i``, ``p`` is its accessibility distribution over clusters and ``q_c`` the
    ideal pattern open only in cluster ``c``; ``score_c = 1 - sqrt(JS(p, q_c))`` with
    ``JS(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2`` in bits (so ``JS`` lies in [0, 1]).
    Returns the best score and its cluster.
    """
    M = np.asarray(M, np.float64)
    tot = M.sum(1, keepdims=True)
    P = np.divide(M, tot, out=np.full_like(M, 1.0 / M.shape[1]), where=tot > 0)

    def H(a):
        return -(np.where(a > 0, a * np.log2(np.where(a > 0, a, 1)), 0)).sum(-1)

    hp = H(P)
    K = M.shape[1]
    scores = np.empty_like(P)
    for c in range(K):
        mid = P / 2
        mid[:, c] += 0.5
        js = H(mid) - hp / 2  # H(q_c) = 0
        scores[:, c] = 1 - np.sqrt(np.clip(js, 0, 1))
    best = scores.argmax(1)
    return scores[np.arange(len(P)), best], best


def binarize_imputed(P: np.ndarray, peak_mean: np.ndarray, cell_mean: np.ndarray) -> np.ndarray:
    """The paper's rule: 1 where the imputed value exceeds both its peak's and its cell's raw mean."""
    return (P > peak_mean[None, :]) & (P > cell_mean[:, None])


# ----------------------------------------------------------------------------- training entry


def _cores() -> int:
    """Cores this process may run on (the affinity mask, which SLURM and containers set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _module_from(config: dict, state: dict) -> SCALEModule:
    """A :class:`SCALEModule` holding ``state``'s tensors themselves: built on the meta device
    and assigned, so neither a random initialisation nor a second copy of the first layer
    (410 MB at 100k peaks) is made only to be overwritten."""
    with torch.device("meta"):
        module = SCALEModule(**{**config, "hidden": tuple(config["hidden"])})
    module.load_state_dict(state, assign=True)
    return module


def _train_rank(spec: dict) -> None:
    """One rank's training: join the process group, stream this rank's shard, train, save."""
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
        module = _module_from(spec["module"], torch.load(spec["init"], map_location="cpu", weights_only=False))
        summary = fit(module, stream, cfg, env)
        out = Path(spec["out"])
        if spec.get("every_rank"):  # for checks that the ranks agree
            out = out.with_name(f"{out.stem}.rank{env.rank}{out.suffix}")
        if env.rank == 0 or spec.get("every_rank"):
            tmp = out.with_suffix(".tmp")
            torch.save({"module": module.cpu().state_dict(), "summary": summary}, tmp)
            tmp.replace(out)
    finally:
        cleanup()


# ----------------------------------------------------------------------------- the model


@dataclass
class SCALE:
    """SCALE on an atlas store (see the module docstring for what it reads and writes).

    Parameters
    ----------
    n_clusters
        Mixture components and k-means clusters; ``None``: the Tracy-Widom estimate.
    quick
        Encoder 1024-128 (the paper's quick mode) instead of 3200-1600-800-400.
    hidden
        Explicit encoder sizes (overrides ``quick``).
    n_latent
        Latent size (10).
    batch_size, max_iter, lr, weight_decay, patience, clip_norm
        Training (32, 30,000, 2e-3, 5e-4, 10 epochs, 10).
    min_iter
        Early stopping cannot fire before this many steps (10,000; see the module docstring).
    lr_schedule
        ``"constant"`` or ``"paper"`` (``lr`` x 0.9 every 10 steps, down to 2e-4).
    nproc
        Training processes on this machine (DDP; gloo on CPU, NCCL on GPU). Under
        ``torchrun``/``srun`` the job's own ranks are used instead.
    device
        ``"cpu"`` or ``"cuda"``.
    checkpoint_dir, checkpoint_every, resume
        Checkpoints every N steps; continue from the newest.
    min_cells, min_reads
        Peak filter (5 cells with >= 2 reads: the paper's setting for Leukemia).
    depth_norm
        Scale each cell's encoder input to the median number of open peaks per cell (see the
        module docstring); the likelihood stays on the binary data.
    depth_offset
        Add ``log(open peaks / median open peaks)`` to each cell's decoder logits in training,
        so the latent need not carry a cell's depth (on by default, see the module docstring);
        ``False``: the paper's decoder exactly.
    impute
        Also write ``layers['scale_impute']`` and ``layers['scale_binary']``.
    """

    n_clusters: int | None = None
    quick: bool = False
    hidden: tuple[int, ...] | None = None
    n_latent: int = 10
    batch_size: int = 32
    max_iter: int = 30_000
    lr: float | None = None
    lr_schedule: str = "constant"
    kl_warmup: int = 200
    weight_decay: float = 5e-4
    patience: int = 10
    min_iter: int = 10_000
    clip_norm: float = 10.0
    seed: int = 0
    nproc: int = 1
    device: str = "cpu"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    min_cells: int = 5
    min_reads: int = 2
    preprocess: bool = True
    depth_norm: bool = False
    depth_offset: bool = True
    gmm_cells: int = 20_000
    impute: bool = False
    n_specific: int = 200
    buffer_chunks: int = 4
    encode_batch: int = 2048
    progress: bool = True
    log_path: str | None = None

    # ------------------------------------------------------------------ preprocessing

    def _masks(self, atlas: Atlas) -> tuple[np.ndarray, np.ndarray]:
        """The cells and peaks SCALE uses (boolean masks over the store)."""
        return self._prepare(atlas)[:2]

    def _prepare(self, atlas: Atlas) -> tuple[np.ndarray, np.ndarray, float | None]:
        """The cells and peaks SCALE uses, and with ``depth_norm`` or ``depth_offset`` the median
        open peaks per used cell (the total each cell's encoder input is scaled to, so a typical
        cell's input is about what it was; the decoder's reference depth). The cell filter's
        counts and the open peaks come from one pass."""
        from .. import ops
        from ..blocks import per_cell, view
        from ..pp.filter import cell_mask, cells_with_at_least, peak_mask

        cells, peaks = cell_mask(atlas), peak_mask(atlas)
        if self.preprocess:
            hits = cells_with_at_least(atlas, cells, self.min_reads)
            peaks = peaks & (hits >= self.min_cells) & (hits > 0)
            if not peaks.any():
                raise ValueError(f"no peak has >= {self.min_reads} reads in >= {self.min_cells} cells; "
                                 "lower min_reads/min_cells (--min-reads/--min-cells)")
        X = view(atlas.X, cells=cells, peaks=np.flatnonzero(peaks))
        passes = {}
        if self.preprocess:
            passes["counts"] = per_cell(X, ops.row_counts)
        if self.depth_norm or self.depth_offset:
            passes["open"] = per_cell(X, ops.row_nnz)
        got = {key: np.zeros(atlas.n_obs) for key in passes}
        for key, vals in zip(passes, dask.compute(*passes.values())):
            got[key][cells] = vals
        if self.preprocess:
            cells = cells & (got["counts"] >= peaks.sum() / 50) & (got["counts"] > 0)
            if not cells.any():
                raise ValueError("no cell passes SCALE's filter (counts >= kept peaks / 50)")
        median_open = float(np.median(got["open"][cells])) if "open" in got else None
        return cells, peaks, median_open

    def _estimate_k(self, atlas: Atlas, cells, peaks) -> int:
        from .. import ops
        from ..blocks import view
        from ..tl.estimate_k import estimate_k

        X = view(atlas.X, cells=cells, peaks=np.flatnonzero(peaks), fn=ops.binarize)
        k = int(estimate_k(X, seed=self.seed))
        return max(k, 2)

    # ------------------------------------------------------------------ fit

    def _hidden(self) -> tuple[int, ...]:
        if self.hidden:
            return tuple(int(h) for h in self.hidden)
        return QUICK_LAYERS if self.quick else FULL_LAYERS

    def _gmm_init(self, module: SCALEModule, rows: StoreRows, k: int) -> None:
        from sklearn.mixture import GaussianMixture

        rng = np.random.default_rng(self.seed)
        order = rng.permutation(rows.n_chunks)
        mus, have = [], 0
        for _, m, _cells in rows.iter_chunks([int(c) for c in order if rows.chunk_cells[c]]):
            mus.append(self._encode_csr(module, m, joint=False)[0])  # the prior is not fitted yet
            have += m.shape[0]
            if have >= self.gmm_cells:
                break
        Z = np.concatenate(mus)
        if len(Z) > self.gmm_cells:
            Z = Z[rng.choice(len(Z), self.gmm_cells, replace=False)]
        gmm = GaussianMixture(n_components=k, covariance_type="diag", random_state=self.seed, reg_covar=1e-6)
        gmm.fit(Z)
        # like the authors, only the means and variances are taken; pi starts uniform
        module.prior.set_from(np.full(k, 1.0 / k), gmm.means_, gmm.covariances_)

    @torch.no_grad()
    def _encode_csr(self, module: SCALEModule, m, joint: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Latent means (and ``log p(z, c)`` at them) of the cells of a CSR block, in sub-batches."""
        from ..train.data import SparseBatch

        module.eval()
        dev = next(module.parameters()).device
        mus, joints = [], []
        for a in range(0, m.shape[0], self.encode_batch):
            sub = m[a:a + self.encode_batch]
            b = SparseBatch.from_csr(sub, np.arange(sub.shape[0])).to_device(dev, dense=False)
            mu, _ = module.encoder(cols=b["cols"], offsets=b["offsets"], values=b["values"])
            mus.append(mu.float().cpu().numpy())
            if joint:
                # the exact log p(z, c): its argmax is the floored gamma's, except for cells far
                # from every component, whose floored gamma is flat
                joints.append(module.prior.log_joint(mu.float()).cpu().numpy())
        return np.concatenate(mus), (np.concatenate(joints) if joint else None)

    def fit(self, store: str | Path | Atlas, *, mod: str | None = None, outputs: bool = True) -> SCALE:
        """Preprocess, train and write every output into ``store``. Returns ``self``.

        ``outputs=False`` stops after training: nothing is written to the store (the model can
        still be saved with :meth:`save`), and the pass that encodes every cell is skipped.

        Fitted attributes: ``module_`` (the trained :class:`SCALEModule`), ``n_clusters_``,
        ``n_cells_`` (cells trained on), ``summary_`` (training summary), ``timings_``.
        """
        atlas = store if isinstance(store, Atlas) else open_atlas(store, mod=mod)
        env = DistEnv.from_environ()
        t = {}
        t0 = time.perf_counter()
        cells, peaks, median_open = self._prepare(atlas)
        t["preprocess"] = time.perf_counter() - t0
        k = self.n_clusters
        if k is None:
            t1 = time.perf_counter()
            k = self._estimate_k(atlas, cells, peaks)
            t["estimate_k"] = time.perf_counter() - t1
            logger.info("SCALE: Tracy-Widom estimate of k = %d", k)
        self.n_clusters_ = int(k)
        # the unit of sharding: the store's chunk, made smaller when there would be too few
        # of them for every rank to get several (small stores, many ranks)
        world = env.world_size if env.distributed else max(1, self.nproc)
        unit = int(min(atlas.chunk_rows, max(64, -(-atlas.n_obs // (8 * world)))))
        rows = StoreRows(atlas.path, mod=atlas.mod, cells=cells, peaks=np.flatnonzero(peaks), chunk_rows=unit)
        self.n_cells_ = rows.n_cells
        logger.info("SCALE: %d cells x %d peaks, k = %d, encoder %s", rows.n_cells, rows.n_peaks, k, self._hidden())
        torch.manual_seed(self.seed)
        module = SCALEModule(rows.n_peaks, int(k), self._hidden(), self.n_latent, kl_warmup=self.kl_warmup,
                             input_scale=median_open if self.depth_norm else None,
                             depth_ref=median_open if self.depth_offset else None)
        t1 = time.perf_counter()
        if not self.resume:
            self._gmm_init(module, rows, int(k))
        t["gmm_init"] = time.perf_counter() - t1
        if self.lr_schedule not in ("paper", "constant"):
            raise ValueError(f"lr_schedule={self.lr_schedule!r}; use 'paper' or 'constant'")
        paper = self.lr_schedule == "paper"
        lr = self.lr if self.lr is not None else 2e-3
        tcfg = TrainConfig(batch_size=self.batch_size, max_iter=self.max_iter, lr=lr,
                           lr_decay=0.9 if paper else 1.0, lr_decay_every=10, lr_min=2e-4 if paper else 0.0,
                           weight_decay=self.weight_decay, patience=self.patience, min_iter=self.min_iter,
                           clip_norm=self.clip_norm,
                           seed=self.seed, device=self.device, checkpoint_dir=self.checkpoint_dir,
                           checkpoint_every=self.checkpoint_every, resume=self.resume, progress=self.progress,
                           buffer_chunks=self.buffer_chunks, log_path=self.log_path)
        t1 = time.perf_counter()
        if self.checkpoint_dir:  # the hand-off folder below lives in it, so it must exist first
            Path(self.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="scale-", dir=self.checkpoint_dir) as tmp:
            tmp = Path(tmp)
            np.savez(tmp / "masks.npz", cells=cells, peaks=peaks)
            torch.save(module.state_dict(), tmp / "init.pt")
            spec = {"store": str(atlas.path), "mod": atlas.mod, "chunk_rows": unit,
                    "masks": str(tmp / "masks.npz"), "init": str(tmp / "init.pt"), "out": str(tmp / "out.pt"),
                    "module": module.config(), "train": asdict(tcfg)}
            # the ranks rebuild the module from init.pt: a copy kept here while a rank trains in
            # this process would add the first layer's size (410 MB at 100k peaks) to the peak
            del module
            if env.distributed:
                _train_rank(spec)  # this process is one rank of torchrun/srun: threads are the launcher's call
            elif self.nproc <= 1:
                # all the cores this process may use: a Dask LocalCluster started earlier leaves
                # OMP_NUM_THREADS=1 in the environment, and a process that starts torch after that
                # trains on one core (train.dist.without_dask_worker_environ has the measurements)
                prev = torch.get_num_threads()
                torch.set_num_threads(_cores())
                try:
                    _train_rank(spec)
                finally:
                    torch.set_num_threads(prev)
            else:
                launch(_train_rank, (spec,), self.nproc)
            if env.rank != 0:
                return self
            res = torch.load(tmp / "out.pt", map_location="cpu", weights_only=False)
        t["train"] = time.perf_counter() - t1
        module = _module_from(spec["module"], res.pop("module"))
        self.module_, self.summary_ = module, res["summary"]
        if not outputs:
            t["total"] = time.perf_counter() - t0
            self.timings_ = t
            return self
        t1 = time.perf_counter()
        self._write_outputs(atlas, module, rows, cells, peaks)
        t["outputs"] = time.perf_counter() - t1
        t["total"] = time.perf_counter() - t0
        self.timings_ = t
        params = {k_: v for k_, v in asdict(self).items() if k_ != "progress"}
        summ = {k_: v for k_, v in self.summary_.items() if k_ != "history"}
        atlas.record("scale", params, t, result={"n_clusters": int(k), "n_cells": rows.n_cells,
                                                 "n_peaks": rows.n_peaks, **summ,
                                                 "epoch_loss": self.summary_["history"][-50:]})
        return self

    # ------------------------------------------------------------------ outputs

    def _write_outputs(self, atlas: Atlas, module: SCALEModule, rows: StoreRows, cells, peaks) -> None:
        n, D = atlas.n_obs, module.n_latent
        mu = np.full((n, D), np.nan, np.float32)
        gmm = np.full(n, -1, np.int64)
        peak_hits = np.zeros(rows.n_peaks)
        cell_open = np.zeros(n)
        for _, m, idx in rows.iter_chunks():
            z, log_joint = self._encode_csr(module, m)
            mu[idx], gmm[idx] = z, log_joint.argmax(1)
            peak_hits += np.asarray(m.sum(0)).ravel()
            cell_open[idx] = np.diff(m.indptr)
        used = cells
        obs = {"scale_used": used, "scale_gmm": pd.Categorical(np.where(used, gmm.astype(str), None))}
        labels = gmm
        if self.n_clusters is not None:
            from sklearn.cluster import KMeans

            km = KMeans(n_clusters=self.n_clusters, n_init=20, random_state=18).fit(mu[used])
            lab = np.full(n, -1, np.int64)
            lab[used] = km.labels_
            obs["scale_kmeans"] = pd.Categorical(np.where(used, lab.astype(str), None))
            labels = lab
        atlas.write_obsm("X_scale", mu)
        atlas.write_obs(obs)
        Wd = module.decoder.weight.detach().cpu().numpy()  # peaks x latent
        bd = module.decoder.bias.detach().cpu().numpy()
        W_all = np.zeros((atlas.n_vars, D), np.float32)
        W_all[peaks] = Wd
        fp = np.zeros((atlas.n_vars, D), bool)
        fp[peaks] = feature_peaks(Wd)
        atlas.write_varm("scale_decoder", W_all)
        atlas.write_varm("scale_feature_peaks", fp)
        # specificity: mean imputed accessibility per cluster, one decoder pass over mu
        n_lab = int(labels.max()) + 1
        sums = np.zeros((rows.n_peaks, n_lab))
        cnt = np.bincount(labels[used], minlength=n_lab).astype(float)
        idx_used = np.flatnonzero(used)
        # blocks of at most 64M probabilities, computed in place and summed per cluster in
        # float32 BLAS: temporaries and a float64 copy of each block made this pass 10x slower
        step = max(64, min(self.encode_batch, 2 ** 26 // max(rows.n_peaks, 1)))
        for a in range(0, len(idx_used), step):
            ii = idx_used[a:a + step]
            P = _sigmoid_logits(mu[ii], Wd, bd)
            onehot = np.zeros((n_lab, len(ii)), np.float32)
            onehot[labels[ii], np.arange(len(ii))] = 1
            sums += (onehot @ P).T
        M = sums / np.maximum(cnt, 1)[None, :]
        score, best = js_specificity(M)
        top = np.zeros(rows.n_peaks, bool)
        for c in range(n_lab):
            ids = np.flatnonzero(best == c)
            top[ids[np.argsort(-score[ids], kind="stable")[:self.n_specific]]] = True
        var = {"scale_used": peaks}
        for key, vals, fill in (("scale_specificity", score, np.nan), ("scale_specific_cluster", best, -1),
                                ("scale_specific", top, False)):
            full = np.full(atlas.n_vars, fill, dtype=np.asarray(vals).dtype if fill is not np.nan else float)
            full[peaks] = vals
            var[key] = full
        atlas.write_var(var)
        if self.impute:
            peak_mean = peak_hits / max(rows.n_cells, 1)
            cell_mean = cell_open / max(rows.n_peaks, 1)
            self._write_imputation(atlas, mu, Wd, bd, used, peaks, peak_mean, cell_mean)

    def _write_imputation(self, atlas, mu, Wd, bd, used, peaks, peak_mean, cell_mean) -> None:
        """``layers['scale_impute']`` (dense, zarr chunk = store chunk) and ``layers['scale_binary']`` (CSR).

        Each Dask task decodes one chunk of cells from their latent means: memory is one
        chunk x peaks block, never the n x p matrix.
        """
        from dask import delayed

        from ..io.layers import publish_layer, write_csr_layer

        n, p = atlas.n_obs, atlas.n_vars
        cr = atlas.chunk_rows
        pk = np.flatnonzero(peaks)
        staging = atlas.path.with_name(f".{atlas.path.name}.impute-{uuid.uuid4().hex[:8]}")
        try:
            g = zarr.open_group(str(staging), mode="w", zarr_format=atlas.zarr_format)
            arr = g.create_array("scale_impute", shape=(n, p), chunks=(cr, min(p, max(1, 2**22 // cr))),
                                 dtype=np.float32, fill_value=0.0)
            arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            tasks = [delayed(_impute_block)(str(staging / "scale_impute"), a, min(a + cr, n), mu[a:a + cr],
                                            used[a:a + cr], Wd, bd, pk, p) for a in range(0, n, cr)]
            dask.compute(*tasks)
            publish_layer(atlas, staging / "scale_impute", "scale_impute")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        rows_used = np.flatnonzero(used)
        blocks = []
        for a in range(0, len(rows_used), cr):
            ii = rows_used[a:a + cr]
            blocks.append(delayed(_binary_block)(mu[ii], Wd, bd, pk, peak_mean, cell_mean[ii]))
        write_csr_layer(atlas, "scale_binary", blocks, rows_used)

    # ------------------------------------------------------------------ save / load

    def save(self, folder: str | Path) -> Path:
        """Write the trained module and its configuration to ``folder/model.pt``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {"module": self.module_.state_dict(), "module_config": self.module_.config(),
                 "params": asdict(self)}
        tmp = folder / ".model.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(folder / "model.pt")
        (folder / "config.json").write_text(json.dumps(state["params"], indent=1, default=str))
        return folder / "model.pt"

    @classmethod
    def load(cls, folder: str | Path) -> SCALE:
        state = torch.load(Path(folder) / "model.pt", map_location="cpu", weights_only=False)
        self = cls(**state["params"])
        self.module_ = _module_from(state["module_config"], state["module"])
        return self


def _sigmoid_logits(z: np.ndarray, Wd: np.ndarray, bd: np.ndarray) -> np.ndarray:
    """``sigmoid(z @ Wd.T + bd)`` (cells x peaks, float32) in one buffer, written in place."""
    P = z.astype(np.float32, copy=False) @ Wd.T
    P += bd
    return expit(P, out=P)


def _impute_block(path, a, b, mu, used, Wd, bd, pk, p):
    arr = zarr.open_array(path, mode="r+")
    out = np.zeros((b - a, p), np.float32)
    if used.any():
        z = mu[used]
        out[np.ix_(np.flatnonzero(used), pk)] = _sigmoid_logits(z, Wd, bd)
    arr[a:b] = out
    return b - a


def _binary_block(mu, Wd, bd, pk, peak_mean, cell_mean):
    P = _sigmoid_logits(mu, Wd, bd)
    B = binarize_imputed(P, peak_mean, cell_mean)
    counts = B.sum(1)
    r, c = np.nonzero(B)
    return counts, pk[c], np.ones(len(c), np.float32)

"""SCALE (Xiong et al., Nat Commun 2019): a VAE with a Gaussian-mixture prior, trained with
DistributedDataParallel on cells streamed from the store.

Reads ``X`` (binarised on the fly), ``obs['pass_qc']`` / ``var['pass_qc']`` if present.
Writes:

* ``obs['scale_used']``, ``var['scale_used']``: cells and peaks that passed SCALE's filters
  (the cells it trained on);
* ``obsm['X_scale']``: latent means of every cell: a cell the filters left out of training
  (``scale_used`` False) is encoded from its reads in the used peaks, like a new cell;
* ``obs['scale_gmm']``: the most probable mixture component, ``argmax_c p(z, c)`` at the
  latent mean, for every cell; ``obs['scale_kmeans']``: k-means (seed 18, as in the paper)
  fitted on the used cells' ``X_scale`` and assigned to every cell, when ``n_clusters`` is given;
* ``varm['scale_decoder']``: decoder weights (peaks x latent); ``varm['scale_feature_peaks']``:
  peaks whose weight lies more than 2.5 SD from that feature's mean;
* ``var['scale_specificity']``, ``var['scale_specific_cluster']``, ``var['scale_specific']``:
  the Jensen-Shannon cluster-specificity score of each peak, its best cluster, and the top
  ``n_specific`` (200) peaks per cluster;
* with ``impute=True``: ``layers['scale_impute']`` (dense float32, written chunk by chunk)
  and ``layers['scale_binary']`` (the paper's binarisation rule, sparse CSR);
* ``uns/scatac_dist/scale``: parameters, timings, training summary.

All of them are published together (one ``atlas.publishing("scale")`` block): a reader sees
the store before SCALE's outputs or with all of them.

The model, its defaults, where this implementation departs from the paper and the
measurements behind each choice: ``docs/methods/scale.md``. The parts: filters in
:mod:`._scale_preprocess`, the training run and the DDP rank entry in
:mod:`.scale_training`, the outputs in :mod:`._scale_outputs`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..store import Atlas, open_atlas
from ..train import DistEnv
from . import _scale_preprocess as preprocess
from . import scale_training as training
from ._saved import load_trained, save_trained
from ._scale_outputs import binarize_imputed, encode_csr, feature_peaks, js_specificity, write_outputs

logger = logging.getLogger("scatac_dist")

__all__ = ["SCALE", "js_specificity", "feature_peaks", "binarize_imputed"]


@dataclass
class SCALE:
    """SCALE on an atlas store: filter, train, and write the outputs listed in the module docstring.

    The defaults are the configuration measured in ``benchmarks/RESULTS.md``; the reasons
    for each are in ``docs/methods/scale.md``.

    Parameters
    ----------
    n_clusters
        Mixture components and k-means clusters; ``None``: the Tracy-Widom estimate.
    quick
        The 1024-128 encoder (the paper's quick mode, the authors' code's encoder, and the
        one every figure in ``benchmarks/RESULTS.md`` used). ``False``: the paper's
        3200-1600-800-400, about 5 times slower on CPU (28 against 136 cells/s at 100k peaks
        and batch 32).
    hidden
        Explicit encoder sizes, e.g. ``(3200, 1600, 800, 400)``; overrides ``quick``.
    n_latent
        Latent dimensions (10).
    batch_size
        Cells per step over all processes (32, the paper's).
    max_iter
        Most optimisation steps (30,000, the paper's).
    lr
        Adam's learning rate; ``None``: 2e-3.
    lr_schedule
        ``"constant"`` or ``"paper"`` (``lr`` x 0.9 every 10 steps, down to 2e-4, as the
        paper-era code).
    kl_warmup
        Steps over which the KL weight rises linearly to 1 (200, as the authors' code).
    weight_decay
        Adam's weight decay (5e-4, the paper's).
    patience
        Early stopping after this many epochs without a lower epoch loss (10, the paper's).
    min_iter
        Early stopping cannot fire before this many steps (10,000); 0: the paper's rule alone.
    clip_norm
        Gradient norm clipping (10).
    seed
        Seeds the weights, the GMM initialisation, the epoch plan and every step's noise.
    nproc
        Training processes on this machine (DDP; gloo on CPU, NCCL on GPU). Under
        ``torchrun``/``srun`` the job's own ranks are used instead.
    device
        ``"cpu"`` or ``"cuda"``.
    checkpoint_dir, checkpoint_every, resume
        Checkpoints every ``checkpoint_every`` steps into ``checkpoint_dir`` (``None``: 1,000
        when checkpoints are kept, :data:`~.scale_training.CHECKPOINT_EVERY`; 0: none). A run
        that does not resume takes the folder over (an earlier run's checkpoints there are
        removed). ``resume=True`` continues the newest checkpoint in ``checkpoint_dir``;
        ``resume="auto"`` continues it when there is one and starts fresh otherwise, so a
        restarted job needs no other command line. Both refuse (``InputError``) a checkpoint
        written for other data or other parameters (its fingerprint,
        :func:`~.scale_training.fingerprint`). With ``"auto"`` and no ``checkpoint_dir`` the
        checkpoints go to the store's restart state (``.<store>.resume/scale/`` beside it),
        removed once the outputs are published. A resumed run judges early stopping by its own
        ``max_iter``/``min_iter``.
    min_cells, min_reads
        Peak filter: peaks with >= ``min_reads`` reads in >= ``min_cells`` cells (5 and 2, the
        paper's setting for Leukemia).
    preprocess
        Apply SCALE's peak and cell filters; ``False``: every cell and peak passing ``pass_qc``.
    depth_norm
        Scale each cell's encoder input to the median number of open peaks per cell; the
        likelihood stays on the binary data (off by default).
    depth_offset
        Add ``log(open peaks / median open peaks)`` to each cell's decoder logits in training,
        so the latent need not carry a cell's depth (on by default); ``False``: the paper's
        decoder exactly.
    gmm_cells
        Cells sampled for the Gaussian-mixture initialisation of the prior (20,000).
    impute
        Also write ``layers['scale_impute']`` and ``layers['scale_binary']``.
    n_specific
        Peaks per cluster marked in ``var['scale_specific']`` (200).
    buffer_chunks
        Row chunks whose cells each rank shuffles together (4).
    encode_batch
        Cells per encoder pass when encoding the outputs (2,048).
    progress
        Show the training progress (rank 0, on stderr): steps, cells/s and an ETA to the
        early-stopping floor and to ``max_iter``.
    log_path
        Append training metrics (JSON lines) to this file.

    Attributes
    ----------
    module_
        The trained :class:`scatac_dist.modules.SCALEModule`.
    n_clusters_
        Mixture components used (``n_clusters`` or the estimate).
    n_cells_
        Cells trained on.
    summary_
        Training summary: epoch losses (``history``), ``steps``, ``epochs``,
        ``stopped_early``, ``cells_per_s``, ``world_size``.
    timings_
        Seconds per stage.
    """

    n_clusters: int | None = None
    quick: bool = True
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
    checkpoint_every: int | None = None
    resume: bool | str = False
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

    def fit(self, store: str | Path | Atlas, *, mod: str | None = None, outputs: bool = True) -> SCALE:
        """Filter, train and write every output into ``store``.

        Parameters
        ----------
        store
            The atlas (path or :class:`scatac_dist.store.Atlas`).
        mod
            Modality of a MuData store.
        outputs
            ``False`` stops after training: nothing is written to the store (the model can
            still be saved with :meth:`save`), and the pass that encodes every cell is skipped.

        Returns
        -------
        SCALE
            ``self``, with the fitted attributes set (on rank 0 of a ``torchrun``/``srun``
            job; the other ranks return before them).

        Raises
        ------
        InputError
            ``resume`` is ``True`` or ``"auto"`` and the checkpoint folder holds another run's
            checkpoint (other data or parameters), or ``True`` and it holds none.
        """
        atlas = store if isinstance(store, Atlas) else open_atlas(store, mod=mod)
        env = DistEnv.from_environ()
        mode = training.resume_mode(self.resume)
        if mode == "yes" and not self.checkpoint_dir:
            raise ValueError("resume=True (--resume) needs checkpoint_dir (--checkpoint-dir); "
                             "resume='auto' (--resume auto) also works without one")
        t, t0 = {}, time.perf_counter()
        cells, peaks, median_open, kind = self._prepare(atlas)
        t["preprocess"] = time.perf_counter() - t0
        if kind["binary_input"]:
            logger.info("SCALE: the input holds 0/1 values only (binarised); peaks need >= %d open cells "
                        "instead of >= %d reads in them", self.min_cells, self.min_reads)
        k = self.n_clusters
        n_used = int(np.count_nonzero(cells))
        if k is not None and not 1 <= k <= n_used:
            raise InputError(atlas.path, f"n_clusters={k} mixture components for the {n_used} cells SCALE uses",
                             f"give --n-clusters between 1 and {n_used}, or leave it out for the estimate")
        if k is None:
            t1 = time.perf_counter()
            k = preprocess.estimate_k(atlas, cells, peaks, seed=self.seed)
            t["estimate_k"] = time.perf_counter() - t1
            logger.info("SCALE: Tracy-Widom estimate of k = %d", k)
        self.n_clusters_ = int(k)
        world = env.world_size if env.distributed else max(1, self.nproc)
        rows = preprocess.training_rows(atlas, cells, peaks, world)
        self.n_cells_ = rows.n_cells
        logger.info("SCALE: %d cells x %d peaks, k = %d, encoder %s", rows.n_cells, rows.n_peaks, k,
                    training.encoder_layers(self.hidden, self.quick))
        fp = training.fingerprint(self, atlas, cells, peaks, int(k), world, rows.chunk_rows, median_open)
        restart = mode == "auto" and not self.checkpoint_dir   # the store's own restart state
        ck_dir = str(training.restart_folder(atlas, fp)) if restart else self.checkpoint_dir
        every = self.checkpoint_every
        if every is None:
            every = training.CHECKPOINT_EVERY if ck_dir else 0
        run = replace(self, checkpoint_dir=ck_dir, checkpoint_every=int(every),
                      resume=training.resolve_resume(ck_dir, fp, mode))
        with training.handoff_folder(ck_dir) as folder:
            t1 = time.perf_counter()
            spec = training.handoff(folder, run, rows, cells, peaks, int(k), median_open, fingerprint=fp)
            t["gmm_init"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            res = training.train(spec, env=env, nproc=self.nproc)
        if res is None:  # another rank of a torchrun/srun job: rank 0 writes the outputs
            return self
        t["train"] = time.perf_counter() - t1
        self.module_ = module = training.module_from(spec["module"], res.pop("module"))
        self.summary_ = res["summary"]
        if not outputs:
            t["total"] = time.perf_counter() - t0
            self.timings_ = t
            return self
        with atlas.publishing("scale"):  # every output and the record appear together
            t1 = time.perf_counter()
            write_outputs(atlas, module, rows, cells, peaks, n_clusters=self.n_clusters, n_specific=self.n_specific,
                          impute=self.impute, encode_batch=self.encode_batch)
            t["outputs"] = time.perf_counter() - t1
            t["total"] = time.perf_counter() - t0
            self.timings_ = t
            params = {k_: v for k_, v in asdict(self).items() if k_ != "progress"}
            summ = {k_: v for k_, v in self.summary_.items() if k_ != "history"}
            atlas.record("scale", params, t, result={"n_clusters": int(k), "n_cells": rows.n_cells,
                                                     "n_peaks": rows.n_peaks, **kind, **summ,
                                                     "epoch_loss": self.summary_["history"][-50:]})
        if restart:
            atlas.clear_resume("scale")  # published: nothing left to resume
        return self

    def _prepare(self, atlas: Atlas) -> tuple[np.ndarray, np.ndarray, float | None, dict]:
        return preprocess.prepare(atlas, preprocess=self.preprocess, min_reads=self.min_reads,
                                  min_cells=self.min_cells, median_open=self.depth_norm or self.depth_offset)

    def masks(self, atlas: Atlas) -> tuple[np.ndarray, np.ndarray]:
        """The cells and peaks SCALE uses on ``atlas`` (boolean masks over the store), after its
        filters; reads the store, writes nothing."""
        return self._prepare(atlas)[:2]

    def encode_csr(self, module, m, joint: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Latent means (and, with ``joint``, ``log p(z, c)``) of the cells of a CSR block ``m``
        over SCALE's peaks, encoded by ``module`` (e.g. ``self.module_``) in batches."""
        return encode_csr(module, m, batch=self.encode_batch, joint=joint)

    # ------------------------------------------------------------------ save / load

    def save(self, folder: str | Path) -> Path:
        """Write the trained module and its configuration to ``folder/model.pt`` (and the
        parameters to ``folder/config.json``); returns the path of ``model.pt``."""
        return save_trained(folder, self.module_, asdict(self))

    @classmethod
    def load(cls, folder: str | Path) -> SCALE:
        """A model saved by :meth:`save`, with its trained ``module_``."""
        state = load_trained(folder)
        self = cls(**state["params"])
        self.module_ = training.module_from(state["module_config"], state["module"])
        return self

"""scMVP (Li et al., Genome Biology 2022): a multi-view VAE with a Gaussian-mixture prior
over one latent space of RNA counts and TF-IDF ATAC of the same cells, trained with
DistributedDataParallel on cells streamed from a joint (MuData) store.

Reads ``mod/rna`` and ``mod/atac`` ``X`` (the ATAC binarised on the fly, then TF-IDF per
batch), ``obs['pass_qc']`` / ``var['pass_qc']`` of each modality if present.
Writes (one publication, ``atlas.publishing("scmvp")``):

* ``obsm['X_scmvp']`` (latent means) in the MuData root, ``mod/rna`` and ``mod/atac``;
* ``obs['scmvp_gmm']`` (most probable mixture component) and, with ``n_clusters``,
  ``obs['scmvp_kmeans']``, in the same three places;
* ``var['scmvp_used']`` in each modality (genes / peaks in at least ``min_cells`` cells);
* with ``impute``: ``mod/rna`` ``layers['scmvp_impute']`` (dense, chunk by chunk) and
  ``mod/atac`` ``layers['scmvp_impute_top']`` (each cell's top ``impute_top`` peaks, CSR);
* ``uns/scatac_dist/scmvp`` in ``mod/atac``: parameters, timings, training summary.

The model and its departures from the paper and from the authors' code:
``docs/methods/scmvp.md``. Parts: the networks in :mod:`scatac_dist.modules.scmvp`, the
training run in :mod:`.scmvp_training`, the outputs in :mod:`._scmvp_outputs`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..pp.filter import cell_mask, cells_with_at_least, peak_mask
from ..store import Atlas, open_atlas
from ..train import DistEnv, runs
from . import scmvp_training as training
from ._saved import load_trained, save_trained
from ._scale_preprocess import estimate_k
from ._scmvp_outputs import write_outputs

logger = logging.getLogger("scatac_dist")

__all__ = ["SCMVP"]

IMPUTE_CHOICES = ("rna", "atac")


@dataclass
class SCMVP:
    """scMVP on a joint RNA + ATAC store: select features, train, and write the outputs
    listed in the module docstring. The defaults are the paper's (Methods) unless said.

    Parameters
    ----------
    n_clusters
        Mixture components ``K`` and k-means clusters; ``None``: the Tracy-Widom estimate
        on the binarised ATAC (as SCALE).
    n_latent, width, heads, shared
        Latent size (10), branch width (128), attention heads (8, of 16 dimensions), shared
        layer (256).
    batch_size
        Cells per step over all processes (128).
    max_epochs
        Epochs (30); every epoch is trained (no early stopping).
    max_steps
        Stop after this many optimisation steps even within an epoch (``None``: no cap; for
        throughput measurements and smoke runs).
    lr
        Adam's learning rate (5e-3).
    weight_decay
        Adam's weight decay (0: the paper gives none).
    clip_norm
        Gradient norm clipping (10; ours, as SCALE's).
    tfidf_scale
        ``s`` in the ATAC input ``log(1 + s * tf * n / df)`` (Signac's default TF-IDF, 1e4).
    rna_weight, atac_weight
        Weights of the two negative log-likelihoods in the loss: 3.0 and 0.1, the authors'
        code's (the paper's equation weighs both 1; ``docs/methods/scmvp.md`` has the
        measurement behind following the code here).
    cycle
        Train with the cycle-consistency KL terms (the paper's); ``False`` drops them.
    min_cells
        Genes and peaks detected in fewer cells are left out (10, the paper's filter).
    seed, nproc, device, checkpoint_dir, checkpoint_every, resume
        As :class:`scatac_dist.models.SCALE`; checkpoints every 500 steps when kept.
    impute
        Imputed layers to write: any of ``"rna"``, ``"atac"``.
    impute_top
        Peaks kept per cell in the ATAC imputation (100).
    gmm_cells
        Cells sampled for the Gaussian-mixture initialisation (20,000).
    buffer_chunks, encode_batch, progress, log_path
        As SCALE.

    Attributes
    ----------
    module_, n_clusters_, n_cells_, summary_, timings_
        The trained :class:`scatac_dist.modules.SCMVPModule`, K, cells trained on, the
        training summary (``history``, ``steps``, ``epochs``, ``cells_per_s``, ``world_size``)
        and seconds per stage.
    """

    n_clusters: int | None = None
    n_latent: int = 10
    width: int = 128
    heads: int = 8
    shared: int = 256
    batch_size: int = 128
    max_epochs: int = 30
    max_steps: int | None = None
    lr: float = 5e-3
    weight_decay: float = 0.0
    clip_norm: float = 10.0
    tfidf_scale: float = 1e4
    rna_weight: float = 3.0
    atac_weight: float = 0.1
    cycle: bool = True
    min_cells: int = 10
    seed: int = 0
    nproc: int = 1
    device: str = "cpu"
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    resume: bool | str = False
    impute: tuple[str, ...] = ()
    impute_top: int = 100
    gmm_cells: int = 20_000
    buffer_chunks: int = 4
    encode_batch: int = 2048
    progress: bool = True
    log_path: str | None = None

    def fit(self, store: str | Path | Atlas, *, outputs: bool = True) -> SCMVP:
        """Select features, train and (unless ``outputs=False``) write every output into ``store``.

        Raises
        ------
        InputError
            The store is not a joint RNA + ATAC MuData store; ``n_clusters`` is out of range;
            ``resume`` finds another run's checkpoint (or, with ``True``, none).
        """
        path = store.path if isinstance(store, Atlas) else store
        impute = self._impute()  # options first: a typo fails before any work
        atlas, rna = self._open(path)
        env = DistEnv.from_environ()
        mode = runs.resume_mode(self.resume)
        if mode == "yes" and not self.checkpoint_dir:
            raise ValueError("resume=True (--resume) needs checkpoint_dir (--checkpoint-dir); "
                             "resume='auto' (--resume auto) also works without one")
        t, t0 = {}, time.perf_counter()
        masks, idf = self._prepare(atlas, rna)
        t["preprocess"] = time.perf_counter() - t0
        cells = masks["cells"]
        n_used = int(cells.sum())
        k = self.n_clusters
        if k is not None and not 1 <= k <= n_used:
            raise InputError(atlas.path, f"n_clusters={k} mixture components for the {n_used} cells scMVP uses",
                             f"give --n-clusters between 1 and {n_used}, or leave it out for the estimate")
        if k is None:
            t1 = time.perf_counter()
            k = estimate_k(atlas, cells, masks["peaks"], seed=self.seed)
            t["estimate_k"] = time.perf_counter() - t1
            logger.info("scMVP: Tracy-Widom estimate of k = %d", k)
        self.n_clusters_ = int(k)
        world = env.world_size if env.distributed else max(1, self.nproc)
        unit = int(min(atlas.chunk_rows, max(64, -(-atlas.n_obs // (8 * world)))))
        rows = training.joint_rows(atlas.path, cells, masks["genes"], masks["peaks"], unit)
        self.n_cells_ = rows.n_cells
        steps = max(1, rows.n_cells // self.batch_size)
        logger.info("scMVP: %d cells x %d genes + %d peaks, k = %d", rows.n_cells, *rows.widths, k)
        fp = training.fingerprint(self, atlas, rna, cells, masks["genes"], masks["peaks"], int(k), world, unit)
        restart = mode == "auto" and not self.checkpoint_dir
        ck_dir = str(runs.restart_folder(atlas, "scmvp", fp)) if restart else self.checkpoint_dir
        every = self.checkpoint_every
        if every is None:
            every = training.CHECKPOINT_EVERY if ck_dir else 0
        run = replace(self, checkpoint_dir=ck_dir, checkpoint_every=int(every),
                      resume=runs.resolve_resume(ck_dir, fp, mode, name="scMVP"))
        with runs.handoff_folder(ck_dir, prefix="scmvp") as folder:
            t1 = time.perf_counter()
            spec = training.handoff(folder, run, rows, masks, int(k), idf, steps, fingerprint=fp)
            t["gmm_init"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            res = training.train(spec, env=env, nproc=self.nproc)
        if res is None:  # another rank of a torchrun/srun job
            return self
        t["train"] = time.perf_counter() - t1
        self.module_ = module = training.module_from(spec["module"], res.pop("module"))
        self.summary_ = res["summary"]
        if outputs:
            with atlas.publishing("scmvp"):
                t1 = time.perf_counter()
                counts = write_outputs(atlas, module, rows, masks, n_clusters=self.n_clusters, impute=impute,
                                       impute_top=self.impute_top, encode_batch=self.encode_batch, seed=self.seed)
                t["outputs"] = time.perf_counter() - t1
                t["total"] = time.perf_counter() - t0
                params = {k_: v for k_, v in asdict(self).items() if k_ != "progress"}
                summ = {k_: v for k_, v in self.summary_.items() if k_ != "history"}
                atlas.record("scmvp", params, t, result={"n_clusters": int(k), **counts, **summ,
                                                         "epoch_loss": self.summary_["history"][-50:]})
            if restart:
                atlas.clear_resume("scmvp")
        t["total"] = time.perf_counter() - t0
        self.timings_ = t
        return self

    # ------------------------------------------------------------------ inputs

    def _impute(self) -> tuple[str, ...]:
        imp = (self.impute,) if isinstance(self.impute, str) else tuple(self.impute or ())
        imp = tuple(x.strip() for part in imp for x in part.split(",") if x.strip())
        bad = [x for x in imp if x not in IMPUTE_CHOICES]
        if bad:
            raise ValueError(f"impute={bad}: choose from {', '.join(IMPUTE_CHOICES)} (e.g. --impute rna,atac)")
        return imp

    @staticmethod
    def _open(path) -> tuple[Atlas, Atlas]:
        atlas = open_atlas(path, mod="atac") if _is_joint(path) else None
        if atlas is None:
            raise InputError(path, "is not a joint RNA + ATAC store (a MuData store with mod/rna and mod/atac)",
                             "ingest a 10x multiome .h5 (`scatac-dist ingest FILE.h5 -o STORE`) or generate one "
                             "with `scatac-dist synth --genes N`")
        return atlas, open_atlas(path, mod="rna")

    def _prepare(self, atlas: Atlas, rna: Atlas) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The cells (QC-passing in both modalities), genes and peaks detected in at least
        ``min_cells`` of them, and the peaks' IDF ``n / df`` over those cells (Signac's)."""
        cells = cell_mask(atlas) & cell_mask(rna)
        if not cells.any():
            raise InputError(atlas.path, "no cell passes QC in both modalities", "check obs['pass_qc'] of each")
        df_peaks = cells_with_at_least(atlas, cells, 1)
        df_genes = cells_with_at_least(rna, cells, 1)
        genes = peak_mask(rna) & (df_genes >= self.min_cells)
        peaks = peak_mask(atlas) & (df_peaks >= self.min_cells)
        for name, m, who in (("gene", genes, rna), ("peak", peaks, atlas)):
            if not m.any():
                raise InputError(who.path, f"no {name} is detected in >= {self.min_cells} cells",
                                 "lower min_cells (--min-cells)")
        idf = (cells.sum() / df_peaks[peaks]).astype(np.float32)
        return {"cells": cells, "genes": genes, "peaks": peaks}, idf

    # ------------------------------------------------------------------ save / load

    def save(self, folder: str | Path) -> Path:
        """Write the trained module and its configuration to ``folder/model.pt`` (and the
        parameters to ``folder/config.json``); returns the path of ``model.pt``."""
        return save_trained(folder, self.module_, asdict(self))

    @classmethod
    def load(cls, folder: str | Path) -> SCMVP:
        """A model saved by :meth:`save`, with its trained ``module_``."""
        state = load_trained(folder)
        self = cls(**state["params"])
        self.module_ = training.module_from(state["module_config"], state["module"])
        return self


def _is_joint(path) -> bool:
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception:  # not a store: open_atlas says why
        open_atlas(path)
        return False
    return root.attrs.get("encoding-type") == "MuData" and {"rna", "atac"} <= set(root["mod"].group_keys())

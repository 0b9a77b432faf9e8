"""scCASE and scCASER (similarity-enhanced NMF, Nat Commun 2024) on an atlas store.

``SCCASE(...).fit(store)`` filters peaks (1% of cells), takes the TF-IDF of the binarised
matrix, estimates K, initialises ``Z`` by Jaccard similarity and ``W``, ``H`` by NMF, then
runs the paper's updates, densely (``mode='exact'``) or with ``Z`` on each cell's nearest
cells (``mode='atlas'``). With a reference it is scCASER.

Reads ``X`` and ``obs['pass_qc']`` (all cells when absent). Writes:

* ``obsm['X_sccase']``: ``H^T`` (NaN for unused cells);
* ``varm['sccase_W']``: ``W`` (0 for unused peaks); ``var['sccase_used']``: the kept peaks;
* ``layers['sccase']``: the enhanced matrix ``X Z`` (cells x peaks, float32 CSR, chunked;
  with ``enhanced_top`` only each cell's largest entries);
* ``obsm['X_sccase_pca']``: the paper's evaluation representation, TF-IDF of the enhanced
  matrix then 50 principal components;
* ``uns/scatac_dist/sccase``: K, losses, timings and every parameter.

All of them are published together (:meth:`Atlas.publishing`). In atlas mode the iterate
(``Z``, ``W``, ``H``) is kept beside the store at every iteration boundary, so a killed run,
started again with the same parameters, goes on from the last finished iteration.

The equations followed, the choices where the paper is silent and the measurements behind
them: ``docs/methods/sccase.md``. The parts: the input pattern in :mod:`.sccase_pattern`, NMF
initialisation in :mod:`._sccase_init`, the support of ``Z`` in :mod:`.sccase_neighbors`,
the atlas-mode updates in :mod:`._sccase_atlas` (exact mode: :mod:`scatac_dist.ops.sccase`),
scCASER's reference in :mod:`._sccase_reference`, the outputs in :mod:`._sccase_outputs`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..lock import store_lock
from ..ops import sccase as ops
from ..ops.sccase_support import bernoulli_mask
from ..store import Atlas, open_atlas
from . import _sccase_atlas as atlas_mode
from . import sccase_pattern as data
from ._sccase_init import nmf_init
from ._sccase_outputs import write_outputs
from ._sccase_reference import reference_projection
from .sccase_neighbors import jaccard_on_support, support_cells
from .sccase_pattern import pattern_rows

logger = logging.getLogger("scatac_dist")

__all__ = ["SCCASE"]

#: the exact mode refuses beyond this (its dense n x n matrices alone would pass ~2 GB)
EXACT_MAX_CELLS = 8000
#: the restart state's folder: ``Atlas.resume_state("sccase", ...)``
RESUME_STAGE = "sccase"
#: parameters that change only the outputs, not the iterations (left out of the fingerprint)
_OUTPUT_ONLY = ("enhanced_top", "n_pcs", "scratch")


@dataclass
class SCCASE:
    """scCASE / scCASER on a store. Defaults are the paper's unless said.

    Parameters
    ----------
    n_factors
        K; ``None`` estimates it on up to 5,000 cells of the binarised, peak-filtered
        matrix with ``k_estimator``, clipped to ``k_range``.
    k_estimator
        ``'aster'`` (the default, as the paper: ASTER's estimate of the number of cell types
        over 3-14, :func:`scatac_dist.tl.aster.estimate_types`, plus one as the authors'
        package adds) or ``'tracy-widom'`` (the random-matrix estimate SCALE uses; this
        package's default before the validation panel, ``docs/methods/sccase.md``).
    h_rows
        Scale each row of ``H`` to sum 1 at the start of every iteration, as the authors' code
        does (not in the paper, off; measured in ``docs/methods/sccase.md``).
    k_range
        Bounds of the estimated K (3-20: the paper finds K < 7 over-smooths and K > 20 adds
        noise).
    mode
        ``'atlas'`` (``Z`` on a sparse support), ``'exact'`` (dense ``n x n``, the paper's
        algorithm as printed, up to 8,000 cells) or ``'auto'`` (the default: atlas, or exact
        when there are no more cells than ``k_neighbors + 1``).
    k_neighbors
        Atlas mode: neighbours per cell in the support of ``Z`` (plus the cell itself; 30).
    support
        Atlas mode: ``'knn'`` (the default; the ``candidates x k_neighbors`` nearest cells by
        cosine in the NMF embedding, re-ranked by Jaccard) or ``'jaccard'`` (the exact top-k
        Jaccard, ``O(n^2)`` work).
    candidates
        ``'knn'`` support: cosine neighbours searched per neighbour kept (3: 90 candidates
        re-ranked by Jaccard for ``k_neighbors=30``).
    lam, gamma1, gamma2
        Eq. (2) weights: 1e6, 1, 1.
    keep_prob
        Bernoulli keep-probability of the mask ``R`` (0.95).
    max_iter, tol
        Stop after ``max_iter`` iterations (30) or when the relative loss change is below
        ``tol`` (1e-6).
    z_simplex
        Project Z's columns onto the simplex (sum 1, as the paper defines Z) rather than
        onto ``>= 0`` (the printed update, the default).
    min_cell_fraction
        Keep peaks accessible in at least this share of the used cells (0.01).
    norm
        ``'l2'`` (the default, as the authors' code): each cell's TF-IDF vector scaled to unit
        length; ``'l1'``: Eq. (1) as printed.
    reference
        scCASER: a bulk matrix (CSV/TSV, peaks named as the store's ``var_names`` x samples),
        or a labelled single-cell AnnData (path or object) with ``reference_labels``.
    reference_labels
        ``obs`` column of a single-cell reference: its cells are summed per label (pseudo-bulk).
    self_reference
        scCASER with a pseudo-bulk of the target's own Leiden clusters.
    alpha
        Weight of the reference term ``alpha |P - W1|^2`` (1).
    n_ref_factors
        k1, the reference's NMF factors; default ``round(K / 3)`` (at least 1, at most the
        reference's samples), as the authors' code sets it.
    enhanced_top
        Keep only each cell's largest entries of the enhanced matrix (``None``: all). Losses,
        ``H`` and ``W`` do not depend on it; ``X_sccase_pca`` is computed from the stored layer.
    n_pcs
        Principal components in ``obsm['X_sccase_pca']`` (50).
    nmf_cells
        Cells the initial NMF is fitted on; above, a seeded sample, the rest by NNLS.
    nmf_max_iter
        Iterations of scikit-learn's NMF (500).
    seed
        Seeds NMF, the mask ``R``, the support search and the PCA.
    scratch
        Folder for the memory-mapped pattern (default: beside the store); on a multi-node
        cluster, a shared filesystem.

    Attributes
    ----------
    W_, H_
        The fitted factors (kept peaks x K, K x used cells).
    Z_
        ``(nbr, Zv)``: each used cell's support and ``Z``'s values on it.
    result_
        Mode, sizes, K, losses, iterations, convergence, stored entries, reference summary.
    timings_
        Seconds per stage.
    """

    n_factors: int | None = None
    k_estimator: str = "aster"
    h_rows: bool = False
    k_range: tuple = (3, 20)
    mode: str = "auto"
    k_neighbors: int = 30
    support: str = "knn"
    candidates: int = 3
    lam: float = 1e6
    gamma1: float = 1.0
    gamma2: float = 1.0
    keep_prob: float = 0.95
    max_iter: int = 30
    tol: float = 1e-6
    z_simplex: bool = False
    min_cell_fraction: float = 0.01
    norm: str = "l2"
    reference: Any = None
    reference_labels: str | None = None
    self_reference: bool = False
    alpha: float = 1.0
    n_ref_factors: int | None = None
    enhanced_top: int | None = None
    n_pcs: int = 50
    nmf_cells: int = 20_000
    nmf_max_iter: int = 500
    seed: int = 0
    scratch: str | None = None

    def fit(self, store: str | Path | Atlas) -> SCCASE:
        """Run on ``store`` and write the outputs listed in the module docstring.

        The run holds the store's write lock throughout. In atlas mode the iterate is kept
        at every iteration boundary beside the store (:meth:`Atlas.resume_state`), so a run
        that was killed, started again with the same parameters on the same data, goes on
        from the last finished iteration and ends with the same results as an uninterrupted
        run; the state is removed once the outputs are published.

        Returns
        -------
        SCCASE
            ``self``, with the fitted attributes set.
        """
        atlas = store if isinstance(store, Atlas) else open_atlas(store)
        self._check()
        with store_lock(atlas.path):
            self._remove_stale_patterns(atlas)
            return self._fit(atlas)

    def _fit(self, atlas: Atlas) -> SCCASE:
        t = {}
        t0 = time.perf_counter()
        pat = data.build_pattern(atlas, min_cell_fraction=self.min_cell_fraction, norm=self.norm,
                                 scratch=self.scratch)
        try:
            t["pattern"] = time.perf_counter() - t0
            n = pat.n
            mode = self.mode if self.mode != "auto" else ("exact" if n <= self.k_neighbors + 1 else "atlas")
            if mode == "exact" and n > EXACT_MAX_CELLS:
                raise ValueError(f"mode='exact' holds dense {n} x {n} matrices; use mode='atlas' above "
                                 f"{EXACT_MAX_CELLS} cells")
            if mode == "atlas" and not 1 <= self.k_neighbors < n:
                raise ValueError(f"k_neighbors={self.k_neighbors} must be between 1 and the number of cells "
                                 f"less one ({n - 1})")
            folder = resumed = None
            if mode == "atlas":
                fp = self._fingerprint(pat)
                if fp is not None:
                    folder = atlas.resume_state(RESUME_STAGE, fp)
                    resumed = self._load_resume(folder)
            t1 = time.perf_counter()
            if resumed is not None:
                K, P, ref_info, nbr, Zv, W, H, start = resumed
                k1 = 0 if P is None else P.shape[1]
                logger.info("sccase: resuming from iteration %d (restart state in %s)", int(start["it"]), folder)
            else:
                K = int(self.n_factors) if self.n_factors else self._estimate_k(pat)
                t["estimate_k"] = time.perf_counter() - t1
                t1 = time.perf_counter()
                P, ref_info = reference_projection(pat, K, atlas=atlas, reference=self.reference,
                                                   labels_key=self.reference_labels,
                                                   self_reference=self.self_reference,
                                                   n_ref_factors=self.n_ref_factors, seed=self.seed,
                                                   nmf_cells=self.nmf_cells, max_iter=self.nmf_max_iter)
                k1 = 0 if P is None else P.shape[1]
                W, H = nmf_init(pat, K + k1, seed=self.seed, nmf_cells=self.nmf_cells, max_iter=self.nmf_max_iter)
                if P is not None:
                    W[:, :k1] = P
                start = None
            t["init_nmf"] = time.perf_counter() - t1
            data.release_pages()
            t1 = time.perf_counter()
            if mode == "exact":
                st, nbr, Zv = self._run_exact(pat, W, H, P)
            else:
                if resumed is None:
                    nbr, Zv = self._atlas_start(pat, H)
                    if folder is not None:     # iteration 0: what the start cost is not redone
                        atlas_mode.save_state(folder / "start.npz", K=K, P=np.zeros((pat.m, 0)) if P is None else P,
                                              nbr=nbr.astype(np.int32), ref_info=ref_info or {})
                        start = dict(it=0, losses=[], timings=[], converged=False)
                        atlas_mode.save_state(folder / "iterate.npz", Z=Zv, W=W, H=H, **start)
                st = self._run_atlas(pat, nbr, Zv, W, H, P, start=start, folder=folder)
                Zv = st.Z
            t["iterations"] = time.perf_counter() - t1
            data.release_pages()
            t1 = time.perf_counter()
            self.result_ = dict(mode=mode, n_cells=n, n_peaks=pat.m, n_factors=K, n_ref_factors=k1,
                                k_estimates=getattr(self, "k_estimates_", None) if not self.n_factors else None,
                                losses=[float(x) for x in st.losses], n_iter=len(st.losses) - 1,
                                converged=bool(st.converged),
                                seconds_per_iteration=getattr(st, "timings", None), reference=ref_info,
                                resumed_from_iteration=None if resumed is None else int(resumed[-1]["it"]))
            params = asdict(self)
            params["reference"] = None if self.reference is None else str(self.reference) \
                if isinstance(self.reference, (str, Path)) else "<in memory>"
            with atlas.publishing("sccase"):   # every output and the record visible together
                n_stored = write_outputs(atlas, pat, st.W, st.H, nbr, Zv, enhanced_top=self.enhanced_top,
                                         n_pcs=self.n_pcs, seed=self.seed, norm=self.norm)
                self.result_["enhanced_nnz"] = int(n_stored)
                t["write"] = time.perf_counter() - t1
                t["total"] = time.perf_counter() - t0
                atlas.record("sccase", params, t, result=self.result_)
            if folder is not None:
                atlas.clear_resume(RESUME_STAGE)
            self.W_, self.H_, self.Z_ = st.W, st.H, (nbr, Zv)
            self.timings_ = t
            logger.info("sccase: %s mode, K=%d, %d iterations, loss %.6g -> %.6g, %.1f s", mode, K,
                        self.result_["n_iter"], st.losses[0], st.losses[-1], t["total"])
        finally:
            pat.remove()
        return self

    def support_cells(self, pat: data.Pattern, H: np.ndarray) -> np.ndarray:
        """``nbr`` (n x (k+1)): each cell, then its ``k_neighbors`` most Jaccard-similar cells
        (:func:`scatac_dist.models.sccase_neighbors.support_cells`)."""
        return support_cells(pat, H, self.k_neighbors, how=self.support, candidates=self.candidates, seed=self.seed)

    # -- steps ------------------------------------------------------------------------------

    def _check(self) -> None:
        if self.mode not in ("auto", "exact", "atlas"):
            raise ValueError(f"unknown mode {self.mode!r}; use 'exact', 'atlas' or 'auto'")
        if self.support not in ("jaccard", "knn"):
            raise ValueError(f"unknown support {self.support!r}; use 'knn' or 'jaccard'")
        if not 0 < self.keep_prob <= 1:
            raise ValueError(f"keep_prob={self.keep_prob} must be in (0, 1]")
        if self.k_estimator not in ("aster", "tracy-widom"):
            raise ValueError(f"unknown k_estimator {self.k_estimator!r}; use 'aster' or 'tracy-widom'")
        if self.n_factors is not None and int(self.n_factors) < 1:
            raise ValueError(f"n_factors={self.n_factors} must be at least 1")
        n_ref = (self.reference is not None) + bool(self.self_reference)
        if n_ref > 1:
            raise ValueError("give either a reference (bulk or labelled) or self_reference=True, not both")
        if self.reference_labels and self.reference is None:
            raise ValueError("reference_labels names the label column of a labelled reference dataset; "
                             "pass that dataset as reference=PATH too")

    def _estimate_k(self, pat: data.Pattern) -> int:
        """``k_estimator`` on up to 5,000 cells of the binarised matrix, clipped to ``k_range``;
        the estimators' answers go to ``self.k_estimates_``."""
        from ..tl.aster import estimate_types
        from ..tl.estimate_k import estimate_k

        rng = np.random.default_rng(self.seed)
        rows = np.sort(rng.choice(pat.n, min(pat.n, 5000), replace=False))
        B = pattern_rows(pat, rows, binary=True)
        est = None
        if self.k_estimator == "aster":
            est = estimate_types(B, seed=self.seed)
            if est["k"] is None:
                logger.warning("sccase: no ASTER estimator gave a number of types; using Tracy-Widom")
        if est is not None and est["k"] is not None:
            raw, how = int(est["k"]) + 1, "ASTER estimate + 1"
        else:
            raw, how = int(estimate_k(B, seed=self.seed, max_cells=None)), "Tracy-Widom estimate"
        self.k_estimates_ = {"method": how, **(est or {}), "raw": raw}
        lo, hi = self.k_range
        k = int(min(max(raw, lo), hi))
        if k != raw:
            logger.warning("sccase: %s K=%d clipped to %d (k_range=%s)", how, raw, k, self.k_range)
        logger.info("sccase: K = %d (%s)", k, how)
        return k

    def _run_exact(self, pat, W, H, P):
        """Dense ``Z0`` (Jaccard, self included, columns summing to 1) and ``R``, then
        :func:`scatac_dist.ops.sccase.iterate`."""
        n = pat.n
        X = sp.csr_matrix(pat.csr().T)                      # peaks x cells, Eq. (1)
        B = pat.binary()
        inter = np.asarray((B @ B.T).todense())
        sizes = np.asarray(B.sum(1)).ravel()
        Z0 = inter / np.maximum(sizes[:, None] + sizes[None, :] - inter, 1)
        np.fill_diagonal(Z0, 1.0)                           # a cell is its own most similar
        Z0 /= Z0.sum(0, keepdims=True)
        ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        R = bernoulli_mask(ii, jj, n, self.keep_prob, self.seed)
        st = ops.iterate(X, Z0, R, W, H, lam=self.lam, g1=self.gamma1, g2=self.gamma2, max_iter=self.max_iter,
                         tol=self.tol, P=P, alpha=self.alpha, z_simplex=self.z_simplex, h_rows=self.h_rows)
        nbr = np.broadcast_to(np.arange(n), (n, n))
        return st, nbr, st.Z.T                              # Zv[j, i] = Z[i, j]

    def _atlas_start(self, pat, H):
        """The support and ``Z0`` (Jaccard on each cell's support, each column summing to 1)."""
        nbr = self.support_cells(pat, H)
        Zv = jaccard_on_support(pat, nbr)
        Zv /= Zv.sum(1, keepdims=True)
        return nbr, Zv

    def _run_atlas(self, pat, nbr, Zv, W, H, P, *, start=None, folder=None):
        """``R`` on the support, then :func:`scatac_dist.models._sccase_atlas.iterate_support`
        (from ``start`` when resuming), saving the iterate in ``folder`` after each iteration."""
        cols = np.broadcast_to(np.arange(pat.n)[:, None], nbr.shape)
        R = bernoulli_mask(nbr, cols, pat.n, self.keep_prob, self.seed)
        prob = atlas_mode.SupportProblem(pat, nbr, R, lam=self.lam, g1=self.gamma1, g2=self.gamma2, P=P,
                                         alpha=self.alpha)

        def keep(it, st):
            atlas_mode.save_state(folder / "iterate.npz", Z=st.Z, W=st.W, H=st.H, it=it, losses=st.losses,
                                  timings=st.timings, converged=st.converged)

        return atlas_mode.iterate_support(prob, Zv, W, H, max_iter=self.max_iter, tol=self.tol,
                                          z_simplex=self.z_simplex, h_rows=self.h_rows, start=start,
                                          callback=keep if folder is not None else None)

    # -- restart state ------------------------------------------------------------------------

    def _fingerprint(self, pat: data.Pattern) -> dict | None:
        """What the iterations depend on: every parameter but those of the outputs only, the
        cells and peaks used, and the reference file's size and time. ``None`` (no restart
        state) for an in-memory reference, which cannot be identified."""
        import hashlib

        params = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _OUTPUT_ONLY}
        ref = self.reference
        if ref is not None:
            if not isinstance(ref, (str, Path)):
                logger.info("sccase: an in-memory reference cannot be identified; no restart state is kept")
                return None
            p = Path(ref)
            st = p.stat() if p.exists() else None
            params["reference"] = {"path": str(p.absolute()), "size": st and st.st_size,
                                   "mtime_ns": st and st.st_mtime_ns}
        digest = {k: hashlib.sha256(np.ascontiguousarray(v, np.int64).tobytes()).hexdigest()
                  for k, v in (("cells", pat.cells), ("peaks", pat.peaks))}
        return {"format": 1, "params": params, "n": pat.n, "m": pat.m, **digest}

    def _load_resume(self, folder: Path):
        """``(K, P, ref_info, nbr, Z, W, H, start)`` from ``folder``, or ``None``."""
        head = atlas_mode.load_state(folder / "start.npz", json_keys=("ref_info",))
        it = atlas_mode.load_state(folder / "iterate.npz") if head is not None else None
        if it is None:
            return None
        P = head["P"] if head["P"].shape[1] else None
        start = dict(it=int(it["it"]), losses=it["losses"], timings=it["timings"], converged=bool(it["converged"]))
        return (int(head["K"]), P, head["ref_info"] or None, head["nbr"].astype(np.int64), it["Z"], it["W"], it["H"],
                start)

    @staticmethod
    def _remove_stale_patterns(atlas: Atlas) -> None:
        """Remove pattern folders that killed runs left beside the store (we hold its lock,
        so no live run of this store is using them)."""
        import shutil

        for p in atlas.path.parent.glob(f".{atlas.path.name}.sccase-*"):
            shutil.rmtree(p, ignore_errors=True)
            logger.info("sccase: removed %s, left by an interrupted run", p.name)

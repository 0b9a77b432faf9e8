"""scCASE and scCASER (similarity-enhanced NMF) on an atlas store.

``SCCASE(...).fit(store)`` runs the method of the scCASE paper (``../shared/papers/002_*``):

1. **Input.** Cells in ``obs['pass_qc']`` (all when absent); peaks accessible in at least 1%
   of them; Eq. (1) TF-IDF of the binarised matrix (see below), each cell scaled to unit L2
   norm by default (``norm='l2'``, as the authors' code; ``norm='l1'`` is Eq. 1 as printed,
   see :func:`scatac_dist.models._sccase_data.build_pattern` for why it is not the default).
2. **K.** ``n_factors``, or the Tracy-Widom estimate :func:`scatac_dist.tl.estimate_k` on up
   to 5,000 cells of the binarised matrix. (The paper uses ASTER, an ensemble of
   clustering-index estimates; the authors' code adds 1 to it. We use the random-matrix
   estimate already in the package, with no offset.)
3. **Initialisation.** ``Z``: Jaccard similarity of the binarised cells, self included,
   each column divided by its sum. ``W``, ``H``: scikit-learn NMF of the TF-IDF matrix
   (``init='nndsvda'``, seeded). Above ``nmf_cells`` cells NMF is fitted on a seeded sample
   and ``H`` of every cell is its non-negative least-squares fit to that ``W``, block by block.
   ``R``: Bernoulli(``keep_prob``) entries drawn by a counter-based hash of
   ``(seed, i, j)`` (:func:`scatac_dist.ops.sccase_support.bernoulli_mask`), so both modes
   draw the same ``R`` on any support.
4. **Updates** (Eq. 2 and 5-11): :func:`scatac_dist.ops.sccase.iterate` (``mode='exact'``,
   dense ``n x n``) or :func:`scatac_dist.models._sccase_atlas.iterate_support`
   (``mode='atlas'``, ``Z`` on each cell's ``k_neighbors`` nearest cells, see ``support``).
5. **Outputs** (store slots): ``obsm['X_sccase']`` (``H^T``; NaN for unused cells),
   ``varm['sccase_W']`` (``W``; 0 for unused peaks), ``var['sccase_used']``,
   ``layers['sccase']`` (the enhanced matrix ``X Z``, cells x peaks, float32 CSR, chunked;
   with ``enhanced_top`` only each cell's largest entries), ``obsm['X_sccase_pca']`` (the
   paper's evaluation representation: TF-IDF of the enhanced matrix, then 50 principal
   components) and ``uns/scatac_dist/sccase`` (K, losses, timings, every parameter).

**scCASER** (Eq. 3, 13-14): a reference ``P`` (peaks x k1) from NMF of a reference matrix
over the same peaks, built in one of the paper's three ways: ``reference=<bulk matrix>``;
``reference=<labelled single-cell data>, reference_labels=<obs key>`` (pseudo-bulk: counts
summed per label); ``self_reference=True`` (pseudo-bulk per Leiden cluster of the target at
resolution 1, on a 15-NN graph of the NMF embedding). Each reference sample is scaled to
sum 1 over the kept peaks (the paper scales bulk counts by total reads) and weighted by the
target's IDF, so it is on the scale of ``X``. ``W`` gets ``k1`` extra leading columns (W1),
initialised to ``P``, and the loss the term ``alpha |P - W1|^2``.

**Eq. (1) on binarised data.** On raw counts, ``log(n / sum_t x_it)`` is negative for peaks
whose read total exceeds the number of cells, and NMF cannot take negative entries; on 0/1
data the sum is the number of cells with the peak, as in the authors' code (IDF from
document frequency), and every entry is ``>= 0``.

**Enhanced-matrix TF-IDF** (for ``X_sccase_pca``): ``tf = y / row sum``,
``idf = log(n / column sum of tf)``, which is Eq. (1) made independent of the scale of
``y``, then (``norm='l2'``) each cell scaled to unit length, as ``X`` is. Without that last
step the components follow depth: on a 360-cell synthetic set k-means ARI on ``X Z0`` was
0.42 against 0.98 with it. PCA is centred (scikit-learn, randomized, seeded) when the dense matrix fits in
``pca_dense_max`` entries; above it, the uncentred truncated SVD of the sparse TF-IDF (as
LSI does), because centring would densify an atlas.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import scipy.sparse as sp
from dask import delayed

from ..io.layers import read_csr_layer, write_csr_layer
from ..ops import sccase as ops
from ..ops.sccase_support import bernoulli_mask, support_enhance, support_intersections
from ..store import Atlas, open_atlas
from . import _sccase_atlas as atlas_mode
from . import _sccase_data as data

logger = logging.getLogger("scatac_dist")

__all__ = ["SCCASE"]

#: the exact mode refuses beyond this (its dense n x n matrices alone would pass ~2 GB)
EXACT_MAX_CELLS = 8000


@dataclass
class SCCASE:
    """scCASE / scCASER on a store. Parameters (defaults from the paper unless said):

    n_factors
        K; ``None`` estimates it (Tracy-Widom, see the module docstring), clipped to
        ``k_range`` (3-20): the paper finds K < 7 over-smooths and K > 20 adds noise. On the
        sparse SNARE ATAC cells (2,387 peaks pass the 1% rule) the unclipped estimate is 113.
        (The authors' ASTER call searches 3-14; clipping to 14 instead was measured on
        leukemia, whose estimate is 20: k-means/Leiden ARI 0.572/0.653 against 0.658/0.664.)
    mode
        ``'atlas'`` (``Z`` on a sparse support), ``'exact'`` (dense ``n x n``, the paper's
        algorithm as printed, for small n) or ``'auto'`` (the default: atlas, or exact when
        there are no more cells than ``k_neighbors + 1``). Atlas is the default because it
        scores higher as well as scaling: bm0828, Leiden/k-means ARI on ``X_sccase_pca``
        0.567/0.564 (k = 30) against 0.399/0.514 for exact (benchmarks/RESULTS.md).
    k_neighbors
        Atlas mode: neighbours per cell in the support of ``Z`` (plus the cell itself).
    support
        Atlas mode: ``'knn'`` (default; the ``candidates x k_neighbors`` nearest cells by
        cosine in the NMF embedding ``H^T``, re-ranked by Jaccard: ``O(n k)`` work) or
        ``'jaccard'`` (the exact top-k Jaccard, blockwise, ``O(n^2)`` work). The exact top-k
        lists are full of hub cells: on a 360-cell synthetic set (3 types) they were 89% pure
        against 98% for ``'knn'``, and k-means ARI on ``X Z0`` was 0.23 against 0.98.
    lam, gamma1, gamma2
        Eq. (2) weights: 1e6, 1, 1.
    keep_prob
        Bernoulli keep-probability of ``R`` (0.95).
    max_iter, tol
        Stop after ``max_iter`` iterations or when the relative loss change is below ``tol``.
    z_simplex
        Project Z's columns onto the simplex (sum 1, as the paper defines Z) rather than
        onto ``>= 0`` (the printed update, the default); see :mod:`scatac_dist.ops.sccase`.
    reference, reference_labels, self_reference, alpha, n_ref_factors
        scCASER (module docstring); ``n_ref_factors`` (k1) defaults to ``round(K / 3)``
        (at least 1, at most the reference's samples), as the authors' code sets it.
    enhanced_top
        Keep only each cell's largest entries of the enhanced matrix (None: all). The full
        ``X Z`` row of a cell is the union of its ``k + 1`` support cells' peaks, up to
        ``k + 1`` times as dense as the input (at 1M cells x ~1,000 peaks each and k = 30:
        ~3e10 values, 240 GB). Keeping the top N bounds the layer at N values per cell and
        keeps the peaks the neighbourhood agrees on; what is lost is the tail of weakly
        supported peaks, which also feeds ``X_sccase_pca`` (computed from the stored layer).
        Losses, ``H`` and ``W`` do not depend on it.
    """

    n_factors: int | None = None
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
    pca_dense_max: int = 200_000_000
    nmf_cells: int = 20_000
    nmf_max_iter: int = 500
    seed: int = 0
    scratch: str | None = None

    # -- public ---------------------------------------------------------------------------

    def fit(self, store: str | Path | Atlas) -> SCCASE:
        """Run on ``store`` and write the outputs listed in the module docstring."""
        atlas = store if isinstance(store, Atlas) else open_atlas(store)
        self._check()
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
            t1 = time.perf_counter()
            K = int(self.n_factors) if self.n_factors else self._estimate_k(pat)
            t["estimate_k"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            P, ref_info = self._reference(atlas, pat, K)
            k1 = 0 if P is None else P.shape[1]
            W, H = nmf_init(pat, K + k1, seed=self.seed, nmf_cells=self.nmf_cells, max_iter=self.nmf_max_iter)
            if P is not None:
                W[:, :k1] = P
            t["init_nmf"] = time.perf_counter() - t1
            data.release_pages()
            t1 = time.perf_counter()
            if mode == "exact":
                st, nbr, Zv = self._run_exact(pat, W, H, P)
            else:
                st, nbr, Zv = self._run_atlas(pat, W, H, P)
            t["iterations"] = time.perf_counter() - t1
            data.release_pages()
            t1 = time.perf_counter()
            n_stored = self._write(atlas, pat, st, nbr, Zv)
            t["write"] = time.perf_counter() - t1
            t["total"] = time.perf_counter() - t0
            self.result_ = dict(mode=mode, n_cells=n, n_peaks=pat.m, n_factors=K, n_ref_factors=k1,
                                losses=[float(x) for x in st.losses], n_iter=len(st.losses) - 1,
                                converged=bool(st.converged), enhanced_nnz=int(n_stored),
                                seconds_per_iteration=getattr(st, "timings", None), reference=ref_info)
            params = {k: (str(v) if k == "reference" and v is not None and not isinstance(v, (str, Path)) else v)
                      for k, v in asdict(self).items()}
            params["reference"] = None if self.reference is None else str(self.reference) \
                if isinstance(self.reference, (str, Path)) else "<in memory>"
            atlas.record("sccase", params, t, result=self.result_)
            self.W_, self.H_, self.Z_ = st.W, st.H, (nbr, Zv)
            self.timings_ = t
            logger.info("sccase: %s mode, K=%d, %d iterations, loss %.6g -> %.6g, %.1f s", mode, K,
                        self.result_["n_iter"], st.losses[0], st.losses[-1], t["total"])
        finally:
            pat.remove()
        return self

    # -- steps ------------------------------------------------------------------------------

    def _check(self) -> None:
        if self.mode not in ("auto", "exact", "atlas"):
            raise ValueError(f"unknown mode {self.mode!r}; use 'exact', 'atlas' or 'auto'")
        if self.support not in ("jaccard", "knn"):
            raise ValueError(f"unknown support {self.support!r}; use 'knn' or 'jaccard'")
        if not 0 < self.keep_prob <= 1:
            raise ValueError(f"keep_prob={self.keep_prob} must be in (0, 1]")
        if self.n_factors is not None and int(self.n_factors) < 1:
            raise ValueError(f"n_factors={self.n_factors} must be at least 1")
        n_ref = (self.reference is not None) + bool(self.self_reference)
        if n_ref > 1:
            raise ValueError("give either a reference (bulk or labelled) or self_reference=True, not both")
        if self.reference_labels and self.reference is None:
            raise ValueError("reference_labels names the label column of a labelled reference dataset; "
                             "pass that dataset as reference=PATH too")

    def _estimate_k(self, pat: data.Pattern) -> int:
        from ..tl.estimate_k import estimate_k

        rng = np.random.default_rng(self.seed)
        rows = np.sort(rng.choice(pat.n, min(pat.n, 5000), replace=False))
        raw = int(estimate_k(pattern_rows(pat, rows, binary=True), seed=self.seed, max_cells=None))
        lo, hi = self.k_range
        k = int(min(max(raw, lo), hi))
        if k != raw:
            logger.warning("sccase: Tracy-Widom estimate K=%d clipped to %d (k_range=%s)", raw, k, self.k_range)
        logger.info("sccase: K = %d (Tracy-Widom estimate)", k)
        return k

    def _run_exact(self, pat, W, H, P):
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
                         tol=self.tol, P=P, alpha=self.alpha, z_simplex=self.z_simplex)
        nbr = np.broadcast_to(np.arange(n), (n, n))
        return st, nbr, st.Z.T                              # Zv[j, i] = Z[i, j]

    def _run_atlas(self, pat, W, H, P):
        nbr = self.support_cells(pat, H)
        Zv = jaccard_on_support(pat, nbr)
        Zv /= Zv.sum(1, keepdims=True)
        cols = np.broadcast_to(np.arange(pat.n)[:, None], nbr.shape)
        R = bernoulli_mask(nbr, cols, pat.n, self.keep_prob, self.seed)
        prob = atlas_mode.SupportProblem(pat, nbr, R, lam=self.lam, g1=self.gamma1, g2=self.gamma2, P=P,
                                         alpha=self.alpha)
        st = atlas_mode.iterate_support(prob, Zv, W, H, max_iter=self.max_iter, tol=self.tol,
                                        z_simplex=self.z_simplex)
        return st, nbr, st.Z

    def support_cells(self, pat: data.Pattern, H: np.ndarray) -> np.ndarray:
        """``nbr`` (n x (k+1)): each cell, then its ``k_neighbors`` most Jaccard-similar cells."""
        k, n = self.k_neighbors, pat.n
        how = self.support
        if k == n - 1:
            others = np.array([np.r_[np.arange(j), np.arange(j + 1, n)] for j in range(n)])
            return np.hstack([np.arange(n)[:, None], others]).astype(np.int64)
        if how == "jaccard":
            idx = topk_jaccard(pat, k)
        else:
            from ..tl.graph import knn_graph

            E = H.T / np.maximum(np.linalg.norm(H.T, axis=1, keepdims=True), 1e-300)
            c = min(n - 1, self.candidates * k)
            cand, _ = knn_graph(E, c, seed=self.seed)
            full = np.hstack([np.arange(n)[:, None], cand]).astype(np.int64)
            J = jaccard_on_support(pat, full)[:, 1:]
            order = np.argsort(-J, axis=1, kind="stable")[:, :k]
            idx = np.take_along_axis(cand, order, axis=1)
        return np.hstack([np.arange(n)[:, None], idx]).astype(np.int64)

    def _reference(self, atlas: Atlas, pat: data.Pattern, K: int):
        if self.reference is None and not self.self_reference:
            return None, None
        if self.self_reference:
            M, info = self_reference_matrix(pat, K, seed=self.seed, nmf_cells=self.nmf_cells,
                                            max_iter=self.nmf_max_iter)
        else:
            M, info = reference_matrix(self.reference, atlas, pat, self.reference_labels)
        k1 = self.n_ref_factors or max(1, round(K / 3))
        k1 = int(min(k1, M.shape[1]))
        from sklearn.decomposition import NMF

        tot = M.sum(0)
        M = M / np.where(tot > 0, tot, 1) * pat.w[:, None]
        P = NMF(k1, init="nndsvda", max_iter=self.nmf_max_iter, random_state=self.seed).fit_transform(M)
        info.update(n_ref_factors=k1)
        return P, info

    def _write(self, atlas: Atlas, pat: data.Pattern, st, nbr, Zv) -> int:
        K = st.H.shape[0]
        emb = np.full((atlas.n_obs, K), np.nan, np.float32)
        emb[pat.cells] = st.H.T
        atlas.write_obsm("X_sccase", emb)
        Wfull = np.zeros((atlas.n_vars, K), np.float32)
        Wfull[pat.peaks] = st.W
        atlas.write_varm("sccase_W", Wfull)
        used = np.zeros(atlas.n_vars, bool)
        used[pat.peaks] = True
        atlas.write_var({"sccase_used": used})
        blocks = enhanced_blocks(pat, nbr, Zv, self.enhanced_top)
        n_stored = write_csr_layer(atlas, "sccase", blocks, pat.cells)
        pcs = enhanced_pca(atlas, pat, self.n_pcs, seed=self.seed, dense_max=self.pca_dense_max, norm=self.norm)
        out = np.full((atlas.n_obs, pcs.shape[1]), np.nan, np.float32)
        out[pat.cells] = pcs
        atlas.write_obsm("X_sccase_pca", out)
        return n_stored


# -- helpers (module level so they pickle into tasks) -----------------------------------------

def support_matrix_dense(nbr: np.ndarray, vals: np.ndarray, n: int) -> np.ndarray:
    """Dense n x n with column ``j`` holding ``vals[j]`` at rows ``nbr[j]`` (tests, small n)."""
    out = np.zeros((n, n))
    out[np.asarray(nbr), np.arange(len(nbr))[:, None]] = vals
    return out


def pattern_rows(pat: data.Pattern, rows: np.ndarray, binary: bool = False) -> sp.csr_matrix:
    """Rows ``rows`` of the pattern (binary) or of ``X^T`` (Eq. 1), as CSR."""
    indptr, indices = pat.arrays()
    starts, ends = indptr[rows], indptr[rows + 1]
    lens = ends - starts
    cols = np.concatenate([np.asarray(indices[a:b]) for a, b in zip(starts, ends)]) if len(rows) else \
        np.zeros(0, np.int32)
    out = sp.csr_matrix((np.ones(len(cols)), cols, np.concatenate([[0], np.cumsum(lens)])),
                        shape=(len(rows), pat.m))
    if not binary:
        out = sp.csr_matrix(sp.diags(pat.s[rows]) @ out @ sp.diags(pat.w))
    return out


def _nnls_block(folder, s, w, m, lo, hi, Wt, max_iter, seed):
    from sklearn.decomposition import non_negative_factorization

    indptr, indices = data.open_pattern(folder)
    a, b = indptr[lo], indptr[hi]
    B = sp.csr_matrix((np.ones(b - a), np.asarray(indices[a:b]), indptr[lo:hi + 1] - a), shape=(hi - lo, m))
    A = sp.csr_matrix(sp.diags(s[lo:hi]) @ B @ sp.diags(w))
    U, _, _ = non_negative_factorization(A, H=Wt, n_components=Wt.shape[0], init="custom", update_H=False,
                                         max_iter=max_iter, random_state=seed)
    return U


def nmf_init(pat: data.Pattern, K: int, *, seed: int = 0, nmf_cells: int = 20_000, max_iter: int = 500):
    """``W`` (m x K) and ``H`` (K x n) from scikit-learn NMF of ``X`` (Eq. 1 TF-IDF).

    Up to ``nmf_cells`` cells the factorisation is of all of ``X``; above, of a seeded sample,
    and each block of cells gets its ``H`` by non-negative least squares against that ``W``.
    """
    from sklearn.decomposition import NMF

    if K > min(pat.n, pat.m):
        raise ValueError(f"K={K} factors but only {pat.n} cells and {pat.m} peaks")
    nmf = NMF(K, init="nndsvda", max_iter=max_iter, random_state=seed)
    if pat.n <= nmf_cells:
        U = nmf.fit_transform(pattern_rows(pat, np.arange(pat.n)))
        return nmf.components_.T.copy(), U.T.copy()
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(pat.n, nmf_cells, replace=False))
    nmf.fit(pattern_rows(pat, rows))
    Wt = nmf.components_
    s, w, Wt_ = pat.shared_s(), data.share(pat.w), data.share(Wt)
    parts = [delayed(_nnls_block)(str(pat.folder), s, w, pat.m, lo, hi, Wt_, max_iter, seed)
             for lo, hi in pat.blocks()]
    return Wt.T.copy(), np.concatenate(dask.compute(*parts)).T.copy()


def _intersections_task(folder, nbr, m):
    indptr, indices = data.open_pattern(folder)
    return support_intersections(indptr, indices, nbr, m)


def jaccard_on_support(pat: data.Pattern, nbr: np.ndarray) -> np.ndarray:
    """Jaccard similarity of cell ``nbr[j, 0]`` with each ``nbr[j, a]``, blockwise."""
    parts = [delayed(_intersections_task)(str(pat.folder), np.ascontiguousarray(nbr[lo:hi]), pat.m)
             for lo, hi in pat.blocks()]
    inter = np.concatenate(dask.compute(*parts)).astype(np.float64)
    indptr, _ = pat.arrays()
    sizes = np.diff(np.asarray(indptr)).astype(np.float64)
    union = sizes[nbr[:, :1]] + sizes[nbr] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _topk_task(folder, m, lo_i, hi_i, lo_j, hi_j, k):
    from ..ops.jaccard import block_topk

    indptr, indices = data.open_pattern(folder)

    def rows(lo, hi):
        a, b = indptr[lo], indptr[hi]
        return sp.csr_matrix((np.ones(b - a, np.float32), np.asarray(indices[a:b]), indptr[lo:hi + 1] - a),
                             shape=(hi - lo, m))

    return block_topk(rows(lo_i, hi_i), rows(lo_j, hi_j), k, lo_i, lo_j)


def topk_jaccard(pat: data.Pattern, k: int) -> np.ndarray:
    """Each cell's ``k`` most Jaccard-similar other cells over the kept peaks (blockwise,
    with the kernels of :func:`scatac_dist.tl.jaccard`); ``O(n^2)`` work, ``O(n k)`` memory."""
    from ..blocks import tree_reduce
    from ..ops.jaccard import merge_topk_all

    blocks = pat.blocks()
    rows = []
    for lo_i, hi_i in blocks:
        parts = [delayed(_topk_task)(str(pat.folder), pat.m, lo_i, hi_i, lo_j, hi_j, k) for lo_j, hi_j in blocks]
        rows.append(tree_reduce(parts, merge_topk_all, k=k))
    res = dask.compute(*rows)
    return np.concatenate([r[0] for r in res]).astype(np.int64)


def _enhance_task(folder, s, w, nbr, Zv, top, peaks):
    indptr, indices = data.open_pattern(folder)
    counts, cols, vals = support_enhance(indptr, indices, s, w, nbr, Zv, top)
    return counts, peaks[cols], vals                        # kept-peak numbers -> store columns


def _dense_enhance(folder, s, w, m, Zcols, top, peaks):
    """Rows of ``(X Z)^T`` for the exact mode's dense ``Z`` columns (one block)."""
    indptr, indices = data.open_pattern(folder)
    n = len(indptr) - 1
    B = sp.csr_matrix((np.ones(len(indices)), np.asarray(indices), np.asarray(indptr)), shape=(n, m))
    A = sp.csr_matrix(sp.diags(s) @ B @ sp.diags(w))
    Y = np.asarray(A.T @ Zcols.T).T                        # block cells x peaks
    if top:
        thr = -np.partition(-Y, min(top, Y.shape[1]) - 1, axis=1)[:, min(top, Y.shape[1]) - 1:min(top, Y.shape[1])]
        Y = np.where(Y >= thr, Y, 0)
    C = sp.csr_matrix(Y)
    C.eliminate_zeros()
    return np.diff(C.indptr), peaks[C.indices], C.data


def enhanced_blocks(pat: data.Pattern, nbr: np.ndarray, Zv: np.ndarray, top: int | None) -> list:
    """Delayed CSR pieces of the enhanced matrix ``(X Z)^T``, one per block of cells."""
    peaks = data.share(pat.peaks)
    if nbr.shape[1] == pat.n and nbr.strides[0] == 0:   # exact mode: Zv is the dense Z^T
        s, w = pat.shared_s(), data.share(pat.w)
        return [delayed(_dense_enhance)(str(pat.folder), s, w, pat.m, np.ascontiguousarray(Zv[lo:hi]), top,
                                        peaks) for lo, hi in pat.blocks()]
    s, w = pat.shared_s(), data.share(pat.w)
    return [delayed(_enhance_task)(str(pat.folder), s, w, np.ascontiguousarray(nbr[lo:hi]),
                                   np.ascontiguousarray(Zv[lo:hi]), top, peaks) for lo, hi in pat.blocks()]


def _tf(block, cols):
    b = sp.csr_matrix(block)[:, cols].astype(np.float64)
    tot = np.asarray(b.sum(1)).ravel()
    return sp.csr_matrix(sp.diags(np.where(tot > 0, 1 / np.where(tot > 0, tot, 1), 0)) @ b)


def enhanced_pca(atlas: Atlas, pat: data.Pattern, n_pcs: int = 50, *, seed: int = 0,
                 dense_max: int = 200_000_000, norm: str = "l2") -> np.ndarray:
    """TF-IDF of ``layers['sccase']`` (module docstring; each cell then scaled to unit L2 norm
    with ``norm='l2'``, as for ``X``), then ``n_pcs`` principal components of the used cells."""
    from ..blocks import view
    from ..tl.linalg import randomized_svd

    L = read_csr_layer(atlas, "sccase")
    cells = np.zeros(atlas.n_obs, bool)
    cells[pat.cells] = True
    Tf = view(L, cells=cells, peaks=pat.peaks, fn=None, dtype=np.float64)
    Tf = Tf.map_blocks(lambda b: _tf(b, slice(None)), dtype=np.float64)
    colsum = dask.compute(Tf.map_blocks(lambda b: np.asarray(b.sum(0)), chunks=((1,) * Tf.numblocks[0], (pat.m,)),
                                        dtype=np.float64).sum(axis=0))[0].ravel()
    idf = np.where(colsum > 0, np.log(pat.n / np.where(colsum > 0, colsum, 1)), 0.0)
    k = min(n_pcs, pat.n - 1, pat.m - 1)
    if pat.n * pat.m <= dense_max:
        from sklearn.decomposition import PCA

        D = np.concatenate([b.toarray() for b in dask.compute(*Tf.to_delayed().ravel())]) * idf
        if norm == "l2":
            D /= np.maximum(np.linalg.norm(D, axis=1, keepdims=True), 1e-300)
        return PCA(k, svd_solver="randomized", random_state=seed).fit_transform(D).astype(np.float32)
    A = view(L, cells=cells, peaks=pat.peaks, fn=_tfidf_rows, idf=idf, l2=int(norm == "l2"))
    U, s, _ = randomized_svd(A, k, seed=seed)
    return (U * s).astype(np.float32)


def _tfidf_rows(block, idf, l2):
    b = sp.csr_matrix(_tf(block, slice(None)) @ sp.diags(idf))
    if l2:
        nrm = np.sqrt(np.asarray(b.multiply(b).sum(1)).ravel())
        b = sp.csr_matrix(sp.diags(np.where(nrm > 0, 1 / np.where(nrm > 0, nrm, 1), 0)) @ b)
    return b.astype(np.float32)


# -- references for scCASER ------------------------------------------------------------------

def _read_table(path: Path):
    import pandas as pd

    sep = "\t" if path.suffix in (".tsv", ".txt") or path.name.endswith((".tsv.gz", ".txt.gz")) else ","
    return pd.read_csv(path, sep=sep, index_col=0)


def reference_matrix(reference, atlas: Atlas, pat: data.Pattern, labels_key: str | None):
    """The reference as a peaks (kept) x samples matrix, aligned to the target's peaks by name.

    ``reference``: a table (CSV/TSV; rows peaks named as the store's ``var_names``, columns
    samples) or an AnnData file/store (``.h5ad``/``.zarr``; samples or cells x peaks). With
    ``labels_key`` the AnnData is single-cell and is summed per ``obs[labels_key]``
    (pseudo-bulk).
    """
    import anndata as ad
    import pandas as pd

    names = atlas.var.index.to_numpy()[pat.peaks]
    info: dict[str, Any] = {}
    if isinstance(reference, (str, Path)):
        path = Path(reference)
        if not path.exists():
            raise FileNotFoundError(f"reference {path} does not exist")
        info["path"] = str(path)
        if path.suffix in (".h5ad", ".zarr") or path.is_dir():
            ref = ad.read_h5ad(path) if path.suffix == ".h5ad" else ad.read_zarr(path)
        else:
            tab = _read_table(path)
            ref = ad.AnnData(tab.T.to_numpy(np.float64), obs=pd.DataFrame(index=tab.columns.astype(str)),
                             var=pd.DataFrame(index=tab.index.astype(str)))
    else:
        ref = reference
    if labels_key is not None:
        if labels_key not in ref.obs:
            raise KeyError(f"the reference has no obs[{labels_key!r}]; its columns are {list(ref.obs.columns)}")
        lab = ref.obs[labels_key].astype(str).to_numpy()
        groups = np.unique(lab)
        S = sp.csr_matrix((np.ones(len(lab)), (np.searchsorted(groups, lab), np.arange(len(lab)))),
                          shape=(len(groups), len(lab)))
        X = S @ sp.csr_matrix(ref.X)
        ref = ad.AnnData(sp.csr_matrix(X), obs=pd.DataFrame(index=groups), var=ref.var)
        info["pseudo_bulk_of"] = labels_key
    pos = pd.Index(ref.var_names.astype(str)).get_indexer(names.astype(str))
    missing = int((pos < 0).sum())
    if missing == len(names):
        raise ValueError(f"the reference shares none of the {len(names)} peaks used; its features must be named "
                         f"like the store's var_names (e.g. {names[0]!r})")
    Xr = ref.X.toarray() if sp.issparse(ref.X) else np.asarray(ref.X, np.float64)
    if (Xr < 0).any():
        raise ValueError("the reference has negative values; give counts or non-negative signal")
    M = np.zeros((len(names), Xr.shape[0]))
    M[pos >= 0] = Xr[:, pos[pos >= 0]].T
    info.update(n_samples=int(Xr.shape[0]), peaks_missing=missing)
    if missing:
        logger.warning("sccase: %d of %d peaks are not in the reference (set to 0 there)", missing, len(names))
    return M, info


def self_reference_matrix(pat: data.Pattern, K: int, *, seed: int = 0, nmf_cells: int = 20_000,
                          max_iter: int = 500):
    """Pseudo-bulk self-reference: Leiden clusters (resolution 1, 15-NN graph of the NMF
    embedding of the target), binarised accessibility summed per cluster (kept peaks x
    clusters). The paper uses Louvain at its default resolution."""
    from ..tl.graph import connectivities, knn_graph, leiden_labels

    _, H = nmf_init(pat, K, seed=seed, nmf_cells=nmf_cells, max_iter=max_iter)
    E = H.T / np.maximum(np.linalg.norm(H.T, axis=1, keepdims=True), 1e-300)
    idx, dist = knn_graph(E, min(15, pat.n - 1), seed=seed)
    labels = leiden_labels(connectivities(idx, dist, pat.n), resolution=1.0, seed=seed)
    groups = np.unique(labels)
    M = np.zeros((pat.m, len(groups)))
    for lo, hi in pat.blocks():
        B = pattern_rows(pat, np.arange(lo, hi), binary=True)
        S = sp.csr_matrix((np.ones(hi - lo), (np.searchsorted(groups, labels[lo:hi]), np.arange(hi - lo))),
                          shape=(len(groups), hi - lo))
        M += np.asarray((S @ B).todense()).T
    return M, {"self_reference_clusters": int(len(groups))}

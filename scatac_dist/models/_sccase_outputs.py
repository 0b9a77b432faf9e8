"""scCASE's outputs: the factors, the enhanced matrix ``X Z`` as a chunked CSR layer, and its
PCA (the paper's evaluation representation).

The enhanced matrix is computed per block of cells on the workers, from the memory-mapped
pattern and each column's support values (:func:`scatac_dist.ops.sccase_support.support_enhance`;
dense ``Z`` columns in exact mode), and written as a chunked CSR layer: never an m x n
matrix. ``X_sccase_pca`` is then read back from the stored layer.

**Enhanced-matrix TF-IDF.** ``tf = y / row sum``, ``idf = log(n / column sum of tf)`` (Eq. 1
made independent of the scale of ``y``), then with ``norm='l2'`` each cell scaled to unit
length, as ``X`` is. PCA is centred (scikit-learn, randomized, seeded) when the dense matrix
fits in ``dense_max`` entries; above it, the uncentred truncated SVD of the sparse TF-IDF (as
LSI does), because centring would densify an atlas. ``docs/methods/sccase.md`` has the
measurement behind the L2 step.
"""

from __future__ import annotations

import dask
import numpy as np
import scipy.sparse as sp
from dask import delayed

from ..blocks import share
from ..io.layers import read_csr_layer, write_csr_layer
from ..ops.sccase_support import support_enhance
from ..store import Atlas
from . import sccase_pattern as data


def write_outputs(atlas: Atlas, pat: data.Pattern, W: np.ndarray, H: np.ndarray, nbr: np.ndarray, Zv: np.ndarray,
                  *, enhanced_top: int | None, n_pcs: int, seed: int, dense_max: int, norm: str) -> int:
    """Write ``obsm['X_sccase']`` (``H^T``), ``varm['sccase_W']``, ``var['sccase_used']``,
    ``layers['sccase']`` and ``obsm['X_sccase_pca']``; returns the entries stored in the layer."""
    K = H.shape[0]
    emb = np.full((atlas.n_obs, K), np.nan, np.float32)
    emb[pat.cells] = H.T
    atlas.write_obsm("X_sccase", emb)
    Wfull = np.zeros((atlas.n_vars, K), np.float32)
    Wfull[pat.peaks] = W
    atlas.write_varm("sccase_W", Wfull)
    used = np.zeros(atlas.n_vars, bool)
    used[pat.peaks] = True
    atlas.write_var({"sccase_used": used})
    blocks = enhanced_blocks(pat, nbr, Zv, enhanced_top)
    n_stored = write_csr_layer(atlas, "sccase", blocks, pat.cells)
    pcs = enhanced_pca(atlas, pat, n_pcs, seed=seed, dense_max=dense_max, norm=norm)
    out = np.full((atlas.n_obs, pcs.shape[1]), np.nan, np.float32)
    out[pat.cells] = pcs
    atlas.write_obsm("X_sccase_pca", out)
    return n_stored


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
    peaks = share(pat.peaks)
    if nbr.shape[1] == pat.n and nbr.strides[0] == 0:   # exact mode: Zv is the dense Z^T
        s, w = pat.shared_s(), share(pat.w)
        return [delayed(_dense_enhance)(str(pat.folder), s, w, pat.m, np.ascontiguousarray(Zv[lo:hi]), top,
                                        peaks) for lo, hi in pat.blocks()]
    s, w = pat.shared_s(), share(pat.w)
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

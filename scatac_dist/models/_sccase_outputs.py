"""scCASE's outputs: the factors, the enhanced matrix ``X Z`` as a chunked CSR layer, and its
PCA (the paper's evaluation representation).

The enhanced matrix is computed per block of cells on the workers, from the memory-mapped
pattern and each column's support values (:func:`scatac_dist.ops.sccase_support.support_enhance`;
dense ``Z`` columns in exact mode), and written as a chunked CSR layer: never an m x n
matrix. ``X_sccase_pca`` is then read back from the stored layer.

**Enhanced-matrix TF-IDF.** ``tf = y / row sum``, ``idf = log(n / column sum of tf)`` (Eq. 1
made independent of the scale of ``y``), then with ``norm='l2'`` each cell scaled to unit
length, as ``X`` is. ``docs/methods/sccase.md`` has the measurement behind the L2 step.

**PCA, chunked** (:func:`centred_pca`). The principal components of the TF-IDF are those of
the centred matrix ``C = A - 1 mu^T``, found by randomized subspace iteration (Halko et al.
2011, Alg. 4.4) with the centring applied implicitly: each pass over the row blocks of ``A``
computes ``Y = A T - 1 (mu^T T)`` and ``C^T Y = A^T Y - mu (1^T Y)`` block by block (the
banded float32 kernel of the LSI solver, :func:`scatac_dist.ops.gram.gram_pass`; Gram
matrices, orthonormalisation and the final projection in float64), and
only the m x (k + oversamples) and (k + oversamples)^2 products come back to the client. A
task holds one block of the layer, its (rows x 70) ``Y`` and two m x 70 matrices; nothing
n x m is formed anywhere (it was densified on the client up to 2e8 values before). The
scores are the projections ``C V`` of every cell on the components, in a last pass; signs
follow scikit-learn's PCA (the largest entry of each component positive).
"""

from __future__ import annotations

import dask
import numpy as np
import scipy.sparse as sp
from dask import delayed

from ..blocks import tree_reduce, tree_sum
from ..io.layers import read_csr_layer, write_csr_layer
from ..ops.sccase_support import support_enhance
from ..store import Atlas
from . import sccase_pattern as data


def write_outputs(atlas: Atlas, pat: data.Pattern, W: np.ndarray, H: np.ndarray, nbr: np.ndarray, Zv: np.ndarray,
                  *, enhanced_top: int | None, n_pcs: int, seed: int, norm: str) -> int:
    """Write ``obsm['X_sccase']`` (``H^T``), ``varm['sccase_W']``, ``var['sccase_used']``,
    ``layers['sccase']`` and ``obsm['X_sccase_pca']`` in one publication (joining the caller's
    :meth:`Atlas.publishing` block, where the stage's record goes too); returns the entries
    stored in the layer."""
    with atlas.publishing("sccase"):
        return _write_outputs(atlas, pat, W, H, nbr, Zv, enhanced_top=enhanced_top, n_pcs=n_pcs, seed=seed,
                              norm=norm)


def _write_outputs(atlas, pat, W, H, nbr, Zv, *, enhanced_top, n_pcs, seed, norm) -> int:
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
    pcs = enhanced_pca(atlas, pat, n_pcs, seed=seed, norm=norm)   # reads the layer just written
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


def enhanced_pca(atlas: Atlas, pat: data.Pattern, n_pcs: int = 50, *, seed: int = 0, norm: str = "l2",
                 n_oversamples: int = 20, n_iter: int = 7) -> np.ndarray:
    """TF-IDF of ``layers['sccase']`` (module docstring; each cell then scaled to unit L2 norm
    with ``norm='l2'``, as for ``X``), then ``n_pcs`` principal components of the used cells
    (:func:`centred_pca`, chunked). Inside a publication the layer is read from its working
    copy, so this must run there too."""
    from ..blocks import view

    L = read_csr_layer(atlas, "sccase")
    cells = np.zeros(atlas.n_obs, bool)
    cells[pat.cells] = True
    Tf = view(L, cells=cells, peaks=pat.peaks, fn=None, dtype=np.float64)
    Tf = Tf.map_blocks(lambda b: _tf(b, slice(None)), dtype=np.float64)
    colsum = dask.compute(tree_sum([delayed(_colsum)(b) for b in Tf.to_delayed().ravel()]))[0]
    idf = np.where(colsum > 0, np.log(pat.n / np.where(colsum > 0, colsum, 1)), 0.0)
    k = min(n_pcs, pat.n - 1, pat.m - 1)
    A = view(L, cells=cells, peaks=pat.peaks, fn=_tfidf_rows, dtype=np.float64, idf=idf, l2=int(norm == "l2"))
    return centred_pca(A.to_delayed().ravel(), pat.n, pat.m, k, seed=seed, n_oversamples=n_oversamples,
                       n_iter=n_iter).astype(np.float32)


def _colsum(b):
    return np.asarray(sp.csr_matrix(b).sum(0), np.float64).ravel()


def _pca_pass(block, T, muT):
    """One block's ``Y = A T - 1 mu^T T`` and its share of ``A^T Y`` (float32, by the banded
    kernel of the LSI solver), with ``Y^T Y`` and ``1^T Y`` in float64."""
    from ..ops.gram import gram_pass

    Y, P = gram_pass(block, T, np.broadcast_to(muT, (block.shape[0], muT.shape[1])))
    Y = Y.astype(np.float64)
    return P, Y.T @ Y, Y.sum(0)


def _sum_triples(xs):
    out = [a.copy() for a in xs[0]]
    for x in xs[1:]:
        for a, b in zip(out, x):
            a += b
    return out


def _project(block, V, muV):
    return np.asarray(sp.csr_matrix(block, dtype=np.float64) @ V) - muV


def _orthonormalizer(G: np.ndarray, rtol: float = 1e-12) -> np.ndarray:
    """``Rinv`` with ``(Y Rinv)^T (Y Rinv) = I`` from ``G = Y^T Y`` (SVQB); directions with
    eigenvalue below ``rtol * max`` (rank deficiency) are dropped."""
    lam, V = np.linalg.eigh((G + G.T) / 2)
    keep = lam > rtol * max(lam.max(), 0.0)
    return V[:, keep] / np.sqrt(lam[keep])


def centred_pca(blocks: list, n: int, m: int, k: int, *, seed: int = 0, n_oversamples: int = 20,
                n_iter: int = 7) -> np.ndarray:
    """Scores (n x k) of the ``k`` leading principal components of the matrix whose row blocks
    are ``blocks`` (delayed sparse or dense, n x m in all), never forming it.

    Randomized subspace iteration on the implicitly centred ``C = A - 1 mu^T``: ``n_iter + 1``
    passes, each ``Y = C T`` then ``T <- C^T Y R^-1`` with ``R^-1`` from the Gram matrix of
    ``Y`` (so ``T = C^T Q`` for an orthonormal ``Q = Y R^-1`` that stays implicit); then the
    SVD of ``Q^T C = T^T`` gives the components ``V``, and a last pass the scores ``C V``.
    Sums over blocks run in a fixed tree (results do not depend on the number of workers).
    Memory: a task holds one block, its rows x (k + oversamples) ``Y`` and m x
    (k + oversamples) matrices (``T`` in, its share of ``C^T Y`` out); the shares are summed
    pairwise, so a worker holds a few of them at once; the client holds m x (k + oversamples)
    and the n x k scores.
    """
    mu = dask.compute(tree_sum([delayed(_colsum)(b) for b in blocks]))[0] / n
    nv = min(k + n_oversamples, n, m)
    T = np.random.default_rng(seed).standard_normal((m, nv))
    for _ in range(n_iter + 1):
        Td, muT = data.share(T), (mu @ T)[None, :]
        # one tree over the (P, G, ysum) triples, pairwise, so a worker holds a few m x nv
        # shares at a time (three trees over `nout` parts kept every leaf's P alive until the
        # 8-way trees of G and ysum had taken their parts: measured, 8 shares at once)
        steps = [delayed(_pca_pass)(b, Td, muT) for b in blocks]
        P, G, ysum = dask.compute(tree_reduce(steps, _sum_triples, split_every=2))[0]
        Rinv = _orthonormalizer(G)
        T = (P - np.outer(mu, ysum)) @ Rinv            # C^T Q, Q = Y Rinv orthonormal
    _, s, Vt = np.linalg.svd(T.T, full_matrices=False)  # Q^T C = Ub S Vt
    kk = min(k, len(s))
    Vt = Vt[:kk]
    signs = np.sign(Vt[np.arange(kk), np.abs(Vt).argmax(1)])   # scikit-learn's svd_flip on Vt
    Vt = Vt * np.where(signs == 0, 1, signs)[:, None]
    V = np.ascontiguousarray(Vt.T)
    Vd, muV = data.share(V), (mu @ V)[None, :]
    scores = np.concatenate(dask.compute(*[delayed(_project)(b, Vd, muV) for b in blocks]))
    if kk < k:                                           # rank below k: the rest have no variance
        scores = np.hstack([scores, np.zeros((n, k - kk))])
    return scores


def _tfidf_rows(block, idf, l2):
    b = sp.csr_matrix(_tf(block, slice(None)) @ sp.diags(idf))
    if l2:
        nrm = np.sqrt(np.asarray(b.multiply(b).sum(1)).ravel())
        b = sp.csr_matrix(sp.diags(np.where(nrm > 0, 1 / np.where(nrm > 0, nrm, 1), 0)) @ b)
    return b

"""The one sparse kernel of the eigen-solvers: ``Y = X T - C`` and ``P = X^T Y`` for a CSR
block in one task.

The eigen-solvers on ``X X^T`` (:mod:`scatac_dist.tl.linalg`, :mod:`scatac_dist.tl.lobpcg`) need both
products of every block once per iteration. The products are memory-bound: each stored
value touches a row of ``T`` or ``P`` (m x ~50). The kernel walks the block in bands of
columns small enough that the band's rows of ``T`` and ``P`` stay in cache, which SciPy's
``X @ T`` and ``X.T @ Y`` (a CSC conversion first) cannot. float32 throughout:
the products are re-orthonormalised in float64 by the caller, and halving the bytes of ``T``
and ``P`` keeps them in cache. Compiled with numba (cached on disk after the first call).
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp

__all__ = ["gram_pass"]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _gram_pass(indptr, indices, data, T, C, has_c, width):
    n = indptr.shape[0] - 1
    m, nv = T.shape
    Y = np.zeros((n, nv), np.float32)
    P = np.zeros((m, nv), np.float32)
    # Columns are visited in bands of `width` peaks so the band's rows of T (then of P) stay
    # in cache; rows have sorted indices, so a cursor per row walks through the bands.
    pos = indptr[:-1].copy()
    for lo in range(0, m, width):
        hi = lo + width
        for i in range(n):
            p = pos[i]
            end = indptr[i + 1]
            while p < end and indices[p] < hi:
                j = indices[p]
                v = data[p]
                for c in range(nv):
                    Y[i, c] += v * T[j, c]
                p += 1
            pos[i] = p
    if has_c:
        for i in range(n):
            for c in range(nv):
                Y[i, c] -= C[i, c]
    pos = indptr[:-1].copy()
    for lo in range(0, m, width):
        hi = lo + width
        for i in range(n):
            p = pos[i]
            end = indptr[i + 1]
            while p < end and indices[p] < hi:
                j = indices[p]
                v = data[p]
                for c in range(nv):
                    P[j, c] += v * Y[i, c]
                p += 1
            pos[i] = p
    return Y, P


#: bytes of T and P rows one column band may touch (a share of a core's L2 + L3); measured on
#: a 10k x 100k block: bands of 8-32k peaks run the pass 2.5-3x faster than no banding
BAND_BYTES = 4 << 20


def gram_pass(X: sp.csr_matrix, T: np.ndarray, C: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``Y = X @ T - C`` (n x nv) and ``P = X.T @ Y`` (m x nv), both float32.

    Parameters
    ----------
    X
        CSR block, n x m (values cast to float32).
    T
        Dense m x nv.
    C
        Dense n x nv subtracted from ``X @ T`` before ``P`` is formed; None for none.
    """
    X = sp.csr_matrix(X)
    if not X.has_sorted_indices:
        X = X.sorted_indices()
    if X.shape[1] != T.shape[0]:
        raise ValueError(f"X is {X.shape}, T is {T.shape}")
    T = np.ascontiguousarray(T, dtype=np.float32)
    has_c = C is not None
    C = np.ascontiguousarray(C, dtype=np.float32) if has_c else np.zeros((1, T.shape[1]), np.float32)
    return _gram_pass(X.indptr.astype(np.int64, copy=False), X.indices.astype(np.int32, copy=False),
                      X.data.astype(np.float32, copy=False), T, C, has_c,
                      max(1024, BAND_BYTES // (8 * T.shape[1])))


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _cosine_values(indptr, indices, w, total, use_total):
    n = indptr.shape[0] - 1
    out = np.empty(indices.shape[0], np.float32)
    for i in range(n):
        a, b = indptr[i], indptr[i + 1]
        sq = 0.0
        s = 0.0
        for p in range(a, b):
            wj = w[indices[p]]
            sq += wj * wj
            if use_total:
                s += wj * total[indices[p]]
        norm = np.sqrt(sq)
        scale = 1.0 / norm if norm > 0 else 0.0
        if use_total:
            deg = s * scale - 1.0  # cosine similarity to every cell but itself
            scale = scale / np.sqrt(deg) if deg > 0 else 0.0
        for p in range(a, b):
            out[p] = w[indices[p]] * scale
    return out


def cosine_rows(block: sp.csr_matrix, w: np.ndarray, total: np.ndarray | None = None) -> sp.csr_matrix:
    """Binarise ``block``, weight column ``j`` by ``w[j]`` and scale each row to unit length;
    with ``total`` (the column sums of all unit rows), also divide row ``i`` by
    ``sqrt(deg_i)``, ``deg_i = u_i . total - 1`` its cosine similarity to every other cell.
    Rows with no weight (or no degree) become zero. Returns float32 CSR of the same pattern."""
    b = sp.csr_matrix(block)
    use_total = total is not None
    tot = np.asarray(total if use_total else np.zeros(1), np.float64)
    data = _cosine_values(b.indptr.astype(np.int64, copy=False), b.indices, np.asarray(w, np.float64), tot,
                          use_total)
    return sp.csr_matrix((data, b.indices, b.indptr), shape=b.shape)

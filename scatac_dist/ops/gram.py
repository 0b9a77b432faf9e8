"""The one sparse kernel of the eigen-solvers: ``Y = X T - C`` and ``P = X^T Y`` in a single
traversal of a CSR block.

Subspace iteration on ``X X^T`` (:func:`scatac_dist.tl._linalg.subspace_eigs`) needs both
products of every block once per iteration. SciPy would compute them in two calls, and the
second, ``X.T @ Y``, first converts the block to CSC; here each row is read once, its dot
products with ``T`` are formed and immediately scattered back into ``P``. float32 throughout:
the products are re-orthonormalised in float64 by the caller, and halving the bytes of ``T``
and ``P`` keeps them in cache. Compiled with numba (cached on disk after the first call).
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp

__all__ = ["gram_pass"]


@numba.njit(cache=True, nogil=True, fastmath=False, boundscheck=False)
def _gram_pass(indptr, indices, data, T, C, has_c):
    n = indptr.shape[0] - 1
    m, nv = T.shape
    Y = np.empty((n, nv), np.float32)
    P = np.zeros((m, nv), np.float32)
    acc = np.empty(nv, np.float32)
    for i in range(n):
        acc[:] = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            v = data[p]
            for c in range(nv):
                acc[c] += v * T[j, c]
        if has_c:
            for c in range(nv):
                acc[c] -= C[i, c]
        Y[i, :] = acc
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            v = data[p]
            for c in range(nv):
                P[j, c] += v * acc[c]
    return Y, P


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
    if X.shape[1] != T.shape[0]:
        raise ValueError(f"X is {X.shape}, T is {T.shape}")
    T = np.ascontiguousarray(T, dtype=np.float32)
    has_c = C is not None
    C = np.ascontiguousarray(C, dtype=np.float32) if has_c else np.zeros((1, T.shape[1]), np.float32)
    return _gram_pass(X.indptr.astype(np.int64, copy=False), X.indices.astype(np.int32, copy=False),
                      X.data.astype(np.float32, copy=False), T, C, has_c)


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

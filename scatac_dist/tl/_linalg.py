"""Randomized SVD of a lazy sparse view, by block products on the cluster.

Only tall-skinny dense matrices (n_cells x nv, nv ~ 50) and small ones (n_peaks x nv) are ever
formed; the sparse view is re-read from the store at each product. Reductions over row
blocks run as fixed-shape tree sums, so results depend on the chunking but not on the
number of workers.
"""

from __future__ import annotations

import logging

import dask
import dask.array as da
import numpy as np

logger = logging.getLogger("scatac_dist")


def small_array(a: np.ndarray) -> da.Array:
    """A one-chunk dask array of ``a``. Beyond 1 MB it is scattered to the cluster first, so
    graphs carry a reference rather than the data."""
    a = np.asarray(a)
    if a.nbytes > 1_000_000:
        try:
            from distributed import default_client

            fut = default_client().scatter(a, broadcast=False, hash=False)
            return da.from_delayed(fut, shape=a.shape, dtype=a.dtype)
        except ValueError:  # no distributed client: the local scheduler shares memory anyway
            pass
    return da.from_array(a, chunks=a.shape or (1,), name=False)


def _times(block, w):
    return np.asarray(block @ w)


def _t_times(block, q):
    return np.asarray(block.T @ q)[None]


def times(A: da.Array, W: np.ndarray | da.Array) -> da.Array:
    """``A @ W`` for a row-blocked sparse ``A`` and a small dense ``W`` (lazy, n x nv)."""
    W = W if isinstance(W, da.Array) else small_array(W)
    return da.blockwise(_times, "ik", A, "ij", W, "jk", dtype=np.float64, concatenate=True,
                        meta=np.empty((0, 0)))


def t_times(A: da.Array, Q: da.Array, split_every: int = 8) -> da.Array:
    """``A.T @ Q`` (lazy, m x nv) as a tree sum of per-block products."""
    parts = da.blockwise(_t_times, "bjk", A, "bj", Q, "bk", dtype=np.float64, concatenate=True,
                         adjust_chunks={"b": lambda c: 1}, meta=np.empty((0, 0, 0)))
    return parts.sum(axis=0, split_every=split_every)


def _qr(Y: da.Array) -> da.Array:
    # tsqr needs every block to have at least as many rows as columns
    nv = Y.shape[1]
    if min(Y.chunks[0]) < nv:
        Y = Y.rechunk({0: max(nv, max(Y.chunks[0]))})
    Q, _ = da.linalg.tsqr(Y)
    return Q


def randomized_svd(A: da.Array, k: int, *, n_oversamples: int = 20, n_iter: int = 6,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top ``k`` singular triplets of ``A`` (Halko et al. 2011, Alg. 4.4: subspace iteration).

    Returns ``U`` (n x k, gathered: O(n k)), ``s`` (k,), ``Vt`` (k x m). Signs are fixed so
    the largest-magnitude entry of each right singular vector is positive, which makes the
    output reproducible.
    """
    n, m = A.shape
    nv = min(k + n_oversamples, n, m)
    if k > min(n, m):
        raise ValueError(f"asked for {k} components of a {n} x {m} matrix; use at most {min(n, m)}")
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((m, nv))
    Q = _qr(times(A, Z))
    for it in range(n_iter):
        Z = np.linalg.qr(t_times(A, Q).compute())[0]
        Q = _qr(times(A, Z))
        logger.debug("randomized SVD: power iteration %d/%d", it + 1, n_iter)
    Q = Q.persist()
    Bt = t_times(A, Q).compute()  # m x nv  (= B.T with B = Q.T A)
    Vb, s, Ubt = np.linalg.svd(Bt, full_matrices=False)  # Bt = Vb s Ubt  =>  B = Ubt.T s Vb.T
    Ub = Ubt.T[:, :k]
    Vt = Vb[:, :k].T
    signs = np.sign(Vt[np.arange(k), np.abs(Vt).argmax(axis=1)])
    signs[signs == 0] = 1
    U = (Q @ small_array(Ub * signs)).compute()
    return U, s[:k], Vt * signs[:, None]


def _minus_scaled(y, q, dinv):
    return y - q * dinv


def symmetric_eigs(A: da.Array, dinv: np.ndarray, k: int, *, n_oversamples: int = 20, n_iter: int = 15,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Leading (largest algebraic) eigenpairs of ``M = A A^T - diag(dinv)`` by randomized
    subspace iteration.

    ``M`` is applied as ``A (A^T V) - dinv * V``: two passes over the sparse ``A`` per
    iteration, never ``M`` itself. Iteration runs on ``M + max(dinv) I``, which is positive
    semi-definite, so it converges to the largest eigenvalues of ``M`` rather than to
    negative ones of large magnitude. A Rayleigh-Ritz step on the final subspace gives the
    eigenvalues (descending) and eigenvectors (n x k, gathered), signs fixed so the
    largest-magnitude entry of each eigenvector is positive.
    """
    n, m = A.shape
    nv = min(k + n_oversamples, n)
    rng = np.random.default_rng(seed)
    dinv = np.asarray(dinv, np.float64)
    shift = float(dinv.max()) if dinv.size else 0.0
    d = da.from_array((dinv - shift)[:, None], chunks=(A.chunks[0], 1), name=False)

    def apply(Q):
        T = small_array(t_times(A, Q).compute())
        return da.map_blocks(_minus_scaled, times(A, T), Q, d, dtype=np.float64)

    Q = _qr(times(A, small_array(rng.standard_normal((m, nv)))))
    for _ in range(n_iter):
        Q = _qr(apply(Q)).persist()
    T = t_times(A, Q).compute()
    DQ = da.map_blocks(_minus_scaled, da.zeros_like(Q), Q, d, dtype=np.float64)  # -dinv * Q
    H = T.T @ T + (Q.T @ DQ).compute()
    H = (H + H.T) / 2 - shift * np.eye(nv)
    evals, W = np.linalg.eigh(H)
    order = np.argsort(-evals)[:k]
    evals, W = evals[order], W[:, order]
    V = (Q @ small_array(W)).compute()
    signs = np.sign(V[np.abs(V).argmax(axis=0), np.arange(V.shape[1])])
    signs[signs == 0] = 1
    return evals, V * signs


def col_sums(A: da.Array) -> np.ndarray:
    """Column sums of a sparse view (m,), computed."""
    ones = da.ones((A.shape[0], 1), chunks=(A.chunks[0], 1))
    return t_times(A, ones).compute()[:, 0]


def row_apply(A: da.Array, fn, dtype=np.float64) -> np.ndarray:
    """``fn(block) -> (rows,)`` on every block, gathered (O(n))."""
    return dask.compute(A.map_blocks(fn, drop_axis=1, dtype=dtype, meta=np.empty(0, dtype)))[0]

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

from ..blocks import share, small_array, tree_sum
from ..ops.gram import gram_pass

logger = logging.getLogger("scatac_dist")


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


def randomized_svd(A: da.Array, k: int, *, n_oversamples: int = 20, n_iter: int = 6,
                   seed: int = 0, cache: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top ``k`` singular triplets of ``A`` by randomized subspace iteration on ``A A^T``
    (Halko et al. 2011, Alg. 4.4, with the one-pass iterations of :func:`subspace_eigs`).

    Returns ``U`` (n x k, gathered: O(n k)), ``s`` (k,), ``Vt`` (k x m). Signs are fixed so
    the largest-magnitude entry of each left singular vector is positive, which makes the
    output reproducible.
    """
    n, m = A.shape
    if k > min(n, m):
        raise ValueError(f"asked for {k} components of a {n} x {m} matrix; use at most {min(n, m)}")
    evals, U, AtU = subspace_eigs(A, k, n_oversamples=n_oversamples, n_iter=n_iter, seed=seed, cache=cache)
    s = np.sqrt(np.maximum(evals, 0))
    Vt = (AtU / np.where(s > 0, s, 1)).T
    return U, s, Vt


def _gram_step(block, T, Y_prev, Rinv, d):
    """One pass over one row block of ``A``: ``Y = A T - d * Q`` with ``Q = Y_prev Rinv``,
    plus this block's share of ``A^T Y`` (float32, the kernel's precision), ``Y^T Y`` and
    ``Y^T diag(d) Y`` (float64)."""
    C = d * (Y_prev.astype(np.float64) @ Rinv) if Y_prev is not None else None
    Y, P = gram_pass(block, T, C)
    Y64 = Y.astype(np.float64)
    return Y, P, Y64.T @ Y64, Y64.T @ (d * Y64)


def _orthonormalizer(G: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """``Rinv`` with ``(Y Rinv)^T (Y Rinv) = I`` from the Gram matrix ``G = Y^T Y``
    (SVQB, Stathopoulos & Wu 2002). Directions with eigenvalue below ``rtol * max`` are
    dropped, so a rank-deficient block does not blow up."""
    lam, V = np.linalg.eigh((G + G.T) / 2)
    keep = lam > rtol * max(lam.max(), 0.0)
    return V[:, keep] / np.sqrt(lam[keep])


def subspace_eigs(A: da.Array, k: int, *, diag: np.ndarray | None = None, n_oversamples: int = 20,
                  n_iter: int = 15, seed: int = 0, cache: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leading eigenpairs of ``M = A A^T - diag(diag)`` by randomized subspace iteration,
    one pass over the sparse ``A`` per iteration.

    Each pass computes, block by block, ``Y = M' Q`` (``M' = M + shift I`` is positive
    semi-definite, so iteration finds the largest algebraic eigenvalues of ``M``), and in
    the same task that block's share of ``A^T Y`` and ``Y^T Y``. Orthonormalising ``Y`` by
    its Gram matrix (SVQB) then gives both the next basis ``Q = Y R^-1`` and ``A^T Q`` for the
    next product without reading ``A`` again: half the passes of the textbook loop. ``Y``
    stays on the workers (n x nv); only m x nv and nv x nv matrices come back.

    With ``cache`` the blocks of ``A`` are computed once and kept on the workers for the
    solve (see :func:`cache_fits`); otherwise every pass recomputes them from the store.

    Returns eigenvalues (descending), eigenvectors (n x k, gathered) and ``A^T V`` (m x k),
    signs fixed so the largest-magnitude entry of each eigenvector is positive. Sums over
    row blocks run in a fixed tree, so results do not depend on the number of workers.
    """
    import scipy.linalg
    from dask import delayed

    n, m = A.shape
    nv = min(k + n_oversamples, n)
    bounds = np.concatenate([[0], np.cumsum(A.chunks[0])]).astype(int)
    shift = float(diag.max()) if diag is not None and diag.size else 0.0
    dvec = (np.zeros(n) if diag is None else np.asarray(diag, np.float64)) - shift
    # shared once: sent with every iteration's graph they cost ~10 MiB per pass at 1M cells
    ds = [share(dvec[a:b, None]) for a, b in zip(bounds[:-1], bounds[1:])]
    if cache:
        A = A.persist()
    blocks = A.to_delayed().ravel()
    T = np.random.default_rng(seed).standard_normal((m, nv))
    Ys, Rinv = [None] * len(blocks), None
    for it in range(n_iter + 1):
        # T goes to the kernel in float32 (its precision): half the bytes sent
        T_d, Rinv_d = share(T.astype(np.float32)), (share(Rinv) if Rinv is not None else None)
        steps = [delayed(_gram_step, nout=4)(b, T_d, y, Rinv_d, d) for b, y, d in zip(blocks, Ys, ds)]
        Ys = [s[0] for s in steps]
        # m x nv, the largest part, summed in float32: half the bytes between workers
        P = tree_sum([s[1] for s in steps], part_bytes=m * nv * 4)
        G, E = tree_sum([s[2] for s in steps]), tree_sum([s[3] for s in steps])
        Ys, P, G, E = dask.persist(Ys, P, G, E)
        P, G, E = dask.compute(P, G, E)
        P = P.astype(np.float64)
        Rinv = _orthonormalizer(G)
        T = P @ Rinv
        logger.debug("subspace iteration %d/%d", it, n_iter)
    # Rayleigh-Ritz on Q = Y Rinv:  Q^T M Q = T^T T - Q^T diag Q,  diag = dvec + shift
    S = Rinv.T @ G @ Rinv
    H = T.T @ T - Rinv.T @ E @ Rinv - shift * S
    H, S = (H + H.T) / 2, (S + S.T) / 2
    evals, W = scipy.linalg.eigh(H, S)
    order = np.argsort(-evals)[:k]
    evals, W = evals[order], W[:, order]
    C = Rinv @ W
    V = np.concatenate(dask.compute(*[delayed(np.matmul)(y, C) for y in Ys]))
    signs = np.sign(V[np.abs(V).argmax(axis=0), np.arange(V.shape[1])])
    signs[signs == 0] = 1
    return evals, V * signs, (T @ W) * signs


def col_sums(A: da.Array) -> np.ndarray:
    """Column sums of a sparse view (m,), computed."""
    ones = da.ones((A.shape[0], 1), chunks=(A.chunks[0], 1))
    return t_times(A, ones).compute()[:, 0]


def row_apply(A: da.Array, fn, dtype=np.float64) -> np.ndarray:
    """``fn(block) -> (rows,)`` on every block, gathered (O(n))."""
    return dask.compute(A.map_blocks(fn, drop_axis=1, dtype=dtype, meta=np.empty(0, dtype)))[0]

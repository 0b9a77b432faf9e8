"""Number of clusters from random-matrix theory: the Tracy-Widom estimate of SCALE.

SCALE (Xiong et al., Nat Commun 2019, Methods, "Prediction of a suitable number of
cluster k") takes as ``k`` "the number of the eigenvalues of X^T X that are significantly
different", following SC3 (Kiselev et al. 2017, ``estkTW``), with the centring and scaling
of the Tracy-Widom law for the largest eigenvalue of a white Wishart matrix (Johnstone
2001). In the paper's notation ``n`` is the number of peaks and ``p`` the number of cells,
and X is the ``n x p`` (peaks x cells) matrix, each cell (column) standardised over the
peaks. The equations, numbered here for reference:

(TW1)  ``mu = (sqrt(n - 1) + sqrt(p))^2``                                  (SCALE Methods)

(TW2)  ``sigma = (sqrt(n - 1) + sqrt(p)) * (1/sqrt(n - 1) + 1/sqrt(p))^(1/3)``  (SCALE Methods)

(TW3)  ``k = #{ eigenvalues lambda of X^T X : lambda > mu + 3.273 * sigma }``

``3.273`` (TW3) is not printed in the paper ("significantly different"); it is the value
of SC3's ``estkTW``, which the paper says it follows, and of SCALE's released
``estimate_k``: the 0.999 quantile of the Tracy-Widom (beta = 1) law, i.e. a test at
p = 0.001 for each eigenvalue. Standardisation follows SC3 (R's ``scale``: mean 0 and
sample standard deviation 1, ``ddof = 1``), so ``X^T X`` is ``(n - 1)`` times the cells'
Pearson correlation matrix over peaks and its white-noise spectrum is the one (TW1-TW2)
describe. (SCALE's Python code uses ``ddof = 0`` and writes ``n - 1`` with ``n`` = cells;
both differ from the paper by a factor ``1 + O(1/n)``, far below the threshold's width.)

Under the null model (cells with no shared structure beyond i.i.d. noise) the largest
eigenvalue exceeds (TW3) with probability 0.001; each cluster adds a "spike" to the
spectrum, so K well-separated clusters give about K eigenvalues above the edge (K - 1
contrasts between cluster means plus the profile all cells share, which per-cell
centring does not remove).

**Where it works, and where it does not** (measured here; ``tests/test_estimate_k.py``
re-checks each regime on smaller draws):

* White noise (i.i.d. Gaussian or Bernoulli entries): 0 in 30 of 30 draws, as the
  0.001 level promises. Gaussian blocks (K = 1, 2, 4, 7): exactly K.
* SCALE's own simulation (Methods, "Generation and corruption of the simulation
  dataset": 300 cells, 1,000 peaks, 3 clusters of 100 specific peaks valued 1 or 2 at
  1:4, dropout then 10 % noise): exactly 3 up to 80 % dropout, also with 5 or 8
  clusters (8 gives 7 from 70 % dropout); at 90 % dropout nothing stands out (0-1).
* **Heteroscedastic counts: strong overestimate.** The threshold is the edge of *white*
  noise, where every entry has the same variance. Real (and :mod:`scatac_dist.datasets`)
  scATAC counts have peak accessibilities spread over orders of magnitude, so the noise
  spectrum reaches far beyond the edge. On ``SynthParams`` atlases with a single cell type
  the estimate is 4-5 at 600 cells x 2,000 peaks and about 65 at 2,000 x 5,000; with 3-8
  types, 17-35 at 2,000 x 5,000 and 120-230 at 3,000-5,000 x 20,000. It grows with the
  size of the matrix, not with K. Binarising first (``X.sign()``) removes most of it for
  one type (1-2) but not with several types (7-10 for K = 3-8 at 2,000 x 5,000), as
  type-specific peaks still have their own variances. Treat the estimate as an upper
  bound on such data.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, eigsh

logger = logging.getLogger("scatac_dist")

__all__ = ["estimate_k", "tracy_widom_threshold", "TW_QUANTILE_0999"]

#: 0.999 quantile of the Tracy-Widom (GOE, beta = 1) distribution, as used by SC3 and SCALE.
TW_QUANTILE_0999 = 3.273

# Row block of the Gram matrix products: bounds the sparse intermediate to block x p.
_BLOCK = 1024
# Up to this many cells the p x p matrix is formed and all its eigenvalues taken (LAPACK);
# above, Lanczos on the implicit matrix finds the few large ones much faster.
_DENSE_CELLS = 1000
# Largest eigenvalues asked of Lanczos before falling back to the dense matrix.
_LANCZOS_K = 32


def tracy_widom_threshold(n: int, p: int, quantile: float = TW_QUANTILE_0999) -> float:
    """Eigenvalue threshold ``mu + quantile * sigma`` of SCALE's Methods (TW1-TW3).

    Parameters
    ----------
    n
        Number of observations: peaks (the rows of SCALE's peaks x cells ``X``).
    p
        Number of variables: cells.
    quantile
        Tracy-Widom quantile; 3.273 (p = 0.001) as in SC3 and SCALE.

    Returns
    -------
    float
        ``(sqrt(n-1) + sqrt(p))^2 + quantile * (sqrt(n-1) + sqrt(p)) *
        (1/sqrt(n-1) + 1/sqrt(p))^(1/3)``.
    """
    if n < 2 or p < 1:
        raise ValueError(f"the Tracy-Widom threshold needs n >= 2 peaks and p >= 1 cells, got "
                         f"n={n}, p={p}")
    a = np.sqrt(n - 1.0) + np.sqrt(p)
    mu = a**2  # (TW1)
    sigma = a * (1.0 / np.sqrt(n - 1.0) + 1.0 / np.sqrt(p)) ** (1.0 / 3.0)  # (TW2)
    return float(mu + quantile * sigma)  # (TW3)


def _sample_rows(X: Any, max_cells: int | None, seed: int) -> tuple[Any, int]:
    """Rows of a seeded uniform sample of cells (all cells when there are few enough)."""
    n_cells = X.shape[0]
    if max_cells is not None and n_cells > max_cells:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(n_cells, size=max_cells, replace=False))
        Xs = X[idx]
    else:
        Xs = X
    if hasattr(Xs, "dask"):  # a dask array (e.g. Atlas.X): gather the sampled rows only
        Xs = Xs.compute()
    return Xs, n_cells


def _standardise(Xs: Any) -> tuple[Any, np.ndarray, np.ndarray, int]:
    """Counts ``C`` (cells x used peaks, float64) with each cell's mean and ``1 / s.d.``.

    SCALE's ``X`` (peaks x cells) is ``(C^T - 1 m^T) S^-1``: column ``j`` is cell ``j``
    centred by its mean ``m_j`` over the ``n`` peaks and divided by its sample standard
    deviation ``s_j`` (``ddof = 1``, as R's ``scale`` in SC3). ``X`` itself is never formed;
    the products below use ``C``, ``m`` and ``1 / s`` only.

    Peaks with no counts in these cells and cells constant over the peaks are dropped
    (see :func:`estimate_k`). Returns ``(C, m, inv_s, n)``.
    """
    if sp.issparse(Xs):
        C = sp.csr_matrix(Xs, dtype=np.float64)
        C.sum_duplicates()
        used = np.flatnonzero(np.asarray(abs(C).sum(axis=0)).ravel() > 0)
        if used.size < C.shape[1]:
            C = C[:, used]
        total = np.asarray(C.sum(axis=1)).ravel()
        sq = np.asarray(C.multiply(C).sum(axis=1)).ravel()
    else:
        C = np.asarray(Xs, dtype=np.float64)
        used = np.flatnonzero(np.abs(C).sum(axis=0) > 0)
        if used.size < C.shape[1]:
            C = C[:, used]
        total = C.sum(axis=1)
        sq = np.einsum("ij,ij->i", C, C)
    n = C.shape[1]
    if n < 2:
        raise ValueError(f"only {n} peaks have counts in the cells used; estimate_k needs at "
                         "least 2 (pass the cells x peaks matrix, not its transpose)")
    m = total / n
    ss = sq - n * m * m  # centred sum of squares of each cell over the peaks
    ok = ss > 1e-12 * np.maximum(sq, 1.0)
    if not ok.all():
        # A constant cell (usually one with no counts) has no standard deviation: R's scale
        # would give NaN and SC3's eigen() would fail. It carries no information: drop it.
        logger.warning("estimate_k: dropping %d cells that are constant over the peaks "
                       "(no counts?)", int((~ok).sum()))
        C, m, ss = C[ok], m[ok], ss[ok]
    if C.shape[0] < 2:
        raise ValueError(f"only {C.shape[0]} non-empty cells; estimate_k needs at least 2")
    inv_s = 1.0 / np.sqrt(ss / (n - 1))
    return C, m, inv_s, n


def _dense_gram(C: Any, m: np.ndarray, inv_s: np.ndarray, n: int) -> np.ndarray:
    """``X^T X`` (p x p), or ``X X^T`` (n x n) when there are fewer peaks than cells.

    With ``C`` the ``p x n`` counts (cells as rows, the store's orientation)::

        X^T X = S^-1 (C C^T - n m m^T) S^-1                                  (p x p)
        X X^T = C^T S^-2 C - v 1^T - 1 v^T + (m^T S^-2 m) 1 1^T,  v = C^T S^-2 m   (n x n)

    Both have the same non-zero eigenvalues. The sparse product is taken in row blocks,
    so no dense copy of ``C`` is made.
    """
    p = C.shape[0]
    if p <= n:
        G = np.empty((p, p))
        CT = C.T.tocsc() if sp.issparse(C) else C.T
        for start in range(0, p, _BLOCK):
            stop = min(p, start + _BLOCK)
            block = C[start:stop] @ CT
            G[start:stop] = block.toarray() if sp.issparse(block) else block
        G -= n * np.outer(m, m)
        G *= np.outer(inv_s, inv_s)
        return G
    w = inv_s**2
    if sp.issparse(C):
        CTw = sp.csr_matrix(C.T.multiply(w[None, :]))
        G = (CTw @ C).toarray()
        v = np.asarray(CTw @ m).ravel()
    else:
        CTw = C.T * w[None, :]
        G = CTw @ C
        v = CTw @ m
    G -= v[:, None]
    G -= v[None, :]
    G += float(m @ (w * m))
    return G


def _gram_operator(C: Any, m: np.ndarray, inv_s: np.ndarray, n: int) -> LinearOperator:
    """``v -> X^T X v = S^-1 (C (C^T (S^-1 v)) - n m (m . S^-1 v))`` without forming X^T X.

    Two sparse products per call: O(nnz) time, O(n + p) extra memory.
    """
    p = C.shape[0]
    CT = C.T

    def matvec(v: np.ndarray) -> np.ndarray:
        u = inv_s * np.ravel(v)
        y = np.asarray(C @ (CT @ u)).ravel() - n * m * float(m @ u)
        return inv_s * y

    return LinearOperator((p, p), matvec=matvec, rmatvec=matvec, dtype=np.float64)


def _count_dense(G: np.ndarray, bd: float) -> np.ndarray:
    # Only the eigenvalues above the threshold are wanted (LAPACK syevr with a value range);
    # the O(p^3) reduction to tridiagonal form is still the main cost.
    return scipy.linalg.eigvalsh(G, subset_by_value=(bd, np.inf), check_finite=False)


def _count_lanczos(C: Any, m: np.ndarray, inv_s: np.ndarray, n: int, bd: float,
                   seed: int) -> np.ndarray:
    """Eigenvalues above ``bd`` by Lanczos (ARPACK) on the implicit ``X^T X``.

    Asks for the :data:`_LANCZOS_K` largest eigenvalues. If one of them falls below ``bd``,
    those above it are the answer; if all are above (many spikes, typical of data far from
    the white-noise model), the dense matrix is formed instead, since Lanczos for hundreds
    of eigenvalues is slower than LAPACK on the whole matrix (measured here: 128
    eigenvalues of a 3,000-cell matrix took 20 s, the dense route 6 s).
    """
    p = C.shape[0]
    op = _gram_operator(C, m, inv_s, n)
    v0 = np.random.default_rng([seed, 0x7F]).standard_normal(p)  # deterministic start
    vals = eigsh(op, k=min(_LANCZOS_K, p - 2), which="LA", return_eigenvectors=False, v0=v0,
                 tol=1e-10)
    if (vals <= bd).any():
        return vals[vals > bd]
    logger.debug("estimate_k: over %d eigenvalues above the threshold; using the dense "
                 "%d x %d matrix", vals.size, p, p)
    return _count_dense(_dense_gram(C, m, inv_s, n), bd)


def estimate_k(X: Any, *, seed: int = 0, max_cells: int | None = 5000,
               tw_quantile: float = TW_QUANTILE_0999) -> int:
    """Estimate the number of clusters as SCALE does: eigenvalues above the Tracy-Widom edge.

    Counts the eigenvalues of SCALE's ``X^T X`` (``(n - 1)`` times the cell-cell Pearson
    correlation matrix over peaks) that exceed ``mu + 3.273 sigma`` with ``n`` peaks and
    ``p`` cells; see the module docstring for the equations (TW1-TW3) and their sources.

    **Cells.** With more than ``max_cells`` cells (default 5,000), the estimate is made on
    ``max_cells`` cells drawn uniformly without replacement by
    ``numpy.random.default_rng(seed)``, so the result is deterministic for a seed. The
    eigenvalues of a ``p x p`` matrix cost up to ``8 p^2`` bytes and ``O(p^3)`` time, which
    rules out atlases of 10^5-10^7 cells, while 5,000 cells still hold about 50 cells of a
    1 % population, enough for it to raise its own eigenvalue. Rarer populations can be
    missed, and the estimate grows with the sample (a cluster's spike grows in proportion
    to its number of cells, the edge ``(sqrt(n - 1) + sqrt(p))^2`` more slowly while
    ``p < n``), so compare estimates made with the same ``max_cells``. Pass
    ``max_cells=None`` to use every cell (a dask ``X`` is then computed whole).

    **Cost.** Up to 1,000 cells (or peaks) the matrix is formed and LAPACK counts its
    eigenvalues above the threshold. Above, Lanczos (ARPACK) finds the 32 largest
    eigenvalues of the implicit matrix from sparse products: O(nnz) per step, no ``p x p``
    matrix. When all 32 pass the threshold (far from the white-noise model, see the
    module docstring) the dense matrix is formed after all. Measured on 2 cores at 5,000
    cells x 20,000 peaks with 10 % non-zeros: Lanczos 10-15 s; forming and solving the
    dense matrix about 40 s and 200 MB.

    **Peaks.** Peaks with no counts among the cells used are dropped before ``n`` is
    counted: they are constant rows that carry no information, and SCALE removes such peaks
    in its preprocessing before it estimates ``k``. Cells constant over the peaks (no
    counts) are dropped too, with a warning, since their standard deviation is 0.

    Memory: the sampled rows (sparse stay sparse; a dense input's sample is copied as
    float64) and at most one ``min(n, p)^2`` float64 matrix. Never ``n_cells x n_peaks`` dense,
    never ``n_cells x n_cells``.

    Parameters
    ----------
    X
        Cells x peaks matrix: SciPy sparse (CSR preferred), dense NumPy, or a dask array of
        either (only the sampled rows are computed). Pass the matrix SCALE would train on
        (counts or binarised, after peak and cell filtering).
    seed
        Seed of the cell sample.
    max_cells
        Largest number of cells used; ``None`` for all.
    tw_quantile
        Tracy-Widom quantile of the threshold (TW3): 3.273 (p = 0.001) as in SC3 and SCALE.

    Returns
    -------
    int
        The number of eigenvalues above the threshold (0 when nothing stands out of noise).

    Raises
    ------
    ValueError
        If ``X`` is not 2-D, ``max_cells < 2``, or fewer than 2 peaks with counts or 2
        non-empty cells remain.
    """
    if len(getattr(X, "shape", ())) != 2:
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"X has shape {X.shape}; pass a 2-D cells x peaks matrix")
    if max_cells is not None and max_cells < 2:
        raise ValueError(f"max_cells must be >= 2 or None, not {max_cells}")
    Xs, n_cells = _sample_rows(X, max_cells, seed)
    C, m, inv_s, n = _standardise(Xs)
    p = C.shape[0]
    bd = tracy_widom_threshold(n, p, tw_quantile)
    if min(n, p) <= _DENSE_CELLS:
        above = _count_dense(_dense_gram(C, m, inv_s, n), bd)
    else:
        above = _count_lanczos(C, m, inv_s, n, bd, seed)
    k = int(above.size)
    logger.info("estimate_k: %d eigenvalues above the Tracy-Widom threshold %.4g "
                "(n=%d peaks, p=%d of %d cells)", k, bd, n, p, n_cells)
    if above.size:
        logger.debug("estimate_k: eigenvalues above the threshold: %s",
                     np.array2string(np.sort(above)[::-1][:20], precision=4))
    return k

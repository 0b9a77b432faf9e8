"""The support of scCASE's similarity ``Z`` in atlas mode: each cell and its nearest cells.

Column ``j`` of ``Z`` is held on ``nbr[j]`` (cell ``j`` first, then its ``k`` neighbours) as
values ``Zv[j, a] = Z[nbr[j, a], j]``. The neighbours are found in one of two ways
(``SCCASE(support=...)``):

* ``'knn'``: the ``candidates x k`` nearest cells by cosine in the NMF embedding ``H^T``,
  re-ranked by Jaccard similarity on the binarised pattern (``O(n k)`` work);
* ``'jaccard'``: the exact top-k Jaccard, blockwise with the kernels of
  :func:`scatac_dist.tl.jaccard` (``O(n^2)`` work, ``O(n k)`` memory).

Every Jaccard value is computed from the memory-mapped pattern (:mod:`.sccase_pattern`), one
Dask task per block of cells.
"""

from __future__ import annotations

import dask
import numpy as np
import scipy.sparse as sp
from dask import delayed

from ..ops.sccase_support import support_intersections
from . import sccase_pattern as data

__all__ = ["support_cells", "jaccard_on_support", "topk_jaccard", "support_matrix_dense"]


def support_cells(pat: data.Pattern, H: np.ndarray, k: int, *, how: str = "knn", candidates: int = 3,
                  seed: int = 0) -> np.ndarray:
    """``nbr`` (n x (k+1)): each cell, then its ``k`` most Jaccard-similar cells (``how``:
    ``'knn'`` or ``'jaccard'``, see the module docstring). With ``k = n - 1`` every cell."""
    n = pat.n
    if k == n - 1:
        others = np.array([np.r_[np.arange(j), np.arange(j + 1, n)] for j in range(n)])
        return np.hstack([np.arange(n)[:, None], others]).astype(np.int64)
    if how == "jaccard":
        idx = topk_jaccard(pat, k)
    else:
        from ..tl.graph import knn_graph

        E = H.T / np.maximum(np.linalg.norm(H.T, axis=1, keepdims=True), 1e-300)
        c = min(n - 1, candidates * k)
        cand, _ = knn_graph(E, c, seed=seed)
        full = np.hstack([np.arange(n)[:, None], cand]).astype(np.int64)
        J = jaccard_on_support(pat, full)[:, 1:]
        order = np.argsort(-J, axis=1, kind="stable")[:, :k]
        idx = np.take_along_axis(cand, order, axis=1)
    return np.hstack([np.arange(n)[:, None], idx]).astype(np.int64)


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


def support_matrix_dense(nbr: np.ndarray, vals: np.ndarray, n: int) -> np.ndarray:
    """Dense n x n with column ``j`` holding ``vals[j]`` at rows ``nbr[j]`` (checks on small n)."""
    out = np.zeros((n, n))
    out[np.asarray(nbr), np.arange(len(nbr))[:, None]] = vals
    return out

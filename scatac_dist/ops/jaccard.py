"""Jaccard similarity of binary rows, and top-k selection with a fixed tie order.

Ties are broken by the smaller column index, so a top-k list is the same whether it is
taken from the whole row at once or merged from pieces (what makes the blockwise search in
:func:`scatac_dist.tl.jaccard` equal the exact one).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["jaccard_dense", "topk_rows", "merge_topk", "merge_topk_all", "block_topk"]


def _binary(X) -> sp.csr_matrix:
    B = sp.csr_matrix(X, dtype=np.float32, copy=True)
    B.data[:] = 1.0
    B.eliminate_zeros()
    return B


def jaccard_dense(A, B=None) -> np.ndarray:
    """Dense Jaccard similarity between the rows of ``A`` and of ``B`` (default ``A``), as
    float64; two empty rows have similarity 0."""
    A = _binary(A)
    B = A if B is None else _binary(B)
    inter = np.asarray((A @ B.T).toarray(), dtype=np.float64)
    na = np.asarray(A.getnnz(axis=1), np.float64)
    nb = np.asarray(B.getnnz(axis=1), np.float64)
    union = na[:, None] + nb[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def topk_rows(S: np.ndarray, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest entries of each row of ``S``: column indices (plus ``offset``) and
    values, ordered by value descending, then index ascending."""
    k = min(k, S.shape[1])
    order = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return order.astype(np.int64) + offset, np.take_along_axis(S, order, axis=1)


def merge_topk(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of two candidate lists for the same rows; ``a`` must come from lower column
    indices than ``b`` so ties keep index order."""
    idx = np.concatenate([a[0], b[0]], axis=1)
    val = np.concatenate([a[1], b[1]], axis=1)
    order = np.argsort(-val, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(val, order, axis=1)


def merge_topk_all(parts: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`merge_topk` over a list of top-k lists, left to right."""
    out = parts[0]
    for p in parts[1:]:
        out = merge_topk(out, p, k)
    return out


def block_topk(BI, BJ, k: int, offset_i: int, offset_j: int, sub_rows: int = 1000):
    """Top-k Jaccard neighbours of the rows of ``BI`` among the rows of ``BJ`` (global row
    numbers ``offset_i + r`` and ``offset_j + c``); a cell is never its own neighbour.
    ``BI`` is processed ``sub_rows`` rows at a time, so memory is ``sub_rows x len(BJ)``."""
    BI, BJ = _binary(BI), _binary(BJ)
    out_i, out_v = [], []
    for a in range(0, BI.shape[0], sub_rows):
        S = jaccard_dense(BI[a:a + sub_rows], BJ)
        rows = offset_i + a + np.arange(S.shape[0])
        self_col = rows - offset_j
        hit = (self_col >= 0) & (self_col < S.shape[1])
        S[np.flatnonzero(hit), self_col[hit]] = -1.0
        i, v = topk_rows(S, k, offset_j)
        out_i.append(i)
        out_v.append(v)
    if not out_i:
        return np.zeros((0, min(k, BJ.shape[0])), np.int64), np.zeros((0, min(k, BJ.shape[0])))
    return np.concatenate(out_i), np.concatenate(out_v)

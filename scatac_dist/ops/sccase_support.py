"""Kernels of scCASE's atlas mode: products of ``X`` with a similarity ``Z`` held on a
sparse support, never as an ``n x n`` matrix.

Notation as in :mod:`scatac_dist.ops.sccase` (``X`` peaks x cells), with the TF-IDF of
Eq. (1) on binarised data factored as ``X[p, i] = s_i w_p B[i, p]``: ``B`` the cells x peaks
0/1 pattern (CSR ``indptr``/``indices``), ``s_i`` the per-cell scale (``1 / (peaks of cell i)``,
the TF of Eq. 1 as printed, or ``1 / |w over its peaks|`` for unit-length cells, the default)
and ``w_p = log(n / cells with peak p)`` the IDF. Storing only the pattern halves the bytes
and keeps the values exact.

Column ``j`` of ``Z`` is held as ``nbr[j, :]`` (its support: cell ``j`` first, then its
neighbours, distinct) and a value per support entry (``V[j, a]`` is ``Z[nbr[j, a], j]``).
For a column, ``y = X V[:, j] = sum_a V[j, a] X[:, nbr[j, a]]`` is scattered into a dense
buffer of length ``m`` over the peaks it touches, which gives

* ``q_j = |y|^2`` (the ``tr(V^T X^T X V)`` of the loss and of the Z step size), and
* ``g[j, a] = X[:, nbr[j, a]] . y`` = ``(X^T X V)[nbr[j, a], j]``: the Z gradient's data
  term sampled on the support (the "dense-dense products on the support pairs").

Work per column: two sweeps over the rows of its support, ``O(k * peaks per cell)``; memory:
one ``m``-vector per call. All kernels are numba-compiled (cached on disk) and release the
GIL.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["support_quad", "support_intersections", "support_enhance", "bernoulli_mask"]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _quad(indptr, indices, s, w, nbr, V, want_g):
    n, k = nbr.shape
    m = w.shape[0]
    y = np.zeros(m, np.float64)
    touched = np.empty(m, np.int64)
    mark = np.zeros(m, np.uint8)
    q = np.zeros(n, np.float64)
    g = np.zeros((n, k) if want_g else (0, 0), np.float64)
    for j in range(n):
        nt = 0
        for a in range(k):
            v = V[j, a]
            if v == 0.0:
                continue
            i = nbr[j, a]
            sv = s[i] * v
            for t in range(indptr[i], indptr[i + 1]):
                p = indices[t]
                if not mark[p]:
                    mark[p] = 1
                    touched[nt] = p
                    nt += 1
                y[p] += sv * w[p]
        acc = 0.0
        for t in range(nt):
            acc += y[touched[t]] * y[touched[t]]
        q[j] = acc
        if want_g:
            for a in range(k):
                i = nbr[j, a]
                dot = 0.0
                for t in range(indptr[i], indptr[i + 1]):
                    p = indices[t]
                    dot += w[p] * y[p]
                g[j, a] = s[i] * dot
        for t in range(nt):
            y[touched[t]] = 0.0
            mark[touched[t]] = 0
    return q, g


def support_quad(indptr, indices, s, w, nbr, V, want_g: bool = True):
    """For every column ``j`` of the block: ``q[j] = |X V_j|^2`` and (``want_g``)
    ``g[j, a] = (X^T X V)[nbr[j, a], j]``.

    """
    return _quad(indptr, indices, np.asarray(s, np.float64), np.asarray(w, np.float64),
                 np.ascontiguousarray(nbr, np.int64), np.ascontiguousarray(V, np.float64), bool(want_g))


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _intersections(indptr, indices, nbr, m):
    n, k = nbr.shape
    mark = np.zeros(m, np.uint8)
    out = np.zeros((n, k), np.int64)
    for j in range(n):
        c = nbr[j, 0]
        for t in range(indptr[c], indptr[c + 1]):
            mark[indices[t]] = 1
        for a in range(k):
            i = nbr[j, a]
            cnt = 0
            for t in range(indptr[i], indptr[i + 1]):
                cnt += mark[indices[t]]
            out[j, a] = cnt
        for t in range(indptr[c], indptr[c + 1]):
            mark[indices[t]] = 0
    return out


def support_intersections(indptr, indices, nbr, m: int) -> np.ndarray:
    """``|B_{nbr[j, 0]} & B_{nbr[j, a]}|``: peaks shared by cell ``nbr[j, 0]`` and each support
    cell (the numerator of their Jaccard similarity)."""
    return _intersections(indptr, indices, np.ascontiguousarray(nbr, np.int64), int(m))


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _enhance(indptr, indices, s, w, nbr, V, top):
    n, k = nbr.shape
    m = w.shape[0]
    y = np.zeros(m, np.float64)
    touched = np.empty(m, np.int64)
    mark = np.zeros(m, np.uint8)
    counts = np.zeros(n, np.int64)
    cols_parts = []
    vals_parts = []
    for j in range(n):
        nt = 0
        for a in range(k):
            v = V[j, a]
            if v == 0.0:
                continue
            i = nbr[j, a]
            sv = s[i] * v
            for t in range(indptr[i], indptr[i + 1]):
                p = indices[t]
                if not mark[p]:
                    mark[p] = 1
                    touched[nt] = p
                    nt += 1
                y[p] += sv * w[p]
        cols = np.sort(touched[:nt])
        vals = np.empty(cols.shape[0], np.float64)
        for t in range(cols.shape[0]):
            vals[t] = y[cols[t]]
            y[cols[t]] = 0.0
            mark[cols[t]] = 0
        keep = vals > 0
        cols = cols[keep]
        vals = vals[keep]
        if top > 0 and cols.shape[0] > top:
            # the top entries by value, ties to the lower peak; then back in peak order
            order = np.argsort(-vals, kind="mergesort")[:top]
            order = np.sort(order)
            cols = cols[order]
            vals = vals[order]
        counts[j] = cols.shape[0]
        cols_parts.append(cols)
        vals_parts.append(vals)
    total = counts.sum()
    out_cols = np.empty(total, np.int64)
    out_vals = np.empty(total, np.float64)
    pos = 0
    for j in range(n):
        c = counts[j]
        out_cols[pos:pos + c] = cols_parts[j]
        out_vals[pos:pos + c] = vals_parts[j]
        pos += c
    return counts, out_cols, out_vals


def support_enhance(indptr, indices, s, w, nbr, V, top: int | None = None):
    """The enhanced rows ``(X V)^T`` of a block of columns, as CSR pieces
    ``(row lengths, peak indices, values)``; ``top`` keeps each row's ``top`` largest."""
    return _enhance(indptr, indices, np.asarray(s, np.float64), np.asarray(w, np.float64),
                    np.ascontiguousarray(nbr, np.int64), np.ascontiguousarray(V, np.float64),
                    int(top or 0))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def bernoulli_mask(rows, cols, n: int, keep: float, seed: int) -> np.ndarray:
    """``R[rows, cols]`` of a Bernoulli(``keep``) n x n mask, as float64 0/1.

    Each entry is a hash of ``(seed, rows * n + cols)`` (splitmix64), so any subset of ``R``
    is drawn without the rest: the exact mode's dense ``R`` and the atlas mode's ``R`` on a
    support agree entry by entry, whatever the support and the number of workers.
    """
    with np.errstate(over="ignore"):
        key = (np.asarray(rows, np.uint64) * np.uint64(n) + np.asarray(cols, np.uint64))
        h = _splitmix64(key ^ _splitmix64(np.full(1, seed, np.uint64)))
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return (u < keep).astype(np.float64)

"""Genomic-interval kernels for scEmbed: region words and interval overlap.

Pure NumPy/SciPy; no Dask, no AnnData. Intervals are BED-style, half-open ``[start, end)``,
so two intervals overlap by at least 1 bp when ``a.start < b.end and b.start < a.end``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp


def region_words(chrom, start, end) -> np.ndarray:
    """The scEmbed word of each region, ``chr_start_end`` (paper, Methods)."""
    chrom = pd.Index(np.asarray(chrom, dtype=object).astype(str))
    return np.asarray(chrom.str.cat([pd.Index(np.asarray(start, np.int64).astype(str)),
                                     pd.Index(np.asarray(end, np.int64).astype(str))], sep="_"), dtype=object)


def _expand_ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges ``[lo[i], hi[i])``: (owner i, position) of every element, vectorised."""
    n = np.maximum(hi - lo, 0)
    owner = np.repeat(np.arange(len(lo)), n)
    if owner.size == 0:
        return owner, owner
    first = np.concatenate([[0], np.cumsum(n)[:-1]])
    pos = np.arange(owner.size) - np.repeat(first, n) + np.repeat(lo, n)
    return owner, pos


def overlap_pairs(q_chrom, q_start, q_end, r_chrom, r_start, r_end) -> tuple[np.ndarray, np.ndarray]:
    """Every (query, reference) pair of intervals overlapping by at least 1 bp.

    A sorted-interval search per chromosome: references sorted by start; a reference can only
    overlap ``[qs, qe)`` if its start lies in ``(qs - L, qe)``, where ``L`` is the longest
    reference on that chromosome, so two ``searchsorted`` calls bound the candidates and one
    comparison of ends keeps the true overlaps. Cost is O((q + r) log r + candidates); peak
    sets have short, similar lengths, so candidates stay a small multiple of the overlaps.

    Returns
    -------
    qi, ri
        Indices into the query and reference arrays, sorted by ``qi`` then ``ri``.
    """
    q_chrom = np.asarray(q_chrom, dtype=object).astype(str)
    r_chrom = np.asarray(r_chrom, dtype=object).astype(str)
    q_start, q_end = np.asarray(q_start, np.int64), np.asarray(q_end, np.int64)
    r_start, r_end = np.asarray(r_start, np.int64), np.asarray(r_end, np.int64)
    out_q, out_r = [], []
    r_by_chrom = pd.Series(np.arange(len(r_chrom))).groupby(r_chrom).indices
    q_by_chrom = pd.Series(np.arange(len(q_chrom))).groupby(q_chrom).indices
    for c, qidx in q_by_chrom.items():
        ridx = r_by_chrom.get(c)
        if ridx is None:
            continue
        order = ridx[np.argsort(r_start[ridx], kind="stable")]
        rs, re_ = r_start[order], r_end[order]
        longest = int((re_ - rs).max())
        qs, qe = q_start[qidx], q_end[qidx]
        lo = np.searchsorted(rs, qs - longest, side="right")
        hi = np.searchsorted(rs, qe, side="left")
        owner, pos = _expand_ranges(lo, hi)
        hit = re_[pos] > qs[owner]
        out_q.append(qidx[owner[hit]])
        out_r.append(order[pos[hit]])
    if not out_q:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    qi, ri = np.concatenate(out_q), np.concatenate(out_r)
    o = np.lexsort((ri, qi))
    return qi[o], ri[o]


def overlap_matrix(qi: np.ndarray, ri: np.ndarray, n_query: int, n_ref: int) -> sp.csr_matrix:
    """The 0/1 ``n_query x n_ref`` matrix of overlapping pairs (float32 CSR).

    A query peak that hits several reference regions maps to all of them, so a cell's new
    binary row times this matrix marks every universe region it touches.
    """
    m = sp.csr_matrix((np.ones(len(qi), np.float32), (qi, ri)), shape=(n_query, n_ref))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m

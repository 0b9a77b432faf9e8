"""Reductions of one CSR block. Integer results, so sums over blocks are exact and the
same in any order (GUIDE invariant 4)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def binarize(block: sp.csr_matrix) -> sp.csr_matrix:
    """A float32 copy of ``block`` with every stored value > 0 set to 1 (0 stays 0)."""
    b = block.copy()
    b.data = (b.data > 0).astype(np.float32)
    return b


def row_counts(block: sp.csr_matrix) -> np.ndarray:
    """Total counts per row, int64."""
    # cumsum differences handle empty rows, which reduceat does not
    csum = np.concatenate([[0], np.cumsum(block.data, dtype=np.int64)])
    return csum[block.indptr[1:]] - csum[block.indptr[:-1]]


def row_nnz(block: sp.csr_matrix) -> np.ndarray:
    """Non-zero values per row, int64 (explicitly stored zeros do not count)."""
    csum = np.concatenate([[0], np.cumsum(block.data != 0, dtype=np.int64)])
    return csum[block.indptr[1:]] - csum[block.indptr[:-1]]


def col_counts(block: sp.csr_matrix) -> np.ndarray:
    """Total counts per column, int64."""
    # float64 weights are exact for integer sums below 2**53
    return np.rint(np.bincount(block.indices, weights=block.data.astype(np.float64),
                               minlength=block.shape[1])).astype(np.int64)


def col_nnz(block: sp.csr_matrix) -> np.ndarray:
    """Non-zero values per column (cells with the peak open, in a row block), int64."""
    return np.bincount(block.indices[block.data != 0], minlength=block.shape[1]).astype(np.int64)


def col_nnz_ge(block: sp.csr_matrix, min_reads: int = 1) -> np.ndarray:
    """Per column, the rows with at least ``min_reads`` counts, int64."""
    return np.bincount(block.indices[block.data >= min_reads], minlength=block.shape[1]).astype(np.int64)

"""TF-IDF of one CSR row block, given the inverse document frequencies of the whole atlas.

Notation (cells are rows here, as in the store): ``x_ij`` counts (or 0/1 after
binarisation) of cell ``i`` in peak ``j``; ``tf_ij = x_ij / sum_j x_ij`` (over the
selected peaks); ``n`` cells; ``c_j = sum_i x_ij`` the peak's total over the cells used.
Each method is named after its source:

================  =============================================================  ==================
name              value                                                          source
================  =============================================================  ==================
``sccase``        ``tf_ij * log(n / c_j)``                                       scCASE Eq. (1)
``signac1``       ``log(1 + s * tf_ij * n / c_j)``                               Signac RunTFIDF method 1 (Stuart et al. 2019)
``signac2``       ``tf_ij * log(1 + n / c_j)``                                   Signac method 2 (Cusanovich et al. 2018)
``signac3``       ``log(1 + s * tf_ij) * log(1 + n / c_j)``                      Signac method 3 (log-TF, A. Hill)
``signac4``       ``x_ij * n / c_j``                                             Signac method 4 (10x Genomics: IDF only)
``muon``          ``log(1 + s * tf_ij) * log(1 + n / c_j)``                      muon ``atac.pp.tfidf`` defaults (log_tf, log_idf)
``archr1``        ``tf_ij * log(1 + n / c_j)``                                   ArchR LSIMethod 1 "tf-logidf"
``archr2``        ``log(1 + s * tf_ij * n / c_j)``                               ArchR LSIMethod 2 "log(tf-idf)"
``archr3``        ``log(1 + tf_ij) * log(1 + n / c_j)``                          ArchR LSIMethod 3 "logtf-logidf"
================  =============================================================  ==================

``s`` is the scale factor (1e4 by default, as in Signac, muon and ArchR). Several methods
coincide by formula; they keep their names so a run says which convention it follows.
Only stored non-zeros are transformed, so every result stays sparse (each formula maps 0
to 0).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

METHODS = ("sccase", "signac1", "signac2", "signac3", "signac4", "muon", "archr1", "archr2", "archr3")

__all__ = ["METHODS", "idf_from_counts", "tfidf_block", "check_method"]


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown TF-IDF method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def idf_from_counts(col_totals: np.ndarray, n_cells: int, method: str) -> np.ndarray:
    """The per-peak factor each method multiplies by; 0 where a peak has no counts."""
    check_method(method)
    c = np.asarray(col_totals, dtype=np.float64)
    with np.errstate(divide="ignore"):
        ratio = np.where(c > 0, n_cells / np.where(c > 0, c, 1), 0.0)
    if method == "sccase":
        return np.where(c > 0, np.log(np.where(ratio > 0, ratio, 1)), 0.0)
    if method in ("signac1", "signac4", "archr2"):
        return ratio
    return np.log1p(ratio)


def tfidf_block(block: sp.csr_matrix, idf: np.ndarray, method: str, scale_factor: float = 1e4,
                dtype=np.float32) -> sp.csr_matrix:
    """TF-IDF of a block whose columns are the selected peaks (``idf`` of the same length)."""
    check_method(method)
    m = sp.csr_matrix(block, dtype=np.float64, copy=True)
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    if method != "signac4":
        totals = np.asarray(m.sum(axis=1)).ravel()
        m.data /= np.where(totals > 0, totals, 1.0)[rows]
    w = idf[m.indices]
    if method in ("sccase", "signac2", "archr1", "signac4"):
        m.data = m.data * w
    elif method in ("signac1", "archr2"):
        m.data = np.log1p(scale_factor * m.data * w)
    elif method in ("signac3", "muon"):
        m.data = np.log1p(scale_factor * m.data) * w
    else:  # archr3
        m.data = np.log1p(m.data) * w
    return m.astype(dtype)

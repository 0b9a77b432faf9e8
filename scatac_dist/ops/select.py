"""Feature-selection scores from per-peak statistics (all O(n_peaks), no Dask)."""

from __future__ import annotations

import numpy as np

__all__ = ["top_accessible", "episcanpy_variability", "snapatac2_quantile"]


def top_accessible(n_cells_by_counts: np.ndarray, n_features: int, eligible: np.ndarray | None = None) -> np.ndarray:
    """Mask of the ``n_features`` peaks open in most cells (ties broken by index)."""
    score = np.asarray(n_cells_by_counts, dtype=np.float64).copy()
    if eligible is not None:
        score[~eligible] = -np.inf
    order = np.argsort(-score, kind="stable")[:n_features]
    mask = np.zeros(len(score), bool)
    mask[order] = True
    return mask & np.isfinite(score)


def episcanpy_variability(n_cells_by_counts: np.ndarray, n_cells: int) -> np.ndarray:
    """episcanpy's variability score, ``1 - |p - 0.5|`` with ``p`` the share of cells in which
    the peak is open: highest for peaks open in half the cells, lowest for never/always."""
    p = np.asarray(n_cells_by_counts, dtype=np.float64) / n_cells
    return 1.0 - np.abs(p - 0.5)


def snapatac2_quantile(n_cells_by_counts: np.ndarray, n_features: int, lower: float = 0.005,
                       upper: float = 0.005, eligible: np.ndarray | None = None) -> np.ndarray:
    """SnapATAC2 ``pp.select_features``: drop peaks with no counts, rank the rest by
    accessibility, drop the ``int(lower * n)`` least and ``int(upper * n)`` most accessible
    (by rank, as SnapATAC2 does, so ties at the cut do not change how many go), keep the
    ``n_features`` most accessible of the rest. Ties are ranked by index."""
    cnt = np.asarray(n_cells_by_counts, dtype=np.float64)
    ok = cnt > 0 if eligible is None else (cnt > 0) & eligible
    idx = np.flatnonzero(ok)
    idx = idx[np.argsort(cnt[idx], kind="stable")]
    n = idx.size
    idx = idx[int(lower * n):n - int(upper * n)]
    keep = np.zeros(len(cnt), bool)
    keep[idx] = True
    return top_accessible(cnt, n_features, eligible=keep)

"""Cell and peak filters. They write boolean masks, never a filtered copy of the counts.

Masks: ``obs['pass_qc']`` (cells) and ``var['pass_qc']`` (peaks). Downstream steps read
them through :func:`scatac_dist.blocks.view`.
"""

from __future__ import annotations

import logging
import time

import dask
import numpy as np

from .. import ops
from ..blocks import per_cell, per_peak, view
from ..store import Atlas
from .qc import calculate_qc_metrics

logger = logging.getLogger("scatac_dist")

__all__ = ["filter_cells", "filter_peaks", "filter_scale", "filter_sccase", "cell_mask", "peak_mask"]


def cell_mask(atlas: Atlas, key: str = "pass_qc") -> np.ndarray:
    """The stored cell mask, or all True if none was written."""
    obs = atlas.obs
    return obs[key].to_numpy(bool) if key in obs else np.ones(atlas.n_obs, bool)


def peak_mask(atlas: Atlas, key: str = "pass_qc") -> np.ndarray:
    """The stored peak mask, or all True if none was written."""
    var = atlas.var
    return var[key].to_numpy(bool) if key in var else np.ones(atlas.n_vars, bool)


def _qc(atlas: Atlas, client) -> tuple:
    obs, var = atlas.obs, atlas.var
    if "total_counts" not in obs or "n_cells_by_counts" not in var:
        calculate_qc_metrics(atlas, client=client, progress=False)
        obs, var = atlas.obs, atlas.var
    return obs, var


def _bounds(x: np.ndarray, lo, hi) -> np.ndarray:
    keep = np.ones(len(x), bool)
    if lo is not None:
        keep &= x >= lo
    if hi is not None:
        keep &= x <= hi
    return keep


def filter_cells(atlas: Atlas, *, min_counts: float | None = None, max_counts: float | None = None,
                 min_peaks: int | None = None, max_peaks: int | None = None, client=None) -> dict:
    """Keep cells whose total counts and open peaks lie within the bounds (inclusive).

    Reads ``obs['total_counts']``, ``obs['n_peaks_by_counts']`` (computed if missing).
    Writes ``obs['pass_qc']`` (AND-ed with an existing mask) and ``uns/scatac_dist/filter_cells``.
    """
    t0 = time.perf_counter()
    obs, _ = _qc(atlas, client)
    keep = _bounds(obs["total_counts"].to_numpy(), min_counts, max_counts)
    keep &= _bounds(obs["n_peaks_by_counts"].to_numpy(), min_peaks, max_peaks)
    keep &= cell_mask(atlas)
    return _write_cells(atlas, keep, "filter_cells", dict(min_counts=min_counts, max_counts=max_counts,
                                                          min_peaks=min_peaks, max_peaks=max_peaks), t0)


def _write_cells(atlas, keep, stage, params, t0) -> dict:
    if not keep.any():
        raise ValueError(f"{stage}: no cell passes {params}; loosen the thresholds")
    with atlas.publishing(stage):
        atlas.write_obs({"pass_qc": keep})
        res = {"cells_kept": int(keep.sum()), "cells_removed": int((~keep).sum())}
        atlas.record(stage, params, {"total": time.perf_counter() - t0}, result=res)
    logger.info("%s: kept %d of %d cells", stage, res["cells_kept"], len(keep))
    return res


def _write_peaks(atlas, keep, stage, params, t0) -> dict:
    if not keep.any():
        raise ValueError(f"{stage}: no peak passes {params}; loosen the thresholds")
    with atlas.publishing(stage):
        atlas.write_var({"pass_qc": keep})
        res = {"peaks_kept": int(keep.sum()), "peaks_removed": int((~keep).sum())}
        atlas.record(stage, params, {"total": time.perf_counter() - t0}, result=res)
    logger.info("%s: kept %d of %d peaks", stage, res["peaks_kept"], len(keep))
    return res


def cells_with_at_least(atlas: Atlas, cells: np.ndarray, min_reads: int) -> np.ndarray:
    """Per peak, the number of kept cells with at least ``min_reads`` reads (one pass)."""
    X = view(atlas.X, cells=cells)
    return dask.compute(per_peak(X, ops.col_nnz_ge, min_reads=min_reads))[0]


def filter_peaks(atlas: Atlas, *, min_cells: int | None = None, max_cells: int | None = None,
                 min_cell_fraction: float | None = None, max_cell_fraction: float | None = None,
                 min_reads: int = 1, client=None) -> dict:
    """Keep peaks with at least ``min_reads`` reads in enough (and not too many) kept cells.

    Counts are taken over the cells that pass ``obs['pass_qc']``. Fractions are of those
    cells. Writes ``var['pass_qc']`` and ``uns/scatac_dist/filter_peaks``.
    """
    t0 = time.perf_counter()
    cells = cell_mask(atlas)
    n = int(cells.sum())
    hits = cells_with_at_least(atlas, cells, min_reads)
    lo = max(v for v in (min_cells, None if min_cell_fraction is None else np.ceil(min_cell_fraction * n), 0)
             if v is not None)
    hi_opts = [v for v in (max_cells, None if max_cell_fraction is None else np.floor(max_cell_fraction * n))
               if v is not None]
    keep = _bounds(hits, lo if lo > 0 else None, min(hi_opts) if hi_opts else None) & peak_mask(atlas)
    keep &= hits > 0
    return _write_peaks(atlas, keep, "filter_peaks", dict(
        min_cells=min_cells, max_cells=max_cells, min_cell_fraction=min_cell_fraction,
        max_cell_fraction=max_cell_fraction, min_reads=min_reads), t0)


def filter_sccase(atlas: Atlas, *, min_cell_fraction: float = 0.01, client=None) -> dict:
    """scCASE's rule: keep peaks accessible in at least 1% of cells."""
    return filter_peaks(atlas, min_cell_fraction=min_cell_fraction, client=client)


def filter_scale(atlas: Atlas, *, min_cells: int = 5, min_reads: int = 2, rare_ubiquitous: float | None = None,
                 client=None) -> dict:
    """The SCALE paper's preprocessing (Methods, "Preprocessing").

    1. Keep peaks with ``>= min_reads`` reads in ``>= min_cells`` cells (5 cells with 2 reads
       for the Leukemia set; the paper varies it per dataset).
    2. Keep cells whose read count is at least (number of kept peaks) / 50.
    3. Optionally (``rare_ubiquitous=X`` percent) remove rare peaks (reads > 2 in fewer than
       X% of cells) and ubiquitous peaks (reads >= 1 in at least (100 - X)% of cells).

    Writes ``var['pass_qc']``, ``obs['pass_qc']`` and the provenance of each step.
    """
    t0 = time.perf_counter()
    out = filter_peaks(atlas, min_cells=min_cells, min_reads=min_reads, client=client)
    n_peaks = out["peaks_kept"]
    peaks = np.flatnonzero(peak_mask(atlas))
    X = view(atlas.X, peaks=peaks)
    counts = dask.compute(per_cell(X, ops.row_counts))[0]
    keep = (counts >= n_peaks / 50) & cell_mask(atlas)
    res = {"peaks": out, "cells": _write_cells(atlas, keep, "filter_scale_cells",
                                                {"min_counts": n_peaks / 50}, t0)}
    if rare_ubiquitous:
        cells = cell_mask(atlas)
        n = int(cells.sum())
        rare = cells_with_at_least(atlas, cells, 3) < rare_ubiquitous / 100 * n
        ubiq = cells_with_at_least(atlas, cells, 1) >= (100 - rare_ubiquitous) / 100 * n
        keep_p = peak_mask(atlas) & ~rare & ~ubiq
        res["rare_ubiquitous"] = _write_peaks(atlas, keep_p, "filter_scale_rare_ubiquitous",
                                              {"percent": rare_ubiquitous}, t0)
    return res

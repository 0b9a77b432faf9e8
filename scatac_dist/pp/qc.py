"""Quality-control metrics per cell and per peak."""

from __future__ import annotations

import logging
import time

import dask
import numpy as np

from .. import ops
from ..blocks import per_cell, per_peak
from ..store import Atlas

logger = logging.getLogger("scatac_dist")

__all__ = ["calculate_qc_metrics"]


def calculate_qc_metrics(atlas: Atlas, *, client=None, progress: bool = True) -> dict:
    """Count reads and open peaks per cell, and cells and reads per peak.

    One pass over ``X`` on the current Dask cluster; every result is O(n_cells) or
    O(n_peaks), named as in ``scanpy.pp.calculate_qc_metrics``.

    Reads
    -----
    ``X``.

    Writes
    ------
    ``obs['total_counts']``, ``obs['n_peaks_by_counts']``, ``var['total_counts']``,
    ``var['n_cells_by_counts']``, and ``uns/scatac_dist/qc``.

    Returns
    -------
    dict
        Summary figures (medians, counts of empty cells and peaks).
    """
    from ..cluster import current_client
    from ..progress import as_completed_bar

    client = client or current_client()
    t0 = time.perf_counter()
    X = atlas.X
    graphs = [per_cell(X, ops.row_counts), per_cell(X, ops.row_nnz),
              per_peak(X, ops.col_counts), per_peak(X, ops.col_nnz)]
    futures = client.compute(dask.optimize(*graphs))
    for _ in as_completed_bar(futures, desc="qc", enabled=progress):  # draw the bar as parts finish
        pass
    cell_counts, cell_nnz, peak_counts, peak_nnz = client.gather(futures)
    t_compute = time.perf_counter() - t0
    with atlas.publishing("qc"):
        atlas.write_obs({"total_counts": cell_counts, "n_peaks_by_counts": cell_nnz})
        atlas.write_var({"total_counts": peak_counts, "n_cells_by_counts": peak_nnz})
        summary = {
            "n_cells": int(len(cell_counts)),
            "n_peaks": int(len(peak_counts)),
            "median_counts_per_cell": float(np.median(cell_counts)),
            "median_peaks_per_cell": float(np.median(cell_nnz)),
            "empty_cells": int((cell_nnz == 0).sum()),
            "empty_peaks": int((peak_nnz == 0).sum()),
        }
        atlas.record("qc", {}, {"compute": t_compute, "total": time.perf_counter() - t0}, result=summary)
    logger.info("qc: %s", summary)
    return summary

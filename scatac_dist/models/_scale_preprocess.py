"""SCALE's input: the cells and peaks it uses, the median open peaks per cell, and k.

Filters of the paper's Methods: peaks with >= ``min_reads`` reads in >= ``min_cells``
cells, then cells whose counts over the kept peaks reach kept peaks / 50; prior QC masks
(``obs/var['pass_qc']``) are respected. Nothing is written: the masks become
``obs/var['scale_used']`` with the other outputs (:mod:`._scale_outputs`).

Binarised input (many public matrices hold 0/1 values only): when no entry of the kept
cells reaches ``min_reads`` but some are non-zero, a read count cannot be told from an open
peak, and the peak rule becomes "open in >= ``min_cells`` cells" (``min_reads`` 1). The rule
is applied only then; the input's kind and the threshold used are returned with the masks.
"""

from __future__ import annotations

import dask
import numpy as np

from .. import ops
from ..blocks import per_cell, per_peak, view
from ..pp.filter import cell_mask, peak_mask
from ..store import Atlas
from ..train import StoreRows


def prepare(atlas: Atlas, *, preprocess: bool = True, min_reads: int = 2, min_cells: int = 5,
            median_open: bool = True) -> tuple[np.ndarray, np.ndarray, float | None, dict]:
    """The cells and peaks SCALE uses (boolean masks over the store), with ``median_open``
    the median open (kept) peaks per used cell (the total each cell's encoder input is scaled
    to with ``depth_norm`` and the decoder's reference depth with ``depth_offset``), and
    ``{"binary_input": bool, "min_reads_used": int}`` (see the module docstring).

    The peak filter's two counts come from one pass over the store; the cell filter's counts
    and the open peaks from a second.
    """
    cells, peaks = cell_mask(atlas), peak_mask(atlas)
    info = {"binary_input": False, "min_reads_used": int(min_reads)}
    if preprocess:
        X = view(atlas.X, cells=cells)
        hits, opened = dask.compute(per_peak(X, ops.col_nnz_ge, min_reads=min_reads), per_peak(X, ops.col_nnz))
        if min_reads > 1 and not hits.any() and opened.any():      # 0/1 values: binarised input
            info = {"binary_input": True, "min_reads_used": 1}
            hits = opened
        peaks = peaks & (hits >= min_cells) & (hits > 0)
        if not peaks.any():
            raise ValueError(f"no peak has >= {info['min_reads_used']} reads in >= {min_cells} cells; "
                             "lower min_reads/min_cells (--min-reads/--min-cells)")
    X = view(atlas.X, cells=cells, peaks=np.flatnonzero(peaks))
    passes = {}
    if preprocess:
        passes["counts"] = per_cell(X, ops.row_counts)
    if median_open:
        passes["open"] = per_cell(X, ops.row_nnz)
    got = {key: np.zeros(atlas.n_obs) for key in passes}
    for key, vals in zip(passes, dask.compute(*passes.values())):
        got[key][cells] = vals
    if preprocess:
        cells = cells & (got["counts"] >= peaks.sum() / 50) & (got["counts"] > 0)
        if not cells.any():
            raise ValueError("no cell passes SCALE's filter (counts >= kept peaks / 50)")
    median = float(np.median(got["open"][cells])) if "open" in got else None
    return cells, peaks, median, info


def estimate_k(atlas: Atlas, cells: np.ndarray, peaks: np.ndarray, seed: int = 0) -> int:
    """The Tracy-Widom estimate of k (:func:`scatac_dist.tl.estimate_k`) on the binarised used
    cells and peaks, at least 2."""
    from ..tl.estimate_k import estimate_k as tracy_widom

    X = view(atlas.X, cells=cells, peaks=np.flatnonzero(peaks), fn=ops.binarize)
    return max(int(tracy_widom(X, seed=seed)), 2)


def training_rows(atlas: Atlas, cells: np.ndarray, peaks: np.ndarray, world: int) -> StoreRows:
    """The used cells and peaks as the training stream reads them.

    The unit of sharding is the store's chunk, made smaller when there would be too few of
    them for every rank to get several (small stores, many ranks).
    """
    unit = int(min(atlas.chunk_rows, max(64, -(-atlas.n_obs // (8 * world)))))
    return StoreRows(atlas.path, mod=atlas.mod, cells=cells, peaks=np.flatnonzero(peaks), chunk_rows=unit)

"""TF-IDF as a lazy view over the kept cells and selected peaks.

:func:`tfidf` computes the per-peak IDF in one pass and stores it in ``var['idf']``; the
transformed matrix itself is never written: :func:`tfidf_view` rebuilds it block by block
from the counts, the masks and the IDF (GUIDE invariant 3).
"""

from __future__ import annotations

import time

import dask
import dask.array as da
import numpy as np

from .. import ops
from ..blocks import per_peak, view
from ..ops.tfidf import check_method, idf_from_counts, tfidf_block
from ..store import Atlas
from .filter import cell_mask

__all__ = ["tfidf", "tfidf_view", "selected_peaks", "binarized_view"]


def selected_peaks(atlas: Atlas) -> np.ndarray:
    """Indices of the peaks in ``var['selected']`` (else ``var['pass_qc']``, else all)."""
    var = atlas.var
    for key in ("selected", "pass_qc"):
        if key in var:
            return np.flatnonzero(var[key].to_numpy(bool))
    return np.arange(atlas.n_vars)


def binarized_view(atlas: Atlas) -> da.Array:
    """0/1 matrix of kept cells x selected peaks (lazy)."""
    return view(atlas.X, cells=cell_mask(atlas), peaks=selected_peaks(atlas), fn=ops.binarize)


def _binarized_tfidf(block, idf, method, scale_factor, binarize):
    if binarize:
        block = ops.binarize(block)
    return tfidf_block(block, idf, method, scale_factor)


def tfidf(atlas: Atlas, *, method: str = "signac1", binarize: bool = True, scale_factor: float = 1e4,
          client=None) -> da.Array:
    """Compute the IDF of the chosen method and return the lazy TF-IDF view.

    Reads ``X``, ``obs['pass_qc']``, ``var['selected']``. Writes ``var['idf']`` (0 outside
    the selection) and ``uns/scatac_dist/tfidf``. See :mod:`scatac_dist.ops.tfidf` for the
    methods and their sources.
    """
    check_method(method)
    t0 = time.perf_counter()
    cells, peaks = cell_mask(atlas), selected_peaks(atlas)
    kernel = ops.col_nnz if binarize else ops.col_counts
    totals = dask.compute(per_peak(view(atlas.X, cells=cells, peaks=peaks), kernel))[0]
    idf = idf_from_counts(totals, int(cells.sum()), method)
    full = np.zeros(atlas.n_vars)
    full[peaks] = idf
    with atlas.publishing("tfidf"):
        atlas.write_var({"idf": full})
        atlas.record("tfidf", dict(method=method, binarize=binarize, scale_factor=scale_factor),
                     {"total": time.perf_counter() - t0})
    return tfidf_view(atlas)


def tfidf_view(atlas: Atlas) -> da.Array:
    """The TF-IDF view recorded by :func:`tfidf` (kept cells x selected peaks, lazy)."""
    prov = atlas.provenance().get("tfidf")
    if prov is None or "idf" not in atlas.var:
        raise ValueError(f"{atlas.path} has no TF-IDF yet: run scatac_dist.pp.tfidf first")
    p = prov["params"]
    peaks = selected_peaks(atlas)
    idf = atlas.var["idf"].to_numpy()[peaks]
    return view(atlas.X, cells=cell_mask(atlas), peaks=peaks, fn=_binarized_tfidf, idf=idf,
                method=p["method"], scale_factor=p["scale_factor"], binarize=p["binarize"])

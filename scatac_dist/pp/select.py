"""Feature selection: which peaks the embedding uses. Writes ``var['selected']``."""

from __future__ import annotations

import logging
import time

import dask
import numpy as np

from .. import ops
from ..blocks import per_peak, view
from ..ops.select import episcanpy_variability, snapatac2_quantile, top_accessible
from ..store import Atlas
from .filter import cell_mask, peak_mask

logger = logging.getLogger("scatac_dist")

__all__ = ["select_features", "FLAVORS"]

FLAVORS = ("snapatac2", "top", "episcanpy")


def select_features(atlas: Atlas, *, n_features: int = 500_000, flavor: str = "snapatac2",
                    lower_quantile: float = 0.005, upper_quantile: float = 0.005, client=None) -> dict:
    """Choose the peaks for the embedding, among ``var['pass_qc']`` over ``obs['pass_qc']`` cells.

    Flavors
    -------
    ``snapatac2``
        SnapATAC2's ``pp.select_features``: drop peaks seen in no cell, trim the lowest and
        highest ``lower_quantile``/``upper_quantile`` of accessibility, keep the
        ``n_features`` most accessible (its default is 500,000, i.e. all on most atlases).
    ``top``
        The ``n_features`` peaks open in most cells (ArchR/Signac "top accessible").
    ``episcanpy``
        The ``n_features`` peaks with the highest episcanpy variability score
        (open in close to half the cells).

    Writes ``var['selected']``, ``var['n_cells_selected']`` (cells with the peak open, among
    kept cells) and ``uns/scatac_dist/select_features``.
    """
    if flavor not in FLAVORS:
        raise ValueError(f"unknown feature selection flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, not {n_features}")
    t0 = time.perf_counter()
    cells = cell_mask(atlas)
    eligible = peak_mask(atlas)
    counts = dask.compute(per_peak(view(atlas.X, cells=cells), ops.col_nnz))[0]
    if flavor == "snapatac2":
        sel = snapatac2_quantile(counts, n_features, lower_quantile, upper_quantile, eligible=eligible)
    elif flavor == "top":
        sel = top_accessible(counts, n_features, eligible=eligible & (counts > 0))
    else:
        score = episcanpy_variability(counts, int(cells.sum()))
        score[~(eligible & (counts > 0))] = -np.inf
        sel = top_accessible(score, n_features, eligible=np.isfinite(score))
    if not sel.any():
        raise ValueError("select_features: no peak selected; check the peak filter (var['pass_qc'])")
    with atlas.publishing("select_features"):
        atlas.write_var({"selected": sel, "n_cells_selected": counts})
        res = {"n_selected": int(sel.sum())}
        atlas.record("select_features", dict(n_features=n_features, flavor=flavor, lower_quantile=lower_quantile,
                                             upper_quantile=upper_quantile),
                     {"total": time.perf_counter() - t0}, result=res)
    logger.info("select_features (%s): %d peaks", flavor, res["n_selected"])
    return res

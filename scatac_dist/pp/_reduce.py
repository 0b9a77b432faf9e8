"""Reductions over a dask array of CSR row blocks.

Dask's own ``sum``/``mean`` do not work on scipy CSR chunks (GUIDE section 4), so each
reduction is a per-block kernel from :mod:`scatac_dist.ops` followed by a dense tree sum.
"""

from __future__ import annotations

from collections.abc import Callable

import dask.array as da
import numpy as np


def _row_of(block, kernel, kw):
    return kernel(block, **kw)[None, :]


def _col_of(block, kernel, kw):
    return kernel(block, **kw)


def per_cell(X: da.Array, kernel: Callable, dtype=np.int64, **kw) -> da.Array:
    """``kernel(block, **kw) -> (rows,)`` applied to every row block: a lazy (n_cells,) array."""
    return X.map_blocks(_col_of, kernel, kw, drop_axis=1, dtype=dtype, meta=np.empty(0, dtype))


def per_peak(X: da.Array, kernel: Callable, dtype=np.int64, split_every: int = 8, **kw) -> da.Array:
    """``kernel(block, **kw) -> (n_peaks,)`` summed over row blocks by a tree reduction."""
    parts = X.map_blocks(_row_of, kernel, kw, chunks=((1,) * X.numblocks[0], (X.shape[1],)),
                         dtype=dtype, meta=np.empty((0, 0), dtype))
    return parts.sum(axis=0, split_every=split_every)

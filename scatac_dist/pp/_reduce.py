"""Reductions over a dask array of CSR row blocks.

Dask's own ``sum``/``mean`` do not work on scipy CSR chunks (GUIDE section 4), so each
reduction is a per-block kernel from :mod:`scatac_dist.ops` followed by a dense tree sum.
"""

from __future__ import annotations

from collections.abc import Callable

import dask.array as da
import numpy as np


def _row_of(block, kernel):
    return kernel(block)[None, :]


def _col_of(block, kernel):
    return kernel(block)


def per_cell(X: da.Array, kernel: Callable, dtype=np.int64) -> da.Array:
    """``kernel(block) -> (rows,)`` applied to every row block: a lazy (n_cells,) array."""
    return X.map_blocks(_col_of, kernel, drop_axis=1, dtype=dtype, meta=np.empty(0, dtype))


def per_peak(X: da.Array, kernel: Callable, dtype=np.int64, split_every: int = 8) -> da.Array:
    """``kernel(block) -> (n_peaks,)`` summed over row blocks by a tree reduction."""
    parts = X.map_blocks(_row_of, kernel, chunks=((1,) * X.numblocks[0], (X.shape[1],)),
                         dtype=dtype, meta=np.empty((0, 0), dtype))
    return parts.sum(axis=0, split_every=split_every)

"""Lazy views of X: rows kept by a cell mask, columns by a peak selection, and a per-block
transform. Nothing is written; every pass re-reads the counts chunk by chunk.

Masks and per-peak vectors travel as single-chunk dask arrays (one graph key each), so
they are not copied into every task of the graph.
"""

from __future__ import annotations

from collections.abc import Callable

import dask.array as da
import numpy as np
import scipy.sparse as sp

from .share import small_array

__all__ = ["view"]


def _apply(block, keep, cols, fn, names, *values):
    b = block[np.asarray(keep, bool)] if keep is not None else block
    if cols is not None:
        b = b[:, cols]
    b = sp.csr_matrix(b)
    return fn(b, **dict(zip(names, values))) if fn is not None else b


def view(X: da.Array, *, cells: np.ndarray | None = None, peaks: np.ndarray | None = None,
         fn: Callable | None = None, dtype=np.float32, **arrays) -> da.Array:
    """``fn(X[cells][:, peaks] block, **arrays)`` on every row block, lazily.

    Parameters
    ----------
    X
        Dask array of CSR row blocks spanning all peaks.
    cells
        Boolean mask over rows (None: all).
    peaks
        Integer indices of the columns to keep, in order (None: all).
    fn
        Per-block transform returning a CSR block of the same shape (None: identity).
    arrays
        Extra keyword arguments for ``fn``; numpy arrays among them travel as one graph key.
    """
    row_chunks = X.chunks[0]
    if cells is not None:
        cells = np.asarray(cells, bool)
        if cells.shape != (X.shape[0],):
            raise ValueError(f"cell mask has length {cells.shape}, X has {X.shape[0]} rows")
        bounds = np.concatenate([[0], np.cumsum(row_chunks)])
        new_rows = tuple(int(cells[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:]))
        keep = da.from_array(cells, chunks=(row_chunks,), name=False)
    else:
        new_rows, keep = row_chunks, None
    n_cols = X.shape[1] if peaks is None else len(peaks)
    args = [X, "ij"]
    args += [keep, "i"] if keep is not None else [None, None]
    args += [small_array(np.asarray(peaks, np.int64)), None] if peaks is not None else [None, None]
    names = tuple(arrays)
    for v in arrays.values():
        args += [small_array(v) if isinstance(v, np.ndarray) else v, None]
    out = da.blockwise(
        _apply, "ij", *args[:6], fn, None, names, None, *args[6:],
        dtype=dtype, concatenate=True, adjust_chunks={"i": new_rows, "j": (n_cols,)},
        meta=sp.csr_matrix((0, 0), dtype=dtype),
    )
    return out

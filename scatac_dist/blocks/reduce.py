"""Reductions over a dask array of CSR row blocks, and fixed-shape tree reductions.

Dask's own ``sum``/``mean`` do not work on scipy CSR chunks (GUIDE section 4), so each
reduction is a per-block kernel from :mod:`scatac_dist.ops` followed by a dense tree sum.
The trees have a shape fixed by the number of parts, so results do not depend on the number
of workers or on which task finishes first.
"""

from __future__ import annotations

from collections.abc import Callable

import dask.array as da
import numpy as np

__all__ = ["per_cell", "per_peak", "tree_reduce", "tree_sum"]


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


def tree_reduce(parts: list, combine: Callable, split_every: int = 8, **kw):
    """Combine delayed values in a fixed tree: ``combine(list_of_values, **kw)`` on groups of
    ``split_every``, level by level, until one delayed value is left."""
    from dask import delayed

    while len(parts) > 1:
        parts = [delayed(combine)(parts[i:i + split_every], **kw) for i in range(0, len(parts), split_every)]
    return parts[0]


def _sum_list(xs):
    out = xs[0].copy()
    for x in xs[1:]:
        out += x
    return out


def tree_sum(parts: list, split_every: int = 8, part_bytes: int | None = None):
    """Sum delayed arrays in a fixed tree: the order of additions depends only on the number
    of parts (and ``part_bytes``), never on which worker finishes first.

    A task of the tree holds its inputs and its sum at once. With ``part_bytes`` (the size of
    one part) the fan-in is lowered so that this stays within ``scatac-dist.linalg.reduce-bytes``
    (at least 2 parts per task)."""
    if part_bytes:
        from dask.utils import parse_bytes

        from .._config import get

        budget = parse_bytes(get("linalg.reduce-bytes", "256MiB"))
        split_every = max(2, min(split_every, budget // max(int(part_bytes), 1) - 1))
    return tree_reduce(parts, _sum_list, split_every)

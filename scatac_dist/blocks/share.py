"""Small arrays that many tasks of a graph read, sent once instead of once per task, and the
budget for keeping transformed blocks on the workers."""

from __future__ import annotations

import dask.array as da
import numpy as np

__all__ = ["share", "small_array", "cache_fits"]


def share(a: np.ndarray):
    """``a`` as one object that many tasks refer to: a single key of the graph (never a copy
    per task).

    It is a literal task of the graph rather than scattered data: the scheduler holds its
    value, so when the worker that kept it dies, the tasks that need it get it again and the
    computation goes on (scattered data would be lost with that worker, and every task that
    refers to it cancelled)."""
    from dask import delayed

    return delayed(a, pure=False, traverse=False)


def small_array(a: np.ndarray) -> da.Array:
    """A one-chunk dask array of ``a``. Beyond 1 MB it is shared first (:func:`share`), so
    graphs carry a reference rather than the data."""
    a = np.asarray(a)
    if a.nbytes > 1_000_000:
        return da.from_delayed(share(a), shape=a.shape, dtype=a.dtype)
    return da.from_array(a, chunks=a.shape or (1,), name=False)


def cache_fits(nnz: int) -> bool:
    """Whether a float32 CSR view with ``nnz`` stored values fits the cache budget: per worker
    ``scatac-dist.linalg.cache-bytes-per-worker``, or a quarter of the worker's memory limit
    when that is less, times the number of workers."""
    from dask.utils import parse_bytes

    from .._config import get

    budget = parse_bytes(get("linalg.cache-bytes-per-worker", "2GiB"))
    try:
        from distributed import Client

        workers = Client.current().scheduler_info()["workers"].values()
        limits = [w.get("memory_limit") or 0 for w in workers]
        n_workers = max(len(limits), 1)
        if limits and min(limits) > 0:
            budget = min(budget, min(limits) // 4)
    except ValueError:
        n_workers = 1
    return nnz * 8 <= budget * n_workers

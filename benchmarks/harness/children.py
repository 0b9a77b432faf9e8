"""The child side of a measured run: a LocalCluster of worker processes, and the status of a
run that may fail (where a configuration stops is a result)."""

from __future__ import annotations

import traceback
from contextlib import contextmanager


@contextmanager
def local_cluster(n_workers: int, threads_per_worker: int, memory_limit: str = "auto"):
    """A LocalCluster of ``n_workers`` processes (dashboard on a free port) and its client."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                      dashboard_address=":0", memory_limit=memory_limit) as cluster, Client(cluster) as client:
        yield client


@contextmanager
def recorded(res: dict, traceback_chars: int = 2000):
    """``res["status"] = "ok"`` when the block finishes; on an exception, its type and message
    and (``traceback_chars`` > 0) the end of its traceback, and the run goes on."""
    try:
        yield res
        res["status"] = "ok"
    except Exception as exc:
        res["status"] = f"{type(exc).__name__}: {exc}"
        if traceback_chars:
            res["traceback"] = traceback.format_exc()[-traceback_chars:]

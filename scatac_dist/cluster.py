"""Get a Dask client: an embedded ``LocalCluster`` by default, or an existing scheduler.

Every distributed step in scatac-dist runs on the *current* client, so where work runs is
decided here and nowhere else (GUIDE invariant 4). Defaults come from the ``scatac-dist.cluster``
section of the Dask configuration (see ``scatac_dist.yaml``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import dask.config
from distributed import Client, LocalCluster, performance_report

from . import _config
from .errors import ClusterError

logger = logging.getLogger("scatac_dist")

__all__ = ["get_client", "current_client", "maybe_performance_report"]


def _default_n_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(int(cores or 1), 8))


def get_client(
    scheduler: str | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int | None = None,
    dashboard_address: str | None = None,
    timeout: str | float | None = None,
) -> Client:
    """Start an embedded ``LocalCluster`` or connect to a running scheduler.

    Parameters
    ----------
    scheduler
        Address of an existing scheduler (``tcp://HOST:PORT``). ``None`` starts a
        ``LocalCluster`` of worker *processes* on this machine.
    n_workers, threads_per_worker, memory_limit, dashboard_address
        Local cluster shape; ``None`` takes ``scatac-dist.cluster.*`` from the Dask config.
        ``memory_limit`` is per worker (``"4GiB"``, bytes, or ``"auto"``).
    timeout
        How long to wait for an existing scheduler (default ``scatac-dist.cluster.connect-timeout``).

    Returns
    -------
    distributed.Client
        The client, also set as Dask's default. Its dashboard link is logged.

    Raises
    ------
    ClusterError
        If the scheduler cannot be reached, with the address and what to check.
    """
    if scheduler:
        timeout = timeout or _config.get("cluster.connect-timeout")
        try:
            client = Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"Could not reach the Dask scheduler at {scheduler} within {timeout} ({exc}). "
                "Fix: check the address has the form tcp://HOST:PORT, that `dask scheduler` is "
                "running there and its port is open from this machine; or drop --scheduler to "
                "run on an embedded local cluster."
            ) from exc
    else:
        n_workers = n_workers or _config.get("cluster.n-workers") or _default_n_workers()
        threads = threads_per_worker or _config.get("cluster.threads-per-worker") or 1
        memory_limit = memory_limit or _config.get("cluster.memory-limit")
        dashboard = dashboard_address or _config.get("cluster.dashboard-address")
        # Keep workers' spill files out of the current directory.
        with dask.config.set({"temporary-directory": dask.config.get("temporary-directory")
                              or os.environ.get("TMPDIR", "/tmp")}):
            cluster = LocalCluster(
                n_workers=int(n_workers),
                threads_per_worker=int(threads),
                processes=True,
                memory_limit=memory_limit,
                dashboard_address=dashboard,
            )
        client = Client(cluster)
    logger.info("Dask client %s; dashboard: %s", client.scheduler.address, client.dashboard_link)
    return client


def current_client() -> Client:
    """The active Dask client (the one ``dask.compute`` would use), or a new embedded local
    cluster when there is none."""
    try:
        return Client.current()
    except ValueError:
        logger.info("No Dask client is active: starting an embedded LocalCluster")
        return get_client()


@contextmanager
def maybe_performance_report(filename: str | os.PathLike | None) -> Iterator[None]:
    """Write Dask's HTML performance report of the enclosed work to ``filename`` if given."""
    ctx = performance_report(filename=str(filename)) if filename else nullcontext()
    with ctx:
        yield

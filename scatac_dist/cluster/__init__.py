"""Get a Dask client: an embedded ``LocalCluster`` by default, worker jobs on SLURM or PBS,
worker pods on Kubernetes, or an existing scheduler (also the one ``DASK_SCHEDULER_ADDRESS``
names, as in a DaskJob's job pod).

Every distributed step in scatac-dist runs on the *current* client, so where work runs is
decided here and nowhere else (GUIDE invariant 4). Defaults come from the ``scatac-dist.cluster``
section of the Dask configuration (see ``scatac_dist.yaml``).

Modules: :mod:`.jobqueue` (SLURM/PBS worker jobs), :mod:`.kubernetes` (``--cluster k8s`` and
the manifests of deploy/k8s), :mod:`.manifests` (``scatac-dist deploy k8s``), :mod:`.security`
(TLS), :mod:`.monitor` (the run summary and per-stage reports).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from urllib.parse import urlparse

import dask.config
from distributed import Client, LocalCluster, performance_report

from .. import _config
from ..errors import ClusterError
from .jobqueue import KINDS, JobSpec, cancel_jobs, make_jobqueue_cluster, parse_adapt, wait_for_workers
from .security import needs_tls, tls_security

logger = logging.getLogger("scatac_dist")

__all__ = ["get_client", "current_client", "close_client", "maybe_performance_report", "dashboard_hint",
           "job_spec", "CLUSTER_TYPES"]

CLUSTER_TYPES = ("local", *KINDS, "k8s")


def _default_n_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(int(cores or 1), 8))


def get_client(
    scheduler: str | None = None,
    *,
    cluster: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int | None = None,
    processes: bool | None = None,
    dashboard_address: str | None = None,
    timeout: str | float | None = None,
    jobs: int | None = None,
    adapt: str | tuple[int, int] | None = None,
    tls: dict | None = None,
    wait: bool = True,
    **job_options,
) -> Client:
    """Start an embedded ``LocalCluster``, submit Dask workers as SLURM or PBS jobs, create
    worker pods on Kubernetes, or connect to a running scheduler.

    With no ``scheduler`` and no ``cluster`` given, a scheduler address in Dask's config
    (``scheduler-address``, e.g. from ``DASK_SCHEDULER_ADDRESS``, which the dask-kubernetes
    operator sets in a DaskJob's job pod) is connected to; else ``scatac-dist.cluster.type``
    decides.

    Parameters
    ----------
    scheduler
        Address of an existing scheduler (``tcp://HOST:PORT`` or ``tls://HOST:PORT``).
    cluster
        ``"local"`` (default, ``scatac-dist.cluster.type``), ``"slurm"``, ``"pbs"`` or ``"k8s"``.
    n_workers, threads_per_worker, memory_limit, dashboard_address
        Local cluster shape (``n_workers``: worker pods for k8s); ``None`` takes ``scatac-dist.cluster.*`` from the Dask config.
        ``memory_limit`` is per worker (``"4GiB"``, bytes, or ``"auto"``). The local cluster and
        every dashboard bind to 127.0.0.1 unless the address says otherwise.
    processes
        Local cluster: workers as processes (``True``, default ``scatac-dist.cluster.processes``)
        or as threads of this process (``False``: one process, no copies of the imports and no
        transfers between workers; the Python parts of tasks then share one GIL).
    timeout
        How long to wait for an existing scheduler (default ``scatac-dist.cluster.connect-timeout``).
    jobs, adapt
        SLURM/PBS: a fixed number of worker jobs, or adaptive scaling between ``"MIN:MAX"`` jobs
        (default: ``scatac-dist.cluster.jobqueue.jobs``).
    tls
        ``{"ca_file", "cert", "key"}`` paths for a TLS scheduler (else the config's).
    wait
        SLURM/PBS: wait for the first worker before returning (with progress lines).
    job_options
        SLURM/PBS: ``queue``, ``account``, ``walltime``, ``cores``, ``memory``, ``processes``,
        ``job_extra_directives``, ``job_script_prologue``, ``interface``, ``local_directory``,
        ``log_directory``: override ``scatac-dist.cluster.jobqueue.*``. Kubernetes: ``image``,
        ``namespace``, ``worker_cpu``, ``worker_memory``, ``pvc``, ``mount_path`` override
        ``scatac-dist.cluster.kubernetes.*``.

    Returns
    -------
    distributed.Client
        The client, also set as Dask's default. Close it with :func:`close_client`, which also
        cancels any worker job still queued.

    Raises
    ------
    ClusterError
        If the scheduler cannot be reached, a cluster type does not exist, the batch system's
        commands are missing, a partition does not exist, no worker job starts in time, or
        there is no Kubernetes configuration.
    """
    if scheduler is None and cluster is None and dask.config.get("scheduler-address", None):
        scheduler = dask.config.get("scheduler-address")
        logger.info("Connecting to the scheduler of Dask's config (DASK_SCHEDULER_ADDRESS): %s", scheduler)
    kind = (cluster or _config.get("cluster.type") or "local").lower()
    if kind not in CLUSTER_TYPES:
        raise ClusterError(f"cluster type {kind!r} does not exist. Fix: use one of {', '.join(CLUSTER_TYPES)} "
                           "(--cluster), or --scheduler ADDRESS for a running scheduler.")
    tls = tls or {}
    security = tls_security(tls.get("ca_file"), tls.get("cert"), tls.get("key"), required=needs_tls(scheduler))
    dashboard = dashboard_address or _config.get("cluster.dashboard-address")
    if scheduler:
        if kind != "local":
            raise ClusterError(f"--scheduler and --cluster {kind} both choose where workers run. Fix: give one.")
        return _connect(scheduler, security, timeout)
    k8s_options = {k: job_options.pop(k) for k in ("image", "namespace", "worker_cpu", "worker_memory", "pvc",
                                                     "mount_path") if k in job_options}
    if kind == "k8s":
        from .kubernetes import make_kube_cluster

        kube = make_kube_cluster(n_workers=n_workers, adapt=parse_adapt(adapt), **k8s_options)
        try:
            client = Client(kube)
        except BaseException:
            kube.close()
            raise
        logger.info("Dask client %s; dashboard: %s", client.scheduler.address, client.dashboard_link)
        return client
    if kind in KINDS:
        spec = JobSpec(kind, **job_options)
        lo_hi = parse_adapt(adapt)
        cl = make_jobqueue_cluster(spec, adapt=lo_hi, security=security, dashboard_address=dashboard)
        cl.scatac_spec = spec
        client = Client(cl, security=security)
        try:
            n_jobs = int(jobs or _config.get("cluster.jobqueue.jobs") or 1)
            if lo_hi:
                cl.adapt(minimum_jobs=lo_hi[0], maximum_jobs=lo_hi[1])
                logger.info("%s: adaptive, %d to %d worker jobs (%s)", spec.label, lo_hi[0], lo_hi[1], spec.name)
            else:
                cl.scale(jobs=n_jobs)
                logger.info("%s: %d worker jobs submitted (%s)", spec.label, n_jobs, spec.name)
            if wait:
                wait_for_workers(client, spec, 1)
        except BaseException:
            close_client(client)
            raise
        logger.info("Dask client %s; dashboard: %s", client.scheduler.address, client.dashboard_link)
        return client
    n_workers = n_workers or _config.get("cluster.n-workers") or _default_n_workers()
    threads = threads_per_worker or _config.get("cluster.threads-per-worker") or 1
    memory_limit = memory_limit or _config.get("cluster.memory-limit")
    if processes is None:
        processes = bool(_config.get("cluster.processes", True))
    # Keep workers' spill files out of the current directory.
    with dask.config.set({"temporary-directory": dask.config.get("temporary-directory")
                          or os.environ.get("TMPDIR", "/tmp")}):
        local = LocalCluster(
            n_workers=int(n_workers),
            threads_per_worker=int(threads),
            processes=bool(processes),
            memory_limit=memory_limit,
            dashboard_address=dashboard,
            # threads talk in-process (inproc://), which has no host; processes over TCP
            **({"host": _config.get("cluster.host") or "127.0.0.1"} if processes else {}),
        )
    client = Client(local)
    logger.info("Dask client %s; dashboard: %s", client.scheduler.address, client.dashboard_link)
    return client


def _connect(address: str, security, timeout) -> Client:
    timeout = timeout or _config.get("cluster.connect-timeout")
    try:
        client = Client(address, timeout=timeout, security=security)
    except (OSError, TimeoutError) as exc:
        hint = ""
        if security is not None:
            hint = (" The TLS handshake may have been refused: the certificate must be signed by the CA the "
                    "scheduler trusts (--tls-ca-file/--tls-cert).")
        raise ClusterError(
            f"Could not reach the Dask scheduler at {address} within {timeout} ({exc}).{hint} "
            "Fix: check the address has the form tcp://HOST:PORT (tls://HOST:PORT for a TLS scheduler), that "
            "`dask scheduler` is running there and its port is open from this machine; or drop --scheduler "
            "to run on an embedded local cluster."
        ) from exc
    logger.info("Dask client %s; dashboard: %s", client.scheduler.address, client.dashboard_link)
    return client


def job_spec(client: Client) -> JobSpec | None:
    """The worker jobs' settings when ``client`` runs on SLURM/PBS workers, else ``None``."""
    return getattr(getattr(client, "cluster", None), "scatac_spec", None)


def close_client(client: Client) -> None:
    """Close ``client`` and the cluster it started; for SLURM/PBS, cancel every worker job of the
    run still in the queue (also when the cluster itself failed to close them)."""
    cl = getattr(client, "cluster", None)
    spec = job_spec(client)
    try:
        client.close()
    finally:
        try:
            if cl is not None:
                cl.close()
        finally:
            if spec is not None:
                cancel_jobs(spec)


def dashboard_hint(client: Client) -> str:
    """The dashboard link, and the ``ssh -L`` line that reaches it from a laptop when the
    scheduler runs on a cluster node (a login node, or a compute node inside a batch job), or
    the ``kubectl port-forward`` line when it is a Kubernetes Service seen from a pod."""
    link = client.dashboard_link
    if not link:
        return "dashboard: off"
    url = urlparse(link)
    port = url.port or 8787
    path = url.path or "/status"
    bind = urlparse("//" + str(_config.get("cluster.dashboard-address") or "")).hostname
    if getattr(client, "cluster", None) is not None and bind in ("127.0.0.1", "localhost"):
        # a scheduler in this process serves its dashboard on loopback (the link names its
        # network address, which the dashboard does not listen on)
        link, target = f"http://127.0.0.1:{port}{path}", "127.0.0.1"
    else:
        target = url.hostname
    service = _k8s_service(urlparse(client.scheduler.address).hostname or "")
    if service and os.environ.get("KUBERNETES_SERVICE_HOST"):
        # a pod (a DaskJob's job pod): the scheduler is a Service, reached with kubectl
        svc, namespace = service
        return (f"dashboard: {link}\n  from a laptop: kubectl port-forward -n {namespace} svc/{svc} {port}:{port}  "
                f"then open http://localhost:{port}{path}")
    in_job = os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID")
    login = os.environ.get("SLURM_SUBMIT_HOST") or os.environ.get("PBS_O_HOST")
    remote = in_job or job_spec(client) is not None or target not in ("127.0.0.1", "localhost", "::1")
    if not remote:
        return f"dashboard: {link}"
    host = socket.gethostname() if target in ("127.0.0.1", "localhost") else target
    jump = f" -J {login}" if in_job and login else ""
    return (f"dashboard: {link}\n  from a laptop: ssh -N -L {port}:{target}:{port}{jump} {host}  then open "
            f"http://localhost:{port}{path}")


def _k8s_service(host: str) -> tuple[str, str] | None:
    """(service, namespace) of a Kubernetes Service's DNS name (NAME.NAMESPACE.svc[.cluster.local])."""
    parts = host.split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        return parts[0], parts[1]
    return None


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

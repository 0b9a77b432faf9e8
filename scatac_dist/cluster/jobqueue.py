"""Dask workers as batch jobs: SLURM and PBS clusters through dask-jobqueue.

The scheduler runs in the calling process (on the login node, or inside the client's own batch
job); each worker job runs ``python -m distributed.cli.dask_worker`` on a compute node and
connects back. Settings come from ``scatac-dist.cluster.jobqueue`` of the Dask config; a value
left ``null`` there falls back to dask-jobqueue's own ``jobqueue.slurm.*`` / ``jobqueue.pbs.*``
config, so a site's existing ``jobqueue.yaml`` keeps working.

Every job of one run carries the same job name (``scatacw-<id>``), so that the queue can be
asked about them (:func:`job_states`) and none can be left behind: :func:`cancel_jobs` removes
whatever is still queued or running under that name when the run ends.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from typing import Any

from .. import _config
from ..errors import ClusterError

logger = logging.getLogger("scatac_dist")

__all__ = ["KINDS", "JobSpec", "make_jobqueue_cluster", "job_script", "job_states", "cancel_jobs", "wait_for_workers",
           "parse_adapt", "parse_walltime", "ended_jobs_reason"]

# kind -> (dask-jobqueue class, submit, status, cancel command, the scheduler's name)
KINDS = {
    "slurm": ("SLURMCluster", "sbatch", "squeue", "scancel", "SLURM"),
    "pbs": ("PBSCluster", "qsub", "qstat", "qdel", "PBS"),
}

_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d{1,3}):([0-5]?\d):([0-5]?\d)$")


def parse_walltime(text: str) -> float:
    """Seconds in a batch walltime: ``HH:MM:SS`` or ``D-HH:MM:SS`` (SLURM reads a bare ``A:B``
    as minutes:seconds and PBS as hours:minutes, so it is refused as ambiguous).

    Raises
    ------
    ClusterError
        For any other form, with the accepted forms.
    """
    m = _WALLTIME.match(str(text).strip())
    if not m:
        raise ClusterError(
            f"walltime {text!r} is not a batch time limit. Fix: give HH:MM:SS (e.g. 02:00:00) or "
            "D-HH:MM:SS (e.g. 1-00:00:00) to --walltime or scatac-dist.cluster.jobqueue.walltime.")
    days, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return float(((days * 24 + h) * 60 + mi) * 60 + s)


def parse_adapt(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"MIN:MAX"`` (jobs) as a pair, or ``None``.

    Raises
    ------
    ClusterError
        Unless ``0 <= MIN <= MAX`` and ``MAX >= 1``.
    """
    if text is None or isinstance(text, tuple):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    lo, hi = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    if lo is None or lo > hi or hi < 1:
        raise ClusterError(f"--adapt {text!r} is not MIN:MAX with 0 <= MIN <= MAX and MAX >= 1 (jobs). "
                           "Fix: e.g. --adapt 1:32 (grow to 32 worker jobs, shrink to 1 when idle).")
    return lo, hi


class JobSpec:
    """The settings of one run's worker jobs, from the config with the caller's overrides."""

    def __init__(self, kind: str, **overrides: Any):
        if kind not in KINDS:
            raise ClusterError(f"cluster type {kind!r} does not exist. Fix: use one of local, "
                               f"{', '.join(KINDS)} (--cluster) or --scheduler ADDRESS for a running scheduler.")
        self.kind = kind
        conf = dict(_config.get("cluster.jobqueue") or {})
        conf.update({k.replace("_", "-"): v for k, v in overrides.items() if v is not None})
        self.conf = conf
        self.name = f"scatacw-{uuid.uuid4().hex[:7]}"  # 15 characters: Torque cuts job names there

    def get(self, key: str, default: Any = None) -> Any:
        value = self.conf.get(key)
        return default if value is None else value

    @property
    def label(self) -> str:
        return KINDS[self.kind][4]

    def check_commands(self) -> None:
        """The batch system's commands must be on PATH (a login node)."""
        _, submit, status, cancel, label = KINDS[self.kind]
        missing = [c for c in (submit, status, cancel) if shutil.which(c) is None]
        if missing:
            raise ClusterError(
                f"--cluster {self.kind}: {', '.join(missing)} not found on PATH, so no {label} job can be "
                f"submitted from here. Fix: run scatac-dist on a {label} login node (or inside a job) where "
                f"`{submit}` works, load the module that provides it (e.g. `module load {self.kind}`), or "
                "use --cluster local / --scheduler ADDRESS.")

    def check_queue(self) -> None:
        """A named SLURM partition must exist (``sinfo``); PBS queues are checked by ``qsub``."""
        queue = self.get("queue")
        if self.kind != "slurm" or not queue:
            return
        known = _run(["sinfo", "-h", "-o", "%P"]).split()
        known = [p.rstrip("*") for p in known]
        if known and queue not in known:
            raise ClusterError(
                f"SLURM partition {queue!r} does not exist (sinfo lists: {', '.join(sorted(set(known)))}). "
                "Fix: pass one of those to --queue (or scatac-dist.cluster.jobqueue.queue), or leave it "
                "out to use the default partition.")

    def cluster_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the dask-jobqueue cluster class."""
        cores = int(self.get("cores", 1))
        processes = int(self.get("processes", cores))  # one thread per worker process by default
        if processes < 1 or cores < processes:
            raise ClusterError(f"a job of {cores} cores cannot hold {processes} worker processes. Fix: "
                               "set --job-cores >= scatac-dist.cluster.jobqueue.processes.")
        kw: dict[str, Any] = {
            "cores": cores,
            "processes": processes,
            "memory": str(self.get("memory", "4GiB")),
            "job_name": self.name,
            "python": self.get("python", sys.executable),
        }
        walltime = self.get("walltime")
        if walltime:
            parse_walltime(walltime)
            kw["walltime"] = str(walltime)
        for key, arg in (("queue", "queue"), ("account", "account"), ("interface", "interface"),
                         ("local-directory", "local_directory"), ("log-directory", "log_directory")):
            if self.get(key):
                kw[arg] = self.get(key)
        extra = list(self.get("job-extra-directives", []))
        prologue = list(self.get("job-script-prologue", []))
        if extra:
            kw["job_extra_directives"] = extra
        if prologue:
            kw["job_script_prologue"] = prologue
        return kw


def _run(cmd: list[str], timeout: float = 30) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.debug("%s failed: %s", shlex.join(cmd), exc)
        return ""
    return out.stdout


def _import_dask_jobqueue():
    """``import dask_jobqueue``, keeping this process's Ctrl-C handler: its ``runner`` module
    replaces SIGINT's handler with ``sys.exit()`` on import, which would end an interrupted
    run with exit status 0, as if it had finished."""
    import signal
    import threading

    before = signal.getsignal(signal.SIGINT)
    import dask_jobqueue

    if threading.current_thread() is threading.main_thread() and before is not None:
        signal.signal(signal.SIGINT, before)
    return dask_jobqueue


def make_jobqueue_cluster(spec: JobSpec, *, adapt: tuple[int, int] | None, security=None,
                          dashboard_address: str | None = None, check: bool = True):
    """Build the dask-jobqueue cluster of ``spec`` (no job submitted yet).

    With ``adapt`` and a walltime, workers retire a few minutes before their job's walltime
    (``--lifetime``, staggered), handing their data to others, and adaptive scaling submits new
    jobs in their place, so that a run may outlast any one job. ``check=False`` skips the checks
    that need the batch system (its commands, the partition), to show a job script anywhere.
    """
    import dask.config

    dask_jobqueue = _import_dask_jobqueue()
    if check:
        spec.check_commands()
        spec.check_queue()
    kw = spec.cluster_kwargs()
    walltime = kw.get("walltime")
    if adapt and walltime:
        seconds = parse_walltime(walltime)
        if seconds > 600:
            kw["worker_extra_args"] = ["--lifetime", f"{int(seconds - 300)}s", "--lifetime-stagger", "120s"]
    scheduler_options: dict[str, Any] = {"dashboard_address": dashboard_address or
                                         _config.get("cluster.dashboard-address")}
    if spec.get("scheduler-host"):
        scheduler_options["host"] = spec.get("scheduler-host")
    cls = getattr(dask_jobqueue, KINDS[spec.kind][0])
    # Tasks left without any worker (every job ended) fail after this long instead of waiting
    # forever; the run's error then says why the jobs ended (ended_jobs_reason).
    with dask.config.set({"distributed.scheduler.no-workers-timeout":
                          _config.get("cluster.jobqueue.no-workers-timeout")}):
        try:
            cluster = cls(security=security, scheduler_options=scheduler_options, **kw)
        except (ValueError, TypeError) as exc:
            raise ClusterError(f"--cluster {spec.kind}: {exc}. Fix: check the "
                               "scatac-dist.cluster.jobqueue settings and the --job-* options.") from exc
    return cluster


def job_script(spec: JobSpec, *, adapt: tuple[int, int] | None = None, security=None) -> str:
    """The batch script each worker job of ``spec`` is submitted with; nothing is submitted
    (``scatac-dist --cluster slurm|pbs job-script`` prints it)."""
    cluster = make_jobqueue_cluster(spec, adapt=adapt, security=security, dashboard_address="127.0.0.1:0",
                                    check=False)
    try:
        return cluster.job_script()
    finally:
        cluster.close()


def job_states(spec: JobSpec) -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` of this run's jobs still known to the batch system
    (SLURM: ``squeue`` by job name, then ``scontrol`` for ended ones; PBS: ``qstat``)."""
    states: dict[str, tuple[str, str]] = {}
    if spec.kind == "slurm":
        for line in _run(["squeue", "-h", "-n", spec.name, "-o", "%i|%T|%r"]).splitlines():
            jid, state, reason = (line.split("|") + ["", ""])[:3]
            states[jid.strip()] = (state.strip(), reason.strip())
        for rec in _run(["scontrol", "-o", "show", "job"]).splitlines():
            fields = dict(f.split("=", 1) for f in rec.split() if "=" in f)
            if fields.get("JobName") == spec.name and fields.get("JobId") not in states:
                states[fields["JobId"]] = (fields.get("JobState", "?"), fields.get("Reason", ""))
    else:
        for line in _run(["qstat", "-f"]).split("\n\n"):
            if f"Job_Name = {spec.name[:15]}" in line:
                jid = line.split()[2] if len(line.split()) > 2 else "?"
                m = re.search(r"job_state = (\w)", line)
                states[jid] = (m.group(1) if m else "?", "")
    return states


def _describe(states: dict[str, tuple[str, str]]) -> str:
    if not states:
        return "no job of this run is in the queue"
    return ", ".join(f"job {jid} {state}" + (f" ({reason})" if reason and reason != "None" else "")
                     for jid, (state, reason) in sorted(states.items()))


def wait_for_workers(client, spec: JobSpec, n: int = 1, timeout: float | None = None) -> None:
    """Wait until ``n`` workers have joined, with a progress line every 15 s.

    Raises
    ------
    ClusterError
        After ``timeout`` seconds (``scatac-dist.cluster.jobqueue.worker-timeout``), naming the
        partition, the queue's state of the pending jobs and what to change.
    """
    from dask.utils import parse_timedelta

    timeout = parse_timedelta(timeout if timeout is not None else _config.get("cluster.jobqueue.worker-timeout"))
    start = time.monotonic()
    label = spec.label
    logger.info("waiting for %s worker jobs (%s) to start ...", label, spec.name)
    while True:
        have = len(client.scheduler_info(n_workers=-1)["workers"])
        if have >= n:
            logger.info("%d worker(s) joined after %.0f s", have, time.monotonic() - start)
            return
        waited = time.monotonic() - start
        if waited >= timeout:
            states = job_states(spec)
            queue = spec.get("queue") or "the default partition"
            raise ClusterError(
                f"no {label} worker job started within {timeout:.0f} s on {queue}: {_describe(states)}. "
                f"Fix: check the queue with `{KINDS[spec.kind][2]}` (a job held for Resources or Priority "
                "waits for free nodes), ask for less per job (--job-cores, --job-memory, --walltime), choose "
                "another --queue, or wait longer (scatac-dist.cluster.jobqueue.worker-timeout).")
        try:
            client.wait_for_workers(n, timeout=min(15.0, max(1.0, timeout - waited)))
        except TimeoutError:
            logger.info("still waiting for %s workers after %.0f s: %s", label, time.monotonic() - start,
                        _describe(job_states(spec)))


def ended_jobs_reason(spec: JobSpec) -> str | None:
    """Why this run's worker jobs ended, when it was the batch system's doing (walltime,
    pre-emption, cancellation, node failure), as one sentence; ``None`` if no job ended so."""
    ended = {jid: s for jid, s in job_states(spec).items()
             if s[0] in {"TIMEOUT", "PREEMPTED", "CANCELLED", "NODE_FAIL", "FAILED", "OUT_OF_MEMORY", "DEADLINE"}}
    if not ended:
        return None
    kinds = sorted({s[0] for s in ended.values()})
    walltime = spec.get("walltime")
    if "TIMEOUT" in kinds:
        return (f"{spec.label} ended the worker jobs at their walltime ({walltime}; {_describe(ended)}) before the "
                "run finished. Fix: raise --walltime, or use --adapt MIN:MAX so that new jobs replace the "
                "ones that end (workers then retire before their walltime and hand their data over).")
    return (f"{spec.label} ended the worker jobs ({_describe(ended)}). Fix: see the job logs "
            f"({spec.get('log-directory') or 'the submit directory'}); resubmit, with --adapt MIN:MAX so that "
            "new jobs replace lost ones.")


def cancel_jobs(spec: JobSpec) -> list[str]:
    """Cancel every job of this run still queued or running (by its job name); the IDs cancelled."""
    left = [jid for jid, (state, _) in job_states(spec).items()
            if state in {"PENDING", "RUNNING", "CONFIGURING", "SUSPENDED", "Q", "R", "H"}]
    if left:
        _run([KINDS[spec.kind][3], *left])
        logger.info("cancelled %s job(s) left in the queue: %s", spec.label, " ".join(left))
    return left

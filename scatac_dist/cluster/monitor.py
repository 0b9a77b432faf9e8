"""What a run did, for a run nobody watched live: per-stage wall time, tasks, peak memory per
worker, bytes spilled and transferred, workers joined and lost.

:class:`RunMonitor` is a scheduler plugin: it counts finished tasks, samples every worker's
process memory from the scheduler's worker metrics (refreshed by the workers' heartbeats) and
reads the scheduler's cumulative worker metrics (spill and transfer bytes). :class:`RunLog` is
its client side: ``with run_log.stage("lsi"): ...`` marks a stage's start and end, optionally
around a Dask performance report of the stage, and :meth:`RunLog.summary` returns the record
the CLI writes into the store (``uns/scatac_dist/run_<id>``) and beside it as Markdown.

Library code marks its stages with :func:`stage`, which does nothing unless a run log is active.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

logger = logging.getLogger("scatac_dist")

__all__ = ["RunMonitor", "RunLog", "stage", "active_run_log", "set_active", "summary_markdown"]

_HANDLER = "scatac_dist_monitor"


class RunMonitor(SchedulerPlugin):
    """Scheduler-side counters of one run, read and reset at each stage boundary."""

    name = "scatac-dist-run-monitor"

    def __init__(self, interval: float = 0.25):
        self.interval = interval

    async def start(self, scheduler) -> None:
        from tornado.ioloop import PeriodicCallback

        self.scheduler = scheduler
        scheduler.handlers[_HANDLER] = self.mark
        self._reset()
        self._pc = PeriodicCallback(self._sample, self.interval * 1000)
        self._pc.start()

    async def close(self) -> None:
        pc = getattr(self, "_pc", None)
        if pc is not None:
            pc.stop()

    def _cumulative(self) -> tuple[float, float]:
        spilled = transferred = 0.0
        for k, v in getattr(self.scheduler, "cumulative_worker_metrics", {}).items():
            if not (isinstance(k, tuple) and k and k[-1] == "bytes"):
                continue
            if k[-2] == "disk-write":
                spilled += v
            elif k[0] == "get-data":
                transferred += v
        return spilled, transferred

    def _reset(self) -> None:
        self.tasks = 0
        self.erred = 0
        self.joined: list[str] = []
        self.lost: list[str] = []
        self.peak: dict[str, int] = {}
        self.base = self._cumulative()
        self._sample()

    def _sample(self) -> None:
        for ws in self.scheduler.workers.values():
            name = str(ws.name)
            self.peak[name] = max(self.peak.get(name, 0), int(ws.memory.process))

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if finish == "memory" and start == "processing":
            self.tasks += 1
        elif finish == "erred":
            self.erred += 1

    def add_worker(self, scheduler=None, worker=None) -> None:
        ws = self.scheduler.workers.get(worker)
        self.joined.append(str(ws.name) if ws is not None else str(worker))

    def remove_worker(self, scheduler=None, worker=None, **kwargs) -> None:
        ws = self.scheduler.workers.get(worker)
        self.lost.append(str(ws.name) if ws is not None else str(worker))

    def mark(self, comm=None) -> dict[str, Any]:
        """The counters since the last mark, then reset them (the RPC handler)."""
        self._sample()
        spilled, transferred = self._cumulative()
        out = {
            "tasks": self.tasks, "tasks_erred": self.erred,
            "peak_memory_per_worker": dict(self.peak),
            "bytes_spilled": int(spilled - self.base[0]),
            "bytes_transferred": int(transferred - self.base[1]),
            "workers_joined": list(self.joined), "workers_lost": list(self.lost),
            "workers": len(self.scheduler.workers),
        }
        self._reset()
        return out


async def _heartbeat(dask_worker) -> None:
    await dask_worker.heartbeat()


class RunLog:
    """The client side of a run's monitoring.

    Parameters
    ----------
    client
        The run's client; :class:`RunMonitor` is registered on its scheduler.
    report_dir
        Write one Dask performance report per stage into this folder (``NN-<stage>.html``).
    command
        The command line, for the summary.
    """

    def __init__(self, client, *, report_dir: str | os.PathLike | None = None, command: str | None = None):
        self.client = client
        self.id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:4]
        self.command = command or " ".join(sys.argv)
        self.report_dir = Path(report_dir) if report_dir else None
        self.started = time.time()
        self.stages: list[dict[str, Any]] = []
        self._open = False
        self.available = True
        try:
            client.register_plugin(RunMonitor(), name=RunMonitor.name)
        except Exception as exc:  # a scheduler without scatac-dist installed
            self.available = False
            logger.warning("run summary without scheduler metrics: the plugin could not be registered on the "
                           "scheduler (%s: %s); install scatac-dist where the scheduler runs", type(exc).__name__, exc)
        self._mark()  # the counters start now

    def _mark(self) -> dict[str, Any]:
        if not self.available:
            return {}
        try:
            # the byte counters reach the scheduler with the workers' heartbeats: send one now,
            # so that a stage's spill and transfer are counted in that stage, not the next
            self.client.run(_heartbeat)
        except Exception as exc:
            logger.debug("run monitor heartbeat failed: %s", exc)
        try:
            return self.client.sync(getattr(self.client.scheduler, _HANDLER))
        except Exception as exc:  # the scheduler went away: the summary says what it has
            logger.debug("run monitor mark failed: %s", exc)
            return {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Measure the enclosed work as stage ``name`` (nested stages belong to the outer one)."""
        if self._open:
            yield
            return
        self.begin(name)
        status = "failed"
        try:
            yield
            status = "done"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            self.end(status)

    def begin(self, name: str) -> bool:
        """Open stage ``name``; ``False`` (and nothing done) when a stage is already open."""
        if self._open:
            return False
        self._open = name
        self._mark()
        self._t0 = time.time()
        self._report = None
        if self.report_dir is not None:
            from distributed import performance_report

            self.report_dir.mkdir(parents=True, exist_ok=True)
            self._report = performance_report(filename=str(self.report_dir / f"{len(self.stages) + 1:02d}-{name}.html"))
            self._report.__enter__()
        return True

    def end(self, status: str = "done") -> None:
        """Close the open stage with ``status`` (done, failed, interrupted) and record it."""
        if not self._open:
            return
        name, self._open = self._open, False
        if self._report is not None:
            try:
                self._report.__exit__(None, None, None)
            except Exception as exc:  # the scheduler is gone: the report is lost, the summary is not
                logger.warning("performance report of stage %s not written: %s", name, exc)
        self.stages.append({"stage": name, "status": status, "wall_s": round(time.time() - self._t0, 3),
                            "client_max_rss": _max_rss(), **self._mark()})

    def summary(self, **extra: Any) -> dict[str, Any]:
        """The run's record: identity, cluster, and one entry per stage (see module doc)."""
        info = {}
        with contextlib.suppress(Exception):
            info = self.client.scheduler_info(n_workers=-1)
        workers = info.get("workers", {}) if isinstance(info, dict) else {}
        peaks = [max(s.get("peak_memory_per_worker", {}).values(), default=0) for s in self.stages]
        return {
            "run_id": self.id, "command": self.command, "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "wall_s": round(time.time() - self.started, 3),
            "scheduler": getattr(self.client.scheduler, "address", None),
            "dashboard": self.client.dashboard_link,
            "workers_at_end": len(workers),
            "memory_limit_per_worker": max((w.get("memory_limit") or 0 for w in workers.values()), default=0),
            "stages": self.stages,
            "totals": {
                "tasks": sum(s.get("tasks", 0) for s in self.stages),
                "peak_memory_worker": max(peaks, default=0),
                "bytes_spilled": sum(s.get("bytes_spilled", 0) for s in self.stages),
                "bytes_transferred": sum(s.get("bytes_transferred", 0) for s in self.stages),
                "workers_lost": sum(len(s.get("workers_lost", [])) for s in self.stages),
            },
            **extra,
        }


def _max_rss() -> int:
    """The client process's peak resident memory so far (bytes)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 1024:,.0f} KiB"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The run summary as a Markdown report (the file written beside the store)."""
    lines = [f"# scatac-dist run {summary['run_id']}", "",
             f"- command: `{summary['command']}`",
             f"- host: {summary['host']}, started {summary['started']}, wall time {summary['wall_s']:.1f} s",
             f"- scheduler: {summary.get('scheduler')}, dashboard: {summary.get('dashboard')}",
             f"- workers at the end: {summary['workers_at_end']}"
             + (f", memory limit {_mb(summary['memory_limit_per_worker'])} each"
                if summary.get("memory_limit_per_worker") else ""),
             f"- status: {summary.get('status', '?')}", "",
             "| stage | status | wall s | tasks | peak memory, largest worker | spilled | transferred "
             "| workers joined | workers lost | client peak RSS so far |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary["stages"]:
        peak = max(s.get("peak_memory_per_worker", {}).values(), default=0)
        lines.append(f"| {s['stage']} | {s['status']} | {s['wall_s']:.1f} | {s.get('tasks', '-')} | {_mb(peak)} | "
                     f"{_mb(s.get('bytes_spilled', 0))} | {_mb(s.get('bytes_transferred', 0))} | "
                     f"{len(s.get('workers_joined', []))} | {len(s.get('workers_lost', []))} | "
                     f"{_mb(s.get('client_max_rss', 0))} |")
    t = summary["totals"]
    lines += ["", f"Totals: {t['tasks']} tasks, largest worker peak {_mb(t['peak_memory_worker'])}, "
              f"{_mb(t['bytes_spilled'])} spilled, {_mb(t['bytes_transferred'])} transferred, "
              f"{t['workers_lost']} workers lost.", "",
              "Peak memory is the workers' process memory as their heartbeats report it (about once a "
              "second): a spike shorter than that can be missed.", ""]
    per_worker = {}
    for s in summary["stages"]:
        for w, b in s.get("peak_memory_per_worker", {}).items():
            per_worker[w] = max(per_worker.get(w, 0), b)
    if per_worker:
        lines += ["| worker | peak memory |", "|---|---:|"]
        lines += [f"| {w} | {_mb(b)} |" for w, b in sorted(per_worker.items())]
        lines.append("")
    return "\n".join(lines)


_ACTIVE: RunLog | None = None


def active_run_log() -> RunLog | None:
    """The run log of the current command, if any."""
    return _ACTIVE


def set_active(run_log: RunLog | None) -> None:
    """Make ``run_log`` the one :func:`stage` reports to (``None``: none)."""
    global _ACTIVE
    _ACTIVE = run_log


def stage(name: str):
    """Context manager marking a stage of the active run log; does nothing without one."""
    return _ACTIVE.stage(name) if _ACTIVE is not None else contextlib.nullcontext()

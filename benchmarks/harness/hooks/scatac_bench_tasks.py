"""Dask scheduler preload: a record of every task that finished, for the scale-out model.

Loaded by the scheduler when ``distributed.scheduler.preload`` names this file
(``harness.reads.hook_env`` sets ``DASK_DISTRIBUTED__SCHEDULER__PRELOAD``); it writes
``$SCATAC_BENCH_TASKS_DIR/tasks-<pid>-<n>.json`` when the scheduler closes.

One row per task that went from processing to memory: ``[name, worker, compute start,
compute stop, compute s, transfer s, output bytes, dependency bytes, remote bytes]``.
Times are the workers' clocks (``time.time()``; same machine as the client). Compute and
transfer seconds come from the worker's own ``startstops``. Dependency bytes: the sizes of
the task's inputs (``nbytes`` as the scheduler knows them); remote bytes: those of its inputs
that lived on another worker and were not on this one already, each input counted once per
worker that fetched it. The plugin keeps one producer address per task and one row per
task: a few MB at 10^5 tasks, in the process that runs the scheduler (measured with it).
"""

from __future__ import annotations

import itertools
import json
import os

from dask.utils import key_split
from distributed.diagnostics.plugin import SchedulerPlugin

_counter = itertools.count()


class TaskRecord(SchedulerPlugin):
    name = "scatac-bench-task-record"

    def __init__(self, scheduler, folder: str) -> None:
        self.scheduler = scheduler
        self.folder = folder
        self.rows: list[list] = []
        self.producer: dict = {}
        self.fetched: dict = {}

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if finish == "forgotten":  # keep the maps small once a task is gone
            self.producer.pop(key, None)
            self.fetched.pop(key, None)
            return
        if start != "processing" or finish != "memory":
            return
        worker = kwargs.get("worker")
        ss = kwargs.get("startstops") or ()
        compute = [(s["start"], s["stop"]) for s in ss if s.get("action") == "compute"]
        transfer = sum(s["stop"] - s["start"] for s in ss if s.get("action") == "transfer")
        ts = self.scheduler.tasks.get(key)
        dep_bytes = remote = 0
        if ts is not None:
            for dep in ts.dependencies:
                nb = max(int(dep.nbytes or 0), 0)
                dep_bytes += nb
                src = self.producer.get(dep.key)
                if src is not None and src != worker:
                    seen = self.fetched.setdefault(dep.key, set())
                    if worker not in seen:
                        seen.add(worker)
                        remote += nb
        self.producer[key] = worker
        nbytes = kwargs.get("nbytes")
        if nbytes is None and ts is not None:
            nbytes = ts.nbytes
        c0 = min((c[0] for c in compute), default=None)
        c1 = max((c[1] for c in compute), default=None)
        self.rows.append([key_split(key), worker, c0, c1, sum(b - a for a, b in compute), transfer,
                          max(int(nbytes or 0), 0), dep_bytes, remote])

    def dump(self) -> None:
        if not self.folder:
            return
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"tasks-{os.getpid()}-{next(_counter)}.json")
        with open(path + ".tmp", "w") as fh:
            json.dump({"pid": os.getpid(), "rows": self.rows}, fh)
        os.replace(path + ".tmp", path)

    async def close(self) -> None:
        self.dump()


def dask_setup(scheduler) -> None:
    scheduler.add_plugin(TaskRecord(scheduler, os.environ.get("SCATAC_BENCH_TASKS_DIR", "")))

"""Fault injection shared by the crash tests: SIGKILL a Dask worker process at the moment
the scheduler hands it a task of a given stage.

Usage::

    with WorkerKiller(client, "_gram_step", after=2) as killer:   # a substring of the task keys
        run_the_stage(...)
    assert killer.killed, "the worker was never killed: the test proved nothing"

A scheduler plugin watches task transitions; when the (``after`` + 1)-th task whose key
contains ``key_part`` goes to a worker, that worker's process is killed, so the kill lands
in the middle of the stage however short its tasks are. The nanny restarts the worker and
the scheduler reschedules what it held. ``killed`` holds (worker address, pid, task key).
Needs a ``LocalCluster(processes=True)``: its scheduler runs in this process and its
workers are our children.
"""

from __future__ import annotations

import os
import signal
import uuid

from distributed.diagnostics.plugin import SchedulerPlugin


class _KillOnTask(SchedulerPlugin):
    def __init__(self, name: str, key_part: str, after: int, pids: dict[str, int]):
        self.name = name
        self.key_part = key_part
        self.after = after
        self.pids = pids
        self.seen = 0
        self.killed: list[tuple[str, int, str]] = []

    def transition(self, key, start, finish, *args, **kwargs):
        if self.killed or finish != "processing" or self.key_part not in str(key):
            return
        self.seen += 1
        if self.seen <= self.after:
            return
        ts = self.scheduler.tasks.get(key)
        ws = ts.processing_on if ts is not None else None
        if ws is not None and ws.address in self.pids:
            os.kill(self.pids[ws.address], signal.SIGKILL)
            self.killed.append((ws.address, self.pids[ws.address], str(key)))

    async def start(self, scheduler):
        self.scheduler = scheduler


class WorkerKiller:
    """Kill the worker that gets the (``after`` + 1)-th task whose key contains ``key_part``."""

    def __init__(self, client, key_part: str, after: int = 0):
        self.client = client
        self.key_part = key_part
        self.after = after
        self.name = f"worker-killer-{uuid.uuid4().hex[:6]}"
        self.killed: list[tuple[str, int, str]] = []

    def __enter__(self) -> WorkerKiller:
        pids = self.client.run(os.getpid)
        self.client.register_plugin(_KillOnTask(self.name, self.key_part, self.after, pids), name=self.name)
        return self

    def __exit__(self, *exc) -> None:
        def pop(dask_scheduler, name):
            plugin = dask_scheduler.plugins.get(name)
            if plugin is None:
                return []
            dask_scheduler.remove_plugin(name=name)
            return plugin.killed

        self.killed = self.client.run_on_scheduler(pop, name=self.name)

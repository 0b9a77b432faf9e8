"""Fault injection shared by the crash tests: SIGKILL a Dask worker process while it runs a
task of a given stage, from a watcher thread beside the computation.

Usage::

    with WorkerKiller(client, "lsi-gram") as killer:   # any substring of the task keys
        run_the_stage(...)
    assert killer.killed, "the worker was never killed: the test proved nothing"

The nanny restarts the killed worker; the scheduler reschedules its tasks. ``killed`` holds
(worker address, pid, task key) of the kill, so a test can assert it happened mid-stage.
"""

from __future__ import annotations

import os
import signal
import threading
import time


class WorkerKiller:
    """Kill the worker that first runs (or holds) a task whose key contains ``key_part``.

    Parameters
    ----------
    client
        A client of a ``LocalCluster`` with ``processes=True`` (the workers are our children).
    key_part
        Substring of a task key of the stage to interrupt.
    after
        Kill only once this many such tasks have finished (0: at the first one seen running),
        so the kill falls in the middle of the stage, not before it starts.
    """

    def __init__(self, client, key_part: str, after: int = 0, poll_s: float = 0.02):
        self.client = client
        self.key_part = key_part
        self.after = after
        self.poll_s = poll_s
        self.killed: list[tuple[str, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> WorkerKiller:
        self.pids = self.client.run(os.getpid)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _done_count(self) -> int:
        def count(dask_scheduler, part):
            return sum(1 for k, ts in dask_scheduler.tasks.items()
                       if part in str(k) and ts.state == "memory")

        return self.client.run_on_scheduler(count, part=self.key_part)

    def _watch(self) -> None:
        while not self._stop.is_set() and not self.killed:
            try:
                processing = self.client.processing()
                if self.after == 0 or self._done_count() >= self.after:
                    for addr, keys in processing.items():
                        hit = next((k for k in keys if self.key_part in str(k)), None)
                        if hit is not None and addr in self.pids:
                            os.kill(self.pids[addr], signal.SIGKILL)
                            self.killed.append((addr, self.pids[addr], str(hit)))
                            return
            except Exception:  # the client may be between calls; keep watching
                pass
            time.sleep(self.poll_s)

"""Process-tree RSS: the tree's total at one instant, and a thread that samples it.

Standard library and psutil only: the peer runners import this module from their own
virtualenvs (``sccase_runner.py`` under psutil 5.9).
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from contextlib import contextmanager

import psutil

from .timing import Timer

GIB = 2**30


def tree_rss(root: psutil.Process) -> int:
    """RSS of ``root`` and all its descendants, in bytes (processes gone meanwhile skipped)."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def kill_tree(pid: int) -> None:
    """Kill ``pid`` and its descendants, the deepest first."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for p in reversed(procs):
        try:
            p.kill()
        except psutil.Error:
            pass


def ru_maxrss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    """``getrusage(who).ru_maxrss`` in bytes (Linux reports KiB, macOS bytes)."""
    v = resource.getrusage(who).ru_maxrss
    return int(v) if sys.platform == "darwin" else int(v) * 1024


def role(p: psutil.Process, root_pid: int) -> str:
    """``client`` (the root: with a LocalCluster it also hosts the scheduler and the nannies),
    ``worker`` (a spawned child), ``resource-tracker``, ``other`` or ``?``."""
    if p.pid == root_pid:
        return "client"
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "?"
    if "resource_tracker" in cmd:
        return "resource-tracker"
    # LocalCluster's nannies are objects in the client process; each spawned child is a worker
    if "spawn_main" in cmd:
        return "worker"
    return "other"


class TreeSampler(threading.Thread):
    """Samples the RSS of every process of a tree every ``interval`` s, in a daemon thread.

    Kept (bytes): ``peak`` (the tree's total), ``peak_process`` (the largest single process);
    per stage (:meth:`set_stage`) ``stage_peaks`` (the tree's total) and ``stage_max_process``;
    per process ``per_process`` (pid -> ``{"role", "peak_rss"}``, :func:`role`). Also
    ``n_samples`` and ``max_gap`` (the longest time between two samples: a C call that holds
    the GIL stalls the thread).

    ``pid``: the root, this process by default. ``skip_forks``: a descendant whose command
    line is the root's own is a fork that has not exec'd yet (loky forks to run ``lscpu``); its
    pages are the root's, shared copy-on-write, and counting them would double the figure
    for an instant, so it is skipped.

    A context manager: started on entry, stopped on exit.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.2, *, skip_forks: bool = False,
                 name: str = "rss-sampler") -> None:
        super().__init__(name=name, daemon=True)
        self.interval = interval
        try:
            self.root: psutil.Process | None = psutil.Process(pid)
            self._root_cmdline = self.root.cmdline() if skip_forks else None
        except psutil.Error:  # gone already: nothing to sample
            self.root, self._root_cmdline = None, None
        self.stage: str | None = None
        self.peak = 0
        self.peak_process = 0
        self.stage_peaks: dict[str, int] = {}
        self.stage_max_process: dict[str, int] = {}
        self.per_process: dict[int, dict] = {}
        self.n_samples = 0
        self.max_gap = 0.0
        self._last = time.perf_counter()
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def sample(self) -> int:
        """One sample now (from any thread); returns the tree's total."""
        if self.root is None:
            return 0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return 0
        sizes = []
        for p in procs:
            try:
                if self._root_cmdline is not None and p is not self.root and p.cmdline() == self._root_cmdline:
                    continue
                sizes.append((p, p.memory_info().rss))
            except psutil.Error:
                continue
        total = sum(rss for _, rss in sizes)
        biggest = max((rss for _, rss in sizes), default=0)
        now = time.perf_counter()
        with self._lock:
            self.max_gap = max(self.max_gap, now - self._last)
            self._last = now
            self.n_samples += 1
            self.peak = max(self.peak, total)
            self.peak_process = max(self.peak_process, biggest)
            for p, rss in sizes:
                rec = self.per_process.get(p.pid)
                if rec is None:
                    rec = self.per_process[p.pid] = {"role": role(p, self.root.pid), "peak_rss": 0}
                rec["peak_rss"] = max(rec["peak_rss"], rss)
            if self.stage is not None:
                self.stage_peaks[self.stage] = max(self.stage_peaks.get(self.stage, 0), total)
                self.stage_max_process[self.stage] = max(self.stage_max_process.get(self.stage, 0), biggest)
        return total

    def set_stage(self, name: str | None) -> str | None:
        """Close the current stage (one last sample) and start ``name``; returns the stage left."""
        self.sample()
        with self._lock:
            previous, self.stage = self.stage, name
        if name is not None:
            self.sample()
        return previous

    @contextmanager
    def timed_stage(self, name: str, times: dict | None = None):
        """``with sampler.timed_stage(name, times) as t:`` the block is stage ``name`` (which lasts
        until the next :meth:`set_stage`), timed: ``t.seconds``, also put in ``times[name]``."""
        self.set_stage(name)
        with Timer() as t:
            yield t
        if times is not None:
            times[name] = t.seconds

    def tick(self) -> None:
        """What the thread does every ``interval`` s."""
        self.sample()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.tick()

    def stop(self) -> None:
        self.set_stage(None)
        self._halt.set()
        if self.is_alive():
            self.join(timeout=5)

    def __enter__(self) -> TreeSampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def peak_by_role(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in self.per_process.values():
            out[v["role"]] = max(out.get(v["role"], 0), v["peak_rss"])
        return out

    def figures_gib(self) -> dict:
        """The peaks in GiB, under the names the result files use (each script keeps the ones
        it records): ``peak_rss_tree_gib`` is the largest total over the stages."""
        by_role = self.peak_by_role()
        return {
            "peak_rss_client_gib": by_role.get("client", 0) / GIB,
            "peak_rss_by_role_gib": {k: v / GIB for k, v in by_role.items()},
            "peak_rss_max_process_gib": max((v["peak_rss"] for v in self.per_process.values()), default=0) / GIB,
            "peak_rss_tree_gib": max(self.stage_peaks.values(), default=0) / GIB,
            "peak_rss_tree_by_stage_gib": {k: v / GIB for k, v in self.stage_peaks.items()},
            "peak_rss_max_process_by_stage_gib": {k: v / GIB for k, v in self.stage_max_process.items()},
        }

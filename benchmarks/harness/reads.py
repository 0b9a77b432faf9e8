"""Bytes read by a measured process tree, two ways, and the hooks that count them.

* **store bytes** (``store_read_bytes``): what zarr read from local stores, in every Python
  process of the tree (the client, each Dask worker, training ranks), counted by the hook in
  ``harness/hooks`` (``scatac_bench_reads``: compressed chunk files and metadata, as on
  disk; page-cache hits count as reads). Exact for our runs; SnapATAC2 reads HDF5 in Rust and
  is not counted this way.
* **read_chars** (``read_chars``): the kernel's ``rchar`` of each process
  (``psutil.Process.io_counters().read_chars``: every byte returned by ``read()``/``pread()``
  on files and pipes, from disk or cache; Python's own imports included, socket
  ``recv`` not), sampled with the RSS and summed over every process the tree ever had (each
  at its last sample, so up to one interval of a process that exits is missed). The one
  figure both systems have.

:func:`hook_env` is the environment that turns the store hook and the scheduler's task
record (``hooks/scatac_bench_tasks.py``) on in a child; :func:`store_read_total` adds the
counts up; :class:`ReadSampler` is :class:`harness.memory.TreeSampler` with ``read_chars``.
Standard library and psutil only.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil

from .memory import TreeSampler

HOOKS = Path(__file__).resolve().parent / "hooks"


def hook_env(reads_dir: Path, tasks_dir: Path | None = None, base: dict | None = None) -> dict:
    """``base`` (``os.environ`` by default) with the store-read hook on (counts into
    ``reads_dir``) and, with ``tasks_dir``, every Dask scheduler started in the tree
    recording its tasks there."""
    env = dict(os.environ if base is None else base)
    Path(reads_dir).mkdir(parents=True, exist_ok=True)
    env["PYTHONPATH"] = os.pathsep.join([str(HOOKS), *filter(None, [env.get("PYTHONPATH")])])
    env["SCATAC_BENCH_READS_DIR"] = str(reads_dir)
    if tasks_dir is not None:
        Path(tasks_dir).mkdir(parents=True, exist_ok=True)
        env["SCATAC_BENCH_TASKS_DIR"] = str(tasks_dir)
        env["DASK_DISTRIBUTED__SCHEDULER__PRELOAD"] = json.dumps([str(HOOKS / "scatac_bench_tasks.py")])
    return env


def store_read_total(reads_dir: Path) -> int:
    """Bytes read from stores by every process that counted into ``reads_dir`` so far."""
    total = 0
    for p in Path(reads_dir).glob("*.json"):
        try:
            total += int(json.loads(p.read_text())["bytes"])
        except (OSError, ValueError, KeyError) as exc:  # files are replaced atomically: say so, never guess
            print(f"store reads: {p} unreadable ({exc}); its bytes are not counted", file=sys.stderr)
    return total


def flush_here() -> None:
    """Write this process's store-read count now (no-op without the hook)."""
    import sys

    mod = sys.modules.get("scatac_bench_reads")
    if mod is not None:
        mod.flush()


def flush_everywhere(client=None) -> None:
    """:func:`flush_here` in this process and on every worker of ``client``."""
    flush_here()
    if client is not None:
        try:
            client.run(flush_here)
        except Exception:  # a worker gone: its periodic and at-exit writes stand
            pass


class ReadSampler(TreeSampler):
    """:class:`TreeSampler` that also keeps each process's last ``read_chars``.

    ``read_chars`` is the sum over every process seen (``exclude_root``: all but the root,
    for a launcher that samples its own children); :meth:`set_stage` records, per stage, how
    much it grew (``stage_read_chars``).
    """

    def __init__(self, pid: int | None = None, interval: float = 0.2, *, exclude_root: bool = False, **kw) -> None:
        super().__init__(pid, interval, **kw)
        self.exclude_root = exclude_root
        self.last_read_chars: dict[int, int] = {}
        self.stage_read_chars: dict[str, int] = {}
        self._stage_start_chars = 0

    def sample(self) -> int:
        total = super().sample()
        if self.root is None:
            return total
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return total
        for p in procs:
            if self.exclude_root and p.pid == self.root.pid:
                continue
            try:
                rc = p.io_counters().read_chars
            except (psutil.Error, AttributeError):
                continue
            with self._lock:
                self.last_read_chars[p.pid] = max(self.last_read_chars.get(p.pid, 0), rc)
        return total

    @property
    def read_chars(self) -> int:
        with self._lock:
            return sum(self.last_read_chars.values())

    def set_stage(self, name: str | None) -> str | None:
        previous = super().set_stage(name)
        now = self.read_chars
        if previous is not None:
            self.stage_read_chars[previous] = self.stage_read_chars.get(previous, 0) + now - self._stage_start_chars
        self._stage_start_chars = now
        return previous

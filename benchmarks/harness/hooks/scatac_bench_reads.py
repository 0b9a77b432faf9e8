"""Bytes read from zarr stores by this process, written where the benchmark can add them up.

What is counted: every value zarr's ``LocalStore`` returns from a file
(``zarr.storage._local._get``: chunk files, compressed, as they are on disk, and the small
metadata files), in any thread. Not counted: files read without zarr (a 10x HDF5 input,
scratch files such as scCASE's memory-mapped pattern or scEmbed's corpus shards, Python's
own modules) and whether the bytes came from the page cache or the disk.

Each process writes ``$SCATAC_BENCH_READS_DIR/<pid>.json`` (``{"pid", "bytes", "reads",
"argv"}``) at most every 0.5 s while it reads, on :func:`flush` and at exit; a process
forked from a counting one starts again from zero. Standard library only.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from importlib.abc import MetaPathFinder
from importlib.machinery import PathFinder

TARGET = "zarr.storage._local"
FLUSH_EVERY_S = 0.5

_lock = threading.Lock()
_state = {"bytes": 0, "reads": 0, "last": 0.0}


def _folder() -> str | None:
    return os.environ.get("SCATAC_BENCH_READS_DIR")


def add(n: int) -> None:
    """Count one read of ``n`` bytes (flushed when the last flush is old enough)."""
    now = time.monotonic()
    with _lock:
        _state["bytes"] += n
        _state["reads"] += 1
        due = now - _state["last"] > FLUSH_EVERY_S
        if due:
            _state["last"] = now
    if due:
        flush()


def flush() -> dict:
    """Write this process's counts now; returns them."""
    with _lock:
        rec = {"pid": os.getpid(), "bytes": _state["bytes"], "reads": _state["reads"], "argv": sys.argv[:2]}
    folder = _folder()
    if folder and rec["reads"]:
        path = os.path.join(folder, f"{rec['pid']}.json")
        tmp = f"{path}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "w") as fh:
                json.dump(rec, fh)
            os.replace(tmp, path)
        except OSError:  # a count must never fail the process it measures; the next flush and exit retry
            pass
    return rec


def _reset() -> None:
    """In a forked child: its counts start from zero (the parent's are the parent's)."""
    with _lock:
        _state.update(bytes=0, reads=0, last=0.0)


def _patch(module) -> None:
    original = module._get

    def _get(path, prototype, byte_range):
        buf = original(path, prototype, byte_range)
        add(len(buf))
        return buf

    module._get = _get


class _Finder(MetaPathFinder):
    """Finds ``zarr.storage._local`` as usual, and patches it once it has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Count from now on (called by ``sitecustomize``)."""
    if TARGET in sys.modules:
        _patch(sys.modules[TARGET])
    else:
        sys.meta_path.insert(0, _Finder())
    atexit.register(flush)
    os.register_at_fork(after_in_child=_reset)

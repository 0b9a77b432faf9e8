"""One writer per store: a lock file beside the store naming its holder.

``<parent>/.<store name>.lock`` holds JSON ``{"host", "pid", "started", "command", "token"}``
and is held with ``fcntl.flock`` for as long as its holder runs. A second writer gets
:class:`StoreLockedError` naming the holder. When the holder dies the kernel releases the
flock; the next writer on the same host sees a lock file whose flock is free, logs that it
takes over a stale lock and does. A lock written on *another* host cannot be checked from
here (its process is not ours to see), so it is refused with the command to clear it.

The lock is re-entrant within a process, and child processes (DDP ranks, spawned helpers)
inherit it through the environment variable ``SCATAC_DIST_LOCKS`` (path=token pairs), so
a rank that writes for the command that started it is not refused.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError

logger = logging.getLogger("scatac_dist")

__all__ = ["StoreLockedError", "lock_path", "store_lock", "holds_lock", "read_holder"]

_ENV = "SCATAC_DIST_LOCKS"
_held: dict[str, tuple[int, int, str]] = {}  # lock path -> (fd, depth, token)


class StoreLockedError(InputError):
    """Another process is writing to the store (or left a lock this host cannot check)."""


def lock_path(store: str | os.PathLike) -> Path:
    """The lock file of ``store``: ``<parent>/.<name>.lock``."""
    store = Path(store).absolute()
    return store.with_name(f".{store.name}.lock")


def read_holder(store: str | os.PathLike) -> dict | None:
    """What the lock file of ``store`` says about its holder, or ``None`` without one."""
    try:
        text = lock_path(store).read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {}


def _inherited(path: Path) -> str | None:
    for item in os.environ.get(_ENV, "").split(os.pathsep):
        p, _, token = item.rpartition("=")
        if p == str(path):
            return token
    return None


def holds_lock(store: str | os.PathLike) -> bool:
    """Whether this process holds (or inherited) the lock of ``store``."""
    path = lock_path(store)
    if str(path) in _held:
        return True
    token = _inherited(path)
    holder = read_holder(store)
    return bool(token and holder and holder.get("token") == token)


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process (the lock file is empty)"
    return (f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
            f" ({holder.get('command', '?')})")


@contextmanager
def store_lock(store: str | os.PathLike, command: str | None = None) -> Iterator[Path]:
    """Hold the write lock of ``store`` for the enclosed block (re-entrant; inherited by children).

    Raises
    ------
    StoreLockedError
        If a live process holds it, or a process on another host left it.
    """
    store = Path(store).absolute()
    path = lock_path(store)
    key = str(path)
    if key in _held:
        fd, depth, token = _held[key]
        _held[key] = (fd, depth + 1, token)
        try:
            yield path
        finally:
            fd, depth, token = _held[key]
            _held[key] = (fd, depth - 1, token)
        return
    if holds_lock(store):  # a parent process holds it for us
        yield path
        return
    fd, token = _acquire(store, path, command)
    _held[key] = (fd, 1, token)
    previous = os.environ.get(_ENV)
    os.environ[_ENV] = os.pathsep.join(filter(None, [previous, f"{key}={token}"]))
    try:
        yield path
    finally:
        del _held[key]
        if previous is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = previous
        try:
            path.unlink(missing_ok=True)  # unlink while still flocked: no one can slip in between
        finally:
            os.close(fd)


def _acquire(store: Path, path: Path, command: str | None) -> tuple[int, str]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(path.parent, f"cannot create this folder ({exc.strerror})",
                         "choose an output folder you can write to") from exc
    host = socket.gethostname()
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(path.parent, f"cannot write in this folder ({exc.strerror}): the store's lock "
                             f"file {path.name} cannot be created",
                             "write to a folder you can write to (copy the store there first to add results "
                             "to it)") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_holder(store) or {}
            raise StoreLockedError(
                store, f"another scatac-dist writes to this store: {_describe(holder)}",
                "wait for it to finish (one writer per store), or stop it; the lock file is "
                f"{path}") from None
        # The file we locked must still be the one at the path: a holder that just finished
        # unlinks it, and a lock on an unlinked file protects nothing.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        holder = read_holder(store)
        if holder:
            if holder.get("host") != host:
                os.close(fd)
                raise StoreLockedError(
                    store, f"the store is locked by {_describe(holder)}, another host, which cannot be "
                    "checked from here",
                    f"make sure that process has ended, then delete {path} and run again")
            logger.warning("%s: taking over a stale lock of %s (that process is gone)", store, _describe(holder))
        elif holder == {} and os.fstat(fd).st_size:
            logger.warning("%s: taking over an unreadable stale lock file", store)
        token = uuid.uuid4().hex
        record = {"host": host, "pid": os.getpid(), "token": token,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        return fd, token

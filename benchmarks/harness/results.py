"""JSON result files: read, merged by section and entry, written atomically.

Standard library only (numpy inside :func:`jsonable`): the peer runners import it.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def read_json(path: str | Path, default: Any = None) -> Any:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def write_json(path: str | Path, obj: Any, *, indent: int = 1) -> None:
    """Write ``obj`` to ``path`` through a temporary file and a rename, so a reader never sees
    half a file. Values JSON cannot hold (numpy scalars) are written as floats."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent, default=float))
    os.replace(tmp, path)


def jsonable(v: Any) -> Any:
    """``v`` as JSON holds it: numbers, strings, lists and dicts as they are, numpy scalars as
    Python ones, anything else as its ``repr``."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    import numpy as np

    if isinstance(v, np.generic):
        return v.item()
    return repr(v)


class ResultsFile:
    """One benchmark's JSON file, a dict of sections. :meth:`set_section` and
    :meth:`set_entry` read, change and write it back at once, so a run that stops keeps every
    row written before. ``lock``: the read-modify-write holds ``PATH.lock`` (two benchmark
    processes side by side must not drop each other's rows)."""

    def __init__(self, path: str | Path, *, indent: int = 1, lock: bool = False) -> None:
        self.path = Path(path)
        self.indent = indent
        self.lock = lock

    def load(self) -> dict:
        return read_json(self.path, {})

    def save(self, data: dict) -> None:
        write_json(self.path, data, indent=self.indent)

    @contextmanager
    def _locked(self):
        if not self.lock:
            yield
            return
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def set_section(self, section: str, value: Any) -> None:
        with self._locked():
            data = self.load()
            data[section] = value
            self.save(data)

    def set_entry(self, section: str, key: str, value: Any) -> None:
        with self._locked():
            data = self.load()
            data.setdefault(section, {})[key] = value
            self.save(data)

"""One progress-bar style for every long step of the package: tqdm on stderr (stdout holds only
a command's result), as wide as the terminal, redrawn at most every 30 s when stderr is a file
or a pipe (a batch job's log), and off with ``enabled=False`` (``--no-progress``)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["bar", "as_completed_bar"]

#: Least seconds between redraws when stderr is not a terminal (each redraw is a log line there).
LOG_MININTERVAL = 30.0


def bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
        enabled: bool = True, **kw: Any):
    """A tqdm bar in the package's style. ``kw`` passes other tqdm options (``unit_scale``,
    ``initial``, ``bar_format``...)."""
    from tqdm.auto import tqdm

    isatty = getattr(sys.stderr, "isatty", None)
    opts = {"file": sys.stderr, "dynamic_ncols": True, "disable": not enabled,
            "mininterval": 0.1 if isatty and isatty() else LOG_MININTERVAL}
    return tqdm(iterable, total=total, desc=desc, unit=unit, **{**opts, **kw})


def as_completed_bar(futures: list, *, desc: str, enabled: bool = True, unit: str = "task"):
    """Iterate Dask futures as they finish, with a bar counting them."""
    from distributed import as_completed

    it = as_completed(futures)
    return bar(it, total=len(futures), desc=desc, unit=unit, enabled=enabled) if enabled else it

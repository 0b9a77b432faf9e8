"""A stopwatch. Standard library only (the peer runners import it)."""

from __future__ import annotations

import time


class Timer:
    """``with Timer() as t: ...``; then ``t.seconds``. ``t.elapsed`` reads it while running."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: float | None = None

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

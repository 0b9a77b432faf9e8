"""Open plain or gzip-compressed text files the same way."""

from __future__ import annotations

import gzip
import io
from pathlib import Path


def is_gzip(path: str | Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def open_text(path: str | Path) -> io.TextIOBase:
    """Open ``path`` for reading text, decompressing gzip by its magic bytes."""
    if is_gzip(path):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")

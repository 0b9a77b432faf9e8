"""Open plain or gzip-compressed text files the same way."""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path

try:  # ISA-L's gzip decompresses about twice as fast as zlib's; same API and format
    from isal import igzip as _gzip
    from isal.isal_zlib import error as _isal_error
except ImportError:  # pragma: no cover - isal is a dependency, but keep working without it
    _gzip = gzip
    _isal_error = zlib.error

#: Errors a damaged gzip stream raises while being read.
GZIP_ERRORS = (EOFError, OSError, zlib.error, _isal_error)


def gzip_reader(fileobj) -> io.BufferedIOBase:
    """A decompressing binary reader over an open binary file."""
    return _gzip.GzipFile(fileobj=fileobj, mode="rb")


def is_gzip(path: str | Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def open_text(path: str | Path) -> io.TextIOBase:
    """Open ``path`` for reading text, decompressing gzip by its magic bytes."""
    if is_gzip(path):
        return io.TextIOWrapper(_gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")

"""``benchmarks/RESULTS.md``: each benchmark owns one marked block and rewrites only it; the
same table also goes to ``results/NAME.md`` and the terminal."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from . import BENCH

RESULTS_MD = BENCH / "RESULTS.md"


def replace_block(name: str, body: str, path: Path = RESULTS_MD) -> None:
    """Put ``body`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` (appended the first
    time), leaving the rest of the file as it is; written atomically."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def publish(name: str, heading: str, lines: Sequence[str], *, md: Path | None = None, echo: bool = True) -> None:
    """The table ``lines``: to ``md`` (when given), printed (``echo``), and into the ``name``
    block of RESULTS.md after ``heading``."""
    table = "\n".join(lines)
    if md is not None:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(table + "\n")
    if echo:
        print(table)
    replace_block(name, heading + table)

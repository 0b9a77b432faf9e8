"""``benchmarks/RESULTS.md``: each benchmark script owns one marked block and rewrites only it."""

from __future__ import annotations

import os
from pathlib import Path

PATH = Path(__file__).resolve().parent / "RESULTS.md"


def replace_block(name: str, body: str) -> None:
    """Put ``body`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` (appended the first
    time), leaving the rest of the file as it is; written atomically."""
    text = PATH.read_text() if PATH.exists() else "# Benchmark results\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = PATH.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, PATH)

"""External bucketing of coordinate entries by cell, for inputs not stored in cell order.

A MatrixMarket file (or a CSC matrix) lists entries in an order unrelated to cells. Rather
than sorting the whole file in memory, entries are streamed batch by batch and appended to
one file per *bucket* of ``chunk_rows`` consecutive cells. Each bucket then becomes one row
block of the atlas: a worker reads it, builds its CSR block, and the bucket is removed with
the spool. Memory is bounded by one parse batch plus one bucket, never by the file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ENTRY = np.dtype([("cell", "<i4"), ("col", "<i4"), ("val", "<u4")])


class Bucketer:
    """Append (cell, column, count) entries to per-bucket files under ``workdir``."""

    def __init__(self, workdir: str | Path, n_cells: int, chunk_rows: int):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.n_cells = n_cells
        self.chunk_rows = chunk_rows
        self.n_buckets = max(1, -(-n_cells // chunk_rows))
        self.n_entries = 0

    def path(self, b: int) -> Path:
        return self.workdir / f"bucket-{b:07d}.bin"

    def add(self, cell: np.ndarray, col: np.ndarray, val: np.ndarray) -> None:
        """Append a batch; ``cell`` and ``col`` are 0-based and already range-checked."""
        if not len(cell):
            return
        rec = np.empty(len(cell), dtype=ENTRY)
        rec["cell"], rec["col"], rec["val"] = cell, col, val
        bucket = cell // self.chunk_rows
        order = np.argsort(bucket, kind="stable")
        rec, bucket = rec[order], bucket[order]
        bounds = np.searchsorted(bucket, np.arange(self.n_buckets + 1))
        for b in np.flatnonzero(np.diff(bounds)):
            with open(self.path(b), "ab") as fh:
                rec[bounds[b]:bounds[b + 1]].tofile(fh)
        self.n_entries += len(cell)

    def recipes(self, n_cols: int) -> list[tuple]:
        """One recipe per bucket, in cell order (empty buckets give empty blocks)."""
        return [(bucket_block, (str(self.path(b)), b * self.chunk_rows,
                                min(self.chunk_rows, self.n_cells - b * self.chunk_rows), n_cols))
                for b in range(self.n_buckets)]


def bucket_block(path: str, row0: int, n_rows: int, n_cols: int) -> sp.csr_matrix:
    """Worker task: the CSR block of one bucket (duplicate entries are summed, as SciPy does)."""
    p = Path(path)
    rec = np.fromfile(p, dtype=ENTRY) if p.exists() else np.empty(0, dtype=ENTRY)
    val = rec["val"]
    m = sp.csr_matrix((val,
                       (rec["cell"] - row0, rec["col"])), shape=(n_rows, n_cols))
    m.sum_duplicates()
    return m


def iter_batches(n: int, size: int) -> Iterable[tuple[int, int]]:
    for s in range(0, n, size):
        yield s, min(s + size, n)

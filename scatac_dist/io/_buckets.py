"""External bucketing of coordinate entries by cell, for inputs not stored in cell order.

A MatrixMarket file (or a CSC matrix) lists entries in an order unrelated to cells. Rather
than sorting the whole matrix in memory, it is cut into *pieces* (a few million entries
each), which Dask workers parse in parallel. Each piece's entries are sorted by *bucket*
(``chunk_rows`` consecutive cells) and saved as one file with an index of where each bucket
starts. The block of bucket ``b`` is then built on a worker from the matching slice of every
piece file. Memory is bounded by one piece or one bucket, never by the input; the number of
files is the number of pieces, not pieces x buckets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

ENTRY = np.dtype([("cell", "<i4"), ("col", "<i4"), ("val", "<u4")])


def n_buckets(n_cells: int, chunk_rows: int) -> int:
    return max(1, -(-n_cells // chunk_rows))


def write_piece(workdir: str | Path, piece: int, cell: np.ndarray, col: np.ndarray, val: np.ndarray,
                n_cells: int, chunk_rows: int) -> np.ndarray:
    """Save one piece's entries grouped by bucket; return the entry count of every bucket.

    ``cell`` and ``col`` are 0-based and already range-checked; ``val`` are counts.
    """
    rec = np.empty(len(cell), dtype=ENTRY)
    rec["cell"], rec["col"], rec["val"] = cell, col, val
    bucket = rec["cell"] // chunk_rows
    nb = n_buckets(n_cells, chunk_rows)
    # numpy's stable sort is a linear-time radix sort for 16-bit keys
    order = np.argsort(bucket.astype(np.uint16) if nb <= 65536 else bucket, kind="stable")
    path = Path(workdir) / f"piece-{piece:07d}.bin"
    rec[order].tofile(path)
    return np.bincount(bucket, minlength=nb).astype(np.int64)


def bucket_recipes(workdir: str | Path, piece_counts: list[np.ndarray], n_cells: int, chunk_rows: int,
                   n_cols: int) -> list[tuple]:
    """One block recipe per bucket, in cell order, from the counts :func:`write_piece` returned."""
    nb = n_buckets(n_cells, chunk_rows)
    counts = np.vstack(piece_counts) if piece_counts else np.zeros((0, nb), np.int64)
    starts = np.cumsum(counts, axis=1) - counts  # where each bucket begins in each piece file
    recipes = []
    for b in range(nb):
        pieces = [(str(Path(workdir) / f"piece-{p:07d}.bin"), int(starts[p, b]), int(counts[p, b]))
                  for p in np.flatnonzero(counts[:, b])]
        row0 = b * chunk_rows
        recipes.append((bucket_block, (pieces, row0, min(chunk_rows, n_cells - row0), n_cols)))
    return recipes


def bucket_block(pieces: list[tuple[str, int, int]], row0: int, n_rows: int, n_cols: int) -> sp.csr_matrix:
    """Worker task: the CSR block of one bucket (duplicate entries are summed, as SciPy does)."""
    parts = [np.fromfile(path, dtype=ENTRY, count=count, offset=start * ENTRY.itemsize)
             for path, start, count in pieces]
    rec = np.concatenate(parts) if parts else np.empty(0, dtype=ENTRY)
    m = sp.csr_matrix((rec["val"], (rec["cell"] - row0, rec["col"])), shape=(n_rows, n_cols))
    m.sum_duplicates()
    return m


def iter_batches(n: int, size: int):
    """``(start, stop)`` ranges of ``size`` covering ``range(n)``."""
    for s in range(0, n, size):
        yield s, min(s + size, n)

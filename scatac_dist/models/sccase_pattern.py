"""scCASE's input, built once from the store: the 1% peak rule, the binarised pattern as a
row-addressable file, and the two products with it that every iteration needs.

The pattern (``B``: used cells x kept peaks, 0/1) is written as ``indptr.npy`` /
``indices.npy`` in a scratch folder beside the store and opened memory-mapped by every task.
The atlas mode needs the rows of each cell's neighbours, which lie anywhere in the store; a
memory map reads just those pages, where the compressed zarr chunks would have to be
decompressed whole for every gather. The file holds 4 bytes per stored entry (int32 peak
indices); values are not stored, since Eq. (1) on binarised data is ``s_i w_p`` (see
:mod:`scatac_dist.ops.sccase_support`). On a multi-node cluster the folder must be on a
shared filesystem (``scratch`` argument).

Products (each a Dask graph over row blocks of the pattern, summed in a fixed tree):
``times(W)`` = ``X^T W`` (cells x K) and ``t_times(V)`` = ``X V`` (peaks x K).
"""

from __future__ import annotations

import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import dask
import numba
import numpy as np
import scipy.sparse as sp
from dask import delayed

from ..blocks import tree_sum
from ..pp.filter import cell_mask
from ..store import Atlas

logger = logging.getLogger("scatac_dist")


def _block_df(block, cells):
    b = sp.csr_matrix(block)[np.asarray(cells, bool)]
    return np.bincount(b.indices[b.data > 0], minlength=b.shape[1]).astype(np.int64)


def _block_pattern(block, cells, peak_map, w, path):
    """Binarise a row block, keep the mapped peaks, save its indices, row lengths and the
    per-row sums of ``w^2`` (for the L2 norm)."""
    b = sp.csr_matrix(block)[np.asarray(cells, bool)]
    b.eliminate_zeros()
    b.sort_indices()
    rows = np.repeat(np.arange(b.shape[0]), np.diff(b.indptr))
    newcol = peak_map[b.indices]
    keep = newcol >= 0
    lengths = np.bincount(rows[keep], minlength=b.shape[0]).astype(np.int64)
    np.save(f"{path}.indices.npy", newcol[keep].astype(np.int32))
    np.save(f"{path}.lengths.npy", lengths)
    np.save(f"{path}.w2.npy", np.bincount(rows[keep], weights=w[newcol[keep]] ** 2, minlength=b.shape[0]))
    return int(keep.sum())


@dataclass
class Pattern:
    """The binarised, peak-filtered matrix of the used cells, on disk.

    ``cells``/``peaks``: store rows/columns used (sorted); ``s`` (cells) and ``w`` (peaks):
    the TF and IDF factors of Eq. (1).
    """

    folder: Path
    cells: np.ndarray
    peaks: np.ndarray
    s: np.ndarray
    w: np.ndarray
    chunk: int

    @property
    def n(self) -> int:
        return len(self.cells)

    @property
    def m(self) -> int:
        return len(self.peaks)

    def arrays(self):
        return open_pattern(str(self.folder))

    def blocks(self) -> list[tuple[int, int]]:
        return [(lo, min(lo + self.chunk, self.n)) for lo in range(0, self.n, self.chunk)]

    def csr(self) -> sp.csr_matrix:
        """``X^T`` (cells x peaks, Eq. 1) in memory: for the exact mode and tests only."""
        indptr, indices = self.arrays()
        B = sp.csr_matrix((np.ones(len(indices)), np.asarray(indices), np.asarray(indptr)),
                          shape=(self.n, self.m))
        return sp.csr_matrix(sp.diags(self.s) @ B @ sp.diags(self.w))

    def binary(self) -> sp.csr_matrix:
        indptr, indices = self.arrays()
        return sp.csr_matrix((np.ones(len(indices)), np.asarray(indices), np.asarray(indptr)),
                             shape=(self.n, self.m))

    def shared_s(self):
        """``s`` as one graph key (scattered once), not a copy per task."""
        return share(self.s)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def share(a: np.ndarray):
    """``a`` as one key of the graph that every task of a pass refers to (never a copy per task).

    The key holds the array in the graph itself rather than scattering it: a scattered array
    lives on one worker until another fetches it, and is lost for good if that worker dies
    first (Dask then cancels the whole pass: measured with a SIGKILLed worker, "lost scattered
    data, which can't be recovered"); a key of the graph is recomputed like any other task."""
    return delayed(np.asarray(a), pure=False)


_OPEN: dict = {}


def open_pattern(folder: str):
    """The memory-mapped ``(indptr, indices)``, opened once per process."""
    if folder not in _OPEN:
        _OPEN[folder] = (np.load(Path(folder) / "indptr.npy", mmap_mode="r"),
                         np.load(Path(folder) / "indices.npy", mmap_mode="r"))
    return _OPEN[folder]


def release_pages() -> None:
    """Drop this process's resident pages of the mapped patterns.

    A shared read-only mapping keeps every page it has touched in the process's RSS (as
    file-backed memory) for as long as it is mapped: at 1M cells the client showed 3.1 GB of
    ``indices.npy`` resident during the iterations. ``MADV_DONTNEED`` unmaps the pages from
    this process only; the data stays in the page cache and faults back in when read.
    """
    import mmap

    for arrays in _OPEN.values():
        for a in arrays:
            mm = getattr(a, "_mmap", None)
            if mm is not None and hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED)


def build_pattern(atlas: Atlas, *, min_cell_fraction: float = 0.01, norm: str = "l2",
                  scratch: str | Path | None = None, chunk: int | None = None) -> Pattern:
    """Apply the 1% rule over the used cells (``obs['pass_qc']``) and write the pattern.

    ``norm``: ``'l1'`` is Eq. (1) as printed (``s_i = 1 / peaks of cell i``); ``'l2'`` scales
    each cell's TF-IDF vector to unit length instead (``s_i = 1 / |w over its peaks|``), as
    the authors' code does (scikit-learn's ``TfidfTransformer(norm='l2')``). On binarised
    data the two differ only by a per-cell factor, but that factor is the sequencing depth,
    and NMF factors of the L1 form follow it (bm0828, Leiden ARI ~0.26 against ~0.5).

    Two passes over the store, one task per row chunk; the client concatenates the spooled
    blocks into the memory-mapped file one block at a time.
    """
    cells_mask = cell_mask(atlas)
    cells = np.flatnonzero(cells_mask)
    n = len(cells)
    if n == 0:
        raise ValueError("scCASE: no cells to use (every cell fails obs['pass_qc'])")
    X = atlas.X
    blocks = X.to_delayed().ravel()
    bounds = np.concatenate([[0], np.cumsum(X.chunks[0])])
    masks = [cells_mask[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    dfs = dask.compute(tree_sum([delayed(_block_df)(b, mk) for b, mk in zip(blocks, masks)]))[0]
    peaks = np.flatnonzero(dfs >= min_cell_fraction * n)
    if len(peaks) == 0:
        raise ValueError(f"scCASE: no peak is accessible in {min_cell_fraction:.0%} of the {n} cells; "
                         "lower min_cell_fraction")
    if norm not in ("l1", "l2"):
        raise ValueError(f"unknown norm {norm!r}; use 'l1' (Eq. 1 as printed) or 'l2'")
    w = np.log(n / dfs[peaks].astype(np.float64))
    peak_map = np.full(atlas.n_vars, -1, np.int64)
    peak_map[peaks] = np.arange(len(peaks))
    base = Path(scratch) if scratch else atlas.path.parent
    folder = base / f".{atlas.path.name}.sccase-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    try:
        spool = folder / "spool"
        spool.mkdir()
        pm, ws = share(peak_map), share(w)
        nnz = dask.compute(*[delayed(_block_pattern)(b, mk, pm, ws, str(spool / f"{i:07d}"))
                             for i, (b, mk) in enumerate(zip(blocks, masks))])
        total = int(sum(nnz))
        lengths = np.empty(n, np.int64)
        w2 = np.empty(n, np.float64)
        row = 0
        # appended through a file handle, not a memory map: mapped pages written here would
        # stay in the client's RSS for the rest of the run
        with open(folder / "indices.npy", "wb") as fh:
            np.lib.format.write_array_header_2_0(fh, {"descr": "<i4", "fortran_order": False, "shape": (total,)})
            for i in range(len(blocks)):
                fh.write(np.load(spool / f"{i:07d}.indices.npy").astype("<i4", copy=False).tobytes())
                ln = np.load(spool / f"{i:07d}.lengths.npy")
                lengths[row:row + len(ln)] = ln
                w2[row:row + len(ln)] = np.load(spool / f"{i:07d}.w2.npy")
                row += len(ln)
        np.save(folder / "indptr.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        shutil.rmtree(spool)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if norm == "l1":
        s = np.where(lengths > 0, 1.0 / np.maximum(lengths, 1), 0.0)
    else:
        s = np.where(w2 > 0, 1.0 / np.sqrt(np.where(w2 > 0, w2, 1)), 0.0)
    logger.info("sccase: %d cells x %d peaks in at least %.1f%% of cells (%d stored entries)",
                n, len(peaks), 100 * min_cell_fraction, total)
    return Pattern(folder, cells, peaks, s, w, int(chunk or atlas.chunk_rows))


def pattern_rows(pat: Pattern, rows: np.ndarray, binary: bool = False) -> sp.csr_matrix:
    """Rows ``rows`` of the pattern (``binary``) or of ``X^T`` (Eq. 1), as CSR."""
    indptr, indices = pat.arrays()
    starts, ends = indptr[rows], indptr[rows + 1]
    lens = ends - starts
    cols = np.concatenate([np.asarray(indices[a:b]) for a, b in zip(starts, ends)]) if len(rows) else \
        np.zeros(0, np.int32)
    out = sp.csr_matrix((np.ones(len(cols)), cols, np.concatenate([[0], np.cumsum(lens)])),
                        shape=(len(rows), pat.m))
    if not binary:
        out = sp.csr_matrix(sp.diags(pat.s[rows]) @ out @ sp.diags(pat.w))
    return out


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _rows_times(indptr, indices, s, wW, lo, hi):
    K = wW.shape[1]
    out = np.zeros((hi - lo, K), np.float64)
    for i in range(lo, hi):
        for t in range(indptr[i], indptr[i + 1]):
            p = indices[t]
            for c in range(K):
                out[i - lo, c] += wW[p, c]
        for c in range(K):
            out[i - lo, c] *= s[i]
    return out


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _rows_t_times(indptr, indices, sV, m, lo, hi):
    K = sV.shape[1]
    out = np.zeros((m, K), np.float64)
    for i in range(lo, hi):
        for t in range(indptr[i], indptr[i + 1]):
            p = indices[t]
            for c in range(K):
                out[p, c] += sV[i - lo, c]
    return out


def _times_task(folder, s, wW, lo, hi):
    indptr, indices = open_pattern(folder)
    return _rows_times(indptr, indices, s, wW, lo, hi)


def _t_times_task(folder, sV, m, lo, hi):
    indptr, indices = open_pattern(folder)
    return _rows_t_times(indptr, indices, sV, m, lo, hi)


def times(pat: Pattern, W: np.ndarray) -> np.ndarray:
    """``X^T W`` (cells x K): row ``i`` is ``s_i sum_p B[i, p] w_p W[p]``."""
    wW = share(np.ascontiguousarray(pat.w[:, None] * W))
    s = pat.shared_s()
    parts = [delayed(_times_task)(str(pat.folder), s, wW, lo, hi) for lo, hi in pat.blocks()]
    return np.concatenate(dask.compute(*parts))


def t_times(pat: Pattern, V: np.ndarray) -> np.ndarray:
    """``X V`` (peaks x K), the per-block products summed in a fixed tree."""
    sV = pat.s[:, None] * V
    parts = [delayed(_t_times_task)(str(pat.folder), np.ascontiguousarray(sV[lo:hi]), pat.m, lo, hi)
             for lo, hi in pat.blocks()]
    return pat.w[:, None] * dask.compute(tree_sum(parts))[0]

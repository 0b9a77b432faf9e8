"""Stream cells from an atlas store into training, one row chunk at a time.

Reads ``X`` (CSR: ``X/indptr``, ``X/indices``, ``X/data``) directly with zarr, chunk by
chunk, in every training process; no Dask cluster is needed and no process holds the whole
matrix. A cell mask (``obs``) and a peak selection (``var``) are applied per chunk.

The epoch plan (:class:`ShardedStream`) is what makes training reproducible:

* The chunks of epoch ``e`` are permuted by ``default_rng([seed, e])`` and dealt to the
  ranks round-robin (rank ``r`` gets ``perm[r::world]``): disjoint shards.
* A rank reads ``buffer_chunks`` of its chunks at a time and shuffles their rows with
  ``default_rng([seed, e, rank, pass, buffer])``, so rows mix across chunks.
* ``batch_size`` is the *global* batch (32 in the paper); each rank takes
  ``batch_size // world`` rows per step, and every rank makes the same number of steps per
  epoch, ``n_cells // batch_size``. A rank whose shard is short of rows goes round its shard
  again (with a fresh shuffle), so DDP never waits on a rank that ran dry. Leftover rows of
  an epoch are dropped; the shuffle drops different ones each epoch.
* Where a step starts in the stream follows from the chunk row counts alone, so a resumed
  run skips whole buffers without reading them (:meth:`ShardedStream.epoch`).

A joint RNA + ATAC store is read the same way (:class:`JointRows`): chunk ``k`` of every
modality, side by side, so a batch holds the same cells in both and goes through the same
plan, shuffles and checkpoints.

Batches travel as CSR pieces (:class:`SparseBatch`) and are densified on the device.
Memory per process: the store's ``indptr`` (8 bytes per cell), a few buffers of chunks, and
optionally a cache of decoded chunks bounded by ``cache_bytes``, whatever the atlas size
(SCALE's ranks use 256 MiB). A small set then lives in the cache after the first epoch: with
fewer cells than a few batches an epoch is a step or two, and reading its chunks from zarr
again every epoch cost more than the step itself (51 ms a step at batch 256 on Leukemia).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import zarr

from ..store import Atlas

__all__ = ["ChunkReader", "StoreRows", "JointRows", "ShardedStream", "SparseBatch", "prefetch"]


@dataclass
class SparseBatch:
    """A batch of cells as CSR pieces; :meth:`to_dense` builds the dense tensor on a device."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    n_cols: int
    cells: np.ndarray  # store row of each cell, for checks and outputs

    @classmethod
    def from_csr(cls, m: sp.csr_matrix, cells: np.ndarray) -> SparseBatch:
        return cls(m.indptr, m.indices, m.data, m.shape[1], cells)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def to_device(self, device: torch.device | str = "cpu", dense: bool = True) -> dict[str, torch.Tensor]:
        """The batch on ``device``: dense ``x`` (cells x peaks; left out with ``dense=False``,
        e.g. for encoding alone), and the sparse pieces a first layer can use directly
        (``cols``, ``offsets``: row starts, ``values``)."""
        device = torch.device(device)
        cols = torch.from_numpy(np.asarray(self.indices, np.int64)).to(device, non_blocking=True)
        indptr = torch.from_numpy(np.asarray(self.indptr, np.int64)).to(device, non_blocking=True)
        vals = torch.from_numpy(np.asarray(self.data, np.float32)).to(device, non_blocking=True)
        if not dense:
            return {"cols": cols, "offsets": indptr[:-1], "values": vals}
        n = len(self)
        rows = torch.repeat_interleave(torch.arange(n, device=device), indptr[1:] - indptr[:-1])
        x = torch.zeros((n, self.n_cols), dtype=torch.float32, device=device)
        x[rows, cols] = vals
        return {"x": x, "cols": cols, "offsets": indptr[:-1], "values": vals}

    def to_dense(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Only the dense (cells x peaks) tensor of :meth:`to_device`."""
        return self.to_device(device)["x"].to(dtype)


class ChunkReader:
    """What :class:`ShardedStream` reads: row chunks of the cells kept, with a cache.

    Subclasses set ``path``, ``n_obs``, ``chunk_rows``, ``cells`` (mask over the store's
    cells), ``n_chunks``, ``bounds`` (chunk row bounds), ``chunk_cells`` (kept cells per chunk)
    and ``cache_bytes``, and implement ``_read_chunk(k)``.
    """

    def _init_chunks(self, n_obs: int, chunk_rows: int, cells: np.ndarray | None, cache_bytes: int) -> None:
        self.n_obs, self.chunk_rows = int(n_obs), int(chunk_rows)
        self.cells = np.ones(self.n_obs, bool) if cells is None else np.asarray(cells, bool)
        if self.cells.shape != (self.n_obs,):
            raise ValueError(f"cell mask has {self.cells.shape[0]} entries, the store has {self.n_obs} cells")
        self.n_chunks = -(-self.n_obs // self.chunk_rows)
        self.bounds = np.minimum(np.arange(self.n_chunks + 1) * self.chunk_rows, self.n_obs)
        csum = np.concatenate([[0], np.cumsum(self.cells)])
        self.chunk_cells = csum[self.bounds[1:]] - csum[self.bounds[:-1]]  # kept cells per chunk
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[int, tuple[sp.csr_matrix, np.ndarray]] = {}
        self._cached = 0

    @property
    def n_cells(self) -> int:
        return int(self.chunk_cells.sum())

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_cached"] = {}, 0
        return state

    def read_chunk(self, k: int) -> tuple[sp.csr_matrix, np.ndarray]:
        """Chunk ``k`` as float32 CSR over the kept cells and columns, and those cells' store rows.

        Callers must not modify the result in place (it may be the cached copy).
        """
        hit = self._cache.get(k)
        if hit is not None:
            return hit
        m, rows = self._read_chunk(k)
        size = m.data.nbytes + m.indices.nbytes + m.indptr.nbytes + rows.nbytes
        if self._cached + size <= self.cache_bytes:  # dict writes are atomic: safe from the prefetch thread
            self._cache[k] = (m, rows)
            self._cached += size
        return m, rows

    def _read_chunk(self, k: int) -> tuple[sp.csr_matrix, np.ndarray]:
        raise NotImplementedError

    def iter_chunks(self, chunks=None) -> Iterator[tuple[int, sp.csr_matrix, np.ndarray]]:
        """``(k, matrix, store rows)`` for each chunk in ``chunks`` (default all, in order), prefetched."""
        chunks = range(self.n_chunks) if chunks is None else chunks
        return prefetch((k, *self.read_chunk(k)) for k in chunks if self.chunk_cells[k])


class StoreRows(ChunkReader):
    """Row-chunk reader of an atlas's counts, restricted to some cells and peaks.

    Parameters
    ----------
    path, mod
        The store (and modality of a MuData store).
    cells
        Boolean mask over the store's cells (``None``: all).
    peaks
        Sorted indices of the peaks to keep (``None``: all); they become columns ``0..``.
    binarize
        Replace counts by 1 (SCALE's input).
    chunk_rows
        Store rows per chunk (default: the store's ``chunk_rows``).
    cache_bytes
        Decoded chunks are kept in memory up to this many bytes (first come, never evicted);
        0 (the default) turns the cache off.
    """

    def __init__(self, path, *, mod: str | None = None, cells: np.ndarray | None = None,
                 peaks: np.ndarray | None = None, binarize: bool = True, chunk_rows: int | None = None,
                 cache_bytes: int = 0):
        atlas = Atlas(path, mod=mod, chunk_rows=chunk_rows)
        self.path, self.mod = str(atlas.path), mod
        self.group_path = atlas.group_path
        n_obs, self.n_vars = atlas.shape
        self.binarize = binarize
        self._init_chunks(n_obs, atlas.chunk_rows, cells, cache_bytes)
        self.peaks = np.arange(self.n_vars) if peaks is None else np.asarray(peaks, np.int64)
        self.col_map = np.full(self.n_vars, -1, np.int64)
        self.col_map[self.peaks] = np.arange(len(self.peaks))
        self._arrays = None

    @property
    def n_peaks(self) -> int:
        return len(self.peaks)

    def _x(self):
        if self._arrays is None:  # opened lazily, once per process
            root = zarr.open_group(self.path, mode="r", use_consolidated=False)
            g = root[self.group_path]["X"] if self.group_path else root["X"]
            self._arrays = (g["indptr"][:].astype(np.int64), g["indices"], g["data"])
        return self._arrays

    def __getstate__(self):
        state = super().__getstate__()
        state["_arrays"] = None
        return state

    def _read_chunk(self, k: int) -> tuple[sp.csr_matrix, np.ndarray]:
        indptr, indices, data = self._x()
        a, b = int(self.bounds[k]), int(self.bounds[k + 1])
        lo, hi = int(indptr[a]), int(indptr[b])
        m = sp.csr_matrix((np.asarray(data[lo:hi], np.float32), np.asarray(indices[lo:hi], np.int64),
                           indptr[a:b + 1] - lo), shape=(b - a, self.n_vars))
        keep = np.flatnonzero(self.cells[a:b])
        m = m[keep]
        if len(self.peaks) != self.n_vars:
            cols = self.col_map[m.indices]
            ok = cols >= 0
            kept = np.concatenate([[0], np.cumsum(ok)])[m.indptr]  # kept entries before each row
            m = sp.csr_matrix((m.data[ok], cols[ok], kept),
                              shape=(m.shape[0], len(self.peaks)))
        m.eliminate_zeros()
        if self.binarize:
            m.data[:] = 1.0
        m.sort_indices()
        return m, a + keep


class JointRows(ChunkReader):
    """Several modalities of one MuData store read side by side: chunk ``k`` of each, columns
    concatenated in the order given (e.g. RNA genes, then ATAC peaks), rows the same cells.

    Each part is a :class:`StoreRows` of one modality (its own column selection and
    binarisation, no cache of its own); they must cover the same cells with the same chunking.
    ``widths`` gives each part's columns, so a model can split a batch again.
    """

    def __init__(self, parts: list[StoreRows], *, cache_bytes: int = 0):
        if not parts:
            raise ValueError("JointRows needs at least one part")
        first = parts[0]
        for p in parts[1:]:
            if p.n_obs != first.n_obs or p.chunk_rows != first.chunk_rows or not np.array_equal(p.cells, first.cells):
                raise ValueError(f"modalities {first.mod!r} and {p.mod!r} differ in cells or chunking; "
                                 "they must be the same cells of one MuData store")
        self.parts = list(parts)
        self.path, self.mod = first.path, tuple(p.mod for p in parts)
        self.widths = tuple(p.n_peaks for p in parts)
        self._init_chunks(first.n_obs, first.chunk_rows, first.cells, cache_bytes)

    @property
    def n_peaks(self) -> int:
        """All columns (the sum of :attr:`widths`)."""
        return int(sum(self.widths))

    def _read_chunk(self, k: int) -> tuple[sp.csr_matrix, np.ndarray]:
        pieces = [p.read_chunk(k) for p in self.parts]
        m = sp.hstack([q[0] for q in pieces], format="csr", dtype=np.float32)
        m.sort_indices()
        return m, pieces[0][1]


def prefetch(it, depth: int = 2):
    """Run ``it`` in a background thread, ``depth`` items ahead (zarr reads and decompression
    release the GIL, so reading overlaps training)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    t = threading.Thread(target=work, name="scatac-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class ShardedStream:
    """The epoch plan of one rank over a :class:`StoreRows` (see the module docstring).

    Parameters
    ----------
    rows
        The reader (:class:`StoreRows`, or :class:`JointRows` for several modalities).
    batch_size
        Global batch: cells per optimisation step over all ranks.
    rank, world
        This process's rank and the number of processes.
    seed
        Seed of chunk permutations and row shuffles.
    buffer_chunks
        Chunks whose rows are shuffled together.
    """

    def __init__(self, rows: ChunkReader, *, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 buffer_chunks: int = 4):
        if batch_size < world:
            raise ValueError(f"batch_size={batch_size} is smaller than the {world} processes; "
                             "raise --batch-size or lower --nproc")
        if rows.n_cells == 0:
            raise ValueError("no cells to train on: the cell mask removed every cell")
        self.rows, self.rank, self.world, self.seed = rows, rank, world, seed
        self.batch_size = batch_size
        self.local_batch = batch_size // world
        self.buffer_chunks = max(1, int(buffer_chunks))
        self.steps_per_epoch = max(1, rows.n_cells // batch_size)
        if rows.n_cells < batch_size:  # tiny data: one step of everything
            self.local_batch = max(1, rows.n_cells // world)

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's chunks in epoch ``epoch`` (non-empty ones, in reading order)."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.rows.n_chunks)
        perm = perm[self.rows.chunk_cells[perm] > 0]
        return perm[self.rank::self.world]

    def _buffers(self, epoch: int) -> list[np.ndarray]:
        mine = self.shard(epoch)
        return [mine[i:i + self.buffer_chunks] for i in range(0, len(mine), self.buffer_chunks)]

    def _read_buffer(self, chunks: np.ndarray, epoch: int, pas: int, b: int) -> tuple[sp.csr_matrix, np.ndarray]:
        parts = [self.rows.read_chunk(int(k)) for k in chunks]
        m = sp.vstack([p[0] for p in parts], format="csr")
        cells = np.concatenate([p[1] for p in parts])
        order = np.random.default_rng([self.seed, epoch, self.rank, pas, b]).permutation(m.shape[0])
        return m[order], cells[order]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[SparseBatch]:
        """The batches of ``epoch`` from step ``start_step`` on (``steps_per_epoch - start_step`` of them)."""
        need = (self.steps_per_epoch - start_step) * self.local_batch
        skip = start_step * self.local_batch
        buffers = self._buffers(epoch)
        sizes = [int(self.rows.chunk_cells[c].sum()) for c in buffers]
        if sum(sizes) == 0:
            raise ValueError(f"rank {self.rank} has no chunk in epoch {epoch}: the store has fewer "
                             f"non-empty chunks ({int((self.rows.chunk_cells > 0).sum())}) than processes; "
                             "lower --nproc or re-chunk the store with fewer rows per chunk")

        def plan():
            nonlocal skip
            pas = 0
            while True:
                for b, (chunks, size) in enumerate(zip(buffers, sizes)):
                    if skip >= size:  # resumed past this buffer: never read it
                        skip -= size
                        continue
                    m, cells = self._read_buffer(chunks, epoch, pas, b)
                    if skip:
                        m, cells, skip = m[skip:], cells[skip:], 0
                    yield m, cells
                pas += 1

        def batches():
            left, lb = need, self.local_batch
            carry_m: list = []
            carry_c: list = []
            have = 0  # rows in the carry
            for m, cells in plan():
                pos = 0
                if have:  # complete the batch started in the previous buffer
                    r = min(lb - have, m.shape[0])
                    carry_m.append(m[:r])
                    carry_c.append(cells[:r])
                    have, pos = have + r, r
                    if have < lb:
                        continue
                    yield SparseBatch.from_csr(sp.vstack(carry_m, format="csr"), np.concatenate(carry_c))
                    carry_m, carry_c, have = [], [], 0
                    left -= lb
                while left > 0 and pos + lb <= m.shape[0]:
                    yield SparseBatch.from_csr(m[pos:pos + lb], cells[pos:pos + lb])
                    pos += lb
                    left -= lb
                if left <= 0:
                    return
                if pos < m.shape[0]:
                    carry_m, carry_c, have = [m[pos:]], [cells[pos:]], m.shape[0] - pos

        if need <= 0:
            return iter(())
        return prefetch(batches(), depth=4)

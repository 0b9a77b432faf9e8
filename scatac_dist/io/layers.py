"""Write a sparse ``layers[key]`` (cells x peaks, float32 CSR) from row blocks computed on
the cluster, chunk by chunk and atomically.

Each block task returns CSR pieces ``(row lengths, column indices, values)`` for a run of
consecutive *used* cells; the pieces are spooled to ``.npy`` files by the workers, then
whole zarr chunks of ``data``/``indices`` are filled from the spool (the same two passes as
:mod:`scatac_dist.io.writer`), in a staging group that replaces ``layers/<key>`` in one
rename. Cells outside ``rows`` get empty rows. Memory: one block per task; the client
holds the row lengths (O(n_cells)).
"""

from __future__ import annotations

import shutil

import dask
import numpy as np
import zarr
from dask import delayed

from .. import _config
from ..store import Atlas
from .writer import _fill_chunk


def _spool(pieces, path: str) -> int:
    counts, cols, vals = pieces
    np.save(f"{path}.L.data.npy", np.asarray(vals, np.float32))
    np.save(f"{path}.L.indices.npy", np.asarray(cols, np.int32))
    np.save(f"{path}.L.rownnz.npy", np.asarray(counts, np.int64))
    return int(len(cols))


def publish_layer(atlas: Atlas, src, key: str) -> None:
    """Put the finished array group ``src`` in as ``layers[key]``, in the enclosing
    publication (:meth:`Atlas.publishing`), creating the ``layers`` group if need be."""
    atlas.put_group(f"layers/{key}", src)


def write_csr_layer(atlas: Atlas, key: str, blocks: list, rows: np.ndarray, n_cols: int | None = None) -> int:
    """Write ``layers[key]`` from ``blocks`` (delayed CSR pieces, in order) covering the store
    rows ``rows`` (sorted). Returns the number of stored entries."""
    n_cols = atlas.n_vars if n_cols is None else n_cols
    staging = atlas.scratch("layer")
    spool = staging / "spool"
    spool.mkdir(parents=True)
    try:
        nnz = np.array(dask.compute(*[delayed(_spool)(b, str(spool / f"{i:07d}")) for i, b in enumerate(blocks)]),
                       dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(nnz)])
        total = int(offsets[-1])
        chunk = int(_config.get("store.data-chunk-elements"))
        g = zarr.open_group(str(staging / "group"), mode="w", zarr_format=atlas.zarr_format)
        x = g.create_group(key)
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": [atlas.n_obs, n_cols]})
        x.create_array("data", shape=(total,), chunks=(max(chunk, 1),), dtype=np.float32)
        x.create_array("indices", shape=(total,), chunks=(max(chunk, 1),), dtype=np.int32)
        lengths = np.zeros(atlas.n_obs, np.int64)
        lengths[rows] = np.concatenate([np.load(spool / f"{i:07d}.L.rownnz.npy") for i in range(len(blocks))]) \
            if blocks else np.zeros(0, np.int64)
        indptr = x.create_array("indptr", shape=(atlas.n_obs + 1,), chunks=(max(chunk // 2, 1),), dtype=np.int64)
        indptr[:] = np.concatenate([[0], np.cumsum(lengths)])
        tasks = []
        for start in range(0, total, chunk):
            stop = min(start + chunk, total)
            pieces, b = [], int(np.searchsorted(offsets, start, side="right") - 1)
            while b < len(blocks) and offsets[b] < stop:
                lo, hi = max(start, offsets[b]) - offsets[b], min(stop, offsets[b + 1]) - offsets[b]
                if hi > lo:
                    pieces.append((b, int(lo), int(hi)))
                b += 1
            for part, dt in (("data", "<f4"), ("indices", "<i4")):
                tasks.append(delayed(_fill_chunk)(str(staging / "group" / key / part), str(spool), "L", part,
                                                  start, stop, pieces, dt))
        dask.compute(*tasks)
        publish_layer(atlas, staging / "group" / key, key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return total


def read_csr_layer(atlas: Atlas, key: str):
    """``layers[key]`` as a lazy dask array of CSR row blocks (:attr:`Atlas.chunk_rows`)."""
    from anndata.experimental import read_elem_lazy

    return read_elem_lazy(atlas._group()[f"layers/{key}"], chunks=(atlas.chunk_rows, atlas.n_vars))

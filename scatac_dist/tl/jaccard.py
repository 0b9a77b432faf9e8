"""Cell-cell Jaccard similarity on binarised accessibility: exact and dense for small atlases,
blockwise top-k for large ones.

Reads the binarised view of ``X`` (cells in ``obs['pass_qc']``, peaks in
``var['selected']`` when those exist). The blockwise search forms, for every pair of row
blocks, their sparse intersection counts, turns them into Jaccard values ``sub_rows`` rows
at a time, and keeps each cell's top ``k``; the per-block lists of a cell are merged by a
fixed-shape tree reduction. Memory: ``O(n k)`` for the result plus ``sub_rows x chunk`` per
task; never ``n x n``. Work is ``O(n^2)`` products of sparse rows, as any exact top-k is.
"""

from __future__ import annotations

import logging
import time

import dask
import numpy as np
import scipy.sparse as sp
from dask import delayed

from ..blocks import cache_fits, tree_reduce
from ..ops.jaccard import block_topk, jaccard_dense, merge_topk_all
from ..pp.filter import cell_mask
from ..pp.tfidf import binarized_view
from ..store import Atlas

logger = logging.getLogger("scatac_dist")

__all__ = ["jaccard"]

#: above this many cells the exact mode refuses (its n x n float64 matrix would be > 3 GB)
EXACT_MAX_CELLS = 20_000


def jaccard(atlas: Atlas, k: int | None = 30, *, sub_rows: int = 1000, key_added: str = "jaccard"):
    """Jaccard similarity between cells.

    Parameters
    ----------
    k
        Neighbours kept per cell (blockwise top-k, written to ``obsp[key_added]`` as a CSR
        matrix with ``k`` entries per row: the most similar other cells, ties to the lower
        row). ``None``: the exact dense ``n x n`` matrix over the cells used, returned and
        not written (refused above :data:`EXACT_MAX_CELLS` cells).
    sub_rows
        Rows of one block compared at a time (memory ``sub_rows x chunk_rows`` float64).

    Returns
    -------
    ndarray (``k=None``) or ``scipy.sparse.csr_matrix`` (n_obs x n_obs).
    """
    t0 = time.perf_counter()
    B = binarized_view(atlas)
    n = B.shape[0]
    if n == 0:
        raise ValueError("no cells to compare: every cell is filtered out (obs['pass_qc'])")
    if k is None:
        if n > EXACT_MAX_CELLS:
            raise ValueError(f"exact Jaccard of {n} cells needs an {n} x {n} dense matrix; "
                             f"use k=<neighbours> (blockwise top-k) above {EXACT_MAX_CELLS} cells")
        X = B.compute()
        return jaccard_dense(X)
    if not 1 <= k < n:
        raise ValueError(f"k={k} must be between 1 and the number of cells less one ({n - 1})")
    if cache_fits(atlas.nnz // 2):  # binary float32 + int32 indices, half the bytes of the eigen cache
        B = B.persist()
    blocks = B.to_delayed().ravel()
    offs = np.concatenate([[0], np.cumsum(B.chunks[0])]).astype(int)
    rows = []
    for i, bi in enumerate(blocks):
        if B.chunks[0][i] == 0:
            continue
        parts = [delayed(block_topk)(bi, bj, k, int(offs[i]), int(offs[j]), sub_rows)
                 for j, bj in enumerate(blocks) if B.chunks[0][j] > 0]
        rows.append((i, tree_reduce(parts, merge_topk_all, k=k)))
    results = dask.compute(*[r for _, r in rows])
    idx = np.concatenate([r[0] for r in results])
    val = np.concatenate([r[1] for r in results])
    # back to all cells of the store (cells outside the mask get empty rows)
    cells = np.flatnonzero(cell_mask(atlas))
    keep = val > 0
    per_row = np.zeros(atlas.n_obs, np.int64)
    per_row[cells] = keep.sum(axis=1)
    indptr = np.concatenate([[0], np.cumsum(per_row)])
    G = sp.csr_matrix((val[keep], cells[idx[keep]], indptr), shape=(atlas.n_obs, atlas.n_obs))
    with atlas.publishing("jaccard"):
        atlas.write_obsp(key_added, G)
        atlas.record("jaccard", dict(k=k, sub_rows=sub_rows, key_added=key_added), {"total": time.perf_counter() - t0},
                     result={"n_cells": int(n), "mean_top_similarity": float(val[:, 0].mean())})
    logger.info("jaccard: top-%d neighbours of %d cells in %.1f s", k, n, time.perf_counter() - t0)
    return G

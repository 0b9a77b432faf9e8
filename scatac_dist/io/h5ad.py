"""Reader of AnnData ``.h5ad`` files, read backed and in row blocks.

``X`` (or a layer) may be CSR (blocks are slices of the file), dense (row slices) or CSC
(streamed column by column and bucketed by cell, like a MatrixMarket file). Peak
coordinates come from ``var`` columns ``chr``/``start``/``end`` or from peak names. A file
whose features are not intervals at all (named ``"0"``, ``"1"``, ... or ``"peak_123"``) is
ingested without coordinates, with a warning; see :mod:`scatac_dist.io.features`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp
from anndata.io import read_elem

from ..errors import InputError
from ._buckets import bucket_recipes, iter_batches, write_piece
from .features import COORDINATES, var_from_table
from .tenx_h5 import open_h5
from .writer import BlockPlan, check_counts

logger = logging.getLogger("scatac_dist")

__all__ = ["plan_h5ad"]


def _elem_path(layer: str | None) -> str:
    return "X" if layer is None else f"layers/{layer}"


def _csr_block(path: str, elem: str, start: int, stop: int, n_cols: int) -> sp.csr_matrix:
    with h5py.File(path, "r") as f:
        g = f[elem]
        indptr = g["indptr"][start:stop + 1].astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        return sp.csr_matrix((g["data"][lo:hi], g["indices"][lo:hi], indptr - lo),
                             shape=(stop - start, n_cols))


def _dense_block(path: str, elem: str, start: int, stop: int) -> sp.csr_matrix:
    with h5py.File(path, "r") as f:
        return sp.csr_matrix(f[elem][start:stop])


def _csc_piece(path: str, elem: str, piece: int, c0: int, c1: int, n_cells: int, chunk_rows: int,
               workdir: str, round_counts: bool):
    """Worker task: columns [c0, c1) of a CSC matrix, bucketed by cell."""
    with h5py.File(path, "r") as f:
        g = f[elem]
        ip = g["indptr"][c0:c1 + 1].astype(np.int64)
        lo, hi = int(ip[0]), int(ip[-1])
        rows = g["indices"][lo:hi]
        vals = check_counts(g["data"][lo:hi], path, round_counts=round_counts)
    cols = np.repeat(np.arange(c0, c1, dtype=np.int32), np.diff(ip))
    return write_piece(workdir, piece, rows.astype(np.int32), cols, vals.astype(np.uint32),
                       n_cells, chunk_rows)


def plan_h5ad(path: str | Path, *, chunk_rows: int, workdir: str | Path, client, layer: str | None = None,
              round_counts: bool = False, progress: bool = True) -> BlockPlan:
    """Check an ``.h5ad`` file and describe its row blocks; see the module docstring."""
    path = Path(path)
    elem = _elem_path(layer)
    with open_h5(path) as f:
        if "obs" not in f or "var" not in f:
            raise InputError(path, "is not an AnnData file (no obs/var groups)",
                             "give an .h5ad written by anndata, or --format 10x-h5 for Cell Ranger")
        if elem not in f:
            raise InputError(path, f"has no {elem}", "name an existing layer with --layer, "
                             f"or omit it to use X (layers: {sorted(f['layers'].keys()) if 'layers' in f else []})")
        try:
            obs = read_elem(f["obs"])
            var_in = read_elem(f["var"])
        except Exception as exc:  # anndata raises many types on damaged groups
            raise InputError(path, f"has unreadable obs/var ({exc})",
                             "the file is truncated or corrupt; re-write it with anndata") from exc
        node = f[elem]
        enc = node.attrs.get("encoding-type", "array" if isinstance(node, h5py.Dataset) else None)
        if isinstance(node, h5py.Group):
            shape = tuple(int(s) for s in node.attrs["shape"])
        else:
            shape = node.shape
    n_cells, n_cols = shape
    if len(obs) != n_cells or len(var_in) != n_cols:
        raise InputError(path, f"{elem} is {n_cells} x {n_cols} but obs has {len(obs)} rows and "
                         f"var {len(var_in)}", "the file is inconsistent; re-write it with anndata")
    if obs.index.has_duplicates:
        raise InputError(path, f"has duplicate cell names (e.g. {obs.index[obs.index.duplicated()][0]})",
                         "make them unique first (AnnData.obs_names_make_unique())")
    var = var_from_table(var_in, path, allow_unplaced=True)
    if not set(COORDINATES) <= set(var.columns):
        logger.warning(
            "%s: its %d features have no genomic coordinates (no chr/start/end columns in var, and names "
            "such as %s are not chr:start-end intervals); ingesting them under their own names. Coordinates "
            "are unknown in this store: `scatac-dist scembed` (train, encode, annotate) and export to a peaks "
            "BED or a 10x matrix will refuse it. Give var columns chr, start and end (or name features "
            "chr:start-end) and ingest again to enable them.",
            path, len(var), ", ".join(repr(x) for x in var.index[:3]))

    if enc == "csr_matrix":
        recipes = [(_csr_block, (str(path), elem, s, e, n_cols))
                   for s, e in iter_batches(n_cells, chunk_rows)]
    elif enc == "array":
        recipes = [(_dense_block, (str(path), elem, s, e)) for s, e in iter_batches(n_cells, chunk_rows)]
    elif enc == "csc_matrix":
        logger.info("%s: %s is CSC; reordering it by cell through on-disk buckets", path, elem)
        Path(workdir).mkdir(parents=True, exist_ok=True)
        futures = [client.submit(_csc_piece, str(path), elem, piece, c0, c1, n_cells, chunk_rows,
                                 str(workdir), round_counts, pure=False)
                   for piece, (c0, c1) in enumerate(iter_batches(n_cols, max(1, chunk_rows)))]
        counts = client.gather(futures)
        recipes = bucket_recipes(workdir, counts, n_cells, chunk_rows, n_cols)
    else:
        raise InputError(path, f"{elem} has encoding {enc!r}, not a matrix",
                         "store counts as a dense array or CSR/CSC sparse matrix")
    return BlockPlan(source=path, obs=obs, var={"X": var}, recipes=recipes)

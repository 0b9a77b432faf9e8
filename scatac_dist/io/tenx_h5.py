"""Reader of 10x HDF5 matrices: Cell Ranger ATAC ``filtered_peak_bc_matrix.h5`` and
Cell Ranger ARC ``filtered_feature_bc_matrix.h5`` (joint RNA + ATAC).

The ``matrix`` group stores features x barcodes in CSC form, which is cells x features in
CSR form: a block of cells is one contiguous slice of ``data``/``indices``, so workers read
their blocks straight from the file with no reordering.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from .features import peaks_from_names
from .writer import BlockPlan

logger = logging.getLogger("scatac_dist")

__all__ = ["plan_10x_h5", "open_h5"]

RNA_TYPE, PEAK_TYPE = "Gene Expression", "Peaks"


def open_h5(path: str | Path) -> h5py.File:
    """Open an HDF5 file read-only, turning h5py's errors into an :class:`InputError`."""
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputError(path, f"is not a readable HDF5 file ({exc})",
                         "the file looks truncated or corrupt: re-download or re-export it "
                         "(`h5ls -r FILE` lists what can still be read)") from exc


def _strings(ds) -> np.ndarray:
    return np.char.decode(ds[:].astype(bytes), "utf-8").astype(object) if ds.dtype.kind == "S" \
        else ds[:].astype(str).astype(object)


def _h5_block(path: str, start: int, stop: int, n_features: int,
              splits: dict[str, np.ndarray] | None):
    """Worker task: cells [start, stop) as CSR (cells x features), split by modality."""
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        indptr = m["indptr"][start:stop + 1].astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        data = m["data"][lo:hi]
        indices = m["indices"][lo:hi]
    if indices.size and (indices.min() < 0 or indices.max() >= n_features):
        raise InputError(path, f"has feature indices outside 0..{n_features - 1} in cells "
                         f"{start}..{stop - 1}", "the file is corrupt; re-export it")
    block = sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, n_features))
    if splits is None:
        return block
    return {key: block[:, cols] for key, cols in splits.items()}


def plan_10x_h5(path: str | Path, *, chunk_rows: int) -> BlockPlan:
    """Check a 10x HDF5 file and describe its row blocks.

    A file whose features are all ``Peaks`` gives a plain atlas (``var`` key ``"X"``); one
    with ``Gene Expression`` and ``Peaks`` gives a joint store (keys ``"rna"`` and ``"atac"``).
    """
    path = Path(path)
    with open_h5(path) as f:
        if "matrix" not in f:
            raise InputError(path, f"has no 'matrix' group (top level: {sorted(f.keys())[:6]})",
                             "give a Cell Ranger (ATAC, ARC, or v3+) filtered_*_bc_matrix.h5; "
                             "an .h5ad file needs --format h5ad")
        m = f["matrix"]
        try:
            n_features, n_cells = (int(v) for v in m["shape"][:2])
            barcodes = pd.Index(_strings(m["barcodes"]))
            feats = m["features"]
            ids = _strings(feats["id"])
            ftype = _strings(feats["feature_type"]) if "feature_type" in feats else \
                np.full(len(ids), PEAK_TYPE, dtype=object)
            names = _strings(feats["name"]) if "name" in feats else ids
            intervals = _strings(feats["interval"]) if "interval" in feats else None
            n_indptr, n_data, n_indices = len(m["indptr"]), len(m["data"]), len(m["indices"])
            last = int(m["indptr"][-1]) if n_indptr else -1
        except (KeyError, OSError) as exc:
            raise InputError(path, f"is missing or cannot read part of the 10x layout ({exc})",
                             "the file is truncated or not a Cell Ranger HDF5 matrix; re-export it") from exc
    if len(barcodes) != n_cells:
        raise InputError(path, f"lists {len(barcodes)} barcodes but its matrix has {n_cells} cells",
                         "the file is inconsistent; re-export it from Cell Ranger")
    if len(ids) != n_features:
        raise InputError(path, f"lists {len(ids)} features but its matrix has {n_features} rows",
                         "the file is inconsistent; re-export it from Cell Ranger")
    if n_indptr != n_cells + 1 or n_data != n_indices or last != n_data:
        raise InputError(path, f"has an inconsistent sparse matrix (indptr {n_indptr}, data {n_data}, "
                         f"indices {n_indices}, last pointer {last})",
                         "the file is truncated or corrupt; re-export it")
    if barcodes.has_duplicates:
        raise InputError(path, f"lists barcode {barcodes[barcodes.duplicated()][0]} more than once",
                         "barcodes must be unique; re-export the matrix")

    peaks = np.flatnonzero(ftype == PEAK_TYPE)
    genes = np.flatnonzero(ftype == RNA_TYPE)
    other = set(ftype) - {PEAK_TYPE, RNA_TYPE}
    if other:
        logger.warning("%s: ignoring features of type %s", path, sorted(other))
    if not len(peaks):
        raise InputError(path, "has no 'Peaks' features", "give a Cell Ranger ATAC or ARC matrix")
    peak_names = intervals[peaks] if intervals is not None else ids[peaks]
    var_atac = peaks_from_names(peak_names, path)
    if len(genes):
        var_rna = pd.DataFrame({"gene_ids": ids[genes], "feature_types": RNA_TYPE,
                                "interval": intervals[genes] if intervals is not None else ""},
                               index=pd.Index(names[genes]).astype(str))
        if var_rna.index.has_duplicates:  # scanpy's var_names_make_unique convention
            from anndata.utils import make_index_unique

            var_rna.index = make_index_unique(var_rna.index)
        var = {"rna": var_rna, "atac": var_atac}
        splits = {"rna": genes, "atac": peaks}
    else:
        var = {"X": var_atac}
        splits = None if len(peaks) == n_features else {"X": peaks}
    recipes = [(_h5_block, (str(path), s, min(s + chunk_rows, n_cells), n_features, splits))
               for s in range(0, n_cells, chunk_rows)]
    return BlockPlan(source=path, obs=pd.DataFrame(index=barcodes), var=var, recipes=recipes)

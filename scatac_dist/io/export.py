"""Export an atlas to the 10x formats other tools read (and our benchmarks ingest).

Both exporters stream the store one row block at a time, so memory stays bounded by a block.
They run on the client: a gzip stream and an HDF5 file each have a single writer.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from ..store import Atlas
from .features import require_intervals

__all__ = ["export_10x_mtx", "export_10x_h5"]


def _blocks(atlas: Atlas, progress: bool, desc: str):
    X = atlas.X
    from ..progress import bar

    it = bar(range(X.numblocks[0]), desc=desc, unit="block", enabled=progress)
    row0 = 0
    for b in it:
        block = X.blocks[b].compute(scheduler="sync")
        yield row0, block
        row0 += block.shape[0]


def export_10x_mtx(atlas: Atlas, folder: str | Path, *, compresslevel: int = 6,
                   progress: bool = False) -> Path:
    """Write a Cell Ranger ATAC ``filtered_peak_bc_matrix/`` folder (peaks x cells).

    Reads ``X``, ``obs_names`` and ``var`` (``chr``/``start``/``end``); a store whose features
    have no coordinates is refused (:func:`~scatac_dist.io.features.require_intervals`) before
    anything is written.
    """
    folder = Path(folder)
    peaks = require_intervals(atlas, "export to a 10x folder (peaks.bed)")
    folder.mkdir(parents=True, exist_ok=True)
    peaks.to_csv(folder / "peaks.bed", sep="\t", header=False, index=False)
    pd.Series(atlas.obs.index).to_csv(folder / "barcodes.tsv", header=False, index=False)
    tmp = folder / ".matrix.mtx.gz.partial"
    with gzip.open(tmp, "wt", compresslevel=compresslevel, encoding="ascii") as fh:
        fh.write("%%MatrixMarket matrix coordinate integer general\n")
        fh.write('%metadata_json: {"software_version": "scatac-dist", "format_version": 2}\n')
        fh.write(f"{atlas.n_vars} {atlas.n_obs} {atlas.nnz}\n")
        for row0, block in _blocks(atlas, progress, "writing matrix.mtx.gz"):
            coo = block.tocoo()
            pd.DataFrame({"p": coo.col + 1, "c": coo.row + row0 + 1, "v": coo.data}).to_csv(
                fh, sep=" ", header=False, index=False)
    os.replace(tmp, folder / "matrix.mtx.gz")
    return folder


def export_10x_h5(atlas: Atlas, path: str | Path, *, compression: str | None = "gzip",
                  progress: bool = False) -> Path:
    """Write a Cell Ranger ATAC ``filtered_peak_bc_matrix.h5`` (CSC peaks x cells).

    Reads ``X``, ``obs_names`` and ``var`` (``chr``/``start``/``end``); a store whose features
    have no coordinates is refused (:func:`~scatac_dist.io.features.require_intervals`) before
    anything is written.
    """
    path = Path(path)
    peaks = require_intervals(atlas, "export to a 10x .h5 (features/interval)")
    tmp = path.with_name(f".{path.name}.partial")
    names = (peaks["chr"] + ":" + peaks["start"].astype(str) + "-" + peaks["end"].astype(str))
    nnz = atlas.nnz
    with h5py.File(tmp, "w") as f:
        m = f.create_group("matrix")
        kw = {"compression": compression} if compression else {}
        chunk = (min(max(nnz, 1), 1 << 20),)
        data = m.create_dataset("data", shape=(nnz,), dtype=np.int32, chunks=chunk, **kw)
        indices = m.create_dataset("indices", shape=(nnz,), dtype=np.int64, chunks=chunk, **kw)
        indptr = np.zeros(atlas.n_obs + 1, dtype=np.int64)
        pos = 0
        for row0, block in _blocks(atlas, progress, "writing h5"):
            data[pos: pos + block.nnz] = block.data
            indices[pos: pos + block.nnz] = block.indices
            indptr[row0 + 1: row0 + 1 + block.shape[0]] = pos + block.indptr[1:]
            pos += block.nnz
        m.create_dataset("indptr", data=indptr)
        m.create_dataset("shape", data=np.array([atlas.n_vars, atlas.n_obs], dtype=np.int32))
        m.create_dataset("barcodes", data=np.array(atlas.obs.index.astype(str), dtype="S"))
        feats = m.create_group("features")
        feats.create_dataset("id", data=np.array(names, dtype="S"))
        feats.create_dataset("name", data=np.array(names, dtype="S"))
        feats.create_dataset("feature_type", data=np.full(len(names), b"Peaks"))
        feats.create_dataset("genome", data=np.full(len(names), b"synthetic"))
        feats.create_dataset("interval", data=np.array(names, dtype="S"))
        feats.create_dataset("_all_tag_keys", data=np.array([b"genome", b"interval"]))
    os.replace(tmp, path)
    return path

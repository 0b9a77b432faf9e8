"""The validation panel's data sets: labelled cells x peaks matrices beyond the three shared
sets as they are, built here from what the machine has.

* the shared sets whose size every peer can run (bm0828, Leukemia), as counts and binarised
  (0/1, as many public matrices are published);
* subsamples of the SNARE MOp ATAC by cell type, at the sizes and kinds of the sets kept back
  for evaluation: 6 types x 100 cells (counts), 8 types and 1,000 cells in proportion
  (binarised), 10 types and 2,000 cells in proportion (counts); SNARE's ``Mis`` cells are
  left out;
* generated atlases with known truth (:func:`scatac_dist.datasets.synthesize`) at three
  difficulties: easy (the default signal), hard (weak signal) and sparse (weak signal, a
  quarter of the depth, binarised).

Peaks open in no cell of a set are dropped. Every set is written once as ``NAME.h5ad``
(X: CSR float32; ``obs['label']``) under the panel folder; :func:`ensure_set` ingests a
fresh store from it for each method that writes into one. Full SNARE (9,190 cells) is not in
the panel: the authors' scCASE does not finish it within 25 minutes here (``bench_sccase``),
and ``bench_quality.py`` already scores it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .stores import DATASETS, ingest_dataset, root_obs

#: name -> (kind, source, options); kind "real", "snare" (subsample) or "synth"
PANEL = {
    "bm0828": ("real", "bm0828", {}),
    "bm0828_bin": ("real", "bm0828", {"binary": True}),
    "leukemia": ("real", "leukemia", {}),
    "leukemia_bin": ("real", "leukemia", {"binary": True}),
    "snare_6x100": ("snare", "snare", {"types": 6, "per_type": 100, "seed": 1}),
    "snare_8t_1k_bin": ("snare", "snare", {"types": 8, "cells": 1000, "seed": 2, "binary": True}),
    "snare_10t_2k": ("snare", "snare", {"types": 10, "cells": 2000, "seed": 3}),
    "synth_easy": ("synth", None, {"signal": 0.25, "fragments": 1000.0}),
    "synth_hard": ("synth", None, {"signal": 0.08, "fragments": 1000.0}),
    "synth_sparse_bin": ("synth", None, {"signal": 0.12, "fragments": 250.0, "binary": True}),
}

#: generated sets: cells, peaks, types
SYNTH_SHAPE = dict(n_cells=1200, n_peaks=20_000, n_clusters=8)


def _real(name: str, work: Path, client):
    """The shared set ``name`` as (CSR counts, labels), the labelled cells only."""
    import scipy.sparse as sp

    import scatac_dist as sd

    store = ingest_dataset(name, work, client, reuse=True)
    atlas = sd.open_atlas(store)
    y = root_obs(store).loc[atlas.obs.index, DATASETS[name]["key"]].astype(str).to_numpy()
    X = sp.csr_matrix(atlas.X.compute(), dtype=np.float32)
    ok = (y != "Mis") & (y != "nan")
    return X[ok], y[ok]


def _snare_subsample(X, y, *, types: int, seed: int, per_type: int | None = None, cells: int | None = None):
    """``types`` cell types drawn at random among those with enough cells, then ``per_type``
    cells of each, or ``cells`` cells in the types' own proportions (each type at least 20)."""
    rng = np.random.default_rng(seed)
    names, counts = np.unique(y, return_counts=True)
    need = per_type if per_type else 20
    pick = np.sort(rng.choice(names[counts >= max(need, 40)], types, replace=False))
    rows = []
    if per_type:
        for t in pick:
            rows.append(rng.choice(np.flatnonzero(y == t), per_type, replace=False))
    else:
        avail = np.array([np.count_nonzero(y == t) for t in pick])
        share = np.maximum(20, np.round(cells * avail / avail.sum()).astype(int))
        share = np.minimum(share, avail)
        for t, k in zip(pick, share):
            rows.append(rng.choice(np.flatnonzero(y == t), k, replace=False))
    rows = np.sort(np.concatenate(rows))
    return X[rows], y[rows]


def _synth(opts: dict, folder: Path, client):
    import scipy.sparse as sp

    import scatac_dist as sd
    from scatac_dist.datasets import SynthParams, synthesize

    tmp = folder / "_synth.zarr"
    params = SynthParams(**SYNTH_SHAPE, signal=opts["signal"], fragments=opts["fragments"], seed=7)
    synthesize(tmp, params, overwrite=True, client=client, progress=False)
    atlas = sd.open_atlas(tmp)
    X = sp.csr_matrix(atlas.X.compute(), dtype=np.float32)
    y = atlas.obs["celltype"].astype(str).to_numpy()
    shutil.rmtree(tmp, ignore_errors=True)
    return X, y


def build(name: str, folder: Path, work: Path, client) -> Path:
    """``FOLDER/NAME.h5ad`` for panel set ``name`` (built once, reused)."""
    import anndata as ad
    import pandas as pd

    out = folder / f"{name}.h5ad"
    if out.exists():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    kind, source, opts = PANEL[name]
    if kind == "synth":
        X, y = _synth(opts, folder, client)
    else:
        X, y = _real(source, work, client)
        if kind == "snare":
            X, y = _snare_subsample(X, y, **{k: v for k, v in opts.items() if k != "binary"})
    if opts.get("binary"):
        X = X.copy()
        X.data[:] = 1
    keep = np.asarray((X > 0).sum(0)).ravel() > 0
    X = X[:, np.flatnonzero(keep)]
    X.eliminate_zeros()
    var = pd.DataFrame(index=[f"chr1_{1000 * i}_{1000 * i + 500}" for i in range(X.shape[1])])
    obs = pd.DataFrame({"label": pd.Categorical(y)}, index=[f"{name}_{i}" for i in range(X.shape[0])])
    tmp = out.with_suffix(".tmp.h5ad")
    ad.AnnData(X.astype(np.float32), obs=obs, var=var).write_h5ad(tmp)
    tmp.replace(out)
    return out


def ensure_store(h5ad: Path, store: Path, client) -> Path:
    """A fresh store ingested from ``h5ad`` (replacing any earlier one)."""
    import scatac_dist as sd

    sd.ingest(h5ad, store, overwrite=True, client=client, progress=False)
    return store


def describe(h5ad: Path) -> dict:
    """Cells, peaks, types, whether the values are 0/1, median open peaks per cell."""
    import anndata as ad

    a = ad.read_h5ad(h5ad)
    X = a.X
    return {"n_cells": int(X.shape[0]), "n_peaks": int(X.shape[1]), "n_types": int(a.obs["label"].nunique()),
            "binary": bool(X.data.max() <= 1), "median_open": float(np.median(np.diff(X.indptr)))}

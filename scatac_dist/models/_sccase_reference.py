"""scCASER's reference (Eq. 3, 13-14): a projection ``P`` (kept peaks x k1) from NMF of a
reference matrix over the target's peaks.

The reference is built in one of the paper's three ways: a bulk matrix
(:func:`reference_matrix`), a labelled single-cell set summed per label (pseudo-bulk, the
same function with ``labels_key``), or the target's own Leiden clusters
(:func:`self_reference_matrix`). :func:`reference_projection` scales and factorises it.

**Memory.** Only the reference matrix over the kept peaks (peaks x samples or labels) is ever
held whole. A table is read in blocks of rows (peaks); an ``.h5ad``/``.zarr`` AnnData in
blocks of ``chunk_rows`` cells, each block read by a Dask task straight from the file
(anndata's backed sparse datasets) and reduced there: summed per label for a labelled
single-cell reference, cut to the kept peaks for a bulk one; the per-block sums are added in
a fixed tree. So a task holds one block, and the client its labels (one per cell) and the
result. A reference without labels is refused above :data:`MAX_SAMPLES` samples, since its
matrix is dense (pseudo-bulk it with ``reference_labels``). On a multi-node cluster the file
must be on a filesystem the workers see.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import dask
import numpy as np
import scipy.sparse as sp
from dask import delayed

from ..blocks import tree_sum
from ..errors import InputError
from ..store import Atlas
from . import sccase_pattern as data
from ._sccase_init import nmf_init

logger = logging.getLogger("scatac_dist")

#: a reference without labels is a dense kept-peaks x samples matrix: refused above this
MAX_SAMPLES = 10_000
#: table rows (peaks) read at a time
TABLE_ROWS = 100_000


def reference_projection(pat: data.Pattern, K: int, *, atlas: Atlas, reference: Any = None,
                         labels_key: str | None = None, self_reference: bool = False,
                         n_ref_factors: int | None = None, seed: int = 0, nmf_cells: int = 20_000,
                         max_iter: int = 500) -> tuple[np.ndarray | None, dict | None]:
    """``P`` (kept peaks x k1) and a summary of the reference, or ``(None, None)`` without one.

    Each reference sample is scaled to sum 1 over the kept peaks and weighted by the target's
    IDF, so it is on the scale of ``X``; ``k1`` is ``n_ref_factors``, by default
    ``round(K / 3)`` (at least 1, at most the reference's samples).
    """
    if reference is None and not self_reference:
        return None, None
    if self_reference:
        M, info = self_reference_matrix(pat, K, seed=seed, nmf_cells=nmf_cells, max_iter=max_iter)
    else:
        M, info = reference_matrix(reference, atlas, pat, labels_key, chunk_rows=atlas.chunk_rows)
    k1 = n_ref_factors or max(1, round(K / 3))
    k1 = int(min(k1, M.shape[1]))
    from sklearn.decomposition import NMF

    tot = M.sum(0)
    M = M / np.where(tot > 0, tot, 1) * pat.w[:, None]
    P = NMF(k1, init="nndsvda", max_iter=max_iter, random_state=seed).fit_transform(M)
    info.update(n_ref_factors=k1)
    return P, info


def _table_sep(path: Path) -> str:
    return "\t" if path.suffix in (".tsv", ".txt") or path.name.endswith((".tsv.gz", ".txt.gz")) else ","


def _table_matrix(path: Path, names: np.ndarray):
    """A peaks x samples table aligned to ``names``, read ``TABLE_ROWS`` rows at a time."""
    import pandas as pd

    sep = _table_sep(path)
    samples = pd.read_csv(path, sep=sep, index_col=0, nrows=0).columns.astype(str)
    if len(samples) > MAX_SAMPLES:
        raise InputError(path, f"the reference has {len(samples)} samples, more than a bulk reference "
                         f"({MAX_SAMPLES})", "give a labelled single-cell reference with reference_labels")
    target = pd.Index(names.astype(str))
    M = np.zeros((len(names), len(samples)))
    seen = np.zeros(len(names), bool)
    for tab in pd.read_csv(path, sep=sep, index_col=0, chunksize=TABLE_ROWS):
        pos = target.get_indexer(tab.index.astype(str))
        hit = pos >= 0
        vals = tab.to_numpy(np.float64)[hit]
        if (vals < 0).any():
            raise ValueError("the reference has negative values; give counts or non-negative signal")
        if seen[pos[hit]].any() or len(np.unique(pos[hit])) < hit.sum():
            raise InputError(path, "the reference names a peak twice", "give each peak one row")
        M[pos[hit]] = vals
        seen[pos[hit]] = True
    return M, seen, len(samples)


def _open_x(path: str):
    """The reference's ``X`` from its file: a backed sparse dataset, or the dense array."""
    from anndata.io import sparse_dataset

    if path.endswith(".h5ad"):
        import h5py

        f = h5py.File(path, "r")
        g = f["X"]
    else:
        import zarr

        f = None
        g = zarr.open_group(path, mode="r")["X"]
    if hasattr(g, "attrs") and g.attrs.get("encoding-type") in ("csr_matrix", "csc_matrix"):
        return sparse_dataset(g), f
    return g, f


def _ref_rows(path: str, lo: int, hi: int, cols: np.ndarray, codes, n_groups: int) -> np.ndarray:
    """Rows ``lo:hi`` of the reference at ``path``, cut to ``cols``: summed per label code
    (``n_groups`` x len(cols)) or as they are (rows x len(cols)); dense float64."""
    X, f = _open_x(path)
    try:
        b = X[lo:hi]
    finally:
        if f is not None:
            f.close()
    return _reduce_rows(b, cols, codes, n_groups)


def _reduce_rows(b, cols, codes, n_groups) -> np.ndarray:
    b = sp.csr_matrix(b, dtype=np.float64) if sp.issparse(b) else np.asarray(b, np.float64)
    b = b[:, cols]
    neg = (b.data < 0).any() if sp.issparse(b) else (b < 0).any()
    if neg:
        raise ValueError("the reference has negative values; give counts or non-negative signal")
    if codes is None:
        return b.toarray() if sp.issparse(b) else b
    S = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n_groups, len(codes)))
    out = S @ b
    return out.toarray() if sp.issparse(out) else np.asarray(out)


def reference_matrix(reference, atlas: Atlas, pat: data.Pattern, labels_key: str | None, *,
                     chunk_rows: int = 10_000):
    """The reference as a peaks (kept) x samples matrix, aligned to the target's peaks by name.

    ``reference``: a table (CSV/TSV; rows peaks named as the store's ``var_names``, columns
    samples) or an AnnData file/store (``.h5ad``/``.zarr``; samples or cells x peaks), or an
    AnnData object. With ``labels_key`` the AnnData is single-cell and is summed per
    ``obs[labels_key]`` (pseudo-bulk). Read in blocks (module docstring).
    """
    import anndata as ad
    import pandas as pd

    names = atlas.var.index.to_numpy()[pat.peaks]
    info: dict[str, Any] = {}
    path = None
    if isinstance(reference, (str, Path)):
        path = Path(reference)
        if not path.exists():
            raise FileNotFoundError(f"reference {path} does not exist")
        info["path"] = str(path)
        if not (path.suffix in (".h5ad", ".zarr") or path.is_dir()):
            if labels_key is not None:
                raise InputError(path, "reference_labels names cells of a single-cell reference, but this is "
                                 "a table", "give an .h5ad or .zarr AnnData, or leave out reference_labels")
            M, seen, n_samples = _table_matrix(path, names)
            return _finish(M, seen, n_samples, names, info)
        if path.suffix == ".h5ad":
            ref = ad.read_h5ad(path, backed="r")           # obs and var only; X stays in the file
            obs, var_names, n_ref = ref.obs, ref.var_names, ref.n_obs
            ref.file.close()
        else:
            import zarr

            g = zarr.open_group(str(path), mode="r")
            obs, var_names = ad.io.read_elem(g["obs"]), ad.io.read_elem(g["var"]).index
            n_ref = len(obs)
    else:
        obs, var_names, n_ref = reference.obs, reference.var_names, reference.n_obs
    if labels_key is not None:
        if labels_key not in obs:
            raise KeyError(f"the reference has no obs[{labels_key!r}]; its columns are {list(obs.columns)}")
        lab = obs[labels_key].astype(str).to_numpy()
        groups, codes = np.unique(lab, return_inverse=True)
        info["pseudo_bulk_of"] = labels_key
        n_samples = len(groups)
    else:
        codes, n_samples = None, n_ref
        if n_samples > MAX_SAMPLES:
            raise InputError(path, f"the reference has {n_samples} samples and no labels; as a bulk reference its "
                             f"matrix would be dense (at most {MAX_SAMPLES} samples)",
                             "pseudo-bulk it: give reference_labels=<obs column of cell types>")
    pos = pd.Index(pd.Index(var_names).astype(str)).get_indexer(names.astype(str))
    seen = pos >= 0
    if not seen.any():
        raise ValueError(f"the reference shares none of the {len(names)} peaks used; its features must be named "
                         f"like the store's var_names (e.g. {names[0]!r})")
    cols = pos[seen]
    bounds = [(lo, min(lo + chunk_rows, n_ref)) for lo in range(0, n_ref, chunk_rows)]
    cut = (lambda lo, hi: None) if codes is None else (lambda lo, hi: codes[lo:hi])
    if path is not None:                                   # one task per block, reading the file
        cols_d = data.share(cols)
        parts = [delayed(_ref_rows)(str(path), lo, hi, cols_d, cut(lo, hi), n_samples) for lo, hi in bounds]
        if codes is None:
            R = np.concatenate(dask.compute(*parts)) if parts else np.zeros((0, len(cols)))
        else:
            R = dask.compute(tree_sum(parts))[0] if parts else np.zeros((n_samples, len(cols)))
    else:                                                  # already in memory: block by block here
        R = np.zeros((n_samples, len(cols))) if codes is not None else np.zeros((0, len(cols)))
        rows = []
        for lo, hi in bounds:
            r = _reduce_rows(reference.X[lo:hi], cols, cut(lo, hi), n_samples)
            if codes is None:
                rows.append(r)
            else:
                R += r
        if codes is None and rows:
            R = np.concatenate(rows)
    M = np.zeros((len(names), n_samples))
    M[seen] = R.T
    return _finish(M, seen, n_samples, names, info)


def _finish(M, seen, n_samples, names, info):
    missing = int((~seen).sum())
    if missing == len(names):
        raise ValueError(f"the reference shares none of the {len(names)} peaks used; its features must be named "
                         f"like the store's var_names (e.g. {names[0]!r})")
    info.update(n_samples=int(n_samples), peaks_missing=missing)
    if missing:
        logger.warning("sccase: %d of %d peaks are not in the reference (set to 0 there)", missing, len(names))
    return M, info


def self_reference_matrix(pat: data.Pattern, K: int, *, seed: int = 0, nmf_cells: int = 20_000,
                          max_iter: int = 500):
    """Pseudo-bulk self-reference: Leiden clusters (resolution 1, 15-NN graph of the NMF
    embedding of the target), binarised accessibility summed per cluster (kept peaks x
    clusters). The paper uses Louvain at its default resolution."""
    from ..tl.graph import connectivities, knn_graph, leiden_labels

    _, H = nmf_init(pat, K, seed=seed, nmf_cells=nmf_cells, max_iter=max_iter)
    E = H.T / np.maximum(np.linalg.norm(H.T, axis=1, keepdims=True), 1e-300)
    idx, dist = knn_graph(E, min(15, pat.n - 1), seed=seed)
    labels = leiden_labels(connectivities(idx, dist, pat.n), resolution=1.0, seed=seed)
    groups = np.unique(labels)
    M = np.zeros((pat.m, len(groups)))
    for lo, hi in pat.blocks():
        B = data.pattern_rows(pat, np.arange(lo, hi), binary=True)
        S = sp.csr_matrix((np.ones(hi - lo), (np.searchsorted(groups, labels[lo:hi]), np.arange(hi - lo))),
                          shape=(len(groups), hi - lo))
        M += np.asarray((S @ B).todense()).T
    return M, {"self_reference_clusters": int(len(groups))}

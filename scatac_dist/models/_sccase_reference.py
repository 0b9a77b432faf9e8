"""scCASER's reference (Eq. 3, 13-14): a projection ``P`` (kept peaks x k1) from NMF of a
reference matrix over the target's peaks.

The reference is built in one of the paper's three ways: a bulk matrix
(:func:`reference_matrix`), a labelled single-cell set summed per label (pseudo-bulk, the
same function with ``labels_key``), or the target's own Leiden clusters
(:func:`self_reference_matrix`). :func:`reference_projection` scales and factorises it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..store import Atlas
from . import sccase_pattern as data
from ._sccase_init import nmf_init

logger = logging.getLogger("scatac_dist")


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
        M, info = reference_matrix(reference, atlas, pat, labels_key)
    k1 = n_ref_factors or max(1, round(K / 3))
    k1 = int(min(k1, M.shape[1]))
    from sklearn.decomposition import NMF

    tot = M.sum(0)
    M = M / np.where(tot > 0, tot, 1) * pat.w[:, None]
    P = NMF(k1, init="nndsvda", max_iter=max_iter, random_state=seed).fit_transform(M)
    info.update(n_ref_factors=k1)
    return P, info


def _read_table(path: Path):
    import pandas as pd

    sep = "\t" if path.suffix in (".tsv", ".txt") or path.name.endswith((".tsv.gz", ".txt.gz")) else ","
    return pd.read_csv(path, sep=sep, index_col=0)


def reference_matrix(reference, atlas: Atlas, pat: data.Pattern, labels_key: str | None):
    """The reference as a peaks (kept) x samples matrix, aligned to the target's peaks by name.

    ``reference``: a table (CSV/TSV; rows peaks named as the store's ``var_names``, columns
    samples) or an AnnData file/store (``.h5ad``/``.zarr``; samples or cells x peaks). With
    ``labels_key`` the AnnData is single-cell and is summed per ``obs[labels_key]``
    (pseudo-bulk).
    """
    import anndata as ad
    import pandas as pd

    names = atlas.var.index.to_numpy()[pat.peaks]
    info: dict[str, Any] = {}
    if isinstance(reference, (str, Path)):
        path = Path(reference)
        if not path.exists():
            raise FileNotFoundError(f"reference {path} does not exist")
        info["path"] = str(path)
        if path.suffix in (".h5ad", ".zarr") or path.is_dir():
            ref = ad.read_h5ad(path) if path.suffix == ".h5ad" else ad.read_zarr(path)
        else:
            tab = _read_table(path)
            ref = ad.AnnData(tab.T.to_numpy(np.float64), obs=pd.DataFrame(index=tab.columns.astype(str)),
                             var=pd.DataFrame(index=tab.index.astype(str)))
    else:
        ref = reference
    if labels_key is not None:
        if labels_key not in ref.obs:
            raise KeyError(f"the reference has no obs[{labels_key!r}]; its columns are {list(ref.obs.columns)}")
        lab = ref.obs[labels_key].astype(str).to_numpy()
        groups = np.unique(lab)
        S = sp.csr_matrix((np.ones(len(lab)), (np.searchsorted(groups, lab), np.arange(len(lab)))),
                          shape=(len(groups), len(lab)))
        X = S @ sp.csr_matrix(ref.X)
        ref = ad.AnnData(sp.csr_matrix(X), obs=pd.DataFrame(index=groups), var=ref.var)
        info["pseudo_bulk_of"] = labels_key
    pos = pd.Index(ref.var_names.astype(str)).get_indexer(names.astype(str))
    missing = int((pos < 0).sum())
    if missing == len(names):
        raise ValueError(f"the reference shares none of the {len(names)} peaks used; its features must be named "
                         f"like the store's var_names (e.g. {names[0]!r})")
    Xr = ref.X.toarray() if sp.issparse(ref.X) else np.asarray(ref.X, np.float64)
    if (Xr < 0).any():
        raise ValueError("the reference has negative values; give counts or non-negative signal")
    M = np.zeros((len(names), Xr.shape[0]))
    M[pos >= 0] = Xr[:, pos[pos >= 0]].T
    info.update(n_samples=int(Xr.shape[0]), peaks_missing=missing)
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

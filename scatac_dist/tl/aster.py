"""Number of cell types by ASTER's ensemble (Zhou et al., Bioinformatics 2023), the estimate
scCASE's paper takes as its number of factors K ("We use ASTER to estimate the number of cell
types as the number of latent factors", Methods).

On a binarised cells x peaks matrix (peaks open in at least 1% of the cells), over a list of
candidate numbers of types (3-14 by default, as the scCASE package searches):

1. **sum of squared distances**: TF-IDF (raw tf x ``ln(n / df)``, each cell scaled to unit
   length), 50 principal components, k-means for each candidate; the knee of the inertia
   curve (Kneedle, the ``kneed`` package, ``S = 1``, convex and decreasing);
2. **Davies-Bouldin**: TF-IDF (tf = value / cell total, idf = ``ln(1 + n / peak total)``),
   50 principal components, k-means; the candidate with the lowest Davies-Bouldin index;
3. **silhouette**: the same components, a 15-nearest-neighbour UMAP graph, Leiden searched to
   each candidate number of clusters; the candidate with the highest silhouette
   (correlation distance).

The estimate is the mean of those that gave one, rounded up. k-means keeps the best of 10
starts (scikit-learn's default when ASTER was written; 1.4 changed it to one start, which on
clean planted types here found the wrong partition at the true k). ASTER's silhouette step
also runs Louvain and adds both silhouettes; Louvain is superseded by Leiden and not
installed here, so Leiden's alone is used, and a candidate the resolution search does not
reach exactly is skipped. Reads nothing from a store: the caller passes
the matrix (at most a few thousand sampled cells).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["estimate_types"]

#: the candidates the scCASE package searches (``type_number_range=range(3, 15)``)
SEARCH = tuple(range(3, 15))


def _pcs(M: sp.csr_matrix, seed: int, n_comps: int = 50) -> np.ndarray:
    """Principal components of a sparse matrix, centred implicitly (no dense copy)."""
    from sklearn.decomposition import PCA

    n_comps = max(1, min(n_comps, min(M.shape) - 1))
    return PCA(n_comps, svd_solver="arpack", random_state=seed).fit_transform(M.astype(np.float64))


def _tfidf_l2(B: sp.csr_matrix) -> sp.csr_matrix:
    """Estimator 1's TF-IDF: raw tf x ``ln(n / df)``, each cell scaled to unit length."""
    from sklearn.feature_extraction.text import TfidfTransformer

    model = TfidfTransformer(smooth_idf=False, norm="l2").fit(B)
    model.idf_ = model.idf_ - 1
    return sp.csr_matrix(model.transform(B))


def _tfidf_log1p(B: sp.csr_matrix) -> sp.csr_matrix:
    """Estimators 2 and 3's TF-IDF: value / cell total, times ``ln(1 + n / peak total)``."""
    rows = np.asarray(B.sum(1)).ravel()
    cols = np.asarray(B.sum(0)).ravel()
    idf = np.log1p(B.shape[0] / np.maximum(cols, 1))
    T = sp.diags(1.0 / np.maximum(rows, 1)) @ B @ sp.diags(idf)
    return sp.csr_matrix(T)


def _knee(search, inertia) -> int | None:
    from kneed import KneeLocator

    knee = KneeLocator(list(search), list(inertia), S=1.0, curve="convex", direction="decreasing").knee
    return None if knee is None else int(knee)


def estimate_types(B: Any, *, search=SEARCH, seed: int = 0) -> dict:
    """ASTER's estimate of the number of cell types of the binarised matrix ``B`` (cells x
    peaks, sparse or dense; the caller filters peaks and samples cells).

    Returns ``{"k": estimate, "ssd": ..., "davies_bouldin": ..., "silhouette": ...}`` (an
    estimator that gives no answer is ``None``; ``k`` is ``None`` only if none does).
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import davies_bouldin_score, silhouette_score

    from .graph import as_igraph, connectivities, knn_graph, search_resolution

    B = sp.csr_matrix(B, dtype=np.float64)
    B.data[:] = 1.0
    B = B[np.asarray(B.sum(1)).ravel() > 0]
    search = [k for k in search if k < B.shape[0]]
    if len(search) < 2:
        raise ValueError(f"{B.shape[0]} cells are too few to choose among {list(search)} cell types")
    out: dict = {}
    P1 = _pcs(_tfidf_l2(B), seed)
    inertia = [KMeans(k, n_init=10, random_state=seed).fit(P1).inertia_ for k in search]
    out["ssd"] = _knee(search, inertia)
    P2 = _pcs(_tfidf_log1p(B), seed)
    db = [davies_bouldin_score(P2, KMeans(k, n_init=10, random_state=seed).fit_predict(P2)) for k in search]
    out["davies_bouldin"] = int(search[int(np.argmin(db))])
    idx, dist = knn_graph(P2.astype(np.float32), 15, seed)
    graph = as_igraph(connectivities(idx, dist, P2.shape[0]))
    sil = []
    for k in search:
        _, labels = search_resolution(graph, k, seed=seed)
        # a candidate the resolution search cannot reach is not a candidate
        sil.append(silhouette_score(P2, labels, metric="correlation") if len(np.unique(labels)) == k else -np.inf)
    out["silhouette"] = int(search[int(np.argmax(sil))])
    got = [v for v in out.values() if v is not None]
    out["k"] = int(math.ceil(sum(got) / len(got))) if got else None
    return out

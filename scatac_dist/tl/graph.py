"""Neighbours, clustering and UMAP on an embedding.

An embedding is O(n_cells x d) with small d, so it is gathered and these steps run on the
client (GUIDE invariant 2 allows it); the kNN graph is O(n_cells x k). Cells with NaN
embedding rows (filtered out) are left out and get missing labels.
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..blocks import transform_in_parallel
from ..store import Atlas

logger = logging.getLogger("scatac_dist")

__all__ = ["neighbors", "leiden", "kmeans", "umap", "knn_graph", "leiden_labels", "search_resolution",
           "connectivities", "as_igraph", "community_graph"]

EXACT_MAX_CELLS = 20_000


def _embedding(atlas: Atlas, use_rep: str) -> tuple[np.ndarray, np.ndarray]:
    if use_rep not in atlas.keys("obsm"):
        raise ValueError(f"{atlas.path} has no obsm[{use_rep!r}]: compute an embedding first "
                         "(scatac_dist.tl.spectral or scatac_dist.tl.lsi)")
    E = np.asarray(atlas.read(f"obsm/{use_rep}"), dtype=np.float32)
    ok = np.isfinite(E).all(axis=1)
    return E[ok], ok


def knn_graph(E: np.ndarray, k: int = 15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices and distances of the ``k`` nearest neighbours of each row (self excluded).

    Exact (scikit-learn, brute force) up to ``EXACT_MAX_CELLS`` cells, pynndescent beyond.
    """
    n = E.shape[0]
    if k >= n:
        raise ValueError(f"k={k} neighbours asked for but only {n} cells: use k < {n}")
    if n <= EXACT_MAX_CELLS:
        from sklearn.neighbors import NearestNeighbors

        dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(E).kneighbors(E)
    else:
        from pynndescent import NNDescent

        index = NNDescent(E, n_neighbors=k + 1, random_state=seed, n_jobs=1)
        idx, dist = index.neighbor_graph
    # Drop each row's own index wherever the search put it: with identical rows it need not
    # come first, and dropping column 0 would then list a cell among its own neighbours.
    own = idx == np.arange(n)[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)  # no self found: drop the farthest
    keep = np.ones(idx.shape, bool)
    keep[np.arange(n), drop] = False
    return idx[keep].reshape(n, k), dist[keep].reshape(n, k)


def connectivities(idx: np.ndarray, dist: np.ndarray, n: int) -> sp.csr_matrix:
    """UMAP's fuzzy simplicial set of the kNN graph (what scanpy stores as connectivities).

    The same computation as ``umap.umap_.fuzzy_simplicial_set`` with precomputed neighbours
    (``local_connectivity=1``, ``set_op_mix_ratio=1``, the distances in float32), vectorised in
    NumPy over all cells at once: umap's numba kernels are compiled in every new process,
    about 10 s, more than the whole computation takes in NumPy below a million cells
    (``tests/test_pp_tl.py`` checks it against umap's own). Per cell, ``rho`` is the distance
    to the nearest neighbour at a distance above 0 and ``sigma`` is bisected (64 steps at
    most, as umap) so that ``sum_j exp(-(d_j - rho) / sigma)`` over the cell itself and its
    ``k`` neighbours less the first is ``log2(k + 1)``; an edge's strength is
    ``exp(-(d - rho) / sigma)`` (1 within ``rho``), and the graph is symmetrised as a fuzzy
    union ``A + A^T - A * A^T``.
    """
    d = np.hstack([np.zeros((n, 1), np.float32), np.asarray(dist, np.float32)])  # each cell first, at 0
    k1 = d.shape[1]
    target = np.float32(np.log2(k1))
    pos = np.where(d > 0, d, np.inf).min(axis=1)
    rho = np.where(np.isfinite(pos), pos, 0).astype(np.float32)
    shifted = d[:, 1:] - rho[:, None]
    lo = np.zeros(n, np.float32)
    hi = np.full(n, np.inf, np.float32)
    mid = np.ones(n, np.float32)
    active = np.ones(n, bool)
    for _ in range(64):
        rows = np.flatnonzero(active)
        if not rows.size:
            break
        sh, m = shifted[rows], mid[rows][:, None]
        psum = np.where(sh > 0, np.exp(-(np.maximum(sh, 0) / m)), np.float32(1)).sum(axis=1, dtype=np.float32)
        done = np.abs(psum - target) < 1e-5
        above = ~done & (psum > target)
        below = ~done & ~above
        r = rows[above]
        hi[r] = mid[r]
        mid[r] = (lo[r] + hi[r]) / 2
        r = rows[below]
        lo[r] = mid[r]
        unbounded = np.isinf(hi[r])
        mid[r] = np.where(unbounded, mid[r] * 2, (lo[r] + hi[r]) / 2)
        active[rows[done]] = False
    floor = np.where(rho > 0, d.mean(axis=1), d.mean()).astype(np.float32) * np.float32(1e-3)
    sigma = np.maximum(mid, floor)
    strength = np.where(d - rho[:, None] <= 0, np.float32(1),
                        np.exp(-(np.maximum(d - rho[:, None], 0) / sigma[:, None]))).astype(np.float32)
    cols = np.hstack([np.arange(n)[:, None], idx])
    strength[cols == np.arange(n)[:, None]] = 0  # no edge from a cell to itself
    A = sp.csr_matrix((strength.ravel(), (np.repeat(np.arange(n), k1), cols.ravel())), shape=(n, n))
    A.eliminate_zeros()
    At = A.T.tocsr()
    G = (A + At - A.multiply(At)).tocsr()
    G.eliminate_zeros()
    return G


def _expand(mat: sp.csr_matrix, ok: np.ndarray) -> sp.csr_matrix:
    rows = np.flatnonzero(ok)
    coo = mat.tocoo()
    return sp.csr_matrix((coo.data, (rows[coo.row], rows[coo.col])), shape=(len(ok), len(ok)))


def neighbors(atlas: Atlas, *, use_rep: str = "X_spectral", n_neighbors: int = 15, seed: int = 0) -> dict:
    """kNN graph of an embedding. Writes ``obsp['distances']``, ``obsp['connectivities']``."""
    t0 = time.perf_counter()
    E, ok = _embedding(atlas, use_rep)
    idx, dist = knn_graph(E, n_neighbors, seed)
    n = E.shape[0]
    D = sp.csr_matrix((dist.ravel(), (np.repeat(np.arange(n), n_neighbors), idx.ravel())), shape=(n, n))
    C = connectivities(idx, dist, n)
    with atlas.publishing("neighbors"):
        atlas.write_obsp("distances", _expand(D, ok))
        atlas.write_obsp("connectivities", _expand(C, ok))
        atlas.record("neighbors", dict(use_rep=use_rep, n_neighbors=n_neighbors, seed=seed),
                     {"total": time.perf_counter() - t0})
    return {"n_cells": int(n)}


FLAVORS = ("igraph", "leidenalg")


def as_igraph(graph: sp.spmatrix):
    """An undirected weighted ``igraph.Graph`` of a (symmetric) sparse adjacency matrix,
    built from numpy arrays (no Python lists: at 1M cells the graph has ~13M edges)."""
    import igraph as ig

    g = sp.csr_matrix(graph)
    g = sp.triu(g + g.T, k=1).tocoo()
    G = ig.Graph(n=graph.shape[0], edges=np.column_stack([g.row, g.col]))
    G.es["weight"] = g.data
    return G


def leiden_labels(graph, resolution: float = 1.0, seed: int = 0, flavor: str = "igraph") -> np.ndarray:
    """Leiden communities maximising modularity with a resolution parameter.

    ``graph`` is a sparse adjacency matrix or a graph from :func:`as_igraph` (build it once
    when calling repeatedly). ``flavor="igraph"`` is igraph's C implementation
    (``Graph.community_leiden``, 2 iterations, as scanpy's ``flavor="igraph"``);
    ``"leidenalg"`` is leidenalg's ``RBConfigurationVertexPartition`` (the older scanpy and
    SnapATAC2 route). Same objective; igraph ran 8x faster on a 1M-cell 15-NN graph
    (43 s vs 340 s per call) and is the default.
    """

    import igraph as ig

    if flavor not in FLAVORS:
        raise ValueError(f"unknown Leiden flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")
    G = graph if isinstance(graph, ig.Graph) else as_igraph(graph)
    if flavor == "leidenalg":
        import leidenalg

        part = leidenalg.find_partition(G, leidenalg.RBConfigurationVertexPartition, weights="weight",
                                        resolution_parameter=resolution, seed=seed, n_iterations=2)
        return np.asarray(part.membership)
    with _seeded_igraph(seed):
        part = G.community_leiden(objective_function="modularity", weights="weight", resolution=resolution,
                                  n_iterations=2)
    return np.asarray(part.membership)


@contextlib.contextmanager
def _seeded_igraph(seed: int):
    """igraph draws from a process-wide generator: seed a private one, then put back Python's."""
    import random

    import igraph as ig

    ig.set_random_number_generator(random.Random(seed))
    try:
        yield
    finally:
        ig.set_random_number_generator(random)


def community_graph(graph, labels: np.ndarray):
    """The graph of ``labels``' communities: one vertex per community, the summed weights
    between two communities as their edge, the weight inside one as its self-loop, and the
    summed strengths of its members as ``vs["strength"]``. ``graph``: a sparse adjacency
    matrix (read as :func:`as_igraph` does) or an ``igraph.Graph``. A partition of this graph
    has the same modularity, at any resolution, as the partition of ``graph`` it lifts to."""
    import igraph as ig

    if isinstance(graph, ig.Graph):
        W = sp.triu(graph.get_adjacency_sparse(attribute="weight"), k=1)
    else:
        g = sp.csr_matrix(graph)
        W = sp.triu(g + g.T, k=1)
    labels = np.asarray(labels)
    k = int(labels.max()) + 1
    P = sp.csr_matrix((np.ones(len(labels)), (labels, np.arange(len(labels)))), shape=(k, len(labels)))
    A = (P @ (W + W.T) @ P.T).tocoo()
    keep = A.row <= A.col
    H = ig.Graph(n=k, edges=np.column_stack([A.row[keep], A.col[keep]]))
    H.es["weight"] = np.where(A.row[keep] == A.col[keep], A.data[keep] / 2, A.data[keep])
    H.vs["strength"] = np.asarray(A.sum(axis=1)).ravel()
    return H


def _community_count(H, resolution: float, seed: int) -> int:
    """Leiden's cluster count on a community graph. igraph's default vertex weights leave
    self-loops out, so the members' strengths are passed as the vertex weights."""
    with _seeded_igraph(seed):
        part = H.community_leiden(objective_function="modularity", weights="weight", node_weights=H.vs["strength"],
                                  resolution=resolution, n_iterations=2)
    return len(set(part.membership))


def search_resolution(graph, n_clusters: int, *, seed: int = 0, max_steps: int = 30,
                      flavor: str = "igraph", step: float = 1.1) -> tuple[float, np.ndarray]:
    """Leiden's resolution (0.01-10) for ``n_clusters`` clusters; return the resolution and the
    labels of the full-graph Leiden run that came closest within ``max_steps`` runs.

    A run on the full graph of an atlas is costly, so the search guesses first on a small
    graph. The first run is at 0.316, the middle of the range on a log scale. When it gives
    fewer clusters than asked, the search goes on by bisection on a log scale. When it gives
    more, the graph of its communities (:func:`community_graph`), on which a bisection costs
    milliseconds, gives a resolution near the answer; the full graph is run there, then at
    resolutions a factor ``step`` apart, in the direction its count asks, until the count is
    bracketed; then by bisection. The labels returned are always those of one full-graph
    Leiden run at the resolution returned.
    """
    import igraph as ig

    G = graph if isinstance(graph, ig.Graph) else as_igraph(graph)
    runs: list[tuple[float, int, np.ndarray]] = []

    def run(res: float) -> int:
        lab = leiden_labels(G, res, seed, flavor)
        runs.append((res, len(np.unique(lab)), lab))
        logger.debug("Leiden search run %d: resolution %.4g -> %d clusters", len(runs), res, runs[-1][1])
        return runs[-1][1]

    def best() -> tuple[float, np.ndarray]:
        res, _, lab = min(runs, key=lambda r: abs(r[1] - n_clusters))
        return res, lab

    lo, hi = np.log(0.01), np.log(10.0)
    res = float(np.exp((lo + hi) / 2))
    k = run(res)
    if k > n_clusters and max_steps > 1:
        hi = np.log(res)
        res = _coarse_guess(community_graph(graph, runs[0][2]), n_clusters, lo, hi, seed)
        # step outwards from the guess until the full graph's count is bracketed
        while len(runs) < max_steps:
            k = run(res)
            if k == n_clusters:
                return best()
            lo, hi = (np.log(res), hi) if k < n_clusters else (lo, np.log(res))
            nxt = np.log(res) + (np.log(step) if k < n_clusters else -np.log(step))
            if not lo < nxt < hi:
                break
            res = float(np.exp(nxt))
    elif k < n_clusters:
        lo = np.log(res)
    while k != n_clusters and len(runs) < max_steps:
        x = (lo + hi) / 2
        k = run(float(np.exp(x)))
        lo, hi = (x, hi) if k < n_clusters else (lo, x)
    return best()


def _coarse_guess(H, n_clusters: int, lo: float, hi: float, seed: int, steps: int = 40) -> float:
    """The resolution (between exp(lo) and exp(hi)) at which Leiden on the community graph
    ``H`` gives the count nearest ``n_clusters``, by bisection on a log scale."""
    guess = None
    for _ in range(steps):
        res = float(np.exp((lo + hi) / 2))
        k = _community_count(H, res, seed)
        if guess is None or abs(k - n_clusters) < abs(guess[1] - n_clusters):
            guess = (res, k)
        if k == n_clusters:
            break
        lo, hi = (np.log(res), hi) if k < n_clusters else (lo, np.log(res))
    return guess[0]


def leiden(atlas: Atlas, *, resolution: float = 1.0, n_clusters: int | None = None, seed: int = 0,
           key_added: str = "leiden", max_steps: int = 30, flavor: str = "igraph") -> dict:
    """Leiden clusters of ``obsp['connectivities']`` (``flavor``: see :func:`leiden_labels`).

    With ``n_clusters``, the resolution is searched (:func:`search_resolution`, between 0.01
    and 10) until Leiden gives that many clusters, or the closest count found within
    ``max_steps`` full-graph runs. Writes ``obs[key_added]`` (categorical) and the resolution used.
    """
    t0 = time.perf_counter()
    if "connectivities" not in atlas.keys("obsp"):
        raise ValueError(f"{atlas.path} has no neighbour graph: run scatac_dist.tl.neighbors first")
    C = sp.csr_matrix(atlas.read("obsp/connectivities"))
    ok = np.asarray(C.getnnz(axis=1) > 0)
    C = C[ok][:, ok]
    if n_clusters is not None:
        if n_clusters > C.shape[0]:
            raise ValueError(f"n_clusters={n_clusters} is larger than the {C.shape[0]} cells")
        resolution, lab = search_resolution(C, n_clusters, seed=seed, max_steps=max_steps, flavor=flavor)
    else:
        lab = leiden_labels(C, resolution, seed, flavor)
    full = np.full(atlas.n_obs, None, dtype=object)
    full[ok] = lab.astype(str)
    with atlas.publishing(key_added):
        atlas.write_obs({key_added: pd.Categorical(full)})
        k = len(np.unique(lab))
        atlas.record(key_added, dict(resolution=resolution, n_clusters=n_clusters, seed=seed, flavor=flavor),
                     {"total": time.perf_counter() - t0}, result={"n_clusters": k, "resolution": resolution})
    return {"n_clusters": k, "resolution": resolution}


def kmeans(atlas: Atlas, n_clusters: int, *, use_rep: str = "X_spectral", n_init: int = 20, seed: int = 0,
           backend: str = "auto", dask_above: int = 100_000, dask_n_init: int = 3,
           key_added: str = "kmeans") -> dict:
    """k-means on the embedding; writes ``obs[key_added]``.

    ``backend``: ``"sklearn"`` (scikit-learn, ``n_init`` restarts, on the gathered
    embedding), ``"dask-ml"`` (dask-ml's k-means|| initialisation and Lloyd iterations as
    Dask graphs over row blocks of the embedding, ``dask_n_init`` restarts; scales to any n), or
    ``"auto"``: dask-ml above ``dask_above`` cells, scikit-learn below.
    """
    t0 = time.perf_counter()
    if backend not in ("auto", "sklearn", "dask-ml"):
        raise ValueError(f"backend={backend!r}; choose 'auto', 'sklearn' or 'dask-ml'")
    E, ok = _embedding(atlas, use_rep)
    if not 1 <= n_clusters <= E.shape[0]:
        raise ValueError(f"n_clusters={n_clusters} must be between 1 and the {E.shape[0]} cells")
    if backend == "auto":
        backend = "dask-ml" if E.shape[0] > dask_above else "sklearn"
    if backend == "dask-ml":
        import dask.array as da
        from dask_ml.cluster import KMeans as DaskKMeans

        rows = max(10_000, -(-E.shape[0] // 16))
        # dask-ml's tol is absolute, sklearn's relative to the data's variance: bring the
        # embedding to unit scale (a global factor does not change the partition)
        scale = float(E.std()) or 1.0
        X = da.from_array(E / scale, chunks=(rows, E.shape[1])).persist()
        best = None
        for s in range(seed, seed + dask_n_init):  # dask-ml has no n_init: restart, keep the lowest inertia
            model = DaskKMeans(n_clusters=n_clusters, random_state=s).fit(X)
            if best is None or model.inertia_ < best.inertia_:
                best = model
        lab = np.asarray(best.labels_)
    else:
        from sklearn.cluster import KMeans

        lab = KMeans(n_clusters, n_init=n_init, random_state=seed).fit_predict(E)
    full = np.full(atlas.n_obs, None, dtype=object)
    full[ok] = lab.astype(str)
    with atlas.publishing(key_added):
        atlas.write_obs({key_added: pd.Categorical(full)})
        atlas.record(key_added, dict(n_clusters=n_clusters, use_rep=use_rep, n_init=n_init, seed=seed,
                                     backend=backend), {"total": time.perf_counter() - t0})
    return {"n_clusters": n_clusters, "backend": backend}


def umap(atlas: Atlas, *, use_rep: str = "X_spectral", n_neighbors: int = 15, min_dist: float = 0.5,
         seed: int = 0, fit_max_cells: int = 100_000) -> dict:
    """2-D UMAP (umap-learn). Writes ``obsm['X_umap']``.

    Up to ``fit_max_cells`` cells UMAP is fitted on all of them, on the exact kNN graph of
    :func:`knn_graph` (brute force up to ``EXACT_MAX_CELLS`` cells) handed to umap-learn as
    its precomputed neighbours: this skips umap-learn's own approximate search and its numba
    compilation, a third of the stage at 10k cells. Above ``fit_max_cells`` it is fitted on a
    seeded sample and the other cells are placed with ``transform``, in blocks on the Dask
    workers.
    """
    from umap import UMAP

    t0 = time.perf_counter()
    E, ok = _embedding(atlas, use_rep)
    if E.shape[0] <= fit_max_cells:
        # umap-learn's neighbour lists start with the cell itself
        idx, dist = knn_graph(E, n_neighbors - 1, seed)
        n = E.shape[0]
        knn = (np.hstack([np.arange(n)[:, None], idx]), np.hstack([np.zeros((n, 1), dist.dtype), dist]), None)
        model = UMAP(n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed, precomputed_knn=knn)
        Y = model.fit_transform(E)
    else:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(E.shape[0], fit_max_cells, replace=False))
        model = UMAP(n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed)
        model.fit(E[sample])
        Y = transform_in_parallel(model, E)
        Y[sample] = model.embedding_
    out = np.full((atlas.n_obs, 2), np.nan, dtype=np.float32)
    out[ok] = Y
    with atlas.publishing("umap"):
        atlas.write_obsm("X_umap", out)
        atlas.record("umap", dict(use_rep=use_rep, n_neighbors=n_neighbors, min_dist=min_dist, seed=seed,
                                  fit_max_cells=fit_max_cells), {"total": time.perf_counter() - t0})
    return {"n_cells": int(ok.sum())}

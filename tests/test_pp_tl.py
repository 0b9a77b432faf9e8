"""pp/tl kernels and Dask steps against direct NumPy/SciPy computations on small data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scatac_dist import pp, tl
from scatac_dist.datasets import SynthParams, generate_rows, synth_obs, synthesize
from scatac_dist.ops.select import episcanpy_variability, snapatac2_quantile, top_accessible
from scatac_dist.ops.tfidf import METHODS, idf_from_counts, tfidf_block
from scatac_dist.store import open_atlas

P = SynthParams(n_cells=1500, n_peaks=3000, n_clusters=4, n_lineages=2, signal=0.4, seed=21)


def dense_tfidf(X: np.ndarray, method: str, s: float = 1e4) -> np.ndarray:
    """Each TF-IDF formula written out on a dense matrix (cells x peaks)."""
    n = X.shape[0]
    tf = X / X.sum(1, keepdims=True)
    c = X.sum(0)
    r = n / c
    return {
        "sccase": tf * np.log(r), "signac1": np.log1p(s * tf * r), "signac2": tf * np.log1p(r),
        "signac3": np.log1p(s * tf) * np.log1p(r), "signac4": X * r, "muon": np.log1p(s * tf) * np.log1p(r),
        "archr1": tf * np.log1p(r), "archr2": np.log1p(s * tf * r), "archr3": np.log1p(tf) * np.log1p(r),
    }[method]


@pytest.mark.parametrize("method", METHODS)
def test_tfidf_kernel_matches_formula(method):
    rng = np.random.default_rng(0)
    X = rng.poisson(0.4, (40, 25)).astype(float)
    X[:, 0] += 1  # no empty rows or columns
    X[0] += 1
    got = tfidf_block(sp.csr_matrix(X), idf_from_counts(X.sum(0), 40, method), method).toarray()
    np.testing.assert_allclose(got, dense_tfidf(X, method), rtol=1e-5, atol=1e-6)


def test_selection_scores():
    cnt = np.array([0, 5, 50, 3, 100, 20, 7, 1000])
    assert top_accessible(cnt, 3).nonzero()[0].tolist() == [2, 4, 7]
    v = episcanpy_variability(cnt, 1000)
    assert v[0] == v[7] == 0.5 and v[4] > v[2] > v[1]
    q = snapatac2_quantile(cnt, 10, lower=0.15, upper=0.15)
    # 7 nonzero counts sorted 3,5,7,20,50,100,1000: int(0.15 * 7) = 1 dropped at each end
    assert q.nonzero()[0].tolist() == [1, 2, 4, 5, 6]
    assert snapatac2_quantile(cnt, 3, lower=0.15, upper=0.15).nonzero()[0].tolist() == [2, 4, 5]
    # ties at the cut: exactly int(q * n) go, lowest index first
    assert snapatac2_quantile(np.array([2, 2, 2, 2, 9]), 10, lower=0.2, upper=0.2).nonzero()[0].tolist() == [1, 2, 3]


@pytest.fixture(scope="module")
def store(tmp_path_factory, client):
    out = tmp_path_factory.mktemp("pp") / "s.zarr"
    synthesize(out, P, chunk_rows=400, client=client, progress=False)
    return out


@pytest.fixture(scope="module")
def atlas(store):
    return open_atlas(store, chunk_rows=400)


@pytest.fixture
def fresh_atlas(store, tmp_path):
    """A copy of the store of its own, for a test whose filters must not reach the others."""
    import shutil

    shutil.copytree(store, tmp_path / "s.zarr")
    return open_atlas(tmp_path / "s.zarr", chunk_rows=400)


def test_filters_select_and_tfidf_view(fresh_atlas, client):
    atlas = fresh_atlas
    X = generate_rows(P, 0, P.n_cells).toarray().astype(float)
    pp.filter_cells(atlas, min_counts=900, client=client)
    cells = X.sum(1) >= 900
    assert (atlas.obs["pass_qc"].to_numpy() == cells).all()
    pp.filter_peaks(atlas, min_cells=10, min_reads=2, client=client)
    peaks = ((X[cells] >= 2).sum(0) >= 10)
    assert (atlas.var["pass_qc"].to_numpy() == peaks).all()
    pp.select_features(atlas, flavor="top", n_features=800, client=client)
    sel = atlas.var["selected"].to_numpy()
    open_cells = (X[cells] > 0).sum(0)
    assert sel.sum() == 800 and (sel <= peaks).all()
    assert open_cells[sel].min() >= open_cells[peaks & ~sel].max()
    view = pp.tfidf(atlas, method="archr3", client=client)
    got = np.vstack([view.blocks[i].compute().toarray() for i in range(view.numblocks[0])])
    B = (X[cells][:, sel] > 0).astype(float)
    np.testing.assert_allclose(got, dense_tfidf(B, "archr3"), rtol=1e-5, atol=1e-6)


def test_lsi_subspace_matches_numpy_svd(atlas, client):
    pp.tfidf(atlas, method="signac1", client=client)
    tl.lsi(atlas, n_comps=10, drop_first=False, depth_corr_cutoff=None, scale_dims=False, n_iter=8)
    X = generate_rows(P, 0, P.n_cells).toarray()
    B = (X > 0).astype(float)
    T = dense_tfidf(B[:, B.sum(0) > 0], "signac1")
    U, s, _ = np.linalg.svd(T, full_matrices=False)
    emb = atlas.read("obsm/X_lsi")
    np.testing.assert_allclose(atlas.provenance()["lsi"]["result"]["singular_values"][:4], s[:4], rtol=1e-4)
    # the leading subspace is the same: principal angles near zero
    Q1 = np.linalg.qr(emb[:, :4])[0]
    cos = np.linalg.svd(Q1.T @ U[:, :4], compute_uv=False)
    assert cos.min() > 0.999


def test_spectral_matches_dense_eigendecomposition(atlas, client):
    tl.spectral(atlas, n_comps=6, n_iter=40, weighted_by_sd=False, keep_first=True)
    X = generate_rows(P, 0, P.n_cells).toarray()
    B = (X > 0).astype(float)
    B = B[:, B.sum(0) > 0]
    w = np.log(B.shape[0] / (1 + B.sum(0)))
    Y = B * w
    Y /= np.linalg.norm(Y, axis=1, keepdims=True)
    S = Y @ Y.T
    np.fill_diagonal(S, 0)
    d = S.sum(1)
    M = S / np.sqrt(np.outer(d, d))
    ev, V = np.linalg.eigh(M)
    order = np.argsort(-ev)[:6]
    got = atlas.provenance()["spectral"]["result"]["eigenvalues"]
    np.testing.assert_allclose(got[:4], ev[order][:4], rtol=1e-3)
    emb = atlas.read("obsm/X_spectral")
    cos = np.linalg.svd(np.linalg.qr(emb[:, :4])[0].T @ V[:, order[:4]], compute_uv=False)
    assert cos.min() > 0.99


def test_graph_clustering_recovers_types(atlas, client):
    tl.spectral(atlas)
    tl.neighbors(atlas, use_rep="X_spectral", n_neighbors=15)
    res = tl.leiden(atlas, n_clusters=P.n_clusters)
    tl.kmeans(atlas, P.n_clusters)
    tl.umap(atlas)
    obs = atlas.obs
    truth = synth_obs(P)["celltype"]
    assert res["n_clusters"] == P.n_clusters
    assert tl.ari(truth, obs["leiden"].astype(str)) > 0.8
    assert tl.ari(truth, obs["kmeans"].astype(str)) > 0.8
    C = atlas.read("obsp/connectivities")
    assert C.shape == (P.n_cells, P.n_cells) and abs(C - C.T).max() < 1e-6
    U = atlas.read("obsm/X_umap")
    assert U.shape == (P.n_cells, 2) and np.isfinite(U).all()
    # the 2-D map keeps each cell's neighbourhood of the spectral embedding (a random map: ~0.5)
    from sklearn.manifold import trustworthiness

    assert trustworthiness(atlas.read("obsm/X_spectral"), U, n_neighbors=15) > 0.9
    with pytest.raises(ValueError, match="larger than"):
        tl.leiden(atlas, n_clusters=P.n_cells + 1)
    # both Leiden implementations, seeded: reproducible, and both find the types
    from scatac_dist.tl.graph import as_igraph, leiden_labels

    G = as_igraph(C)
    a, b = leiden_labels(G, res["resolution"], seed=3), leiden_labels(C, res["resolution"], seed=3)
    np.testing.assert_array_equal(a, b)
    assert tl.ari(truth, leiden_labels(G, res["resolution"], seed=3, flavor="leidenalg")) > 0.8
    with pytest.raises(ValueError, match="unknown Leiden flavor 'louvain'"):
        leiden_labels(G, 1.0, flavor="louvain")


def test_same_embedding_on_one_and_two_workers(atlas, client):
    from distributed import Client, LocalCluster

    tl.spectral(atlas, n_comps=8, n_iter=4, key_added="X_two")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as lc, \
            Client(lc):
        tl.spectral(atlas, n_comps=8, n_iter=4, key_added="X_one")
    client.as_current()
    np.testing.assert_array_equal(atlas.read("obsm/X_one"), atlas.read("obsm/X_two"))


def test_bad_parameters(atlas):
    with pytest.raises(ValueError, match="unknown TF-IDF method 'tfidf9'.*signac1"):
        pp.tfidf(atlas, method="tfidf9")
    with pytest.raises(ValueError, match="flavor"):
        pp.select_features(atlas, flavor="best")
    with pytest.raises(ValueError, match="kmeans|between 1"):
        tl.kmeans(atlas, P.n_cells + 5)


def test_kmeans_on_dask_ml_and_umap_transform_on_workers(atlas, client):
    tl.spectral(atlas, n_comps=10)
    tl.kmeans(atlas, P.n_clusters, backend="sklearn", key_added="km_sk")
    res = tl.kmeans(atlas, P.n_clusters, backend="dask-ml", key_added="km_dask")
    assert res["backend"] == "dask-ml"
    truth = synth_obs(P)["celltype"]
    obs = atlas.obs
    assert tl.ari(truth, obs["km_dask"].astype(str)) > 0.8
    assert tl.ari(obs["km_sk"].astype(str), obs["km_dask"].astype(str)) > 0.8
    with pytest.raises(ValueError, match="backend"):
        tl.kmeans(atlas, 3, backend="spark")
    # fitted on 500 cells, the other 1000 placed by transform in blocks on the workers
    tl.umap(atlas, fit_max_cells=500)
    U = atlas.read("obsm/X_umap")
    assert np.isfinite(U).all()
    from sklearn.neighbors import KNeighborsClassifier

    # placed cells sit among cells of their own type
    acc = KNeighborsClassifier(5).fit(U[:500], truth[:500]).score(U[500:], truth[500:])
    assert acc > 0.8


@pytest.mark.parametrize("exact", [True, False])
def test_knn_graph_never_lists_a_cell_as_its_own_neighbour(exact, monkeypatch):
    """Identical rows tie at distance 0, so a cell's own index need not come first in the
    search's answer; the graph must drop the cell itself wherever it is, not column 0."""
    from scatac_dist.tl import graph

    rng = np.random.default_rng(0)
    E = rng.standard_normal((300, 5)).astype(np.float32)
    E[10:20] = E[10]  # ten identical cells
    if not exact:
        monkeypatch.setattr(graph, "EXACT_MAX_CELLS", 10)  # force pynndescent
    idx, dist = graph.knn_graph(E, k=12, seed=0)
    rows = np.arange(len(E))[:, None]
    assert not (idx == rows).any()
    assert all(len(set(r)) == 12 for r in idx)
    # distances are those of the listed cells, and the nearest other cells of a duplicate are its twins
    np.testing.assert_allclose(dist, np.linalg.norm(E[idx] - E[:, None], axis=2), atol=1e-5)
    for i in range(10, 20):
        assert set(idx[i][:9]) == set(range(10, 20)) - {i}
    D = np.linalg.norm(E[:, None] - E[None], axis=2)
    np.fill_diagonal(D, np.inf)
    exp = np.sort(D, axis=1)[:, :12]
    if exact:
        np.testing.assert_allclose(np.sort(dist, axis=1), exp, atol=1e-5)


def test_connectivities_equal_umaps_fuzzy_simplicial_set():
    """Our NumPy fuzzy union against umap-learn's own numba one, with duplicate cells whose
    neighbours are all at distance 0 (rho 0, and sigma's floor from the global mean)."""
    from umap.umap_ import fuzzy_simplicial_set

    from scatac_dist.tl.graph import connectivities, knn_graph

    rng = np.random.default_rng(1)
    E = rng.standard_normal((800, 6)).astype(np.float32) * rng.uniform(0.2, 3, (800, 1)).astype(np.float32)
    E[:20] = E[0]  # twenty identical cells: their 15 nearest are all at distance 0
    idx, dist = knn_graph(E, 15)
    n = len(E)
    got = connectivities(idx, dist, n)
    knn_i = np.hstack([np.arange(n)[:, None], idx])
    knn_d = np.hstack([np.zeros((n, 1), dist.dtype), dist])
    ref, _, _ = fuzzy_simplicial_set(sp.coo_matrix((n, 1)), 16, 0, "euclidean", knn_indices=knn_i, knn_dists=knn_d)
    ref = sp.csr_matrix(ref)
    assert got.nnz == ref.nnz and abs((got != 0).astype(int) - (ref != 0).astype(int)).sum() == 0
    assert abs(got - ref).max() < 1e-4
    assert got.diagonal().max() == 0 and abs(got - got.T).max() < 1e-6


def test_resolution_search_finds_each_count_a_scan_finds():
    """Every cluster count that a scan over resolutions reaches, the search reaches too, and it
    gives the labels of one Leiden run at the resolution it reports."""
    from scatac_dist.tl.graph import as_igraph, connectivities, knn_graph, leiden_labels, search_resolution

    rng = np.random.default_rng(2)
    centres = rng.standard_normal((12, 8)) * 4
    E = (centres[rng.integers(0, 12, 3000)] + rng.standard_normal((3000, 8))).astype(np.float32)
    idx, dist = knn_graph(E, 15)
    G = as_igraph(connectivities(idx, dist, len(E)))
    reached = {len(np.unique(leiden_labels(G, r))) for r in np.geomspace(0.05, 5, 25)}
    for k in sorted(reached)[:: max(1, len(reached) // 6)]:
        res, lab = search_resolution(G, k)
        assert len(np.unique(lab)) == k
        np.testing.assert_array_equal(lab, leiden_labels(G, res))


def test_community_graph_keeps_modularity_at_every_resolution():
    """A partition of the community graph has the modularity, computed here from its definition
    with SciPy, of the partition of the cells it lifts to, at any resolution: what lets the
    resolution search guess on it."""
    from scatac_dist.tl.graph import community_graph, connectivities, knn_graph, leiden_labels

    rng = np.random.default_rng(5)
    centres = rng.standard_normal((6, 8)) * 3
    E = (centres[rng.integers(0, 6, 1500)] + rng.standard_normal((1500, 8))).astype(np.float32)
    idx, dist = knn_graph(E, 15)
    C = sp.csr_matrix(connectivities(idx, dist, len(E)))
    A = sp.triu(C + C.T, k=1).tocoo().astype(np.float64)  # the weights as_igraph gives the graph
    strength = np.bincount(A.row, A.data, len(E)) + np.bincount(A.col, A.data, len(E))

    def modularity(labels, resolution):
        inside = 2 * A.data[labels[A.row] == labels[A.col]].sum()
        totals = np.bincount(labels, weights=strength)
        return inside / strength.sum() - resolution * (totals ** 2).sum() / strength.sum() ** 2

    fine = leiden_labels(C, 2.0)
    H = community_graph(C, fine)
    assert H.vcount() == fine.max() + 1 > 6
    np.testing.assert_allclose(H.vs["strength"], np.bincount(fine, weights=strength))
    for resolution in (0.1, 0.5, 2.0):
        coarse = rng.integers(0, 4, H.vcount())
        for part in (coarse, np.arange(H.vcount())):
            np.testing.assert_allclose(H.modularity(part, weights="weight", resolution=resolution),
                                       modularity(part[fine], resolution), rtol=1e-9)

"""scCASE on stores: the atlas-mode kernels against dense NumPy, atlas mode with a full
support against exact mode, scCASER's three references, the store outputs, the CLI and bad
input. Runs on a real LocalCluster (``client`` fixture)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from scatac_dist.cli import main
from scatac_dist.datasets import SynthParams, synthesize
from scatac_dist.models import SCCASE
from scatac_dist.models import sccase_pattern as data
from scatac_dist.models.sccase_neighbors import jaccard_on_support, support_matrix_dense
from scatac_dist.ops.sccase_support import bernoulli_mask, support_enhance, support_quad
from scatac_dist.store import open_atlas

LAM, G1, G2, KEEP = 1e6, 1.0, 1.0, 0.95           # SCCASE's defaults (the paper's)

P = SynthParams(n_cells=360, n_peaks=1200, n_clusters=3, n_lineages=1, signal=0.5, fragments=400, seed=5)


@pytest.fixture(scope="module")
def store(tmp_path_factory, client):
    out = tmp_path_factory.mktemp("sccase") / "s.zarr"
    synthesize(out, P, chunk_rows=100, client=client, progress=False)
    return out


def _copy(store, tmp_path, name="c.zarr"):
    import shutil

    dst = tmp_path / name
    shutil.copytree(store, dst)
    return dst


def dense_problem(pat):
    """X (peaks x cells) and the 0/1 matrix B, densely, straight from the pattern file."""
    indptr, indices = pat.arrays()
    B = np.zeros((pat.n, pat.m))
    for i in range(pat.n):
        B[i, indices[indptr[i]:indptr[i + 1]]] = 1
    return (B * pat.s[:, None] * pat.w[None, :]).T, B


def numpy_tfidf(counts, cells):
    """Eq. (1) on the binarised counts of ``cells`` over the peaks open in >= 1% of them, each
    cell scaled to unit L2 norm: X (kept peaks x cells), the kept peaks and their IDF."""
    C = sp.csr_matrix(counts)[np.flatnonzero(cells)].toarray() > 0
    n, cnt = C.shape[0], C.sum(0)
    peaks = np.flatnonzero(cnt >= 0.01 * n)
    idf = np.log(n / cnt[peaks])
    T = C[:, peaks] * idf
    return (T / np.linalg.norm(T, axis=1, keepdims=True)).T, peaks, idf


def paper_loss(X, Z, R, W, H, support=None, P=None, alpha=1.0):
    """Eq. (2) (Eq. 3 with ``P``) in NumPy; with ``support`` (n x n bool) the similarity term
    runs over the support pairs only, as the atlas mode defines it."""
    D = Z - H.T @ H
    f = (np.linalg.norm(X @ (Z * R) - W @ H) ** 2 + LAM * np.sum((D if support is None else D[support]) ** 2)
         + G1 * np.linalg.norm(W) ** 2 + G2 * np.linalg.norm(H) ** 2)
    return f + (alpha * np.linalg.norm(P - W[:, :P.shape[1]]) ** 2 if P is not None else 0.0)


def full_mask(n, seed):
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return bernoulli_mask(ii, jj, n, KEEP, seed)


def nmf_start(X, K, seed):
    """W (peaks x K), H (K x cells): scikit-learn NMF of X^T, as the module docstring says."""
    from sklearn.decomposition import NMF

    nmf = NMF(K, init="nndsvda", max_iter=500, random_state=seed)
    U = nmf.fit_transform(sp.csr_matrix(X.T))
    return nmf.components_.T, U.T


def reference_projection(M, idf, k1, seed):
    """scCASER's P: each reference sample scaled to sum 1 over the kept peaks, weighted by the
    target's IDF, then NMF with k1 factors (module docstring of scatac_dist.models.sccase)."""
    from sklearn.decomposition import NMF

    M = M / M.sum(0, keepdims=True) * idf[:, None]
    return NMF(k1, init="nndsvda", max_iter=500, random_state=seed).fit_transform(M)


def assert_exact_pca(Y, got):
    """``got`` (cells x 50, computed in row blocks by randomized subspace iteration with implicit
    centring) against scikit-learn's exact PCA (full SVD) of the enhanced layer's TF-IDF
    (``tf = y / row sum``, ``idf = log(n / column sum of tf)``, rows scaled to unit length),
    built densely in NumPy. Tolerances (measured on this set: 1e-7, 1e-3, 2e-5): the first 10
    score vectors to 1e-5 of their largest value (float32 storage), the same signs
    (scikit-learn's: each component's largest entry positive); every component's variance to
    1e-2; the variance of the 50 together to 1e-4. scikit-learn's randomized PCA, used before
    on data this small, misses the variance of the 50 by 1.2e-3 and single ones by 2.5e-2."""
    from sklearn.decomposition import PCA

    Y = Y.toarray().astype(np.float64)
    rs = Y.sum(1, keepdims=True)
    tf = Y / np.where(rs > 0, rs, 1)
    cs = tf.sum(0)
    D = tf * np.where(cs > 0, np.log(len(Y) / np.where(cs > 0, cs, 1)), 0)
    D /= np.maximum(np.linalg.norm(D, axis=1, keepdims=True), 1e-300)
    ref = PCA(got.shape[1], svd_solver="full").fit(D)
    want = ref.transform(D)
    got = got.astype(np.float64)
    err = np.abs(got[:, :10] - want[:, :10]).max(0) / np.abs(want[:, :10]).max(0)
    assert err.max() < 1e-5, err
    np.testing.assert_allclose(np.linalg.norm(got, axis=0), ref.singular_values_, rtol=1e-2)
    assert (got ** 2).sum() == pytest.approx((want ** 2).sum(), rel=1e-4)


def test_pattern_and_kernels_match_dense_numpy(store, client, tmp_path):
    atlas = open_atlas(store, chunk_rows=100)
    pat = data.build_pattern(atlas, min_cell_fraction=0.01)
    try:
        X, B = dense_problem(pat)
        C = atlas.X.compute().toarray() > 0
        cnt = C.sum(0)
        np.testing.assert_array_equal(pat.peaks, np.flatnonzero(cnt >= 0.01 * C.shape[0]))
        # Eq. (1) on 0/1 data, each cell scaled to unit L2 norm
        T = C[:, pat.peaks] * np.log(C.shape[0] / cnt[pat.peaks])
        np.testing.assert_allclose(X.T, T / np.linalg.norm(T, axis=1, keepdims=True), rtol=1e-12)
        rng = np.random.default_rng(0)
        k1 = 6
        nbr = np.array([np.r_[j, rng.choice(np.r_[0:j, j + 1:pat.n], k1 - 1, replace=False)] for j in range(pat.n)])
        V = rng.random(nbr.shape) - 0.3
        Vd = support_matrix_dense(nbr, V, pat.n)            # column j holds V[j] at rows nbr[j]
        indptr, indices = pat.arrays()
        q, g = support_quad(indptr, indices, pat.s, pat.w, nbr, V)
        np.testing.assert_allclose(q, ((X @ Vd) ** 2).sum(0), rtol=1e-10)
        np.testing.assert_allclose(g, np.take_along_axis((X.T @ X @ Vd).T, nbr, axis=1), rtol=1e-10, atol=1e-14)
        W = rng.random((pat.m, 3))
        Vn = rng.random((pat.n, 3))
        np.testing.assert_allclose(data.times(pat, W), X.T @ W, rtol=1e-10)
        np.testing.assert_allclose(data.t_times(pat, Vn), X @ Vn, rtol=1e-10)
        inter = B @ B.T
        J = inter / (B.sum(1)[:, None] + B.sum(1)[None] - inter)
        np.testing.assert_allclose(jaccard_on_support(pat, nbr), np.take_along_axis(J, nbr, axis=1), rtol=1e-12)
        Zp = np.abs(V)
        counts, cols, vals = support_enhance(indptr, indices, pat.s, pat.w, nbr, Zp)
        E = sp.csr_matrix((vals, cols, np.r_[0, np.cumsum(counts)]), shape=(pat.n, pat.m)).toarray()
        np.testing.assert_allclose(E, (X @ support_matrix_dense(nbr, Zp, pat.n)).T, rtol=1e-10, atol=1e-15)
        # top entries per cell: the largest 5 of each row kept, the rest dropped
        counts, cols, vals = support_enhance(indptr, indices, pat.s, pat.w, nbr, Zp, top=5)
        assert counts.max() == 5
        E5 = sp.csr_matrix((vals, cols, np.r_[0, np.cumsum(counts)]), shape=(pat.n, pat.m)).toarray()
        np.testing.assert_allclose(np.sort(E5, 1)[:, -5:], np.sort(E, 1)[:, -5:], rtol=1e-12)
    finally:
        pat.remove()
    assert not any(p.name.startswith(f".{store.name}.sccase") for p in store.parent.iterdir())


def test_h_rows_rescales_h_every_iteration_in_both_modes(store, client, tmp_path):
    """``h_rows`` (the authors' code): each iteration starts from H with rows summing to 1.
    One iteration from (W0, H0) equals a plain iteration from (W0, H0 rescaled); atlas mode on
    the full support takes the same steps as exact mode; and the fit differs from the paper's."""
    from scatac_dist.ops.sccase import iterate, row_sums_to_one

    counts = open_atlas(store).X.compute()
    X, peaks, _ = numpy_tfidf(counts, np.ones(counts.shape[0], bool))
    n = X.shape[1]
    B = (counts.toarray()[:, peaks] > 0).astype(float)
    inter = B @ B.T
    Z0 = inter / (B.sum(1)[:, None] + B.sum(1)[None, :] - inter)
    np.fill_diagonal(Z0, 1.0)
    Z0 /= Z0.sum(0, keepdims=True)
    W0, H0 = nmf_start(X, 4, 3)
    R = full_mask(n, 3)
    a = iterate(X, Z0, R, W0, H0, max_iter=1, tol=0, h_rows=True)
    b = iterate(X, Z0, R, W0, row_sums_to_one(H0), max_iter=1, tol=0)
    np.testing.assert_allclose(row_sums_to_one(H0).sum(1), 1.0)
    for got, want in ((a.Z, b.Z), (a.W, b.W), (a.H, b.H)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
    kw = dict(n_factors=4, max_iter=4, tol=0, seed=3, h_rows=True)
    ex = SCCASE(mode="exact", **kw).fit(_copy(store, tmp_path, "e.zarr"))
    at = SCCASE(mode="atlas", k_neighbors=n - 1, **kw).fit(_copy(store, tmp_path, "a.zarr"))
    np.testing.assert_allclose(at.result_["losses"], ex.result_["losses"], rtol=1e-7)
    np.testing.assert_allclose(at.H_, ex.H_, rtol=1e-6, atol=1e-9 * np.abs(ex.H_).max())
    plain = SCCASE(mode="exact", **(kw | {"h_rows": False})).fit(_copy(store, tmp_path, "p.zarr"))
    assert not np.allclose(plain.H_, ex.H_)


def test_bernoulli_mask_is_a_function_of_the_entry():
    i, j = np.meshgrid(np.arange(300), np.arange(300), indexing="ij")
    R = bernoulli_mask(i, j, 300, 0.95, 7)
    assert abs(R.mean() - 0.95) < 0.005
    # any subset, in any order, draws the same entries
    sel = np.random.default_rng(1).integers(0, 300, (500, 2))
    np.testing.assert_array_equal(bernoulli_mask(sel[:, 0], sel[:, 1], 300, 0.95, 7), R[sel[:, 0], sel[:, 1]])
    assert not np.array_equal(bernoulli_mask(i, j, 300, 0.95, 8), R)


def test_atlas_with_full_support_equals_exact_mode(store, client, tmp_path):
    a, b = _copy(store, tmp_path, "a.zarr"), _copy(store, tmp_path, "b.zarr")
    kw = dict(n_factors=4, max_iter=4, tol=0, seed=3)
    ex = SCCASE(mode="exact", **kw).fit(a)
    n = ex.H_.shape[1]
    at = SCCASE(mode="atlas", k_neighbors=n - 1, **kw).fit(b)
    np.testing.assert_allclose(at.result_["losses"], ex.result_["losses"], rtol=1e-7)
    # the first and last recorded losses are Eq. (2) of the start (Jaccard Z0, NMF W0/H0) and
    # of the fitted W, H, Z, recomputed in NumPy from the counts
    counts = open_atlas(a).X.compute()
    X, peaks, _ = numpy_tfidf(counts, np.ones(counts.shape[0], bool))
    R = full_mask(n, 3)
    losses = ex.result_["losses"]
    assert losses[-1] == pytest.approx(paper_loss(X, ex.Z_[1].T, R, ex.W_, ex.H_), rel=1e-9)
    B = (counts.toarray()[:, peaks] > 0).astype(float)
    inter = B @ B.T
    Z0 = inter / (B.sum(1)[:, None] + B.sum(1)[None, :] - inter)
    np.fill_diagonal(Z0, 1.0)
    W0, H0 = nmf_start(X, 4, 3)
    assert losses[0] == pytest.approx(paper_loss(X, Z0 / Z0.sum(0, keepdims=True), R, W0, H0), rel=1e-6)
    assert losses[-1] < 0.99 * losses[0]
    np.testing.assert_allclose(at.W_, ex.W_, rtol=1e-6, atol=1e-9 * np.abs(ex.W_).max())
    np.testing.assert_allclose(at.H_, ex.H_, rtol=1e-6, atol=1e-9 * np.abs(ex.H_).max())
    nbr, Zv = at.Z_
    Zat = support_matrix_dense(nbr, Zv, n)
    np.testing.assert_allclose(Zat, ex.Z_[1].T, rtol=1e-6, atol=1e-9 * np.abs(Zat).max())
    A, B = open_atlas(a), open_atlas(b)
    La, Lb = A.read("layers/sccase"), B.read("layers/sccase")
    np.testing.assert_allclose(Lb.toarray(), La.toarray(), rtol=1e-5, atol=1e-7 * abs(La).max())
    np.testing.assert_allclose(B.read("obsm/X_sccase"), A.read("obsm/X_sccase"), rtol=1e-5, atol=1e-7)


def test_outputs_and_atlas_mode_recovers_clusters(store, client, tmp_path):
    from sklearn.cluster import KMeans

    from scatac_dist.tl.metrics import ari

    path = _copy(store, tmp_path)
    atlas = open_atlas(path)
    drop = np.zeros(atlas.n_obs, bool)
    drop[::50] = True                                    # cells outside pass_qc are left out
    atlas.write_obs({"pass_qc": ~drop})
    m = SCCASE(mode="atlas", k_neighbors=15, n_factors=4, max_iter=5, seed=0).fit(open_atlas(path, chunk_rows=100))
    atlas = open_atlas(path)
    X, peaks, _ = numpy_tfidf(atlas.X.compute(), ~drop)              # the used cells and peaks
    H = atlas.read("obsm/X_sccase")
    assert H.shape == (atlas.n_obs, 4) and np.isnan(H[drop]).all()
    np.testing.assert_array_equal(H[~drop], m.H_.T.astype(np.float32))
    W = atlas.read("varm/sccase_W")
    used = atlas.var["sccase_used"].to_numpy()
    np.testing.assert_array_equal(np.flatnonzero(used), peaks)
    assert W.shape == (atlas.n_vars, 4) and (W[~used] == 0).all()
    np.testing.assert_array_equal(W[used], m.W_.astype(np.float32))
    # Z on each cell's support (itself and 15 neighbours), R drawn on the same pairs
    nbr, Zv = m.Z_
    n = int((~drop).sum())
    assert nbr.shape == (n, 16) and (nbr[:, 0] == np.arange(n)).all()
    repeated = [j for j, row in enumerate(nbr.tolist()) if len(set(row)) != 16]
    assert not repeated, f"cells listed twice in their own support (e.g. cell {repeated[0]}: {nbr[repeated[0]]})"
    cols = np.broadcast_to(np.arange(n)[:, None], nbr.shape)
    Z, R, S = np.zeros((n, n)), np.zeros((n, n)), np.zeros((n, n), bool)
    Z[nbr, cols], R[nbr, cols], S[nbr, cols] = Zv, bernoulli_mask(nbr, cols, n, KEEP, 0), True
    # the enhanced layer is X Z (cells x peaks) on the used cells and peaks, nothing elsewhere
    L = atlas.read("layers/sccase")
    assert L.shape == atlas.shape and L[np.flatnonzero(drop)].nnz == 0 and L[:, np.flatnonzero(~used)].nnz == 0
    XZ = (X @ Z).T
    np.testing.assert_allclose(L[np.flatnonzero(~drop)][:, peaks].toarray(), XZ, rtol=1e-5, atol=1e-6 * XZ.max())
    pcs = atlas.read("obsm/X_sccase_pca")
    assert pcs.shape[0] == atlas.n_obs and np.isnan(pcs[drop]).all()
    assert_exact_pca(L[np.flatnonzero(~drop)][:, peaks], pcs[~drop])
    rec = atlas.provenance()["sccase"]
    assert rec["result"]["mode"] == "atlas" and rec["result"]["n_factors"] == 4
    # the recorded final loss is the support-restricted Eq. (2) of the fitted W, H, Z
    losses = rec["result"]["losses"]
    assert losses == m.result_["losses"] and len(losses) == 6
    assert losses[-1] == pytest.approx(paper_loss(X, Z, R, m.W_, m.H_, support=S), rel=1e-7)
    y = atlas.obs["celltype"].to_numpy()[~drop]
    lab = KMeans(3, n_init=10, random_state=0).fit_predict(pcs[~drop])
    assert ari(y, lab) > 0.8


@pytest.mark.parametrize("how", ["bulk", "labelled", "self"])
def test_sccaser_references(store, client, tmp_path, how):
    import anndata as ad

    path = _copy(store, tmp_path)
    atlas = open_atlas(path)
    C = atlas.X.compute()
    y = atlas.obs["celltype"].astype(str).to_numpy()
    if how == "bulk":
        groups = np.unique(y)
        bulk = np.stack([np.asarray(C[y == g].sum(0)).ravel() for g in groups], 1)
        ref = tmp_path / "bulk.tsv"
        pd.DataFrame(bulk, index=atlas.var_names if hasattr(atlas, "var_names") else atlas.var.index,
                     columns=groups).to_csv(ref, sep="\t")
        kw = dict(reference=str(ref))
    elif how == "labelled":
        ref = tmp_path / "ref.h5ad"
        ad.AnnData(C, obs=pd.DataFrame({"type": y}, index=atlas.obs.index), var=atlas.var).write_h5ad(ref)
        kw = dict(reference=str(ref), reference_labels="type")
    else:
        kw = dict(self_reference=True)
    # 100-row blocks: the reference is read and summed in 4 blocks of cells
    m = SCCASE(mode="exact", n_factors=3, n_ref_factors=2, max_iter=4, alpha=1.0, seed=0, **kw).fit(
        open_atlas(path, chunk_rows=100))
    assert m.W_.shape[1] == 5 and m.result_["n_ref_factors"] == 2
    rec = open_atlas(path).provenance()["sccase"]["result"]["reference"]
    # the reference matrix (kept peaks x samples), built in NumPy as the module docstring says
    X, peaks, idf = numpy_tfidf(C, np.ones(C.shape[0], bool))
    if how == "self":
        # pseudo-bulk of the binarised cells per Leiden cluster (resolution 1) of the 15-NN
        # graph of the NMF embedding, through the package's public graph functions
        from scatac_dist.tl.graph import connectivities, knn_graph, leiden_labels

        _, H0 = nmf_start(X, 3, 0)
        E = H0.T / np.maximum(np.linalg.norm(H0.T, axis=1, keepdims=True), 1e-300)   # unit rows
        idx, dist = knn_graph(E, 15, seed=0)
        clusters = leiden_labels(connectivities(idx, dist, len(E)), resolution=1.0, seed=0)
        assert rec["self_reference_clusters"] == len(np.unique(clusters))
        Bk = (C.toarray()[:, peaks] > 0).astype(float)
        M = np.stack([Bk[clusters == c].sum(0) for c in np.unique(clusters)], 1)
    else:
        M = np.stack([np.asarray(C[y == g][:, peaks].sum(0)).ravel() for g in np.unique(y)], 1).astype(float)
        if how == "labelled":
            assert rec["pseudo_bulk_of"] == "type" and rec["n_samples"] == 3
    Pref = reference_projection(M, idf, 2, 0)
    # the final loss is Eq. (3) of the fitted W, H, Z with that P
    R = full_mask(C.shape[0], 0)
    assert m.result_["losses"][-1] == pytest.approx(paper_loss(X, m.Z_[1].T, R, m.W_, m.H_, P=Pref), rel=1e-6)


def test_cli_and_bad_input(store, client, tmp_path):
    path = _copy(store, tmp_path)
    r = CliRunner().invoke(main, ["--scheduler", client.scheduler.address, "sccase", str(path), "--mode", "atlas",
                                  "--k-neighbors", "10", "--n-factors", "3", "--max-iter", "2"])
    assert r.exit_code == 0, r.output
    atlas = open_atlas(path)
    assert "X_sccase_pca" in atlas.keys("obsm") and "sccase" in atlas.keys("layers")
    bad = [(["--mode", "dense"], "mode"), (["--k-neighbors", "5000", "--mode", "atlas"], "k_neighbors"),
           (["--reference-labels", "type"], "reference"),
           (["--reference", str(tmp_path / "missing.tsv")], "does not exist")]
    for args, word in bad:
        r = CliRunner().invoke(main, ["--scheduler", client.scheduler.address, "sccase", str(path), *args])
        assert r.exit_code != 0 and word in r.output, (args, r.output)
    ref = tmp_path / "other.tsv"
    pd.DataFrame({"s1": [1.0, 2.0]}, index=["chrX_1_2", "chrX_3_4"]).to_csv(ref, sep="\t")
    with pytest.raises(ValueError, match="shares none"):
        SCCASE(reference=str(ref), n_factors=3, max_iter=1).fit(path)


@pytest.mark.slow
def test_atlas_with_full_support_equals_exact_mode_on_bm0828(data_dir, client, tmp_path):
    """The same check on the real 533-cell bm0828 set (all its 35,983 peaks pass the 1% rule)."""
    from scatac_dist.io import ingest

    folder = data_dir / "buenrostro2018_bm0828" / "filtered_peak_bc_matrix"
    a = ingest(folder, tmp_path / "a.zarr", chunk_rows=200, client=client, progress=False).path
    b = _copy(a, tmp_path, "b.zarr")
    kw = dict(n_factors=8, max_iter=3, tol=0, seed=0)
    ex = SCCASE(mode="exact", **kw).fit(a)
    n = ex.H_.shape[1]
    at = SCCASE(mode="atlas", k_neighbors=n - 1, **kw).fit(b)
    np.testing.assert_allclose(at.result_["losses"], ex.result_["losses"], rtol=1e-7)
    for got, want in ((at.W_, ex.W_), (at.H_, ex.H_), (support_matrix_dense(*at.Z_, n), ex.Z_[1].T)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * np.abs(want).max())

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
from scatac_dist.models import _sccase_data as data
from scatac_dist.models.sccase import jaccard_on_support, support_matrix_dense
from scatac_dist.ops.sccase_support import bernoulli_mask, support_enhance, support_quad
from scatac_dist.store import open_atlas

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
    assert np.all(np.diff(ex.result_["losses"]) <= 0) and ex.result_["losses"][-1] < ex.result_["losses"][0]
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
    SCCASE(mode="atlas", k_neighbors=15, n_factors=4, max_iter=5, seed=0).fit(path)
    atlas = open_atlas(path)
    H = atlas.read("obsm/X_sccase")
    assert H.shape == (atlas.n_obs, 4) and np.isnan(H[drop]).all() and not np.isnan(H[~drop]).any()
    W = atlas.read("varm/sccase_W")
    used = atlas.var["sccase_used"].to_numpy()
    assert W.shape == (atlas.n_vars, 4) and (W[~used] == 0).all()
    L = atlas.read("layers/sccase")
    assert L.shape == atlas.shape and L[np.flatnonzero(drop)].nnz == 0
    assert L[:, np.flatnonzero(~used)].nnz == 0 and (L.data > 0).all()
    pcs = atlas.read("obsm/X_sccase_pca")
    assert pcs.shape[0] == atlas.n_obs and np.isnan(pcs[drop]).all()
    rec = atlas.provenance()["sccase"]
    assert rec["result"]["mode"] == "atlas" and rec["result"]["n_factors"] == 4
    assert np.all(np.diff(rec["result"]["losses"]) <= 0)
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
    m = SCCASE(mode="exact", n_factors=3, n_ref_factors=2, max_iter=4, alpha=1.0, seed=0, **kw).fit(path)
    assert m.W_.shape[1] == 5 and m.result_["n_ref_factors"] == 2
    assert np.all(np.diff(m.result_["losses"]) <= 0)
    rec = open_atlas(path).provenance()["sccase"]["result"]["reference"]
    if how == "labelled":
        assert rec["pseudo_bulk_of"] == "type" and rec["n_samples"] == 3
    if how == "self":
        assert rec["self_reference_clusters"] >= 2


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

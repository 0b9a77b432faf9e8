"""The synthetic generator: deterministic for a seed, realistic in difficulty."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scatac_dist.datasets import SynthParams, generate_rows, synth_obs, synthesize


def test_rows_do_not_depend_on_how_they_are_cut():
    p = SynthParams(n_cells=2500, n_peaks=3000, seed=7)
    whole = generate_rows(p, 0, p.n_cells)
    pieces = sp.vstack([generate_rows(p, s, min(s + 333, p.n_cells)) for s in range(0, p.n_cells, 333)])
    assert (whole != pieces).nnz == 0
    assert (generate_rows(SynthParams(n_cells=2500, n_peaks=3000, seed=8), 0, 2500) != whole).nnz > 0


def test_store_is_the_same_for_any_chunking_and_workers(client, tmp_path):
    import anndata as ad
    from distributed import Client, LocalCluster

    p = SynthParams(n_cells=2000, n_peaks=1500, n_batches=2, batch_effect=0.3, seed=11)
    a = synthesize(tmp_path / "a.zarr", p, chunk_rows=250, client=client, progress=False)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as lc, \
            Client(lc) as one:
        b = synthesize(tmp_path / "b.zarr", p, chunk_rows=1999, client=one, progress=False)
    xa, xb = ad.read_zarr(a.path), ad.read_zarr(b.path)
    assert (xa.X != xb.X).nnz == 0
    assert xa.obs.equals(xb.obs) and xa.var.equals(xb.var)
    assert set(xa.obs["batch"].cat.categories) == {"batch0", "batch1"}


def test_depth_and_labels_follow_the_parameters():
    p = SynthParams(n_cells=4000, n_peaks=20_000, fragments=800, depth_sigma=0.4, n_clusters=6, seed=2)
    X = generate_rows(p, 0, p.n_cells)
    depth = np.asarray(X.sum(axis=1)).ravel()
    # median of a log-normal is exp(mu); a few fragments land on the same peak, none are lost
    assert abs(np.median(depth) / 800 - 1) < 0.05
    assert abs(np.log(depth).std() - 0.4) < 0.05
    obs = synth_obs(p)
    assert obs["celltype"].nunique() == 6 and len(obs) == p.n_cells
    # every type has its own peaks: its mean profile differs from the others'
    lab = obs["celltype"].cat.codes.to_numpy()
    prof = np.vstack([np.asarray(X[lab == c].mean(axis=0)).ravel() for c in range(6)])
    corr = np.corrcoef(prof)
    assert corr[np.triu_indices(6, 1)].max() < 0.99


@pytest.mark.parametrize("signal, lo, hi", [(0.25, 0.4, 0.95), (0.02, -0.05, 0.3)])
def test_default_signal_is_not_trivial(signal, lo, hi):
    """A standard LSI pipeline (TF-IDF, SVD, k-means) scores well short of ARI 1 by default,
    and near 0 without signal: quality measured on this generator means something."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD
    from sklearn.metrics import adjusted_rand_score
    from sklearn.preprocessing import normalize

    p = SynthParams(n_cells=3000, n_peaks=30_000, signal=signal, seed=5)
    B = (generate_rows(p, 0, p.n_cells) > 0).astype(np.float64)
    idf = np.log1p(B.shape[0] / (1 + np.asarray(B.sum(axis=0)).ravel()))
    T = sp.csr_matrix(normalize(B, norm="l1").multiply(idf))
    T.data = np.log1p(T.data * 1e4)
    Z = normalize(TruncatedSVD(31, random_state=0).fit_transform(T)[:, 1:])
    pred = KMeans(p.n_clusters, n_init=5, random_state=0).fit_predict(Z)
    ari = adjusted_rand_score(synth_obs(p)["celltype"].cat.codes, pred)
    assert lo < ari < hi, ari

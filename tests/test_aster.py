"""ASTER's estimate of the number of cell types (scCASE's K): its TF-IDF transforms against
NumPy, its estimators on data with a known number of types, and on Leukemia against its
labels. scCASE's use of it (K = estimate + 1) is checked in a fit."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scatac_dist.io import ingest
from scatac_dist.models import SCCASE
from scatac_dist.store import open_atlas
from scatac_dist.tl.aster import _tfidf_l2, _tfidf_log1p, estimate_types
from tests.conftest import LEUKEMIA


def blocks(n_types: int, per_type: int = 80, peaks_per_type: int = 60, seed: int = 0, noise: float = 0.02):
    """Binary cells x peaks: each type opens its own block of peaks (p = 0.5) over background noise."""
    rng = np.random.default_rng(seed)
    p = n_types * peaks_per_type
    X = (rng.random((n_types * per_type, p)) < noise).astype(np.float64)
    for t in range(n_types):
        X[t * per_type:(t + 1) * per_type, t * peaks_per_type:(t + 1) * peaks_per_type] = \
            rng.random((per_type, peaks_per_type)) < 0.5
    return X, np.repeat(np.arange(n_types), per_type)


def test_tfidf_transforms_match_numpy():
    X, _ = blocks(3, per_type=10, peaks_per_type=8)
    # estimator 1: tf (raw) x ln(n / df), rows to unit length
    df = (X > 0).sum(0)
    T = X * np.log(X.shape[0] / np.maximum(df, 1))
    T /= np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-300)       # an empty cell stays 0
    np.testing.assert_allclose(_tfidf_l2(sp.csr_matrix(X)).toarray(), T, atol=1e-12)
    # estimators 2 and 3: value / cell total x ln(1 + n / peak total)
    T2 = X / np.maximum(X.sum(1, keepdims=True), 1) * np.log(1 + X.shape[0] / np.maximum(X.sum(0), 1))
    np.testing.assert_allclose(_tfidf_log1p(sp.csr_matrix(X)).toarray(), T2, atol=1e-12)


def test_estimators_find_the_planted_number_of_types():
    for k in (4, 7):
        X, _ = blocks(k, seed=k)
        est = estimate_types(sp.csr_matrix(X), seed=0)
        assert est["davies_bouldin"] == k and est["silhouette"] == k, est
        assert est["ssd"] is not None and abs(est["ssd"] - k) <= 1, est
        assert abs(est["k"] - k) <= 1, est


def test_leukemia_estimate_is_near_its_six_types():
    a = ad.read_h5ad(LEUKEMIA)
    B = sp.csr_matrix((a.X > 0).astype(np.float64))
    B = B[:, np.flatnonzero(np.asarray(B.sum(0)).ravel() >= np.ceil(0.01 * B.shape[0]))]
    n_types = a.obs["celltype"].nunique()
    est = estimate_types(B, seed=0)
    assert n_types == 6 and abs(est["k"] - n_types) <= 2, est


def test_sccase_takes_the_estimate_plus_one(tmp_path, client):
    X, _ = blocks(5, seed=1)
    var = pd.DataFrame(index=[f"chr1_{1000 * i}_{1000 * i + 500}" for i in range(X.shape[1])])
    ad.AnnData(sp.csr_matrix(X.astype(np.float32)), var=var,
               obs=pd.DataFrame(index=[f"c{i}" for i in range(len(X))])).write_h5ad(tmp_path / "b.h5ad")
    ingest(tmp_path / "b.h5ad", tmp_path / "b.zarr", client=client, progress=False)
    m = SCCASE(max_iter=2, seed=0).fit(open_atlas(tmp_path / "b.zarr"))
    est = m.result_["k_estimates"]
    assert est["k"] == 5 and m.result_["n_factors"] == 6
    m = SCCASE(max_iter=2, seed=0, k_estimator="tracy-widom").fit(open_atlas(tmp_path / "b.zarr"))
    assert m.result_["k_estimates"]["method"] == "Tracy-Widom estimate"

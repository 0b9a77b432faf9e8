"""SCALE's Tracy-Widom estimate of k: against a direct SC3-style reference, and on data
with a known number of clusters.

Findings these tests pin down (details in the module docstring of
``scatac_dist.tl.estimate_k``): the estimator is exact where its white-noise model holds
(white noise, Gaussian blocks, SCALE's own simulation with dropout up to 80 %), and
overestimates on heteroscedastic count data such as ``scatac_dist.datasets`` atlases.
"""

from __future__ import annotations

import importlib
import logging
import math

import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp

from scatac_dist.datasets import SynthParams, generate_rows
from scatac_dist.tl.estimate_k import TW_QUANTILE_0999, estimate_k, tracy_widom_threshold

# The package re-exports the function under the module's name; fetch the module itself.
ek_mod = importlib.import_module("scatac_dist.tl.estimate_k")

# ----------------------------------------------------------------------- references


def ref_eigenvalues(X_cells_by_peaks) -> tuple[np.ndarray, float]:
    """SC3's estkTW, transliterated: peaks x cells, R's scale(), t(x) %*% x, eigen()."""
    D = np.asarray(X_cells_by_peaks.toarray() if sp.issparse(X_cells_by_peaks)
                   else X_cells_by_peaks, dtype=float).T
    D = D[np.abs(D).sum(axis=1) > 0]  # peaks with no counts (see estimate_k's docstring)
    n, p = D.shape
    x = (D - D.mean(axis=0)) / D.std(axis=0, ddof=1)
    mu = (math.sqrt(n - 1) + math.sqrt(p)) ** 2
    sigma = (math.sqrt(n - 1) + math.sqrt(p)) * (1 / math.sqrt(n - 1) + 1 / math.sqrt(p)) ** (1 / 3)
    return np.linalg.eigvalsh(x.T @ x), mu + 3.273 * sigma


def ref_k(X) -> int:
    ev, bd = ref_eigenvalues(X)
    return int((ev > bd).sum())


def scale_simulation(seed: int, *, n_clusters: int = 3, per_cluster: int = 100,
                     n_peaks: int = 1000, n_specific: int = 100, dropout: float = 0.0,
                     noise: float = 0.1) -> tuple[sp.csr_matrix, np.ndarray]:
    """SCALE Methods, "Generation and corruption of the simulation dataset".

    300 cells, 1,000 peaks, 3 clusters each with 100 specific peaks valued 1 or 2 (1:4) in
    its cells and 0 elsewhere; corrupted by dropping values at rate ``dropout``, then
    setting entries to 1 or 2 (1:4) with probability 0.1.
    """
    rng = np.random.default_rng(seed)
    n = n_clusters * per_cluster
    labels = np.repeat(np.arange(n_clusters), per_cluster)
    X = np.zeros((n, n_peaks))
    for c in range(n_clusters):
        block = np.ix_(labels == c, np.arange(c * n_specific, (c + 1) * n_specific))
        X[block] = rng.choice([1, 2], size=(per_cluster, n_specific), p=[0.2, 0.8])
    X[rng.random(X.shape) < dropout] = 0
    hit = rng.random(X.shape) < noise
    X[hit] = rng.choice([1, 2], size=int(hit.sum()), p=[0.2, 0.8])
    return sp.csr_matrix(X), labels


def gaussian_blocks(seed: int, k: int, n_cells: int, n_peaks: int, delta: float = 0.5):
    rng = np.random.default_rng(seed)
    labels = np.arange(n_cells) % k
    means = rng.normal(0.0, delta, (k, n_peaks))
    return means[labels] + rng.normal(size=(n_cells, n_peaks)), labels


# -------------------------------------------------------------------- the equations


def test_threshold_formula():
    # n = 1001 peaks, p = 100 cells: sqrt(n - 1) = 31.6228, sqrt(p) = 10.
    a = math.sqrt(1000) + 10
    mu = a**2
    sigma = a * (1 / math.sqrt(1000) + 1 / 10) ** (1 / 3)
    assert TW_QUANTILE_0999 == 3.273
    assert tracy_widom_threshold(1001, 100) == pytest.approx(mu + 3.273 * sigma, rel=1e-14)
    assert mu == pytest.approx(1732.456, abs=1e-3)
    assert sigma == pytest.approx(21.1726, abs=1e-3)
    assert tracy_widom_threshold(1001, 100, quantile=0.0) == pytest.approx(mu)
    with pytest.raises(ValueError, match="n >= 2"):
        tracy_widom_threshold(1, 10)


@pytest.mark.parametrize("shape", [(120, 300), (300, 120)])  # p < n and p > n (other side)
@pytest.mark.parametrize("sparse", [False, True])
def test_spectrum_matches_direct_reference(shape, sparse):
    rng = np.random.default_rng(sum(shape) + sparse)
    lab = rng.integers(0, 3, shape[0])
    rates = np.full((3, shape[1]), 0.3)
    for c in range(3):
        rates[c, c * 20:(c + 1) * 20] = 1.5
    X = rng.poisson(rates[lab]).astype(float)
    X[:, :3] = 0  # empty peaks are dropped by both
    X = sp.csr_matrix(X) if sparse else X
    ev_ref, bd_ref = ref_eigenvalues(X)
    n, p = shape[1] - 3, shape[0]  # peaks with counts, cells
    assert tracy_widom_threshold(n, p) == pytest.approx(bd_ref, rel=1e-14)
    assert estimate_k(X, max_cells=None) == ref_k(X) == 3
    # the spectrum, through the public function: with the threshold set (by the quantile) just
    # below the i-th largest reference eigenvalue, i eigenvalues pass; just above it, i - 1
    mu = tracy_widom_threshold(n, p, quantile=0.0)
    sigma = tracy_widom_threshold(n, p, quantile=1.0) - mu
    r = min(p, n) - 1  # non-zero eigenvalues (centring removes one)
    top = np.sort(ev_ref)[::-1][:r]
    eps = 1e-8 * top[0]
    gaps = np.abs(np.diff(top))
    probes = [i for i in range(1, r - 1) if min(gaps[i - 1], gaps[i]) > 2 * eps][::max(1, r // 40)]
    assert len(probes) >= 20
    for i in [0] + probes:
        below, above = ((top[i] - eps - mu) / sigma, (top[i] + eps - mu) / sigma)
        assert estimate_k(X, max_cells=None, tw_quantile=below) == i + 1, i
        assert estimate_k(X, max_cells=None, tw_quantile=above) == i, i


def test_lanczos_path_matches_dense(monkeypatch):
    # 1,200 cells x 1,100 peaks is above the dense limit (1,000): Lanczos on the implicit
    # matrix. It must count what the dense route counts, including the fallback when more
    # eigenvalues than it asked for are above the threshold.
    X, _ = scale_simulation(0, n_clusters=6, per_cluster=200, n_peaks=1100, n_specific=100,
                            dropout=0.5)
    expected = ref_k(X)
    assert expected == 6
    assert estimate_k(X, max_cells=None) == expected
    monkeypatch.setattr(ek_mod, "_LANCZOS_K", 4)  # fewer than the 6 spikes: dense fallback
    assert estimate_k(X, max_cells=None) == expected
    monkeypatch.setattr(ek_mod, "_DENSE_CELLS", 10**9)
    assert estimate_k(X, max_cells=None) == expected


# ------------------------------------------------------- where the estimator should work


def test_white_noise_gives_zero():
    # Under the null the largest eigenvalue passes the 0.999 quantile with p = 0.001.
    for seed in range(6):
        rng = np.random.default_rng(seed)
        assert estimate_k(rng.normal(size=(200, 400))) == 0
        bern = (rng.random((300, 600)) < 0.1).astype(float)
        assert estimate_k(sp.csr_matrix(bern)) == 0


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_gaussian_blocks_recover_k_exactly(k):
    # K blocks give K spikes: K - 1 contrasts plus the mean profile shared by all cells.
    for seed in range(2):
        X, _ = gaussian_blocks(seed, k, 210, 500)
        assert estimate_k(X) == k


@pytest.mark.parametrize("dropout", [0.1, 0.3, 0.5, 0.8])
def test_scale_simulation_recovers_three_clusters(dropout):
    """The paper's own simulation: exact up to 80 % dropout (measured: 0-1 at 90 %)."""
    for seed in range(2):
        X, _ = scale_simulation(seed, dropout=dropout)
        assert estimate_k(X) == 3


@pytest.mark.parametrize("n_clusters", [5, 8])
def test_scale_simulation_more_clusters(n_clusters):
    X, _ = scale_simulation(1, n_clusters=n_clusters, dropout=0.3)
    assert estimate_k(X) == n_clusters
    # Tolerance stated: at 70 % dropout one of 8 clusters can fall under the edge.
    X, _ = scale_simulation(1, n_clusters=n_clusters, dropout=0.7)
    assert n_clusters - 1 <= estimate_k(X) <= n_clusters


# ------------------------------------------------------------- where it does not (bias)


def test_overestimates_heteroscedastic_synthetic_atlas():
    """``datasets.SynthParams`` counts break the white-noise model: documented bias.

    Peak accessibilities are log-normal, so entries have very different variances and the
    noise spectrum passes the white-noise edge. With a single cell type the estimate is
    already above 1 (measured 4-5 at this size, ~65 at 2,000 x 5,000); binarising brings
    it back to 1-2. If this test starts failing, the estimator's behaviour has changed.
    """
    p = SynthParams(n_cells=600, n_peaks=2000, n_clusters=1, n_lineages=1, signal=0.0, seed=0)
    X = generate_rows(p, 0, p.n_cells)
    assert estimate_k(X) >= 3
    assert estimate_k(X.sign()) <= 2
    p3 = SynthParams(n_cells=600, n_peaks=2000, n_clusters=3, n_lineages=2, seed=0)
    assert estimate_k(generate_rows(p3, 0, p3.n_cells)) >= 3


# --------------------------------------------------------------- sampling and inputs


def test_subsample_is_seeded_and_recovers_k():
    X, _ = scale_simulation(3, per_cluster=400, dropout=0.5)  # 1,200 cells
    k = estimate_k(X, max_cells=300, seed=7)
    assert k == 3
    idx = np.sort(np.random.default_rng(7).choice(1200, 300, replace=False))
    assert k == estimate_k(X[idx], max_cells=None)
    assert estimate_k(X, max_cells=300, seed=7) == k


def test_dense_sparse_and_dask_inputs_agree():
    X, _ = scale_simulation(4, per_cluster=150, dropout=0.4)
    lazy = da.from_array(X, chunks=(100, -1), asarray=False)
    expected = estimate_k(X, max_cells=200, seed=1)
    assert expected == 3
    assert estimate_k(X.toarray(), max_cells=200, seed=1) == expected
    assert estimate_k(sp.csr_array(X), max_cells=200, seed=1) == expected
    assert estimate_k(lazy, max_cells=200, seed=1) == expected


def test_empty_cells_are_dropped_with_a_warning(caplog):
    X, _ = scale_simulation(5, dropout=0.2)
    X = sp.vstack([X, sp.csr_matrix((2, X.shape[1]))], format="csr")
    with caplog.at_level(logging.WARNING, logger="scatac_dist"):
        assert estimate_k(X) == 3
    assert "dropping 2 cells" in caplog.text


def test_input_errors():
    with pytest.raises(ValueError, match="2-D"):
        estimate_k(np.ones(5))
    with pytest.raises(ValueError, match="max_cells"):
        estimate_k(np.ones((5, 5)), max_cells=1)
    with pytest.raises(ValueError, match="peaks have counts"):
        estimate_k(sp.csr_matrix(np.eye(5, 1)))
    with pytest.raises(ValueError, match="non-empty cells"):
        estimate_k(np.vstack([np.arange(4.0), np.zeros(4)]))

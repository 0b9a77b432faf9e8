"""Clustering and imputation metrics against direct computations on small data."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import hypergeom
from sklearn.metrics import silhouette_score

from scatac_dist.tl.metrics import (
    ami,
    ari,
    auprc,
    auroc,
    contingency,
    evaluate,
    fmi,
    homogeneity,
    micro_f1,
    nmi,
    silhouette_pearson,
)

# ----------------------------------------------------------------- direct references


def _table(t, p):
    t = np.unique(t, return_inverse=True)[1].ravel()
    p = np.unique(p, return_inverse=True)[1].ravel()
    tab = np.zeros((t.max() + 1, p.max() + 1))
    for i, j in zip(t, p):
        tab[i, j] += 1
    return tab


def _comb2(x):
    return np.asarray(x) * (np.asarray(x) - 1) / 2


def _entropy(counts):
    q = counts[counts > 0] / counts.sum()
    return float(-(q * np.log(q)).sum())


def _mi(tab):
    n = tab.sum()
    a, b = tab.sum(1), tab.sum(0)
    nz = tab > 0
    return float((tab[nz] / n * np.log(n * tab[nz] / np.outer(a, b)[nz])).sum())


def ref_ari(t, p):
    tab = _table(t, p)
    n = tab.sum()
    index = _comb2(tab).sum()
    sa, sb = _comb2(tab.sum(1)).sum(), _comb2(tab.sum(0)).sum()
    expected = sa * sb / _comb2(n)
    return (index - expected) / ((sa + sb) / 2 - expected)


def ref_nmi_geometric(t, p):
    tab = _table(t, p)
    return _mi(tab) / math.sqrt(_entropy(tab.sum(1)) * _entropy(tab.sum(0)))


def ref_ami(t, p):
    # Vinh, Epps & Bailey (2010): AMI = (MI - E[MI]) / (mean(H(T), H(P)) - E[MI]),
    # E[MI] summed over the hypergeometric law of each cell of the table.
    tab = _table(t, p)
    n = int(tab.sum())
    a, b = tab.sum(1).astype(int), tab.sum(0).astype(int)
    emi = 0.0
    for ai in a:
        for bj in b:
            for nij in range(max(1, ai + bj - n), min(ai, bj) + 1):
                emi += nij / n * math.log(n * nij / (ai * bj)) * hypergeom(n, ai, bj).pmf(nij)
    ht, hp = _entropy(tab.sum(1)), _entropy(tab.sum(0))
    return (_mi(tab) - emi) / ((ht + hp) / 2 - emi)


def ref_homogeneity(t, p):
    tab = _table(t, p)
    n = tab.sum()
    b = tab.sum(0)
    nz = tab > 0
    h_t_given_p = -float((tab[nz] / n * np.log(tab[nz] / np.broadcast_to(b, tab.shape)[nz])).sum())
    return 1.0 - h_t_given_p / _entropy(tab.sum(1))


def ref_fmi(t, p):
    tab = _table(t, p)
    tp = _comb2(tab).sum()
    return tp / math.sqrt(_comb2(tab.sum(0)).sum() * _comb2(tab.sum(1)).sum())


def ref_micro_f1(t, p):
    """Brute force over every one-to-one map of clusters to labels (unmatched = wrong)."""
    tab = _table(t, p)
    n_t, n_p = tab.shape
    best = 0.0
    if n_p <= n_t:
        for labels in itertools.permutations(range(n_t), n_p):
            best = max(best, sum(tab[labels[j], j] for j in range(n_p)))
    else:
        for clusters in itertools.permutations(range(n_p), n_t):
            best = max(best, sum(tab[i, clusters[i]] for i in range(n_t)))
    return best / tab.sum()


def _random_labels(seed, n, k_t, k_p):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, k_t, n)
    # Predictions that agree with truth for part of the cells, random for the rest.
    p = np.where(rng.random(n) < 0.6, (t * 7 + 3) % k_p, rng.integers(0, k_p, n))
    return t, p


CASES = [(s, n, kt, kp) for s, (n, kt, kp) in enumerate(
    [(60, 3, 3), (80, 3, 4), (80, 4, 3), (50, 2, 4), (120, 4, 4), (40, 4, 2)])]


# --------------------------------------------------------------------- label metrics


@pytest.mark.parametrize("seed,n,k_t,k_p", CASES)
def test_label_metrics_match_direct_formulas(seed, n, k_t, k_p):
    t, p = _random_labels(seed, n, k_t, k_p)
    assert ari(t, p) == pytest.approx(ref_ari(t, p), abs=1e-12)
    assert nmi(t, p) == pytest.approx(ref_nmi_geometric(t, p), abs=1e-12)
    assert ami(t, p) == pytest.approx(ref_ami(t, p), abs=1e-9)
    assert homogeneity(t, p) == pytest.approx(ref_homogeneity(t, p), abs=1e-12)
    assert fmi(t, p) == pytest.approx(ref_fmi(t, p), abs=1e-12)
    assert micro_f1(t, p) == pytest.approx(ref_micro_f1(t, p), abs=1e-12)


def test_nmi_arithmetic_option():
    t, p = _random_labels(7, 90, 3, 5)
    tab = _table(t, p)
    expected = _mi(tab) / ((_entropy(tab.sum(1)) + _entropy(tab.sum(0))) / 2)
    assert nmi(t, p, average_method="arithmetic") == pytest.approx(expected, abs=1e-12)
    assert nmi(t, p) != pytest.approx(expected, abs=1e-6)  # the SCALE default is geometric


def test_perfect_and_renamed_partitions():
    t = np.array([0, 0, 1, 1, 2, 2, 2])
    p = np.array(["c", "c", "a", "a", "b", "b", "b"])
    for f in (ari, ami, nmi, homogeneity, fmi, micro_f1):
        assert f(t, p) == pytest.approx(1.0)


def test_micro_f1_unmatched_clusters_count_as_wrong():
    # Truth has 2 labels; cluster 2 cannot be matched, so its 2 cells are wrong even though
    # SCALE's released code would relabel them 0 and count them right.
    t = np.array([0, 0, 0, 0, 1, 1, 1, 0, 0])
    p = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    assert micro_f1(t, p) == pytest.approx(7 / 9)
    # Fewer clusters than labels: the unmatched label's cells are wrong.
    t = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 1, 1, 1, 1])
    assert micro_f1(t, p) == pytest.approx(4 / 6)


def test_label_types_and_missing_truth():
    truth = pd.Series(pd.Categorical(["B", "B", None, "T", "T", "NK", "NK", np.nan]))
    pred = np.array([5, 5, 9, 1, 1, 2, 3, 3])
    keep = np.array([0, 1, 3, 4, 5, 6])
    t_kept = np.array(["B", "B", "T", "T", "NK", "NK"])
    for f in (ari, ami, nmi, homogeneity, fmi, micro_f1):
        assert f(truth, pred) == pytest.approx(f(t_kept, pred[keep])), f.__name__
    # Object arrays with None and float arrays with NaN are treated the same way.
    obj = np.array(["B", "B", None, "T", "T", "NK", "NK", None], dtype=object)
    assert ari(obj, pred) == pytest.approx(ari(t_kept, pred[keep]))
    flt = np.array([0.0, 0.0, np.nan, 1.0, 1.0, 2.0, 2.0, np.nan])
    assert ari(flt, pred) == pytest.approx(ari(t_kept, pred[keep]))
    # Labels as strings vs integer codes give the same scores.
    t, p = _random_labels(3, 50, 3, 3)
    assert ari(t.astype(str), pd.Series(p).astype("category")) == pytest.approx(ari(t, p))
    tab = contingency(truth, pred)
    assert tab.sum() == 6 and tab.shape == (3, 4)


def test_label_errors():
    with pytest.raises(ValueError, match="truth has 3 labels but pred has 2"):
        ari([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="only 1 cells have a truth label"):
        ari([0, None, None], [0, 1, 1])
    with pytest.raises(ValueError, match="pred has 1 missing"):
        nmi([0, 1, 1], [0, None, 1])
    with pytest.raises(ValueError, match="1-D"):
        micro_f1(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="DataFrame"):
        evaluate(pd.DataFrame({"a": [0, 1]}), [0, 1])


def test_evaluate_is_json_and_consistent():
    t, p = _random_labels(11, 100, 4, 5)
    t = t.astype(object)
    t[:3] = None
    out = evaluate(t, p)
    assert set(out) == {"ari", "ami", "nmi", "homogeneity", "fmi", "micro_f1", "n_cells",
                        "n_truth_labels", "n_pred_clusters"}
    assert json.loads(json.dumps(out)) == out
    assert out["n_cells"] == 97 and isinstance(out["n_cells"], int)
    assert out["n_truth_labels"] == len(set(t[3:]))
    assert out["n_pred_clusters"] == len(set(p[3:]))
    assert out["ari"] == pytest.approx(ref_ari(t[3:].astype(int), p[3:]))
    assert out["micro_f1"] == pytest.approx(ref_micro_f1(t[3:].astype(int), p[3:]))
    assert all(type(v) in (int, float) for v in out.values())


# ------------------------------------------------------------------------- silhouette


def _blobs(seed, n, d, k):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, k, n)
    centres = rng.normal(0, 1, (k, d))
    return centres[lab] + rng.normal(0, 1.5, (n, d)) + 5.0, lab


def _ref_silhouette(X, lab):
    D = 1.0 - np.corrcoef(np.asarray(X, dtype=float))
    np.fill_diagonal(D, 0.0)
    return silhouette_score(np.clip(D, 0, None), lab, metric="precomputed")


def test_silhouette_matches_sklearn_precomputed():
    X, lab = _blobs(0, 300, 12, 4)
    expected = _ref_silhouette(X, lab)
    assert silhouette_pearson(X, lab) == pytest.approx(expected, abs=1e-10)
    # String labels, and a singleton cluster (its cell scores 0, as in sklearn).
    lab2 = lab.astype(str)
    lab2[0] = "alone"
    assert silhouette_pearson(X, lab2) == pytest.approx(_ref_silhouette(X, lab2), abs=1e-10)


def test_silhouette_sparse_matches_dense():
    rng = np.random.default_rng(1)
    lab = rng.integers(0, 3, 250)
    P = np.full((3, 400), 0.05)
    for c in range(3):
        P[c, c * 40:(c + 1) * 40] = 0.4
    X = rng.poisson(P[lab])
    X[:, 0] = 1  # no constant row even for a cell with no other counts
    expected = _ref_silhouette(X, lab)
    assert silhouette_pearson(sp.csr_matrix(X), lab) == pytest.approx(expected, abs=1e-9)
    assert silhouette_pearson(X, lab) == pytest.approx(expected, abs=1e-10)


def test_silhouette_sampling_is_seeded_and_close():
    X, lab = _blobs(2, 6000, 10, 5)
    exact = silhouette_pearson(X, lab, sample_size=None)
    sampled = silhouette_pearson(X, lab, sample_size=1500, seed=3)
    assert sampled == silhouette_pearson(X, lab, sample_size=1500, seed=3)
    assert sampled == pytest.approx(exact, abs=0.02)
    # The sample is uniform without replacement from default_rng(seed): same as scoring it.
    idx = np.sort(np.random.default_rng(3).choice(6000, 1500, replace=False))
    assert sampled == pytest.approx(_ref_silhouette(X[idx], lab[idx]), abs=1e-10)


def test_silhouette_drops_missing_labels_and_checks_input():
    X, lab = _blobs(4, 120, 6, 3)
    lab_obj = lab.astype(object)
    lab_obj[:10] = None
    assert silhouette_pearson(X, lab_obj) == pytest.approx(_ref_silhouette(X[10:], lab[10:]))
    with pytest.raises(ValueError, match="constant embedding row"):
        X2 = X.copy()
        X2[5] = 2.0
        silhouette_pearson(X2, lab)
    with pytest.raises(ValueError, match="120 rows but labels has 119"):
        silhouette_pearson(X, lab[:-1])
    with pytest.raises(ValueError, match="number of labels"):
        silhouette_pearson(X, np.zeros(120))


# ----------------------------------------------------------------------- auROC, auPRC


def _ref_auroc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    gt = (pos[:, None] > neg[None, :]).sum()
    eq = (pos[:, None] == neg[None, :]).sum()
    return (gt + 0.5 * eq) / (pos.size * neg.size)


def _ref_ap(y, s):
    # AP = sum_k (R_k - R_{k-1}) P_k over distinct score thresholds, highest first.
    ap, prev_r = 0.0, 0.0
    for thr in np.unique(s)[::-1]:
        sel = s >= thr
        prec = y[sel].sum() / sel.sum()
        rec = y[sel].sum() / y.sum()
        ap += (rec - prev_r) * prec
        prev_r = rec
    return ap


def test_auc_match_direct_formulas_dense_and_sparse():
    rng = np.random.default_rng(5)
    truth = (rng.random((30, 40)) < 0.2).astype(np.int8)
    scores = np.where(rng.random((30, 40)) < 0.5, 0.0, rng.random((30, 40)) + truth)
    scores = np.round(scores, 2)  # ties, as in real enhanced matrices
    y, s = truth.ravel(), scores.ravel()
    for t_in, s_in in [(truth, scores), (sp.csr_matrix(truth), sp.csr_matrix(scores)),
                       (truth.astype(bool), sp.csc_matrix(scores))]:
        assert auroc(t_in, s_in) == pytest.approx(_ref_auroc(y, s), abs=1e-12)
        assert auprc(t_in, s_in) == pytest.approx(_ref_ap(y, s), abs=1e-12)
    # Counts as truth: every entry > 0 is a positive.
    assert auroc(truth * 3, scores) == pytest.approx(_ref_auroc(y, s))


def test_auc_errors():
    with pytest.raises(ValueError, match="shape"):
        auroc(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="only negative"):
        auprc(np.zeros((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="max_entries"):
        auroc(sp.random(100, 100, density=0.1, format="csr", random_state=0),
              np.zeros((100, 100)), max_entries=1000)
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([[0, 1]]), np.array([[np.nan, 1.0]]))

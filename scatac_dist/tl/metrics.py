"""Clustering and imputation metrics, as the method papers evaluate them.

Pure functions on in-memory arrays (NumPy, SciPy sparse, pandas): no Dask, no AnnData, so
they are easy to test and to call on gathered results (labels and embeddings are
O(n_cells) or O(n_cells x d), which GUIDE invariant 2 allows on the client).

Label metrics take ``(truth, pred)`` in that order, one label per cell, in the same cell
order. Labels may be anything pandas can factorize: integers, strings, pandas
categoricals or Series. Cells whose *truth* is missing (``NaN``, ``None``, a missing
categorical) are dropped before scoring, because atlases often leave some cells
unannotated; a missing *prediction* is an error, since every clustering assigns every cell.

====================  ==============================================================  ================
function              definition                                                      source
====================  ==============================================================  ================
:func:`ari`           adjusted Rand index, ``(RI - E[RI]) / (max RI - E[RI])``        SCALE Methods; scCASE
:func:`ami`           adjusted mutual information (arithmetic normalisation)          scCASE
:func:`nmi`           ``I(P; T) / sqrt(H(P) H(T))`` (geometric normalisation)         SCALE Methods
:func:`homogeneity`   ``1 - H(T | P) / H(T)``                                         Rosenberg & Hirschberg 2007
:func:`fmi`           Fowlkes-Mallows: geometric mean of pairwise precision, recall   scCASE
:func:`micro_f1`      micro-F1 after Hungarian matching of clusters to labels         SCALE Methods
:func:`silhouette_pearson`  silhouette with distance ``1 - Pearson r``                scCASE (after scOpen)
:func:`auroc`, :func:`auprc`  areas under the ROC / precision-recall curves           scCASE
====================  ==============================================================  ================
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm

logger = logging.getLogger("scatac_dist")

__all__ = [
    "ari",
    "ami",
    "nmi",
    "homogeneity",
    "fmi",
    "micro_f1",
    "contingency",
    "silhouette_pearson",
    "auroc",
    "auprc",
    "evaluate",
]

# Above this many entries, auroc/auprc refuse to densify their inputs (8 bytes each, twice).
_MAX_AUC_ENTRIES = 100_000_000


# ----------------------------------------------------------------------------- labels


def _factorize(labels: Any, name: str) -> np.ndarray:
    """Integer codes of a 1-D label vector; missing labels get ``-1``."""
    if isinstance(labels, pd.DataFrame):
        raise ValueError(f"{name} is a DataFrame; pass one column of it, e.g. obs['celltype']")
    if not isinstance(labels, (pd.Series, pd.Index, pd.Categorical)):
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"{name} has shape {labels.shape}; pass a 1-D vector of one label "
                             "per cell (use .ravel() on a column vector)")
    codes, _ = pd.factorize(labels, use_na_sentinel=True)
    return np.asarray(codes, dtype=np.int64)


def _labels(truth: Any, pred: Any, *, min_cells: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Check and encode ``(truth, pred)``; drop cells whose truth is missing.

    Returns integer codes ``0..k-1`` for both, of equal length.
    """
    t = _factorize(truth, "truth")
    p = _factorize(pred, "pred")
    if t.shape[0] != p.shape[0]:
        raise ValueError(f"truth has {t.shape[0]} labels but pred has {p.shape[0]}; pass one label "
                         "per cell for the same cells, in the same order")
    if (p < 0).any():
        raise ValueError(f"pred has {int((p < 0).sum())} missing labels (NaN/None); every cell "
                         "needs a predicted cluster: assign them one, or drop those cells from "
                         "both truth and pred")
    keep = t >= 0
    n_drop = int((~keep).sum())
    if n_drop:
        logger.debug("metrics: dropping %d cells with missing truth labels", n_drop)
        t, p = t[keep], p[keep]
    if t.shape[0] < min_cells:
        raise ValueError(f"only {t.shape[0]} cells have a truth label ({n_drop} missing); the "
                         f"metric needs at least {min_cells}: pass more cells or fill in the labels")
    # Re-encode densely: dropping cells can leave unused codes.
    t = np.unique(t, return_inverse=True)[1].ravel()
    p = np.unique(p, return_inverse=True)[1].ravel()
    return t, p


def contingency(truth: Any, pred: Any) -> np.ndarray:
    """Contingency table ``n_ij``: cells with truth label ``i`` and predicted cluster ``j``.

    Rows follow the labels in order of first appearance after dropping cells with a missing
    truth label; so do columns. Returns a dense ``(n_truth_labels, n_pred_clusters)``
    int64 array.
    """
    t, p = _labels(truth, pred, min_cells=1)
    table = np.zeros((t.max() + 1, p.max() + 1), dtype=np.int64)
    np.add.at(table, (t, p), 1)
    return table


def ari(truth: Any, pred: Any) -> float:
    """Adjusted Rand index between reference labels and predicted clusters.

    ``ARI = (RI - E[RI]) / (max(RI) - E[RI])`` (SCALE Methods, "Evaluation of clustering
    results"); 1 for identical partitions, about 0 for random ones. Wraps
    :func:`sklearn.metrics.adjusted_rand_score`.

    Parameters
    ----------
    truth
        Reference label per cell; cells whose truth is missing are dropped.
    pred
        Predicted cluster per cell, same length and order.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If the lengths differ, ``pred`` has missing values, or fewer than 2 cells remain.
    """
    t, p = _labels(truth, pred)
    return float(skm.adjusted_rand_score(t, p))


def ami(truth: Any, pred: Any, *, average_method: str = "arithmetic") -> float:
    """Adjusted mutual information (chance-corrected NMI), as scCASE reports it.

    Wraps :func:`sklearn.metrics.adjusted_mutual_info_score` with its default
    ``average_method='arithmetic'``. Arguments and errors as in :func:`ari`.
    """
    t, p = _labels(truth, pred)
    return float(skm.adjusted_mutual_info_score(t, p, average_method=average_method))


def nmi(truth: Any, pred: Any, *, average_method: str = "geometric") -> float:
    """Normalised mutual information ``I(P; T) / sqrt(H(P) H(T))``.

    The SCALE paper (Methods) normalises by the *geometric* mean of the two entropies, so
    that is the default here; scikit-learn's own default is the arithmetic mean (pass
    ``average_method='arithmetic'`` to match it). Wraps
    :func:`sklearn.metrics.normalized_mutual_info_score`. Arguments and errors as in
    :func:`ari`.
    """
    t, p = _labels(truth, pred)
    return float(skm.normalized_mutual_info_score(t, p, average_method=average_method))


def homogeneity(truth: Any, pred: Any) -> float:
    """Homogeneity: 1 when every predicted cluster holds cells of a single truth label.

    ``1 - H(T | P) / H(T)``; wraps :func:`sklearn.metrics.homogeneity_score`. Arguments and
    errors as in :func:`ari`.
    """
    t, p = _labels(truth, pred)
    return float(skm.homogeneity_score(t, p))


def fmi(truth: Any, pred: Any) -> float:
    """Fowlkes-Mallows index: geometric mean of pairwise precision and recall (scCASE).

    Wraps :func:`sklearn.metrics.fowlkes_mallows_score`. Arguments and errors as in
    :func:`ari`.
    """
    t, p = _labels(truth, pred)
    return float(skm.fowlkes_mallows_score(t, p))


def micro_f1(truth: Any, pred: Any) -> float:
    """Micro-averaged F1 after one-to-one matching of predicted clusters to truth labels.

    SCALE (Methods, "F1 score") scores a clustering by mapping each predicted cluster to a
    reference label with the Hungarian algorithm on the contingency table ``n_ij`` (the
    matching that maximises the number of cells whose cluster maps to their own label),
    then computing ``F1 = 2 * precision * recall / (precision + recall)`` micro-averaged
    over cells. With one label per cell, micro precision and micro recall both equal the
    fraction of cells whose matched label is correct, so::

        micro_f1 = max over one-to-one matchings M of  sum_{(i, j) in M} n_ij / n

    solved with :func:`scipy.optimize.linear_sum_assignment` (``maximize=True``).

    When there are more predicted clusters than truth labels, the clusters left without a
    match count as wrong for all their cells (and so do labels left without a cluster).
    This differs on purpose from SCALE's released code (``reassign_cluster_with_ref``),
    which relabels unmatched clusters as label ``0`` and so can score some of them as right
    by accident.

    Parameters
    ----------
    truth
        Reference label per cell; cells whose truth is missing are dropped.
    pred
        Predicted cluster per cell, same length and order.

    Returns
    -------
    float
        In ``[0, 1]``; 1 only when the partitions are identical up to renaming.

    Raises
    ------
    ValueError
        If the lengths differ, ``pred`` has missing values, or fewer than 2 cells remain.
    """
    t, p = _labels(truth, pred)
    table = np.zeros((t.max() + 1, p.max() + 1), dtype=np.int64)
    np.add.at(table, (t, p), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / t.shape[0])


def evaluate(truth: Any, pred: Any) -> dict[str, float | int]:
    """All label metrics at once, as plain Python numbers (JSON-serialisable).

    Parameters
    ----------
    truth
        Reference label per cell; cells whose truth is missing are dropped (and not counted
        in ``n_cells``).
    pred
        Predicted cluster per cell, same length and order.

    Returns
    -------
    dict
        ``ari``, ``ami``, ``nmi`` (geometric, as SCALE), ``homogeneity``, ``fmi``,
        ``micro_f1`` as floats; ``n_cells``, ``n_truth_labels``, ``n_pred_clusters`` as ints
        (counted over the cells scored).

    Raises
    ------
    ValueError
        As :func:`ari`.
    """
    t, p = _labels(truth, pred)
    return {
        "ari": ari(t, p),
        "ami": ami(t, p),
        "nmi": nmi(t, p),
        "homogeneity": homogeneity(t, p),
        "fmi": fmi(t, p),
        "micro_f1": micro_f1(t, p),
        "n_cells": int(t.shape[0]),
        "n_truth_labels": int(t.max() + 1),
        "n_pred_clusters": int(p.max() + 1),
    }


# ------------------------------------------------------------------------- silhouette


def _corr_blocks(X: np.ndarray | sp.spmatrix | sp.sparray, block: int):
    """Yield ``(start, stop, R)``: rows ``start:stop`` of the Pearson r matrix between rows.

    Dense input is centred and scaled once (``n x d`` float64). Sparse input stays sparse:
    with ``m_i`` the row mean and ``q_i = sum_k x_ik^2 - d m_i^2`` the centred sum of
    squares, ``r_ij = (x_i . x_j - d m_i m_j) / sqrt(q_i q_j)``, so only ``block x n``
    dense numbers exist at a time.
    """
    n, d = X.shape
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float64)
        m = np.asarray(X.sum(axis=1)).ravel() / d
        q = np.asarray(X.multiply(X).sum(axis=1)).ravel() - d * m * m
        scale = np.abs(X).max(axis=1).toarray().ravel()
    else:
        X = np.asarray(X, dtype=np.float64)
        m = X.mean(axis=1)
        U = X - m[:, None]
        q = np.einsum("ij,ij->i", U, U)
        scale = np.abs(X).max(axis=1) if d else np.zeros(n)
    # A row that is constant up to rounding (spread below 1e-6 of its largest value, which
    # covers the cancellation in the sparse formula) has no defined correlation.
    flat = q <= 1e-12 * d * scale**2
    if flat.any():
        raise ValueError(f"{int(flat.sum())} cells have a constant embedding row, so their Pearson "
                         "correlation with other cells is undefined; drop those cells (e.g. empty "
                         "cells) before computing the silhouette")
    norm = np.sqrt(q)
    if sp.issparse(X):
        XT = X.T.tocsc()
        for start in range(0, n, block):
            stop = min(n, start + block)
            G = (X[start:stop] @ XT).toarray()
            G -= d * np.outer(m[start:stop], m)
            yield start, stop, G / np.outer(norm[start:stop], norm)
    else:
        U /= norm[:, None]
        for start in range(0, n, block):
            stop = min(n, start + block)
            yield start, stop, U[start:stop] @ U.T


def _silhouette_corr(X: np.ndarray | sp.spmatrix | sp.sparray, labels: np.ndarray,
                     block: int = 1024) -> float:
    """Mean silhouette with distance ``1 - r_ij``, in row blocks (memory block x n)."""
    n = X.shape[0]
    k = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=k).astype(np.float64)
    onehot = sp.csr_matrix((np.ones(n), (np.arange(n), labels)), shape=(n, k))
    s = np.empty(n)
    for start, stop, R in _corr_blocks(X, block):
        D = 1.0 - R
        rows = np.arange(stop - start)
        # The distance of a cell to itself is 0 by definition; rounding would leave ~1e-16.
        D[rows, np.arange(start, stop)] = 0.0
        sums = np.asarray(onehot.T @ D.T).T  # (b, k): total distance to each cluster
        lab = labels[start:stop]
        own = sizes[lab]
        with np.errstate(divide="ignore", invalid="ignore"):
            a = sums[rows, lab] / (own - 1)
            mean_other = sums / sizes
            mean_other[rows, lab] = np.inf
            b = mean_other.min(axis=1)
            si = (b - a) / np.maximum(a, b)
        # A cell alone in its cluster scores 0 (Rousseeuw 1987; sklearn does the same).
        si[own == 1] = 0.0
        s[start:stop] = np.nan_to_num(si, nan=0.0)
    return float(s.mean())


def silhouette_pearson(embedding: Any, labels: Any, sample_size: int | None = 5000,
                       seed: int = 0) -> float:
    """Silhouette score with distance ``1 - Pearson correlation`` between cells.

    scCASE (Methods, "Evaluation") scores an embedding or an enhanced matrix against the
    *cell-type* labels with the silhouette coefficient, using ``1 - r_ij`` (Pearson
    correlation between cells ``i`` and ``j`` across features) as the distance, after
    scOpen. For cell ``i`` in cluster ``C``: ``a_i`` is its mean distance to the other cells
    of ``C``, ``b_i`` the smallest mean distance to the cells of another cluster,
    ``s_i = (b_i - a_i) / max(a_i, b_i)`` (0 for a cell alone in its cluster); the score is
    the mean of ``s_i``.

    **Sampling.** The exact score needs all ``n^2`` distances. Here they are computed in
    row blocks (memory ``1024 x n``, never ``n x n``; sparse input is never densified,
    dense input is copied once as float64), and when ``n > sample_size`` the
    score is computed on ``sample_size`` cells drawn uniformly without replacement with
    ``numpy.random.default_rng(seed)``, as ``sklearn.metrics.silhouette_score(...,
    sample_size=...)`` does. The result is then an estimate (its standard error shrinks as
    ``1 / sqrt(sample_size)``), deterministic for a given seed. Pass ``sample_size=None``
    for the exact score on all cells (O(n^2 d) time).

    Parameters
    ----------
    embedding
        ``(n_cells, d)`` dense array, or SciPy sparse matrix (e.g. an enhanced cells x peaks
        matrix; correlations are then computed from sparse products).
    labels
        Label per cell (cell types); cells whose label is missing are dropped.
    sample_size
        Largest number of cells to score exactly; ``None`` for no sampling.
    seed
        Seed of the cell sample.

    Returns
    -------
    float
        In ``[-1, 1]``.

    Raises
    ------
    ValueError
        If the lengths differ, fewer than 2 cells or fewer than 2 labels remain, every cell
        has its own label, or some cell's embedding row is constant (undefined correlation).
    """
    lab = _factorize(labels, "labels")
    if not (sp.issparse(embedding) or isinstance(embedding, np.ndarray)):
        embedding = np.asarray(embedding)
    if embedding.ndim != 2:
        raise ValueError(f"embedding has shape {embedding.shape}; pass a 2-D (n_cells, d) array")
    if embedding.shape[0] != lab.shape[0]:
        raise ValueError(f"embedding has {embedding.shape[0]} rows but labels has {lab.shape[0]} "
                         "entries; pass one label per embedding row, in the same order")
    idx = np.flatnonzero(lab >= 0)
    if sample_size is not None:
        if sample_size < 2:
            raise ValueError(f"sample_size must be >= 2 or None, not {sample_size}")
        if idx.size > sample_size:
            rng = np.random.default_rng(seed)
            idx = np.sort(rng.choice(idx, size=sample_size, replace=False))
            logger.debug("silhouette_pearson: scoring a sample of %d cells", sample_size)
    if idx.size < 2:
        raise ValueError(f"only {idx.size} cells have a label; the silhouette needs at least 2")
    lab = np.unique(lab[idx], return_inverse=True)[1].ravel()
    n_lab = int(lab.max()) + 1
    if not 2 <= n_lab <= idx.size - 1:
        raise ValueError(f"the silhouette needs 2 <= number of labels <= n_cells - 1, got "
                         f"{n_lab} labels on {idx.size} cells; check the labels (or raise "
                         "sample_size if sampling left too few cells)")
    sub = embedding[idx] if sp.issparse(embedding) else np.asarray(embedding)[idx]
    return _silhouette_corr(sub, lab)


# -------------------------------------------------------------------- imputation AUCs


def _flat_pair(truth_binary: Any, scores: Any, max_entries: int) -> tuple[np.ndarray, np.ndarray]:
    """Flatten truth (as 0/1) and scores to dense 1-D vectors, with checks."""
    shape_t = truth_binary.shape if hasattr(truth_binary, "shape") else np.shape(truth_binary)
    shape_s = scores.shape if hasattr(scores, "shape") else np.shape(scores)
    if tuple(shape_t) != tuple(shape_s):
        raise ValueError(f"truth_binary has shape {tuple(shape_t)} but scores has "
                         f"{tuple(shape_s)}; pass both for the same cells and peaks, same order")
    size = int(np.prod(shape_t))
    if size > max_entries:
        raise ValueError(f"{size} entries exceed max_entries={max_entries}: the AUC is computed "
                         "on dense copies; score a subsample of cells (rows) instead, or raise "
                         "max_entries if memory allows (16 bytes per entry)")
    t = truth_binary.toarray() if sp.issparse(truth_binary) else np.asarray(truth_binary)
    s = scores.toarray() if sp.issparse(scores) else np.asarray(scores)
    t = t.ravel()
    s = np.asarray(s, dtype=np.float64).ravel()
    if t.dtype == bool:
        t = t.astype(np.int8)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; fill or drop those entries before scoring")
    t = np.asarray(t, dtype=np.float64)
    if np.isnan(t).any() or (t < 0).any():
        raise ValueError("truth_binary has NaN or negative entries; pass 0/1 (or counts, of "
                         "which every entry > 0 is taken as positive)")
    y = (t > 0).astype(np.int8)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(f"truth_binary has only {'positive' if n_pos else 'negative'} entries; "
                         "the AUC needs both classes: score a larger or more varied set of entries")
    return y, s


def auroc(truth_binary: Any, scores: Any, *, max_entries: int = _MAX_AUC_ENTRIES) -> float:
    """Area under the ROC curve of ``scores`` for recovering ``truth_binary`` (flattened).

    scCASE evaluates an enhanced (imputed) matrix by how well its values rank the truly
    accessible entries above the others. Both matrices are flattened over all
    cells x peaks, and :func:`sklearn.metrics.roc_auc_score` is applied.

    Parameters
    ----------
    truth_binary
        Dense array or SciPy sparse matrix; entries ``> 0`` are positives, 0 negatives.
    scores
        Same shape; dense or sparse (stored zeros and implicit zeros both score 0).
    max_entries
        Refuse inputs larger than this: both are densified (16 bytes per entry), so this is
        a small-data or subsample metric (GUIDE invariant 2).

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If shapes differ, the input is too large, scores hold NaN, truth has negative
        entries or only one class.
    """
    y, s = _flat_pair(truth_binary, scores, max_entries)
    return float(skm.roc_auc_score(y, s))


def auprc(truth_binary: Any, scores: Any, *, max_entries: int = _MAX_AUC_ENTRIES) -> float:
    """Area under the precision-recall curve (average precision), flattened.

    As :func:`auroc`, with :func:`sklearn.metrics.average_precision_score` (the step-wise
    average precision, not trapezoidal interpolation). auPRC suits the heavy class skew of
    scATAC matrices, where most entries are 0 (scCASE, Methods).
    """
    y, s = _flat_pair(truth_binary, scores, max_entries)
    return float(skm.average_precision_score(y, s))

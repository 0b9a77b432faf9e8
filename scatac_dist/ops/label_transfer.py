"""Label transfer by votes (scEmbed, "Label transfer" and "Cluster annotation" in Methods)."""

from __future__ import annotations

import numpy as np


def knn_vote(neighbor_labels: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Majority label among each row's neighbours, and the share of neighbours that carry it.

    Parameters
    ----------
    neighbor_labels
        ``n x k`` label codes of the neighbours, nearest first; ``-1`` marks a missing
        neighbour (it votes for nothing).
    n_labels
        Number of label codes.

    Ties go to the label of the nearest neighbour among the tied ones. Rows with no valid
    neighbour get label ``-1`` and share 0.
    """
    n, k = neighbor_labels.shape
    votes = np.zeros((n, n_labels + 1), np.int64)
    np.add.at(votes, (np.repeat(np.arange(n), k), neighbor_labels.ravel() + 1), 1)
    votes = votes[:, 1:]
    best = votes.max(1)
    tied = votes == best[:, None]
    # the first neighbour (nearest) whose label is among the tied winners
    lab = np.where(neighbor_labels >= 0, neighbor_labels, 0)
    first = np.argmax(tied[np.arange(n)[:, None], lab] & (neighbor_labels >= 0), axis=1)
    out = neighbor_labels[np.arange(n), first]
    out[best == 0] = -1
    valid = (neighbor_labels >= 0).sum(1)
    share = np.where(valid > 0, best / np.maximum(valid, 1), 0.0)
    return out, share


def cluster_vote(labels: np.ndarray, clusters: np.ndarray, n_labels: int) -> np.ndarray:
    """Each cell gets the most frequent label of its cluster (``-1`` labels do not vote).

    Ties go to the smaller label code; a cluster with no labelled cell keeps ``-1``.
    """
    codes, inv = np.unique(clusters, return_inverse=True)
    counts = np.zeros((len(codes), n_labels), np.int64)
    ok = labels >= 0
    np.add.at(counts, (inv[ok], labels[ok]), 1)
    winner = np.where(counts.max(1) > 0, counts.argmax(1), -1)
    return winner[inv]

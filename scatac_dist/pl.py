"""Plots written to PNG files (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .store import Atlas

__all__ = ["qc", "umap"]


def _save(fig, path: str | Path) -> Path:
    """Save a figure as PNG atomically (written aside, then renamed) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def qc(atlas: Atlas, path: str | Path) -> Path:
    """Histograms of counts and peaks per cell, and cells per peak.

    Reads ``obs['total_counts']``, ``obs['n_peaks_by_counts']``, ``var['n_cells_by_counts']``
    (written by :func:`scatac_dist.pp.calculate_qc_metrics`). O(n_cells) on the client.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    obs, var = atlas.obs, atlas.var
    missing = [c for c in ("total_counts", "n_peaks_by_counts") if c not in obs] + \
        [c for c in ("n_cells_by_counts",) if c not in var]
    if missing:
        raise ValueError(f"{atlas.path} has no QC metrics {missing}: run "
                         "scatac_dist.pp.calculate_qc_metrics first")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    panels = [(obs["total_counts"], "counts per cell"), (obs["n_peaks_by_counts"], "peaks per cell"),
              (var["n_cells_by_counts"], "cells per peak")]
    for ax, (vals, label) in zip(axes, panels):
        v = np.asarray(vals, dtype=float)
        ax.hist(np.log10(v + 1), bins=80, color="#3b6ea8")
        ax.set_xlabel(f"log10({label} + 1)")
        ax.set_ylabel("number")
        ax.set_title(f"{label}: median {np.median(v):.0f}")
    fig.suptitle(f"{atlas.path.name}: {atlas.n_obs:,} cells x {atlas.n_vars:,} peaks")
    return _save(fig, path)


def umap(atlas: Atlas, path: str | Path, *, color: str, basis: str = "X_umap") -> Path:
    """Scatter of ``obsm[basis]`` coloured by ``obs[color]`` (categories get a legend).

    Reads ``obsm[basis]`` and ``obs[color]``; O(n_cells) on the client.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    if basis not in atlas.keys("obsm"):
        raise ValueError(f"{atlas.path} has no obsm[{basis!r}]: run `scatac-dist run` (or tl.umap) first")
    obs = atlas.obs
    if color not in obs:
        raise ValueError(f"{atlas.path} has no obs[{color!r}]; columns: {', '.join(obs.columns)}")
    xy = atlas.read(f"obsm/{basis}")
    ok = np.isfinite(xy).all(axis=1)
    vals = obs[color]
    fig, ax = plt.subplots(figsize=(7, 6), constrained_layout=True)
    size = max(0.5, min(8.0, 20000 / max(ok.sum(), 1)))
    if isinstance(vals.dtype, pd.CategoricalDtype) or vals.dtype == object:
        cats = pd.Categorical(vals.astype(str))
        cmap = plt.get_cmap("tab20", max(len(cats.categories), 1))
        for i, cat in enumerate(cats.categories):
            m = ok & (cats == cat)
            ax.scatter(xy[m, 0], xy[m, 1], s=size, color=cmap(i), label=cat, linewidths=0, rasterized=True)
        ax.legend(markerscale=max(1, 6 / size), fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    else:
        sc = ax.scatter(xy[ok, 0], xy[ok, 1], c=np.asarray(vals, float)[ok], s=size, linewidths=0,
                        rasterized=True)
        fig.colorbar(sc, ax=ax, label=color)
    ax.set(xticks=[], yticks=[], xlabel=f"{basis}1", ylabel=f"{basis}2", title=f"{atlas.path.name}: {color}")
    return _save(fig, path)

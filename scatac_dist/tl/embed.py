"""Cell embeddings: LSI (TF-IDF + randomized SVD) and matrix-free spectral embedding.

Both run as block products over lazy views of the store (:mod:`scatac_dist.tl.linalg`):
memory is O(n_cells x k + n_peaks x k), never n_cells x n_peaks or n_cells x n_cells.
Cells outside ``obs['pass_qc']`` get NaN rows.
"""

from __future__ import annotations

import logging
import time

import dask.array as da
import numpy as np

from ..blocks import cache_fits, small_array, view
from ..ops.gram import cosine_rows
from ..pp.filter import cell_mask
from ..pp.tfidf import binarized_view, selected_peaks, tfidf, tfidf_view
from ..store import Atlas
from .linalg import col_sums, randomized_svd
from .lobpcg import lobpcg_eigs

logger = logging.getLogger("scatac_dist")

__all__ = ["lsi", "spectral"]


def _full_rows(atlas: Atlas, cells: np.ndarray, emb: np.ndarray) -> np.ndarray:
    out = np.full((atlas.n_obs, emb.shape[1]), np.nan, dtype=np.float32)
    out[cells] = emb
    return out


def lsi(atlas: Atlas, *, n_comps: int = 30, depth_corr_cutoff: float | None = 0.75,
        drop_first: bool = True, scale_dims: bool = True, n_iter: int = 6, seed: int = 0,
        key_added: str = "X_lsi", client=None) -> dict:
    """Latent semantic indexing: randomized SVD of the TF-IDF view.

    Uses the TF-IDF recorded by :func:`scatac_dist.pp.tfidf` (runs it with its defaults if
    there is none). The first component is dropped if ``drop_first`` (Signac's advice: it
    tracks sequencing depth), and so is any component whose absolute Pearson correlation
    with log10 depth exceeds ``depth_corr_cutoff`` (ArchR's ``corCutOff``, 0.75). With
    ``scale_dims`` each cell's coordinates ``U * s`` are z-scored across components, as
    ArchR's ``scaleDims`` does.

    Writes ``obsm[key_added]``, ``varm['lsi_loadings']`` (peaks x components, 0 outside the
    selection) and ``uns/scatac_dist/lsi`` (singular values, depth correlations, dropped).
    """
    t0 = time.perf_counter()
    if "tfidf" not in atlas.provenance():
        tfidf(atlas, client=client)
    A = tfidf_view(atlas)
    n_comps = min(n_comps, A.shape[0] - 1, A.shape[1] - 1)
    U, s, Vt = randomized_svd(A, n_comps, n_iter=n_iter, seed=seed, cache=cache_fits(atlas.nnz))
    emb = U * s
    cells = cell_mask(atlas)
    depth = np.log10(np.maximum(atlas.obs["total_counts"].to_numpy()[cells], 1)) \
        if "total_counts" in atlas.obs else None
    corr = np.array([abs(np.corrcoef(emb[:, i], depth)[0, 1]) if depth is not None and emb[:, i].std() > 0
                     else 0.0 for i in range(emb.shape[1])])
    keep = corr <= depth_corr_cutoff if depth_corr_cutoff is not None else np.ones(len(s), bool)
    if drop_first:
        keep[0] = False
    emb = emb[:, keep]
    if scale_dims:
        sd = emb.std(axis=1, keepdims=True)
        emb = (emb - emb.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, 1)
    with atlas.publishing("lsi"):
        atlas.write_obsm(key_added, _full_rows(atlas, cells, emb))
        loadings = np.zeros((atlas.n_vars, int(keep.sum())), dtype=np.float32)
        loadings[selected_peaks(atlas)] = Vt[keep].T
        atlas.write_varm("lsi_loadings", loadings)
        res = {"singular_values": s.tolist(), "depth_correlation": corr.tolist(),
               "dropped_components": np.flatnonzero(~keep).tolist(), "n_comps": int(keep.sum())}
        atlas.record("lsi", dict(n_comps=n_comps, depth_corr_cutoff=depth_corr_cutoff, drop_first=drop_first,
                                 scale_dims=scale_dims, n_iter=n_iter, seed=seed, key_added=key_added),
                     {"total": time.perf_counter() - t0}, result=res)
    logger.info("lsi: %d components (dropped %s for depth)", res["n_comps"], res["dropped_components"])
    return res


def _degree(unit_block, total):
    # similarity to all cells, less the self-similarity of 1 (SnapATAC2 zeroes the diagonal)
    deg = np.asarray(unit_block @ total).ravel() - 1.0
    return np.where(deg > 0, deg, np.inf)


def spectral(atlas: Atlas, *, n_comps: int = 30, weighted_by_sd: bool = True, keep_first: bool = False,
             n_iter: int = 20, n_oversamples: int = 10, seed: int = 0, key_added: str = "X_spectral", client=None) -> dict:
    """Matrix-free spectral embedding with cosine similarity, as SnapATAC2's ``tl.spectral``.

    Cells are binarised over the selected peaks, weighted by IDF ``log(n / (1 + c_j))`` and
    scaled to unit length, so ``S = X X^T`` is their cosine similarity. SnapATAC2 zeroes the
    diagonal of ``S``; with degrees ``d = S 1 - 1`` the embedding is the leading eigenvectors
    of ``D^-1/2 (S - I) D^-1/2 = A A^T - D^-1`` with ``A = D^-1/2 X``, found by block LOBPCG
    (:func:`scatac_dist.tl.lobpcg.lobpcg_eigs`) without forming ``S``: one pass over the
    store per iteration, at most ``n_iter`` iterations with a block of
    ``n_comps + 1 + n_oversamples`` vectors. The first, trivial eigenvector is dropped; with
    ``weighted_by_sd`` the rest are scaled by the square root of their eigenvalues
    (SnapATAC2's default).

    Writes ``obsm[key_added]`` and ``uns/scatac_dist/spectral`` (eigenvalues).
    """
    t0 = time.perf_counter()
    B = binarized_view(atlas)
    n = B.shape[0]
    c = col_sums(B)
    w = np.log(n / (1.0 + c))
    cells, peaks = cell_mask(atlas), selected_peaks(atlas)
    Xn = view(atlas.X, cells=cells, peaks=peaks, fn=_binarized_unit, w=w)
    total = col_sums(Xn)
    A = view(atlas.X, cells=cells, peaks=peaks, fn=_binarized_normalized, w=w, total=total)
    k = min(n_comps + (0 if keep_first else 1), n - 1, A.shape[1] - 1)
    deg = da.blockwise(_degree, "i", Xn, "ij", small_array(total), None, concatenate=True,
                       dtype=np.float64, meta=np.empty(0)).compute()
    evals, evecs, _ = lobpcg_eigs(A, k, diag=1.0 / deg, n_iter=n_iter, n_oversamples=n_oversamples, seed=seed,
                                    cache=cache_fits(atlas.nnz))
    if not keep_first:
        evecs, evals = evecs[:, 1:], evals[1:]
    if weighted_by_sd:
        pos = evals > 0
        evecs, evals = evecs[:, pos] * np.sqrt(evals[pos]), evals[pos]
    with atlas.publishing("spectral"):
        atlas.write_obsm(key_added, _full_rows(atlas, cells, evecs))
        res = {"eigenvalues": evals.tolist()}
        atlas.record("spectral", dict(n_comps=n_comps, weighted_by_sd=weighted_by_sd, keep_first=keep_first,
                                      n_iter=n_iter, n_oversamples=n_oversamples, seed=seed,
                                      key_added=key_added), {"total": time.perf_counter() - t0}, result=res)
    return res


def _binarized_unit(block, w):
    return cosine_rows(block, w)


def _binarized_normalized(block, w, total):
    return cosine_rows(block, w, total)

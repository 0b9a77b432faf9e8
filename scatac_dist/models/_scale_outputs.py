"""SCALE's outputs, from a trained module: encoding every cell, clusters, the decoder's peak
scores, cluster specificity and imputation.

Everything is computed chunk by chunk of cells: the latent means (n x 10) are gathered, the
imputed matrix (n x p) never is. The imputation is decoded in tiles of at most
:data:`TASK_BYTES` per Dask task (:func:`write_imputation`), so a worker's memory does not
grow with the number of peaks either. All outputs are published together, in one
:meth:`~scatac_dist.store.Atlas.publishing` block.
"""

from __future__ import annotations

import shutil

import dask
import numpy as np
import pandas as pd
import torch
import zarr
from scipy.special import expit  # the sigmoid without exp's overflow warnings on very negative logits

from ..modules.scale import SCALEModule
from ..store import Atlas
from ..train import SparseBatch, StoreRows

__all__ = ["encode_csr", "feature_peaks", "js_specificity", "binarize_imputed", "write_outputs",
           "write_imputation", "TASK_BYTES"]

#: what one imputation task may allocate (bytes): its tile of the imputed matrix (cells x
#: peaks) holds ``TASK_BYTES / 16`` values, whatever the number of cells and peaks
TASK_BYTES = 256 * 2**20
#: float32 values per row block of the decoder's sigmoid(z W^T + b): 256 KiB, in cache
_BLOCK_VALUES = 65536


def feature_peaks(W: np.ndarray, n_sd: float = 2.5) -> np.ndarray:
    """Peaks x features booleans: weight more than ``n_sd`` SD from the feature's mean (Methods)."""
    mu, sd = W.mean(0, keepdims=True), W.std(0, keepdims=True)
    return np.abs(W - mu) > n_sd * sd


def js_specificity(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SCALE's cluster-specificity score of each peak, from ``M`` (peaks x clusters, mean accessibility).

    For peak ``i``, ``p`` is its accessibility distribution over clusters and ``q_c`` the
    ideal pattern open only in cluster ``c``; ``score_c = 1 - sqrt(JS(p, q_c))`` with
    ``JS(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2`` in bits (so ``JS`` lies in [0, 1]).
    Returns the best score and its cluster.
    """
    M = np.asarray(M, np.float64)
    tot = M.sum(1, keepdims=True)
    P = np.divide(M, tot, out=np.full_like(M, 1.0 / M.shape[1]), where=tot > 0)

    def H(a):
        return -(np.where(a > 0, a * np.log2(np.where(a > 0, a, 1)), 0)).sum(-1)

    hp = H(P)
    K = M.shape[1]
    scores = np.empty_like(P)
    for c in range(K):
        mid = P / 2
        mid[:, c] += 0.5
        js = H(mid) - hp / 2  # H(q_c) = 0
        scores[:, c] = 1 - np.sqrt(np.clip(js, 0, 1))
    best = scores.argmax(1)
    return scores[np.arange(len(P)), best], best


def binarize_imputed(P: np.ndarray, peak_mean: np.ndarray, cell_mean: np.ndarray) -> np.ndarray:
    """The paper's rule: 1 where the imputed value exceeds both its peak's and its cell's raw mean."""
    return (P > peak_mean[None, :]) & (P > cell_mean[:, None])


@torch.no_grad()
def encode_csr(module: SCALEModule, m, *, batch: int = 2048,
               joint: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Latent means (and ``log p(z, c)`` at them) of the cells of a CSR block, in sub-batches of ``batch``."""
    module.eval()
    dev = next(module.parameters()).device
    mus, joints = [], []
    for a in range(0, m.shape[0], batch):
        sub = m[a:a + batch]
        b = SparseBatch.from_csr(sub, np.arange(sub.shape[0])).to_device(dev, dense=False)
        mu, _ = module.encoder(cols=b["cols"], offsets=b["offsets"], values=b["values"])
        mus.append(mu.float().cpu().numpy())
        if joint:
            # the exact log p(z, c): its argmax is the floored gamma's, except for cells far
            # from every component, whose floored gamma is flat
            joints.append(module.prior.log_joint(mu.float()).cpu().numpy())
    return np.concatenate(mus), (np.concatenate(joints) if joint else None)


def write_outputs(atlas: Atlas, module: SCALEModule, rows: StoreRows, cells: np.ndarray, peaks: np.ndarray, *,
                  n_clusters: int | None, n_specific: int, impute: bool, encode_batch: int,
                  task_bytes: int = TASK_BYTES) -> None:
    """Encode every used cell and write the store slots listed in :mod:`scatac_dist.models.scale`.

    ``obs['scale_kmeans']`` (k-means, seed 18 as in the paper) only when ``n_clusters`` is
    given; the layers only with ``impute`` (tiles of ``task_bytes``, :func:`write_imputation`).
    The writes form one publication (``atlas.publishing("scale")``, joined by the caller's
    block if there is one): a reader sees all of them or none.
    """
    with atlas.publishing("scale"):
        _write_outputs(atlas, module, rows, cells, peaks, n_clusters=n_clusters, n_specific=n_specific,
                       impute=impute, encode_batch=encode_batch, task_bytes=task_bytes)


def _write_outputs(atlas, module, rows, cells, peaks, *, n_clusters, n_specific, impute, encode_batch,
                   task_bytes) -> None:
    n, D = atlas.n_obs, module.n_latent
    mu = np.zeros((n, D), np.float32)
    gmm = np.full(n, -1, np.int64)
    peak_hits = np.zeros(rows.n_peaks)
    cell_open = np.zeros(n)
    used = cells
    # every cell of the store, the ones the filters left out of training included: the
    # encoder embeds a cell from its reads in the used peaks, as it would a new one
    every = StoreRows(atlas.path, mod=atlas.mod, peaks=np.flatnonzero(peaks), chunk_rows=rows.chunk_rows)
    for _, m, idx in every.iter_chunks():
        z, log_joint = encode_csr(module, m, batch=encode_batch)
        mu[idx], gmm[idx] = z, log_joint.argmax(1)
        peak_hits += np.asarray(m[used[idx]].sum(0)).ravel()
        cell_open[idx] = np.diff(m.indptr)
    obs = {"scale_used": used, "scale_gmm": pd.Categorical(gmm.astype(str))}
    labels = gmm
    if n_clusters is not None:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=n_clusters, n_init=20, random_state=18).fit(mu[used])
        lab = km.predict(mu).astype(np.int64)
        obs["scale_kmeans"] = pd.Categorical(lab.astype(str))
        labels = lab
    atlas.write_obsm("X_scale", mu)
    atlas.write_obs(obs)
    Wd = module.decoder.weight.detach().cpu().numpy()  # peaks x latent
    bd = module.decoder.bias.detach().cpu().numpy()
    W_all = np.zeros((atlas.n_vars, D), np.float32)
    W_all[peaks] = Wd
    fp = np.zeros((atlas.n_vars, D), bool)
    fp[peaks] = feature_peaks(Wd)
    atlas.write_varm("scale_decoder", W_all)
    atlas.write_varm("scale_feature_peaks", fp)
    score, best = js_specificity(_cluster_means(mu, used, labels, Wd, bd, encode_batch))
    top = np.zeros(rows.n_peaks, bool)
    for c in range(int(labels.max()) + 1):
        ids = np.flatnonzero(best == c)
        top[ids[np.argsort(-score[ids], kind="stable")[:n_specific]]] = True
    var = {"scale_used": peaks}
    for key, vals, fill in (("scale_specificity", score, np.nan), ("scale_specific_cluster", best, -1),
                            ("scale_specific", top, False)):
        full = np.full(atlas.n_vars, fill, dtype=np.asarray(vals).dtype if fill is not np.nan else float)
        full[peaks] = vals
        var[key] = full
    atlas.write_var(var)
    if impute:
        peak_mean = peak_hits / max(rows.n_cells, 1)
        cell_mean = cell_open / max(rows.n_peaks, 1)
        write_imputation(atlas, mu, Wd, bd, used, peaks, peak_mean, cell_mean, task_bytes=task_bytes)


def _cluster_means(mu, used, labels, Wd, bd, encode_batch: int) -> np.ndarray:
    """Mean imputed accessibility per cluster (peaks x clusters), one decoder pass over ``mu``.

    Blocks of at most 64M probabilities, computed in place and summed per cluster in float32
    BLAS: temporaries and a float64 copy of each block made this pass 10x slower.
    """
    n_lab = int(labels.max()) + 1
    n_peaks = Wd.shape[0]
    sums = np.zeros((n_peaks, n_lab))
    cnt = np.bincount(labels[used], minlength=n_lab).astype(float)
    idx_used = np.flatnonzero(used)
    step = max(64, min(encode_batch, 2 ** 26 // max(n_peaks, 1)))
    for a in range(0, len(idx_used), step):
        ii = idx_used[a:a + step]
        P = _sigmoid_logits(mu[ii], Wd, bd)
        onehot = np.zeros((n_lab, len(ii)), np.float32)
        onehot[labels[ii], np.arange(len(ii))] = 1
        sums += (onehot @ P).T
    return sums / np.maximum(cnt, 1)[None, :]


def write_imputation(atlas: Atlas, mu, Wd, bd, used, peaks, peak_mean, cell_mean, *,
                     task_bytes: int = TASK_BYTES) -> None:
    """``layers['scale_impute']`` (dense float32) and ``layers['scale_binary']`` (CSR), decoded
    from the latent means ``mu`` by Dask tasks.

    Memory: every task decodes one tile of at most ``task_bytes / 16`` values (cells x
    peaks) and holds at most ``task_bytes`` (its tile and the decoded probabilities in
    float32; for the binary layer, the probabilities, the booleans and the tile's non-zeros
    as 8- and 4-byte indices), whatever the number of cells or peaks: 256 MiB by default
    (:data:`TASK_BYTES`), so a worker needs its threads x ``task_bytes`` beyond its baseline.
    (A store chunk of more than ``task_bytes / 16`` rows is the one exception: a tile is at
    least one row of chunks, ``chunk_rows`` x 1 values.) The client holds ``mu`` (n x 10) and
    the decoder (peaks x 10), never a tile.

    The imputed layer's zarr chunks are ``chunk_rows`` x ``cc`` with ``cc`` chosen so a chunk
    fits a tile; a tile is one store chunk of rows by a whole number of zarr chunks of
    columns, so no two tasks write into the same zarr chunk. The binary layer is computed in
    blocks of consecutive used cells small enough for a tile and written by
    :func:`scatac_dist.io.layers.write_csr_layer`.
    """
    from dask import delayed

    from ..io.layers import publish_layer, write_csr_layer

    n, p = atlas.n_obs, atlas.n_vars
    elems = max(1, int(task_bytes) // 16)
    cr = max(1, min(atlas.chunk_rows, n))
    cc = min(p, max(1, min(2**22, elems) // cr))                   # zarr chunk: cr x cc
    tile_cols = min(p, cc * max(1, elems // (cr * cc)))              # a whole number of chunks
    pk = np.flatnonzero(peaks)
    Wd = np.ascontiguousarray(Wd, np.float32)
    bd = np.asarray(bd, np.float32)
    with atlas.publishing("scale"):
        staging = atlas.scratch("impute")
        try:
            g = zarr.open_group(str(staging), mode="w", zarr_format=atlas.zarr_format)
            arr = g.create_array("scale_impute", shape=(n, p), chunks=(cr, cc), dtype=np.float32, fill_value=0.0)
            arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            path = str(staging / "scale_impute")
            bands = [(a, min(a + cr, n), delayed((mu[a:a + cr], used[a:a + cr]), pure=True))
                     for a in range(0, n, cr) if used[a:a + cr].any()]  # an unused band stays 0 (fill)
            tasks = []
            for c0 in range(0, p, tile_cols):
                c1 = min(c0 + tile_cols, p)
                lo, hi = np.searchsorted(pk, [c0, c1])
                if hi == lo:
                    continue                                      # no used peak here: fill value
                dec = delayed((Wd[lo:hi], bd[lo:hi], (pk[lo:hi] - c0).astype(np.int64)), pure=True)
                tasks += [delayed(_impute_tile)(path, a, b, c0, c1, band, dec) for a, b, band in bands]
            dask.compute(*tasks)
            publish_layer(atlas, staging / "scale_impute", "scale_impute")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        rows_used = np.flatnonzero(used)
        rb = max(1, min(cr, elems // max(len(pk), 1)))
        shared = delayed((Wd, bd, pk.astype(np.int32), np.asarray(peak_mean)), pure=True)
        blocks = [delayed(_binary_block)(mu[rows_used[a:a + rb]], np.asarray(cell_mean)[rows_used[a:a + rb]], shared)
                  for a in range(0, len(rows_used), rb)]
        write_csr_layer(atlas, "scale_binary", blocks, rows_used)


def _sigmoid_logits(z: np.ndarray, Wd: np.ndarray, bd: np.ndarray) -> np.ndarray:
    """``sigmoid(z @ Wd.T + bd)`` (cells x peaks, float32), each value summed in one fixed order.

    Every value is ``bd[j] + z[i, 0] Wd[j, 0] + z[i, 1] Wd[j, 1] + ...``, each product and
    sum a separately rounded float32 operation, so a value never depends on which block of
    cells or peaks it was computed in: every tile equals the same block of the one-shot
    product, bit for bit (tested). A BLAS product does not give that: its kernels round
    sums differently by shape and by CPU. Computed in row blocks of :data:`_BLOCK_VALUES`
    that stay in cache.
    """
    z = np.asarray(z, np.float32)
    Wt = np.ascontiguousarray(np.asarray(Wd, np.float32).T)        # latent x peaks
    m, n = len(z), Wt.shape[1]
    P = np.empty((m, n), np.float32)
    rb = max(1, _BLOCK_VALUES // max(n, 1))
    term = np.empty((min(rb, m), n), np.float32)
    for a in range(0, m, rb):
        out = P[a:a + rb]
        t = term[:len(out)]
        out[:] = bd
        for k in range(Wt.shape[0]):
            np.multiply(z[a:a + rb, k, None], Wt[k], out=t)
            out += t
    return expit(P, out=P)


def _impute_tile(path, a, b, c0, c1, band, dec):
    """Rows ``a:b`` x columns ``c0:c1`` of the imputed layer: 0 outside the used cells and
    peaks. Allocates the tile and the used cells x used peaks block, both float32."""
    mu, used = band
    Wd, bd, cols = dec
    out = np.zeros((b - a, c1 - c0), np.float32)
    rows = np.flatnonzero(used)
    if len(rows):
        P = _sigmoid_logits(mu[rows], Wd, bd)
        if len(cols) == c1 - c0:                                   # every peak of the tile is used
            out[rows] = P
        else:
            out[rows[:, None], cols] = P
    zarr.open_array(path, mode="r+")[a:b, c0:c1] = out
    return b - a


def _binary_block(mu, cell_mean, shared):
    """CSR pieces (row lengths, columns, values) of the binarised imputation of the cells ``mu``."""
    Wd, bd, pk, peak_mean = shared
    P = _sigmoid_logits(mu, Wd, bd)
    B = binarize_imputed(P, peak_mean, cell_mean)
    del P
    counts = B.sum(1)
    flat = np.flatnonzero(B)                                       # row-major: rows, then columns
    del B
    np.remainder(flat, len(pk), out=flat)
    cols = pk[flat]
    del flat
    return counts, cols, np.ones(len(cols), np.float32)

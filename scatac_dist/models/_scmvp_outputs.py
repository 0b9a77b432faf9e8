"""scMVP's outputs from a trained module: every cell encoded, clusters, and the imputed RNA
and ATAC, chunk by chunk of cells (the latent means, n x 10, are gathered; an imputed
matrix never is). All of it is published in one block (``atlas.publishing("scmvp")``).
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import torch
import zarr

from ..io.layers import publish_layer, write_csr_layer
from ..modules.scmvp import SCMVPModule
from ..store import Atlas
from ..train import JointRows, SparseBatch
from .scmvp_training import encode_rows

__all__ = ["write_outputs", "impute_block"]


@torch.no_grad()
def impute_block(module: SCMVPModule, m, *, batch: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Imputed RNA (the NB mean at the latent mean, scaled by each cell's observed UMIs) and
    ATAC (the ZIP's Poisson mean, on the TF-IDF scale) of the cells of a joint CSR block;
    dense cells x used genes and cells x used peaks, float32."""
    module.eval()
    dev = next(module.parameters()).device
    rna, atac = [], []
    for a in range(0, m.shape[0], batch):
        sub = m[a:a + batch]
        b = SparseBatch.from_csr(sub, np.arange(sub.shape[0])).to_device(dev, dense=False)
        views = module.split(None, b["cols"], b["offsets"], b["values"])
        mu, _ = module.encode(views)
        out = module.decode(mu, views["lib"])
        rna.append(out["rna_mean"].float().cpu().numpy())
        atac.append(out["atac_mean"].float().cpu().numpy())
    return np.concatenate(rna), np.concatenate(atac)


def _top(A: np.ndarray, n_top: int, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR pieces (row lengths, store columns, values) of each row's ``n_top`` largest entries."""
    t = min(n_top, A.shape[1])
    idx = np.argpartition(-A, t - 1, axis=1)[:, :t]
    idx.sort(axis=1)
    vals = np.take_along_axis(A, idx, axis=1)
    return np.full(A.shape[0], t, np.int64), cols[idx].ravel(), vals.ravel().astype(np.float32)


def write_outputs(atlas: Atlas, module: SCMVPModule, rows: JointRows, masks: dict[str, np.ndarray], *,
                  n_clusters: int | None, impute: tuple[str, ...] = (), impute_top: int = 100,
                  encode_batch: int = 2048, seed: int = 0) -> dict:
    """Encode every used cell and write, in the enclosing publication (``atlas`` is the ATAC
    modality of the MuData store):

    * ``obsm['X_scmvp']`` (latent means, float32) in the MuData root and in ``mod/rna`` and
      ``mod/atac``; ``obs['scmvp_gmm']`` (``argmax_c log p(z, c)`` at the mean) and, with
      ``n_clusters``, ``obs['scmvp_kmeans']`` (k-means, ``n_init`` 20) in the same three;
    * ``var['scmvp_used']`` in each modality;
    * with ``"rna"`` in ``impute``: ``mod/rna`` ``layers['scmvp_impute']`` (dense float32,
      cells x genes, 0 for genes not used), written chunk by chunk;
    * with ``"atac"``: ``mod/atac`` ``layers['scmvp_impute_top']``, each cell's ``impute_top``
      highest imputed peaks (CSR; a dense cells x peaks matrix is never made).

    Returns counts for the record.
    """
    cells, genes, peaks = masks["cells"], masks["genes"], masks["peaks"]
    n, D = atlas.n_obs, module.n_latent
    mu = np.zeros((n, D), np.float32)
    gmm = np.full(n, -1, np.int64)
    gene_idx, peak_idx = np.flatnonzero(genes), np.flatnonzero(peaks)
    with atlas.joined("rna") as rna:
        n_genes_all = rna.n_vars
        staging, arr = None, None
        if "rna" in impute:
            staging = atlas.scratch("impute")
            g = zarr.open_group(str(staging), mode="w", zarr_format=atlas.zarr_format)
            cr = max(1, min(rows.chunk_rows, n))
            arr = g.create_array("scmvp_impute", shape=(n, n_genes_all), chunks=(cr, min(n_genes_all, 4096)),
                                 dtype=np.float32, fill_value=0.0)
            arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        top_blocks, top_rows = [], []
        try:
            for _, m, idx in rows.iter_chunks():
                z, log_joint = encode_rows(module, m, batch=encode_batch)
                mu[idx], gmm[idx] = z, log_joint.argmax(1)
                if impute:
                    r, a = impute_block(module, m, batch=encode_batch)
                    if arr is not None:
                        full = np.zeros((len(idx), n_genes_all), np.float32)
                        full[:, gene_idx] = r
                        lo, hi = int(idx[0]), int(idx[-1]) + 1
                        if hi - lo == len(idx):  # consecutive rows: one slice
                            arr[lo:hi] = full
                        else:
                            for j, i in enumerate(idx):
                                arr[int(i)] = full[j]
                    if "atac" in impute:
                        top_blocks.append(_top(a, impute_top, peak_idx))
                        top_rows.append(idx)
            if arr is not None:
                publish_layer(rna, staging / "scmvp_impute", "scmvp_impute")
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        if top_blocks:
            write_csr_layer(atlas, "scmvp_impute_top", top_blocks, np.concatenate(top_rows))
        obs = {"scmvp_gmm": pd.Categorical(np.where(cells, gmm.astype(str), None))}
        if n_clusters is not None:
            from sklearn.cluster import KMeans

            lab = np.full(n, -1, np.int64)
            lab[cells] = KMeans(n_clusters=n_clusters, n_init=20, random_state=seed).fit_predict(mu[cells])
            obs["scmvp_kmeans"] = pd.Categorical(np.where(cells, lab.astype(str), None))
        mu[~cells] = np.nan
        for part in (atlas, rna):
            part.write_obsm("X_scmvp", mu)
            part.write_obs(obs)
        rna.write_var({"scmvp_used": genes})
        atlas.write_var({"scmvp_used": peaks})
        with atlas.joined(None) as root:
            root.write_obsm("X_scmvp", mu)
            root.write_obs(obs)
    return {"n_cells": int(cells.sum()), "n_genes": int(genes.sum()), "n_peaks": int(peaks.sum())}

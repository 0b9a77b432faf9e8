"""scEmbed's projection and annotation passes: peaks mapped to the universe by overlap, cell
embeddings computed chunk by chunk on the Dask workers, the reference's HNSW index and UMAP,
and the Leiden clusters of the cluster vote.
"""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..ops.regions import overlap_matrix, overlap_pairs
from ..store import Atlas
from ..train.data import StoreRows
from .scembed_corpus import shared


def universe_mapping(peaks: pd.DataFrame, uni: pd.DataFrame) -> tuple[sp.csr_matrix, dict]:
    """Query peaks -> universe regions: the 0/1 overlap matrix (>= 1 bp) and a report of what
    mapped, what lies on unknown chromosomes and what overlaps nothing."""
    qi, ri = overlap_pairs(peaks["chr"], peaks["start"], peaks["end"], uni["chr"], uni["start"], uni["end"])
    ovl = overlap_matrix(qi, ri, len(peaks), len(uni))
    known = pd.Index(uni["chr"].unique())
    unknown_chr = ~pd.Index(peaks["chr"].astype(str)).isin(known)
    hit = np.zeros(len(peaks), bool)
    hit[qi] = True
    report = {"n_peaks": int(len(peaks)), "n_mapped": int(hit.sum()),
              "n_unknown_chromosome": int(unknown_chr.sum()),
              "n_no_overlap": int((~hit & ~unknown_chr).sum()),
              "unknown_chromosomes": sorted(set(peaks["chr"].astype(str)[unknown_chr]))[:20],
              "n_pairs": int(len(qi)), "n_universe_hit": int(len(np.unique(ri)))}
    return ovl, report


def _encode_chunk(rows: StoreRows, k: int, ovl: sp.csr_matrix, V: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean universe vector of each cell of chunk ``k``: ``H = 1[B O > 0]`` (O: overlap matrix), ``E = H V / H 1``."""
    m, cells = rows.read_chunk(k)
    H = sp.csr_matrix(m @ ovl)
    H.data[:] = 1.0
    n = np.asarray(H.sum(1)).ravel()
    E = np.asarray(H @ V, np.float32)
    E /= np.maximum(n, 1)[:, None]
    return cells, E, n.astype(np.int64)


def encode_store(atlas: Atlas, ovl: sp.csr_matrix, vectors: np.ndarray, client) -> tuple[np.ndarray, np.ndarray]:
    """Every cell's embedding (the mean vector of the universe regions it touches; zeros for
    none) and that number of regions, one task per row chunk."""
    rows = StoreRows(atlas.path, mod=atlas.mod, chunk_rows=atlas.chunk_rows)
    # shared futures, not scattered data: a worker lost mid-pass costs a recompute, not the run
    rows_f, ovl_f, V_f = (shared(client, x, name) for x, name in ((rows, "rows"), (ovl, "overlap"),
                                                                    (vectors, "vectors")))
    futs = [client.submit(_encode_chunk, rows_f, k, ovl_f, V_f, pure=False, key=f"scembed-encode-{k}-{uuid.uuid4().hex[:6]}")
            for k in range(rows.n_chunks)]
    E = np.zeros((atlas.n_obs, vectors.shape[1]), np.float32)
    n_regions = np.zeros(atlas.n_obs, np.int64)
    for f in futs:
        cells, Eb, nb = f.result()
        E[cells], n_regions[cells] = Eb, nb
        f.release()
    return E, n_regions


def unit(E: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32), so inner products are cosines."""
    E = np.asarray(E, np.float32)
    return E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)


def hnsw_index(E: np.ndarray, m: int):
    """A faiss HNSW index over unit vectors with inner-product search: cosine similarity."""
    import faiss

    index = faiss.IndexHNSWFlat(E.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 200
    index.hnsw.efSearch = 128
    index.add(unit(E))
    return index


def fit_umap(embeddings: np.ndarray, max_cells: int, seed: int):
    """A 2-d UMAP of the reference (``random_state=42``, the paper's visualisation seed) and
    its embedding; above ``max_cells`` fitted on a seeded sample and the rest transformed."""
    from umap import UMAP

    n = embeddings.shape[0]
    model = UMAP(n_components=2, random_state=42)
    if n <= max_cells:
        return model, model.fit_transform(embeddings).astype(np.float32)
    sample = np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))
    model.fit(embeddings[sample])
    Y = model.transform(embeddings).astype(np.float32)
    Y[sample] = model.embedding_
    return model, Y


def vote_clusters(E: np.ndarray, n_labels: int, *, resolution: float | None, clusters_per_label: float,
                  seed: int) -> tuple[np.ndarray, float | None, int | None]:
    """Leiden clusters of the cells (15-NN graph of their unit embeddings) for the cluster
    vote: at ``resolution``, or at the resolution searched for ``clusters_per_label`` clusters
    per reference label (at most one per 10 cells). Returns the labels, the resolution used
    and the target number of clusters (``None`` with a fixed resolution)."""
    from ..tl.graph import connectivities, knn_graph, leiden_labels, search_resolution

    n = len(E)
    idx, dist = knn_graph(unit(E), min(15, n - 1), seed=seed)
    graph = connectivities(idx, dist, n)
    if resolution is not None:
        return leiden_labels(graph, resolution, seed=seed), resolution, None
    target = int(max(1, min(round(clusters_per_label * n_labels), n // 10)))
    used_resolution, labels = search_resolution(graph, target, seed=seed)
    return labels, used_resolution, target

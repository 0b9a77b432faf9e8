"""Tools on the atlas: embeddings, graphs, clustering, UMAP, estimates and metrics.

Embeddings (:func:`lsi`, :func:`spectral`) and :func:`jaccard` run as Dask block products
over lazy views of the store; graph steps (:func:`neighbors`, :func:`leiden`, :func:`kmeans`, :func:`umap`)
work on the gathered O(n_cells x d) embedding.
"""

from .embed import lsi, spectral
from .estimate_k import estimate_k
from .graph import kmeans, leiden, neighbors, umap
from .jaccard import jaccard
from .metrics import ami, ari, auprc, auroc, evaluate, fmi, homogeneity, micro_f1, nmi, silhouette_pearson

__all__ = ["jaccard", "lsi", "spectral", "neighbors", "leiden", "kmeans", "umap", "estimate_k", "ari", "ami", "nmi",
           "homogeneity", "fmi", "micro_f1", "silhouette_pearson", "auroc", "auprc", "evaluate"]

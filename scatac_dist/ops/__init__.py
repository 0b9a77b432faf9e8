"""Pure per-block kernels: numpy/scipy in, numpy/scipy out. No Dask, no AnnData."""

from .sparse import binarize, col_counts, col_nnz, col_nnz_ge, row_counts, row_nnz

__all__ = ["binarize", "row_counts", "row_nnz", "col_counts", "col_nnz", "col_nnz_ge"]

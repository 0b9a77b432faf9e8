"""Distributed preprocessing over the atlas store (Dask graphs over CSR row blocks).

Filters write masks (``obs/var['pass_qc']``), feature selection writes ``var['selected']``,
and TF-IDF is a lazy view; the counts are never rewritten.
"""

from .filter import filter_cells, filter_peaks, filter_scale, filter_sccase
from .qc import calculate_qc_metrics
from .select import select_features
from .tfidf import binarized_view, tfidf, tfidf_view

__all__ = ["calculate_qc_metrics", "filter_cells", "filter_peaks", "filter_scale", "filter_sccase",
           "select_features", "tfidf", "tfidf_view", "binarized_view"]

"""Distributed preprocessing over the atlas store (Dask graphs over CSR row blocks)."""

from .qc import calculate_qc_metrics

__all__ = ["calculate_qc_metrics"]

"""QC metrics on the cluster equal a direct NumPy computation, whatever the chunking."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scatac_dist.datasets import SynthParams, synthesize
from scatac_dist.ops import col_counts, col_nnz, row_counts, row_nnz
from scatac_dist.pp import calculate_qc_metrics
from scatac_dist.store import open_atlas


def test_kernels_match_numpy():
    rng = np.random.default_rng(0)
    m = sp.random(50, 30, density=0.2, format="csr", random_state=rng)
    m.data = rng.integers(1, 200, m.nnz).astype(np.uint8)
    m = sp.csr_matrix(m.multiply((np.arange(50) != 3)[:, None]))  # row 3 empty
    d = m.toarray().astype(np.int64)
    np.testing.assert_array_equal(row_counts(m), d.sum(1))
    np.testing.assert_array_equal(row_nnz(m), (d > 0).sum(1))
    np.testing.assert_array_equal(col_counts(m), d.sum(0))
    np.testing.assert_array_equal(col_nnz(m), (d > 0).sum(0))


@pytest.mark.parametrize("chunk_rows", [256, 5000])
def test_qc_metrics(client, tmp_path, chunk_rows):
    p = SynthParams(n_cells=2100, n_peaks=4000, seed=4)
    synthesize(tmp_path / "s.zarr", p, chunk_rows=700, client=client, progress=False)
    atlas = open_atlas(tmp_path / "s.zarr", chunk_rows=chunk_rows)
    summary = calculate_qc_metrics(atlas, client=client, progress=False)
    adata = atlas.to_memory()
    d = adata.X.toarray().astype(np.int64)
    np.testing.assert_array_equal(adata.obs["total_counts"], d.sum(1))
    np.testing.assert_array_equal(adata.obs["n_peaks_by_counts"], (d > 0).sum(1))
    np.testing.assert_array_equal(adata.var["total_counts"], d.sum(0))
    np.testing.assert_array_equal(adata.var["n_cells_by_counts"], (d > 0).sum(0))
    assert summary["median_counts_per_cell"] == np.median(d.sum(1))
    assert "celltype" in adata.obs  # earlier columns survive the rewrite
    assert atlas.provenance()["qc"]["result"]["n_cells"] == p.n_cells

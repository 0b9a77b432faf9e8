"""Each real dataset ingests into a store that reads back exactly the source counts."""

from __future__ import annotations

import anndata as ad
import h5py
import mudata
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from scatac_dist.io import ingest
from scatac_dist.store import open_atlas

from .conftest import BM0828, LEUKEMIA, SNARE


def assert_same_counts(got: sp.spmatrix, ref: sp.spmatrix):
    got, ref = sp.csr_matrix(got), sp.csr_matrix(ref)
    assert got.shape == ref.shape
    assert got.nnz == ref.nnz
    assert got.dtype.kind == "u"
    diff = got.astype(np.int64) - ref.astype(np.int64)
    assert diff.count_nonzero() == 0


def test_bm0828_10x_folder(client, tmp_path, data_dir, small_chunks):
    folder = BM0828 / "filtered_peak_bc_matrix"
    out = tmp_path / "bm.zarr"
    ingest(folder, out, labels=BM0828 / "buenrostro2018_bm0828_labels.tsv", chunk_rows=97,
           client=client, progress=False)

    ref = scipy.io.mmread(folder / "matrix.mtx.gz").T.tocsr()  # peaks x cells -> cells x peaks
    adata = ad.read_zarr(out)
    assert_same_counts(adata.X, ref)
    barcodes = pd.read_csv(folder / "barcodes.tsv", header=None)[0].tolist()
    assert adata.obs_names.tolist() == barcodes
    labels = pd.read_csv(BM0828 / "buenrostro2018_bm0828_labels.tsv", sep="\t").set_index("barcode")
    assert (adata.obs["celltype"].astype(str) == labels.loc[barcodes, "celltype"].to_numpy()).all()
    bed = pd.read_csv(folder / "peaks.bed", sep="\t", header=None)
    assert (adata.var["chr"].astype(str).to_numpy() == bed[0].to_numpy()).all()
    assert (adata.var["start"].to_numpy() == bed[1].to_numpy()).all()
    assert (adata.var["end"].to_numpy() == bed[2].to_numpy()).all()

    atlas = open_atlas(out, chunk_rows=97)
    assert atlas.X.chunks[0][:2] == (97, 97)
    assert isinstance(atlas.X.blocks[1].compute(), sp.csr_matrix)
    assert atlas.provenance()["ingest"]["result"]["nnz"] == ref.nnz


def test_leukemia_h5ad(client, tmp_path, data_dir):
    out = tmp_path / "leuk.zarr"
    ingest(LEUKEMIA, out, chunk_rows=100, client=client, progress=False)
    src = ad.read_h5ad(LEUKEMIA)
    adata = ad.read_zarr(out)
    assert_same_counts(adata.X, sp.csr_matrix(src.X).astype(np.int64))
    assert (adata.obs["celltype"].astype(str) == src.obs["celltype"].astype(str)).all()
    assert adata.var_names.tolist() == src.var_names.tolist()
    first = src.var_names[0].split("_")
    assert adata.var["chr"].iloc[0] == first[0]
    assert adata.var["start"].iloc[0] == int(first[1]) and adata.var["end"].iloc[0] == int(first[2])


def test_snare_multiome_h5(client, tmp_path, data_dir, small_chunks):
    out = tmp_path / "snare.zarr"
    ingest(SNARE / "filtered_feature_bc_matrix.h5", out, labels=SNARE / "snare_mop_metadata.tsv",
           chunk_rows=1500, client=client, progress=False)
    with h5py.File(SNARE / "filtered_feature_bc_matrix.h5") as f:
        m = f["matrix"]
        n_feat, n_cells = m["shape"][:]
        ref = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]),
                            shape=(n_feat, n_cells)).T.tocsr()
        ftype = m["features/feature_type"][:].astype(str)
        ids = m["features/id"][:].astype(str)
        barcodes = m["barcodes"][:].astype(str)
    mdata = mudata.read_zarr(out)
    assert set(mdata.mod) == {"rna", "atac"}
    assert_same_counts(mdata["rna"].X, ref[:, ftype == "Gene Expression"])
    assert_same_counts(mdata["atac"].X, ref[:, ftype == "Peaks"])
    assert mdata.obs_names.tolist() == barcodes.tolist()
    assert mdata["atac"].var_names.tolist() == ids[ftype == "Peaks"].tolist()
    assert (mdata["rna"].var["gene_ids"] == ids[ftype == "Gene Expression"]).all()
    first = ids[ftype == "Peaks"][0]
    assert f"{mdata['atac'].var['chr'].iloc[0]}:{mdata['atac'].var['start'].iloc[0]}-" \
           f"{mdata['atac'].var['end'].iloc[0]}" == first
    meta = pd.read_csv(SNARE / "snare_mop_metadata.tsv", sep="\t").set_index("barcode")
    assert (mdata.obs["Ident"].astype(str).to_numpy() == meta.loc[barcodes, "Ident"].to_numpy()).all()
    assert (mdata.obs["cluster (remapped)"].astype(str).to_numpy()
            == meta.loc[barcodes, "cluster (remapped)"].to_numpy()).all()
    atac = open_atlas(out)  # defaults to the atac modality
    assert atac.mod == "atac" and atac.shape == (n_cells, int((ftype == "Peaks").sum()))


@pytest.mark.parametrize("how", ["inner", "outer"])
def test_concatenate_inputs_with_batch(client, tmp_path, data_dir, how):
    """Two inputs (one 10x folder, the same data as h5ad with a peak subset) in one atlas."""
    folder = BM0828 / "filtered_peak_bc_matrix"
    ref = scipy.io.mmread(folder / "matrix.mtx.gz").T.tocsr()
    first = ad.read_zarr(ingest(folder, tmp_path / "a.zarr", client=client, progress=False).path)
    sub = first[:50, 100:].copy()  # same barcodes as the first 50 cells: they collide
    sub.write_h5ad(tmp_path / "b.h5ad")
    out = tmp_path / "both.zarr"
    ingest([folder, tmp_path / "b.h5ad"], out, join=how, batch_names=["x", "y"], client=client,
           progress=False)
    got = ad.read_zarr(out)
    assert got.n_obs == 533 + 50
    assert got.obs["batch"].tolist() == ["x"] * 533 + ["y"] * 50
    assert got.obs_names[0] == "BM0828_0000-x" and got.obs["barcode"].iloc[0] == "BM0828_0000"
    if how == "inner":
        assert got.var_names.tolist() == first.var_names[100:].tolist()
        expect = sp.vstack([ref[:, 100:], ref[:50, 100:]])
    else:
        assert got.var_names.tolist() == first.var_names.tolist()
        expect = sp.vstack([ref, sp.hstack([sp.csr_matrix((50, 100)), ref[:50, 100:]])])
    assert_same_counts(got.X, expect)

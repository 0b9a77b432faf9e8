"""The store: lazy X in row blocks, dtypes, atomic result writes, and format round trips."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from scatac_dist.datasets import SynthParams, generate_rows, synthesize
from scatac_dist.io import ingest
from scatac_dist.io.export import export_10x_h5, export_10x_mtx
from scatac_dist.store import Atlas, count_dtype, open_atlas, staged_output

from .conftest import leftovers


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory, client):
    p = SynthParams(n_cells=3000, n_peaks=2000, n_clusters=4, n_lineages=2, seed=3)
    out = tmp_path_factory.mktemp("store") / "syn.zarr"
    synthesize(out, p, chunk_rows=700, client=client, progress=False)
    return out, p


def test_count_dtype():
    assert count_dtype(0) == np.uint8 and count_dtype(255) == np.uint8
    assert count_dtype(256) == np.uint16 and count_dtype(70_000) == np.uint32


def test_dtype_chosen_from_max_count(client, tmp_path):
    from .test_validation import write_10x

    m = sp.csr_matrix(np.array([[1, 0, 300], [0, 2, 0]]))
    atlas = ingest(write_10x(tmp_path / "in", m), tmp_path / "o.zarr", client=client, progress=False)
    x = zarr.open_group(str(atlas.path))["X"]
    assert x["data"].dtype == np.uint16 and x["indices"].dtype == np.int32 and x["indptr"].dtype == np.int64


def test_lazy_x_blocks(synth_store):
    out, p = synth_store
    atlas = open_atlas(out, chunk_rows=1000)
    X = atlas.X
    assert X.shape == (p.n_cells, p.n_peaks) and X.chunks[0] == (1000, 1000, 1000)
    assert X.chunks[1] == (p.n_peaks,)  # blocks span all peaks
    b = X.blocks[2].compute()
    assert isinstance(b, sp.csr_matrix)
    assert (b != generate_rows(p, 2000, 3000)).nnz == 0


def test_anndata_opens_it(synth_store):
    out, p = synth_store
    adata = ad.read_zarr(out)
    assert adata.shape == (p.n_cells, p.n_peaks)
    assert list(adata.var.columns[:3]) == ["chr", "start", "end"]
    assert adata.var_names[0] == f"{adata.var['chr'].iloc[0]}:{adata.var['start'].iloc[0]}-{adata.var['end'].iloc[0]}"
    prov = json.loads(adata.uns["scatac_dist"]["synth"])
    assert prov["params"]["params"]["seed"] == 3 and "anndata" in prov["versions"]
    lazy = ad.experimental.read_lazy(out)  # the lazy reader scanpy users reach for
    assert lazy.shape == adata.shape


def test_result_writes_are_visible_and_atomic(synth_store, tmp_path, monkeypatch):
    import scatac_dist.store as store_mod

    out, p = synth_store
    atlas = open_atlas(out)
    emb = np.arange(p.n_cells * 3, dtype=np.float32).reshape(p.n_cells, 3)
    atlas.write_obsm("X_test", emb)
    atlas.write_obs({"score": np.arange(p.n_cells)})
    atlas.write_uns("note", "hello")
    adata = ad.read_zarr(out)  # through consolidated metadata, as users read it
    np.testing.assert_array_equal(adata.obsm["X_test"], emb)
    assert (adata.obs["score"] == np.arange(p.n_cells)).all() and "celltype" in adata.obs
    assert adata.uns["note"] == "hello"

    real_write = store_mod.write_elem

    def crash(group, key, value):  # write part of the element, then die
        real_write(group, key, value[:10])
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(store_mod, "write_elem", crash)
    with pytest.raises(KeyboardInterrupt):
        atlas.write_obsm("X_test", emb * 2)
    monkeypatch.undo()
    np.testing.assert_array_equal(ad.read_zarr(out).obsm["X_test"], emb)
    assert leftovers(out.parent, {out.name}) == []
    with pytest.raises(ValueError, match="rows"):
        atlas.write_obsm("bad", emb[:5])


def test_staged_output_publishes_only_on_success(tmp_path):
    out = tmp_path / "new.zarr"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output(out) as tmp:
            zarr.open_group(str(tmp), mode="w")
            raise RuntimeError("boom")
    assert leftovers(tmp_path, set()) == []
    with staged_output(out) as tmp:
        zarr.open_group(str(tmp), mode="w").attrs["x"] = 1
    assert zarr.open_group(str(out)).attrs["x"] == 1
    assert leftovers(tmp_path, {"new.zarr"}) == []


def test_mtx_round_trip_through_buckets(synth_store, client, tmp_path, small_chunks):
    """Export to a 10x folder and ingest it back with many buckets: identical counts."""
    out, p = synth_store
    atlas = open_atlas(out)
    folder = export_10x_mtx(atlas, tmp_path / "filtered_peak_bc_matrix")
    import dask.config

    with dask.config.set({"scatac-dist.ingest.piece-bytes": 1_000_000}):
        back = ingest(folder, tmp_path / "back.zarr", chunk_rows=333, client=client, progress=False)
    a, b = ad.read_zarr(out), ad.read_zarr(back.path)
    assert (a.X != b.X).nnz == 0 and a.obs_names.equals(b.obs_names) and a.var_names.equals(b.var_names)


def test_h5_round_trip(synth_store, client, tmp_path):
    out, p = synth_store
    h5 = export_10x_h5(open_atlas(out), tmp_path / "filtered_peak_bc_matrix.h5")
    back = ingest(h5, tmp_path / "back.zarr", chunk_rows=512, client=client, progress=False)
    assert (ad.read_zarr(out).X != ad.read_zarr(back.path).X).nnz == 0


@pytest.mark.parametrize("layout", ["csc", "dense", "layer"])
def test_h5ad_layouts(client, tmp_path, layout):
    rng = np.random.default_rng(1)
    m = sp.random(300, 80, density=0.1, format="csr", random_state=rng)
    m.data = rng.integers(1, 9, m.nnz).astype(np.float32)
    var = pd.DataFrame({"chr": "chr3", "start": np.arange(80) * 1000, "end": np.arange(80) * 1000 + 400},
                       index=[f"p{i}" for i in range(80)])
    obs = pd.DataFrame({"donor": ["d1", "d2"] * 150}, index=[f"c{i}" for i in range(300)])
    if layout == "layer":
        adata = ad.AnnData(X=m * 0.1, obs=obs, var=var, layers={"counts": m})
    else:
        adata = ad.AnnData(X=m.tocsc() if layout == "csc" else m.toarray(), obs=obs, var=var)
    adata.write_h5ad(tmp_path / "in.h5ad")
    back = ingest(tmp_path / "in.h5ad", tmp_path / "o.zarr", chunk_rows=64, client=client, progress=False,
                  layer="counts" if layout == "layer" else None)
    got = ad.read_zarr(back.path)
    assert (got.X != m).nnz == 0
    assert got.obs["donor"].tolist() == obs["donor"].tolist()
    assert got.var["start"].tolist() == var["start"].tolist() and got.var_names.tolist() == var.index.tolist()


def test_open_errors(tmp_path):
    from scatac_dist.errors import InputError

    with pytest.raises(InputError, match="no atlas store"):
        Atlas(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(InputError, match="not an AnnData/MuData"):
        Atlas(tmp_path / "plain.zarr")

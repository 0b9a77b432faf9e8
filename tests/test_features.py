"""Features that are not genomic intervals (issue 22): an .h5ad whose peaks are named by
index ingests with a warning and without coordinates; ``require_intervals`` refuses such a
store, with the fix, in everything that needs coordinates; names that look like intervals
keep today's errors. The counts come from the real Leukemia file."""

from __future__ import annotations

import logging
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scatac_dist.errors import InputError
from scatac_dist.io import ingest, require_intervals
from scatac_dist.io.export import export_10x_h5, export_10x_mtx
from scatac_dist.store import open_atlas

from .conftest import LEUKEMIA, leftovers

STYLES = {"index": "{}", "peak_n": "peak_{}"}


def renamed_leukemia(path, style: str) -> tuple[ad.AnnData, list[str]]:
    """The Leukemia file with its peaks renamed ``0, 1, ...`` or ``peak_0, ...`` (no coordinates
    anywhere) and one extra var column, written to ``path``."""
    src = ad.read_h5ad(LEUKEMIA)
    names = [STYLES[style].format(i) for i in range(src.n_vars)]
    src.var_names = names
    src.var["gc"] = np.linspace(0.3, 0.7, src.n_vars)
    src.write_h5ad(path)
    return src, names


def coordinate_warnings(caplog, path) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "scatac_dist" and str(path) in r.getMessage()]


@pytest.mark.parametrize("style", sorted(STYLES))
def test_index_named_h5ad_ingests_with_a_warning(client, tmp_path, data_dir, caplog, style):
    from anndata.experimental import read_lazy

    src, names = renamed_leukemia(tmp_path / "idx.h5ad", style)
    with caplog.at_level(logging.WARNING, logger="scatac_dist"):
        ingest(tmp_path / "idx.h5ad", tmp_path / "idx.zarr", chunk_rows=100, client=client, progress=False)
    msgs = coordinate_warnings(caplog, tmp_path / "idx.h5ad")
    assert len(msgs) == 1, caplog.text
    for phrase in ("no genomic coordinates", "scembed", "BED", "10x", repr(names[0])):
        assert phrase in msgs[0], msgs[0]
    # the store opens in anndata (eager and lazy) with the counts, names and columns as given
    got = ad.read_zarr(tmp_path / "idx.zarr")
    diff = sp.csr_matrix(got.X).astype(np.int64) - sp.csr_matrix(src.X).astype(np.int64)
    assert got.shape == src.shape and diff.count_nonzero() == 0
    assert got.var_names.tolist() == names
    assert list(got.var.columns) == ["gc"]                      # no chr/start/end made up
    np.testing.assert_array_equal(got.var["gc"].to_numpy(), src.var["gc"].to_numpy())
    assert (got.obs["celltype"].astype(str) == src.obs["celltype"].astype(str)).all()
    lazy = read_lazy(tmp_path / "idx.zarr")
    assert lazy.shape == src.shape and lazy.var_names.tolist() == names


def test_require_intervals_on_both_kinds_of_store(client, tmp_path, data_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="scatac_dist"):
        placed = ingest(LEUKEMIA, tmp_path / "placed.zarr", client=client, progress=False)
    assert coordinate_warnings(caplog, LEUKEMIA) == []           # interval names: no warning
    # on a normal store: the coordinates, parsed independently from the chr_start_end names
    peaks = require_intervals(placed, "scEmbed training")
    names = ad.read_h5ad(LEUKEMIA).var_names
    parts = np.array([n.split("_") for n in names])
    assert peaks.index.tolist() == names.tolist()
    assert peaks["chr"].tolist() == parts[:, 0].tolist()
    np.testing.assert_array_equal(peaks["start"].to_numpy(), parts[:, 1].astype(np.int64))
    np.testing.assert_array_equal(peaks["end"].to_numpy(), parts[:, 2].astype(np.int64))
    assert peaks["start"].dtype == np.int64 and peaks["end"].dtype == np.int64

    # on a store without coordinates: the store, the problem and the fix
    renamed_leukemia(tmp_path / "idx.h5ad", "index")
    unplaced = ingest(tmp_path / "idx.h5ad", tmp_path / "idx.zarr", client=client, progress=False)
    with pytest.raises(InputError) as err:
        require_intervals(unplaced, "scEmbed training")
    e = err.value
    assert e.path == str(tmp_path / "idx.zarr")
    assert "scEmbed training needs genomic coordinates" in e.problem and "'0', '1', '2'" in e.problem
    assert "chr, start and end" in e.fix and "chr:start-end" in e.fix and "re-ingest" in e.fix
    assert str(e).startswith(f"{tmp_path / 'idx.zarr'}: ") and "Fix: " in str(e)

    # export needs them too, and refuses before writing anything
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="export to a 10x folder.*needs genomic coordinates"):
        export_10x_mtx(unplaced, tmp_path / "out" / "filtered_peak_bc_matrix")
    with pytest.raises(InputError, match="export to a 10x .h5.*needs genomic coordinates"):
        export_10x_h5(unplaced, tmp_path / "out" / "m.h5")
    assert leftovers(tmp_path / "out", set()) == []

    # scEmbed, whose words are regions, refuses it in training and in projection alike
    from scatac_dist.models import SCEMBED

    with pytest.raises(InputError, match="scEmbed training needs genomic coordinates"):
        SCEMBED(epochs=1).fit(unplaced)
    trained = SCEMBED(epochs=1, dim=8, umap=False, progress=False).fit(placed)
    with pytest.raises(InputError, match="scEmbed projection needs genomic coordinates"):
        trained.encode(unplaced)
    assert "X_scembed" not in open_atlas(unplaced.path).keys("obsm")

    # a store whose coordinates are missing for some features only
    part = tmp_path / "part.zarr"
    shutil.copytree(placed.path, part)
    a = open_atlas(part)
    start = a.var["start"].to_numpy(np.float64)
    start[[3, 7]] = np.nan
    a.write_var({"start": start})
    with pytest.raises(InputError, match=r"2 of 7602 features have no chr/start/end"):
        require_intervals(a, "export")


def write_h5ad(path, counts, names):
    path.parent.mkdir(exist_ok=True)
    ad.AnnData(counts, obs=pd.DataFrame(index=[f"c{i}" for i in range(counts.shape[0])]),
               var=pd.DataFrame(index=names)).write_h5ad(path)
    return path


def test_names_that_look_like_intervals_keep_their_errors(client, tmp_path, counts):
    """Decided (io/features.py docstring): only a file none of whose names parse is taken as
    having no coordinates; a bad interval, or a mix of intervals and other names, is refused."""
    good = [f"chr1:{1000 * i}-{1000 * i + 500}" for i in range(40)]
    bad = list(good)
    bad[7] = "chr1:500-100"
    src = write_h5ad(tmp_path / "in" / "bad.h5ad", counts, bad)
    with pytest.raises(InputError, match=r"bad\.h5ad: peak 8 \(chr1:500-100\) has start >= end"):
        ingest(src, tmp_path / "out.zarr", client=client, progress=False)
    mixed = [str(i) for i in range(39)] + ["chr1:100-200"]
    src = write_h5ad(tmp_path / "in" / "mixed.h5ad", counts, mixed)
    with pytest.raises(InputError, match=r"mixed\.h5ad: feature name '0' is not a genomic interval"):
        ingest(src, tmp_path / "out.zarr", client=client, progress=False)
    # inputs with and without coordinates cannot be joined
    a = write_h5ad(tmp_path / "in" / "a.h5ad", counts, good)
    b = write_h5ad(tmp_path / "in" / "b.h5ad", counts, [str(i) for i in range(40)])
    with pytest.raises(InputError, match=r"b\.h5ad: its features have no genomic coordinates but those of .*a\.h5ad"):
        ingest([a, b], tmp_path / "out.zarr", join="outer", client=client, progress=False)
    assert leftovers(tmp_path, {"in"}) == []

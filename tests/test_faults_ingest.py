"""Ingest with a Dask worker SIGKILLed mid-way (real LocalCluster, worker processes under
nannies): the store completes and equals an undisturbed ingest bit for bit (X's data,
indices and indptr with their dtypes, obs, var), and nothing is left beside it.

The input is a Cell Ranger peak-matrix folder exported from a generated atlas, ingested in
small pieces so that each stage has dozens of tasks: MatrixMarket parsing
(``_parse_piece``), block spooling (``spool-block``) and the assembly of X (``fill-``).
"""

from __future__ import annotations

from pathlib import Path

import dask.config
import numpy as np
import pandas as pd
import pytest
import zarr

import scatac_dist as sd
from scatac_dist.datasets import SynthParams, synthesize
from scatac_dist.io.export import export_10x_mtx

from .conftest import leftovers
from .faults import WorkerKiller

P = SynthParams(n_cells=1000, n_peaks=2000, n_clusters=3, n_lineages=1, fragments=400, seed=11)
SMALL = {"scatac-dist.ingest.piece-bytes": 50_000, "scatac-dist.store.data-chunk-elements": 20_000}



def _ingest(src: Path, out: Path, client):
    with dask.config.set(SMALL):
        return sd.ingest(src, out, client=client, chunk_rows=50, progress=False)


@pytest.fixture(scope="module")
def reference(fclient, tmp_path_factory):
    """The 10x folder and its undisturbed ingest."""
    folder = tmp_path_factory.mktemp("faults_ingest")
    synthesize(folder / "gen.zarr", P, chunk_rows=500, client=fclient, progress=False)
    export_10x_mtx(sd.open_atlas(folder / "gen.zarr"), folder / "filtered_peak_bc_matrix")
    _ingest(folder / "filtered_peak_bc_matrix", folder / "want.zarr", fclient)
    return folder / "filtered_peak_bc_matrix", folder / "want.zarr"


def _assert_same_store(got: Path, want: Path) -> None:
    g, w = zarr.open_group(str(got), mode="r"), zarr.open_group(str(want), mode="r")
    for part in ("data", "indices", "indptr"):
        a, b = g["X"][part], w["X"][part]
        assert a.dtype == b.dtype, part
        np.testing.assert_array_equal(a[:], b[:], err_msg=part)
    assert dict(g["X"].attrs) == dict(w["X"].attrs)
    A, B = sd.open_atlas(got), sd.open_atlas(want)
    pd.testing.assert_frame_equal(A.obs, B.obs)
    pd.testing.assert_frame_equal(A.var, B.var)


@pytest.mark.parametrize("key_part, after", [
    ("_parse_piece", 5),
    ("spool-block", 5),
    ("fill-", 5),
])
def test_killed_worker_in_ingest_changes_nothing(reference, fclient, tmp_path, key_part, after):
    src, want = reference
    with WorkerKiller(fclient, key_part, after=after) as killer:
        _ingest(src, tmp_path / "got.zarr", fclient)
    assert killer.killed, "no worker was killed: the test proved nothing"
    _assert_same_store(tmp_path / "got.zarr", want)
    assert leftovers(tmp_path, {"got.zarr"}) == []  # no spool, bucket or staging folder left

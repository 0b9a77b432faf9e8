"""A killed client: ``scatac-dist run`` SIGKILLed at every step of a stage's publishing.

The kill is injected inside the real command (``SCATAC_DIST_FAULT_AT=N`` kills the process
at its N-th publishing step; ``SCATAC_DIST_FAULT_TRACE`` lists the steps of an undisturbed
run, so the test finds every step of the LSI stage). After each kill the store must open in
anndata with the state before the stage (or after it, once the swap is done), and running
the same command again must end with exactly the results of an undisturbed run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scatac_dist.datasets import SynthParams, synthesize
from scatac_dist.lock import lock_path

from .conftest import leftovers

pytestmark = pytest.mark.slow  # about 16 runs of the command: a few minutes

BEFORE_LSI = ["qc", "filter_cells", "select_features", "tfidf"]


def _run(store, scheduler, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    cmd = [str(Path(sys.executable).parent / "scatac-dist"), "--scheduler", scheduler, "--no-progress", "run", str(store)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _state(store):
    a = ad.read_zarr(store)  # as a user opens it: consolidated metadata and all
    return (sorted(a.obsm), sorted(a.varm), sorted(a.uns.get("scatac_dist", {})))


@pytest.fixture(scope="module")
def base(tmp_path_factory, client):
    out = tmp_path_factory.mktemp("killed-client") / "base.zarr"
    synthesize(out, SynthParams(n_cells=500, n_peaks=600, n_clusters=3, n_lineages=1, seed=11),
               chunk_rows=200, client=client, progress=False)
    return out


@pytest.fixture(scope="module")
def reference(base, cluster, tmp_path_factory):
    ref = tmp_path_factory.mktemp("reference") / "s.zarr"
    shutil.copytree(base, ref)
    trace = ref.parent / "trace.tsv"
    r = _run(ref, cluster.scheduler_address, {"SCATAC_DIST_FAULT_TRACE": str(trace)})
    assert r.returncode == 0, r.stderr
    steps = [line.split("\t") for line in trace.read_text().splitlines()]
    return ref, [(int(n), name) for n, name in steps]


def test_a_kill_at_every_publishing_step_of_a_stage_loses_nothing(base, reference, cluster, tmp_path):
    ref, steps = reference
    lsi_steps = [(n, name) for n, name in steps if name.startswith("pipeline_lsi:")]
    # begin, working copy, each result, provenance (stage and pipeline), consolidate, swap
    assert len(lsi_steps) >= 7, steps
    stages_before = {"synth", *BEFORE_LSI, *(f"pipeline_{s}" for s in BEFORE_LSI)}
    before = ([], [], sorted(stages_before))
    after = (["X_lsi"], ["lsi_loadings"], sorted(stages_before | {"lsi", "pipeline_lsi"}))
    want = ad.read_zarr(ref)
    for n, name in lsi_steps:
        store = tmp_path / f"kill-{n}" / "s.zarr"
        shutil.copytree(base, store)
        killed = _run(store, cluster.scheduler_address, {"SCATAC_DIST_FAULT_AT": str(n)})
        assert killed.returncode == -9, (name, killed.stderr[-2000:])
        assert _state(store) == (after if name.endswith("swapped in") else before), name

        again = _run(store, cluster.scheduler_address)
        assert again.returncode == 0, (name, again.stderr[-2000:])
        got = ad.read_zarr(store)
        for key in ("X_lsi", "X_spectral", "X_umap"):
            np.testing.assert_array_equal(got.obsm[key], want.obsm[key], err_msg=f"{key} after a kill at {name}")
        assert (got.obs["leiden"].astype(str) == want.obs["leiden"].astype(str)).all(), name
        assert (got.obsp["connectivities"] != want.obsp["connectivities"]).nnz == 0, name
        assert leftovers(store.parent, {"s.zarr"}) == [], name
        assert not lock_path(store).exists()

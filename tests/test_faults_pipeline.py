"""The pipeline under faults and under a tight memory limit (issue 23).

- A worker process SIGKILLed in the middle of the LSI stage and in the middle of the
  spectral stage: the stage completes on the workers left and its result is bit-equal to an
  undisturbed run (the reductions have a fixed order, so a recomputed task gives the same
  bytes). Each kill lands on a cluster of its own, so that the session's shared cluster
  never runs short of a worker, however long a nanny takes to bring its worker back.
- The whole default pipeline on workers whose memory limit is 10x smaller than the dense
  matrix (and twice one dense row block): it completes, no worker is restarted, and no
  worker's peak memory reaches the limit.
"""

from __future__ import annotations

import os
import resource
import shutil

import dask.config
import numpy as np
import pytest

from scatac_dist.datasets import SynthParams, synthesize
from scatac_dist.pipeline import default_stages, run_stages
from scatac_dist.store import open_atlas

from .faults import WorkerKiller


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, client):
    """A store with QC, filters, features and TF-IDF done: the input of LSI."""
    out = tmp_path_factory.mktemp("faults-pipeline") / "base.zarr"
    synthesize(out, SynthParams(n_cells=3000, n_peaks=2000, n_clusters=4, n_lineages=2, seed=21),
               chunk_rows=250, client=client, progress=False)
    run_stages(open_atlas(out), default_stages()[:4], client=client, progress=False)
    return out


@pytest.fixture(scope="module")
def undisturbed(prepared, client, tmp_path_factory):
    """LSI and the spectral embedding of ``prepared``, run without a fault."""
    ref = tmp_path_factory.mktemp("undisturbed") / "ref.zarr"
    shutil.copytree(prepared, ref)
    run_stages(open_atlas(ref), default_stages()[:6], client=client, progress=False)
    return open_atlas(ref)


@pytest.fixture
def kclient():
    """A client of a LocalCluster of this test's own (2 worker processes under nannies): its
    workers are killed."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit="3GiB") as lc, Client(lc, set_as_default=False) as c, c.as_current():
        yield c


@pytest.mark.parametrize("stage,key_part,after", [("lsi", "_gram_step", 3), ("spectral", "_lobpcg_step", 10)])
def test_a_worker_killed_mid_stage_changes_no_result(prepared, undisturbed, kclient, tmp_path, stage, key_part,
                                                     after):
    stages = default_stages()[:6]  # ... tfidf, lsi, spectral
    hit = tmp_path / "hit.zarr"
    shutil.copytree(prepared, hit)

    with WorkerKiller(kclient, key_part, after=after) as killer:
        report = run_stages(open_atlas(hit), stages, client=kclient, progress=False)
    assert killer.killed, f"no {key_part} task reached a worker: the kill never happened"
    assert not report[stage]["skipped"]
    a, b = undisturbed, open_atlas(hit)
    for key in ("X_lsi", "X_spectral"):
        np.testing.assert_array_equal(b.read(f"obsm/{key}"), a.read(f"obsm/{key}"), err_msg=key)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_pipeline_runs_on_workers_with_a_tenth_of_the_matrix(tmp_path, client):
    from distributed import Client, LocalCluster

    # A worker process holds 300-450 MB before any task (Dask, NumPy, SciPy, anndata, zarr,
    # numba's compiled kernels) and Dask pauses it at 80% of its limit, so the limit cannot
    # go much under 1.5 GB: the matrix is 20,000 cells x 200,000 peaks, 16 GB as dense
    # float32, the limit 1.6 GB, and one 1,000-row block 800 MB dense, so a step that
    # densified blocks, or gathered the matrix, would fail. (LSI's tasks hold features x
    # components, 80 MB here: O(n_peaks x d), not the chunk.)
    p = SynthParams(n_cells=20_000, n_peaks=200_000, n_clusters=8, n_lineages=2, seed=4)
    dense = p.n_cells * p.n_peaks * 4
    limit = dense // 10
    out = tmp_path / "big.zarr"
    synthesize(out, p, chunk_rows=1000, client=client, progress=False)  # written by the usual workers
    # The eigen-solvers keep the transformed matrix on the workers when it fits their cache
    # budget (a trade of memory for speed, scatac-dist.linalg.cache-bytes-per-worker); off
    # here, so every pass re-reads the store chunk by chunk: the path whose bound is the chunk.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit=limit) as lc, Client(lc) as client, \
            dask.config.set({"scatac-dist.linalg.cache-bytes-per-worker": 0}):
        atlas = open_atlas(out, chunk_rows=1000)
        pids = client.run(os.getpid)
        report = run_stages(atlas, default_stages(), client=client, progress=False)
        assert not any(r["skipped"] for r in report.values())
        assert client.run(os.getpid) == pids, "a worker was restarted (over its memory limit?)"
        peaks = client.run(_peak_rss)
    assert max(peaks.values()) < limit, (peaks, limit)
    emb = atlas.read("obsm/X_spectral")
    assert emb.shape[0] == p.n_cells and np.isfinite(emb[atlas.obs["pass_qc"].to_numpy()]).all()
    assert atlas.obs["leiden"].notna().sum() == int(atlas.obs["pass_qc"].sum())

"""Where work runs: an existing scheduler reached with --scheduler, and the config defaults."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import scipy.io

from .conftest import BM0828

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_workers(address: str, n: int, timeout: float = 60) -> None:
    from distributed import Client

    with Client(address, timeout="30s") as c:
        c.wait_for_workers(n, timeout=timeout)


def test_ingest_through_separate_scheduler_and_worker(tmp_path, data_dir):
    """`dask scheduler` and `dask worker` run as their own processes on loopback."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()
    sched = subprocess.Popen([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                              "--no-dashboard"], stdout=open(logs / "s.log", "w"),
                             stderr=subprocess.STDOUT, env=env)
    worker = None
    try:
        time.sleep(1.0)
        worker = subprocess.Popen([BIN / "dask", "worker", address, "--nworkers", "2", "--nthreads", "1",
                                   "--memory-limit", "2GiB", "--no-dashboard",
                                   "--local-directory", str(tmp_path / "w")],
                                  stdout=open(logs / "w.log", "w"), stderr=subprocess.STDOUT, env=env)
        _wait_for_workers(address, 2)
        out = tmp_path / "bm.zarr"
        folder = BM0828 / "filtered_peak_bc_matrix"
        res = subprocess.run([BIN / "scatac-dist", "--scheduler", address, "--no-progress", "ingest",
                              str(folder), "-o", str(out), "--chunk-rows", "100",
                              "--labels", str(BM0828 / "buenrostro2018_bm0828_labels.tsv")],
                             capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 0, res.stderr
        assert address in res.stderr and "2 workers" in res.stderr
        # the work ran on the separate workers: they logged nothing fatal, the store is exact
        got = ad.read_zarr(out)
        ref = scipy.io.mmread(folder / "matrix.mtx.gz").T.tocsr()
        assert got.shape == ref.shape and (got.X != ref).nnz == 0
        assert got.obs["celltype"].notna().all()
    finally:
        for p in (worker, sched):
            if p is not None:
                p.terminate()
                p.wait(timeout=30)


def test_config_defaults_and_env_override():
    """Defaults come from scatac_dist.yaml; DASK_SCATAC_DIST__* variables override them."""
    code = ("import dask.config, scatac_dist; print(dask.config.get('scatac-dist.store.chunk-rows'), "
            "dask.config.get('scatac-dist.cluster.threads-per-worker'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["10000", "1"]
    env = {**os.environ, "DASK_SCATAC_DIST__STORE__CHUNK_ROWS": "2500"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["2500", "1"]


def test_threads_only_local_cluster_runs_the_pipeline_in_one_process(tmp_path, client):
    """--threads-only: the scheduler and both workers are threads of the CLI's own process (it
    starts no child process), and the pipeline's spectral embedding equals, to float32
    rounding, the one worker processes compute (the ``client`` fixture's)."""
    import shutil

    import numpy as np
    import psutil

    from scatac_dist.datasets import SynthParams, synthesize
    from scatac_dist.pipeline import default_stages, run_stages
    from scatac_dist.store import open_atlas

    store = tmp_path / "procs.zarr"
    synthesize(store, SynthParams(n_cells=600, n_peaks=800, n_clusters=3, seed=4), chunk_rows=200, client=client,
               progress=False)
    shutil.copytree(store, tmp_path / "threads.zarr")
    run_stages(open_atlas(store), default_stages()[:6], client=client, progress=False)  # qc ... spectral
    cmd = [str(BIN / "scatac-dist"), "--workers", "2", "--threads-only", "--no-progress", "run",
           str(tmp_path / "threads.zarr")]
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = 0
    while proc.poll() is None:
        try:
            children = max(children, len(proc.children(recursive=True)))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert "2 workers" in stderr and children == 0
    a, b = open_atlas(tmp_path / "threads.zarr"), open_atlas(store)
    # not bit-equal: a nanny starts each worker process with one BLAS thread, while worker
    # threads share this process's BLAS pool, which sums in another order (float32 noise)
    emb, ref = a.read("obsm/X_spectral"), b.read("obsm/X_spectral")
    np.testing.assert_allclose(emb, ref, atol=5e-3 * np.nanmax(np.abs(ref)))
    assert "X_umap" in a.keys("obsm") and a.obs["leiden"].notna().any()


def test_local_cluster_from_flags_and_report(tmp_path):
    """get_client starts worker processes as asked and the performance report is written."""
    import dask.array as da

    from scatac_dist.cluster import get_client, maybe_performance_report

    client = get_client(n_workers=2, threads_per_worker=1, memory_limit="1GiB", dashboard_address=":0")
    try:
        info = client.scheduler_info()["workers"]
        assert len(info) == 2
        assert all(w["nthreads"] == 1 and w["memory_limit"] == 2**30 for w in info.values())
        pids = set(client.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids  # processes, not threads
        report = tmp_path / "report.html"
        with maybe_performance_report(report):
            assert da.ones(1000, chunks=100).sum().compute() == 1000
        assert report.stat().st_size > 10_000 and b"Dask Performance Report" in report.read_bytes()
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()

"""scCASE under faults, with real processes: a Dask worker SIGKILLed in the middle of an
atlas-mode iteration, the ``scatac-dist sccase`` process SIGKILLed after it kept iteration
>= 2 and run again, restart state of other parameters or other cells not used, and the
output pass (enhanced layer, chunked PCA, scCASER reference) on a worker whose memory limit is
a tenth of the dense matrix.

Every step of an atlas-mode run is deterministic (fixed blocks, fixed-tree sums, seeded
NMF, kNN search and mask), so a run that lost a worker, or that was resumed from a kept
iterate, must equal an undisturbed run bit for bit; that is what these tests assert.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scatac_dist.datasets import SynthParams, synthesize
from scatac_dist.models import SCCASE
from scatac_dist.models import sccase as sccase_mod
from scatac_dist.store import open_atlas

from .faults import WorkerKiller

P = SynthParams(n_cells=600, n_peaks=1500, n_clusters=3, n_lineages=1, signal=0.5, fragments=400, seed=11)
FIT = dict(mode="atlas", k_neighbors=10, n_factors=3, seed=0)



@pytest.fixture(scope="module")
def base(fclient, tmp_path_factory):
    path = tmp_path_factory.mktemp("faults_sccase") / "base.zarr"
    synthesize(path, P, chunk_rows=50, client=fclient, progress=False)  # 12 blocks: 12 tasks a pass
    return path


def _copy(base: Path, dst: Path) -> Path:
    shutil.copytree(base, dst)
    return dst


def _fit(path, chunk_rows=None, **kw):
    return SCCASE(**(FIT | kw)).fit(open_atlas(path, chunk_rows=chunk_rows))


def _outputs(path) -> dict:
    a = open_atlas(path)
    L = a.read("layers/sccase")
    rec = a.provenance()["sccase"]
    return {"X_sccase": a.read("obsm/X_sccase"), "X_sccase_pca": a.read("obsm/X_sccase_pca"),
            "sccase_W": a.read("varm/sccase_W"), "sccase_used": a.var["sccase_used"].to_numpy(),
            "layer.data": L.data, "layer.indices": L.indices, "layer.indptr": L.indptr,
            "losses": np.array(rec["result"]["losses"])}


def _assert_same(got: dict, want: dict) -> None:
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_killed_worker_mid_iteration_changes_nothing(base, fclient, tmp_path, monkeypatch):
    """A worker SIGKILLed while it computes ``q``/``g`` of iteration 1's Z step (tasks that read
    the memory-mapped pattern and scattered vectors): the run completes and every output
    equals an undisturbed run's, bit for bit."""
    _fit(_copy(base, tmp_path / "a.zarr"), chunk_rows=50, max_iter=3)
    want = _outputs(tmp_path / "a.zarr")
    path = _copy(base, tmp_path / "b.zarr")
    calls = []
    killer = WorkerKiller(fclient, "_quad_task", after=3)
    quad = sccase_mod.atlas_mode.SupportProblem.quad

    def watched(self, V, want_g=True):
        calls.append(1)
        if len(calls) == 3:          # 1: the start's loss; 2, 3: iteration 1's Z step
            killer.__enter__()
        return quad(self, V, want_g)

    monkeypatch.setattr(sccase_mod.atlas_mode.SupportProblem, "quad", watched)
    try:
        _fit(path, chunk_rows=50, max_iter=3)
    finally:
        killer.__exit__(None, None, None)
    assert killer.killed, "no worker was killed: the test proved nothing"
    _assert_same(_outputs(path), want)
    assert not (tmp_path / ".b.zarr.resume").exists()      # restart state removed once published


def _saved_iteration(folder: Path) -> int:
    try:
        with np.load(folder / "iterate.npz") as z:
            return int(z["it"])
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return -1


def test_killed_client_resumes_from_the_last_iteration(base, fcluster, fclient, tmp_path):
    """SIGKILL `scatac-dist sccase` once it has kept iteration >= 2, run the same command
    again: it resumes from the kept iteration (not from 0) and ends with the uninterrupted
    run's outputs, bit for bit."""
    import anndata as ad

    iters = 15
    store = _copy(base, tmp_path / "s.zarr")
    exe = [str(Path(sys.executable).parent / "scatac-dist"), "--scheduler", fcluster.scheduler_address,
           "--no-progress", "sccase", str(store), "--mode", "atlas", "--k-neighbors", "10", "--n-factors", "3",
           "--max-iter", str(iters), "--seed", "0"]
    state = tmp_path / ".s.zarr.resume" / "sccase"
    proc = subprocess.Popen(exe, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_at = -1
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            killed_at = _saved_iteration(state)
            if killed_at >= 2:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        err = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{err[-2000:]}"
    saved = _saved_iteration(state)
    assert 2 <= killed_at <= saved < iters
    assert not open_atlas(store).has("obsm/X_sccase")          # nothing published yet
    assert "X_sccase" not in ad.read_zarr(store).obsm           # and the store opens as before
    assert list(tmp_path.glob(".s.zarr.sccase-*"))              # the killed run's pattern folder

    again = subprocess.run(exe, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    m = re.search(r"resuming from iteration (\d+)", again.stderr)
    assert m and int(m.group(1)) == saved, again.stderr[-3000:]
    assert not state.parent.exists()                            # restart state removed after publishing
    assert not list(tmp_path.glob(".s.zarr.sccase-*"))          # the stale pattern folder too
    rec = open_atlas(store).provenance()["sccase"]["result"]
    assert rec["resumed_from_iteration"] == saved and rec["n_iter"] == iters

    ref = _copy(base, tmp_path / "ref.zarr")                   # the uninterrupted run, in this process
    _fit(ref, max_iter=iters)
    _assert_same(_outputs(store), _outputs(ref))


@pytest.mark.parametrize("change", ["seed", "pass_qc"])
def test_restart_state_of_other_parameters_or_cells_is_not_used(base, fclient, tmp_path, monkeypatch, caplog,
                                                                change):
    """A run that failed after its iterations leaves its iterate; the same command resumes from
    it, but a run with another seed, or on other cells (``obs['pass_qc']`` changed), starts
    afresh and equals a run that never saw that state."""
    path = _copy(base, tmp_path / "s.zarr")
    fresh = _copy(base, tmp_path / "fresh.zarr")
    real = sccase_mod.write_outputs

    def fail(*a, **k):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(sccase_mod, "write_outputs", fail)
    with pytest.raises(RuntimeError, match="disk gone"):
        _fit(path, max_iter=3)
    state = tmp_path / ".s.zarr.resume" / "sccase"
    assert _saved_iteration(state) == 3
    monkeypatch.setattr(sccase_mod, "write_outputs", real)
    kw = dict(max_iter=3)
    if change == "seed":
        kw["seed"] = 1
    else:
        keep = np.ones(P.n_cells, bool)
        keep[::7] = False
        for p in (path, fresh):
            open_atlas(p).write_obs({"pass_qc": keep})
    with caplog.at_level(logging.INFO, logger="scatac_dist"):
        m = _fit(path, **kw)
    assert "left by other parameters or data" in caplog.text
    assert "resuming from iteration" not in caplog.text
    assert m.result_["resumed_from_iteration"] is None
    _fit(fresh, **kw)
    _assert_same(_outputs(path), _outputs(fresh))
    assert not state.parent.exists()


def test_failed_run_resumes_without_redoing_its_iterations(base, fclient, tmp_path, monkeypatch, caplog):
    """The same command after a failure in the output pass resumes at the kept last iteration:
    no iteration is run again and the outputs equal an uninterrupted run's."""
    path = _copy(base, tmp_path / "s.zarr")
    real, quad = sccase_mod.write_outputs, sccase_mod.atlas_mode.SupportProblem.quad

    def fail(*a, **k):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(sccase_mod, "write_outputs", fail)
    with pytest.raises(RuntimeError, match="disk gone"):
        _fit(path, max_iter=3)
    monkeypatch.setattr(sccase_mod, "write_outputs", real)
    ran = []

    def counted(self, V, want_g=True):
        ran.append(1)
        return quad(self, V, want_g)

    monkeypatch.setattr(sccase_mod.atlas_mode.SupportProblem, "quad", counted)
    with caplog.at_level(logging.INFO, logger="scatac_dist"):
        m = _fit(path, max_iter=3)
    assert "resuming from iteration 3" in caplog.text and m.result_["resumed_from_iteration"] == 3
    assert len(ran) == 1                      # only the pass that rebuilds q, g of the kept Z
    monkeypatch.undo()
    ref = _copy(base, tmp_path / "ref.zarr")
    _fit(ref, max_iter=3)
    _assert_same(_outputs(path), _outputs(ref))


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.slow  # 65,536 cells: about 45 s of output pass and 1.5 min in all on 2 busy cores
def test_output_pass_on_a_worker_a_tenth_of_the_dense_matrix(fclient, tmp_path):
    """The output pass (pattern, enhanced layer, chunked PCA) and scCASER's reference (a
    labelled .zarr and .h5ad, pseudo-bulked) on 65,536 cells x 32,768 peaks, whose dense matrix
    is 8 GiB as float32 (16 GiB as the float64 the old PCA built on the client), with one worker
    limited to 800 MiB (10.2x less than float32; the worker itself takes about 490 MiB, most of
    it torch, which ``scatac_dist.models`` imports): it completes, the worker is never
    restarted and its peak RSS stays under the limit, the client's peak traced allocation stays
    under a tenth of the dense matrix too, and every result matches a SciPy reference."""
    import tracemalloc

    import anndata as ad
    import dask
    import scipy.sparse as sp
    from distributed import Client, LocalCluster
    from scipy.sparse.linalg import LinearOperator, svds

    from scatac_dist.models import _sccase_outputs as outputs
    from scatac_dist.models import sccase_pattern as data
    from scatac_dist.models._sccase_reference import reference_matrix

    n, m, cr, limit, top = 65_536, 32_768, 4096, 800 * 2**20, 64
    assert n * m * 4 >= 10 * limit
    path = tmp_path / "big.zarr"
    synthesize(path, SynthParams(n_cells=n, n_peaks=m, fragments=40, n_clusters=4, n_lineages=2, seed=2),
               chunk_rows=cr, client=fclient, progress=False)
    counts = open_atlas(path).X.compute()
    labels = open_atlas(path).obs["celltype"].astype(str).to_numpy()
    h5 = tmp_path / "ref.h5ad"
    ad.AnnData(counts.astype(np.float32), obs=open_atlas(path).obs[["celltype"]], var=open_atlas(path).var[[]]
               ).write_h5ad(h5)
    config = {"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False,
              "distributed.worker.memory.pause": False, "distributed.worker.memory.terminate": 0.95}
    with dask.config.set(config), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit=limit,
                         dashboard_address=":0") as lc, Client(lc, set_as_default=False) as c, c.as_current():
        pid = c.run(os.getpid)
        atlas = open_atlas(path, chunk_rows=cr)
        t0 = time.perf_counter()
        tracemalloc.start()
        pat = data.build_pattern(atlas, min_cell_fraction=1e-9)     # every peak with a read
        try:
            rng = np.random.default_rng(0)
            nbr = np.hstack([np.arange(pat.n)[:, None], rng.integers(0, pat.n, (pat.n, 10))])
            Zv = np.hstack([np.ones((pat.n, 1)), 0.1 * rng.random((pat.n, 10))])
            W, H = rng.random((pat.m, 4)), rng.random((4, pat.n))
            n_stored = outputs.write_outputs(atlas, pat, W, H, nbr, Zv, enhanced_top=top, n_pcs=50, seed=0, norm="l2")
            refs = {fmt: reference_matrix(str(p), atlas, pat, "celltype", chunk_rows=cr)[0]
                    for fmt, p in (("zarr", path), ("h5ad", h5))}
            client_peak = tracemalloc.get_traced_memory()[1]
            print(f"worker peak RSS {max(c.run(_peak_rss).values()) / 2**20:.0f} MiB, client traced peak "
                  f"{client_peak / 2**20:.0f} MiB, {time.perf_counter() - t0:.0f} s")
            tracemalloc.stop()
            assert c.run(os.getpid) == pid                          # the worker was never killed
            worker_peak = max(c.run(_peak_rss).values())
            assert worker_peak < limit, worker_peak
            assert pat.n * pat.m * 4 >= 10 * limit                  # the matrix of the used cells and peaks too
            assert client_peak < pat.n * pat.m * 4 / 10, client_peak
            # the layer: each cell's `top` largest entries of X Z, checked on every 97th cell
            A = data.pattern_rows(pat, np.arange(pat.n))            # X^T, cells x kept peaks (Eq. 1)
            L = open_atlas(path).read("layers/sccase").tocsr()[:, pat.peaks]
            assert L.nnz == n_stored <= top * pat.n
            for j in range(0, pat.n, 97):
                e = np.asarray(Zv[j] @ A[nbr[j]].toarray()).ravel()
                row = L[j]
                kept = row.indices
                np.testing.assert_allclose(row.data, e[kept], rtol=1e-6)
                assert len(kept) == min(top, (e > 0).sum())
                assert e[np.setdiff1d(np.arange(pat.m), kept)].max(initial=0) <= e[kept].min() * (1 + 1e-6)
        finally:
            pat.remove()
    # the PCA: the leading components of the centred TF-IDF of the layer, by ARPACK in SciPy.
    # Randomized subspace iteration resolves component i to about (s_71 / s_i)^15 (70 vectors,
    # 7 power passes); past the 3 cluster components this set's spectrum is flat noise
    # (s = 7.3, 5.4, 4.9, 3.9, then 3.4 down to s_71 = 3.1: measured), so the 3 components
    # above it are compared (measured errors 5e-7, 8e-5, 2.5e-4 of their largest value).
    Y = L.astype(np.float64)
    tf = sp.diags(1 / np.maximum(np.asarray(Y.sum(1)).ravel(), 1e-300)) @ Y
    cs = np.asarray(tf.sum(0)).ravel()
    T = sp.csr_matrix(tf @ sp.diags(np.where(cs > 0, np.log(n / np.where(cs > 0, cs, 1)), 0)))
    T = sp.csr_matrix(sp.diags(1 / np.maximum(np.sqrt(np.asarray(T.multiply(T).sum(1)).ravel()), 1e-300)) @ T)
    mu = np.asarray(T.mean(0)).ravel()
    C = LinearOperator(T.shape, matvec=lambda v: T @ v - mu @ v, rmatvec=lambda u: T.T @ u - mu * u.sum(),
                       dtype=np.float64)
    U, s, _ = svds(C, k=5, random_state=0)
    s, want = s[::-1], (U * s)[:, ::-1]
    got = open_atlas(path).read("obsm/X_sccase_pca").astype(np.float64)
    assert got.shape == (n, 50)
    for i in range(3):
        assert s[i] > 1.25 * s[3]
        np.testing.assert_allclose(np.linalg.norm(got[:, i]), s[i], rtol=1e-6)
        sign = np.sign(got[:, i] @ want[:, i])
        np.testing.assert_allclose(sign * got[:, i], want[:, i], atol=1e-3 * np.abs(want[:, i]).max())
    # the reference: counts summed per label over the kept peaks, from either file, exactly
    groups = np.unique(labels)
    S = sp.csr_matrix((np.ones(n), (np.searchsorted(groups, labels), np.arange(n))), shape=(len(groups), n))
    M = (S @ counts[:, pat.peaks]).toarray().T
    for fmt, got_m in refs.items():
        np.testing.assert_array_equal(got_m, M, err_msg=fmt)

"""SCALE under faults: a killed training rank, ``--resume auto``, checkpoints of another run,
one publication for all outputs, and the imputation's memory bound on a real LocalCluster.

Real processes throughout: 2 gloo ranks under ``torchrun`` (one SIGKILLed; about 40 s), the
CLI, and Dask workers whose memory limit is a tenth of the imputed matrix (``slow``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from click.testing import CliRunner

from scatac_dist.cli import main
from scatac_dist.datasets import SynthParams, synthesize
from scatac_dist.errors import InputError
from scatac_dist.models import SCALE
from scatac_dist.models._scale_outputs import _sigmoid_logits, binarize_imputed, write_imputation
from scatac_dist.store import open_atlas
from scatac_dist.train.checkpoint import checkpoint_info, latest_checkpoint, save_checkpoint, step_files

KW = dict(n_clusters=3, quick=True, min_cells=1, min_reads=1, progress=False, min_iter=0, patience=1000)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, client):
    """Two small synthetic atlases (different data), written once for the module."""
    d = tmp_path_factory.mktemp("faults-scale")
    out = {}
    for name, seed in (("a", 11), ("b", 12)):
        p = SynthParams(n_cells=240, n_peaks=300, n_clusters=3, n_lineages=1, signal=0.5, fragments=300, seed=seed)
        out[name] = synthesize(d / f"{name}.zarr", p, chunk_rows=40, client=client, progress=False).path
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _restart_state(store: Path) -> Path:
    return store.with_name(f".{store.name}.resume")


# ------------------------------------------------------------------ the checkpoint folder


def test_a_fresh_run_never_prunes_its_own_checkpoint(tmp_path):
    """An older run left later steps (200, 201); a new run writes step 10. The old code sorted
    by name, kept 200 and 201, deleted step 10 and left ``latest`` naming it."""
    for s in (200, 201):
        save_checkpoint(tmp_path, {"run": "old", "trainer": {"step": s}}, s)
    path = save_checkpoint(tmp_path, {"run": "new", "trainer": {"step": 10}}, 10)
    assert path.exists()
    assert latest_checkpoint(tmp_path) == path and (tmp_path / "latest").read_text().strip() == path.name
    assert torch.load(latest_checkpoint(tmp_path), weights_only=False)["run"] == "new"
    # pruning keeps the newest `keep` steps of the run, the one just written included
    save_checkpoint(tmp_path, {"run": "new", "trainer": {"step": 20}}, 20)
    save_checkpoint(tmp_path, {"run": "new", "trainer": {"step": 30}}, 30)
    assert [s for s, _ in step_files(tmp_path)] == [20, 30]
    assert checkpoint_info(tmp_path)["step"] == 30


# ------------------------------------------------------------------ resume auto, refusals


def test_resume_auto_starts_fresh_resumes_and_publishes_once(stores, tmp_path, monkeypatch):
    """``resume="auto"`` with no checkpoint folder: the first run (training only) starts fresh
    and leaves its checkpoint in the store's restart state; the second resumes from it,
    publishes every output in one publication and removes the restart state."""
    store = _copy(stores["a"], tmp_path / "s.zarr")
    first = SCALE(max_iter=20, resume="auto", **KW).fit(store, outputs=False)
    assert first.summary_["start_step"] == 0 and first.summary_["steps"] == 20
    folder = _restart_state(store) / "scale"
    assert [s for s, _ in step_files(folder)] == [20]               # checkpointed without being asked

    trace = tmp_path / "trace.tsv"
    monkeypatch.setenv("SCATAC_DIST_FAULT_TRACE", str(trace))
    second = SCALE(max_iter=30, resume="auto", impute=True, **KW).fit(store)
    monkeypatch.delenv("SCATAC_DIST_FAULT_TRACE")
    assert second.summary_["start_step"] == 20 and second.summary_["steps"] == 30
    assert not _restart_state(store).exists()                       # published: nothing left to resume
    steps = [line.split("\t")[1] for line in trace.read_text().splitlines()]
    assert [s for s in steps if s.endswith(": begin")] == ["scale: begin"]   # one publication
    assert [s for s in steps if s.endswith("swapped in")] == ["scale: swapped in"]
    wrote = {s.removeprefix("scale: wrote ") for s in steps if ": wrote " in s}
    assert {"obsm/X_scale", "obs", "var", "varm/scale_decoder", "layers/scale_impute", "layers/scale_binary",
            "uns/scatac_dist/scale"} <= wrote
    rec = open_atlas(store).provenance()["scale"]
    assert rec["result"]["start_step"] == 20 and rec["params"]["resume"] == "auto"

    # and with nothing to resume, auto trains from step 0 (the restart state was removed)
    third = SCALE(max_iter=5, resume="auto", **KW).fit(store, outputs=False)
    assert third.summary_["start_step"] == 0


def test_a_checkpoint_of_another_run_is_refused(stores, tmp_path):
    import socket

    ck = tmp_path / "ck"
    host = socket.gethostname()
    dead, live = ck / f"scale-{host}-999999999-x", ck / f"scale-{host}-{os.getpid()}-y"  # hand-off folders
    for d in (dead, live):
        d.mkdir(parents=True)
    SCALE(max_iter=10, checkpoint_dir=str(ck), **KW).fit(stores["a"], outputs=False)
    assert [s for s, _ in step_files(ck)] == [10]
    assert not dead.exists() and live.exists()                      # a killed job's hand-off is removed
    # same data and parameters: auto and yes both continue it, with a larger budget
    again = SCALE(max_iter=15, checkpoint_dir=str(ck), resume="auto", **KW).fit(stores["a"], outputs=False)
    assert again.summary_["start_step"] == 10
    # other parameters
    for resume in ("auto", True):
        with pytest.raises(InputError, match=r"another run.*seed: 0 in the checkpoint, 1 now") as err:
            SCALE(max_iter=20, checkpoint_dir=str(ck), resume=resume, **{**KW, "seed": 1}).fit(
                stores["a"], outputs=False)
        assert err.value.path == str(ck) and "--checkpoint-dir" in err.value.fix
    with pytest.raises(InputError, match=r"batch_size: 32 in the checkpoint, 64 now"):
        SCALE(max_iter=20, checkpoint_dir=str(ck), resume="auto", batch_size=64, **KW).fit(stores["a"],
                                                                                           outputs=False)
    assert [s for s, _ in step_files(ck)] == [10, 15]                # refused runs left it alone
    # other data, from the command line: one line, exit status 2, nothing written
    b = _copy(stores["b"], tmp_path / "b.zarr")
    r = CliRunner().invoke(main, ["--workers", "1", "--no-progress", "scale", str(b), "--n-clusters", "3", "--quick",
                                  "--min-cells", "1", "--min-reads", "1", "--max-iter", "20",
                                  "--checkpoint-dir", str(ck), "--resume", "auto"])
    assert r.exit_code == 2, r.output
    line = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and line[0].startswith(f"error: {ck}: holds the checkpoint of another run")
    assert "data: " in line[0] and "Fix: " in line[0]
    assert "X_scale" not in open_atlas(b).keys("obsm") and [s for s, _ in step_files(ck)] == [10, 15]
    # --resume (yes) with an empty folder: nothing to continue
    r = CliRunner().invoke(main, ["--workers", "1", "--no-progress", "scale", str(b), "--n-clusters", "3",
                                  "--min-cells", "1", "--min-reads", "1", "--max-iter", "20",
                                  "--checkpoint-dir", str(tmp_path / "empty"), "--resume"])
    assert r.exit_code == 2 and "no checkpoint to resume from" in r.output, r.output


# ------------------------------------------------------------------ a killed rank


def _torchrun(store: Path, *extra: str) -> list[str]:
    exe = shutil.which("scatac-dist") or str(Path(sys.executable).with_name("scatac-dist"))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", exe,
            "--no-progress", "scale", str(store), "--n-clusters", "3", "--quick", "--max-iter", str(MAX_ITER),
            "--min-reads", "1", "--min-cells", "1", "--seed", "5", "--checkpoint-every", "20", "--resume", "auto",
            *extra]


MAX_ITER = 200
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _rank_pid(parent: int, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(parent).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get("RANK") == str(rank) and env.get("WORLD_SIZE") == "2":
            return child.pid
    return None


def _outputs(store: Path) -> dict:
    a = open_atlas(store)
    return {"X_scale": a.read("obsm/X_scale"), "decoder": a.read("varm/scale_decoder"),
            "kmeans": a.obs["scale_kmeans"].astype(str).to_numpy(), "gmm": a.obs["scale_gmm"].astype(str).to_numpy()}


def test_a_killed_rank_resumes_to_the_uninterrupted_result(stores, tmp_path):
    """2 gloo ranks under torchrun (as a Kubernetes Job or srun starts them), checkpoints every
    20 steps into the store's restart state; rank 1 is SIGKILLed after the first checkpoint.
    The job fails, and the same command run again resumes and ends bit-identical to an
    undisturbed run with the same seed."""
    ref = _copy(stores["a"], tmp_path / "ref" / "s.zarr")
    r = subprocess.run(_torchrun(ref), capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["world_size"] == 2 and out["steps"] == MAX_ITER and out["resumed_from"] == 0
    assert not _restart_state(ref).exists()

    store = _copy(stores["a"], tmp_path / "run" / "s.zarr")
    folder = _restart_state(store) / "scale"
    job = subprocess.Popen(_torchrun(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    killed = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None:
            if step_files(folder):                                  # a checkpoint is written: kill rank 1
                killed = _rank_pid(job.pid, 1)
                if killed:
                    os.kill(killed, signal.SIGKILL)
                    break
            time.sleep(0.01)
        _, err = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert killed, f"rank 1 was never killed (exit {job.returncode}): the test proved nothing\n{err[-3000:]}"
    assert job.returncode != 0                                       # the job failed
    assert "X_scale" not in open_atlas(store).keys("obsm")           # and published nothing
    at = checkpoint_info(folder)["step"]
    print(f"rank 1 killed; the newest checkpoint is step {at} of {MAX_ITER}")
    assert 0 < at < MAX_ITER

    again = subprocess.run(_torchrun(store), capture_output=True, text=True, timeout=600, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    out = json.loads(again.stdout[again.stdout.index("{"):])
    assert out["resumed_from"] == at and out["steps"] == MAX_ITER and out["world_size"] == 2
    assert not _restart_state(store).exists()
    want, got = _outputs(ref), _outputs(store)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)   # bit for bit (NaN rows too)


# ------------------------------------------------------------------ imputation in tiles


def _latents(n, p, rng, used_every=3, peak_every=7):
    mu = rng.normal(size=(n, 10)).astype(np.float32)
    used = np.arange(n) % used_every != 0
    mu[~used] = np.nan
    peaks = np.arange(p) % peak_every != 3
    Wd = rng.normal(size=(int(peaks.sum()), 10)).astype(np.float32)
    bd = rng.normal(size=int(peaks.sum())).astype(np.float32)
    return mu, used, peaks, Wd, bd


def _empty_store(path: Path, n: int, p: int, chunk_rows: int, client) -> Path:
    from scatac_dist.io import ingest

    X = sp.csr_matrix((np.ones(n, np.float32), (np.arange(n), np.arange(n) % p)), shape=(n, p))
    var = pd.DataFrame(index=[f"chr1_{1000 * i}_{1000 * i + 500}" for i in range(p)])
    ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]), var=var).write_h5ad(path.with_suffix(".h5ad"))
    ingest(path.with_suffix(".h5ad"), path, chunk_rows=chunk_rows, client=client, progress=False)
    return path


@pytest.mark.parametrize("task_bytes", [16 * 40 * 10, 16 * 40 * 64, 2**30], ids=["tiny-tiles", "tiles", "one-band"])
def test_tiled_imputation_equals_numpy(tmp_path, client, task_bytes):
    """Tiles of any size give the one-shot ``sigmoid(mu W^T + b)`` bit for bit (and NumPy's
    float64 within float32 rounding), zero outside the used cells and peaks; the binary layer
    follows the paper's rule on it."""
    n, p = 130, 300
    store = _empty_store(tmp_path / "s.zarr", n, p, 40, client)
    rng = np.random.default_rng(0)
    mu, used, peaks, Wd, bd = _latents(n, p, rng)
    peak_mean = rng.uniform(0.2, 0.6, int(peaks.sum()))
    cell_mean = rng.uniform(0.2, 0.6, n)
    write_imputation(open_atlas(store, chunk_rows=40), mu, Wd, bd, used, peaks, peak_mean, cell_mean,
                     task_bytes=task_bytes)
    a = open_atlas(store)
    imp = a.read("layers/scale_impute")
    one_shot = _sigmoid_logits(mu[used], Wd, bd)
    want = np.zeros((n, p), np.float32)
    want[np.ix_(used, peaks)] = one_shot
    np.testing.assert_array_equal(imp, want)
    ref64 = 1 / (1 + np.exp(-(mu[used].astype(np.float64) @ Wd.T.astype(np.float64) + bd)))
    np.testing.assert_allclose(imp[np.ix_(used, peaks)], ref64, rtol=2e-6, atol=1e-7)
    B = a.read("layers/scale_binary").toarray()
    rule = np.zeros((n, p), bool)
    rule[np.ix_(used, peaks)] = binarize_imputed(one_shot, peak_mean, cell_mean[used])
    np.testing.assert_array_equal(B > 0, rule)
    assert 0 < rule.sum() < rule.size


def test_a_tile_equals_the_same_block_of_the_one_shot_product():
    """Tiles of any shape, one row or one column included, equal the same block of the
    one-shot product bit for bit (a BLAS product does not: on some CPUs its values differ
    in the last bit by tile shape)."""
    rng = np.random.default_rng(3)
    z, W, b = (rng.normal(size=s).astype(np.float32) for s in ((200, 10), (500, 10), (500,)))
    full = _sigmoid_logits(z, W, b)
    for r0, r1, c0, c1 in [(5, 6, 0, 500), (0, 200, 7, 8), (9, 10, 3, 4), (17, 190, 100, 499), (0, 64, 0, 7)]:
        np.testing.assert_array_equal(_sigmoid_logits(z[r0:r1], W[c0:c1], b[c0:c1]), full[r0:r1, c0:c1])


@pytest.mark.slow  # 6 GiB decoded, compressed, written and read back: about a minute on 2 cores
def test_imputation_runs_on_workers_with_a_tenth_of_its_size(tmp_path, client):
    """The imputation and binarisation pass on a LocalCluster whose one worker may use 600 MiB,
    for a dense imputed matrix of 32,768 x 49,152 float32 = 6 GiB (10.2x the limit), with
    tasks of 64 MiB. The worker's own peak (about 420 MiB of it is the imported stack, torch
    included) stays under the limit and it is never restarted. The old pass held a band of
    4,096 cells x all peaks (768 MiB, twice) per task: its worker was killed 4 times and the
    pass failed (KilledWorker). Every value is checked against NumPy."""
    import dask
    from distributed import Client, LocalCluster

    n, p, cr, limit = 32_768, 49_152, 4_096, 600 * 2**20
    assert n * p * 4 >= 10 * limit
    store = _empty_store(tmp_path / "big.zarr", n, p, cr, client)
    rng = np.random.default_rng(1)
    # four distinct latents (so the 6 GiB compress on disk), one cell in 8 used, every peak
    patterns = rng.normal(size=(4, 10)).astype(np.float32)
    used = np.arange(n) % 8 == 0
    mu = np.full((n, 10), np.nan, np.float32)
    mu[used] = patterns[(np.arange(n)[used] // 8) % 4]
    peaks = np.ones(p, bool)
    Wd = rng.normal(size=(p, 10)).astype(np.float32)
    bd = rng.normal(size=p).astype(np.float32)
    rows = _sigmoid_logits(patterns, Wd, bd)                          # the 4 distinct imputed rows
    peak_mean = np.quantile(rows, 0.9, axis=0)
    cell_mean = np.full(n, 0.5)
    config = {"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False,
              "distributed.worker.memory.pause": False, "distributed.worker.memory.terminate": 0.95}
    with dask.config.set(config), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit=limit,
                         dashboard_address=":0") as lc, Client(lc) as c:
        def peak_rss():  # this process's own high-water mark (not inherited from its parent)
            return next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM"))

        pid = c.run(os.getpid)
        write_imputation(open_atlas(store, chunk_rows=cr), mu, Wd, bd, used, peaks, peak_mean, cell_mean,
                         task_bytes=64 * 2**20)
        assert c.run(os.getpid) == pid                                # the worker was never killed
        peak = list(c.run(peak_rss).values())[0]
        print(f"worker peak {peak / 2**20:.0f} MiB, limit {limit / 2**20:.0f} MiB, dense {n * p * 4 / 2**30:.1f} GiB")
        assert peak < limit
    import zarr

    arr = zarr.open_group(str(store), mode="r")["layers/scale_impute"]
    assert arr.shape == (n, p)
    which = np.where(used, (np.arange(n) // 8) % 4, -1)
    for a in range(0, n, cr):                                         # every value, a band at a time
        for c0 in range(0, p, 8192):
            block = arr[a:a + cr, c0:c0 + 8192]
            w = which[a:a + cr]
            want = np.where((w >= 0)[:, None], rows[np.maximum(w, 0), c0:c0 + 8192], 0)
            np.testing.assert_array_equal(block, want)
    B = open_atlas(store).read("layers/scale_binary")
    rule = binarize_imputed(rows, peak_mean, np.full(4, 0.5))
    assert B.nnz == sum(rule[k].sum() * np.sum(which == k) for k in range(4))
    for i in np.flatnonzero(used)[::997]:
        np.testing.assert_array_equal(np.flatnonzero(B[i].toarray()[0]), np.flatnonzero(rule[which[i]]))

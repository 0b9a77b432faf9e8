"""Batch runs on a real SLURM: Dask workers as SLURM jobs (`--cluster slurm`), the recipes of
deploy/slurm/ under `sbatch`, and no job left in the queue after a run ends, fails or is
interrupted.

A single-node SLURM (Debian's slurm-wlm + munge) runs on this machine: `make test-slurm` (and
`.ci/run`) start it with tests/slurm/local-slurm.sh and export SLURM_CONF; run directly as root,
the `slurm_conf` fixture starts one of its own. Without root no SLURM can run here, and every
test in this module skips with that reason (printed by `-ra`).
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

import numpy as np
import pytest

from scatac_dist.store import open_atlas

from .conftest import BM0828, REPO

pytestmark = pytest.mark.slurm

BIN = Path(sys.executable).parent
CLI = str(BIN / "scatac-dist")
LOCAL_SLURM = REPO / "tests" / "slurm" / "local-slurm.sh"


def _sinfo_ok(env) -> bool:
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and any(s in r.stdout for s in ("idle", "mix", "alloc"))


@pytest.fixture(scope="session")
def slurm_conf(tmp_path_factory):
    """SLURM_CONF of a running SLURM: the one the environment names, else one started here."""
    if os.environ.get("SLURM_CONF") and _sinfo_ok(os.environ):
        yield os.environ["SLURM_CONF"]
        return
    if os.geteuid() != 0:
        pytest.skip("no SLURM is running (SLURM_CONF unset) and slurmd needs root to start one here; "
                    "run `make test-slurm` as root")
    folder = tmp_path_factory.mktemp("slurm")
    r = subprocess.run([str(LOCAL_SLURM), "start", str(folder)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"local SLURM did not start: {r.stderr}"  # as root this must work
    try:
        yield str(folder / "slurm.conf")
    finally:
        subprocess.run([str(LOCAL_SLURM), "stop", str(folder)], timeout=60)


@pytest.fixture(scope="session")
def env(slurm_conf, tmp_path_factory):
    """The environment of a user on the login node: SLURM_CONF, this venv first on PATH, the
    worker jobs' logs in a temporary folder (not the current one)."""
    return {**os.environ, "SLURM_CONF": slurm_conf, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
            "DASK_SCATAC_DIST__CLUSTER__JOBQUEUE__LOG_DIRECTORY": str(tmp_path_factory.mktemp("job-logs"))}


def _jobs(env, name_prefix: str = "scatacw-") -> list[tuple[str, str, str]]:
    """(id, name, state) of the queue's jobs whose name starts with ``name_prefix``."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%j|%T"], capture_output=True, text=True, env=env).stdout
    rows = [tuple(line.split("|")) for line in out.splitlines() if line.strip()]
    return [r for r in rows if r[1].startswith(name_prefix)]


def _queue_empty_within(env, seconds: float = 20) -> bool:
    """Whether no scatac-dist worker job is queued or running after at most ``seconds``."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not [j for j in _jobs(env) if j[2] in ("PENDING", "RUNNING", "CONFIGURING")]:
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def bm_store(tmp_path_factory, data_dir, env):
    out = tmp_path_factory.mktemp("bm") / "bm.zarr"
    r = subprocess.run([CLI, "--workers", "2", "--no-progress", "ingest", str(BM0828 / "filtered_peak_bc_matrix"),
                        "-o", str(out), "--labels", str(BM0828 / "buenrostro2018_bm0828_labels.tsv")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _copy(store: Path, dst: Path) -> Path:
    shutil.copytree(store, dst)
    return dst


def test_pipeline_on_slurm_worker_jobs_equals_local_run(bm_store, tmp_path, env):
    """`--cluster slurm --jobs 2 run` on bm0828: its workers are SLURM jobs (seen in squeue
    while it runs), and the embedding and clusters equal those of a run on a LocalCluster of
    the same size; the jobs are gone when it ends and the run summary is in the store."""
    local, batch = _copy(bm_store, tmp_path / "local.zarr"), _copy(bm_store, tmp_path / "slurm.zarr")
    r = subprocess.run([CLI, "--workers", "2", "--no-progress", "run", str(local)], capture_output=True, text=True,
                       timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]

    p = subprocess.Popen([CLI, "--cluster", "slurm", "--jobs", "2", "--job-memory", "3GiB", "--no-progress",
                          "run", str(batch)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen: set[str] = set()
    while p.poll() is None:
        seen |= {j[0] for j in _jobs(env) if j[2] == "RUNNING"}
        time.sleep(0.5)
    out, err = p.communicate()
    assert p.returncode == 0, err[-3000:]
    assert len(seen) >= 2, f"no two running worker jobs were seen in squeue: {seen}"
    assert "SLURM: 2 worker jobs submitted" in err and "ssh -N -L 8787:127.0.0.1:8787" in err
    assert _queue_empty_within(env)

    a, b = open_atlas(local), open_atlas(batch)
    np.testing.assert_allclose(np.asarray(b.read("obsm/X_spectral")), np.asarray(a.read("obsm/X_spectral")),
                               rtol=1e-5, atol=1e-6)
    assert (b.obs["leiden"].astype(str).to_numpy() == a.obs["leiden"].astype(str).to_numpy()).all()
    runs = list(b.runs())  # the ingest's run, then this one
    assert len(runs) == 2 and not any(k.startswith("run_") for k in b.provenance())
    summary = b.runs()[runs[-1]]
    assert "--cluster slurm" in summary["command"] and summary["status"] == "done"
    stages = {s["stage"]: s for s in summary["stages"]}
    assert {"qc", "lsi", "spectral", "leiden"} <= set(stages) and all(s["status"] == "done" for s in stages.values())
    assert stages["lsi"]["tasks"] > 0 and len(stages["lsi"]["peak_memory_per_worker"]) == 2
    assert (tmp_path / f"slurm.zarr.run-{runs[-1]}.md").is_file()


def test_interrupted_run_cancels_its_worker_jobs(bm_store, tmp_path, env):
    """SIGTERM (what scancel and a time limit send to the client) or Ctrl-C while the worker jobs
    run: the client exits and no worker job is left in the queue."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        store = _copy(bm_store, tmp_path / f"i{int(sig)}.zarr")
        # (a shell's background job inherits SIGINT ignored; a user's foreground command does not)
        p = subprocess.Popen([CLI, "--cluster", "slurm", "--jobs", "2", "--job-memory", "2GiB", "--no-progress",
                              "run", str(store)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        while time.time() < deadline and len([j for j in _jobs(env) if j[2] == "RUNNING"]) < 2:
            time.sleep(0.3)
        assert len(_jobs(env)) >= 2, "the worker jobs never ran"
        time.sleep(2)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        assert p.returncode != 0, err[-3000:]
        assert _queue_empty_within(env), f"worker jobs left after {sig.name}: {_jobs(env)}\n{err[-2000:]}"


def test_failed_run_cancels_its_worker_jobs(bm_store, tmp_path, env):
    """A run that fails on its workers (a damaged chunk of X) reports the error and leaves no
    worker job in the queue."""
    store = _copy(bm_store, tmp_path / "bad.zarr")
    chunk = sorted((store / "X" / "data").glob("[0-9]*"))[0]
    chunk.write_bytes(b"not a compressed chunk" * 10)
    r = subprocess.run([CLI, "--cluster", "slurm", "--jobs", "2", "--job-memory", "2GiB", "--no-progress", "run",
                        str(store)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode != 0
    assert "cannot be read" in r.stderr
    assert _queue_empty_within(env), _jobs(env)


def test_adaptive_run_scales_and_cleans_up(bm_store, tmp_path, env):
    """`--adapt 1:2`: the run starts with one worker job, finishes, and leaves no job behind."""
    store = _copy(bm_store, tmp_path / "adapt.zarr")
    r = subprocess.run([CLI, "--cluster", "slurm", "--adapt", "1:2", "--job-memory", "2GiB", "--no-progress", "run",
                        str(store), "--n-clusters", "6"], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "adaptive, 1 to 2 worker jobs" in r.stderr
    assert open_atlas(store).obs["kmeans"].nunique() == 6
    assert _queue_empty_within(env)


def test_unknown_partition_is_refused(bm_store, env):
    r = subprocess.run([CLI, "--cluster", "slurm", "--queue", "nosuchpartition", "run", str(bm_store)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2
    assert "partition 'nosuchpartition' does not exist" in r.stderr and "Fix:" in r.stderr
    assert "debug" in r.stderr  # the partitions that do exist are named
    assert _queue_empty_within(env, 5)


def test_worker_jobs_that_cannot_start_time_out_with_the_queue_state(bm_store, env):
    """A job SLURM cannot place (more cores than any node has) waits; the client gives up after
    the configured time with the job's state and reason from squeue, and cancels it."""
    e = {**env, "DASK_SCATAC_DIST__CLUSTER__JOBQUEUE__WORKER_TIMEOUT": "8s"}
    r = subprocess.run([CLI, "--cluster", "slurm", "--jobs", "1", "--job-cores", "512", "run", str(bm_store)],
                       capture_output=True, text=True, timeout=300, env=e)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no SLURM worker job started within 8 s" in r.stderr and "PENDING" in r.stderr and "Fix:" in r.stderr
    assert _queue_empty_within(env), _jobs(env)


def test_worker_jobs_ending_at_their_walltime_are_explained(env, monkeypatch):
    """Worker jobs killed at their walltime while a task still runs: instead of waiting forever
    the run fails, and the error says the walltime ended the jobs and how to fix it."""
    import dask.config
    from distributed.scheduler import NoValidWorkerError, NoWorkerError

    from scatac_dist.cluster import close_client, get_client, job_spec
    from scatac_dist.cluster.jobqueue import ended_jobs_reason

    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])
    monkeypatch.setenv("PATH", env["PATH"])
    with dask.config.set({"scatac-dist.cluster.jobqueue.no-workers-timeout": "5s"}):
        client = get_client(cluster="slurm", jobs=1, walltime="00:01:00", memory="2GiB",
                            log_directory=env["DASK_SCATAC_DIST__CLUSTER__JOBQUEUE__LOG_DIRECTORY"])
    try:
        fut = client.submit(time.sleep, 600, pure=False)
        with pytest.raises((NoWorkerError, NoValidWorkerError)):  # not a wait for a worker that never comes
            fut.result(timeout=400)
        why = ended_jobs_reason(job_spec(client))
    finally:
        close_client(client)
    assert why is not None and "at their walltime (00:01:00;" in why and "TIMEOUT" in why and "--adapt" in why


def test_run_sbatch_recipe(bm_store, tmp_path, env):
    """deploy/slurm/run.sbatch as one batch job: scheduler, `srun dask worker` and the client
    inside one allocation; the pipeline writes X_spectral."""
    store = _copy(bm_store, tmp_path / "job.zarr")
    r = subprocess.run(["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--mem-per-cpu=2G", "--time=00:15:00",
                        f"--output={tmp_path}/run-%j.out", str(REPO / "deploy/slurm/run.sbatch"), str(store)],
                       capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    log = "".join(p.read_text() for p in tmp_path.glob("run-*.out"))
    assert r.returncode == 0, log[-3000:]
    assert "X_spectral" in open_atlas(store).keys("obsm")
    assert "Dask: tcp://" in log and ", 2 workers" in log
    assert list((tmp_path / "").glob("scatac-run-*/reports/*-lsi.html"))


def test_scale_sbatch_two_gloo_ranks_and_resubmission_continues(bm_store, tmp_path, env):
    """deploy/slurm/scale.sbatch with 2 CPU ranks through srun (gloo) writes X_scale; a job
    cancelled after its first checkpoint and submitted again continues from that checkpoint."""
    store = _copy(bm_store, tmp_path / "scale.zarr")
    ckpt = tmp_path / "ckpt"
    e = {**env, "SCATAC_DIST_DEVICE": "cpu", "SCATAC_DIST_CHECKPOINTS": str(ckpt)}
    args = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem-per-cpu=2G",
            "--gpus-per-node=0", "--time=00:15:00", f"--output={tmp_path}/scale-%j.out",
            str(REPO / "deploy/slurm/scale.sbatch"), str(store), "--n-clusters", "6", "--quick", "--min-reads", "1",
            "--max-iter", "300", "--checkpoint-every", "100"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=60, env=e, check=True).stdout.strip()
    deadline = time.time() + 300
    while time.time() < deadline and not list(ckpt.glob("step-*.pt")):
        time.sleep(0.5)
    assert list(ckpt.glob("step-*.pt")), (tmp_path / f"scale-{first}.out").read_text()[-3000:]
    subprocess.run(["scancel", first], env=env, check=True)
    deadline = time.time() + 60
    while time.time() < deadline and subprocess.run(["squeue", "-h", "-j", first], capture_output=True, text=True,
                                                    env=env).stdout.strip():
        time.sleep(0.5)
    second = subprocess.run(["sbatch", "--wait", *args[1:]], capture_output=True, text=True, timeout=900, env=e)
    logs = {p.name: p.read_text() for p in tmp_path.glob("scale-*.out")}
    log2 = next(v for k, v in logs.items() if k != f"scale-{first}.out")
    assert second.returncode == 0, log2[-3000:]
    out = json.loads(log2[log2.index("{"):])
    assert out["world_size"] == 2 and out["resumed_from"] >= 100 and out["steps"] > out["resumed_from"]
    a = open_atlas(store)
    assert "X_scale" in a.keys("obsm") and np.isfinite(np.asarray(a.read("obsm/X_scale"))[a.obs["scale_used"]]).all()

"""The training stack: chunk shards and shuffles, real DDP over 2 gloo processes, and
resuming from a checkpoint. Uses SCALE's module as the model being trained."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scatac_dist.datasets import SynthParams, synthesize
from scatac_dist.errors import InputError
from scatac_dist.models.scale_training import train_rank as _train_rank
from scatac_dist.modules.scale import SCALEModule
from scatac_dist.store import open_atlas
from scatac_dist.train import (
    ShardedStream,
    StoreRows,
    TrainConfig,
    fit,
    latest_checkpoint,
    launch,
    load_checkpoint,
)

P = SynthParams(n_cells=480, n_peaks=600, n_clusters=3, n_lineages=1, signal=0.5, fragments=300, seed=11)


@pytest.fixture(scope="module")
def store(tmp_path_factory, client):
    out = tmp_path_factory.mktemp("train") / "s.zarr"
    synthesize(out, P, chunk_rows=40, client=client, progress=False)
    return out


def test_store_rows_match_the_matrix(store):
    X = open_atlas(store).X.compute().tocsr()
    rng = np.random.default_rng(0)
    cells = rng.random(X.shape[0]) < 0.7
    peaks = np.sort(rng.choice(X.shape[1], 250, replace=False))
    rows = StoreRows(store, cells=cells, peaks=peaks, chunk_rows=40)
    got = sp.vstack([rows.read_chunk(k)[0] for k in range(rows.n_chunks)]).toarray()
    np.testing.assert_array_equal(got, (X[cells][:, peaks].toarray() > 0).astype(np.float32))
    ids = np.concatenate([rows.read_chunk(k)[1] for k in range(rows.n_chunks)])
    np.testing.assert_array_equal(ids, np.flatnonzero(cells))
    # densified on the "device" exactly
    b = next(ShardedStream(rows, batch_size=16).epoch(0))
    np.testing.assert_array_equal(b.to_dense().numpy(), (X[b.cells][:, peaks].toarray() > 0))


def served_without_the_store(rows: StoreRows, reference: StoreRows, folder) -> list[int]:
    """The chunks ``rows`` still returns right once the counts under ``folder`` are gone: the
    ones it serves from memory. (A chunk read from the emptied store comes back wrong or fails.)"""
    import shutil

    for part in ("data", "indices"):
        shutil.rmtree(folder / "X" / part)
    served = []
    for k in range(rows.n_chunks):
        want = reference.read_chunk(k)[0].toarray()
        try:
            got = rows.read_chunk(k)[0].toarray()
        except Exception:  # any failure to read means it was not in memory
            continue
        if want.any() and np.array_equal(got, want):
            served.append(k)
    return served


def test_chunk_cache_is_bounded_and_changes_nothing(store, tmp_path):
    import shutil

    plain = StoreRows(store, chunk_rows=40)
    one = plain.read_chunk(0)[0]
    budget = 3 * (one.data.nbytes + one.indices.nbytes + one.indptr.nbytes + 40 * 8)
    for name in ("cached", "default"):
        shutil.copytree(store, tmp_path / name)
    cached = StoreRows(tmp_path / "cached", chunk_rows=40, cache_bytes=budget)
    default = StoreRows(tmp_path / "default", chunk_rows=40)
    for _ in range(2):  # the second pass is served from the cache where it holds the chunk
        a = list(ShardedStream(plain, batch_size=32, seed=3).epoch(0))
        b = list(ShardedStream(cached, batch_size=32, seed=3).epoch(0))
        np.testing.assert_array_equal(np.concatenate([x.cells for x in a]), np.concatenate([x.cells for x in b]))
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.to_dense().numpy(), y.to_dense().numpy())
        for k in range(default.n_chunks):
            default.read_chunk(k)
    held = served_without_the_store(cached, plain, tmp_path / "cached")
    assert 0 < len(held) < cached.n_chunks                             # some chunks, never all
    sizes = [plain.read_chunk(k) for k in held]
    assert sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes + r.nbytes for m, r in sizes) <= budget
    assert served_without_the_store(default, plain, tmp_path / "default") == []   # off by default


def test_shards_are_disjoint_shuffled_and_resumable(store):
    rows = StoreRows(store, chunk_rows=40)
    streams = [ShardedStream(rows, batch_size=32, rank=r, world=2, seed=3) for r in range(2)]
    seen = [np.concatenate([b.cells for b in s.epoch(0)]) for s in streams]
    assert all(len(np.unique(c)) == len(c) for c in seen)           # no cell twice within a rank
    assert not set(seen[0]) & set(seen[1])                          # disjoint shards
    chunks = [set(np.unique(c // 40)) for c in seen]
    assert not chunks[0] & chunks[1]                                # whole chunks per rank
    assert len(seen[0]) == len(seen[1]) == streams[0].steps_per_epoch * 16
    again = np.concatenate([b.cells for b in streams[0].epoch(0)])
    np.testing.assert_array_equal(again, seen[0])                   # fixed seed: same order
    other = np.concatenate([b.cells for b in streams[0].epoch(1)])
    assert not np.array_equal(other[:50], seen[0][:50])             # a fresh shuffle each epoch
    assert len(np.unique(seen[0][:16] // 40)) > 1                   # rows mixed across chunks
    tail = np.concatenate([b.cells for b in streams[0].epoch(0, start_step=5)])
    np.testing.assert_array_equal(tail, seen[0][5 * 16:])           # resume skips exactly


def _spec(store, tmp, max_iter, **train):
    rows = StoreRows(store, chunk_rows=40)
    torch.manual_seed(0)
    module = SCALEModule(rows.n_peaks, 3, (32,), 4, kl_warmup=10, depth_ref=8.0)  # SCALE's default decoder
    np.savez(tmp / "masks.npz", cells=np.ones(rows.n_obs, bool), peaks=np.ones(rows.n_vars, bool))
    torch.save(module.state_dict(), tmp / "init.pt")
    cfg = TrainConfig(batch_size=32, max_iter=max_iter, lr=2e-3, seed=1, progress=False, **train)
    from dataclasses import asdict

    return {"store": str(store), "mod": None, "chunk_rows": 40, "masks": str(tmp / "masks.npz"),
            "init": str(tmp / "init.pt"), "out": str(tmp / "out.pt"), "module": module.config(),
            "train": asdict(cfg), "every_rank": True}


def test_ddp_two_gloo_processes_agree_and_match_one_process(store, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _train_rank(_spec(store, tmp_path / "one", 120, patience=1000))
    launch(_train_rank, (_spec(store, tmp_path / "two", 120, patience=1000),), 2, threads_per_proc=1)
    r0 = torch.load(tmp_path / "two" / "out.rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "two" / "out.rank1.pt", weights_only=False)
    for k, v in r0["module"].items():  # DDP keeps every rank's parameters identical
        torch.testing.assert_close(v, r1["module"][k], rtol=0, atol=0, msg=k)
    one = torch.load(tmp_path / "one" / "out.rank0.pt", weights_only=False)
    assert r0["summary"]["world_size"] == 2 and one["summary"]["world_size"] == 1
    h1, h2 = one["summary"]["history"], r0["summary"]["history"]
    assert len(h1) == len(h2) == 120 // (480 // 32)
    assert h2[-1] < 0.9 * h2[0]                                    # it learned
    assert abs(h2[-1] - h1[-1]) / h1[-1] < 0.05                    # same loss within 5%


def test_resume_reproduces_the_uninterrupted_run(store, tmp_path):
    for d in ("full", "part"):
        (tmp_path / d).mkdir()
    _train_rank(_spec(store, tmp_path / "full", 50, patience=1000))
    ck = tmp_path / "ck"
    _train_rank(_spec(store, tmp_path / "part", 23, patience=1000, checkpoint_dir=str(ck), checkpoint_every=23))
    state = load_checkpoint(ck)
    assert state["trainer"]["step"] == 23 and state["trainer"]["step_in_epoch"] == 23 - 15
    spec = _spec(store, tmp_path / "part", 50, patience=1000, checkpoint_dir=str(ck), checkpoint_every=0,
                 resume=True)
    _train_rank(spec)
    a = torch.load(tmp_path / "full" / "out.rank0.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "out.rank0.pt", weights_only=False)
    for k, v in a["module"].items():
        torch.testing.assert_close(v, b["module"][k], rtol=0, atol=0, msg=k)
    assert a["summary"]["history"] == b["summary"]["history"]


def test_a_fresh_run_takes_the_checkpoint_folder_over(store, tmp_path):
    """A run without resume into a folder holding an older run's later steps: the old code
    pruned by name, deleted the new run's own checkpoints and left ``latest`` naming a deleted
    file, so a resume continued the *old* run. Now the fresh run removes the old steps first."""
    ck = tmp_path / "ck"
    for d in ("old", "new", "more"):
        (tmp_path / d).mkdir()
    _train_rank(_spec(store, tmp_path / "old", 40, patience=1000, checkpoint_dir=str(ck), checkpoint_every=20))
    shutil.copy(ck / "step-000000040.pt", ck / "step-000000200.pt")   # and a later step of that run
    _train_rank(_spec(store, tmp_path / "new", 10, patience=1000, checkpoint_dir=str(ck), checkpoint_every=5))
    assert sorted(p.name for p in ck.glob("step-*.pt")) == ["step-000000005.pt", "step-000000010.pt"]
    assert latest_checkpoint(ck) == ck / "step-000000010.pt" and (ck / "latest").read_text().strip() == \
        "step-000000010.pt"
    new = torch.load(tmp_path / "new" / "out.rank0.pt", weights_only=False)["module"]
    for k, v in load_checkpoint(ck)["module"].items():                  # the new run's state
        torch.testing.assert_close(v, new[k], rtol=0, atol=0, msg=k)
    _train_rank(_spec(store, tmp_path / "more", 15, patience=1000, checkpoint_dir=str(ck), checkpoint_every=5,
                      resume=True))
    summary = torch.load(tmp_path / "more" / "out.rank0.pt", weights_only=False)["summary"]
    assert summary["start_step"] == 10 and summary["steps"] == 15


def test_a_checkpoint_of_other_parameters_is_refused_by_the_trainer(store, tmp_path):
    ck = tmp_path / "ck"
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    _train_rank(_spec(store, tmp_path / "a", 5, checkpoint_dir=str(ck), checkpoint_every=5, fingerprint={"seed": 1}))
    assert load_checkpoint(ck)["fingerprint"] == {"seed": 1}
    with pytest.raises(InputError, match="other data or other parameters"):
        _train_rank(_spec(store, tmp_path / "b", 10, checkpoint_dir=str(ck), checkpoint_every=5, resume=True,
                          fingerprint={"seed": 2}))


def test_early_stopping_and_max_iter(store):
    rows = StoreRows(store, chunk_rows=40)
    torch.manual_seed(0)
    m = SCALEModule(rows.n_peaks, 3, (16,), 4)
    stream = ShardedStream(rows, batch_size=32)
    out = fit(m, stream, TrainConfig(max_iter=10_000, lr=0.0, weight_decay=0.0, patience=3, progress=False))
    # lr 0: the loss only wanders with the noise, so it stops 3 epochs after its best one
    h = out["history"]
    assert out["stopped_early"] and out["epochs"] == len(h) < 100
    assert len(h) == int(np.argmin(h)) + 1 + 3 and out["steps"] == len(h) * stream.steps_per_epoch
    floor = 2 * out["steps"]  # no early stop before min_iter steps, then at the next qualifying epoch end
    out = fit(m, stream, TrainConfig(max_iter=10_000, lr=0.0, weight_decay=0.0, patience=3, min_iter=floor,
                                     progress=False))
    assert out["stopped_early"] and floor <= out["steps"] < floor + 100 * stream.steps_per_epoch
    out = fit(m, stream, TrainConfig(max_iter=7, progress=False))
    assert out["steps"] == 7 and not out["stopped_early"]


def test_resume_judges_the_stop_by_the_new_rule(store, tmp_path):
    """A run that stopped early stays stopped when resumed with the same rule, and trains on
    when resumed with a later ``min_iter`` (a longer budget must not inherit the old stop)."""
    rows = StoreRows(store, chunk_rows=40)
    torch.manual_seed(0)
    m = SCALEModule(rows.n_peaks, 3, (16,), 4)
    stream = ShardedStream(rows, batch_size=32)
    rule = dict(lr=0.0, weight_decay=0.0, patience=3, checkpoint_dir=str(tmp_path), checkpoint_every=10 ** 9,
                progress=False)
    first = fit(m, stream, TrainConfig(max_iter=10_000, **rule))
    assert first["stopped_early"]
    again = fit(m, stream, TrainConfig(max_iter=10_000, resume=True, **rule))
    assert again["stopped_early"] and again["steps"] == first["steps"]
    later = first["steps"] + 2 * stream.steps_per_epoch
    more = fit(m, stream, TrainConfig(max_iter=later, min_iter=later, resume=True, **rule))
    assert more["steps"] == later > first["steps"]                  # it trained on


def test_rank_from_torchrun_and_slurm_variables():
    from scatac_dist.train import DistEnv

    tr = DistEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2",
                               "MASTER_PORT": "29511"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port, tr.source) == \
        (3, 4, 1, "10.0.0.2", 29511, "torchrun")
    sl = DistEnv.from_environ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                               "MASTER_ADDR": "node7"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.master_addr, sl.source) == (5, 8, 1, "node7", "slurm")
    assert not DistEnv.from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).distributed
    assert not DistEnv.from_environ({}).distributed


def test_cli_under_torchrun(store, tmp_path):
    """The same `scatac-dist scale` command, started as 2 ranks by torchrun (as a Kubernetes Job
    or `srun` would start it): rank 0 writes the outputs, trained over both ranks."""
    import shutil
    import subprocess
    import sys

    dst = tmp_path / "t.zarr"
    shutil.copytree(store, dst)
    exe = shutil.which("scatac-dist") or str(Path(sys.executable).with_name("scatac-dist"))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        exe, "--no-progress", "scale", str(dst), "--n-clusters", "3", "--quick", "--max-iter", "30",
                        "--min-reads", "1"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["world_size"] == 2 and out["steps"] == 30
    a = open_atlas(dst)
    assert "X_scale" in a.keys("obsm") and a.obs["scale_kmeans"].notna().sum() == a.obs["scale_used"].sum()


def _report_env(path):
    Path(path).write_text(json.dumps({"omp": os.environ.get("OMP_NUM_THREADS"),
                                      "malloc": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
                                      "threads": torch.get_num_threads()}))


def test_launched_ranks_do_not_inherit_dask_worker_settings(client, tmp_path, monkeypatch):
    """A LocalCluster leaves its workers' OMP_NUM_THREADS=1 and MALLOC_TRIM_THRESHOLD_ in the
    parent's environment; training processes launched after it must not get them (they halved
    SCALE's throughput). A value the user set differently is left alone."""
    import dask

    want = dask.config.get("distributed.nanny.pre-spawn-environ")
    for k, v in want.items():  # what the running LocalCluster's nanny does to this process
        monkeypatch.setenv(k, str(v))
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")  # the user's own choice
    launch(_report_env, (str(tmp_path / "env.json"),), 1, threads_per_proc=2)
    got = json.loads((tmp_path / "env.json").read_text())
    assert got == {"omp": None, "malloc": None, "threads": 2}
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == str(want["MALLOC_TRIM_THRESHOLD_"])  # restored here
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3"

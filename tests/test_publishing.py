"""Stage-atomic publishing, the store lock, and resume that checks outputs (issue 23).

Readers are the ecosystem's own: ``anndata.read_zarr`` (through consolidated metadata, as
users read a store), ``mudata.read_zarr`` and ``zarr.open_consolidated``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from click.testing import CliRunner

from scatac_dist.cli import main
from scatac_dist.datasets import SynthParams, synthesize
from scatac_dist.lock import StoreLockedError, holds_lock, lock_path, store_lock
from scatac_dist.pipeline import STAGES, Stage, run_stages
from scatac_dist.store import open_atlas

from .conftest import leftovers


@pytest.fixture
def store(tmp_path, client):
    out = tmp_path / "s.zarr"
    synthesize(out, SynthParams(n_cells=600, n_peaks=800, n_clusters=3, n_lineages=1, seed=5),
               chunk_rows=200, client=client, progress=False)
    return out


def _consolidated_keys(path) -> set[str]:
    root = zarr.open_consolidated(str(path))
    return {k for k, _ in root.members(max_depth=None)}


def test_a_stage_appears_all_at_once(store):
    atlas = open_atlas(store)
    emb = np.arange(atlas.n_obs * 2, dtype=np.float32).reshape(-1, 2)
    with atlas.publishing("demo") as pub:
        atlas.write_obsm("X_a", emb)
        atlas.write_obs({"c": np.arange(atlas.n_obs)})
        assert "c" in atlas.obs  # the stage reads its own pending writes
        atlas.record("demo", {"p": 1}, {"total": 0.0})
        # meanwhile every reader sees the store as it was, consolidated metadata included
        seen = ad.read_zarr(store)
        assert "X_a" not in seen.obsm and "c" not in seen.obs and "demo" not in seen.uns.get("scatac_dist", {})
        assert "obsm/X_a" not in _consolidated_keys(store)
        assert "demo" not in open_atlas(store).provenance()
        assert pub.work.exists()
    seen = ad.read_zarr(store)
    np.testing.assert_array_equal(seen.obsm["X_a"], emb)
    assert (seen.obs["c"] == np.arange(atlas.n_obs)).all() and "celltype" in seen.obs
    assert "obsm/X_a" in _consolidated_keys(store)
    assert atlas.provenance()["demo"]["outputs"] == ["obsm/X_a", "obs:c"]
    assert leftovers(store.parent, {store.name}) == []


def test_a_failed_stage_changes_nothing(store):
    atlas = open_atlas(store)
    before = sorted(str(p.relative_to(store)) for p in store.rglob("*"))
    with pytest.raises(RuntimeError, match="boom"):
        with atlas.publishing("demo"):
            atlas.write_obsm("X_a", np.zeros((atlas.n_obs, 2), np.float32))
            atlas.write_var({"v": np.ones(atlas.n_vars)})
            raise RuntimeError("boom")
    assert sorted(str(p.relative_to(store)) for p in store.rglob("*")) == before
    assert "X_a" not in ad.read_zarr(store).obsm
    assert leftovers(store.parent, {store.name}) == []


def test_mudata_modality_publishes_atomically(tmp_path):
    import mudata

    rng = np.random.default_rng(0)
    mods = {m: ad.AnnData(sp.csr_matrix(rng.poisson(0.3, (50, 30)).astype(np.uint8))) for m in ("rna", "atac")}
    mudata.set_options(pull_on_update=False)
    md = mudata.MuData(mods)
    path = tmp_path / "m.zarr"
    md.write_zarr(str(path))
    atlas = open_atlas(path)
    assert atlas.mod == "atac"
    with atlas.publishing("demo"):
        atlas.write_obsm("X_e", np.ones((50, 3), np.float32))
        assert "X_e" not in mudata.read_zarr(str(path))["atac"].obsm
    np.testing.assert_array_equal(mudata.read_zarr(str(path))["atac"].obsm["X_e"], np.ones((50, 3)))


def test_leftovers_of_a_killed_writer_are_cleaned(store):
    for kind in ("publish", "staging", "layer"):
        (store.parent / f".{store.name}.{kind}-deadbeef").mkdir()
    open_atlas(store).write_uns("note", "x")
    assert leftovers(store.parent, {store.name}) == []


# -- the lock ---------------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time
    from scatac_dist.lock import store_lock
    with store_lock(sys.argv[1], command="holder-test"):
        print("held", flush=True)
        sys.stdin.read()
""")


def test_a_second_writer_is_refused_with_the_holder_named(store):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(store)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=rf"process {holder.pid} on {socket.gethostname()}.*holder-test"):
            open_atlas(store).write_uns("note", "x")
        r = CliRunner().invoke(main, ["run", str(store)])
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and str(holder.pid) in lines[0]
        assert "note" not in ad.read_zarr(store).uns
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not lock_path(store).exists()  # the holder removed it when done
    open_atlas(store).write_uns("note", "x")  # and now the store is free


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_stale_lock_of_a_dead_process_is_taken_over(store, caplog):
    lock_path(store).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(),
                                            "started": "2026-01-01T00:00:00", "command": "killed run"}))
    with caplog.at_level(logging.WARNING, logger="scatac_dist"):
        open_atlas(store).write_uns("note", "x")
    assert "stale lock" in caplog.text and "killed run" in caplog.text
    assert ad.read_zarr(store).uns["note"] == "x"
    assert not lock_path(store).exists()


def test_a_lock_from_another_host_is_refused_with_the_fix(store):
    lock_path(store).write_text(json.dumps({"host": "node-17", "pid": 4242, "started": "t", "command": "run"}))
    with pytest.raises(StoreLockedError, match=r"node-17.*delete .*\.s\.zarr\.lock"):
        open_atlas(store).write_uns("note", "x")
    assert lock_path(store).exists()  # never removed behind another host's back


def test_the_lock_is_reentrant_and_inherited_by_child_processes(store):
    probe = [sys.executable, "-c", f"from scatac_dist.lock import holds_lock; print(holds_lock({str(store)!r}))"]
    assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "False"
    with store_lock(store):
        with store_lock(store):  # re-entrant: a publication inside a command's lock
            open_atlas(store).write_uns("note", "x")
        assert holds_lock(store)
        assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "True"
    assert not holds_lock(store) and not lock_path(store).exists()


# -- resume checks outputs, not only parameters -------------------------------------------

def test_resume_reruns_a_stage_whose_outputs_are_gone(store, client):
    stages = [Stage("qc", STAGES["qc"]), Stage("filter_cells", STAGES["filter_cells"], {"min_peaks": 1}),
              Stage("select_features", STAGES["select_features"], {"n_features": 400}),
              Stage("tfidf", STAGES["tfidf"]), Stage("lsi", STAGES["lsi"], {"n_comps": 8})]
    atlas = open_atlas(store)
    first = run_stages(atlas, stages, client=client, progress=False)
    assert not any(r["skipped"] for r in first.values())
    lsi = atlas.read("obsm/X_lsi")
    prov = atlas.provenance()["pipeline_lsi"]
    assert set(prov["outputs"]) >= {"obsm/X_lsi", "varm/lsi_loadings"}
    assert all(r["skipped"] for r in run_stages(atlas, stages, client=client, progress=False).values())

    shutil.rmtree(store / "obsm" / "X_lsi")  # someone removed a result by hand
    zarr.consolidate_metadata(str(store))
    again = run_stages(atlas, stages, client=client, progress=False)
    assert [n for n, r in again.items() if not r["skipped"]] == ["lsi"]
    np.testing.assert_array_equal(atlas.read("obsm/X_lsi"), lsi)

    # a store whose records predate the output lists: the stage runs again
    rec = dict(atlas.provenance()["pipeline_tfidf"])
    del rec["outputs"]
    atlas.write_uns("scatac_dist/pipeline_tfidf", json.dumps(rec))
    again = run_stages(atlas, stages, client=client, progress=False)
    assert [n for n, r in again.items() if not r["skipped"]] == ["tfidf", "lsi"]


def test_no_working_copy_outlives_its_publication(store):
    atlas = open_atlas(store)
    with atlas.publishing("demo") as pub:
        atlas.write_obsm("X_a", np.zeros((atlas.n_obs, 2), np.float32))
        # the copy shares the counts' chunk files with the store (hard links), it does not copy them
        chunk = next(p for p in (store / "X" / "data").rglob("*")
                     if p.is_file() and p.name != "zarr.json" and not p.name.startswith("."))
        twin = pub.work / chunk.relative_to(store)
        assert os.stat(chunk).st_ino == os.stat(twin).st_ino
        work = pub.work
    assert not work.exists()

"""The command line: synth, info, demo (with resume), on the test cluster."""

from __future__ import annotations

import json

import anndata as ad
from click.testing import CliRunner

from scatac_dist.cli import main


def test_synth_and_info(cluster, tmp_path):
    out = tmp_path / "s.zarr"
    r = CliRunner().invoke(main, ["--scheduler", cluster.scheduler_address, "--no-progress", "synth", "-o",
                                  str(out), "--cells", "1500", "--peaks", "900", "--clusters", "3",
                                  "--chunk-rows", "400"])
    assert r.exit_code == 0, r.output
    assert ad.read_zarr(out).shape == (1500, 900)
    r = CliRunner().invoke(main, ["info", str(out)])
    assert r.exit_code == 0
    assert "X: 1500 cells x 900 features" in r.output and "1 row chunk of 10000 cells" in r.output
    assert "obs: celltype, lineage" in r.output and "stage synth" in r.output
    r = CliRunner().invoke(main, ["info", "--json", str(out)])
    assert json.loads(r.output)["synth"]["params"]["params"]["n_cells"] == 1500
    r = CliRunner().invoke(main, ["info", str(tmp_path / "nope.zarr")])
    assert r.exit_code == 2 and "no atlas store" in r.output


def test_demo_runs_and_resumes(cluster, tmp_path):
    args = ["--scheduler", cluster.scheduler_address, "--no-progress", "demo", "--outdir", str(tmp_path / "d"),
            "--cells", "2000", "--peaks", "1200", "--chunk-rows", "500"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    for name in ("atlas.zarr", "qc.png", "dask-report.html"):
        assert (tmp_path / "d" / name).exists(), name
        assert str(tmp_path / "d" / name) in r.output
    assert (tmp_path / "d" / "qc.png").read_bytes()[:4] == b"\x89PNG"
    obs = ad.read_zarr(tmp_path / "d" / "atlas.zarr").obs
    assert {"celltype", "total_counts", "n_peaks_by_counts"} <= set(obs.columns)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "reusing it" in r.output and '"qc": {"skipped": true' in r.output


def test_run_evaluate_plot(cluster, tmp_path):
    """`run` fills the pipeline's slots and resumes; `evaluate` and `plot` read them."""
    from scatac_dist.store import open_atlas

    store = tmp_path / "s.zarr"
    base = ["--scheduler", cluster.scheduler_address, "--no-progress"]
    r = CliRunner().invoke(main, [*base, "synth", "-o", str(store), "--cells", "900", "--peaks", "1500",
                                  "--clusters", "3", "--signal", "0.4", "--chunk-rows", "300"])
    assert r.exit_code == 0, r.output
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lsi: {n_comps: 12}\nspectral: {n_comps: 12}\n")
    r = CliRunner().invoke(main, [*base, "run", str(store), "--n-clusters", "3", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    atlas = open_atlas(store)
    assert {"X_lsi", "X_spectral", "X_umap"} <= set(atlas.keys("obsm"))
    assert {"connectivities", "distances"} <= set(atlas.keys("obsp"))
    assert {"leiden", "kmeans", "pass_qc"} <= set(atlas.obs.columns)
    assert atlas.provenance()["lsi"]["params"]["n_comps"] == 12
    r = CliRunner().invoke(main, [*base, "run", str(store), "--n-clusters", "3", "--config", str(cfg)])
    assert r.exit_code == 0 and r.output.count('"skipped": true') == 10

    r = CliRunner().invoke(main, ["evaluate", str(store), "--truth", "celltype", "--pred", "kmeans"])
    assert r.exit_code == 0, r.output
    scores = json.loads(r.output)
    assert scores["n_pred_clusters"] == 3 and scores["ari"] > 0.5
    r = CliRunner().invoke(main, ["plot", str(store), "--color", "celltype", "-o", str(tmp_path / "u.png")])
    assert r.exit_code == 0 and (tmp_path / "u.png").read_bytes()[:4] == b"\x89PNG"

    # bad input: unknown stage, K too large, unknown column
    cfg.write_text("lda: {n: 3}\n")
    r = CliRunner().invoke(main, [*base, "run", str(store), "--config", str(cfg)])
    assert r.exit_code != 0 and "unknown stage" in r.output
    r = CliRunner().invoke(main, [*base, "run", str(store), "--n-clusters", "5000"])
    assert r.exit_code != 0 and "between 1 and the 900 cells" in r.output
    r = CliRunner().invoke(main, ["evaluate", str(store), "--truth", "nope", "--pred", "kmeans"])
    assert r.exit_code != 0 and "no obs column 'nope'" in r.output
    # an unknown TF-IDF name or parameter fails before any stage runs, naming the valid ones
    before = open_atlas(store).provenance()["pipeline_qc"]["finished_at"]
    cfg.write_text("tfidf: {method: tfidf9}\n")
    r = CliRunner().invoke(main, [*base, "run", str(store), "--config", str(cfg), "--force"])
    assert r.exit_code != 0 and "unknown TF-IDF method 'tfidf9'" in r.output and "archr3" in r.output
    cfg.write_text("lsi: {n_comp: 12}\n")
    r = CliRunner().invoke(main, [*base, "run", str(store), "--config", str(cfg), "--force"])
    assert r.exit_code != 0 and "no parameter(s) ['n_comp']" in r.output and "n_comps" in r.output
    assert open_atlas(store).provenance()["pipeline_qc"]["finished_at"] == before


def test_run_refuses_a_store_without_counts(cluster, tmp_path):
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    store = tmp_path / "empty.zarr"
    var = pd.DataFrame({"chr": ["chr1"] * 4, "start": [0, 600, 1200, 1800], "end": [500, 1100, 1700, 2300]},
                       index=[f"chr1:{a}-{a + 500}" for a in (0, 600, 1200, 1800)])
    ad.AnnData(sp.csr_matrix((3, 4), dtype=np.uint8), obs=pd.DataFrame(index=["a", "b", "c"]), var=var).write_zarr(store)
    r = CliRunner().invoke(main, ["--scheduler", cluster.scheduler_address, "--no-progress", "run", str(store)])
    assert r.exit_code != 0 and "holds no counts (nnz = 0)" in r.output

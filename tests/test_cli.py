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

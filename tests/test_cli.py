"""The command line on the test cluster: each command's outputs (slots, shapes, printed JSON),
the one error format, option defaults read from the models, and the progress policy."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from scatac_dist.cli import main
from scatac_dist.cli.context import show_progress
from scatac_dist.cli.defaults import DefaultFrom, default_of
from scatac_dist.datasets import SynthParams
from scatac_dist.store import open_atlas


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def on(cluster, *args, progress="--no-progress"):
    """Run on the test cluster (``progress=None``: no progress option, the default policy)."""
    return invoke("--scheduler", cluster.scheduler_address, *([progress] if progress else []), *args)


def check_error(r, *phrases):
    """One ``error:`` line naming the problem (and the fix), exit status 2, nothing on stdout."""
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert r.stdout == ""
    for p in phrases:
        assert p in errors[0], errors[0]
    return errors[0]


def first_json(text: str):
    """The JSON document at the start of ``text`` (what follows it is ignored)."""
    return json.JSONDecoder().raw_decode(text)[0]


@pytest.fixture(scope="module")
def small_store(cluster, tmp_path_factory):
    """400 synthetic cells x 600 peaks in 3 types, made by ``synth``; copy it before writing."""
    out = tmp_path_factory.mktemp("small") / "s.zarr"
    r = on(cluster, "synth", "-o", out, "--cells", 400, "--peaks", 600, "--clusters", 3, "--signal", 0.4,
           "--chunk-rows", 200)
    assert r.exit_code == 0, r.output
    return out


def copy(store, tmp_path):
    return shutil.copytree(store, tmp_path / store.name)


# -- making and describing stores --------------------------------------------------------------

def test_synth_and_info(cluster, tmp_path):
    out = tmp_path / "s.zarr"
    r = on(cluster, "synth", "-o", out, "--cells", 1500, "--peaks", 900, "--clusters", 3, "--chunk-rows", 400,
           progress="--progress")
    assert r.exit_code == 0, r.output
    # bars (forced on) went to stderr; stdout holds only the result
    assert r.stdout.startswith(f"wrote {out}\n") and "100%|" in r.stderr and "%|" not in r.stdout
    a = ad.read_zarr(out)
    assert a.shape == (1500, 900) and sp.issparse(a.X) and a.X.nnz > 0
    assert np.issubdtype(a.X.dtype, np.integer)
    assert sorted(a.obs["celltype"].unique()) == ["type0", "type1", "type2"]
    assert {"chr", "start", "end"} <= set(a.var.columns)

    r = invoke("info", out)
    assert r.exit_code == 0, r.output
    assert f"X: 1500 cells x 900 features, nnz {a.X.nnz}" in r.output and "1 row chunk of 10000 cells" in r.output
    assert "obs: celltype, lineage" in r.output and "stage synth" in r.output
    r = invoke("info", "--json", out)
    prov = json.loads(r.stdout)
    assert set(prov) == {"synth"}
    params = prov["synth"]["params"]["params"]
    assert (params["n_cells"], params["n_peaks"], params["n_clusters"]) == (1500, 900, 3)
    # an option left out takes SynthParams' default
    assert params["fragments"] == default_of(SynthParams, "fragments")

    missing = tmp_path / "nope.zarr"
    check_error(invoke("info", missing), str(missing), "no atlas store", "Fix: create one")


def test_ingest_h5ad(cluster, tmp_path):
    rng = np.random.default_rng(0)
    X = sp.random(60, 40, density=0.2, format="csr", random_state=rng, dtype=np.float32)
    X.data = rng.integers(1, 6, X.nnz).astype(np.float32)
    var = pd.DataFrame({"chr": "chr1", "start": np.arange(40) * 1000, "end": np.arange(40) * 1000 + 500})
    var.index = [f"chr1:{s}-{e}" for s, e in zip(var["start"], var["end"], strict=True)]
    obs = pd.DataFrame({"celltype": rng.choice(["a", "b"], 60)}, index=[f"cell{i}" for i in range(60)])
    src = tmp_path / "in.h5ad"
    ad.AnnData(X, obs=obs, var=var).write_h5ad(src)

    out = tmp_path / "out.zarr"
    r = on(cluster, "ingest", src, "-o", out, "--chunk-rows", 25)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"wrote {out}\n") and "X: 60 cells x 40 features" in r.stdout
    got = ad.read_zarr(out)
    assert (sp.csr_matrix(got.X) != X).nnz == 0 and np.issubdtype(got.X.dtype, np.integer)
    assert list(got.obs_names) == list(obs.index) and list(got.obs["celltype"]) == list(obs["celltype"])
    assert list(got.var["start"]) == list(var["start"])
    assert "ingest" in json.loads(invoke("info", "--json", out).stdout)

    bad = tmp_path / "bad.h5ad"
    bad.write_text("not an HDF5 file")
    check_error(on(cluster, "ingest", bad, "-o", tmp_path / "bad.zarr"), str(bad), "Fix:")
    assert not (tmp_path / "bad.zarr").exists()


def test_demo_runs_and_resumes(cluster, tmp_path):
    """``demo`` is scatac_dist.demo.run_demo on the session's cluster, with its defaults."""
    from sklearn.metrics import adjusted_rand_score

    from scatac_dist.demo import DEMO_ATLAS

    d = tmp_path / "d"
    args = ["demo", "--outdir", d, "--cells", 400, "--peaks", 600, "--clusters", 3, "--chunk-rows", 200]
    r = on(cluster, *args)
    assert r.exit_code == 0, r.output
    for name in ("atlas.zarr", "qc.png", "umap_celltype.png", "umap_leiden.png", "umap_sccase.png", "scores.json",
                 "summary.md", "dask-report.html"):
        assert (d / name).exists(), name
        assert str(d / name) in r.stdout, name
    for png in d.glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG", png
    assert b"<html" in (d / "dask-report.html").read_bytes()[:2000].lower()
    a = ad.read_zarr(d / "atlas.zarr")
    assert a.shape == (400, 600)
    X = sp.csr_matrix(a.X)
    np.testing.assert_array_equal(a.obs["total_counts"], np.asarray(X.sum(1)).ravel())
    np.testing.assert_array_equal(a.obs["n_peaks_by_counts"], np.diff(X.indptr))
    assert a.obs["celltype"].nunique() == 3 and a.obs["kmeans"].nunique() == 3
    assert {"X_spectral", "X_umap", "X_sccase_pca"} <= set(a.obsm)
    prov = open_atlas(d / "atlas.zarr").provenance()
    # options left out take the demo's own atlas parameters
    assert prov["synth"]["params"]["params"]["fragments"] == DEMO_ATLAS.fragments
    scores = json.loads((d / "scores.json").read_text())
    km = next(s for s in scores.values() if s["key"] == "kmeans")
    truth = a.obs["celltype"].astype(str).to_numpy()
    assert km["ari"] == pytest.approx(adjusted_rand_score(truth, a.obs["kmeans"].astype(str).to_numpy()), abs=1e-12)

    r = on(cluster, *args)
    assert r.exit_code == 0, r.output
    assert "reusing it" in r.stdout and '"qc": {"skipped": true' in r.stdout


# -- the pipeline and what reads it --------------------------------------------------------------

def test_run_evaluate_plot(cluster, tmp_path):
    """`run` fills the pipeline's slots and resumes; `evaluate` and `plot` read them."""
    from sklearn.metrics import adjusted_rand_score

    store = tmp_path / "s.zarr"
    r = on(cluster, "synth", "-o", store, "--cells", 900, "--peaks", 1500, "--clusters", 3, "--signal", 0.4,
           "--chunk-rows", 300)
    assert r.exit_code == 0, r.output
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lsi: {n_comps: 12}\nspectral: {n_comps: 12}\n")
    r = on(cluster, "run", store, "--n-clusters", 3, "--config", cfg, progress="--progress")
    assert r.exit_code == 0, r.output
    # the QC stage's bar (scatac_dist.progress) goes to stderr; stdout holds only the result
    report = first_json(r.stdout)
    assert "qc: 100%" in r.stderr and "%|" not in r.stdout
    stages = ["qc", "filter_cells", "select_features", "tfidf", "lsi", "spectral", "neighbors", "leiden",
              "kmeans", "umap"]
    assert list(report) == stages and not any(v["skipped"] for v in report.values())
    atlas = open_atlas(store)
    obs = atlas.obs
    lsi = atlas.read("obsm/X_lsi")  # 12 components, less those dropped for correlating with depth
    assert lsi.shape[0] == 900 and 10 <= lsi.shape[1] <= 12
    spectral = atlas.read("obsm/X_spectral")
    assert spectral.shape == (900, 12) and np.isfinite(spectral[obs["pass_qc"].to_numpy()]).all()
    assert atlas.read("obsm/X_umap").shape == (900, 2)
    conn = atlas.read("obsp/connectivities")
    assert conn.shape == (900, 900) and conn.nnz > 0
    assert {"distances"} <= set(atlas.keys("obsp"))
    assert obs["leiden"].notna().all() and obs["leiden"].nunique() >= 2
    assert obs["kmeans"].nunique() == 3
    assert atlas.provenance()["lsi"]["params"]["n_comps"] == 12

    # info --json holds every stage with its parameters
    prov = json.loads(invoke("info", "--json", store).stdout)
    assert {f"pipeline_{s}" for s in stages} <= set(prov)
    assert prov["pipeline_lsi"]["params"] == {"n_comps": 12}

    # resumes; no progress option and stderr not a terminal: no bars
    r = on(cluster, "run", store, "--n-clusters", 3, "--config", cfg, progress=None)
    assert r.exit_code == 0, r.output
    assert all(v["skipped"] for v in first_json(r.stdout).values()) and len(first_json(r.stdout)) == 10
    assert "qc: " not in r.stderr and "%|" not in r.output

    r = invoke("evaluate", store, "--truth", "celltype", "--pred", "kmeans")
    assert r.exit_code == 0, r.output
    scores = json.loads(r.stdout)
    truth, pred = obs["celltype"].astype(str).to_numpy(), obs["kmeans"].astype(str).to_numpy()
    assert scores["ari"] == pytest.approx(adjusted_rand_score(truth, pred), abs=1e-12)
    assert scores["n_pred_clusters"] == 3 and scores["n_cells"] == 900 and scores["ari"] > 0.5
    r = invoke("evaluate", store, "--truth", "celltype", "--pred", "leiden", "--drop", "type0")
    keep = truth != "type0"
    dropped = json.loads(r.stdout)
    assert dropped["n_cells"] == keep.sum() and dropped["n_truth_labels"] == 2
    assert dropped["ari"] == pytest.approx(
        adjusted_rand_score(truth[keep], obs["leiden"].astype(str).to_numpy()[keep]), abs=1e-12)

    png = tmp_path / "u.png"
    r = invoke("plot", store, "--color", "celltype", "-o", png)
    assert r.exit_code == 0 and r.stdout == f"wrote {png}\n" and png.read_bytes()[:4] == b"\x89PNG"

    # bad input: unknown stage, K too large, unknown column
    cfg.write_text("lda: {n: 3}\n")
    r = on(cluster, "run", store, "--config", cfg)
    assert r.exit_code == 2 and "unknown stage" in r.output
    r = on(cluster, "run", store, "--n-clusters", 5000)
    assert r.exit_code == 2 and "more than its 900 cells" in r.output
    check_error(invoke("evaluate", store, "--truth", "nope", "--pred", "kmeans"),
                str(store), "no obs column 'nope'", "Fix: use one of: celltype")
    # an unknown TF-IDF name or parameter fails before any stage runs, naming the valid ones
    before = open_atlas(store).provenance()["pipeline_qc"]["finished_at"]
    cfg.write_text("tfidf: {method: tfidf9}\n")
    r = on(cluster, "run", store, "--config", cfg, "--force")
    assert r.exit_code == 2 and "unknown TF-IDF method 'tfidf9'" in r.output and "archr3" in r.output
    cfg.write_text("lsi: {n_comp: 12}\n")
    r = on(cluster, "run", store, "--config", cfg, "--force")
    assert r.exit_code == 2 and "no parameter(s) ['n_comp']" in r.output and "n_comps" in r.output
    assert open_atlas(store).provenance()["pipeline_qc"]["finished_at"] == before


def test_run_refuses_a_store_without_counts(cluster, tmp_path):
    store = tmp_path / "empty.zarr"
    var = pd.DataFrame({"chr": ["chr1"] * 4, "start": [0, 600, 1200, 1800], "end": [500, 1100, 1700, 2300]},
                       index=[f"chr1:{a}-{a + 500}" for a in (0, 600, 1200, 1800)])
    ad.AnnData(sp.csr_matrix((3, 4), dtype=np.uint8), obs=pd.DataFrame(index=["a", "b", "c"]), var=var).write_zarr(store)
    check_error(on(cluster, "run", store), str(store), "holds no counts (nnz = 0)", "Fix: ingest a non-empty matrix")
    assert open_atlas(store).provenance() == {}


# -- the models' commands ----------------------------------------------------------------------

def test_scale_follows_the_models_defaults(cluster, small_store, tmp_path):
    from scatac_dist.models import SCALE

    store = copy(small_store, tmp_path)
    r = on(cluster, "scale", store, "--n-clusters", 3, "--max-iter", 10, "--min-iter", 0, "--min-cells", 1,
           "--min-reads", 1, "--model-out", tmp_path / "model")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["n_clusters"] == 3 and out["steps"] == 10 and out["world_size"] == 1
    atlas = open_atlas(store)
    params = atlas.provenance()["scale"]["params"]
    # no encoder flag: the model's own choice, whatever it is
    assert params["quick"] == default_of(SCALE, "quick")
    for name in ("batch_size", "lr", "lr_schedule", "patience", "depth_norm", "depth_offset", "impute", "seed"):
        assert params[name] == default_of(SCALE, name), name
    n_latent = default_of(SCALE, "n_latent")
    assert atlas.read("obsm/X_scale").shape == (400, n_latent)
    assert atlas.obs["scale_kmeans"].nunique() == 3
    assert (tmp_path / "model").is_dir() and any((tmp_path / "model").iterdir())


def test_sccase_bad_parameter_is_one_error_line(cluster, small_store, tmp_path):
    store = copy(small_store, tmp_path)
    r = on(cluster, "sccase", store, "--mode", "atlas", "--k-neighbors", 5000, "--n-factors", 3, "--max-iter", 1)
    check_error(r, "k_neighbors=5000", "(399)")
    assert "X_sccase" not in open_atlas(store).keys("obsm")


def test_scembed_train_encode_annotate(cluster, small_store, tmp_path):
    from scatac_dist.models import SCEMBED

    store = copy(small_store, tmp_path)
    model = tmp_path / "emb"
    r = on(cluster, "scembed", "train", store, "--epochs", 3, "--dim", 8, "--min-count", 2, "--corpus", "iterable",
           "--labels", "celltype", "--no-umap", "--model-out", model)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["epochs"] == 3 and summary["n_cells"] == 400 and summary["corpus"] == "iterable"
    atlas = open_atlas(store)
    assert atlas.read("obsm/X_scembed").shape == (400, 8)
    params = atlas.provenance()["scembed"]["params"]
    assert params["sg"] == 0 and params["umap"] is False and params["window"] == default_of(SCEMBED, "window")

    r = on(cluster, "scembed", "encode", store, "--model", model, "--key-added", "X_again")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_mapped"] == 600
    np.testing.assert_allclose(atlas.read("obsm/X_again"), atlas.read("obsm/X_scembed"), rtol=1e-5, atol=1e-6)

    r = on(cluster, "scembed", "annotate", store, "--model", model)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    obs = open_atlas(store).obs
    assert summary["k"] == default_of(SCEMBED.annotate, "k") and sum(summary["label_counts"].values()) == 400
    assert set(obs["scembed_label"].dropna()) <= {"type0", "type1", "type2"}
    assert obs["scembed_confidence"].between(0, 1).all()

    check_error(on(cluster, "scembed", "encode", store, "--model", tmp_path / "missing"), str(tmp_path / "missing"))


# -- defaults, help and progress -----------------------------------------------------------------

def commands(group=main, prefix=()):
    """(path, command) of every command under ``group``."""
    import click

    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_help_shows_the_models_defaults():
    import click

    from scatac_dist.models import SCALE, SCCASE, SCEMBED

    def squeeze(text):  # --help wraps lines, at hyphens too
        return "".join(text.split())

    checked = 0
    for path, cmd in commands():
        r = invoke(*path, "--help")
        assert r.exit_code == 0, (path, r.output)
        shown = squeeze(r.stdout)
        ctx = click.Context(cmd, info_name=path[-1])
        for opt in cmd.params:
            if not isinstance(opt, DefaultFrom):
                continue
            expected = default_of(opt.target, opt.param)
            help_text = squeeze(opt.get_help_record(ctx)[1])
            assert help_text in shown, (path, opt.name)
            if expected is None:  # "the model decides": nothing shown, None passed
                assert "[default:" not in help_text, (path, opt.name)
            elif opt.is_bool_flag:
                word = (opt.opts if expected else opt.secondary_opts)[0].lstrip("-")
                assert f"[default:{word}]" in help_text, (path, opt.name)
            else:
                assert squeeze(f"[default: {expected}]") in help_text, (path, opt.name)
                assert str(opt.type_cast_value(ctx, expected)) == str(expected), (path, opt.name)
            checked += 1
    assert checked >= 40

    # spot checks against the classes themselves
    scale = squeeze(invoke("scale", "--help").stdout)
    word = "quick" if SCALE().quick else "full-encoder"
    assert re.search(rf"--quick/--full-encoder.*thepaper's3200-1600-800-400encoder.*\[default:{word}\]", scale)
    assert f"--max-iterINTEGERMostoptimisationsteps.[default:{SCALE().max_iter}]" in scale
    sccase = squeeze(invoke("sccase", "--help").stdout)
    assert f"[default:{SCCASE().k_neighbors}]" in sccase and f"[default:{SCCASE().mode}]" in sccase
    train = squeeze(invoke("scembed", "train", "--help").stdout)
    assert f"--epochsINTEGER[default:{SCEMBED().epochs}]" in train
    annotate = squeeze(invoke("scembed", "annotate", "--help").stdout)
    assert f"Referenceneighbourspercell.[default:{default_of(SCEMBED.annotate, 'k')}]" in annotate


def test_parsed_defaults_are_the_models():
    from scatac_dist.models import SCALE, SCCASE, SCEMBED

    def parsed(path, *args):
        cmd = dict(commands())[path]
        return cmd.make_context(path[-1], ["store.zarr", *args]).params

    p = parsed(("scale",))
    for name in ("quick", "nproc", "device", "max_iter", "batch_size", "lr_schedule", "lr", "patience", "min_iter",
                 "min_cells", "min_reads", "depth_offset", "checkpoint_every", "seed", "n_clusters"):
        assert p[name] == getattr(SCALE(), name), name
    assert parsed(("scale",), "--full-encoder")["quick"] is False
    assert parsed(("scale",), "--quick")["quick"] is True
    assert parsed(("scale",), "--no-depth-offset")["depth_offset"] is False
    p = parsed(("sccase",))
    for name in ("mode", "k_neighbors", "support", "n_factors", "k_estimator", "alpha", "max_iter", "enhanced_top",
                 "seed"):
        assert p[name] == getattr(SCCASE(), name), name
    p = parsed(("scembed", "train"))
    for name in ("epochs", "dim", "window", "workers", "min_count", "alpha", "corpus", "seed", "labels_key"):
        assert p[name] == getattr(SCEMBED(), name), name
    p = parsed(("scembed", "annotate"), "--model", "m")
    for name in ("k", "min_confidence", "resolution", "clusters_per_label"):
        assert p[name] == default_of(SCEMBED.annotate, name), name
    # one-way switches (--impute, --skip-gram, ...) are passed only when given; each must turn
    # on something the model leaves off, or it would need an off switch too
    assert not any(getattr(SCALE(), n) for n in ("depth_norm", "impute", "resume"))
    assert SCEMBED().sg == 0 and SCEMBED().umap is True and SCCASE().self_reference is False
    assert default_of(SCEMBED.annotate, "by_cluster") is True and default_of(SCEMBED.encode, "umap") is True
    with pytest.raises(TypeError, match="no field 'quik'"):
        default_of(SCALE, "quik")


def test_progress_policy(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert show_progress(None, Terminal()) is True
    assert show_progress(None, io.StringIO()) is False
    assert show_progress(False, Terminal()) is False and show_progress(True, io.StringIO()) is True

    # the one bar style: on stderr, terminal width, off when disabled, few redraws into a log
    from scatac_dist.progress import LOG_MININTERVAL, bar

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with bar(range(3), desc="x", enabled=False) as b:
        assert b.disable
    with bar(range(3), desc="x") as b:
        assert not b.disable and b.dynamic_ncols and b.mininterval == LOG_MININTERVAL
        list(b)
    assert "x: 100%" in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", Terminal())
    with bar(range(3), desc="x") as b:
        assert b.mininterval < 1

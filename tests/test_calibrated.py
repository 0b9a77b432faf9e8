"""Atlases calibrated on real data (``scatac_dist.calibrated``, ``synth --like``).

The human preset is checked against the store it was learned from (bm0828, ingested here
from ../shared/data): its QC distributions within stated tolerances, and the default
pipeline's ARI on a generated atlas of the reference's size within a stated distance of
its ARI on bm0828 itself. Learning is checked on a generator whose truth is known.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

import scatac_dist as sd
from scatac_dist.calibrated import (
    PRESETS,
    LikeParams,
    compare_qc,
    generate_like_rows,
    learn_like,
    load_like,
    qc_summary,
    separation,
    synthesize_like,
)
from scatac_dist.datasets import SynthParams, synthesize
from scatac_dist.pipeline import default_stages, run_stages
from scatac_dist.tl.metrics import ari

#: QC tolerances: each quartile of depth, open peaks per cell and cells per peak (as a share
#: of cells) within 25 % of the reference's; the fraction of zeros within 0.01; the share of
#: peaks open in at least one cell within 0.05
QC_REL = 0.25
ZEROS_ABS = 0.01
SEEN_ABS = 0.05
#: the default pipeline's ARI (k-means and Leiden) on the generated atlas within this of its
#: ARI on the reference
ARI_DISTANCE = 0.2
#: ``separation``, the in-memory measure the heterogeneity is calibrated to, within this of the
#: pipeline's k-means ARI on the same store (it computes the same embedding)
SEPARATION_DISTANCE = 0.05


def _dense_counts(store) -> sp.csr_matrix:
    return sp.csr_matrix(sd.Atlas(store).X.compute())


def _assert_qc_close(ref, gen):
    d = compare_qc(qc_summary(ref), qc_summary(gen))
    for k in ("depth", "peaks_per_cell", "cells_per_peak_over_cells"):
        assert abs(d[k]) <= QC_REL, (k, d)
    assert abs(d["fraction_zeros"]) <= ZEROS_ABS, d
    assert abs(d["peaks_seen"]) <= SEEN_ABS, d


def _pipeline_ari(store, client, key="celltype") -> tuple[float, float]:
    atlas = sd.Atlas(store)
    k = atlas.obs[key].nunique()
    run_stages(atlas, [s for s in default_stages(n_clusters=k) if s.name != "umap"], client=client,
               force=True, progress=False)
    obs = atlas.obs
    truth = obs[key].astype(str)
    return ari(truth, obs["kmeans"].astype(str)), ari(truth, obs["leiden"].astype(str))


@pytest.fixture(scope="module")
def bm0828(tmp_path_factory, data_dir, client):
    d = data_dir / "buenrostro2018_bm0828"
    store = tmp_path_factory.mktemp("bm") / "bm0828.zarr"
    sd.ingest(d / "filtered_peak_bc_matrix", store, labels=d / "buenrostro2018_bm0828_labels.tsv", client=client,
              progress=False)
    return store


def test_human_preset_matches_its_reference(bm0828, tmp_path, client):
    """The shipped human preset against bm0828: the same types and proportions, QC within
    tolerance, and the pipeline's ARI within ARI_DISTANCE of the reference's (hard stays hard)."""
    p = load_like("human")
    ref_obs = sd.Atlas(bm0828).obs
    counts = ref_obs["celltype"].value_counts(normalize=True)
    assert set(p.types) == set(counts.index)
    assert np.allclose(p.proportions, counts.loc[list(p.types)].to_numpy())
    assert p.n_ref_cells == len(ref_obs) and p.n_ref_peaks == sd.Atlas(bm0828).n_vars

    gen = synthesize_like(tmp_path / "like.zarr", "human", n_cells=p.n_ref_cells, client=client, progress=False)
    assert gen.shape == sd.Atlas(bm0828).shape
    ref_counts, gen_counts = _dense_counts(bm0828), _dense_counts(gen.path)
    _assert_qc_close(ref_counts, gen_counts)

    ref_km, ref_ld = _pipeline_ari(bm0828, client)
    gen_km, gen_ld = _pipeline_ari(gen.path, client)
    assert abs(gen_km - ref_km) <= ARI_DISTANCE, (gen_km, ref_km)
    assert abs(gen_ld - ref_ld) <= ARI_DISTANCE, (gen_ld, ref_ld)

    # the calibration's measure is the pipeline's k-means, on the reference and on an atlas
    for counts, store, km in ((ref_counts, bm0828, ref_km), (gen_counts, gen.path, gen_km)):
        labels = sd.Atlas(store).obs["celltype"].astype(str).to_numpy()
        got = separation(counts, labels)
        assert abs(got - km) <= SEPARATION_DISTANCE, (got, km)

    # the learned heterogeneity is what keeps it hard: the same types as pure cells separate
    pure = dataclasses.replace(p, own_beta=np.tile([1e3, 1e-3], (p.n_types, 1)),
                               module_sigma=np.zeros_like(p.module_sigma))
    easy = synthesize_like(tmp_path / "pure.zarr", pure, n_cells=p.n_ref_cells, client=client, progress=False)
    easy_km, easy_ld = _pipeline_ari(easy.path, client)
    assert easy_ld > ref_ld + 0.3 and easy_km > ref_km + 0.2, (easy_km, easy_ld, ref_km, ref_ld)


def test_learning_recovers_a_known_generator(tmp_path, client):
    """Learned from a store whose truth is known: its types and proportions, its QC, and an
    atlas from it as hard as the reference for the pipeline."""
    truth = SynthParams(n_cells=1500, n_peaks=3000, n_clusters=4, n_lineages=2, fragments=400, signal=0.3, seed=3)
    ref = synthesize(tmp_path / "ref.zarr", truth, client=client, progress=False)
    p = learn_like(ref.path, seed=0)
    obs = ref.obs
    assert p.types == tuple(sorted(obs["celltype"].astype(str).unique()))
    assert np.allclose(p.proportions, obs["celltype"].astype(str).value_counts(normalize=True).loc[list(p.types)])
    assert p.label_key == "celltype" and p.n_ref_peaks == 3000
    # saved and loaded, the parameters generate the same cells
    q = LikeParams.load(p.save(tmp_path / "p.npz"))
    assert q.types == p.types and np.allclose(q.open_share, p.open_share, atol=1e-3)
    a = generate_like_rows(q, 1500, 3000, 0, 0, 1500)
    b = generate_like_rows(LikeParams.load(tmp_path / "p.npz"), 1500, 3000, 0, 0, 1500)
    assert (a != b).nnz == 0
    gen = synthesize_like(tmp_path / "gen.zarr", q, n_cells=1500, client=client, progress=False)
    _assert_qc_close(_dense_counts(ref.path), _dense_counts(gen.path))


def test_any_chunking_gives_the_same_atlas_and_more_peaks_keep_the_depth(tmp_path, client):
    """Rows do not depend on the chunking or the worker count; an atlas with more peaks than
    the preset stores keeps the reference's open peaks per cell and valid, unique peaks."""
    a = synthesize_like(tmp_path / "a.zarr", "mouse", n_cells=2500, n_peaks=5000, chunk_rows=700, client=client,
                        progress=False)
    b = synthesize_like(tmp_path / "b.zarr", "mouse", n_cells=2500, n_peaks=5000, chunk_rows=2500, client=None,
                        progress=False)
    Xa, Xb = _dense_counts(a.path), _dense_counts(b.path)
    assert (Xa != Xb).nnz == 0 and Xa.nnz > 0
    assert a.obs["celltype"].equals(b.obs["celltype"])

    p = load_like("mouse")
    assert p.open_share.shape[0] < 60_000
    big = synthesize_like(tmp_path / "big.zarr", "mouse", n_cells=1200, n_peaks=60_000, client=client, progress=False)
    var = big.var
    assert var.index.is_unique and (var["end"] > var["start"]).all()
    assert set(var["chr"].astype(str)) <= set(p.chroms)
    median_open = np.median(np.diff(_dense_counts(big.path).indptr))
    ref_median = np.median(p.depth_quantiles[:, (p.depth_quantiles.shape[1] - 1) // 2])
    assert 0.7 * ref_median <= median_open <= 1.3 * ref_median, (median_open, ref_median)


def test_synth_like_on_the_command_line(tmp_path):
    from scatac_dist.cli import main

    out = tmp_path / "m.zarr"
    r = CliRunner().invoke(main, ["--workers", "1", "synth", "--like", "mouse", "--cells", "800", "--peaks", "2000",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    atlas = sd.Atlas(out)
    assert atlas.shape == (800, 2000)
    assert set(atlas.obs["celltype"].astype(str)) <= set(load_like("mouse").types)
    assert atlas.provenance()["synth"]["params"]["params"]["like"] == load_like("mouse").name

    r = CliRunner().invoke(main, ["synth", "--like", "mouse", "--clusters", "3", "-o", str(tmp_path / "x.zarr")])
    assert r.exit_code != 0 and "--clusters" in r.output
    r = CliRunner().invoke(main, ["synth", "--like", "rat", "-o", str(tmp_path / "y.zarr")])
    assert r.exit_code != 0 and "not a preset" in r.output
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()
    assert set(PRESETS) == {"mouse", "human"}


def test_learning_names_a_missing_label_column(tmp_path, client):
    ref = synthesize(tmp_path / "ref.zarr", SynthParams(n_cells=300, n_peaks=500, n_clusters=3), client=client,
                     progress=False)
    with pytest.raises(ValueError, match="no column 'cluster'.*--label-key"):
        learn_like(ref.path, "cluster")

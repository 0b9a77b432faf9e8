"""SCALE on stores: the paper's simulated data (loss, clusters, imputation of dropped
entries), the written outputs, the CLI, and bad input. Real LocalCluster (``client``)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from scatac_dist.cli import main
from scatac_dist.io import ingest
from scatac_dist.models import SCALE
from scatac_dist.models.scale import js_specificity
from scatac_dist.store import open_atlas
from scatac_dist.tl import estimate_k
from scatac_dist.tl.metrics import ari


def simulate(seed: int = 0, dropout: float = 0.3, noise: float = 0.1):
    """The paper's simulation (Methods): 300 cells x 1000 peaks, 3 clusters of 100 cells, each
    with 100 specific peaks valued 1 or 2 (ratio 1:4); then drop ``dropout`` of the non-zeros
    and set entries to 1 or 2 (1:4) with probability ``noise``."""
    rng = np.random.default_rng(seed)
    n, p = 300, 1000
    labels = np.repeat(np.arange(3), 100)
    clean = np.zeros((n, p), np.int64)
    for c in range(3):
        vals = rng.choice([1, 2], size=(100, 100), p=[0.2, 0.8])
        clean[labels == c, c * 100:(c + 1) * 100] = vals
    X = clean.copy()
    drop = (clean > 0) & (rng.random((n, p)) < dropout)
    X[drop] = 0
    noisy = rng.random((n, p)) < noise
    X[noisy] = rng.choice([1, 2], size=noisy.sum(), p=[0.2, 0.8])
    return X, clean, drop & ~noisy, labels


@pytest.fixture(scope="module")
def sim(tmp_path_factory, client):
    X, clean, dropped, labels = simulate()
    d = tmp_path_factory.mktemp("scale")
    var = pd.DataFrame(index=[f"chr1_{1000 * i}_{1000 * i + 500}" for i in range(X.shape[1])])
    obs = pd.DataFrame({"celltype": pd.Categorical(labels.astype(str))}, index=[f"c{i}" for i in range(len(X))])
    ad.AnnData(sp.csr_matrix(X.astype(np.float32)), obs=obs, var=var).write_h5ad(d / "sim.h5ad")
    ingest(d / "sim.h5ad", d / "sim.zarr", chunk_rows=64, client=client, progress=False)
    return d / "sim.zarr", X, clean, dropped, labels


def used_by_scale(X: np.ndarray, min_cells: int = 1, min_reads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """SCALE's filters (module docstring), in NumPy: peaks with >= ``min_reads`` reads in >=
    ``min_cells`` cells, then cells with at least (kept peaks / 50) reads on them."""
    hits = (X >= min_reads).sum(0)
    peaks = (hits >= min_cells) & (hits > 0)
    counts = X[:, peaks].sum(1)
    return (counts >= peaks.sum() / 50) & (counts > 0), peaks


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("depth_offset", [True, False], ids=["default", "paper-decoder"])
def test_simulated_data_clusters_and_imputes(sim, tmp_path, client, depth_offset):
    store, X, clean, dropped, labels = sim
    store = _copy(store, tmp_path / "s.zarr")
    m = SCALE(n_clusters=3, quick=True, max_iter=1500, min_cells=1, min_reads=1, impute=True,
              progress=False, seed=0, depth_offset=depth_offset).fit(store)
    assert (m.module_.depth_ref is not None) == depth_offset
    h = m.summary_["history"]
    assert h[-1] < 0.8 * h[0]                                    # the loss decreased
    a = open_atlas(store)
    used = a.obs["scale_used"].to_numpy(bool)
    assert used.sum() >= 290
    assert ari(labels[used], a.obs["scale_kmeans"][used]) > 0.9   # three clean clusters found
    Z = a.read("obsm/X_scale")
    assert Z.shape == (300, 10) and np.isfinite(Z).all()         # every cell embedded, used or not
    # imputation: dropped entries against entries that were and stay zero
    imp = a.read("layers/scale_impute")
    neg = (clean == 0) & (X == 0)
    y = np.r_[np.ones(dropped[used].sum()), np.zeros(neg[used].sum())]
    auroc = roc_auc_score(y, np.r_[imp[used][dropped[used]], imp[used][neg[used]]])
    raw = roc_auc_score(y, np.r_[X[used][dropped[used]], X[used][neg[used]]])
    print(f"depth_offset={depth_offset}: auROC imputed {auroc:.3f} raw {raw:.3f}")
    assert raw == 0.5 and auroc > 0.9
    # the binarised layer follows the paper's rule from the imputed values
    B = a.read("layers/scale_binary").toarray()
    kept = a.var["scale_used"].to_numpy(bool)
    Xb = (X[used][:, kept] > 0).astype(float)
    rule = (imp[used][:, kept] > Xb.mean(0)[None, :]) & (imp[used][:, kept] > Xb.mean(1)[:, None])
    np.testing.assert_array_equal(B[used][:, kept] > 0, rule)
    # cluster specificity: the planted peaks score above the background, each block of 100
    # is assigned to one cluster, a different one per block, and all are in the top 200
    score = a.var["scale_specificity"].to_numpy()
    best = a.var["scale_specific_cluster"].to_numpy()
    planted = np.zeros(len(score), bool)
    planted[:300] = True
    ok = kept & np.isfinite(score)
    assert roc_auc_score(planted[ok], score[ok]) > 0.95
    blocks = [np.bincount(best[c * 100:(c + 1) * 100][kept[c * 100:(c + 1) * 100]]).argmax() for c in range(3)]
    assert len(set(blocks)) == 3
    assert a.var["scale_specific"].to_numpy(bool)[:300][kept[:300]].all()
    # and the scores are the Jensen-Shannon score of each k-means cluster's mean imputed profile
    W = a.read("varm/scale_decoder")[kept]
    b = m.module_.decoder.bias.detach().numpy()
    P = 1 / (1 + np.exp(-(Z[used].astype(np.float64) @ W.T + b)))
    lab = a.obs["scale_kmeans"][used].astype(int).to_numpy()
    M = np.stack([P[lab == c].mean(0) for c in range(3)], 1)
    ref_score, ref_best = js_specificity(M)
    np.testing.assert_allclose(score[kept], ref_score, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(best[kept], ref_best)
    rec = a.provenance()["scale"]
    assert rec["result"]["n_clusters"] == 3 and rec["result"]["steps"] > 0


def test_cli_scale_and_estimated_k(sim, tmp_path):
    store = _copy(sim[0], tmp_path / "c.zarr")
    r = CliRunner().invoke(main, ["--workers", "1", "--no-progress", "scale", str(store), "--quick", "--max-iter",
                                  "60", "--min-cells", "1", "--min-reads", "1", "--depth-norm", "--no-depth-offset", "--model-out",
                                  str(tmp_path / "model")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{"):])
    # k is the Tracy-Widom estimate on the binarised cells and peaks SCALE used: the
    # simulation's 3 clusters (SCALE raises an estimate below 2 to 2)
    X = sim[1]
    cells, peaks = used_by_scale(X)
    a = open_atlas(store)
    np.testing.assert_array_equal(a.obs["scale_used"].to_numpy(bool), cells)
    np.testing.assert_array_equal(a.var["scale_used"].to_numpy(bool), peaks)
    tw = estimate_k((X[cells][:, peaks] > 0).astype(np.float64), seed=0)
    assert tw == 3 and out["n_clusters"] == tw and out["steps"] == 60
    assert "scale_gmm" in a.obs and "scale_kmeans" not in a.obs
    m = SCALE.load(tmp_path / "model")
    assert m.module_.n_components == out["n_clusters"]
    assert m.depth_norm and m.module_.encoder.input_scale > 0                # --depth-norm reached the model
    assert not m.depth_offset and m.module_.depth_ref is None               # and --no-depth-offset


def test_training_alone_writes_nothing(sim, tmp_path):
    store = _copy(sim[0], tmp_path / "t.zarr")
    before = set(open_atlas(store).obs.columns)
    m = SCALE(n_clusters=3, quick=True, max_iter=20, min_cells=1, min_reads=1, progress=False).fit(
        store, outputs=False)
    assert m.summary_["steps"] == 20 and m.n_cells_ >= 290 and "outputs" not in m.timings_
    a = open_atlas(store)
    assert set(a.obs.columns) == before and "X_scale" not in a.keys("obsm") and "scale" not in a.provenance()
    m.save(tmp_path / "model")                                      # the trained model is still usable
    assert SCALE.load(tmp_path / "model").module_.n_components == 3


def test_depth_norm_scales_to_the_median_open_peaks(sim, tmp_path):
    """The median open (kept) peaks per used cell is the encoder's input total with
    ``depth_norm=True`` and the decoder's reference depth with ``depth_offset`` (the default);
    ``depth_offset=False`` without ``depth_norm`` is the paper's model; saved models keep both."""
    kw = dict(n_clusters=3, quick=True, max_iter=10, min_cells=1, min_reads=1, progress=False)
    m = SCALE(depth_norm=True, depth_offset=False, **kw).fit(sim[0], outputs=False)
    X = sim[1]
    cells, peaks = used_by_scale(X)
    assert m.n_cells_ == cells.sum()
    expected = float(np.median((X[cells][:, peaks] > 0).sum(1)))
    assert m.module_.input_scale == m.module_.encoder.input_scale == expected
    assert m.module_.depth_ref is None
    m.save(tmp_path / "model")
    assert SCALE.load(tmp_path / "model").module_.encoder.input_scale == expected
    default = SCALE(**kw).fit(sim[0], outputs=False)
    assert default.module_.depth_ref == expected and default.module_.input_scale is None
    default.save(tmp_path / "default")
    assert SCALE.load(tmp_path / "default").module_.depth_ref == expected
    paper = SCALE(depth_offset=False, **kw).fit(sim[0], outputs=False).module_
    assert paper.depth_ref is None and paper.input_scale is None


def test_fit_resumed_in_stages_equals_one_run(sim, tmp_path):
    """Two fits of 20 steps, the second resumed from the first's checkpoint in a folder that did
    not exist before, end bit-identical to one fit of 40 (bench_scale.py curve relies on it)."""
    kw = dict(n_clusters=3, quick=True, min_cells=1, min_reads=1, seed=3, progress=False)
    one = SCALE(max_iter=40, min_iter=40, **kw).fit(sim[0], outputs=False)
    ck = tmp_path / "not" / "yet"
    SCALE(max_iter=20, min_iter=20, checkpoint_dir=str(ck), checkpoint_every=10 ** 9, **kw).fit(sim[0], outputs=False)
    two = SCALE(max_iter=40, min_iter=40, checkpoint_dir=str(ck), checkpoint_every=10 ** 9, resume=True,
                **kw).fit(sim[0], outputs=False)
    assert two.summary_["steps"] == 40
    a, b = one.module_.state_dict(), two.module_.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name].numpy(), b[name].numpy()), name


def test_binarised_input_adapts_the_filter_and_every_cell_is_embedded(tmp_path, client):
    """Public matrices often hold 0/1 values: the default peak rule (>= 2 reads in >= 5 cells)
    would keep no peak. SCALE detects the binary input and counts open cells instead; the
    cells its cell filter drops are still encoded (no NaN), from their reads in the used peaks."""
    X, _, _, labels = simulate(seed=1)
    Xb = (X > 0).astype(np.float32)
    Xb[:6] = 0
    Xb[:6, 500] = 1                      # 6 near-empty cells: below kept peaks / 50, dropped from training
    var = pd.DataFrame(index=[f"chr1_{1000 * i}_{1000 * i + 500}" for i in range(Xb.shape[1])])
    ad.AnnData(sp.csr_matrix(Xb), var=var, obs=pd.DataFrame(index=[f"c{i}" for i in range(len(Xb))])
               ).write_h5ad(tmp_path / "bin.h5ad")
    store = tmp_path / "bin.zarr"
    ingest(tmp_path / "bin.h5ad", store, chunk_rows=64, client=client, progress=False)
    # counts keep the paper's rule; 0/1 values get "open in >= min_cells cells"
    cells, peaks = SCALE(progress=False).masks(open_atlas(store))
    want_cells, want_peaks = used_by_scale(Xb, min_cells=5, min_reads=1)
    np.testing.assert_array_equal(peaks, want_peaks)
    np.testing.assert_array_equal(cells, want_cells)
    assert not cells[:6].any() and cells[6:].all()

    m = SCALE(n_clusters=3, quick=True, max_iter=300, min_iter=0, progress=False, seed=0).fit(store)
    a = open_atlas(store)
    rec = a.provenance()["scale"]["result"]
    assert rec["binary_input"] is True and rec["min_reads_used"] == 1
    used = a.obs["scale_used"].to_numpy(bool)
    np.testing.assert_array_equal(used, want_cells)
    Z = a.read("obsm/X_scale")
    assert np.isfinite(Z).all()
    # a dropped cell's embedding is the trained encoder on its row over the used peaks
    rows = sp.csr_matrix(Xb[~used][:, want_peaks])
    ref, _ = m.encode_csr(m.module_, rows)
    np.testing.assert_allclose(Z[~used], ref, rtol=1e-5, atol=1e-5)
    assert not a.obs["scale_gmm"].isna().any() and not a.obs["scale_kmeans"].isna().any()
    assert ari(labels[used], a.obs["scale_kmeans"][used]) > 0.9


def test_counts_keep_the_read_rule(sim):
    """On counts (values of 2 present) the peak rule stays >= min_reads reads in >= min_cells cells."""
    X = sim[1]
    cells, peaks = SCALE(min_cells=25, min_reads=2, progress=False).masks(open_atlas(sim[0]))
    want_cells, want_peaks = used_by_scale(X, min_cells=25, min_reads=2)
    assert want_peaks.sum() < ((X > 0).sum(0) >= 25).sum()         # the two rules differ on this data
    np.testing.assert_array_equal(peaks, want_peaks)
    np.testing.assert_array_equal(cells, want_cells)


def test_bad_input_is_refused(sim, tmp_path):
    store = _copy(sim[0], tmp_path / "b.zarr")
    with pytest.raises(ValueError, match="min_reads"):
        SCALE(n_clusters=3, min_cells=10_000, progress=False).fit(store)
    r = CliRunner().invoke(main, ["scale", str(store), "--resume"])
    assert r.exit_code != 0 and "--checkpoint-dir" in r.output
    with pytest.raises(ValueError, match="resume='maybe'"):
        SCALE(n_clusters=3, resume="maybe", progress=False).fit(store)
    r = CliRunner().invoke(main, ["scale", str(store), "--resume", "maybe"])
    assert r.exit_code == 2 and "'maybe' is not one of 'no', 'yes', 'auto'" in r.output
    with pytest.raises(ValueError, match="lr_schedule"):
        SCALE(n_clusters=3, lr_schedule="cosine", min_cells=1, min_reads=1, progress=False).fit(store)

"""The calibrated presets against their references: QC distributions and the pipeline's ARI.

For each preset (``mouse``: SNARE-seq MOp ATAC; ``human``: bm0828), the reference is ingested
fresh from ``../shared/data`` (labels joined) and an atlas of the reference's size (its
labelled cells, its peaks) is generated from the shipped parameter file. Then:

* QC: quartiles of depth, open peaks per cell and cells per peak (as a share of cells), the
  fraction of zeros and the share of peaks seen, with ``calibrated.compare_qc``'s
  differences and the test's tolerances (``tests/test_calibrated.py``);
* difficulty: the default pipeline to ``X_spectral`` on both, scored with the quality
  protocol of ``bench_quality.py`` (k-means with k = labels, Leiden searched to k; mean over
  seeds 0-4), and ``calibrated.separation`` (what learning matched).

Results: ``benchmarks/results/calibration.{json,md,png}`` and RESULTS.md block
``calibration``. ``--report-only`` redraws them from the JSON.

Usage::

    python benchmarks/bench_calibration.py [--presets mouse human] [--report-only]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, WORK, plots
from harness.report import publish
from harness.results import ResultsFile
from harness.stores import ingest_dataset, root_obs

RESULTS_FILE = ResultsFile(RESULTS / "calibration.json", indent=2)
#: preset -> the real set it was learned from, its label column, the labels left out
REFERENCES = {"mouse": ("snare", "cluster (remapped)", ("Mis",)), "human": ("bm0828", "celltype", ())}
#: the test's tolerances (tests/test_calibrated.py)
QC_REL, ZEROS_ABS, SEEN_ABS, ARI_DISTANCE = 0.25, 0.01, 0.05, 0.2


def _labelled_counts(store: Path, key: str, exclude) -> tuple:
    import scipy.sparse as sp

    import scatac_dist as sd

    atlas = sd.open_atlas(store)
    obs = atlas.obs
    if key not in obs.columns:
        obs = root_obs(store)
    y = obs[key].astype("string")
    keep = (y.notna() & ~y.isin(list(exclude))).fillna(False).to_numpy()
    X = sp.csr_matrix(atlas.X.compute())
    return X[keep], y.to_numpy()[keep].astype(str), keep


def _scores(store: Path, key: str, exclude, client) -> dict:
    from bench_quality import protocol_seeds
    from panel_quality import _spectral

    import scatac_dist as sd
    from scatac_dist.calibrated import separation

    _spectral(store, client)
    X, y, keep = _labelled_counts(store, key, exclude)
    E = np.asarray(sd.open_atlas(store).read("obsm/X_spectral"))[keep]
    rec = protocol_seeds(E, y)
    rec["separation"] = separation(X, y)
    return rec


def measure(presets, client) -> dict:
    import scatac_dist as sd
    from scatac_dist.calibrated import compare_qc, load_like, qc_summary, synthesize_like

    out = RESULTS_FILE.load() or {}
    folder = WORK / "calibration"
    for name in presets:
        ref_name, key, exclude = REFERENCES[name]
        ref = ingest_dataset(ref_name, folder, client)
        p = load_like(name)
        gen = synthesize_like(folder / f"like_{name}.zarr", p, n_cells=p.n_ref_cells, client=client,
                              overwrite=True, progress=False).path
        Xr, _, _ = _labelled_counts(ref, key, exclude)
        Xg = sd.open_atlas(gen).X.compute()
        qr, qg = qc_summary(Xr), qc_summary(Xg)
        rec = {"preset": name, "reference": p.reference, "n_cells": p.n_ref_cells, "n_peaks": p.n_ref_peaks,
               "qc_reference": qr, "qc_generated": qg, "qc_difference": compare_qc(qr, qg),
               "reference_scores": _scores(ref, key, exclude, client),
               "generated_scores": _scores(gen, "celltype", (), client)}
        out[name] = rec
        RESULTS_FILE.save(out)
        print(name, rec["qc_difference"], {k: rec[k + "_scores"]["kmeans_ari_mean"] for k in ("reference", "generated")},
              flush=True)
    return out


def report(out: dict) -> None:
    rows = ["| preset | QC: depth | peaks per cell | cells per peak | zeros | peaks seen | k-means ARI ref / gen | "
            "Leiden ARI ref / gen | separation ref / gen | within tolerance |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in out.items():
        d, a, b = r["qc_difference"], r["reference_scores"], r["generated_scores"]
        ok = (all(abs(d[k]) <= QC_REL for k in ("depth", "peaks_per_cell", "cells_per_peak_over_cells"))
              and abs(d["fraction_zeros"]) <= ZEROS_ABS and abs(d["peaks_seen"]) <= SEEN_ABS
              and abs(a["kmeans_ari_mean"] - b["kmeans_ari_mean"]) <= ARI_DISTANCE
              and abs(a["leiden_ari_mean"] - b["leiden_ari_mean"]) <= ARI_DISTANCE)
        rows.append(
            f"| {name} ({r['n_cells']:,} x {r['n_peaks']:,}) | {d['depth']:+.0%} | {d['peaks_per_cell']:+.0%} | "
            f"{d['cells_per_peak_over_cells']:+.0%} | {d['fraction_zeros']:+.4f} | {d['peaks_seen']:+.3f} | "
            f"{a['kmeans_ari_mean']:.3f} / {b['kmeans_ari_mean']:.3f} | {a['leiden_ari_mean']:.3f} / "
            f"{b['leiden_ari_mean']:.3f} | {a['separation']:.3f} / {b['separation']:.3f} | {'yes' if ok else 'no'} |")
    publish("calibration", "## Calibrated presets against their references (`python benchmarks/bench_calibration.py`)\n\n"
            "QC: the largest relative difference of the quartiles (generated / reference - 1); zeros and peaks "
            f"seen: absolute differences. Tolerances: {QC_REL:.0%} per quartile, {ZEROS_ABS} zeros, {SEEN_ABS} peaks "
            f"seen, ARI within {ARI_DISTANCE} (mean over seeds 0-4 of the quality protocol on `X_spectral`).\n\n",
            rows, md=RESULTS / "calibration.md")
    plt = plots.pyplot()
    fig, axes = plt.subplots(len(out), 3, figsize=(13, 3.6 * len(out)), squeeze=False)
    for ax, (name, r) in zip(axes, out.items()):
        for a, k, t in zip(ax, ("depth", "peaks_per_cell", "cells_per_peak_over_cells"),
                           ("depth (counts per cell)", "open peaks per cell", "cells per peak / cells")):
            q = (25, 50, 75)
            a.plot(q, r["qc_reference"][k], "o-k", label="reference")
            a.plot(q, r["qc_generated"][k], "s--", label="generated")
            a.set_title(f"{name}: {t}")
            a.set_xlabel("quantile (%)")
            a.legend(fontsize=8)
    plots.save(fig, RESULTS / "calibration.png", dpi=100, tight=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=list(REFERENCES), choices=list(REFERENCES))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if args.report_only:
        report(RESULTS_FILE.load() or {})
        return
    import scatac_dist as sd

    client = sd.get_client(n_workers=2, threads_per_worker=1, dashboard_address=":0")
    try:
        out = measure(args.presets, client)
    finally:
        client.close()
    report(out)


if __name__ == "__main__":
    main()

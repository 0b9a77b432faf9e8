"""Scaling benchmark: the default pipeline on synthetic atlases of growing size, with 1 and 2
workers, and SnapATAC2 on the same stores in the same run.

For each size (default 10k, 100k, 300k, 1M cells x 100k peaks, about 1,000 fragments per
cell) the atlas is generated once into ``--scratch`` (``scatac_dist.datasets.synthesize``,
seed 0, 10 cell types). Then, each in a fresh process:

* ours: ``scatac-dist run``'s default stages with ``n_clusters=10`` (QC, cell filter,
  feature selection, TF-IDF, LSI, spectral, kNN, Leiden searched to 10 clusters, k-means,
  UMAP) on a ``LocalCluster`` of W single-threaded worker processes, for each W in
  ``--workers``. Per stage: wall time, cells/s, peak RSS of the whole process tree and of its
  largest process; per process: peak RSS (client, each worker, each nanny).
* SnapATAC2 2.9 (``benchmarks/snapatac2_runner.py``: ``pp.select_features``, ``tl.spectral``,
  ``pp.knn``, ``tl.leiden``; backed mode above 1e8 values), with all cores, until it fails,
  exceeds ``--snap-max-rss`` or ``--snap-timeout``; larger sizes are then skipped for it.

ARI of Leiden (and k-means) against the generator's labels is reported for every run.
Results go to ``benchmarks/results/scaling.json`` after every run (a crash loses nothing),
then ``scaling.png`` (time and memory against cells, one line per system) and the table in
``benchmarks/RESULTS.md``. ``--report-only`` redraws those from the JSON.

Usage::

    python benchmarks/bench_scaling.py [--sizes 10000 100000 300000 1000000] [--workers 1 2]
        [--scratch DIR] [--snap-timeout S] [--snap-max-rss GIB] [--report-only]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, WORK, plots
from harness.children import local_cluster
from harness.memory import GIB, TreeSampler
from harness.procs import run_child
from harness.report import publish
from harness.results import ResultsFile, write_json
from harness.stores import ensure_atlas
from harness.timing import Timer

JSON_OUT = RESULTS / "scaling.json"
RESULTS_FILE = ResultsFile(JSON_OUT, indent=2)
#: the stages SnapATAC2's four calls correspond to (its select_features + spectral + knn + leiden)
MATCHED = ("select_features", "spectral", "neighbors", "leiden")


# --------------------------------------------------------------------------- one run of ours


def run_ours_child(store: str, workers: int, out: str) -> None:
    """Runs inside a fresh process: the default pipeline on a new LocalCluster."""
    import scatac_dist as sd
    from scatac_dist.pipeline import default_stages, run_stages
    from scatac_dist.tl.metrics import ari

    with TreeSampler(os.getpid()) as sampler:
        t_start = Timer()
        with local_cluster(workers, 1, "10GiB") as client:
            t_cluster = t_start.elapsed
            atlas = sd.Atlas(store)
            n = atlas.n_obs
            stages = default_stages(n_clusters=10)
            stage_s = {}
            for st in stages:
                sampler.set_stage(st.name)
                rep = run_stages(atlas, [st], client=client, force=True, progress=False)
                stage_s[st.name] = rep[st.name]["seconds"]
                print(f"  {st.name}: {stage_s[st.name]:.1f} s", flush=True)
            sampler.set_stage(None)
            obs = atlas.obs
            truth = obs["celltype"].astype(str)
            quality = {"leiden_ari": ari(truth, obs["leiden"].astype(str)),
                       "kmeans_ari": ari(truth, obs["kmeans"].astype(str)),
                       "leiden_k": int(obs["leiden"].nunique())}
    res = {
        "system": "scatac-dist", "workers": workers, "n_cells": n, "nnz": int(atlas.nnz),
        "cluster_start_s": t_cluster,
        "stages": {s: {"seconds": stage_s[s], "cells_per_s": n / stage_s[s] if stage_s[s] > 0 else None,
                       "peak_rss_tree": sampler.stage_peaks.get(s, 0),
                       "peak_rss_max_process": sampler.stage_max_process.get(s, 0)} for s in stage_s},
        "total_s": sum(stage_s.values()),
        "matched_s": sum(stage_s[s] for s in MATCHED),
        "peak_rss_tree": max(sampler.stage_peaks.values()),
        "peak_rss_max_process": max(v["peak_rss"] for v in sampler.per_process.values()),
        "processes": sorted(({"pid": pid, **v} for pid, v in sampler.per_process.items()),
                            key=lambda r: -r["peak_rss"]),
        "quality": quality,
    }
    write_json(out, res, indent=2)


def run_ours(store: Path, workers: int, tmp: Path) -> dict:
    out = tmp / f"ours_{store.stem}_{workers}w.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(store), str(workers), str(out)]
    return run_child(cmd, out, check=True, wall_key=None)


# --------------------------------------------------------------------------- SnapATAC2


def run_snap(store: Path, tmp: Path, timeout: float, max_rss: float) -> dict:
    from snapatac2_runner import run_snapatac2

    import scatac_dist as sd
    from scatac_dist.tl.metrics import ari

    outdir = tmp / f"snap_{store.stem}"
    try:
        r = run_snapatac2(store, outdir, seed=0, timeout=timeout, scratch=tmp / "snap_scratch",
                          max_rss_bytes=int(max_rss * GIB))
    except subprocess.TimeoutExpired:
        return {"system": "snapatac2", "failed": f"did not finish within {timeout:.0f} s"}
    except subprocess.CalledProcessError as e:
        return {"system": "snapatac2", "failed": (e.stderr or "")[-600:]}
    labels = np.loadtxt(r["labels_path"], dtype=str, skiprows=1, usecols=1)
    truth = sd.Atlas(store).obs["celltype"].astype(str).to_numpy()
    t = r["times_s"]
    return {"system": "snapatac2", "n_cells": r["input"]["n_obs"], "mode": r["mode"],
            "stages": {s: {"seconds": t[s], "peak_rss_tree": r["memory"]["peak_rss_per_step_bytes"].get(s, 0)}
                       for s in ("select_features", "spectral", "knn", "leiden")},
            "convert_s": t.get("convert", 0.0), "load_s": t.get("load", 0.0),
            "matched_s": t["total"], "peak_rss_tree": r["memory"]["peak_rss_external_bytes"],
            "quality": {"leiden_ari": ari(truth, labels), "leiden_k": r["n_clusters"]}}


# --------------------------------------------------------------------------- driver


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000, 1_000_000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--scratch", type=Path, default=WORK / "scaling")
    ap.add_argument("--snap-timeout", type=float, default=3600.0)
    ap.add_argument("--snap-max-rss", type=float, default=20.0, help="GiB; SnapATAC2 is stopped beyond it")
    ap.add_argument("--no-snap", action="store_true")
    ap.add_argument("--snap-sizes", type=int, nargs="+", help="sizes at which to run SnapATAC2 (default: all)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("STORE", "WORKERS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_ours_child(args.child[0], int(args.child[1]), args.child[2])
        return
    results = RESULTS_FILE.load() or {"runs": []}
    if not args.report_only:
        results["machine"] = {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
                              "python": platform.python_version()}
        args.scratch.mkdir(parents=True, exist_ok=True)
        snap_ok = not args.no_snap
        for n in args.sizes:
            store = ensure_atlas(n, args.scratch)
            for w in args.workers:
                print(f"scatac-dist, {n} cells, {w} worker(s)", flush=True)
                r = run_ours(store, w, args.scratch)
                results["runs"] = [x for x in results["runs"]
                                   if not (x["system"] == "scatac-dist" and x.get("n_cells") == n and x["workers"] == w)]
                results["runs"].append(r)
                RESULTS_FILE.save(results)
                print(f"  total {r['total_s']:.0f} s, tree peak {r['peak_rss_tree'] / GIB:.2f} GiB, "
                      f"largest process {r['peak_rss_max_process'] / GIB:.2f} GiB, ARI {r['quality']}", flush=True)
            if snap_ok and (args.snap_sizes is None or n in args.snap_sizes):
                print(f"SnapATAC2, {n} cells", flush=True)
                r = run_snap(store, args.scratch, args.snap_timeout, args.snap_max_rss)
                r.setdefault("n_cells", n)
                r["workers"] = os.cpu_count()
                results["runs"] = [x for x in results["runs"] if not (x["system"] == "snapatac2" and x.get("n_cells") == n)]
                results["runs"].append(r)
                RESULTS_FILE.save(results)
                print(f"  {r.get('failed') or r['matched_s']}", flush=True)
                snap_ok = "failed" not in r
    report(results)


# --------------------------------------------------------------------------- report


def report(results: dict) -> None:
    plt = plots.pyplot()
    runs = [r for r in results["runs"] if "failed" not in r]
    ours = sorted((r for r in runs if r["system"] == "scatac-dist"), key=lambda r: (r["workers"], r["n_cells"]))
    snap = sorted((r for r in runs if r["system"] == "snapatac2"), key=lambda r: r["n_cells"])
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    lines = [(f"scatac-dist, {w} worker{'s' * (w > 1)}", [r for r in ours if r["workers"] == w])
             for w in sorted({r["workers"] for r in ours})]
    for label, rs in lines:
        x = [r["n_cells"] for r in rs]
        ax[0].plot(x, [r["total_s"] for r in rs], "o-", label=label + " (whole pipeline)")
        ax[0].plot(x, [r["matched_s"] for r in rs], "o--", label=label + " (matched stages)")
        ax[1].plot(x, [r["peak_rss_tree"] / GIB for r in rs], "o-", label=label + " (all processes)")
        ax[1].plot(x, [r["peak_rss_max_process"] / GIB for r in rs], "o:", label=label + " (largest process)")
        ax[2].plot(x, [r["n_cells"] / r["total_s"] for r in rs], "o-", label=label)
    if snap:
        x = [r["n_cells"] for r in snap]
        ax[0].plot(x, [r["matched_s"] for r in snap], "s-k", label="SnapATAC2 2.9 (matched stages)")
        ax[1].plot(x, [r["peak_rss_tree"] / GIB for r in snap], "s-k", label="SnapATAC2 2.9")
        ax[2].plot(x, [r["n_cells"] / r["matched_s"] for r in snap], "s-k", label="SnapATAC2 2.9")
    for a, t in zip(ax, ("wall time (s)", "peak RSS (GiB)", "cells / s")):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("cells (x 100k peaks)")
        a.set_ylabel(t)
        a.legend(fontsize=7)
    ax[1].axhline(8, color="r", lw=0.8, ls=":")
    plots.save(fig, RESULTS / "scaling.png", dpi=110, tight=True)
    write_markdown(results)


def _fmt(x, nd=0):
    return "-" if x is None else f"{x:,.{nd}f}"


def write_markdown(results: dict) -> None:
    runs = results["runs"]
    snap = {r.get("n_cells"): r for r in runs if r["system"] == "snapatac2"}
    ours = sorted((r for r in runs if r["system"] == "scatac-dist"), key=lambda r: (r["n_cells"], r["workers"]))
    rows = ["| cells | system | workers | whole pipeline (s) | matched stages (s) | spectral (s) | peak RSS all (GiB) | "
            "largest process (GiB) | time ratio vs SnapATAC2 | memory ratio vs SnapATAC2 | Leiden ARI |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sorted({r.get("n_cells") for r in runs if r.get("n_cells")}):
        s = snap.get(n)
        for r in (x for x in ours if x["n_cells"] == n):
            tr = r["matched_s"] / s["matched_s"] if s and "failed" not in s else None
            mr = r["peak_rss_tree"] / s["peak_rss_tree"] if s and "failed" not in s else None
            rows.append(f"| {n:,} | scatac-dist | {r['workers']} | {_fmt(r['total_s'])} | {_fmt(r['matched_s'])} | "
                        f"{_fmt(r['stages']['spectral']['seconds'])} | {_fmt(r['peak_rss_tree'] / GIB, 2)} | "
                        f"{_fmt(r['peak_rss_max_process'] / GIB, 2)} | {_fmt(tr, 2)} | {_fmt(mr, 2)} | "
                        f"{r['quality']['leiden_ari']:.3f} |")
        if s and "failed" not in s:
            rows.append(f"| {n:,} | SnapATAC2 2.9 ({s['mode']}) | {s['workers']} threads | - | {_fmt(s['matched_s'])} | "
                        f"{_fmt(s['stages']['spectral']['seconds'])} | {_fmt(s['peak_rss_tree'] / GIB, 2)} | "
                        f"{_fmt(s['peak_rss_tree'] / GIB, 2)} | 1 | 1 | {s['quality']['leiden_ari']:.3f} |")
        elif s:
            rows.append(f"| {n:,} | SnapATAC2 2.9 | - | - | failed: {s['failed'].splitlines()[-1][:80] if s['failed'] else '?'} "
                        "| | | | | | |")
    stage_names = list(ours[0]["stages"]) if ours else []
    srows = ["| cells | workers | " + " | ".join(stage_names) + " |", "|---:|---:|" + "---:|" * len(stage_names)]
    for r in ours:
        srows.append(f"| {r['n_cells']:,} | {r['workers']} | "
                     + " | ".join(_fmt(r["stages"][s]["seconds"], 1) for s in stage_names) + " |")
    publish("scaling", "## Scaling (`python benchmarks/bench_scaling.py`)\n\n"
            "Matched stages: our select_features + spectral + neighbors + leiden against SnapATAC2's "
            "select_features + spectral + knn + leiden. Memory: peak RSS summed over every process of "
            "the run (client with the scheduler and nannies, and each worker; SnapATAC2: its process). "
            "Ratios are ours / SnapATAC2 from the same run.\n\n",
            [*rows, "", "Per-stage wall time (s):", "", *srows], echo=False)


if __name__ == "__main__":
    main()

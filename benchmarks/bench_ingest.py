"""Ingest benchmark: throughput (nnz/s) and peak memory, ours against the naive route.

For each size, a synthetic atlas (about 1,000 fragments per cell, 100k peaks) is exported
to the format under test, then ingested twice, each in its own process tree:

* **ours**: ``scatac-dist --workers 2 ingest`` (embedded LocalCluster of 2 processes);
* **naive**: read the whole matrix into memory, then ``anndata.write_zarr``:
  ``scipy.io.mmread`` for a 10x folder, a full ``h5py`` read for a 10x HDF5 (what
  ``scanpy.read_10x_h5`` does).

Memory is the peak resident set of the whole process tree (client, scheduler, nannies,
workers), sampled every 0.1 s with psutil, plus the largest single process. A run whose
tree passes ``--mem-guard`` GiB is stopped and reported as such (the machine has 24 GiB).

Writes ``benchmarks/results/ingest.json`` and ``benchmarks/results/ingest.png``
(``--report-only`` redraws the plot from the JSON).

Usage::

    python benchmarks/bench_ingest.py                      # the issue's sizes (~40 min)
    python benchmarks/bench_ingest.py --mtx 20000 --h5 50000   # a quick look
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, WORK, plots
from harness.memory import GIB as GiB
from harness.procs import run_measured
from harness.results import ResultsFile
from harness.stores import disk_bytes, ensure_atlas
from harness.timing import Timer

BIN = Path(sys.executable).parent
RESULTS_FILE = ResultsFile(RESULTS / "ingest.json", indent=2)

NAIVE_MTX = """
import sys, scipy.io, anndata as ad, pandas as pd
folder, out = sys.argv[1], sys.argv[2]
X = scipy.io.mmread(folder + "/matrix.mtx.gz").T.tocsr()
obs = pd.DataFrame(index=pd.read_csv(folder + "/barcodes.tsv", header=None)[0].astype(str).to_numpy())
bed = pd.read_csv(folder + "/peaks.bed", sep="\\t", header=None, names=["chr", "start", "end"])
bed.index = bed["chr"] + ":" + bed["start"].astype(str) + "-" + bed["end"].astype(str)
ad.AnnData(X=X, obs=obs, var=bed).write_zarr(out)
"""

NAIVE_H5 = """
import sys, h5py, scipy.sparse as sp, anndata as ad, pandas as pd
path, out = sys.argv[1], sys.argv[2]
with h5py.File(path) as f:
    m = f["matrix"]
    n_feat, n_cells = m["shape"][:]
    X = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=(n_feat, n_cells)).T.tocsr()
    obs = pd.DataFrame(index=m["barcodes"][:].astype(str))
    var = pd.DataFrame(index=m["features/id"][:].astype(str))
ad.AnnData(X=X, obs=obs, var=var).write_zarr(out)
"""


def measure(cmd: list[str], mem_guard: float, log: Path) -> dict:
    """Run ``cmd``; sample the RSS of its process tree every 0.1 s; stop it past ``mem_guard`` GiB."""
    m = run_measured(cmd, log=log, interval=0.1, max_rss_bytes=mem_guard * GiB)
    return {"wall_s": m.wall_s, "peak_rss_total_gib": m.peak_rss_tree / GiB,
            "peak_rss_single_gib": m.peak_rss_max_process / GiB, "returncode": m.returncode,
            "stopped_by_mem_guard": m.stopped == "memory", "log": str(log)}


def prepare(kind: str, n_cells: int, n_peaks: int, client) -> tuple[Path, int]:
    """A synthetic input of ``n_cells`` in the format ``kind`` (cached under benchmarks/work)."""
    from scatac_dist.io.export import export_10x_h5, export_10x_mtx
    from scatac_dist.store import open_atlas

    store = ensure_atlas(n_cells, WORK, n_peaks=n_peaks, name=f"syn_{n_cells}.zarr", client=client)
    atlas = open_atlas(store)
    if kind == "10x-mtx":
        path = WORK / f"mtx_{n_cells}" / "filtered_peak_bc_matrix"
        if not (path / "matrix.mtx.gz").exists():
            with Timer() as t:
                export_10x_mtx(atlas, path, compresslevel=1, progress=True)
            print(f"  exported mtx in {t.seconds:.0f} s", flush=True)
    else:
        path = WORK / f"h5_{n_cells}" / "filtered_peak_bc_matrix.h5"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with Timer() as t:
                export_10x_h5(atlas, path, compression="gzip", progress=True)
            print(f"  exported h5 in {t.seconds:.0f} s", flush=True)
    return path, atlas.nnz


def bench_one(kind: str, n_cells: int, args, client, results: list) -> None:
    print(f"== {kind}, {n_cells} cells", flush=True)
    src, nnz = prepare(kind, n_cells, args.peaks, client)
    rec = {"format": kind, "n_cells": n_cells, "n_peaks": args.peaks, "nnz": nnz,
           "input_bytes": disk_bytes(src.parent if kind == "10x-mtx" else src)}
    out = WORK / f"out_{kind}_{n_cells}.zarr"
    for route in ("ours", "naive"):
        shutil.rmtree(out, ignore_errors=True)
        if route == "ours":
            cmd = [str(BIN / "scatac-dist"), "--workers", str(args.workers), "--no-progress", "ingest",
                   str(src), "-o", str(out)]
        else:
            script = NAIVE_MTX if kind == "10x-mtx" else NAIVE_H5
            cmd = [sys.executable, "-c", script, str(src), str(out)]
        r = measure(cmd, args.mem_guard, WORK / f"log_{route}_{kind}_{n_cells}.txt")
        ok = r["returncode"] == 0 and out.exists()
        r["ok"] = ok
        r["nnz_per_s"] = nnz / r["wall_s"] if ok else None
        rec[route] = r
        print(f"  {route}: {'ok' if ok else 'FAILED'} {r['wall_s']:.1f} s, "
              f"{(r['nnz_per_s'] or 0) / 1e6:.2f} M nnz/s, peak RSS tree {r['peak_rss_total_gib']:.2f} GiB "
              f"(largest process {r['peak_rss_single_gib']:.2f} GiB)"
              + (" [stopped by memory guard]" if r["stopped_by_mem_guard"] else ""), flush=True)
    shutil.rmtree(out, ignore_errors=True)
    if rec["ours"]["ok"] and rec["naive"]["ok"]:
        rec["throughput_ratio_ours_over_naive"] = rec["ours"]["nnz_per_s"] / rec["naive"]["nnz_per_s"]
        rec["memory_ratio_ours_over_naive"] = rec["ours"]["peak_rss_total_gib"] / rec["naive"]["peak_rss_total_gib"]
    results.append(rec)


def plot(results: list, path: Path) -> None:
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for kind, marker in (("10x-mtx", "o"), ("10x-h5", "s")):
        rows = sorted((r for r in results if r["format"] == kind), key=lambda r: r["nnz"])
        for route, color in (("ours", "#1b7837"), ("naive", "#b2182b")):
            pts = [(r["nnz"], r[route]) for r in rows]
            x = [n / 1e6 for n, m in pts]
            axes[0].plot(x, [m["peak_rss_total_gib"] for _, m in pts], marker=marker, color=color,
                         ls="-" if kind == "10x-mtx" else "--", label=f"{route}, {kind}")
            for xi, (_, m) in zip(x, pts):
                if not m["ok"]:
                    axes[0].annotate("stopped" if m["stopped_by_mem_guard"] else "failed", (xi, m["peak_rss_total_gib"]),
                                     textcoords="offset points", xytext=(4, 4), fontsize=8, color=color)
            ok = [(n / 1e6, m["nnz_per_s"] / 1e6) for n, m in pts if m["ok"]]
            if ok:
                axes[1].plot(*zip(*ok), marker=marker, color=color, ls="-" if kind == "10x-mtx" else "--",
                             label=f"{route}, {kind}")
    axes[0].axhline(2, color="grey", lw=0.8, ls=":")
    axes[0].set(xlabel="input nnz (millions)", ylabel="peak RSS of the process tree (GiB)",
                title="memory: ours is bounded by the chunk", xscale="log")
    axes[1].set(xlabel="input nnz (millions)", ylabel="throughput (M nnz/s)", title="ingest throughput",
                xscale="log")
    for ax in axes:
        ax.legend(fontsize=8)
    plots.save(fig, path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mtx", type=int, nargs="*", default=[25_000, 50_000, 200_000],
                    help="cell counts for the 10x folder runs")
    ap.add_argument("--h5", type=int, nargs="*", default=[100_000, 300_000, 1_000_000],
                    help="cell counts for the 10x HDF5 runs")
    ap.add_argument("--peaks", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mem-guard", type=float, default=18.0, help="GiB; stop a run whose tree passes it")
    ap.add_argument("--keep-inputs", action="store_true", help="keep generated inputs in benchmarks/work")
    ap.add_argument("--report-only", action="store_true", help="redraw ingest.png from ingest.json")
    args = ap.parse_args()
    if args.report_only:
        plot(RESULTS_FILE.load()["results"], RESULTS / "ingest.png")
        return

    from scatac_dist.cluster import get_client

    WORK.mkdir(exist_ok=True)
    client = get_client(n_workers=args.workers, dashboard_address=":0")
    results: list = []
    meta = {"machine": {"cores": os.cpu_count(), "memory_gib": psutil.virtual_memory().total / GiB},
            "workers": args.workers, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        for kind, sizes in (("10x-mtx", args.mtx), ("10x-h5", args.h5)):
            for n in sizes:
                bench_one(kind, n, args, client, results)
                RESULTS_FILE.save({**meta, "results": results})
    finally:
        client.close()
    plot(results, RESULTS / "ingest.png")
    print(f"wrote {RESULTS / 'ingest.json'} and {RESULTS / 'ingest.png'}")
    if not args.keep_inputs:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()

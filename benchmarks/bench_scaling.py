"""Scaling benchmark: every capability on atlases of growing size, SnapATAC2 beside the
pipeline in the same run, and the report ``benchmarks/SCALING.md``.

Atlases (``--preset``, ``--peaks``, ``--sizes``), each generated once into ``--scratch``
(``$SCATAC_BENCH_SCRATCH`` or ``benchmarks/work``) and reused, a partial one generated again:

* ``mouse``, ``human``: ``datasets.synthesize_like(like=PRESET, n_cells=N, n_peaks=P, seed=0)``,
  ``{preset}_{N}k_{P}kp.zarr``;
* ``synthetic``: ``datasets.synthesize`` (10 types, seed 0; ``harness.stores.ensure_atlas``),
  ``synth_{N}k.zarr`` at 100k peaks (the stores earlier runs made), ``synth_{N}k_{P}kp.zarr``
  otherwise;
* ``scmvp_epoch`` runs on a joint RNA + ATAC synthetic atlas of the same size
  (``multiome_{N}k_{P}kp_2000g.zarr``), once per size whatever the presets, recorded under
  preset ``synthetic``.

On each atlas, each capability of ``--capabilities`` (``scaling_capabilities.py`` says what
each runs and measures) runs in a fresh process tree for each W of ``--workers``: wall time
per stage, peak RSS of the whole tree and of its largest process, bytes read from the store
and ``read_chars``, the Dask tasks per stage. A run is stopped at ``--timeout`` or
``--max-rss``; one whose time, extrapolated from the same series on fewer cells (log-log,
slope at least 1), passes ``--timeout`` is skipped and recorded as such (``--no-skip`` runs
it anyway): top-k Jaccard is ``O(n^2)`` by design. Then SnapATAC2 2.9 runs its matched pipeline on
the same store (``snapatac2_runner.py``, all cores, backed mode above 1e8 stored values) until
it fails, passes ``--snap-max-rss`` or ``--snap-timeout`` (larger atlases of that preset and
peak count are then skipped for it).

Results are keyed by (preset, n_peaks, n_cells, capability, system, workers) in ``--out``
(default ``benchmarks/results/scaling.json``), written after every run; rows from before this
layout are read as preset ``synthetic``, 100k peaks, capability ``pipeline``. The report
(``scaling_report.py``): ``benchmarks/SCALING.md``, ``results/scaling_time.png`` and
``scaling_memory.png`` and the ``scaling`` block of ``RESULTS.md`` for the default ``--out``;
beside the JSON (``NAME.md``, ``NAME_time.png``, ``NAME_memory.png``) for any other.
``--report-only`` redraws it from the JSON.

Usage::

    python benchmarks/bench_scaling.py [--preset mouse human synthetic] [--peaks 100000 500000]
        [--sizes 10000 100000 1000000] [--capabilities all | ingest pipeline jaccard sccase
        scale_epoch scembed_epoch scmvp_epoch] [--workers 2] [--out JSON] [--scratch DIR]
        [--timeout S] [--max-rss GIB] [--no-skip] [--snap-timeout S] [--snap-max-rss GIB] [--no-snap]
        [--snap-sizes N ...] [--sccase-iters 5] [--epoch-cells N] [--scale-preprocess]
        [--bandwidth GBPS] [--report-only]
    python benchmarks/bench_scaling.py --small      # make bench-scaling: a few minutes
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import BENCH, RESULTS
from harness.memory import GIB
from harness.reads import ReadSampler
from harness.results import read_json, write_json
from harness.stores import count_name, ensure_atlas, ensure_like_atlas, ensure_multiome_atlas, scratch
from scaling_capabilities import CAPABILITIES, KEY, launch_child, run_ingest
from scaling_report import BANDWIDTH, ReportPaths, write_report

SCRIPT = Path(__file__).resolve()
JSON_OUT = RESULTS / "scaling.json"
PRESETS = ("mouse", "human", "synthetic")
#: ``--small`` (``make bench-scaling``): what it sets unless given
SMALL = {"preset": ["mouse"], "peaks": [20_000], "sizes": [2_000, 5_000], "out": RESULTS / "scaling_small.json",
         "epoch_cells": 2_000}
DEFAULTS = {"preset": ["mouse", "human"], "peaks": [100_000], "sizes": [10_000, 100_000, 1_000_000], "out": JSON_OUT,
            "epoch_cells": None}


# --------------------------------------------------------------------------- results file


def load_results(path: Path) -> dict:
    """The results at ``path``; rows from before presets and capabilities existed get
    preset ``synthetic``, 100k peaks, capability ``pipeline`` and ``time_s``."""
    res = read_json(path, {}) or {}
    res.setdefault("runs", [])
    for r in res["runs"]:
        r.setdefault("preset", "synthetic")
        r.setdefault("n_peaks", 100_000)
        r.setdefault("capability", "pipeline")
        if "time_s" not in r and "failed" not in r:
            r["time_s"] = r.get("total_s") if r["system"] == "scatac-dist" else r.get("matched_s")
    res["version"] = 2
    return res


def upsert(results: dict, run: dict, path: Path) -> None:
    """Put ``run`` in place of any earlier run with the same key, and write the file."""
    key = tuple(run.get(k) for k in KEY)
    results["runs"] = [r for r in results["runs"] if tuple(r.get(k) for k in KEY) != key] + [run]
    write_json(path, results, indent=1)


# --------------------------------------------------------------------------- atlases


def atlas_for(preset: str, n: int, peaks: int, folder: Path) -> Path:
    """The store of ``preset`` at ``n`` cells x ``peaks`` (generated once, see the module docstring)."""
    if preset == "synthetic":
        name = None if peaks == 100_000 else f"synth_{count_name(n)}_{count_name(peaks)}p.zarr"
        return ensure_atlas(n, folder, n_peaks=peaks, name=name)
    return ensure_like_atlas(preset, n, peaks, folder)


def projected_seconds(results: dict, key: dict) -> float | None:
    """The time of run ``key``: its own earlier successful run's, when there is one (so a
    measured run is run again, never replaced by a projection), else extrapolated from the
    same series' successful runs on fewer cells: log-log through the two largest (slope at
    least 1), or linear from one; ``None`` without any."""
    same = sorted((r for r in results["runs"] if "failed" not in r and r.get("time_s")
                   and r["system"] == "scatac-dist" and r["n_cells"] <= key["n_cells"]
                   and all(r.get(k) == key[k] for k in ("preset", "n_peaks", "capability", "workers"))),
                  key=lambda r: r["n_cells"])
    if not same:
        return None
    if same[-1]["n_cells"] == key["n_cells"]:
        return same[-1]["time_s"]
    last = same[-1]
    slope = 1.0
    if len(same) > 1:
        prev = same[-2]
        slope = max(1.0, np.log(last["time_s"] / prev["time_s"]) / np.log(last["n_cells"] / prev["n_cells"]))
    return last["time_s"] * (key["n_cells"] / last["n_cells"]) ** slope


# --------------------------------------------------------------------------- SnapATAC2


def run_snap(store: Path, tmp: Path, timeout: float, max_rss: float) -> dict:
    """SnapATAC2's matched pipeline on ``store`` in its own process; ``read_chars`` of its
    tree sampled from here (zarr-to-h5ad copy of backed mode included)."""
    from snapatac2_runner import run_snapatac2

    import scatac_dist as sd
    from scatac_dist.tl.metrics import ari

    outdir = tmp / f"snap_{store.stem}"
    with ReadSampler(os.getpid(), 0.5, exclude_root=True) as reads:
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
    return {"system": "snapatac2", "n_cells": r["input"]["n_obs"], "nnz": r["input"].get("nnz"), "mode": r["mode"],
            "stages": {s: {"seconds": t[s], "peak_rss_tree": r["memory"]["peak_rss_per_step_bytes"].get(s, 0)}
                       for s in ("select_features", "spectral", "knn", "leiden")},
            "convert_s": t.get("convert", 0.0), "load_s": t.get("load", 0.0),
            "matched_s": t["total"], "time_s": t["total"], "peak_rss_tree": r["memory"]["peak_rss_external_bytes"],
            "read_chars": reads.read_chars, "subprocess_wall_s": r.get("subprocess_wall_s"),
            "quality": {"leiden_ari": ari(truth, labels), "leiden_k": r["n_clusters"]}}


# --------------------------------------------------------------------------- driver


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", nargs="+", action="extend", choices=PRESETS,
                    help="atlases: mouse, human (datasets.synthesize_like), synthetic (default: mouse human)")
    ap.add_argument("--peaks", type=int, nargs="+", help="peaks per atlas (default 100000; the issue: 100000 500000)")
    ap.add_argument("--sizes", type=int, nargs="+", help="cells (default 10000 100000 1000000)")
    ap.add_argument("--capabilities", nargs="+", default=["all"], choices=["all", *CAPABILITIES])
    ap.add_argument("--workers", type=int, nargs="+", default=[2], help="Dask worker processes (default 2)")
    ap.add_argument("--out", type=Path, help=f"results JSON (default {JSON_OUT.relative_to(BENCH.parent)})")
    ap.add_argument("--scratch", type=Path, help="atlases and run folders (default $SCATAC_BENCH_SCRATCH or benchmarks/work)")
    ap.add_argument("--small", action="store_true",
                    help="a small version: --preset mouse --peaks 20000 --sizes 2000 5000 --epoch-cells 2000 "
                         "--out benchmarks/results/scaling_small.json, unless given")
    ap.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds; one of our runs is stopped beyond it")
    ap.add_argument("--max-rss", type=float, default=20.0, help="GiB; one of our runs is stopped beyond it")
    ap.add_argument("--no-skip", action="store_true",
                    help="run every size even when the smaller ones project past --timeout (skipped by default)")
    ap.add_argument("--snap-timeout", type=float, default=3600.0, help="seconds (default 3600)")
    ap.add_argument("--snap-max-rss", type=float, default=20.0, help="GiB; SnapATAC2 is stopped beyond it")
    ap.add_argument("--no-snap", action="store_true")
    ap.add_argument("--snap-sizes", type=int, nargs="+", help="sizes at which to run SnapATAC2 (default: all)")
    ap.add_argument("--sccase-iters", type=int, default=5, help="scCASE iterations (tol 0; default 5)")
    ap.add_argument("--epoch-cells", type=int,
                    help="SCALE and scMVP: train this many cells' worth of steps and project the epoch "
                         "(default: a whole epoch)")
    ap.add_argument("--scale-preprocess", action="store_true", help="SCALE's own cell and peak filter on")
    ap.add_argument("--keep-exports", action="store_true", help="keep the 10x .h5 exports made for ingest")
    ap.add_argument("--bandwidth", type=float, default=BANDWIDTH / 1e9,
                    help="GB/s of the shared link in the scale-out model (default 1.25, 10 Gb/s)")
    ap.add_argument("--report-only", action="store_true", help="redraw the report from the JSON")
    ap.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    return ap


def _settle(args) -> None:
    base = SMALL if args.small else DEFAULTS
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if "all" in args.capabilities:
        args.capabilities = list(CAPABILITIES)
    args.capabilities = [c for c in CAPABILITIES if c in args.capabilities]
    args.scratch = args.scratch or scratch()


def measure(args, results: dict) -> None:
    results["machine"] = {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
                          "python": platform.python_version()}
    work = args.scratch / "scaling_runs"
    options = {"sccase_iters": args.sccase_iters, "epoch_cells": args.epoch_cells,
               "scale_preprocess": args.scale_preprocess}
    multiome_done: set = set()
    for preset in args.preset:
        for peaks in args.peaks:
            snap_ok = not args.no_snap and "pipeline" in args.capabilities
            for n in args.sizes:
                try:
                    store = atlas_for(preset, n, peaks, args.scratch)
                except Exception as exc:  # no generator for the preset (yet), a disk full: say so, go on
                    print(f"{preset} {n} x {peaks}: no atlas: {exc}", flush=True)
                    for cap in args.capabilities:
                        if cap != "scmvp_epoch":
                            for w in args.workers:
                                upsert(results, {"preset": preset, "n_peaks": peaks, "n_cells": n, "capability": cap,
                                                 "system": "scatac-dist", "workers": w,
                                                 "failed": f"atlas: {type(exc).__name__}: {exc}"}, args.out)
                    store = None
                for cap in args.capabilities:
                    for w in args.workers:
                        key = {"preset": preset, "n_peaks": peaks, "n_cells": n, "capability": cap, "workers": w}
                        if cap == "scmvp_epoch":
                            if (peaks, n, w) in multiome_done:
                                continue
                            multiome_done.add((peaks, n, w))
                            key["preset"] = "synthetic"
                            cap_store = ensure_multiome_atlas(n, peaks, folder=args.scratch)
                        elif store is None:
                            continue
                        else:
                            cap_store = store
                        print(f"== {cap}: {key['preset']}, {n:,} cells x {peaks:,} peaks, {w} worker(s)", flush=True)
                        guess = None if args.no_skip else projected_seconds(results, key)
                        if guess is not None and guess > args.timeout:
                            upsert(results, key | {"system": "scatac-dist", "failed": (
                                f"skipped: {guess:,.0f} s projected from fewer cells passes --timeout "
                                f"{args.timeout:,.0f} s")}, args.out)
                            print(f"  skipped: {guess:,.0f} s projected", flush=True)
                            continue
                        if cap == "ingest":
                            r = run_ingest(cap_store, key, work, timeout=args.timeout, max_rss=args.max_rss,
                                           keep_export=args.keep_exports)
                        else:
                            r = launch_child(SCRIPT, key | options | {"store": str(cap_store)}, work,
                                             timeout=args.timeout, max_rss=args.max_rss)
                        r.update(key, system="scatac-dist")
                        upsert(results, r, args.out)
                        print(f"  {r.get('failed') or 'ok'}: {r.get('time_s') or 0:,.1f} s, all processes "
                              f"{(r.get('peak_rss_tree') or 0) / GIB:.2f} GiB, largest "
                              f"{(r.get('peak_rss_max_process') or 0) / GIB:.2f} GiB, store read "
                              f"{(r.get('store_read_bytes') or 0) / 1e9:.2f} GB", flush=True)
                if store is not None and snap_ok and (args.snap_sizes is None or n in args.snap_sizes):
                    print(f"== SnapATAC2: {preset}, {n:,} cells x {peaks:,} peaks", flush=True)
                    r = run_snap(store, work, args.snap_timeout, args.snap_max_rss)
                    r.update(preset=preset, n_peaks=peaks, n_cells=n, capability="pipeline", workers=os.cpu_count())
                    upsert(results, r, args.out)
                    print("  " + (r.get("failed") or f"{r['matched_s']:.1f} s matched stages"), flush=True)
                    snap_ok = "failed" not in r


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.child:
        from scaling_capabilities import run_child

        run_child(read_json(args.child))
        return
    _settle(args)
    args.out = Path(args.out).resolve()
    results = load_results(args.out)
    if not args.report_only:
        command = "python benchmarks/bench_scaling.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        results["last_command"] = command
        measure(args, results)
    write_report(results, ReportPaths.for_results(args.out, JSON_OUT, BENCH), json_path=args.out,
                 bandwidth=args.bandwidth * 1e9, command=results.get("last_command"))


if __name__ == "__main__":
    main()

"""The default pipeline through `--cluster slurm` against the same run on a LocalCluster: same
machine, same run, same atlas, same worker count and memory, and where the difference goes.

Both runs are the CLI as a user types it, on fresh copies of the synthetic atlas
(``harness.stores.ensure_atlas``: 10 types, seed 0, 100k peaks):

* **local**: ``scatac-dist --workers W --memory-limit M run STORE``;
* **slurm**: ``scatac-dist --cluster slurm --jobs W --job-cores 1 --job-memory M run STORE``
  against a real single-node SLURM (tests/slurm/local-slurm.sh; ``SLURM_CONF`` if one runs).

The order alternates over ``--repeats`` pairs. Each run's summary (``uns/scatac_dist/run_<id>``)
gives the per-stage wall times and bytes transferred; the client's log gives the time from job
submission to the first worker (queue + job start + worker start-up). Output:
``benchmarks/results/slurm.json``, ``slurm.png`` and the block in RESULTS.md.

Usage::

    python benchmarks/bench_slurm.py [--cells 100000] [--workers 2] [--memory 6GiB] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, WORK, plots
from harness.report import publish
from harness.results import write_json
from harness.stores import copy_store, ensure_atlas

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("scatac-dist"))
OUT = RESULTS / "slurm.json"


def slurm_env() -> tuple[dict, str | None]:
    """The environment with a running SLURM, starting a local one if none runs; the folder to stop."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if env.get("SLURM_CONF") and subprocess.run(["sinfo"], env=env, capture_output=True).returncode == 0:
        return env, None
    folder = tempfile.mkdtemp(prefix="bench-slurm-")
    subprocess.run([str(REPO / "tests/slurm/local-slurm.sh"), "start", folder], check=True)
    env["SLURM_CONF"] = f"{folder}/slurm.conf"
    return env, folder


def _ts(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def run_once(kind: str, store: Path, workers: int, memory: str, env: dict) -> dict:
    if kind == "local":
        cmd = [CLI, "--workers", str(workers), "--memory-limit", memory]
    else:
        cmd = [CLI, "--cluster", "slurm", "--jobs", str(workers), "--job-cores", "1", "--job-memory", memory]
    cmd += ["--no-progress", "run", str(store)]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if r.returncode:
        raise SystemExit(f"{kind} run failed:\n{r.stderr[-3000:]}")
    import scatac_dist as sd

    a = sd.Atlas(store)
    summary = list(a.runs().values())[-1]
    lines = r.stderr.splitlines()
    start = {}
    for ln in lines:
        if re.match(r"\d{4}-\d\d-\d\d ", ln):
            if "worker jobs submitted" in ln:
                start["submitted"] = _ts(ln)
            elif "worker(s) joined after" in ln:
                start["first_worker"] = _ts(ln)
    return {
        "kind": kind, "wall_s": wall, "command": " ".join(cmd[1:]),
        "run_s": summary["wall_s"],  # from the client's start to the summary (cluster start excluded)
        "stages": {s["stage"]: {"wall_s": s["wall_s"], "tasks": s["tasks"], "bytes_transferred": s["bytes_transferred"],
                                "peak_worker": max(s["peak_memory_per_worker"].values(), default=0)}
                   for s in summary["stages"]},
        "job_start_s": (start["first_worker"] - start["submitted"]) if len(start) == 2 else None,
        "bytes_transferred": summary["totals"]["bytes_transferred"],
        "peak_worker": summary["totals"]["peak_memory_worker"],
    }


def report(res: dict) -> None:
    runs = res["runs"]
    by = {k: [r for r in runs if r["kind"] == k] for k in ("local", "slurm")}

    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    wl, ws = med([r["wall_s"] for r in by["local"]]), med([r["wall_s"] for r in by["slurm"]])
    stages = list(by["local"][0]["stages"])
    lines = [f"Atlas: {res['cells']:,} cells x {res['peaks']:,} peaks (synthetic, seed 0); {res['workers']} workers "
             f"of {res['memory']} each, 1 thread; {len(by['local'])} runs each way, alternating, medians. "
             f"Machine: {res['machine']}.", "",
             "| | local (`--workers`) | SLURM (`--cluster slurm --jobs`) | ratio |", "|---|---:|---:|---:|",
             f"| whole command, s | {wl:.1f} | {ws:.1f} | **{ws / wl:.3f}** |"]
    js = med([r["job_start_s"] for r in by["slurm"] if r["job_start_s"] is not None])
    lines.append(f"| submit to first worker (queue, job start, worker start-up), s | - | {js:.1f} | |")
    for st in stages:
        a = med([r["stages"][st]["wall_s"] for r in by["local"]])
        b = med([r["stages"][st]["wall_s"] for r in by["slurm"]])
        lines.append(f"| stage {st}, s | {a:.1f} | {b:.1f} | {b / a if a else float('nan'):.2f} |")
    tl = med([r["bytes_transferred"] for r in by["local"]]) / 2**20
    tsl = med([r["bytes_transferred"] for r in by["slurm"]]) / 2**20
    lines.append(f"| bytes transferred between workers, MiB | {tl:,.0f} | {tsl:,.0f} | |")
    pl = med([r["peak_worker"] for r in by["local"]]) / 2**20
    ps = med([r["peak_worker"] for r in by["slurm"]]) / 2**20
    lines.append(f"| peak memory of the largest worker, MiB | {pl:,.0f} | {ps:,.0f} | |")
    spread = {k: (min(r["wall_s"] for r in v), max(r["wall_s"] for r in v)) for k, v in by.items()}
    stage_sum = {k: med([sum(s["wall_s"] for s in r["stages"].values()) for r in v]) for k, v in by.items()}
    lines += ["", f"SLURM / local wall time: **{ws / wl:.3f}x** (goal: within 1.2x). The difference, {ws - wl:+.1f} s, has "
              f"two parts: {js:.1f} s from `sbatch` to the first worker (job start and worker start-up; no queue wait on "
              f"this idle single-node SLURM), and {stage_sum['slurm'] - stage_sum['local']:+.1f} s in the stages "
              f"({stage_sum['local']:.0f} s local, {stage_sum['slurm']:.0f} s SLURM), about as much as two runs "
              f"of the same kind differ (local {spread['local'][0]:.0f}-{spread['local'][1]:.0f} s, SLURM "
              f"{spread['slurm'][0]:.0f}-{spread['slurm'][1]:.0f} s). Data transfer is the same work either way "
              f"({tl:,.0f} against {tsl:,.0f} MiB): the workers are the same `dask worker` processes, one per job "
              "here, on the same node. On a real cluster the queue wait adds to the job start; it is the "
              "batch system's, and `--adapt` lets a run start with the first job that gets a node. (The whole "
              "command includes starting the cluster, which a LocalCluster spends too: the two parts add to more "
              "than the difference.)"]
    publish("slurm", "## Pipeline through `--cluster slurm` against a LocalCluster (`python "
            "benchmarks/bench_slurm.py`)\n\n", lines, md=RESULTS / "slurm.md")
    fig, ax = plots.pyplot().subplots(figsize=(9, 4))
    x = range(len(stages))
    ax.bar([i - 0.2 for i in x], [med([r["stages"][s]["wall_s"] for r in by["local"]]) for s in stages], 0.4,
           label=f"LocalCluster ({wl:.0f} s in all)")
    ax.bar([i + 0.2 for i in x], [med([r["stages"][s]["wall_s"] for r in by["slurm"]]) for s in stages], 0.4,
           label=f"--cluster slurm ({ws:.0f} s in all, {js:.1f} s to the first worker)")
    ax.set_xticks(list(x), stages, rotation=30, ha="right")
    ax.set_ylabel("seconds")
    ax.set_title(f"default pipeline, {res['cells']:,} cells, {res['workers']} workers: per-stage wall time")
    ax.legend()
    plots.save(fig, RESULTS / "slurm.png", tight=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--peaks", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory", default="6GiB")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.report_only:
        return report(json.loads(OUT.read_text()))
    import platform

    import psutil

    store = ensure_atlas(args.cells, n_peaks=args.peaks)
    env, started = slurm_env()
    res = {"command": "python benchmarks/bench_slurm.py " + " ".join(sys.argv[1:]), "cells": args.cells,
           "peaks": args.peaks, "workers": args.workers, "memory": args.memory,
           "machine": f"{platform.node()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
           "runs": []}
    try:
        for i in range(args.repeats):
            for kind in (("local", "slurm") if i % 2 == 0 else ("slurm", "local")):
                work = copy_store(store, WORK / f"bench_slurm_{kind}.zarr")
                r = run_once(kind, work, args.workers, args.memory, env)
                print(f"{kind}: {r['wall_s']:.1f} s", flush=True)
                res["runs"].append(r)
                shutil.rmtree(work, ignore_errors=True)
                write_json(OUT, res, indent=1)
    finally:
        if started:
            subprocess.run([str(REPO / "tests/slurm/local-slurm.sh"), "stop", started])
    report(res)


if __name__ == "__main__":
    main()

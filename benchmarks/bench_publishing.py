"""What stage-atomic publishing and the store lock cost on the 1M-cell pipeline: the same
stage outputs published the old way and the new way, on the same store, in the same run.

The child runs the default pipeline (``n_clusters=10``, every stage with ``force=True``) on
the 1M-cell synthetic atlas (``harness.stores.ensure_atlas``: seed 0, 100k peaks) with the
current code, timing each stage and, inside it, the publishing machinery (the hard-linked
working copy, consolidating metadata, the swap, removing the old tree, taking the lock).
Then, for every stage, it publishes that stage's outputs again (read back from the store:
the elements and table columns its record lists, plus its two provenance records) twice:

* **before**: with the store module as it was at ``--before`` (default ``6db50f4``, the last
  commit before issue 23: every element staged and swapped in on its own, consolidated
  metadata rewritten after each one, no lock), unpacked by ``git archive`` into
  ``benchmarks/work/src-REV`` and imported under another package name;
* **after**: the same writes inside one ``Atlas.publishing(stage)`` block (lock included).

Each way runs three times, alternating which goes first; the medians are reported.

The stages' computation is the same code in both, so the pipeline's time before is its time
after minus the difference in publishing. ``--full-before`` also runs the whole pipeline with
the old package in a second child (about as long again). Results:
``benchmarks/results/publishing.json``, ``publishing.png``, and the block in RESULTS.md.

Usage::

    python benchmarks/bench_publishing.py [--cells 1000000] [--workers 2] [--before REV]
        [--full-before] [--report-only]
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, WORK, plots
from harness.children import local_cluster
from harness.procs import run_child
from harness.report import publish
from harness.results import ResultsFile, write_json
from harness.stores import ensure_atlas

REPO = Path(__file__).resolve().parents[1]
RESULTS_FILE = ResultsFile(RESULTS / "publishing.json", indent=2)
OLD_PACKAGE = "scatac_dist_before"
REPEATS = 3  # each stage's outputs are published this many times each way; medians reported


# --------------------------------------------------------------------------- the child


def _instrument(variant: str) -> dict[str, list[float]]:
    """Wrap the publishing machinery so each call's seconds are recorded under its name."""
    import shutil

    import zarr

    import scatac_dist.store as store

    spent: dict[str, list[float]] = {}

    def timed(name, fn):
        def run(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent.setdefault(name, []).append(time.perf_counter() - t0)
        return run

    zarr.consolidate_metadata = timed("consolidate", zarr.consolidate_metadata)
    store.replace_dir = timed("swap", store.replace_dir)
    if variant == "after":
        import scatac_dist.lock as lock

        store.clone_tree = timed("working_copy", store.clone_tree)
        lock._acquire = timed("lock", lock._acquire)
        real_rmtree = shutil.rmtree

        def rmtree(path, *a, **kw):  # only the swapped-out trees of publications
            if ".publish-" in str(path):
                return timed("remove_old_tree", real_rmtree)(path, *a, **kw)
            return real_rmtree(path, *a, **kw)

        store.shutil.rmtree = rmtree
    return spent


def _outputs(atlas, stage: str) -> tuple[list[str], list[str], list[str]]:
    """(element paths, obs columns, var columns) that a stage's pipeline record lists."""
    rec = atlas.provenance()[f"pipeline_{stage}"]
    elements = [o for o in rec["outputs"] if ":" not in o]
    obs = [o.split(":", 1)[1] for o in rec["outputs"] if o.startswith("obs:")]
    var = [o.split(":", 1)[1] for o in rec["outputs"] if o.startswith("var:")]
    return elements, obs, var


def replay(atlas, old_atlas, stage: str) -> dict:
    """Publish ``stage``'s outputs again, the old way and the new way; seconds of each."""
    elements, obs_cols, var_cols = _outputs(atlas, stage)
    values = {e: atlas.read(e) for e in elements if not e.startswith("uns/scatac_dist/")}
    recs = {e: atlas.read(e) for e in elements if e.startswith("uns/scatac_dist/")}
    recs[f"uns/scatac_dist/pipeline_{stage}"] = atlas.read(f"uns/scatac_dist/pipeline_{stage}")
    obs = atlas.obs[obs_cols] if obs_cols else None
    var = atlas.var[var_cols] if var_cols else None

    def writes(a, publish_one):
        if obs is not None:
            a.write_obs({c: obs[c] for c in obs.columns})
        if var is not None:
            a.write_var({c: var[c] for c in var.columns})
        for e, v in {**values, **recs}.items():
            publish_one(a, e, v)

    def old_way():
        writes(old_atlas, lambda a, e, v: a._publish(e, v))

    def new_way():
        with atlas.publishing(f"replay_{stage}"):
            writes(atlas, lambda a, e, v: a._publish(e, v))

    times = {"before": [], "after": []}
    for rep in range(REPEATS):  # alternating, so that neither way always meets a warm cache
        for name, way in ((("before", old_way), ("after", new_way)) if rep % 2 == 0
                          else (("after", new_way), ("before", old_way))):
            t0 = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - t0)
    return {"before_s": float(np.median(times["before"])), "after_s": float(np.median(times["after"])),
            "before_all_s": times["before"], "after_all_s": times["after"], "elements": len(values) + len(recs),
            "obs_columns": len(obs_cols), "var_columns": len(var_cols)}


def child(variant: str, store: str, workers: int, out: str, old_src: str) -> None:
    spent = _instrument(variant)
    import scatac_dist as sd
    from scatac_dist.pipeline import default_stages, run_stages

    with local_cluster(workers, 1, "10GiB") as client:
        atlas = sd.Atlas(store)
        stages = default_stages(n_clusters=10)
        stage_s, machinery = {}, {}
        for st in stages:
            before = {k: sum(v) for k, v in spent.items()}
            t0 = time.perf_counter()
            run_stages(atlas, [st], client=client, force=True, progress=False)
            stage_s[st.name] = time.perf_counter() - t0
            machinery[st.name] = {k: sum(v) - before.get(k, 0.0) for k, v in spent.items()
                                  if sum(v) - before.get(k, 0.0) > 0}
            print(f"  {variant} {st.name}: {stage_s[st.name]:.1f} s (publishing {machinery[st.name]})", flush=True)
        replays = {}
        if variant == "after":
            sys.path.insert(0, old_src)
            old = importlib.import_module(f"{OLD_PACKAGE}.store")
            old_atlas = old.Atlas(store)
            for st in stages:
                replays[st.name] = replay(atlas, old_atlas, st.name)
                print(f"  replay {st.name}: {replays[st.name]}", flush=True)
    files = sum(len(f) for _, _, f in os.walk(store))
    write_json(out, {"variant": variant, "package": sd.__file__, "n_cells": atlas.n_obs, "nnz": atlas.nnz,
                     "files_in_store": files, "stages_s": stage_s, "publishing_s": machinery,
                     "calls": {k: len(v) for k, v in spent.items()}, "replays": replays,
                     "total_s": sum(stage_s.values()),
                     "publishing_total_s": sum(sum(m.values()) for m in machinery.values())}, indent=2)


# --------------------------------------------------------------------------- the parent


def before_source(rev: str) -> Path:
    """The package as it was at ``rev``, unpacked once into ``benchmarks/work/src-REV``, both
    as ``scatac_dist`` (for ``--full-before``) and as ``scatac_dist_before`` (for the replays,
    beside the current package in one process)."""
    dst = WORK / f"src-{rev}"
    if not (dst / OLD_PACKAGE / "__init__.py").exists():
        dst.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "scatac_dist"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
        shutil.copytree(dst / "scatac_dist", dst / OLD_PACKAGE)
    return dst


def run_variant(variant: str, store: Path, workers: int, rev: str) -> dict:
    out = WORK / f"publishing_{variant}.json"
    env = dict(os.environ)
    if variant == "before":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(before_source(rev)), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", variant, str(store), str(workers), str(out),
           str(before_source(rev))]
    res = run_child(cmd, out, check=True, wall_key=None, env=env)
    expected = str(before_source(rev)) if variant == "before" else str(REPO)
    assert res["package"].startswith(expected), (variant, res["package"])
    return res


def report(data: dict) -> None:
    a, full = data.get("after"), data.get("before")
    if not a:
        return
    stages = list(a["stages_s"])
    rp = a["replays"]
    lines = [f"`{data['command']}` on {data['machine']}, {data['workers']} workers, {a['n_cells']:,} cells "
             f"(nnz {a['nnz']:,}, {a['files_in_store']:,} files in the store at the end). Publishing "
             f"before/after: the stage's outputs published again the old way (`{data['before_rev']}`, "
             "per element) and the new way (one publication, lock included) on the same store.", "",
             "| stage | stage total, after (s) | publishing machinery in it (s) | publishing before (s) | "
             "publishing after (s) | after - before (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in stages:
        mach = sum(a["publishing_s"].get(s, {}).values())
        r = rp[s]
        lines.append(f"| {s} | {a['stages_s'][s]:.1f} | {mach:.2f} | {r['before_s']:.2f} | {r['after_s']:.2f} | "
                     f"{r['after_s'] - r['before_s']:+.2f} |")
    pb, pa = sum(r["before_s"] for r in rp.values()), sum(r["after_s"] for r in rp.values())
    total = a["total_s"]
    lines.append(f"| **all** | **{total:.0f}** | **{a['publishing_total_s']:.1f}** | **{pb:.1f}** | **{pa:.1f}** | "
                 f"**{pa - pb:+.1f}** |")
    lines += ["", f"Pipeline with stage-atomic publishing and the lock: {total:.0f} s; the same computation "
              f"with the old publishing: {total - (pa - pb):.0f} s; ratio {total / (total - (pa - pb)):.3f}."]
    parts = {}
    for m in a["publishing_s"].values():
        for k, v in m.items():
            parts[k] = parts.get(k, 0.0) + v
    lines += ["", "Machinery in the pipeline run, summed over the stages: " +
              ", ".join(f"{k} {v:.2f} s ({a['calls'].get(k, 0)} calls)" for k, v in sorted(parts.items())) + "."]
    if full:
        lines += ["", f"Whole pipeline with the old package in a second child: {full['total_s']:.0f} s "
                  f"(after/before {total / full['total_s']:.3f}; the stages' own run-to-run spread included)."]
    publish("publishing", "## Cost of stage-atomic publishing and the store lock (`python "
            "benchmarks/bench_publishing.py`)\n\n", lines, md=RESULTS / "publishing.md")

    fig, ax = plots.pyplot().subplots(figsize=(9, 4))
    x = range(len(stages))
    ax.bar([i - 0.2 for i in x], [rp[s]["before_s"] for s in stages], 0.4, label="per-element swaps (before)")
    ax.bar([i + 0.2 for i in x], [rp[s]["after_s"] for s in stages], 0.4, label="one publication + lock (after)")
    ax.set_xticks(list(x), stages, rotation=30, ha="right")
    ax.set_ylabel("seconds to publish the stage's outputs")
    ax.set_title(f"default pipeline, {a['n_cells']:,} cells: publishing time per stage")
    ax.legend()
    plots.save(fig, RESULTS / "publishing.png", tight=True)


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "child":
        _, _, variant, store, workers, out, old_src = sys.argv
        return child(variant, store, int(workers), out, old_src)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--before", default="6db50f4")
    ap.add_argument("--full-before", action="store_true", help="also run the whole pipeline with the old package")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.report_only:
        import platform

        store = ensure_atlas(args.cells)
        RESULTS_FILE.save({"command": "python benchmarks/bench_publishing.py " + " ".join(sys.argv[1:]),
                           "machine": f"{platform.node()} ({os.cpu_count()} cores)", "workers": args.workers,
                           "before_rev": args.before})
        for variant in (("before", "after") if args.full_before else ("after",)):
            RESULTS_FILE.set_section(variant, run_variant(variant, store, args.workers, args.before))
    report(RESULTS_FILE.load())


if __name__ == "__main__":
    main()

"""SCALE benchmarks: quality on the real sets, CPU training throughput, and memory as the
atlas grows.

    python benchmarks/bench_scale.py quality [--seeds 0 1 2] [--sets leukemia bm0828] [--full] [--batch 32]
                                             [--lr LR] [--min-iter N] [--max-iter N] [--depth-norm]
                                             [--depth-offset]
    python benchmarks/bench_scale.py throughput [--store PATH] [--steps 100] [--modes quick full]
                                                [--nprocs 1 2] [--batches 32 256] [--tag NAME]
                                                [--paper-decoder]
    python benchmarks/bench_scale.py epoch --sizes 10000 100000 1000000 [--steps N] [--batch 256] [--train-only]
    python benchmarks/bench_scale.py curve [--seeds 0 1 2] [--sets leukemia bm0828] [--stages 5000 10000 20000 30000]
                                           [--batch 32] [--lr LR]
    python benchmarks/bench_scale.py report

* ``quality``: SCALE with k = number of labels, CPU, default settings (quick encoder unless
  ``--full``) except the decoder: the paper's unless ``--depth-offset`` (SCALE's default
  since 2026-12-01; the rows are named for it, so older rows keep their meaning), one run per seed; k-means and Leiden on ``obsm['X_scale']`` with
  ``bench_quality.protocol`` (seed 0). Training cells/s of each run is recorded: the
  Leukemia figure is the one compared with the authors' 280 cells/s.
* ``curve``: k-means and Leiden ARI of one run per seed at several step counts, early
  stopping off (each stage resumes the previous one's checkpoint). Two ``curve`` processes
  may run side by side, each pinned to its own cores (``taskset``); ``cores`` in each row
  records how many the run had, since that sets its cells/s.
* ``throughput``: training cells/s on a synthetic store with 100k peaks (``synth_10k``),
  quick and full encoders, 1 and 2 DDP processes (gloo), batch 32 and 256. Each
  configuration trains ``--steps`` steps after the GMM initialisation; cells/s is over the
  training loop only.
* ``epoch``: peak host RSS of the training processes and seconds for ``--steps`` steps
  (default: one full epoch over every cell, SCALE's filters off) at several atlas sizes;
  memory should stay flat.

Synthetic stores come from ``harness.stores.ensure_atlas`` under ``$SCATAC_BENCH_SCRATCH``.
Writes ``benchmarks/results/scale.json``, ``scale.md``, ``scale.png`` and the ``scale`` block
of ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, plots
from harness import WORK as BENCH_WORK
from harness.children import local_cluster, recorded
from harness.memory import TreeSampler
from harness.procs import run_spec_child
from harness.report import publish
from harness.results import ResultsFile, write_json
from harness.stores import DATASETS, copy_store, ensure_atlas, ingest_dataset, scratch

WORK = BENCH_WORK / "scale"
OUT = RESULTS / "scale.json"
# two benchmark processes may run side by side (one pinned per core): the lock keeps one's
# read-modify-write from dropping the other's rows
RESULTS_FILE = ResultsFile(OUT, lock=True)
SNAPATAC2 = {"leukemia": 0.510, "bm0828": 0.435}   # k-means ARI measured beforehand (issue 5)
PEER_CELLS_PER_S = 280.0                           # scale 1.1.2 on Leukemia, this machine (issue 5)


# --------------------------------------------------------------------------- one run, in a child


def run_child(spec_path: str) -> None:
    """One SCALE fit in this process (with its DDP children), RSS sampled for the whole tree."""
    import scatac_dist as sd
    from scatac_dist.models import SCALE

    spec = json.loads(Path(spec_path).read_text())
    res = {"spec": spec}
    # where a configuration stops is a result
    with TreeSampler(os.getpid()) as sampler, recorded(res), local_cluster(1, 2, "6GiB"):
        with sampler.timed_stage("scale") as t:
            m = SCALE(progress=False, **spec["params"]).fit(spec["store"], outputs=not spec.get("train_only"))
        res["seconds"] = t.seconds
        sampler.set_stage(None)
        res["timings"] = m.timings_
        res["summary"] = {k: v for k, v in m.summary_.items() if k != "history"}
        res["epoch_loss_last"] = m.summary_["history"][-1] if m.summary_["history"] else None
        res["n_clusters"] = m.n_clusters_
        res["n_train_cells"] = m.n_cells_
        if spec.get("labels_key"):
            from bench_quality import protocol

            atlas = sd.open_atlas(spec["store"])
            used = atlas.obs["scale_used"].to_numpy(bool)
            y = atlas.obs[spec["labels_key"]].astype(str).to_numpy()[used]
            E = atlas.read("obsm/X_scale")[used]
            res.update(protocol(E, y, seed=0))
            res["n_cells"] = int(used.sum())
    figures = sampler.figures_gib()
    res.update({k: figures[k] for k in ("peak_rss_client_gib", "peak_rss_max_process_gib", "peak_rss_tree_gib")})
    write_json(spec["out"], res)


def _run(name: str, store: Path, params: dict, labels_key: str | None = None, copy: bool = True,
         train_only: bool = False) -> dict:
    from scatac_dist.train.dist import without_dask_worker_environ

    target = copy_store(store, WORK / f"{name}.zarr") if copy else store  # SCALE writes into the store
    spec = {"store": str(target), "params": params, "labels_key": labels_key, "out": str(WORK / f"{name}.json"),
            "train_only": train_only}
    with without_dask_worker_environ():  # the ingest's LocalCluster left its worker settings behind
        res = run_spec_child(__file__, WORK, name, spec)
    if copy:
        shutil.rmtree(target, ignore_errors=True)
    print(name, res.get("status"), {k: res.get(k) for k in ("kmeans_ari", "leiden_ari", "seconds")},
          (res.get("summary") or {}).get("cells_per_s"), flush=True)
    return res


# --------------------------------------------------------------------------- sections


def quality(seeds, sets, full: bool, batch: int = 32, lr: float | None = None, min_iter: int | None = None,
            max_iter: int | None = None, depth_norm: bool = False, depth_offset: bool = False) -> None:
    # the same folder as bench_sccase.py's quality stores (scale_wander.py reads them there)
    with local_cluster(1, 2) as client:
        stores = {name: ingest_dataset(name, BENCH_WORK / "sccase", client) for name in sets}
    for name in sets:
        k = len(np.unique(_labels(stores[name], DATASETS[name]["key"])))
        for seed in seeds:
            mode = ("full" if full else "quick") + ("" if batch == 32 else f"-b{batch}")
            params = {"n_clusters": int(k), "quick": not full, "seed": int(seed), "batch_size": int(batch)}
            for opt, val in (("lr", lr), ("min_iter", min_iter), ("max_iter", max_iter)):
                if val is not None:
                    params[opt] = val
                    mode += f"-{opt.replace('_', '')}{val:g}"
            if depth_norm:
                params["depth_norm"] = True
                mode += "-depthnorm"
            # explicit either way, so rows keep their meaning: the ones without the suffix are
            # the paper's decoder (SCALE's default until 2026-12-01)
            params["depth_offset"] = bool(depth_offset)
            if depth_offset:
                mode += "-depthoffset"
            key = f"{name}_{mode}_seed{seed}"
            res = _run(key, stores[name], params, labels_key=DATASETS[name]["key"])
            RESULTS_FILE.set_entry("quality", key, res)


def curve(seeds, sets, stages, batch: int = 32, lr: float | None = None, depth_offset: bool = False) -> None:
    """ARI along training: one fixed-budget run per seed, stopped and resumed at each stage.

    Each stage is a separate ``SCALE.fit`` with ``max_iter = min_iter = stage`` and
    ``resume=True`` from the previous stage's checkpoint (resume is bit-exact, see
    ``tests/test_train_ddp.py``), so the figure at a stage is that of a run trained for exactly
    that many steps with early stopping off. The sets are ingested into a folder of this
    process's own, so two ``curve`` processes can run side by side.
    """
    import tempfile

    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="curve-", dir=WORK) as tmp:
        tmp = Path(tmp)
        with local_cluster(1, 2) as client:
            stores = {name: ingest_dataset(name, tmp, client) for name in sets}
        for name in sets:
            k = len(np.unique(_labels(stores[name], DATASETS[name]["key"])))
            for seed in seeds:
                ck = tmp / f"ck-{name}-{seed}"
                key = (f"{name}_b{batch}" + ("" if lr is None else f"-lr{lr:g}")
                       + ("-depthoffset" if depth_offset else "") + f"_seed{seed}")
                rows = []
                for i, step in enumerate(sorted(stages)):
                    params = {"n_clusters": int(k), "quick": True, "seed": int(seed), "batch_size": int(batch),
                              "max_iter": int(step), "min_iter": int(step), "patience": 10 ** 6, "checkpoint_dir": str(ck),
                              "checkpoint_every": 10 ** 9, "resume": i > 0, "depth_offset": bool(depth_offset)}
                    if lr is not None:
                        params["lr"] = lr
                    # the store is this process's own copy: each stage's outputs replace the last's
                    res = _run(f"curve_{key}_{step}", stores[name], params, labels_key=DATASETS[name]["key"],
                               copy=False)
                    s = res.get("summary") or {}
                    rows.append({"step": int(step), "status": res.get("status"), "kmeans_ari": res.get("kmeans_ari"),
                                 "leiden_ari": res.get("leiden_ari"), "cells_per_s": s.get("cells_per_s"),
                                 "loss": res.get("epoch_loss_last"), "cores": len(os.sched_getaffinity(0))})
                    RESULTS_FILE.set_entry("curve", key, rows)


def _labels(store: Path, key: str) -> np.ndarray:
    import scatac_dist as sd

    return sd.open_atlas(store).obs[key].astype(str).to_numpy()


def throughput(store: Path | None, steps: int, modes=("quick", "full"), nprocs=(1, 2), batches=(32, 256),
               tag: str = "synth100k", depth_offset: bool = True) -> None:
    store = store or ensure_atlas(10_000, scratch())
    for mode in modes:
        for nproc in nprocs:
            for batch in batches:
                key = f"{tag}_{mode}_np{nproc}_b{batch}"
                n = steps if mode == "quick" else max(10, steps // 5)
                res = _run(f"tp_{key}", store, {"n_clusters": 10, "quick": mode == "quick", "nproc": nproc,
                                                "batch_size": batch, "max_iter": n, "patience": 10 ** 6,
                                                "min_reads": 1, "min_cells": 5, "depth_offset": depth_offset})
                RESULTS_FILE.set_entry("throughput", key, res)


def epoch(sizes, steps: int | None, batch: int, train_only: bool = False) -> None:
    for n in sizes:
        store = ensure_atlas(int(n), scratch())
        n_steps = steps or max(1, int(n) // batch)
        # the synthetic stores are large: write SCALE's outputs into them in place (they are
        # benchmark inputs only, and SCALE replaces its own slots atomically)
        # preprocess off: SCALE's cell filter (reads >= peaks / 50) keeps under a tenth of these
        # shallow synthetic cells, and the point is an epoch over every cell of the atlas
        key = f"{int(n) // 1000}k" + ("-train" if train_only else "") + ("" if steps else "-epoch")
        res = _run(f"epoch_{key}", store, {"n_clusters": 10, "quick": True, "batch_size": batch,
                                           "max_iter": n_steps, "patience": 10 ** 6, "preprocess": False},
                   copy=False, train_only=train_only)
        RESULTS_FILE.set_entry("epoch", key, res)


def report() -> None:
    res = RESULTS_FILE.load()
    lines = []
    q = res.get("quality", {})
    if q:
        lines += ["| dataset | encoder | seed | k-means ARI | Leiden ARI | steps | stopped early | train cells/s |",
                  "|---|---|---:|---:|---:|---:|---|---:|"]
        groups: dict = {}
        for key, r in q.items():
            name, mode, seed = key.split("_")
            s = r.get("summary") or {}
            lines.append(f"| {name} | {mode} | {seed[4:]} | {r.get('kmeans_ari', float('nan')):.3f} | "
                         f"{r.get('leiden_ari', float('nan')):.3f} | {s.get('steps', '')} | {s.get('stopped_early', '')} "
                         f"| {s.get('cells_per_s', 0):.0f} |")
            groups.setdefault((name, mode), []).append(r)
        lines += ["", "| dataset | encoder | seeds | k-means ARI mean ± sd | Leiden ARI mean ± sd | SnapATAC2 k-means "
                  "| train cells/s mean | vs authors' 280 cells/s |", "|---|---|---:|---|---|---:|---:|---:|"]
        for (name, mode), rs in groups.items():
            km = np.array([r.get("kmeans_ari", np.nan) for r in rs])
            ld = np.array([r.get("leiden_ari", np.nan) for r in rs])
            cps = np.array([(r.get("summary") or {}).get("cells_per_s", np.nan) for r in rs])
            lines.append(f"| {name} | {mode} | {len(rs)} | {km.mean():.3f} ± {km.std():.3f} | {ld.mean():.3f} ± "
                         f"{ld.std():.3f} | {SNAPATAC2.get(name, float('nan')):.3f} | {cps.mean():.0f} | "
                         f"{cps.mean() / PEER_CELLS_PER_S:.1f}x |")
    t = res.get("throughput", {})
    if t:
        lines += ["", "| encoder, processes, batch | status | cells trained | train cells/s | steps | "
                  "largest process GiB | all processes GiB |", "|---|---|---:|---:|---:|---:|---:|"]
        for key, r in t.items():
            s = r.get("summary") or {}
            lines.append(f"| {key} | {str(r.get('status'))[:40]} | {r.get('n_train_cells', '')} "
                         f"| {s.get('cells_per_s', 0):.0f} | {s.get('steps', '')} "
                         f"| {r.get('peak_rss_max_process_gib', 0):.2f} | {r.get('peak_rss_tree_gib', 0):.2f} |")
    e = res.get("epoch", {})
    if e:
        lines += ["", "| cells | status | cells trained | steps | train s | train cells/s | epoch h (projected) "
                  "| total s | largest process GiB | all processes GiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, r in e.items():
            s = r.get("summary") or {}
            cps = s.get("cells_per_s") or float("nan")
            lines.append(f"| {key} | {str(r.get('status'))[:40]} | {r.get('n_train_cells', '')} | {s.get('steps', '')} "
                         f"| {s.get('train_seconds', 0):.0f} | {cps:.0f} "
                         f"| {r.get('n_train_cells', 0) / cps / 3600:.2f} "
                         f"| {r.get('seconds', 0):.0f} | "
                         f"{r.get('peak_rss_max_process_gib', 0):.2f} | {r.get('peak_rss_tree_gib', 0):.2f} |")
    cv = res.get("curve", {})
    if cv:
        lines += ["", "ARI along training (`curve`: fixed budget, early stopping off, resumed at each stage):", "",
                  "| dataset, batch | step | seeds | k-means ARI per seed | k-means mean ± sd | Leiden mean ± sd "
                  "| SnapATAC2 k-means | cores per run |", "|---|---:|---:|---|---|---|---:|---:|"]
        for group, steps in _curve_groups(cv).items():
            name = group.split("_")[0]
            for step, rows in sorted(steps.items()):
                km = np.array([r["kmeans_ari"] for r in rows], float)
                ld = np.array([r["leiden_ari"] for r in rows], float)
                lines.append(f"| {group} | {step} | {len(rows)} | {', '.join(f'{v:.3f}' for v in km)} "
                             f"| {km.mean():.3f} ± {km.std():.3f} | {ld.mean():.3f} ± {ld.std():.3f} "
                             f"| {SNAPATAC2.get(name, float('nan')):.3f} | {rows[0].get('cores', '')} |")
    publish("scale", "## SCALE (`python benchmarks/bench_scale.py quality|throughput|epoch|curve`, then `report`)\n\n"
            "CPU only (no GPU on this machine). Quality: k = number of labels, k-means (n_init 20) and "
            "Leiden searched to k on `obsm['X_scale']` (protocol of `bench_quality.py`, seed 0); "
            "SnapATAC2's k-means ARI and the authors' 280 cells/s are the figures measured beforehand "
            "(issue 5). Quality rows with `depthoffset` in the encoder column use SCALE's default decoder "
            "(`depth_offset`, a per-cell depth term); the others, the curve and the throughput and epoch rows "
            "use the paper's decoder (`depth_offset=False`), SCALE's default before 2026-12-01, except the "
            "throughput rows named `synth100k-offset`. "
            "`quick-depthnorm` and `quick-depthoffset` runs (batch 32) ran two side by side, each pinned "
            "to one core, so their cells/s are one core's. Throughput: synthetic store, 10k cells x 100k peaks. Epoch: quick encoder, 100 "
            "steps of 256 cells at each size over every cell (SCALE's filters off), DDP off; the epoch time is projected from "
            "the measured cells/s. Rows ending in `-epoch` train one whole epoch (cells / 256 steps); `-train`: "
            "training alone (`fit(outputs=False)`). Curve: one 30,000-step run per seed, resumed at each stage, "
            "each run pinned to one core (two ran side by side).\n\n", lines, md=RESULTS / "scale.md")
    _plot(res)


def _curve_groups(cv: dict) -> dict:
    """{'bm0828_b32': {step: [row of each seed]}} from the ``curve`` section (finished stages only)."""
    out: dict = {}
    for key, rows in cv.items():
        group = key.rsplit("_seed", 1)[0]
        for r in rows:
            if r.get("status") == "ok":
                out.setdefault(group, {}).setdefault(r["step"], []).append(r)
    return out


def _plot(res: dict) -> None:
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.5))
    t = res.get("throughput", {})
    if t:
        keys = list(t)
        axes[0].barh(keys, [(t[k].get("summary") or {}).get("cells_per_s", 0) for k in keys])
        axes[0].set_xlabel("training cells/s (100k peaks)")
    e = res.get("epoch", {})
    if e:
        keys = list(e)
        axes[1].plot(keys, [e[k].get("peak_rss_max_process_gib", 0) for k in keys], "o-", label="largest process")
        axes[1].plot(keys, [e[k].get("peak_rss_tree_gib", 0) for k in keys], "s-", label="all processes")
        axes[1].set_ylabel("peak RSS, GiB")
        axes[1].set_xlabel("cells")
        axes[1].tick_params(axis="x", rotation=30)
        axes[1].legend()
    cv = res.get("curve", {})
    for group, steps in _curve_groups(cv).items():
        xs = sorted(steps)
        means = [np.mean([r["kmeans_ari"] for r in steps[x]]) for x in xs]
        line, = axes[2].plot(xs, means, "o-", label=f"{group} (mean of seeds)")
        for x in xs:
            axes[2].plot([x] * len(steps[x]), [r["kmeans_ari"] for r in steps[x]], ".", color=line.get_color(),
                         alpha=0.5)
        name = group.split("_")[0]
        if name in SNAPATAC2:
            axes[2].axhline(SNAPATAC2[name], ls="--", color=line.get_color(), lw=0.8)
    if cv:
        axes[2].set_xlabel("training steps")
        axes[2].set_ylabel("k-means ARI (dashed: SnapATAC2)")
        axes[2].legend(fontsize=7)
    plots.save(fig, RESULTS / "scale.png", dpi=120, tight=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--sets", nargs="+", default=["leukemia", "bm0828"])
    q.add_argument("--full", action="store_true")
    q.add_argument("--batch", type=int, default=32)
    q.add_argument("--lr", type=float, help="learning rate (default: SCALE's, 2e-3)")
    q.add_argument("--min-iter", type=int, help="no early stop before this step (default: SCALE's, 10,000)")
    q.add_argument("--max-iter", type=int, help="step budget (default: SCALE's, 30,000)")
    q.add_argument("--depth-norm", action="store_true", help="SCALE(depth_norm=True): encoder input scaled per cell")
    q.add_argument("--depth-offset", action="store_true",
                   help="SCALE(depth_offset=True), SCALE's default: per-cell depth offset on the decoder's "
                        "logits; without it the paper's decoder (depth_offset=False)")
    t = sub.add_parser("throughput")
    t.add_argument("--store", type=Path)
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--modes", nargs="+", default=["quick", "full"])
    t.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    t.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    t.add_argument("--tag", default="synth100k",
                   help="row name prefix; the synth100k rows are from the paper's decoder (before 2026-12-01)")
    t.add_argument("--paper-decoder", action="store_true", help="SCALE(depth_offset=False)")
    e = sub.add_parser("epoch")
    e.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    e.add_argument("--steps", type=int)
    e.add_argument("--batch", type=int, default=256)
    e.add_argument("--train-only", action="store_true",
                   help="measure training alone, without SCALE's output pass over every cell")
    cv = sub.add_parser("curve")
    cv.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    cv.add_argument("--sets", nargs="+", default=["leukemia", "bm0828"])
    cv.add_argument("--stages", type=int, nargs="+", default=[5_000, 10_000, 20_000, 30_000])
    cv.add_argument("--batch", type=int, default=32)
    cv.add_argument("--lr", type=float, help="learning rate (default: SCALE's, 2e-3)")
    cv.add_argument("--depth-offset", action="store_true", help="SCALE's default decoder (see quality)")
    sub.add_parser("report")
    c = sub.add_parser("child")
    c.add_argument("spec")
    a = ap.parse_args(argv)
    if a.cmd == "quality":
        quality(a.seeds, a.sets, a.full, a.batch, a.lr, a.min_iter, a.max_iter, a.depth_norm, a.depth_offset)
    elif a.cmd == "throughput":
        throughput(a.store, a.steps, a.modes, a.nprocs, a.batches, a.tag, not a.paper_decoder)
    elif a.cmd == "epoch":
        epoch(a.sizes, a.steps, a.batch, a.train_only)
    elif a.cmd == "curve":
        curve(a.seeds, a.sets, a.stages, a.batch, a.lr, a.depth_offset)
    elif a.cmd == "child":
        run_child(a.spec)
    else:
        report()


if __name__ == "__main__":
    main()

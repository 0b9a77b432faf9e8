"""The capabilities the scaling benchmark measures, each in a fresh process tree.

Every capability runs with the package's defaults except where said, on the embedded Dask
cluster users get (``scatac_dist.get_client(n_workers=W)``: W worker processes of one
thread each). What each one times:

``ingest``
    ``scatac-dist --workers W --no-progress ingest ATLAS.10x.h5 -o OUT.zarr``, the whole
    command (imports, cluster start and stop included). The atlas is exported to a Cell Ranger
    ``filtered_peak_bc_matrix.h5`` (gzip) beforehand, once, untimed. Bytes read: ``read_chars``
    covers the HDF5 input (read by h5py, not zarr).
``pipeline``
    ``scatac-dist run``'s default stages (QC, cell filter, feature selection, TF-IDF, LSI,
    spectral, kNN, Leiden searched to the atlas's number of cell types, k-means, UMAP), each
    stage timed on its own (``force=True``). The matched stages (select_features + spectral +
    neighbors + leiden) are what SnapATAC2's select_features + spectral + knn + leiden are
    compared with. Leiden and k-means ARI against ``obs['celltype']`` are recorded.
``jaccard``
    ``tl.jaccard(atlas, k=30)``: the blockwise top-k Jaccard similarity of every cell to every
    other (``O(n^2)`` pairs of sparse rows, by design: it is exact).
``sccase``
    ``SCCASE(mode="atlas")`` with a fixed budget: ``--sccase-iters`` iterations (5) with
    ``tol=0``, and ``enhanced_top=500`` (the enhanced matrix kept to each cell's 500 largest
    values, as the demo and ``bench_sccase.py scale`` do: the default, all values, stores
    about 30x the input's non-zeros). Seconds per iteration are recorded.
``scale_epoch``
    One SCALE training epoch over every cell passing QC: ``max_iter`` = cells / batch (32),
    early stopping off, ``n_clusters`` = the atlas's cell types, ``preprocess=False`` (SCALE's
    cell filter keeps cells with reads >= kept peaks / 50, a tenth or less of a shallow atlas
    at 100k peaks, fewer at 500k; ``--scale-preprocess`` turns it on) and ``outputs=False``
    (no encoding pass). ``--epoch-cells N`` trains N cells' worth of steps instead and projects
    the epoch from the measured rate (``epoch_projected``); the run's ``time_s`` is then the
    measured time with its training replaced by the projected epoch (``time_projected``,
    the measured wall time in ``measured_time_s``; memory is as measured).
``scembed_epoch``
    ``SCEMBED(epochs=1, umap=False).fit``: the vocabulary pass, one word2vec epoch (the corpus
    written by the workers, ``corpus="file"``) and the encoding of every cell; the epoch is
    ``timings['train']``.
``scmvp_epoch``
    One scMVP epoch (``max_epochs=1``, ``outputs=False``, ``n_clusters=10``) on a joint
    RNA + ATAC synthetic atlas of the same cells and peaks and 2,000 genes
    (``SynthParams(n_genes=2000)``, the generator ``bench_scmvp.py scale`` uses: the presets
    have no RNA). ``--epoch-cells`` as for SCALE.

Capabilities other than ``ingest``, ``pipeline`` and ``scmvp_epoch`` first make sure the
pipeline's QC, cell filter and feature selection are in the store (skipped when they are,
as ``scatac-dist run`` would), as a stage of their own that is not counted. Restart state
that a stopped run of scCASE, SCALE or scEmbed left beside the store is removed first, so
every run starts from nothing.

What is recorded per stage (:class:`Meter`): wall seconds; peak RSS of the whole process
tree and of its largest process (``harness.memory``, every 0.2 s); bytes read from the store
by every process and ``read_chars`` (``harness.reads``); and the Dask tasks that ran
(``harness.tasks``: count, compute and transfer seconds, busy and serial time, bytes moved),
the input of the scale-out model in ``scaling_report.py``.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.children import recorded
from harness.memory import GIB
from harness.procs import run_measured
from harness.reads import ReadSampler, flush_everywhere, hook_env, store_read_total
from harness.results import write_json
from harness.stores import disk_bytes
from harness.tasks import load_rows, summarise
from harness.timing import Timer

#: in the order they run on one atlas (the pipeline's outputs are then in the store for the rest)
CAPABILITIES = ("ingest", "pipeline", "jaccard", "sccase", "scale_epoch", "scembed_epoch", "scmvp_epoch")
#: our stages that SnapATAC2's select_features + spectral + knn + leiden correspond to
MATCHED = ("select_features", "spectral", "neighbors", "leiden")
#: the pipeline's first stages, which the other capabilities take as given
PREREQUISITES = ("qc", "filter_cells", "select_features")
#: the fields that name a run in the results
KEY = ("preset", "n_peaks", "n_cells", "capability", "system", "workers")


# --------------------------------------------------------------------------- measuring


class Meter:
    """The stages of one measured child run.

    ``with Meter(reads_dir, tasks_dir) as m: with m.stage("name"): ...``. Per stage: wall
    seconds and its clock window, peak RSS (tree and largest process) and ``read_chars``
    (:class:`harness.reads.ReadSampler` on this process's tree), and store bytes read (the
    hook's counts, flushed in every process at the stage's ends). ``counted=False`` marks a
    stage that is recorded but not part of the capability's figures (cluster start-up,
    prerequisites). Set ``client`` once the cluster is up, so workers flush too.
    """

    def __init__(self, reads_dir: Path, tasks_dir: Path, interval: float = 0.2) -> None:
        self.reads_dir, self.tasks_dir = Path(reads_dir), Path(tasks_dir)
        self.sampler = ReadSampler(os.getpid(), interval)
        self.client = None
        self.stages: dict[str, dict] = {}

    def __enter__(self) -> Meter:
        self.sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sampler.stop()

    @contextmanager
    def stage(self, name: str, counted: bool = True):
        flush_everywhere(self.client)
        b0 = store_read_total(self.reads_dir)
        t0 = time.time()
        self.sampler.set_stage(name)
        try:
            with Timer() as t:
                yield t
        finally:
            self.sampler.set_stage(None)
            t1 = time.time()
            flush_everywhere(self.client)
            self.stages[name] = {"seconds": t.seconds, "t0": t0, "t1": t1,
                                 "counted": counted, "store_read_bytes": store_read_total(self.reads_dir) - b0}
            print(f"  {name}: {self.stages[name]['seconds']:.1f} s", flush=True)

    def figures(self, slots: int) -> dict:
        """Per stage and for the counted stages together (call after the cluster closed, so
        the scheduler has written its task record). ``slots``: the cluster's task slots
        (workers x threads), for the tasks' idle time."""
        s = self.sampler
        rows = load_rows(self.tasks_dir)
        out = {}
        for name, st in self.stages.items():
            out[name] = {**st, "peak_rss_tree": s.stage_peaks.get(name, 0),
                         "peak_rss_max_process": s.stage_max_process.get(name, 0),
                         "read_chars": s.stage_read_chars.get(name, 0),
                         "tasks": summarise(rows, st["t0"], st["t1"], slots)}
        counted = [v for v in out.values() if v["counted"]]
        return {
            "stages": out,
            "time_s": sum(v["seconds"] for v in counted),
            "peak_rss_tree": max((v["peak_rss_tree"] for v in counted), default=0),
            "peak_rss_max_process": max((v["peak_rss_max_process"] for v in counted), default=0),
            "store_read_bytes": sum(v["store_read_bytes"] for v in counted),
            "read_chars": sum(v["read_chars"] for v in counted),
            "peak_rss_tree_run": s.peak,
            "processes": sorted(({"pid": pid, **v} for pid, v in s.per_process.items()), key=lambda r: -r["peak_rss"]),
            "sampler_max_gap_s": s.max_gap,
        }


# --------------------------------------------------------------------------- the capabilities (child side)


def _n_types(atlas) -> int:
    return int(atlas.obs["celltype"].nunique()) if "celltype" in atlas.obs else 10


def _prerequisites(atlas, client, meter: Meter) -> None:
    from scatac_dist.pipeline import default_stages, run_stages

    with meter.stage("prerequisites", counted=False):
        run_stages(atlas, [s for s in default_stages() if s.name in PREREQUISITES], client=client, progress=False)


def _cells_used(atlas) -> int:
    obs = atlas.obs
    return int(obs["pass_qc"].sum()) if "pass_qc" in obs else int(atlas.n_obs)


def cap_pipeline(spec: dict, meter: Meter, client) -> dict:
    import scatac_dist as sd
    from scatac_dist.pipeline import default_stages, run_stages
    from scatac_dist.tl.metrics import ari

    atlas = sd.Atlas(spec["store"])
    k = _n_types(atlas)
    for st in default_stages(n_clusters=k):
        with meter.stage(st.name):
            run_stages(atlas, [st], client=client, force=True, progress=False)
    obs = sd.Atlas(spec["store"]).obs
    if "celltype" not in obs:
        return {"n_clusters": k, "quality": None}
    truth = obs["celltype"].astype(str)
    return {"n_clusters": k, "quality": {"leiden_ari": ari(truth, obs["leiden"].astype(str)),
                                         "kmeans_ari": ari(truth, obs["kmeans"].astype(str)),
                                         "leiden_k": int(obs["leiden"].nunique())}}


def cap_jaccard(spec: dict, meter: Meter, client) -> dict:
    import scatac_dist as sd

    atlas = sd.Atlas(spec["store"])
    _prerequisites(atlas, client, meter)
    with meter.stage("jaccard"):
        S = sd.tl.jaccard(sd.Atlas(spec["store"]), k=30)
    return {"k": 30, "nnz": int(S.nnz)}


def cap_sccase(spec: dict, meter: Meter, client) -> dict:
    import scatac_dist as sd
    from scatac_dist.models import SCCASE

    atlas = sd.Atlas(spec["store"])
    _prerequisites(atlas, client, meter)
    budget = {"mode": "atlas", "max_iter": int(spec["sccase_iters"]), "tol": 0.0, "enhanced_top": 500}
    with meter.stage("sccase"):
        m = SCCASE(**budget).fit(spec["store"])
    r = m.result_
    spi = r.get("seconds_per_iteration") or []
    return {"budget": budget, "timings": m.timings_, "n_factors": r.get("n_factors"), "n_iter": r.get("n_iter"),
            "seconds_per_iteration": spi, "mean_seconds_per_iteration": (sum(spi) / len(spi)) if spi else None,
            "n_used_cells": r.get("n_cells"), "n_used_peaks": r.get("n_peaks"), "enhanced_nnz": r.get("enhanced_nnz")}


def _epoch_steps(n_cells: int, batch: int, epoch_cells: int | None) -> tuple[int, bool]:
    """Steps for one epoch of ``n_cells`` (or ``epoch_cells`` of them), and whether that is
    less than the epoch (so the epoch is projected)."""
    full = max(1, math.ceil(n_cells / batch))
    if epoch_cells is None:
        return full, False
    steps = max(1, min(full, math.ceil(epoch_cells / batch)))
    return steps, steps < full


def _epoch_figures(train_s: float, loop_s: float | None, steps: int, batch: int, n_train: int,
                   projected: bool) -> dict:
    """Per-epoch figures of a training run of ``steps`` steps: ``train_s`` is the model's
    ``timings['train']`` (start-up of the training processes included), ``loop_s`` the training
    loop alone (``summary['train_seconds']``). A projected epoch is the start-up plus the loop
    scaled to ``n_train`` cells."""
    cells = steps * batch
    loop_s = train_s if loop_s is None else min(loop_s, train_s)
    per_epoch = (train_s - loop_s) + loop_s * n_train / cells if projected else train_s
    return {"steps": steps, "batch_size": batch, "n_train_cells": n_train, "train_s": train_s,
            "train_loop_s": loop_s, "cells_per_s": cells / loop_s if loop_s else None,
            "per_epoch_s": per_epoch, "epoch_projected": projected}


def cap_scale_epoch(spec: dict, meter: Meter, client) -> dict:
    import scatac_dist as sd
    from scatac_dist.models import SCALE

    atlas = sd.Atlas(spec["store"])
    _prerequisites(atlas, client, meter)
    preprocess = bool(spec.get("scale_preprocess"))
    if preprocess:  # the cells SCALE's own filter keeps make its epoch
        with meter.stage("scale_masks", counted=False):
            n_used = int(SCALE(preprocess=True).masks(sd.Atlas(spec["store"]))[0].sum())
    else:
        n_used = _cells_used(sd.Atlas(spec["store"]))
    batch = SCALE.batch_size
    steps, projected = _epoch_steps(n_used, batch, spec.get("epoch_cells"))
    params = {"n_clusters": _n_types(atlas), "max_iter": steps, "patience": 10 ** 6, "preprocess": preprocess,
              "progress": False}
    with meter.stage("scale"):
        m = SCALE(**params).fit(spec["store"], outputs=False)
    done = int(m.summary_.get("steps") or steps)
    return {"params": {k: v for k, v in params.items() if k != "progress"}, "timings": m.timings_,
            "summary": {k: v for k, v in m.summary_.items() if k != "history"},
            **_epoch_figures(m.timings_["train"], m.summary_.get("train_seconds"), done, batch, int(m.n_cells_),
                             projected)}


def cap_scembed_epoch(spec: dict, meter: Meter, client) -> dict:
    import scatac_dist as sd
    from scatac_dist.models import SCEMBED

    atlas = sd.Atlas(spec["store"])
    _prerequisites(atlas, client, meter)
    params = {"epochs": 1, "umap": False, "progress": False}
    with meter.stage("scembed"):
        m = SCEMBED(**params).fit(spec["store"])
    return {"params": {k: v for k, v in params.items() if k != "progress"}, "timings": m.timings_,
            "train": m.train_summary_, "per_epoch_s": m.timings_["train"], "epoch_projected": False}


def cap_scmvp_epoch(spec: dict, meter: Meter, client) -> dict:
    from scatac_dist.models import SCMVP

    batch = SCMVP.batch_size
    steps, projected = _epoch_steps(int(spec["n_cells"]), batch, spec.get("epoch_cells"))
    params = {"n_clusters": 10, "max_epochs": 1, "max_steps": steps if projected else None, "progress": False}
    with meter.stage("scmvp"):
        m = SCMVP(**params).fit(spec["store"], outputs=False)
    summ = {k: v for k, v in m.summary_.items() if k != "history"}
    done = int(summ.get("steps") or steps)
    out = _epoch_figures(m.timings_["train"], summ.get("train_seconds"), done, batch, int(m.n_cells_), projected)
    return {"params": {k: v for k, v in params.items() if k != "progress"}, "timings": m.timings_, "summary": summ,
            "atlas": "synthetic multiome (SynthParams n_genes=2000, 10 types)", **out}


#: the restart state each capability's model keeps beside the store (``Atlas.resume_state``)
RESUME_STAGES = {"sccase": "sccase", "scale_epoch": "scale", "scembed_epoch": "scembed"}

CHILD_CAPABILITIES = {"pipeline": cap_pipeline, "jaccard": cap_jaccard, "sccase": cap_sccase,
                      "scale_epoch": cap_scale_epoch, "scembed_epoch": cap_scembed_epoch,
                      "scmvp_epoch": cap_scmvp_epoch}


def run_child(spec: dict) -> None:
    """One capability in this process (the root of the measured tree) on a fresh cluster of
    ``spec['workers']`` workers; the result is written to ``spec['out']``."""
    import scatac_dist as sd
    from scatac_dist.cluster import close_client

    res = {k: spec[k] for k in KEY if k in spec} | {"system": "scatac-dist", "store": spec["store"]}
    meter = Meter(spec["reads_dir"], spec["tasks_dir"])
    with meter, recorded(res):
        with meter.stage("cluster_start", counted=False):
            client = sd.get_client(n_workers=int(spec["workers"]), dashboard_address=":0")
        meter.client = client
        slots = sum(client.nthreads().values()) or int(spec["workers"])  # task slots: workers x threads
        res["threads"] = slots
        try:
            atlas = sd.open_atlas(spec["store"], mod="atac") if spec["capability"] == "scmvp_epoch" else \
                sd.Atlas(spec["store"])
            res["nnz"] = int(atlas.nnz)
            if spec["capability"] in RESUME_STAGES:  # a stopped run's state would shorten this one
                atlas.clear_resume(RESUME_STAGES[spec["capability"]])
            res["details"] = CHILD_CAPABILITIES[spec["capability"]](spec, meter, client)
        finally:
            flush_everywhere(client)
            meter.client = None
            close_client(client)
    res.update(meter.figures(res.get("threads") or int(spec["workers"])))
    res["cluster_start_s"] = meter.stages.get("cluster_start", {}).get("seconds")
    d = res.get("details") or {}
    if d.get("epoch_projected") and res.get("time_s") is not None:
        # the cost of one epoch: the measured run with its training replaced by the projected epoch
        res["measured_time_s"] = res["time_s"]
        res["time_s"] = res["time_s"] - d["train_s"] + d["per_epoch_s"]
        res["time_projected"] = True
    if spec["capability"] == "pipeline" and "stages" in res:
        st = res["stages"]
        res["total_s"] = res["time_s"]
        res["matched_s"] = sum(st[s]["seconds"] for s in MATCHED if s in st)
        res["quality"] = (res.get("details") or {}).get("quality")
    write_json(spec["out"], res, indent=2)


# --------------------------------------------------------------------------- the parent side


def launch_child(script: Path, spec: dict, work: Path, *, timeout: float | None, max_rss: float | None) -> dict:
    """``python SCRIPT --child SPEC.json`` with the read and task hooks on, its tree sampled
    from outside too (wall, peak RSS: ``external``); a child that wrote no result, ran out of
    time or memory gives ``{"failed": why}``."""
    import json

    from scatac_dist.train.dist import without_dask_worker_environ

    name = f"{spec['preset']}_{spec['n_cells']}_{spec['n_peaks']}_{spec['capability']}_{spec['workers']}w"
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec = spec | {"reads_dir": str(run_dir / "reads"), "tasks_dir": str(run_dir / "tasks"),
                   "out": str(run_dir / "result.json")}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    with without_dask_worker_environ():
        env = hook_env(Path(spec["reads_dir"]), Path(spec["tasks_dir"]))
    m = run_measured([sys.executable, str(script), "--child", str(run_dir / "spec.json")], log=run_dir / "log.txt",
                     env=env, interval=0.5, timeout=timeout,
                     max_rss_bytes=max_rss * GIB if max_rss else None, sampler_factory=ReadSampler)
    out = Path(spec["out"])
    res = json.loads(out.read_text()) if out.exists() else {k: spec[k] for k in KEY if k in spec}
    res["external"] = {"wall_s": m.wall_s, "peak_rss_tree": m.peak_rss_tree,
                       "peak_rss_max_process": m.peak_rss_max_process, "read_chars": m.sampler.read_chars,
                       "returncode": m.returncode}
    if m.stopped:
        res["failed"] = (f"stopped: did not finish within {timeout:.0f} s" if m.stopped == "timeout" else
                         f"stopped: process tree RSS passed {max_rss:.0f} GiB")
    elif not out.exists():
        res["failed"] = "no result: " + _tail(run_dir / "log.txt")
    elif res.get("status") != "ok":
        res["failed"] = res.get("status", "?")
    res["log"] = str(run_dir / "log.txt")
    return res


def run_ingest(store: Path, spec: dict, work: Path, *, timeout: float | None, max_rss: float | None,
               keep_export: bool = False) -> dict:
    """The ``ingest`` capability, measured from here: the CLI's own process tree is the run
    (no child of ours around it). The 10x export is made first, untimed."""
    from harness.stores import ensure_10x_h5

    from scatac_dist.train.dist import without_dask_worker_environ

    h5 = ensure_10x_h5(store)
    name = f"{spec['preset']}_{spec['n_cells']}_{spec['n_peaks']}_ingest_{spec['workers']}w"
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    out = run_dir / "ingested.zarr"
    cmd = [str(Path(sys.executable).parent / "scatac-dist"), "--workers", str(spec["workers"]), "--no-progress",
           "ingest", str(h5), "-o", str(out)]
    with without_dask_worker_environ():
        env = hook_env(run_dir / "reads", run_dir / "tasks")
    t0 = time.time()
    m = run_measured(cmd, log=run_dir / "log.txt", env=env, interval=0.2, timeout=timeout,
                     max_rss_bytes=max_rss * GIB if max_rss else None, sampler_factory=ReadSampler)
    t1 = time.time()
    s = m.sampler
    stage = {"seconds": m.wall_s, "t0": t0, "t1": t1, "counted": True, "peak_rss_tree": m.peak_rss_tree,
             "peak_rss_max_process": m.peak_rss_max_process, "read_chars": s.read_chars,
             "store_read_bytes": store_read_total(run_dir / "reads"),
             "tasks": summarise(load_rows(run_dir / "tasks"), t0, t1, int(spec["workers"]))}
    res = {k: spec[k] for k in KEY if k in spec} | {
        "system": "scatac-dist", "store": str(store), "command": " ".join(cmd), "stages": {"ingest": stage},
        "time_s": m.wall_s, "peak_rss_tree": m.peak_rss_tree, "peak_rss_max_process": m.peak_rss_max_process,
        "read_chars": s.read_chars, "store_read_bytes": stage["store_read_bytes"],
        "processes": sorted(({"pid": pid, **v} for pid, v in s.per_process.items()), key=lambda r: -r["peak_rss"]),
        "details": {"input": str(h5), "input_bytes": disk_bytes(h5), "input_format": "10x-h5 (gzip)",
                    "output_bytes": disk_bytes(out) if out.exists() else None},
    }
    if m.stopped:
        res["failed"] = (f"stopped: did not finish within {timeout:.0f} s" if m.stopped == "timeout" else
                         f"stopped: process tree RSS passed {max_rss:.0f} GiB")
    elif m.returncode != 0 or not out.exists():
        res["failed"] = f"exit {m.returncode}: " + _tail(run_dir / "log.txt")
    else:
        res["status"] = "ok"
        import scatac_dist as sd

        res["nnz"] = int(sd.Atlas(out).nnz)
    shutil.rmtree(out, ignore_errors=True)
    if not keep_export:
        h5.unlink(missing_ok=True)
    return res


def _tail(path: Path, n: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "?"

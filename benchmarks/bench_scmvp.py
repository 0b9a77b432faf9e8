"""scMVP benchmarks: quality on the SNARE MOp multiome set beside its peers, imputation, and
training throughput and memory on generated multiome atlases.

    python benchmarks/bench_scmvp.py quality [--seeds 0 1 2] [--parts scmvp single peers] [--peers wnn multivi mofa]
    python benchmarks/bench_scmvp.py scale [--sizes 10000 100000 1000000] [--steps N] [--peaks 25000] [--genes 2000]
    python benchmarks/bench_scmvp.py report

* ``quality``: SNARE (``cluster (remapped)``, ``Mis`` dropped: 14 classes), the protocol of
  ``bench_quality.py`` (k-means with k = 14, n_init 20; Leiden on a 15-NN graph searched to
  14 clusters). Side by side in one run:

  - **scMVP** (ours, defaults, ``n_clusters=14``), one training run per seed, each in a
    child process (RSS of its tree sampled); the protocol at seed 0 on each run's
    ``X_scmvp``; mean and s.d. over the training seeds;
  - **MultiVI** (scvi-tools), **WNN** (muon) and **MOFA+** (mofapy2), each per seed in its
    own virtualenv through ``benchmarks/multiome_peers_runner.py`` (``make
    bench-multiome-install``). WNN gives a graph, not an embedding: its Leiden is run on the
    WNN graph itself (resolution searched to 14), its k-means on the WNN UMAP;
  - single modality: **RNA PCA** (log-normalised to 1e4, log1p, scaled to unit variance
    clipped at 10, 30 components; seeds are the protocol's), **our ATAC spectral** (the
    default pipeline's ``X_spectral``) and **SCALE on the ATAC** (defaults, ``n_clusters=14``,
    seed 0).

  Imputation (scMVP seed 0, ``impute=("rna",)``): for every labelled cell, the Pearson
  correlation of its log-normalised RNA profile with its type's pseudobulk of the *other*
  cells (raw counts summed, log-normalised), for the raw counts and for the imputed ones;
  mean and median over cells.
* ``scale``: generated multiome atlases (``SynthParams(n_genes=..)``: SNARE-like 2,000 genes
  and 25,000 peaks) at each size; one child process per size trains ``--steps`` steps (default:
  one epoch over every cell) with ``outputs=False``; cells/s over the loop and the peak RSS of
  the training process tree.

Writes ``benchmarks/results/scmvp.json``, ``scmvp.md``, ``scmvp.png`` and the ``scmvp`` block of
``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
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
from harness.stores import DATASETS, copy_store, ingest_dataset, root_obs, scratch

WORK = BENCH_WORK / "scmvp"
RESULTS_FILE = ResultsFile(RESULTS / "scmvp.json", lock=True)
PEER_VENV = Path(os.environ.get("MULTIOME_VENV", BENCH_WORK / "multiome-venv"))
RUNNER = Path(__file__).resolve().parent / "multiome_peers_runner.py"
LABEL_KEY = DATASETS["snare"]["key"]
K = 14


# --------------------------------------------------------------------------- protocols


def protocol(E: np.ndarray, y: np.ndarray, seed: int = 0) -> dict:
    from bench_quality import protocol as embedding_protocol

    return embedding_protocol(np.asarray(E, np.float32), y, seed=seed)


def graph_protocol(C, E_kmeans: np.ndarray, y: np.ndarray, seed: int = 0) -> dict:
    """WNN: Leiden on the given graph (resolution searched to k), k-means on ``E_kmeans``."""
    from sklearn.cluster import KMeans

    from scatac_dist.tl.graph import search_resolution
    from scatac_dist.tl.metrics import ari, nmi

    k = len(np.unique(y))
    km = KMeans(k, n_init=20, random_state=seed).fit_predict(E_kmeans)
    res, ld = search_resolution(C.tocsr(), k, seed=seed, flavor="leidenalg")
    return {"kmeans_ari": ari(y, km), "kmeans_nmi": nmi(y, km), "leiden_ari": ari(y, ld), "leiden_nmi": nmi(y, ld),
            "leiden_resolution": res, "leiden_k": int(len(np.unique(ld)))}


def summarise(runs: list[dict]) -> dict:
    out = {"n_runs": len(runs)}
    for key in ("kmeans_ari", "leiden_ari", "kmeans_nmi", "leiden_nmi"):
        vals = np.array([r[key] for r in runs if key in r], float)
        if len(vals):
            out[f"{key}_mean"], out[f"{key}_sd"] = float(vals.mean()), float(vals.std())
    return out


# --------------------------------------------------------------------------- children


def child(spec_path: str) -> None:
    """One fit (scMVP or SCALE) in this process, RSS of the tree sampled."""
    spec = json.loads(Path(spec_path).read_text())
    res = {"spec": spec}
    with TreeSampler(os.getpid()) as sampler, recorded(res), local_cluster(1, 2, "6GiB"):
        if spec["method"] == "scmvp":
            from scatac_dist.models import SCMVP

            with sampler.timed_stage("fit") as t:
                m = SCMVP(progress=False, **spec["params"]).fit(spec["store"], outputs=spec.get("outputs", True))
            key = "X_scmvp"
        else:
            from scatac_dist.models import SCALE

            with sampler.timed_stage("fit") as t:
                m = SCALE(progress=False, **spec["params"]).fit(spec["store"], mod="atac")
            key = "X_scale"
        sampler.set_stage(None)
        res["seconds"] = t.seconds
        res["timings"] = m.timings_
        res["summary"] = {k: v for k, v in m.summary_.items() if k != "history"}
        res["epoch_loss"] = m.summary_["history"]
        if spec.get("outputs", True):
            import zarr
            from anndata.io import read_elem

            g = zarr.open_group(spec["store"], mode="r")
            np.save(spec["embedding"], read_elem(g[f"mod/atac/obsm/{key}"]))
    figures = sampler.figures_gib()
    res.update({k: figures[k] for k in ("peak_rss_client_gib", "peak_rss_max_process_gib", "peak_rss_tree_gib")})
    write_json(spec["out"], res)


def _fit(name: str, method: str, store: Path, params: dict, *, outputs: bool = True, copy: bool = True) -> dict:
    from scatac_dist.train.dist import without_dask_worker_environ

    target = copy_store(store, WORK / f"{name}.zarr") if copy else store
    spec = {"method": method, "store": str(target), "params": params, "outputs": outputs,
            "embedding": str(WORK / f"{name}.npy")}
    with without_dask_worker_environ():
        res = run_spec_child(__file__, WORK, name, spec)
    res["store"] = str(target)
    print(name, res.get("status"), res.get("seconds"), (res.get("summary") or {}).get("cells_per_s"), flush=True)
    return res


def _peer(method: str, seed: int, extra: list[str] | None = None) -> dict:
    """One peer run in its own virtualenv; its outputs in ``WORK/peers/<method>-s<seed>``."""
    out = WORK / "peers" / f"{method}-s{seed}"
    py = PEER_VENV / "bin" / "python"
    if not py.exists():
        return {"status": f"no peer venv at {PEER_VENV}: run `make bench-multiome-install`"}
    snare = DATASETS["snare"]
    cmd = [str(py), str(RUNNER), str(snare["inputs"]), str(snare["labels"]), str(out), "--method", method,
           "--seed", str(seed), *(extra or [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    res = {"status": "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr[-1500:]}",
           "subprocess_wall_s": time.perf_counter() - t0, "outdir": str(out)}
    if (out / "result.json").exists():
        res["runner"] = json.loads((out / "result.json").read_text())
    print(method, seed, res["status"][:200], round(res["subprocess_wall_s"], 1), flush=True)
    return res


# --------------------------------------------------------------------------- quality


def _rna_pca(store: Path) -> np.ndarray:
    """Log-normalised (1e4), log1p, scaled (unit variance, clipped at 10), 30 PCs."""
    import zarr
    from anndata.io import read_elem
    from sklearn.decomposition import PCA

    X = read_elem(zarr.open_group(str(store), mode="r")["mod/rna/X"]).astype(np.float64).toarray()
    X = np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4)
    sd = X.std(0)
    X = np.clip((X - X.mean(0)) / np.where(sd > 0, sd, 1), -10, 10)
    return PCA(30, random_state=0).fit_transform(X)


def imputation_scores(raw, imputed, y: np.ndarray) -> dict:
    """Per labelled cell, Pearson r of log-normalised profiles with the leave-the-cell-out
    pseudobulk of its type (raw counts summed): for the raw and for the imputed matrix."""
    import scipy.sparse as sp

    raw = sp.csr_matrix(raw, dtype=np.float64)
    imputed = np.asarray(imputed, np.float64)

    def lognorm(M):
        M = np.asarray(M, np.float64)
        return np.log1p(M / np.maximum(M.sum(-1, keepdims=True), 1e-12) * 1e4)

    out = {"raw": [], "imputed": []}
    for t in np.unique(y):
        idx = np.flatnonzero(y == t)
        if len(idx) < 2:
            continue
        R = raw[idx].toarray()
        total = R.sum(0)
        for j, i in enumerate(idx):
            bulk = lognorm(total - R[j])
            for name, prof in (("raw", R[j]), ("imputed", imputed[i])):
                v = lognorm(prof)
                out[name].append(np.corrcoef(v, bulk)[0, 1] if v.std() > 0 else np.nan)
    return {f"{k}_{stat}": float(fn(np.array(v))) for k, v in out.items()
            for stat, fn in (("mean", np.nanmean), ("median", np.nanmedian))} | {"n_cells": len(out["raw"])}


def _snare() -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """The SNARE store (ingested once into WORK), its barcodes, labels and the labelled mask."""
    with local_cluster(1, 2) as client:
        store = ingest_dataset("snare", WORK, client, reuse=True)
    obs = root_obs(store)
    y_all = obs[LABEL_KEY].astype(str).to_numpy()
    return store, obs.index.to_numpy().astype(str), y_all, (y_all != "Mis") & (y_all != "nan")


def quality(seeds: list[int], parts: list[str], peers: list[str]) -> None:
    """``parts``: ``scmvp`` (ours, per seed), ``single`` (RNA PCA, ATAC spectral, SCALE),
    ``peers`` (``peers``, per seed). Each result is written as its own entry of the
    ``quality`` section, so parts may run in separate processes side by side."""
    WORK.mkdir(parents=True, exist_ok=True)
    store, names, y_all, ok = _snare()
    y = y_all[ok]
    RESULTS_FILE.set_entry("quality", "dataset", {"cells": int(ok.sum()), "classes": int(len(np.unique(y))),
                                                  "label": LABEL_KEY})
    if "scmvp" in parts:
        runs = []
        for s in seeds:
            params = {"n_clusters": K, "seed": s, **({"impute": ["rna"]} if s == seeds[0] else {})}
            r = _fit(f"scmvp-s{s}", "scmvp", store, params)
            if r.get("status") == "ok":
                E = np.load(WORK / f"scmvp-s{s}.npy")
                r.update(protocol(E[ok], y, seed=0))
                if s == seeds[0]:
                    import zarr
                    from anndata.io import read_elem

                    g = zarr.open_group(r["store"], mode="r")
                    raw = read_elem(g["mod/rna/X"])[ok]
                    used = read_elem(g["mod/rna/var"])["scmvp_used"].to_numpy(bool)
                    imp = np.asarray(g["mod/rna/layers/scmvp_impute"][:])[ok][:, used]
                    RESULTS_FILE.set_entry("quality", "imputation", imputation_scores(raw[:, used], imp, y))
            shutil.rmtree(r["store"], ignore_errors=True)
            runs.append({k: v for k, v in r.items() if k != "spec"})
            RESULTS_FILE.set_entry("quality", "scmvp", {"runs": runs, **summarise(runs)})
    if "single" in parts:
        _single(store, y_all, ok)
    if "peers" in parts:
        pos = {n: i for i, n in enumerate(names)}
        for method in peers:
            pruns = []
            for s in seeds:
                r = _peer(method, s)
                if r["status"] == "ok":
                    out = Path(r["outdir"])
                    rows = np.array([pos[c] for c in (out / "obs_names.txt").read_text().split()])
                    yy = y_all[rows]
                    if method == "wnn":
                        import scipy.sparse as sp

                        C = sp.load_npz(out / "wnn_connectivities.npz")
                        r.update(graph_protocol(C, np.load(out / "X_wnn_umap.npy"), yy, seed=0))
                    else:
                        r.update(protocol(np.load(out / f"X_{method}.npy"), yy, seed=0))
                    r["n_cells"] = len(rows)
                pruns.append(r)
                RESULTS_FILE.set_entry("quality", method, {"runs": pruns, **summarise(pruns)})
    report()


def _single(store: Path, y_all: np.ndarray, ok: np.ndarray) -> None:
    from bench_quality import protocol_seeds

    import scatac_dist as sd
    from scatac_dist.pipeline import default_stages, run_stages

    RESULTS_FILE.set_entry("quality", "rna_pca", protocol_seeds(_rna_pca(store)[ok], y_all[ok]) |
                           {"seeds": "protocol 0-4"})
    with local_cluster(1, 2) as client:
        work = copy_store(store, WORK / "pipeline.zarr")
        atlas = sd.open_atlas(work)
        stages = [s for s in default_stages() if s.name in ("qc", "filter_cells", "select_features", "tfidf",
                                                           "lsi", "spectral")]
        run_stages(atlas, stages, client=client, force=True, progress=False)
        keep = atlas.obs["pass_qc"].to_numpy(bool) if "pass_qc" in atlas.obs else np.ones(atlas.n_obs, bool)
        E = atlas.read("obsm/X_spectral")
        RESULTS_FILE.set_entry("quality", "atac_spectral", protocol_seeds(E[ok & keep], y_all[ok & keep]) |
                               {"n_cells": int((ok & keep).sum())})
        shutil.rmtree(work, ignore_errors=True)
    r = _fit("scale-s0", "scale", store, {"n_clusters": K, "seed": 0})
    if r.get("status") == "ok":
        E = np.load(WORK / "scale-s0.npy")
        fin = ok & np.isfinite(E).all(1)
        r.update(protocol(E[fin], y_all[fin], seed=0))
        r["n_cells"] = int(fin.sum())
    shutil.rmtree(r["store"], ignore_errors=True)
    RESULTS_FILE.set_entry("quality", "scale_atac", {k: v for k, v in r.items() if k != "spec"})


# --------------------------------------------------------------------------- scale


def scale(sizes: list[int], steps: int | None, n_peaks: int, n_genes: int) -> None:
    from scatac_dist.datasets import SynthParams, synthesize

    for n in sizes:
        store = scratch() / f"multiome_{n // 1000}k_{n_peaks // 1000}kp_{n_genes}g.zarr"
        if not (store / ".done").exists():
            shutil.rmtree(store, ignore_errors=True)
            t0 = time.perf_counter()
            with local_cluster(2, 1) as client:
                synthesize(store, SynthParams(n_cells=n, n_peaks=n_peaks, n_genes=n_genes, n_clusters=10, seed=0),
                           chunk_rows=10_000, client=client, progress=False)
            (store / ".done").write_text(f"{time.perf_counter() - t0:.1f}\n")
        n_steps = steps or max(1, n // 128)
        key = f"{n // 1000}k" + ("" if steps else "-epoch")
        r = _fit(f"scale_{key}", "scmvp", store, {"n_clusters": 10, "max_epochs": 1, "max_steps": n_steps},
                 outputs=False, copy=False)
        r.update({"n_cells": n, "n_peaks": n_peaks, "n_genes": n_genes, "steps": n_steps})
        RESULTS_FILE.set_entry("scale", key, {k: v for k, v in r.items() if k != "spec"})
    report()


# --------------------------------------------------------------------------- report


def report() -> None:
    res = RESULTS_FILE.load()
    q = res.get("quality", {})
    lines = []
    if q:
        d = q.get("dataset", {})
        lines += [f"SNARE MOp, {d.get('cells')} labelled cells, {d.get('classes')} classes ({d.get('label')}); "
                  "k-means / Leiden ARI (mean ± s.d. over training seeds; single-modality rows over protocol seeds).",
                  "", "| method | input | k-means ARI | Leiden ARI | runs | train s (1st run) |", "|---|---|---|---|---|---|"]
        rows = [("scMVP (ours)", "RNA + ATAC", "scmvp"),
                ("scMVP, the paper's likelihood weights 1 / 1 (ablation)", "RNA + ATAC", "scmvp_paper_weights"),
                ("MultiVI (scvi-tools)", "RNA + ATAC", "multivi"),
                ("WNN (muon)", "RNA + ATAC", "wnn"), ("MOFA+ (mofapy2)", "RNA + ATAC", "mofa"),
                ("RNA PCA", "RNA", "rna_pca"), ("our spectral", "ATAC", "atac_spectral"),
                ("our SCALE", "ATAC", "scale_atac")]
        for label, inp, key in rows:
            r = q.get(key)
            if not r:
                continue
            if "kmeans_ari_mean" in r:
                km = f"{r['kmeans_ari_mean']:.3f} ± {r['kmeans_ari_sd']:.3f}"
                ld = f"{r['leiden_ari_mean']:.3f} ± {r['leiden_ari_sd']:.3f}"
            elif "kmeans_ari" in r:
                km, ld = f"{r['kmeans_ari']:.3f}", f"{r['leiden_ari']:.3f}"
            else:
                km = ld = r.get("status", "failed")[:60]
            n_runs = r.get("n_runs", 1)
            first = (r.get("runs") or [r])[0]
            secs = first.get("seconds") or first.get("subprocess_wall_s")
            lines.append(f"| {label} | {inp} | {km} | {ld} | {n_runs} | {secs:.0f} |" if secs else
                         f"| {label} | {inp} | {km} | {ld} | {n_runs} | |")
        imp = q.get("imputation")
        if imp:
            lines += ["", f"Imputation (scMVP seed 0, {imp['n_cells']} cells): Pearson r of each cell's RNA with its "
                      f"type's leave-the-cell-out pseudobulk: raw {imp['raw_mean']:.3f} (median {imp['raw_median']:.3f}), "
                      f"imputed {imp['imputed_mean']:.3f} (median {imp['imputed_median']:.3f})."]
    sc = res.get("scale", {})
    if sc:
        lines += ["", "| atlas (cells) | genes + peaks | steps | cells/s | train s | peak RSS tree GiB | largest process GiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in sc.values():
            s = r.get("summary") or {}
            lines.append(f"| {r.get('n_cells'):,} | {r.get('n_genes')} + {r.get('n_peaks')} | {s.get('steps')} | "
                         f"{s.get('cells_per_s', float('nan')):.0f} | {s.get('train_seconds', float('nan')):.0f} | "
                         f"{r.get('peak_rss_tree_gib', float('nan')):.2f} | {r.get('peak_rss_max_process_gib', float('nan')):.2f} |")
    publish("scmvp", "## scMVP (`python benchmarks/bench_scmvp.py quality|scale`, then `report`)\n\n"
            "CPU only. Peers each in their own venv (`make bench-multiome-install`); MultiVI trains 6 epochs, "
            "the budget this CPU allows (see the runner's docstring); MOFA+ on the 2,000 most-detected peaks. "
            "Scale: generated multiome atlases, one training process pinned to one core while other "
            "benchmarks ran on the other.\n\n", lines, md=RESULTS / "scmvp.md")
    _plot(res)


def _plot(res: dict) -> None:
    q = res.get("quality", {})
    keys = [k for k in ("scmvp", "multivi", "wnn", "mofa", "rna_pca", "atac_spectral", "scale_atac") if k in q]
    if not keys:
        return
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    x = np.arange(len(keys))
    for j, metric in enumerate(("kmeans_ari", "leiden_ari")):
        vals = [q[k].get(f"{metric}_mean", q[k].get(metric, np.nan)) for k in keys]
        err = [q[k].get(f"{metric}_sd", 0) for k in keys]
        ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, yerr=err, label=metric.replace("_", " "))
    ax.set_xticks(x, keys, rotation=20)
    ax.set_ylabel("ARI (SNARE, 14 classes)")
    ax.legend()
    plots.save(fig, RESULTS / "scmvp.png", tight=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("quality")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a.add_argument("--parts", nargs="+", default=["scmvp", "single", "peers"], choices=["scmvp", "single", "peers"])
    a.add_argument("--peers", nargs="*", default=["wnn", "multivi", "mofa"])
    s = sub.add_parser("scale")
    s.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    s.add_argument("--steps", type=int)
    s.add_argument("--peaks", type=int, default=25_000)
    s.add_argument("--genes", type=int, default=2_000)
    sub.add_parser("report")
    c = sub.add_parser("child")
    c.add_argument("spec")
    args = ap.parse_args(argv)
    if args.cmd == "quality":
        quality(args.seeds, args.parts, args.peers)
    elif args.cmd == "scale":
        scale(args.sizes, args.steps, args.peaks, args.genes)
    elif args.cmd == "report":
        report()
    else:
        child(args.spec)


if __name__ == "__main__":
    main()

"""scCASE benchmark: quality on the real sets, recovery of dropped entries, and scale.

Sections (each writes its part of ``benchmarks/results/sccase.json``; ``report`` writes
``sccase.md`` and ``sccase.png`` from it)::

    python benchmarks/bench_sccase.py quality          # bm0828, leukemia, SNARE ATAC
    python benchmarks/bench_sccase.py dropout          # auROC / auPRC of 20% dropped entries
    python benchmarks/bench_sccase.py scale --sizes 2000 10000 100000
    python benchmarks/bench_sccase.py report

**Quality.** Every representation is scored with the protocol of ``bench_quality.py``
(k-means with k = number of labels, and Leiden on a 15-NN graph searched to k clusters;
seed 0, plus mean and s.d. over seeds 0-4). Representations: ours ``obsm['X_sccase_pca']``
(TF-IDF of the enhanced matrix, 50 PCs) in the default atlas mode (k = 30) and, where it fits,
in exact mode; the same representation of the raw data (``raw``: the enhanced matrix replaced
by the input, so the comparison isolates the enhancement); and the authors' package
(scCASE 0.2.5, ``benchmarks/sccase_runner.py`` in its own virtualenv, when installed with
``make bench-sccase-install``) with its enhanced matrix put through the same representation.

**Dropout.** 20% of the non-zero entries of the counts are set to 0 (seeded), the damaged
matrix is enhanced, and the enhanced values score the dropped entries (positives) against
the entries that were 0 to begin with (negatives, a seeded sample of the same size as all
zeros would be 99% of the matrix): auROC and auPRC (``scatac_dist.tl.metrics``). The
damaged raw matrix itself is the baseline (its dropped entries are 0, so it cannot rank them:
auROC 0.5).

**Scale.** Synthetic atlases (100k peaks, 10 types, ``harness.stores.ensure_atlas``), atlas
mode with k = 30 and 5 iterations, each size in a fresh process with 2 workers, sampled for
peak RSS per process; exact mode and the authors' package where they can hold the data
(refusals and failures are recorded, not hidden).
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
from harness import BENCH, RESULTS, plots
from harness import WORK as BENCH_WORK
from harness.children import local_cluster, recorded
from harness.memory import TreeSampler, ru_maxrss_bytes
from harness.procs import run_child, run_measured
from harness.report import publish
from harness.results import ResultsFile, write_json
from harness.stores import DATASETS, ensure_atlas, ingest_dataset, root_obs, scratch
from harness.timing import Timer

WORK = BENCH_WORK / "sccase"
OUT = RESULTS / "sccase.json"
RESULTS_FILE = ResultsFile(OUT)
PEER_PY = BENCH_WORK / "sccase-venv" / "bin" / "python"


def raw_representation(store: Path, seed: int = 0) -> np.ndarray:
    """The X_sccase_pca recipe applied to the input itself (no enhancement)."""
    from sklearn.decomposition import PCA

    from scatac_dist.models import sccase_pattern as data

    atlas = __import__("scatac_dist").open_atlas(store)
    pat = data.build_pattern(atlas)
    try:
        from scatac_dist.models.sccase_pattern import pattern_rows

        B = pattern_rows(pat, np.arange(pat.n), binary=True).toarray()
        tf = B / np.maximum(B.sum(1, keepdims=True), 1)
        cs = tf.sum(0)
        D = tf * np.where(cs > 0, np.log(pat.n / np.where(cs > 0, cs, 1)), 0)
        D /= np.maximum(np.linalg.norm(D, axis=1, keepdims=True), 1e-300)
        E = np.full((atlas.n_obs, 50), np.nan)
        E[pat.cells] = PCA(50, svd_solver="randomized", random_state=seed).fit_transform(D)
        return E
    finally:
        pat.remove()


def peer_representation(enhanced: np.ndarray, seed: int = 0) -> np.ndarray:
    """The same TF-IDF + L2 + PCA recipe on the authors' enhanced matrix (cells x peaks)."""
    from sklearn.decomposition import PCA

    Y = np.maximum(np.asarray(enhanced, np.float64), 0)
    tf = Y / np.maximum(Y.sum(1, keepdims=True), 1e-300)
    cs = tf.sum(0)
    D = tf * np.where(cs > 0, np.log(Y.shape[0] / np.where(cs > 0, cs, 1)), 0)
    D /= np.maximum(np.linalg.norm(D, axis=1, keepdims=True), 1e-300)
    return PCA(50, svd_solver="randomized", random_state=seed).fit_transform(D)


def run_peer(h5ad: Path, outdir: Path, timeout: float = 3600) -> dict:
    """The authors' package on ``h5ad`` (``sccase_runner.py`` under its own virtualenv), its
    output in ``outdir`` with the runner's stdout and stderr beside it (``outdir.log``, ``.err``)."""
    if not PEER_PY.exists():
        return {"status": "not installed (make bench-sccase-install)"}
    shutil.rmtree(outdir, ignore_errors=True)
    timeout = float(os.environ.get("SCCASE_PEER_TIMEOUT", timeout))
    err = outdir.with_suffix(".err")
    m = run_measured([str(PEER_PY), str(BENCH / "sccase_runner.py"), str(h5ad), str(outdir)],
                     log=outdir.with_suffix(".log"), stderr_log=err, interval=0.5, timeout=timeout)
    if m.stopped == "timeout":
        return {"status": f"timed out after {timeout:.0f} s", "subprocess_wall_s": m.wall_s}
    res = json.loads((outdir / "result.json").read_text()) if (outdir / "result.json").exists() else {}
    res.setdefault("status", "ok" if m.returncode == 0 else f"exit {m.returncode}: {err.read_text()[-300:]}")
    res["subprocess_wall_s"] = m.wall_s
    return res


def _peer_enhanced(outdir: Path):
    import scipy.sparse as sp

    if (outdir / "enhanced.npz").exists():
        return sp.load_npz(outdir / "enhanced.npz").toarray()
    if (outdir / "enhanced.npy").exists():
        return np.load(outdir / "enhanced.npy")
    return None


def _fit(store: Path, **kw) -> dict:
    from scatac_dist.models import SCCASE

    with Timer() as t:
        m = SCCASE(**kw).fit(store)
    return {"seconds": t.seconds, "timings": m.timings_, "client_maxrss_gib": ru_maxrss_bytes() / 2 ** 30,
            **{k: m.result_[k] for k in ("mode", "n_cells", "n_peaks", "n_factors", "n_iter", "converged")},
            "loss_first": m.result_["losses"][0], "loss_last": m.result_["losses"][-1]}


def _labels(store: Path, atlas, key: str) -> np.ndarray:
    """Labels from the store's root obs (a MuData store keeps them there, not in the modality)."""
    return root_obs(store).loc[atlas.obs.index, key].astype(str).to_numpy()


def quality(names=None) -> None:
    import anndata as ad
    from bench_quality import protocol_seeds

    import scatac_dist as sd

    client = sd.get_client(n_workers=2, dashboard_address=":0")
    out = RESULTS_FILE.load().get("quality", {})
    for name, spec in DATASETS.items():
        if names and name not in names:
            continue
        store = ingest_dataset(name, WORK, client)
        atlas = sd.open_atlas(store)
        y = _labels(store, atlas, spec["key"])
        ok = (y != "Mis") & (y != "nan")
        rec = {"n_cells": int(ok.sum()), "n_labels": int(len(np.unique(y[ok])))}
        rec["raw"] = protocol_seeds(raw_representation(store)[ok], y[ok])
        modes = ["atlas"] + (["exact"] if atlas.n_obs <= 3000 else [])
        for mode in modes:
            rec[f"ours_{mode}_run"] = _fit(store, mode=mode)
            E = sd.open_atlas(store).read("obsm/X_sccase_pca")
            rec[f"ours_{mode}"] = protocol_seeds(E[ok], y[ok])
            print(name, mode, rec[f"ours_{mode}"]["kmeans_ari"], rec[f"ours_{mode}"]["leiden_ari"], flush=True)
        if os.environ.get("SCCASE_NO_PEER"):     # keep the peer's figures from an earlier run
            out[name] = out.get(name, {}) | rec
            RESULTS_FILE.set_section("quality", out)
            continue
        h5ad = WORK / f"{name}_in.h5ad"
        A = atlas.to_memory() if not atlas.is_mudata else None
        if A is None:
            import scipy.sparse as sp
            A = ad.AnnData(sp.csr_matrix(atlas.X.compute()), obs=atlas.obs[[]], var=atlas.var[[]])
        ad.AnnData(A.X, obs=A.obs[[]], var=A.var[[]]).write_h5ad(h5ad)
        done = WORK / f"{name}_peer" / "result.json"
        if os.environ.get("SCCASE_PEER_REUSE") and done.exists():   # the peer's run, from an earlier pass
            peer = json.loads(done.read_text()) | {"reused": True}
        else:
            peer = run_peer(h5ad, WORK / f"{name}_peer")
        rec["peer_run"] = peer
        Y = _peer_enhanced(WORK / f"{name}_peer")
        if Y is not None and Y.shape[0] == atlas.n_obs:
            rec["peer"] = protocol_seeds(peer_representation(Y)[ok], y[ok])
        out[name] = rec
        RESULTS_FILE.set_section("quality", out)
        print(name, json.dumps({k: (v.get("kmeans_ari"), v.get("leiden_ari")) for k, v in rec.items()
                                if isinstance(v, dict) and "kmeans_ari" in v}), flush=True)
    client.close()


def dropout(names=("bm0828", "leukemia"), frac: float = 0.2, seed: int = 0) -> None:
    import anndata as ad
    import scipy.sparse as sp

    import scatac_dist as sd
    from scatac_dist.tl.metrics import auprc, auroc

    client = sd.get_client(n_workers=2, dashboard_address=":0")
    out = {}
    for name in names:
        src = sd.open_atlas(ingest_dataset(name, WORK, client))
        C = sp.csr_matrix(src.X.compute())
        C.sort_indices()
        rng = np.random.default_rng(seed)
        drop = rng.random(C.nnz) < frac
        rows = np.repeat(np.arange(C.shape[0]), np.diff(C.indptr))
        D = C.copy()
        D.data[drop] = 0
        D.eliminate_zeros()
        h5 = WORK / f"{name}_dropped.h5ad"
        ad.AnnData(D, obs=src.obs[[]], var=src.var[[]]).write_h5ad(h5)
        store = WORK / f"{name}_dropped.zarr"
        sd.ingest(h5, store, overwrite=True, client=client, progress=False)
        run = _fit(store)
        L = sp.csr_matrix(sd.open_atlas(store).read("layers/sccase"))
        pos_r, pos_c = rows[drop], C.indices[drop]
        # negatives: entries that were 0 in the original, a seeded sample 10x the positives
        nneg = 10 * len(pos_r)
        nr, nc = rng.integers(0, C.shape[0], 3 * nneg), rng.integers(0, C.shape[1], 3 * nneg)
        zero = np.asarray(C[nr, nc]).ravel() == 0
        nr, nc = nr[zero][:nneg], nc[zero][:nneg]
        truth = np.r_[np.ones(len(pos_r)), np.zeros(len(nr))]
        rec = {"dropped": int(drop.sum()), "negatives": int(len(nr)), "run": run}
        for label, M in (("sccase", L), ("raw_damaged", D)):
            s = np.r_[np.asarray(M[pos_r, pos_c]).ravel(), np.asarray(M[nr, nc]).ravel()].astype(np.float64)
            rec[label] = {"auroc": auroc(truth, s), "auprc": auprc(truth, s)}
        out[name] = rec
        print(name, rec["sccase"], rec["raw_damaged"], flush=True)
        RESULTS_FILE.set_section("dropout", out)
    client.close()


# ------------------------------------------------------------------------------------ scale

def scale_child(store: str, mode: str, out: str, k: int, iters: int, top: int) -> None:
    import scatac_dist as sd
    from scatac_dist.models import SCCASE
    from scatac_dist.tl.metrics import ari

    res = {"mode": mode, "store": store}
    with TreeSampler(os.getpid()) as sampler:
        # recorded: where a mode stops is a result
        with recorded(res, traceback_chars=0), local_cluster(2, 1, "10GiB"):
            with sampler.timed_stage("sccase") as t:
                m = SCCASE(mode=mode, k_neighbors=k, max_iter=iters, tol=0, n_factors=10, enhanced_top=top).fit(store)
            res["seconds"] = t.seconds
            sampler.set_stage(None)
            res["timings"] = m.timings_
            res.update({k_: m.result_[k_] for k_ in ("n_cells", "n_peaks", "n_factors", "n_iter", "enhanced_nnz",
                                                     "seconds_per_iteration")})
            atlas = sd.open_atlas(store)
            y = atlas.obs["celltype"].astype(str).to_numpy()
            from sklearn.cluster import KMeans

            E = atlas.read("obsm/X_sccase_pca")
            res["kmeans_ari"] = ari(y, KMeans(10, n_init=5, random_state=0).fit_predict(E))
    # which process peaked (by role): the client or a worker
    figures = sampler.figures_gib()
    res.update({k_: figures[k_] for k_ in ("peak_rss_max_process_gib", "peak_rss_by_role_gib", "peak_rss_tree_gib")})
    write_json(out, res)


def scale(sizes, k: int = 30, iters: int = 5, top: int = 500, modes=("atlas", "exact"), peer: bool = True) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    res = RESULTS_FILE.load().get("scale", {})
    for n in sizes:
        store = ensure_atlas(n, scratch())
        for mode in modes:
            out = WORK / f"scale_{n}_{mode}.json"
            r = run_child([sys.executable, __file__, "scale-child", str(store), mode, str(out), str(k), str(iters),
                           str(top)], out, missing="no result", wall_key=None)
            res[f"{n}_{mode}"] = r
            print(n, mode, r.get("status"), r.get("seconds"), r.get("peak_rss_max_process_gib"), r.get("kmeans_ari"),
                  flush=True)
            RESULTS_FILE.set_section("scale", res)
        if peer:
            import anndata as ad

            h5ad = WORK / f"synth_{n}.h5ad"
            if not h5ad.exists():
                a = ad.read_zarr(store)
                ad.AnnData(a.X, obs=a.obs[[]], var=a.var[[]]).write_h5ad(h5ad)
            r = run_peer(h5ad, WORK / f"synth_{n}_peer")
            res[f"{n}_peer"] = {k_: r.get(k_) for k_ in ("status", "subprocess_wall_s", "wall_s", "peak_rss_bytes",
                                                         "peak_rss_gib", "n_factors")}
            print(n, "peer", res[f"{n}_peer"], flush=True)
            RESULTS_FILE.set_section("scale", res)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("section", choices=["quality", "dropout", "scale", "scale-child", "report"])
    ap.add_argument("rest", nargs="*")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 100000])
    ap.add_argument("--modes", nargs="+", default=["atlas", "exact"])
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args(argv)
    if a.section == "quality":
        quality(a.rest or None)
    elif a.section == "dropout":
        dropout()
    elif a.section == "scale":
        scale(a.sizes, iters=a.iters, modes=a.modes, peer=not a.no_peer)
    elif a.section == "scale-child":
        store, mode, out, k, iters, top = a.rest
        scale_child(store, mode, out, int(k), int(iters), int(top))
    else:
        report()


def report() -> None:
    res = RESULTS_FILE.load()
    lines = []
    q = res.get("quality", {})
    if q:
        lines += ["| dataset | representation | k-means ARI | Leiden ARI | k-means ARI, 5 seeds | Leiden ARI, 5 seeds |",
                  "|---|---|---:|---:|---:|---:|"]
        for name, rec in q.items():
            for key in ("ours_atlas", "ours_exact", "peer", "raw"):
                r = rec.get(key)
                if r:
                    lines.append(f"| {name} | {key} | {r['kmeans_ari']:.3f} | {r['leiden_ari']:.3f} | "
                                 f"{r['kmeans_ari_mean']:.3f} ± {r['kmeans_ari_sd']:.3f} | "
                                 f"{r['leiden_ari_mean']:.3f} ± {r['leiden_ari_sd']:.3f} |")
    d = res.get("dropout", {})
    if d:
        lines += ["", "| dataset | dropped | scored by | auROC | auPRC |", "|---|---:|---|---:|---:|"]
        for name, rec in d.items():
            for key in ("sccase", "raw_damaged"):
                lines.append(f"| {name} | {rec['dropped']} | {key} | {rec[key]['auroc']:.3f} | {rec[key]['auprc']:.3f} |")
    s = res.get("scale", {})
    if s:
        lines += ["", "| run | status | total s | s / iteration | largest process GiB | all processes GiB | "
                  "k-means ARI |", "|---|---|---:|---:|---:|---:|---:|"]
        for key, r in s.items():
            spi = r.get("seconds_per_iteration")
            spi = f"{np.mean(spi):.1f}" if spi else ""
            lines.append(f"| {key} | {str(r.get('status'))[:60]} | {r.get('seconds') or r.get('subprocess_wall_s') or 0:.0f} "
                         f"| {spi} | {r.get('peak_rss_max_process_gib') or 0:.2f} | {r.get('peak_rss_tree_gib') or 0:.2f} "
                         f"| {format(r['kmeans_ari'], '.3f') if r.get('kmeans_ari') is not None else ''} |")
    publish("sccase", "## scCASE (`python benchmarks/bench_sccase.py quality|dropout|scale`, then `report`)\n\n"
            "Quality: k-means (k = labels) and Leiden searched to k, on the representation named; `peer` is "
            "the authors' scCASE 0.2.5 run here with its defaults, its enhanced matrix put through our "
            "representation (TF-IDF, L2, 50 PCs); `raw` is that representation of the input. Dropout: "
            "20% of non-zeros dropped, scored against 10x as many true zeros. Scale: synthetic atlases "
            "(100k peaks, 10 types), K = 10, k = 30, 5 iterations, 2 workers, enhanced matrix kept to each "
            "cell's top 500 entries.\n\n", lines, md=RESULTS / "sccase.md")
    _plot(res)


def _plot(res: dict) -> None:
    q = res.get("quality", {})
    if not q:
        return
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    keys = ("ours_atlas", "ours_exact", "peer", "raw")
    for ax, metric in zip(axes, ("kmeans_ari", "leiden_ari")):
        for i, key in enumerate(keys):
            vals = [q[d].get(key, {}).get(metric, np.nan) for d in q]
            ax.bar(np.arange(len(q)) + 0.2 * i, vals, width=0.2, label=key)
        ax.set_xticks(np.arange(len(q)) + 0.3, list(q))
        ax.set_title(metric)
    axes[0].legend(fontsize=7)
    plots.save(fig, RESULTS / "sccase.png", dpi=120, tight=True)


if __name__ == "__main__":
    main()

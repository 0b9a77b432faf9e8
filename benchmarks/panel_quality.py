"""The validation panel of ``bench_quality.py --panel``: every method and peer on every set of
:mod:`harness.panel`, one protocol, ranks per set and the mean rank (see ``bench_quality``'s
docstring)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, plots
from harness import WORK as BENCH_WORK
from harness.panel import PANEL, build, describe, ensure_store
from harness.report import publish
from harness.results import ResultsFile

WORK = BENCH_WORK / "panel"
PANEL_FILE = ResultsFile(RESULTS / "panel.json")
#: ``--graph-study``'s figures (a file of their own: it may run beside a panel run)
GRAPH_FILE = ResultsFile(RESULTS / "panel_graph.json")
#: the panel's columns, in order: ours, then the peers
ORDER = ("spectral", "sccase", "scembed", "scale", "snapatac2", "sccase_authors", "scembed_authors")
GENIML_PY = BENCH_WORK / "geniml-venv" / "bin" / "python"
#: the epochs geniml's scEmbed tutorial and model card train for (its signature default is 10,
#: at which its embeddings score near 0 here; ours also defaults to 100)
GENIML_EPOCHS = 100
METRICS = ("kmeans_ari", "leiden_ari")


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:key=value,key=value`` -> (``sccase[NAME]``, kwargs); ``a;b`` is a tuple."""
    name, _, body = text.partition(":")
    kw = {}
    for part in filter(None, body.split(",")):
        key, _, val = part.partition("=")
        vals = [_num(v) for v in val.split(";")]
        kw[key] = tuple(vals) if len(vals) > 1 else vals[0]
    return f"sccase[{name}]", kw


def _num(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass                                 # not this type: try the next
    return {"None": None, "True": True, "False": False}.get(v, v)


def _score(E: np.ndarray, y: np.ndarray) -> dict:
    from bench_quality import protocol_seeds

    ok = np.isfinite(E).all(1)
    rec = protocol_seeds(E[ok], y[ok])
    rec["n_scored"] = int(ok.sum())
    return rec


def _spectral(store: Path, client) -> None:
    """The default pipeline up to ``obsm['X_spectral']`` on ``store`` (what the protocol scores)."""
    import scatac_dist as sd
    from scatac_dist.pipeline import default_stages, run_stages

    stages = [s for s in default_stages() if s.name in ("qc", "filter_cells", "select_features", "tfidf",
                                                       "lsi", "spectral")]
    run_stages(sd.open_atlas(store), stages, client=client, force=True, progress=False)


def _ours(name: str, store: Path, y: np.ndarray, methods, variants, client) -> dict:
    """Our methods on one fresh store: scCASE (and its variants), scEmbed, SCALE, then the
    pipeline (last: its QC writes ``pass_qc``, which the models would respect)."""
    import scatac_dist as sd
    from scatac_dist.models import SCALE, SCCASE, SCEMBED

    out = {}
    runs = []
    if "sccase" in methods:
        runs.append(("sccase", {}))
    runs += [v for v in variants]
    for key, kw in runs:
        t0 = time.perf_counter()
        m = SCCASE(**kw).fit(store)
        rec = _score(sd.open_atlas(store).read("obsm/X_sccase_pca"), y)
        out[key] = rec | {"seconds": time.perf_counter() - t0, "params": {k: list(v) if isinstance(v, tuple) else v
                                                                          for k, v in kw.items()},
                          "n_factors": m.result_["n_factors"], "mode": m.result_["mode"],
                          "n_peaks_used": m.result_["n_peaks"]}
        print(name, key, round(rec["kmeans_ari_mean"], 3), round(rec["leiden_ari_mean"], 3),
              "K", m.result_["n_factors"], flush=True)
    if "scembed" in methods:
        t0 = time.perf_counter()
        SCEMBED(umap=False, progress=False).fit(store)
        out["scembed"] = _score(sd.open_atlas(store).read("obsm/X_scembed"), y) | {"seconds": time.perf_counter() - t0}
    if "scale" in methods:
        t0 = time.perf_counter()
        m = SCALE(progress=False).fit(store)
        a = sd.open_atlas(store)
        out["scale"] = _score(a.read("obsm/X_scale"), y) | {
            "seconds": time.perf_counter() - t0, "n_used": int(a.obs["scale_used"].sum()),
            "binary_input": a.provenance()["scale"]["result"].get("binary_input"), "n_clusters": m.n_clusters_}
    if "spectral" in methods:
        t0 = time.perf_counter()
        _spectral(store, client)
        out["spectral"] = _score(sd.open_atlas(store).read("obsm/X_spectral"), y) | {
            "seconds": time.perf_counter() - t0}
    return out


def _peers(name: str, h5ad: Path, y: np.ndarray, methods) -> dict:
    from bench_sccase import _peer_enhanced, peer_representation, run_peer
    from snapatac2_runner import run_snapatac2

    out = {}
    if "snapatac2" in methods:
        snap = run_snapatac2(h5ad, WORK / f"{name}_snap", seed=0, mode="memory")
        if snap.get("embedding_path"):
            out["snapatac2"] = _score(np.load(snap["embedding_path"]), y) | {"seconds": snap.get("subprocess_wall_s")}
        else:
            out["snapatac2"] = {"status": str(snap.get("status", snap))[:300]}
    if "sccase_authors" in methods:
        folder = WORK / f"{name}_sccase_authors"
        import os

        os.environ.setdefault("SCCASE_PEER_TIMEOUT", "900")
        peer = run_peer(h5ad, folder)
        Y = _peer_enhanced(folder)
        if Y is not None and Y.shape[0] == len(y):
            out["sccase_authors"] = _score(peer_representation(Y), y) | {
                "seconds": peer.get("subprocess_wall_s"), "n_factors": peer.get("n_factors")}
        else:
            out["sccase_authors"] = {"status": str(peer.get("status"))[:300]}
    if "scembed_authors" in methods:
        out["scembed_authors"] = _geniml(name, h5ad, y)
    return out


def _geniml(name: str, h5ad: Path, y: np.ndarray) -> dict:
    """geniml's scEmbed (``geniml_runner.py`` in ``make bench-geniml-install``'s venv)."""
    from harness import BENCH
    from harness.procs import run_measured

    if not GENIML_PY.exists():
        return {"status": "not installed (make bench-geniml-install)"}
    folder = WORK / f"{name}_geniml"
    shutil.rmtree(folder, ignore_errors=True)
    m = run_measured([str(GENIML_PY), str(BENCH / "geniml_runner.py"), str(h5ad), str(folder),
                      "--seed", "0", "--epochs", str(GENIML_EPOCHS)],
                     log=folder.with_suffix(".log"), stderr_log=folder.with_suffix(".err"), interval=0.5, timeout=1800)
    emb = folder / "embedding.npy"
    if m.returncode != 0 or not emb.exists():
        return {"status": f"exit {m.returncode} ({m.stopped or ''})"}
    return _score(np.load(emb), y) | {"seconds": m.wall_s, "epochs": GENIML_EPOCHS}


def run_panel(sets=None, methods=None, variants=()) -> None:
    import anndata as ad

    import scatac_dist as sd

    methods = list(methods or ORDER)
    variants = [parse_variant(v) for v in variants]
    out = PANEL_FILE.load()
    client = sd.get_client(n_workers=2, dashboard_address=":0")
    try:
        for name in sets or PANEL:
            h5ad = build(name, WORK / "sets", BENCH_WORK / "quality", client)
            y = ad.read_h5ad(h5ad, backed="r").obs["label"].astype(str).to_numpy()
            rec = dict(out.get(name, {}))
            rec["set"] = describe(h5ad)
            store = ensure_store(h5ad, WORK / f"{name}.zarr", client)
            rec.update(_ours(name, store, y, methods, variants, client))
            rec.update(_peers(name, h5ad, y, methods))
            out[name] = rec
            PANEL_FILE.save(out)
            shutil.rmtree(store, ignore_errors=True)
            print(name, json.dumps({k: (round(v["kmeans_ari_mean"], 3), round(v["leiden_ari_mean"], 3))
                                    for k, v in rec.items() if isinstance(v, dict) and "kmeans_ari_mean" in v}),
                  flush=True)
    finally:
        client.close()
    panel_report(out)


def ranks(out: dict, cols: list[str]) -> dict:
    """Per set and protocol, each column's rank (1 best; ties share the mean rank; a column
    missing on a set is left out there), and the mean over sets and both protocols."""
    from scipy.stats import rankdata

    per = {c: [] for c in cols}
    for rec in out.values():
        for metric in METRICS:
            have = [c for c in cols if isinstance(rec.get(c), dict) and f"{metric}_mean" in rec[c]]
            r = rankdata([-rec[c][f"{metric}_mean"] for c in have])
            for c, v in zip(have, r):
                per[c].append(float(v))
    return {c: (float(np.mean(v)) if v else float("nan"), len(v)) for c, v in per.items()}


def _columns(out: dict) -> list[str]:
    seen = {k for rec in out.values() for k, v in rec.items() if isinstance(v, dict) and "kmeans_ari_mean" in v}
    main = [c for c in ORDER if c in seen]
    return main + sorted(seen - set(main))


def panel_report(out: dict) -> None:
    study = GRAPH_FILE.load()
    cols = [c for c in _columns(out) if not c.startswith("sccase[")]
    every = _columns(out)
    head = "| set | cells | peaks | types | values | " + " | ".join(cols) + " |"
    lines = [head, "|---|---:|---:|---:|---|" + "---:|" * len(cols)]
    for name, rec in out.items():
        s = rec["set"]
        cells = []
        for c in cols:
            r = rec.get(c, {})
            cells.append(f"{r['kmeans_ari_mean']:.3f} / {r['leiden_ari_mean']:.3f}" if "kmeans_ari_mean" in r
                         else (r.get("status", "-")[:40] if r else "-"))
        lines.append(f"| {name} | {s['n_cells']} | {s['n_peaks']} | {s['n_types']} | "
                     f"{'0/1' if s['binary'] else 'counts'} | " + " | ".join(cells) + " |")
    mean = {c: np.nanmean([rec[c][f"{m}_mean"] for rec in out.values() for m in METRICS[:1]
                           if "kmeans_ari_mean" in rec.get(c, {})]) for c in cols}
    lmean = {c: np.nanmean([rec[c]["leiden_ari_mean"] for rec in out.values()
                            if "leiden_ari_mean" in rec.get(c, {})]) for c in cols}
    lines.append("| **mean ARI** | | | | | " + " | ".join(f"{mean[c]:.3f} / {lmean[c]:.3f}" for c in cols) + " |")
    rk = ranks(out, cols)
    lines.append("| **mean rank** | | | | | " + " | ".join(f"{rk[c][0]:.2f}" for c in cols) + " |")
    real = {k: v for k, v in out.items() if PANEL.get(k, ("real",))[0] != "synth"}
    if len(real) < len(out):
        rr = ranks(real, cols)
        km = {c: np.nanmean([r[c]["kmeans_ari_mean"] for r in real.values() if "kmeans_ari_mean" in r.get(c, {})])
              for c in cols}
        ld = {c: np.nanmean([r[c]["leiden_ari_mean"] for r in real.values() if "leiden_ari_mean" in r.get(c, {})])
              for c in cols}
        lines.append(f"| **mean ARI, the {len(real)} sets from real data** | | | | | "
                     + " | ".join(f"{km[c]:.3f} / {ld[c]:.3f}" for c in cols) + " |")
        lines.append(f"| **mean rank, the {len(real)} sets from real data** | | | | | "
                     + " | ".join(f"{rr[c][0]:.2f}" for c in cols) + " |")
    extra = [c for c in every if c.startswith("sccase[")]
    if extra:
        lines += ["", "scCASE configurations scored beside the default (mean k-means / Leiden ARI over "
                  "seeds 0-4; rank among scCASE's configurations and the authors' package):", "",
                  "| set | " + " | ".join(["sccase"] + extra + ["sccase_authors"]) + " |",
                  "|---|" + "---:|" * (len(extra) + 2)]
        sub = ["sccase"] + extra + ["sccase_authors"]
        for name, rec in out.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{rec[c]['kmeans_ari_mean']:.3f} / {rec[c]['leiden_ari_mean']:.3f}" if "kmeans_ari_mean" in rec.get(c, {})
                else "-" for c in sub) + " |")
        rk2 = ranks(out, sub)
        lines.append("| **mean rank** | " + " | ".join(f"{rk2[c][0]:.2f}" for c in sub) + " |")
        if len(real) < len(out):
            rk3 = ranks(real, sub)
            lines.append(f"| **mean rank, the {len(real)} sets from real data** | "
                         + " | ".join(f"{rk3[c][0]:.2f}" for c in sub) + " |")
    if study:
        keys = list(next(iter(study.values())))
        lines += ["", "Leiden on small sets (`--graph-study`): Leiden ARI (searched to k, mean of seeds 0-4) "
                  "on kNN graphs of k neighbours, Euclidean or cosine, of our `X_spectral` and SnapATAC2's:", "",
                  "| set | " + " | ".join(k.replace("|", " ") for k in keys) + " |",
                  "|---|" + "---:|" * len(keys)]
        for name, rec in study.items():
            lines.append(f"| {name} | " + " | ".join(f"{rec[k]:.3f}" for k in keys) + " |")
        lines.append("| **mean** | " + " | ".join(f"{np.mean([r[k] for r in study.values()]):.3f}" for k in keys)
                     + " |")
    publish("panel", "## Validation panel (`python benchmarks/bench_quality.py --panel`)\n\n"
            "Every method with its defaults and every peer, one protocol: k-means with k = number of labels "
            "and Leiden searched to k, each the mean ARI over seeds 0-4 (cell: k-means / Leiden). Mean rank: "
            "over sets and both protocols (1 best). Sets: `benchmarks/harness/panel.py`.\n\n",
            lines, md=RESULTS / "panel.md")
    plot(out, cols, RESULTS / "panel.png")


def plot(out: dict, cols: list[str], path: Path) -> None:
    plt = plots.pyplot()
    names = list(out)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
    x = np.arange(len(names))
    w = 0.8 / max(len(cols), 1)
    for ax, metric in zip(axes, METRICS):
        for i, c in enumerate(cols):
            vals = [out[n].get(c, {}).get(f"{metric}_mean", np.nan) for n in names]
            ax.bar(x + (i - (len(cols) - 1) / 2) * w, vals, w, label=c)
        ax.set(xticks=x, ylim=(0, 1), ylabel=metric.replace("_", " ") + " (mean of 5 seeds)")
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    axes[0].legend(fontsize=7, ncol=2)
    plots.save(fig, path, dpi=110)


#: the graph variants of ``--graph-study``: neighbours, and whether rows are scaled to unit
#: length first (cosine neighbours, as SnapATAC2's knn on its spectral embedding)
GRAPH_K = (10, 15, 30, 50)


def graph_study(sets=None) -> None:
    """Leiden ARI (searched to k, seeds 0-4, mean) of our ``X_spectral`` and SnapATAC2's on
    each panel set, for kNN graphs of :data:`GRAPH_K` neighbours, Euclidean or cosine (unit
    rows), UMAP connectivities: what the graph construction does to Leiden on small sets.
    Needs the panel's SnapATAC2 embeddings (``--panel`` first). Writes ``panel_graph.json``."""
    import anndata as ad

    import scatac_dist as sd
    from scatac_dist.tl.graph import connectivities, knn_graph, search_resolution
    from scatac_dist.tl.metrics import ari

    study = GRAPH_FILE.load()
    client = sd.get_client(n_workers=2, dashboard_address=":0")
    try:
        for name in sets or [n for n in PANEL]:
            h5ad = WORK / "sets" / f"{name}.h5ad"
            snap = WORK / f"{name}_snap" / "X_spectral.npy"
            if not (h5ad.exists() and snap.exists()):
                continue
            y = ad.read_h5ad(h5ad, backed="r").obs["label"].astype(str).to_numpy()
            store = ensure_store(h5ad, WORK / f"{name}_graph.zarr", client)
            _spectral(store, client)
            embs = {"spectral": sd.open_atlas(store).read("obsm/X_spectral"), "snapatac2": np.load(snap)}
            shutil.rmtree(store, ignore_errors=True)
            rec = {}
            k_true = len(np.unique(y))
            for emb, E in embs.items():
                ok = np.isfinite(E).all(1)
                E, yy = E[ok].astype(np.float32), y[ok]
                for cosine in (False, True):
                    X = E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12) if cosine else E
                    for k in GRAPH_K:
                        idx, dist = knn_graph(X, k, 0)
                        g = connectivities(idx, dist, X.shape[0])
                        vals = [ari(yy, search_resolution(g, k_true, seed=s, flavor="leidenalg")[1]) for s in range(5)]
                        rec[f"{emb}|{'cos' if cosine else 'euc'}|{k}"] = float(np.mean(vals))
            study[name] = rec
            print(name, {k: round(v, 3) for k, v in rec.items()}, flush=True)
            GRAPH_FILE.save(study)
    finally:
        client.close()
    panel_report(PANEL_FILE.load())

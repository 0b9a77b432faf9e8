"""scEmbed benchmarks (issue 6). Every run is a child process whose whole process tree is
sampled for RSS (``harness.memory.TreeSampler``); results go to ``results/scembed.json``.

Sections:

* ``quality``: k-means (k = number of labels, n_init 20) and Leiden searched to k on
  ``obsm['X_scembed']`` (protocol of ``bench_quality.py``, seed 0) for bm0828 and Leukemia
  after 10, 30 and 100 epochs, against SnapATAC2's k-means ARI measured beforehand.
* ``transfer``: a labelled set (default SNARE ATAC; ``--sets snare leukemia bm0828``) without
  ``Mis``, split in two halves stratified by label. Train on one half; re-call the other
  half's peaks (``datasets.repeak``: every peak moved by up to +-100 bp, 10% of adjacent peaks
  merged), project and annotate it. Macro F1 of the transferred labels against 0.8x the
  5-fold kNN F1 on the training half's own embeddings; also the F1 of the cluster vote at
  Leiden resolution 1 (the earlier default) from the same cell votes.
* ``throughput``: training words/s of ``corpus="file"`` and ``corpus="iterable"`` on 2 gensim
  workers, in the same run, on a synthetic store; then gensim alone on one epoch's documents
  held ready (a file written beforehand, in-memory lists): each mode's ceiling here.
* ``epoch``: seconds per epoch (``corpus="file"``) and peak RSS per process at each size
  (synthetic stores of 100k peaks), training and encoding measured as separate stages.
* ``report``: ``results/scembed.md``, ``scembed.png`` and the ``scembed`` block of RESULTS.md.

Synthetic stores come from ``SCATAC_BENCH_SCRATCH`` (default ``benchmarks/work``), named
``synth_{n//1000}k.zarr``; make them with ``scatac-dist synth``.
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
from harness.stores import DATASETS, copy_store, ingest_dataset, root_obs, synth_path
from harness.timing import Timer

WORK = BENCH_WORK / "scembed"
OUT = RESULTS / "scembed.json"
RESULTS_FILE = ResultsFile(OUT)
SNAPATAC2 = {"leukemia": 0.510, "bm0828": 0.435}  # k-means ARI measured beforehand (issue 6)


# --------------------------------------------------------------------------- one run, in a child


def _child_quality(spec, sampler) -> dict:
    from bench_quality import protocol

    import scatac_dist as sd
    from scatac_dist.models import SCEMBED

    atlas = sd.open_atlas(spec["store"])
    sampler.set_stage("train")
    m = SCEMBED(progress=False, **spec["params"]).fit(atlas)
    sampler.set_stage(None)
    y = atlas.obs[spec["labels_key"]].astype(str).to_numpy()
    ok = (y != "Mis") & (y != "nan")
    res = protocol(atlas.read("obsm/X_scembed")[ok], y[ok], seed=0)
    return res | {"n_cells": int(ok.sum()), "train": m.train_summary_, "timings": m.timings_}


def _child_transfer(spec, sampler) -> dict:
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    import scatac_dist as sd
    from scatac_dist.models import SCEMBED

    ref, query, key, k = sd.open_atlas(spec["ref"]), sd.open_atlas(spec["query"]), spec["labels_key"], spec["k"]
    with sampler.timed_stage("train") as train:
        m = SCEMBED(progress=False, labels_key=key, **spec["params"]).fit(ref)
    m.save(spec["model"])
    m = SCEMBED.load(spec["model"])  # annotate from the bundle alone
    # the cluster vote at Leiden resolution 1 (the earlier default), from the same cell votes;
    # run first so the store ends with the default annotation
    truth = query.obs[key].astype(str).to_numpy()
    res1 = m.annotate(query, k=k, resolution=1.0)
    f1_res1 = f1_score(truth, query.obs["scembed_label"].astype(str), average="macro")
    with sampler.timed_stage("annotate") as annotate:
        summary = m.annotate(query, k=k)
    sampler.set_stage(None)
    obs = query.obs
    f1 = f1_score(truth, obs["scembed_label"].astype(str), average="macro")
    f1_cell = f1_score(truth, obs["scembed_cell_label"].astype(str), average="macro")
    labels = m.label_names_[m.reference_codes_]
    own = cross_val_predict(KNeighborsClassifier(k, metric="cosine"), m.reference_, labels,
                            cv=StratifiedKFold(5, shuffle=True, random_state=0))
    f1_own = f1_score(labels, own, average="macro")
    return {"macro_f1_transfer": f1, "macro_f1_transfer_cell_vote": f1_cell, "macro_f1_own_knn_5fold": f1_own,
            "ratio": f1 / f1_own, "ratio_cell_vote": f1_cell / f1_own, "target_ratio": 0.8,
            "macro_f1_transfer_resolution1": f1_res1, "n_clusters_resolution1": res1["n_clusters"],
            "n_ref_cells": int(ref.n_obs), "n_query_cells": int(query.n_obs), "n_ref_peaks": int(ref.n_vars),
            "n_query_peaks": int(query.n_vars), "annotate": summary, "train": m.train_summary_,
            "train_seconds": train.seconds, "annotate_seconds": annotate.seconds}


def _child_train(spec, sampler) -> dict:
    import scatac_dist as sd
    from scatac_dist.models import SCEMBED

    atlas = sd.open_atlas(spec["store"])
    sampler.set_stage("train")
    m = SCEMBED(progress=False, **spec["params"]).fit(atlas, encode=False)
    with sampler.timed_stage("encode") as encode:
        m.encode(atlas, umap=False)
    sampler.set_stage(None)
    return {"train": m.train_summary_, "history": m.history_, "timings": m.timings_ | {"encode": encode.seconds}}


def _child_kernel(spec, sampler) -> dict:
    """gensim alone on one epoch's documents, held ready: the corpus file written beforehand
    (no store reads or writing alongside) and the same documents as in-memory lists. The
    ceiling of each mode on this machine, against which ``train`` runs are read."""
    import tempfile

    from gensim.models import Word2Vec

    from scatac_dist.models.scembed import SCEMBED
    from scatac_dist.models.scembed_corpus import chunk_doc_freq, chunk_documents
    from scatac_dist.ops.corpus import encode_lines, iter_documents, token_keys, token_width
    from scatac_dist.train.data import StoreRows

    p = SCEMBED()
    rows = StoreRows(spec["store"])
    df = sum(chunk_doc_freq(rows, k) for k in range(rows.n_chunks))
    keep = df >= p.min_count
    keys = token_keys(rows.n_vars)
    docs = [chunk_documents(rows, k, keep, 0, 0) for k in range(rows.n_chunks)]
    n_words = int(sum(t.size for t, _ in docs))
    out = {"total_words_per_epoch": n_words}
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        path = Path(tmp) / "epoch.txt"
        path.write_bytes(b"".join(encode_lines(t, b, token_width(rows.n_vars)) for t, b in docs))
        lists = [d for t, b in docs for d in iter_documents(t, b, keys)]
        for mode in ("file", "iterable"):
            w2v = Word2Vec(vector_size=p.dim, window=p.window, min_count=1, workers=spec["workers"], seed=0,
                           alpha=p.alpha, min_alpha=p.min_alpha)
            w2v.build_vocab_from_freq({keys[j]: int(df[j]) for j in np.flatnonzero(keep)}, corpus_count=rows.n_cells)
            sampler.set_stage(f"kernel_{mode}")
            rates = []
            for e in range(spec["epochs"]):
                kw = {"corpus_file": str(path)} if mode == "file" else {"corpus_iterable": lists}
                with Timer() as t:
                    _, raw = w2v.train(**kw, total_words=n_words, epochs=1, start_alpha=p.epoch_alpha(e),
                                       end_alpha=p.epoch_alpha(e + 1))
                rates.append(raw / t.seconds)
            out[f"{mode}_words_per_s"] = float(np.mean(rates))
    sampler.set_stage(None)
    out["ratio"] = out["file_words_per_s"] / out["iterable_words_per_s"]
    return out


def run_child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    res = {"spec": spec}
    # where a configuration stops is a result
    with TreeSampler(os.getpid()) as sampler, recorded(res), local_cluster(2, 1, "6GiB"):
        with Timer() as t:
            res.update({"quality": _child_quality, "transfer": _child_transfer, "train": _child_train,
                        "kernel": _child_kernel}[spec["kind"]](spec, sampler))
        res["seconds"] = t.seconds
    figures = sampler.figures_gib()
    res.update({k: figures[k] for k in ("peak_rss_by_role_gib", "peak_rss_max_process_gib",
                                        "peak_rss_tree_by_stage_gib", "peak_rss_max_process_by_stage_gib")})
    write_json(spec["out"], res)


def _run(name: str, spec: dict) -> dict:
    res = run_spec_child(__file__, WORK, name, spec)
    print(name, res.get("status"), {k: res.get(k) for k in ("kmeans_ari", "leiden_ari", "ratio", "seconds")},
          (res.get("train") or {}).get("words_per_s"), flush=True)
    return res


# --------------------------------------------------------------------------- sections


def quality(sets, epochs, seeds, sg: int = 0, min_count: int | None = None) -> None:
    for name in sets:
        store = ingest_dataset(name, WORK, reuse=True)
        for ep in epochs:
            for seed in seeds:
                key = (f"{name}_e{ep}_seed{seed}" + ("_skipgram" if sg else "")
                       + (f"_min{min_count}" if min_count is not None else ""))
                params = {"epochs": ep, "seed": seed, "umap": False, "sg": sg}
                if min_count is not None:
                    params["min_count"] = min_count
                res = _run(key, {"kind": "quality", "store": str(store), "labels_key": DATASETS[name]["key"],
                                 "params": params})
                res["snapatac2_kmeans_ari"] = SNAPATAC2.get(name)
                RESULTS_FILE.set_entry("quality", key, res)


def _halves(name: str, seed: int = 0) -> tuple[Path, Path]:
    """Stratified halves of a labelled set (``Mis`` dropped); the second with re-called peaks."""
    import anndata as ad
    from sklearn.model_selection import train_test_split

    import scatac_dist as sd
    from scatac_dist.datasets import repeak

    ref, query = WORK / f"{name}_ref.zarr", WORK / f"{name}_query.zarr"
    if ref.exists() and query.exists():
        return ref, query
    key = DATASETS[name]["key"]
    store = ingest_dataset(name, WORK, reuse=True)
    full = sd.open_atlas(store).to_memory()
    if full.obs.get(key) is None:
        # a 10x .h5 of joint RNA+ATAC is a MuData store: the joined labels live in its root obs
        full.obs = root_obs(store).loc[full.obs_names]
    y = full.obs[key].astype(str).to_numpy()
    ok = np.flatnonzero((y != "Mis") & (y != "nan"))
    a, b = train_test_split(ok, test_size=0.5, stratify=y[ok], random_state=seed)
    a, b = np.sort(a), np.sort(b)
    obs = full.obs[[key]].astype(str)
    h5_ref, h5_query = WORK / f"{name}_ref.h5ad", WORK / f"{name}_query.h5ad"
    ad.AnnData(full.X[a], obs=obs.iloc[a], var=full.var[["chr", "start", "end"]]).write_h5ad(h5_ref)
    Xq, var_q, _ = repeak(full.X[b], full.var, seed=seed)
    ad.AnnData(Xq, obs=obs.iloc[b], var=var_q).write_h5ad(h5_query)
    client = sd.get_client(n_workers=2, dashboard_address=":0")
    for h5, store in ((h5_ref, ref), (h5_query, query)):
        sd.ingest(h5, store, client=client, progress=False, overwrite=True)
        h5.unlink()
    client.close()
    return ref, query


def transfer(name: str, epochs: int, k: int, min_count: int | None) -> None:
    ref, query = _halves(name)
    key = f"{name}_e{epochs}_k{k}" + (f"_min{min_count}" if min_count is not None else "")
    params = {"epochs": epochs} | ({"min_count": min_count} if min_count is not None else {})
    res = _run(f"transfer_{key}", {"kind": "transfer", "ref": str(ref), "query": str(query),
                                   "labels_key": DATASETS[name]["key"], "k": k,
                                   "model": str(WORK / f"{name}_model"), "params": params})
    RESULTS_FILE.set_entry("transfer", key, res)


def throughput(store: Path, epochs: int, workers: int, tag: str) -> None:
    target = copy_store(store, WORK / f"tp_{tag}.zarr")  # training writes obsm into the store: work on a copy
    out = {}
    for corpus in ("file", "iterable"):
        out[corpus] = _run(f"tp_{tag}_{corpus}", {"kind": "train", "store": str(target),
                                                   "params": {"epochs": epochs, "corpus": corpus,
                                                              "workers": workers, "umap": False}})
        RESULTS_FILE.set_entry("throughput", f"{tag}_{corpus}_w{workers}", out[corpus])
    shutil.rmtree(target, ignore_errors=True)
    # reads only: the original store will do
    kern = _run(f"tp_{tag}_kernel", {"kind": "kernel", "store": str(store), "epochs": epochs, "workers": workers})
    RESULTS_FILE.set_entry("throughput", f"{tag}_kernel_w{workers}", kern)
    f, it = (out[c].get("train") or {} for c in ("file", "iterable"))
    if f and it:
        RESULTS_FILE.set_entry("throughput", f"{tag}_ratio_w{workers}", {
            "train_words_per_s_ratio": f["train_words_per_s"] / it["train_words_per_s"],
            "end_to_end_words_per_s_ratio": f["words_per_s"] / it["words_per_s"], "target": 1.5})


def epoch(sizes, epochs: int) -> None:
    for n in sizes:
        store = synth_path(n)
        res = _run(f"epoch_{n}", {"kind": "train", "store": str(store),
                                  "params": {"epochs": epochs, "corpus": "file", "umap": False}})
        res["n_cells"] = n
        RESULTS_FILE.set_entry("epoch", str(n), res)


def report() -> None:
    res = RESULTS_FILE.load()
    lines = []
    q = res.get("quality", {})
    if q:
        lines += ["| dataset | word2vec | epochs | seed | k-means ARI | SnapATAC2 k-means ARI | Leiden ARI "
                  "| training s | words/s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for key, r in q.items():
            name, ep, seed, *rest = key.split("_")
            tr = r.get("train") or {}
            lines.append(f"| {name} | {' '.join(rest) or 'CBOW'} | {ep[1:]} | {seed[4:]} "
                         f"| {r.get('kmeans_ari', float('nan')):.3f} "
                         f"| {r.get('snapatac2_kmeans_ari')} | {r.get('leiden_ari', float('nan')):.3f} "
                         f"| {(r.get('timings') or {}).get('train', 0):.0f} | {tr.get('words_per_s', 0):.3g} |")
    t = res.get("transfer", {})
    if t:
        lines += ["", "| transfer | macro F1 (cluster vote) | clusters | macro F1 (cell vote) "
                  "| F1, cluster vote at resolution 1 (clusters) | 5-fold kNN F1, training half "
                  "| ratio | target | unconfident share | peaks mapped |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, r in t.items():
            if r.get("status") != "ok":
                lines.append(f"| {key} | {r.get('status')} |")
                continue
            pr = r["annotate"]["projection"]
            res1 = (f"{r['macro_f1_transfer_resolution1']:.3f} ({r['n_clusters_resolution1']})"
                    if "macro_f1_transfer_resolution1" in r else "")
            lines.append(f"| {key} | {r['macro_f1_transfer']:.3f} | {r['annotate']['n_clusters']} "
                         f"| {r['macro_f1_transfer_cell_vote']:.3f} | {res1} "
                         f"| {r['macro_f1_own_knn_5fold']:.3f} | {r['ratio']:.2f} | 0.8 "
                         f"| {r['annotate']['share_unconfident']:.3f} | {pr['n_mapped']}/{pr['n_peaks']} |")
    tp = res.get("throughput", {})
    if tp:
        lines += ["", "| throughput run | training words/s | end-to-end words/s | epochs | peak RSS largest process GiB |",
                  "|---|---:|---:|---:|---:|"]
        for key, r in tp.items():
            if "ratio" in key:
                lines.append(f"| {key} | ratio {r['train_words_per_s_ratio']:.2f} | ratio "
                             f"{r['end_to_end_words_per_s_ratio']:.2f} | | target {r['target']} |")
                continue
            if "kernel" in key:
                if r.get("status") == "ok":
                    lines.append(f"| {key}: gensim alone, file / in-memory lists | {r['file_words_per_s']:.3g} / "
                                 f"{r['iterable_words_per_s']:.3g} (ratio {r['ratio']:.2f}) | | | "
                                 f"{r.get('peak_rss_max_process_gib', 0):.2f} |")
                continue
            tr = r.get("train") or {}
            lines.append(f"| {key} | {tr.get('train_words_per_s', 0):.3g} | {tr.get('words_per_s', 0):.3g} "
                         f"| {tr.get('epochs')} | {r.get('peak_rss_max_process_gib', 0):.2f} |")
    e = res.get("epoch", {})
    if e:
        lines += ["", "| cells | words per epoch | s per epoch | training words/s | vocabulary pass s | encode s "
                  "| peak RSS client (train) GiB | peak RSS worker GiB | tree (train) GiB |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, r in e.items():
            tr, tm = r.get("train") or {}, r.get("timings") or {}
            hist = r.get("history") or []
            spe = np.mean([h["seconds"] + h["waited_for_corpus_s"] for h in hist]) if hist else float("nan")
            lines.append(f"| {key} | {tr.get('total_words_per_epoch', 0):.3g} | {spe:.0f} "
                         f"| {tr.get('train_words_per_s', 0):.3g} | {tm.get('vocabulary', 0):.0f} "
                         f"| {tm.get('encode', 0):.0f} | {(r.get('peak_rss_max_process_by_stage_gib') or {}).get('train', 0):.2f} "
                         f"| {(r.get('peak_rss_by_role_gib') or {}).get('worker', 0):.2f} "
                         f"| {(r.get('peak_rss_tree_by_stage_gib') or {}).get('train', 0):.2f} |")
    publish("scembed", "## scEmbed (`python benchmarks/bench_scembed.py quality|transfer|throughput|epoch`, "
            "then `report`)\n\n2 Dask workers and 2 gensim threads on this 2-core machine. Quality: k = number of "
            "labels, k-means (n_init 20) and Leiden searched to k on `obsm['X_scembed']` (protocol of "
            "`bench_quality.py`, seed 0). Transfer: SNARE halves, the query's peaks re-called "
            "(`datasets.repeak`). Throughput and epochs: synthetic stores of 100k peaks.\n\n", lines,
            md=RESULTS / "scembed.md")
    _plot(res)


def _plot(res: dict) -> None:
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    q = res.get("quality", {})
    for name in ("bm0828", "leukemia"):
        pts = sorted((int(k.split("_")[1][1:]), r.get("kmeans_ari", np.nan)) for k, r in q.items()
                     if k.startswith(name) and k.endswith("seed0"))
        if pts:
            axes[0].plot(*zip(*pts), "o-", label=name)
            axes[0].axhline(SNAPATAC2[name], ls=":", color=axes[0].lines[-1].get_color())
    axes[0].set_xlabel("epochs")
    axes[0].set_ylabel("k-means ARI (dotted: SnapATAC2)")
    axes[0].legend()
    tp = {k: r for k, r in res.get("throughput", {}).items() if "ratio" not in k and "kernel" not in k}
    if tp:
        names = list(tp)
        rates = [(r.get("train") or {}).get("train_words_per_s", 0) for r in tp.values()]
        for key, r in res.get("throughput", {}).items():
            if "kernel" in key and r.get("status") == "ok":  # the ceilings: gensim alone, documents ready
                names += [f"{key}: file", f"{key}: lists"]
                rates += [r["file_words_per_s"], r["iterable_words_per_s"]]
        axes[1].barh(names, rates)
        axes[1].ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        axes[1].set_xlabel("training words/s")
    e = res.get("epoch", {})
    if e:
        n = [int(k) for k in e]
        axes[2].plot(n, [(r.get("peak_rss_max_process_by_stage_gib") or {}).get("train", 0) for r in e.values()],
                     "o-", label="largest process (training)")
        axes[2].plot(n, [(r.get("peak_rss_tree_by_stage_gib") or {}).get("train", 0) for r in e.values()],
                     "s-", label="all processes (training)")
        axes[2].set_xscale("log")
        axes[2].set_xlabel("cells")
        axes[2].set_ylabel("peak RSS, GiB")
        axes[2].legend()
    plots.save(fig, RESULTS / "scembed.png", dpi=120, tight=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--sets", nargs="+", default=["bm0828", "leukemia"])
    q.add_argument("--epochs", type=int, nargs="+", default=[10, 30, 100])
    q.add_argument("--seeds", type=int, nargs="+", default=[0])
    q.add_argument("--sg", type=int, default=0, help="1: skip-gram instead of CBOW")
    q.add_argument("--min-count", type=int, help="vocabulary threshold (default: the model's)")
    t = sub.add_parser("transfer")
    t.add_argument("--sets", nargs="+", default=["snare"], help="labelled sets to split (harness.stores.DATASETS)")
    t.add_argument("--epochs", type=int, default=100)
    t.add_argument("--k", type=int, default=15)
    t.add_argument("--min-count", type=int, help="vocabulary threshold (default: the model's)")
    tp = sub.add_parser("throughput")
    tp.add_argument("--store", type=Path)
    tp.add_argument("--epochs", type=int, default=3)
    tp.add_argument("--workers", type=int, default=2)
    tp.add_argument("--tag", default="synth10k")
    e = sub.add_parser("epoch")
    e.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    e.add_argument("--epochs", type=int, default=1)
    sub.add_parser("report")
    c = sub.add_parser("child")
    c.add_argument("spec")
    a = ap.parse_args(argv)
    if a.cmd == "quality":
        quality(a.sets, a.epochs, a.seeds, a.sg, a.min_count)
    elif a.cmd == "transfer":
        for name in a.sets:
            transfer(name, a.epochs, a.k, a.min_count)
    elif a.cmd == "throughput":
        throughput(a.store or synth_path(10_000), a.epochs, a.workers, a.tag)
    elif a.cmd == "epoch":
        epoch(a.sizes, a.epochs)
    elif a.cmd == "child":
        run_child(a.spec)
    else:
        report()


if __name__ == "__main__":
    main()

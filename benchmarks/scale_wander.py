"""How much SCALE's k-means ARI moves from one 100 steps to the next, and whether averaging
over the last steps steadies it (the check behind "Step-to-step wander" in RESULTS.md).

    python benchmarks/scale_wander.py SEED [--store benchmarks/work/sccase/bm0828.zarr] [--paper-decoder]

One quick-mode run (batch 32, early stopping off) is trained to step 9,000, then resumed 100
steps at a time to 11,000 (resume is bit-exact). After each stage the latent means of every
used cell are scored with ``bench_quality.protocol``. At the end the same protocol scores the
uniform average of the 21 stages' weights (and of the last 11), and the average of their
latent means. Writes ``benchmarks/results/scale_wander/<store>_s<SEED>_offset.json`` with
SCALE's default decoder (``depth_offset``), ``<store>_s<SEED>.json`` with ``--paper-decoder``
(the first runs, from before the offset). One core is
enough (``taskset -c N``); two seeds run side by side. ``SCALE.fit(outputs=False)`` writes
nothing into the store, so the runs share it.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, WORK
from harness.results import write_json


def _far_cells(E: np.ndarray, open_peaks: np.ndarray, k: int) -> dict:
    """How far the farthest cell lies (in median distances from the centre), how many k-means
    clusters (the protocol's settings) hold a single cell, and the rank correlation of each
    cell's distance with its open peaks: the signature of the wander."""
    from scipy.stats import spearmanr
    from sklearn.cluster import KMeans

    d = np.linalg.norm(E - E.mean(0), axis=1)
    sizes = np.bincount(KMeans(k, n_init=20, random_state=0).fit_predict(E), minlength=k)
    return {"far_ratio": float(d.max() / np.median(d)), "kmeans_singletons": int((sizes == 1).sum()),
            "distance_depth_spearman": float(spearmanr(d, open_peaks)[0])}


def main(argv=None) -> None:
    from bench_quality import protocol

    import scatac_dist as sd
    from scatac_dist.models import SCALE

    ap = argparse.ArgumentParser()
    ap.add_argument("seed", type=int)
    ap.add_argument("--store", type=Path, default=WORK / "sccase" / "bm0828.zarr",
                    help="an ingested quality store (bench_sccase.py makes it)")
    ap.add_argument("--labels-key", default="celltype")
    ap.add_argument("--paper-decoder", action="store_true", help="SCALE(depth_offset=False)")
    a = ap.parse_args(argv)
    name = a.store.stem
    tag = f"{name}_s{a.seed}" + ("" if a.paper_decoder else "_offset")
    work = WORK / "wander" / tag
    work.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "scale_wander" / f"{tag}.json"
    atlas = sd.open_atlas(a.store)
    y_all = atlas.obs[a.labels_key].astype(str).to_numpy()
    k = len(np.unique(y_all))
    stages = [9000 + 100 * i for i in range(21)]
    base = dict(n_clusters=k, quick=True, seed=a.seed, batch_size=32, patience=10 ** 6,
                checkpoint_dir=str(work / "ck"), checkpoint_every=10 ** 9, progress=False,
                depth_offset=not a.paper_decoder)
    # the cells SCALE trains on, binarised, read once (a quality set of a few hundred cells)
    cells, peaks = SCALE(**base).masks(atlas)
    X = atlas.read("X")[cells][:, np.flatnonzero(peaks)].tocsr()
    X.data[:] = 1.0
    open_peaks = np.diff(X.indptr)
    states, rows, m = [], [], None
    for i, st in enumerate(stages):
        m = SCALE(max_iter=st, min_iter=st, resume=i > 0, **base).fit(a.store, outputs=False)
        E = m.encode_csr(m.module_, X, joint=False)[0]
        r = protocol(E, y_all[cells])
        r["step"] = st
        r.update(_far_cells(E, open_peaks, k))
        states.append({k_: v.clone() for k_, v in m.module_.state_dict().items()})
        np.save(work / f"E_{st}.npy", E)
        rows.append(r)
        print(json.dumps({k_: r[k_] for k_ in ("step", "kmeans_ari", "leiden_ari", "far_ratio", "kmeans_singletons",
                                                "distance_depth_spearman")}), flush=True)
    for lo in (0, 10):
        avg = {k_: torch.stack([s[k_].float() for s in states[lo:]]).mean(0) for k_ in states[0]}
        mod = m.module_
        mod.load_state_dict(avg)
        r = protocol(m.encode_csr(mod, X, joint=False)[0], y_all[cells])
        r["step"] = f"wavg_{stages[lo]}_{stages[-1]}"
        rows.append(r)
        Es = np.mean([np.load(work / f"E_{s}.npy") for s in stages[lo:]], 0)
        r = protocol(Es, y_all[cells])
        r["step"] = f"lavg_{stages[lo]}_{stages[-1]}"
        rows.append(r)
    write_json(out, rows)


if __name__ == "__main__":
    main()

"""Re-measure quality after a change, against the committed figures, without rewriting them.

``pipeline``: our ``X_spectral`` and ``X_lsi`` on the three real sets with the protocol of
``bench_quality.py`` (seed 0 and the 5-seed means), printed beside ``results/quality.json``.
``methods``: scCASE, scEmbed (100 epochs) and SCALE (``n_clusters`` = labels) with their
defaults on Leukemia, seed 0, same protocol. Stores go to a scratch folder (``--scratch``).

    python benchmarks/recheck_quality.py pipeline
    python benchmarks/recheck_quality.py methods [sccase scembed scale]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS
from harness.stores import DATASETS, ingest_dataset, root_obs


def pipeline(scratch: Path, client) -> None:
    from bench_quality import protocol_seeds

    import scatac_dist as sd
    from scatac_dist.pipeline import default_stages, run_stages

    ref = json.loads((RESULTS / "quality.json").read_text())
    for name, spec in DATASETS.items():
        store = ingest_dataset(name, scratch, client)
        atlas = sd.open_atlas(store)
        y_all = root_obs(store)[spec["key"]].astype(str).to_numpy()
        ok = (y_all != "Mis") & (y_all != "nan")
        stages = [s for s in default_stages() if s.name in ("qc", "filter_cells", "select_features", "tfidf",
                                                           "lsi", "spectral")]
        run_stages(atlas, stages, client=client, force=True, progress=False)
        keep = atlas.obs["pass_qc"].to_numpy(bool) if "pass_qc" in atlas.obs else np.ones(atlas.n_obs, bool)
        for rep in ("X_spectral", "X_lsi"):
            r = protocol_seeds(atlas.read(f"obsm/{rep}")[ok & keep], y_all[ok & keep])
            old = ref[name][f"ours_{rep}"]
            print(name, rep, "committed/now", {k: (round(old[k], 4), round(r[k], 4)) for k in
                                               ("kmeans_ari", "leiden_ari", "kmeans_ari_mean", "leiden_ari_mean")},
                  flush=True)


def methods(scratch: Path, client, which) -> None:
    from bench_quality import protocol

    import scatac_dist as sd
    from scatac_dist.models import SCALE, SCCASE, SCEMBED

    for meth in which:
        store = ingest_dataset("leukemia", scratch / meth, client)
        a = sd.open_atlas(store)
        y = a.obs["celltype"].astype(str).to_numpy()
        t = time.perf_counter()
        if meth == "sccase":
            SCCASE(seed=0).fit(a)
            rep = "X_sccase_pca"
        elif meth == "scembed":
            SCEMBED(epochs=100, seed=0, umap=False, progress=False).fit(a)
            rep = "X_scembed"
        else:
            SCALE(n_clusters=len(np.unique(y)), seed=0, progress=False).fit(a)
            rep = "X_scale"
        E = sd.open_atlas(store).read(f"obsm/{rep}")
        ok = np.isfinite(E).all(1)
        r = protocol(E[ok], y[ok])
        print(meth, rep, f"{time.perf_counter() - t:.0f} s", "k-means ARI", round(r["kmeans_ari"], 3),
              "Leiden ARI", round(r["leiden_ari"], 3), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["pipeline", "methods"])
    ap.add_argument("methods", nargs="*", default=["sccase", "scembed", "scale"])
    ap.add_argument("--scratch", type=Path, default=None)
    a = ap.parse_args(argv)
    import scatac_dist as sd

    scratch = a.scratch or Path(tempfile.mkdtemp(prefix="recheck-"))
    client = sd.get_client(n_workers=2, dashboard_address=":0")
    if a.what == "pipeline":
        pipeline(scratch, client)
    else:
        methods(scratch, client, a.methods)


if __name__ == "__main__":
    main()

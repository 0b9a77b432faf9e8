"""The demo (``make demo``, ``scatac-dist demo``): a generated, labelled atlas through the
default pipeline and scCASE on the current Dask cluster, with plots, the clusters' agreement
with the generator's cell types, and a short ``summary.md`` saying what to open.

Writes into ``outdir``: ``atlas.zarr`` (the store, with every slot the pipeline and scCASE
write: ``obsm['X_spectral']``, ``obsm['X_umap']``, ``obs['leiden']``, ``obs['kmeans']``,
``obsm['X_sccase_pca']``, ``obs['sccase_kmeans']``, ...), ``qc.png``, ``umap_celltype.png``,
``umap_leiden.png``, ``umap_sccase.png``, ``scores.json`` and ``summary.md``. Running it again
reuses the atlas and skips the stages already done with the same parameters.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .datasets import SynthParams

logger = logging.getLogger("scatac_dist")

__all__ = ["DEMO_ATLAS", "DEMO_SCCASE", "run_demo", "DemoResult"]

#: The demo's atlas: small enough for a 2-core laptop in a few minutes, with the generator's
#: structure (10 cell types in 3 lineages, log-normal depth, type-specific and lineage peaks).
DEMO_ATLAS = SynthParams(n_cells=6_000, n_peaks=50_000, n_clusters=10)

#: scCASE as the demo runs it: its defaults, except 10 iterations instead of 30 (on the demo's
#: atlas the loss is flat after about 8: 166.7 at 8, 166.2 at 30) and the 500 largest enhanced
#: values per cell instead of all of them (writing all 16,000 per cell took 154 of scCASE's
#: 425 s at 10k cells). Measured at 10k cells: 192 s instead of 425 s, k-means ARI on
#: ``X_sccase_pca`` 0.716 instead of 0.631.
DEMO_SCCASE = {"max_iter": 10, "enhanced_top": 500}


@dataclass
class DemoResult:
    """What :func:`run_demo` did: seconds per step (0 where reused), scores against the
    generator's labels, and the files written."""

    outdir: Path
    seconds: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    scores: dict[str, dict] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def _same_atlas(store: Path, params: SynthParams) -> bool:
    from .store import open_atlas

    if not store.exists():
        return False
    prev = open_atlas(store).provenance().get("synth", {})
    return prev.get("params", {}).get("params") == asdict(params)


def run_demo(outdir: str | Path = "out/demo", *, params: SynthParams | None = None, force: bool = False,
             chunk_rows: int | None = None, client=None, progress: bool = True) -> DemoResult:
    """Generate an atlas, run the default pipeline and scCASE on it, plot and score.

    Parameters
    ----------
    outdir
        Folder for the store, the plots and the summary (created).
    params
        The generator's parameters (default :data:`DEMO_ATLAS`).
    force
        Regenerate the atlas and re-run every stage.
    chunk_rows
        Rows per chunk of the generated store (default: the configured ``store.chunk-rows``).
    client
        Dask client to run on (default: the current one, or an embedded local cluster).

    Returns
    -------
    DemoResult
    """
    from . import pl, tl
    from .cluster import current_client
    from .datasets import synthesize
    from .models import SCCASE
    from .pipeline import default_stages, run_stages
    from .store import open_atlas

    params = params or DEMO_ATLAS
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    store = outdir / "atlas.zarr"
    client = client or current_client()
    res = DemoResult(outdir=outdir)
    k = params.n_clusters

    t0 = time.perf_counter()
    if force or not _same_atlas(store, params):
        logger.info("demo: generating %d cells x %d peaks", params.n_cells, params.n_peaks)
        synthesize(store, params, chunk_rows=chunk_rows, overwrite=True, client=client, progress=progress)
        res.seconds["generate atlas"] = time.perf_counter() - t0
        force = True  # a new atlas: every later stage must run
    else:
        logger.info("demo: %s already holds this atlas; reusing it", store)
        res.seconds["generate atlas"] = 0.0
        res.reused.append("generate atlas")

    atlas = open_atlas(store)
    report = run_stages(atlas, default_stages(k), client=client, force=force, progress=progress)
    for name, rep in report.items():
        res.seconds[name] = rep["seconds"]
        if rep["skipped"]:
            res.reused.append(name)

    t0 = time.perf_counter()
    atlas = open_atlas(store)
    prev = atlas.provenance().get("sccase")
    same = prev is not None and all(prev.get("params", {}).get(k) == v for k, v in DEMO_SCCASE.items())
    if force or not same or "sccase_kmeans" not in atlas.obs:
        SCCASE(seed=0, **DEMO_SCCASE).fit(atlas)
        tl.kmeans(open_atlas(store), k, use_rep="X_sccase_pca", key_added="sccase_kmeans")
        res.seconds["scCASE"] = time.perf_counter() - t0
    else:
        res.seconds["scCASE"] = 0.0
        res.reused.append("scCASE")

    t0 = time.perf_counter()
    atlas = open_atlas(store)
    res.files["qc"] = pl.qc(atlas, outdir / "qc.png")
    res.files["umap_celltype"] = pl.umap(atlas, outdir / "umap_celltype.png", color="celltype")
    res.files["umap_leiden"] = pl.umap(atlas, outdir / "umap_leiden.png", color="leiden")
    res.files["umap_sccase"] = pl.umap(atlas, outdir / "umap_sccase.png", color="sccase_kmeans")
    res.seconds["plots"] = time.perf_counter() - t0

    obs = atlas.obs
    for name, key in (("Leiden on the spectral embedding", "leiden"),
                      ("k-means on the spectral embedding", "kmeans"),
                      ("k-means on scCASE's enhanced matrix", "sccase_kmeans")):
        s = tl.evaluate(obs["celltype"], obs[key])
        res.scores[name] = {"key": key, "ari": s["ari"], "nmi": s["nmi"], "n_clusters": s["n_pred_clusters"]}
    res.files["scores"] = outdir / "scores.json"
    _write_atomic(res.files["scores"], json.dumps(res.scores, indent=1))
    res.files["summary"] = outdir / "summary.md"
    _write_atomic(res.files["summary"], summary_markdown(res, atlas, params))
    res.files["store"] = store
    return res


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def summary_markdown(res: DemoResult, atlas, params: SynthParams) -> str:
    """``summary.md``: what ran, how long each step took, the scores and what to open."""
    total = sum(res.seconds.values())
    lines = [
        "# scatac-dist demo",
        "",
        f"A generated atlas of {atlas.n_obs:,} cells x {atlas.n_vars:,} peaks "
        f"({params.n_clusters} cell types in {params.n_lineages} lineages, median "
        f"{params.fragments:,.0f} fragments per cell; `obs['celltype']` is the truth) went through the "
        "default pipeline of `scatac-dist run` and through scCASE, on a Dask cluster. scCASE ran with its "
        f"defaults except {DEMO_SCCASE['max_iter']} iterations (default 30; its loss is flat after about 8 "
        f"here) and the {DEMO_SCCASE['enhanced_top']} largest enhanced values per cell (default: all), to keep "
        "the demo within a few minutes.",
        "",
        "## Steps",
        "",
        "| step | seconds | |",
        "|---|---:|---|",
    ]
    for name, sec in res.seconds.items():
        lines.append(f"| {name} | {sec:.1f} | {'reused from an earlier run' if name in res.reused else ''} |")
    lines += [f"| **total** | **{total:.1f}** | |", "", "## Clusters against the true cell types", "",
              "| clustering | obs key | clusters | ARI | NMI |", "|---|---|---:|---:|---:|"]
    for name, s in res.scores.items():
        lines.append(f"| {name} | `{s['key']}` | {s['n_clusters']} | {s['ari']:.3f} | {s['nmi']:.3f} |")
    lines += [
        "",
        "## What to open",
        "",
        "- `umap_celltype.png`, `umap_leiden.png`, `umap_sccase.png`: the UMAP of the spectral embedding "
        "coloured by the true type, by Leiden, and by k-means on scCASE's enhanced matrix.",
        "- `qc.png`: counts and peaks per cell, cells per peak.",
        "- `dask-report.html`: Dask's performance report of the run (task stream, worker memory).",
        "- `atlas.zarr`: the store. `anndata.read_zarr('atlas.zarr')` opens it; "
        "`scatac-dist info atlas.zarr` lists its slots and the stages recorded in it.",
        "- `scores.json`: the scores above.",
        "",
    ]
    return "\n".join(lines)

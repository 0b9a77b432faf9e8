"""The benchmarks' inputs: the three real sets, ingested fresh, and the synthetic atlases,
generated once and reused, under ``benchmarks/work`` (synthetic ones: ``$SCATAC_BENCH_SCRATCH``
where set)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from . import BENCH, WORK
from .timing import Timer

DATA = BENCH.parent.parent / "shared" / "data"

#: the real sets: input, label file (None: the labels are in the input), label column
DATASETS = {
    "bm0828": dict(inputs=DATA / "buenrostro2018_bm0828" / "filtered_peak_bc_matrix",
                   labels=DATA / "buenrostro2018_bm0828" / "buenrostro2018_bm0828_labels.tsv", key="celltype"),
    "leukemia": dict(inputs=DATA / "leukemia_corces2016.h5ad", labels=None, key="celltype"),
    "snare": dict(inputs=DATA / "snare_mop" / "filtered_feature_bc_matrix.h5",
                  labels=DATA / "snare_mop" / "snare_mop_metadata.tsv", key="cluster (remapped)"),
}


@contextmanager
def _client(client, **kw):
    """``client`` when given; else a LocalCluster of ``kw`` (``scatac_dist.get_client``), closed after
    (cluster included)."""
    if client is not None:
        yield client
        return
    import scatac_dist as sd
    from scatac_dist.cluster import close_client

    own = sd.get_client(**kw)
    try:
        yield own
    finally:
        close_client(own)  # the LocalCluster too: a closed client alone leaves its workers running


def scratch() -> Path:
    """Where the synthetic atlases live: ``$SCATAC_BENCH_SCRATCH``, else ``benchmarks/work``."""
    return Path(os.environ.get("SCATAC_BENCH_SCRATCH", WORK))


def synth_path(n: int, folder: Path | None = None) -> Path:
    """``FOLDER/synth_{n // 1000}k.zarr``, the name of the synthetic atlas of ``n`` cells."""
    return (folder or scratch()) / f"synth_{n // 1000}k.zarr"


def ensure_atlas(n: int, folder: Path | None = None, *, n_peaks: int = 100_000, name: str | None = None,
                 client=None) -> Path:
    """The synthetic atlas of ``n`` cells x ``n_peaks`` (10 types, seed 0) in ``folder``
    (:func:`scratch` by default), generated once and reused; a partial or unreadable store from
    an interrupted run is generated again. ``client``: the cluster to generate on (by default
    a LocalCluster of 2 single-threaded workers, closed afterwards)."""
    import scatac_dist as sd
    from scatac_dist.datasets import SynthParams, synthesize

    folder = folder or scratch()
    store = folder / name if name else synth_path(n, folder)
    if store.exists():
        try:
            if sd.Atlas(store).n_obs == n:
                return store
        except Exception:  # a partial or unreadable store from an interrupted run: regenerate it
            pass
    folder.mkdir(parents=True, exist_ok=True)
    with _client(client, n_workers=2, threads_per_worker=1) as c, Timer() as t:
        synthesize(store, SynthParams(n_cells=n, n_peaks=n_peaks, n_clusters=10, seed=0), overwrite=True, client=c)
    print(f"generated {store} in {t.seconds:.0f} s", flush=True)
    return store


def ingest_dataset(name: str, folder: Path, client=None, *, reuse: bool = False) -> Path:
    """A fresh ingest of the real set ``name`` (:data:`DATASETS`, labels joined) into
    ``FOLDER/NAME.zarr``; ``reuse``: keep one that is there already. ``client``: as in
    :func:`ensure_atlas`, but 2 workers of the default threads."""
    import scatac_dist as sd

    store = folder / f"{name}.zarr"
    if reuse and store.exists():
        return store
    folder.mkdir(parents=True, exist_ok=True)
    spec = DATASETS[name]
    with _client(client, n_workers=2, dashboard_address=":0") as c:
        sd.ingest(spec["inputs"], store, labels=spec["labels"], overwrite=True, client=c, progress=False)
    return store


def root_obs(store: Path):
    """The store's root ``obs`` (a MuData store keeps the joined labels there, not in the
    modality)."""
    import zarr
    from anndata.io import read_elem

    return read_elem(zarr.open_group(str(store), mode="r")["obs"])


def disk_bytes(path: Path) -> int:
    """Bytes on disk of a file, or of every file under a folder (a zarr store, a 10x folder)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def copy_store(store: Path, target: Path) -> Path:
    """A fresh copy of ``store`` at ``target`` (runs that write into their store work on one)."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(store, target)
    return target


# --------------------------------------------------------------------------- the scaling atlases


def count_name(n: int) -> str:
    """``2000`` -> ``2k``, ``1000000`` -> ``1000k``; counts that are not whole thousands as they are."""
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _synth_params(store: Path) -> dict:
    """What ``synth`` recorded it generated ``store`` from (empty when nothing)."""
    import scatac_dist as sd

    return (sd.open_atlas(store).provenance().get("synth") or {}).get("params", {}).get("params", {})


def _readable(store: Path, n_cells: int, n_peaks: int | None, mod: str | None = None) -> bool:
    """``store`` opens, with ``n_cells`` cells (and ``n_peaks`` peaks when given)."""
    import scatac_dist as sd

    if not store.exists():
        return False
    try:
        a = sd.open_atlas(store, mod=mod) if mod else sd.Atlas(store)
        return a.n_obs == n_cells and (n_peaks is None or a.n_vars == n_peaks)
    except Exception:  # a partial or unreadable store from an interrupted run
        return False


def ensure_like_atlas(like: str, n: int, n_peaks: int, folder: Path | None = None, *, client=None) -> Path:
    """The atlas ``datasets.synthesize_like(like=...)`` makes with ``n`` cells x ``n_peaks``
    (seed 0), ``FOLDER/{like}_{n}k_{n_peaks}kp.zarr``, generated once and reused; a partial or
    unreadable one, one of other sizes, or one generated from other parameters (its recorded
    fingerprint differs: a preset learned again) is generated again. ``like``: ``"mouse"``,
    ``"human"`` (the presets), or what else ``synthesize_like`` takes."""
    from scatac_dist import datasets
    from scatac_dist.calibrated import load_like

    folder = folder or scratch()
    store = folder / f"{Path(str(like)).stem}_{count_name(n)}_{count_name(n_peaks)}p.zarr"
    if _readable(store, n, None):  # the generator decides the exact peak count
        made_from = _synth_params(store).get("fingerprint")
        if made_from == load_like(like).fingerprint:
            return store
        print(f"{store} was generated from parameters {made_from}, not the current {like!r}: generating again",
              flush=True)
    if not hasattr(datasets, "synthesize_like"):
        raise RuntimeError(f"preset {like!r} needs scatac_dist.datasets.synthesize_like, which this checkout "
                           "does not have yet; use --preset synthetic meanwhile")
    folder.mkdir(parents=True, exist_ok=True)
    with _client(client, n_workers=2, threads_per_worker=1, dashboard_address=":0") as c, Timer() as t:
        datasets.synthesize_like(store, like, n_cells=n, n_peaks=n_peaks, seed=0, overwrite=True, client=c,
                                 progress=False)
    print(f"generated {store} in {t.seconds:.0f} s", flush=True)
    return store


def ensure_multiome_atlas(n: int, n_peaks: int, n_genes: int = 2000, folder: Path | None = None, *,
                          client=None) -> Path:
    """A joint RNA + ATAC synthetic atlas (``SynthParams(n_genes=...)``, 10 types, seed 0) of
    ``n`` cells, ``FOLDER/multiome_{n}k_{n_peaks}kp_{n_genes}g.zarr`` (the name
    ``bench_scmvp.py scale`` uses), generated once and reused."""
    from scatac_dist.datasets import SynthParams, synthesize

    folder = folder or scratch()
    store = folder / f"multiome_{count_name(n)}_{count_name(n_peaks)}p_{n_genes}g.zarr"
    if (store / ".done").exists() or _readable(store, n, n_peaks, mod="atac"):
        return store
    folder.mkdir(parents=True, exist_ok=True)
    with _client(client, n_workers=2, threads_per_worker=1, dashboard_address=":0") as c, Timer() as t:
        synthesize(store, SynthParams(n_cells=n, n_peaks=n_peaks, n_genes=n_genes, n_clusters=10, seed=0),
                   overwrite=True, client=c, progress=False)
    (store / ".done").write_text(f"{t.seconds:.1f}\n")
    print(f"generated {store} in {t.seconds:.0f} s", flush=True)
    return store


def ensure_10x_h5(store: Path, path: Path | None = None) -> Path:
    """``store`` exported once to a Cell Ranger ``filtered_peak_bc_matrix.h5`` (gzip), by
    default ``STORE.10x.h5`` beside it; an export left half-written, or older than the store
    (an atlas generated again), is redone."""
    from scatac_dist.io.export import export_10x_h5
    from scatac_dist.store import open_atlas

    path = path or store.with_suffix(".10x.h5")
    if not path.exists() or path.stat().st_mtime < store.stat().st_mtime:
        with Timer() as t:
            export_10x_h5(open_atlas(store), path, compression="gzip")
        print(f"exported {path} in {t.seconds:.0f} s", flush=True)
    return path

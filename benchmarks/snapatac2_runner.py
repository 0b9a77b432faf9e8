"""SnapATAC2 peer runner: its standard embedding and clustering on a cells x peaks matrix.

Runs SnapATAC2's standard pipeline for a count matrix, as in its tutorial
("Standard pipeline: analyzing 5K PBMC dataset from 10X genomics", SnapATAC2 2.9 docs)::

    snap.pp.select_features(adata, n_features=...)
    snap.tl.spectral(adata)
    snap.pp.knn(adata)
    snap.tl.leiden(adata)

in a process of its own, so the memory figures belong to this one run. Every option left
unset keeps SnapATAC2's own default, read from the installed functions' signatures and
written to the JSON (2.9.0: ``n_features=500000``, lower/upper quantile filters 0.005;
``spectral`` ``n_comps=30``, cosine, matrix-free, ``weighted_by_sd=True``; ``knn``
``n_neighbors=50``, kd-tree; ``leiden`` modularity, ``resolution=1``,
``min_cluster_size=5``, clusters smaller than that are labelled ``-1``).

Each call is made with ``inplace=False`` and its result handed to the next step: that is
what lets a read-only backed file work, and it computes exactly what the in-place calls
do (in 2.9.0 ``inplace=True`` only stores the same arrays in ``var['selected']``,
``obsm['X_spectral']``, ``obsp['distances']`` and ``obs['leiden']``).

Modes
-----
``memory``
    ``anndata.read_h5ad`` / ``anndata.read_zarr``: the whole matrix in RAM.
``backed``
    ``snap.read(path, backed='r')``: SnapATAC2's own (Rust) file-backed AnnData, read
    in chunks. This is how SnapATAC2 documents working with large data and limited
    memory (its tutorial: backed mode "processes the data in chunks", "slightly slower
    than memory mode"). The 2.9.0 wheel has no zarr backend ("Unknown backend: zarr"),
    so a zarr store is first streamed, row block by row block, into an uncompressed
    scratch ``.h5ad``; that copy is timed as ``convert`` and kept out of ``total``.
``auto`` (default)
    ``backed`` from ``--backed-min-nnz`` stored values on, ``memory`` below.

Outputs in OUTDIR: ``result.json`` (timings, peak RSS, parameters, versions),
``X_spectral.npy`` (cells x components, float64), ``eigenvalues.npy``, ``leiden.tsv``
(``obs_name``, ``leiden``).

Timings (``times_s``): ``load`` (open or read the input), ``convert`` (zarr to scratch
h5ad, backed mode only), then ``select_features``, ``spectral``, ``knn``, ``leiden`` and
``total`` (the sum of those four), and ``process`` (process creation to the JSON write,
imports included).

Memory (``memory``): the RSS of this process and its children, sampled every 0.1 s by a
psutil thread (``harness.memory.TreeSampler``: ``peak_rss_bytes``, and per step), with ``resource.getrusage`` ``ru_maxrss``
(self and children) as a cross-check. ``baseline_rss_bytes`` is the RSS after the imports,
before the input is opened. A C or Rust call that holds the GIL stalls the sampler thread
(2.9.0's kd-tree ``knn`` does, 14-19 s at 30k cells); ``sampler_max_gap_s`` says how long
the longest stall was, and the larger of the sampled peak and ``ru_maxrss`` is the safer figure. :func:`run_snapatac2` also
samples the child from outside (``peak_rss_external_bytes``), which no GIL can stall.

SnapATAC2-written (backed) h5ad files may use HDF5 filter plugins: every process that
reads them needs ``import hdf5plugin``; this script imports it before anything else.

Usage::

    python benchmarks/snapatac2_runner.py INPUT OUTDIR [--n-features N] [--seed 0]
        [--mode auto|memory|backed] [--threads T] [--n-comps C] [--n-neighbors K]
        [--resolution R]

or from Python::

    from benchmarks.snapatac2_runner import run_snapatac2
    res = run_snapatac2("data.h5ad", "out/snap", seed=0)
    emb = numpy.load(res["embedding_path"])

Needs the ``bench`` extra (``pip install -e '.[bench]'``: snapatac2 2.9.0, hdf5plugin). Imports
``benchmarks/harness`` (its process-tree sampler, launcher and JSON writer: standard library
and psutil), never ``scatac_dist``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

# the harness, also when this file is imported as ``benchmarks.snapatac2_runner``
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.environment import signature_defaults, versions
from harness.memory import TreeSampler, ru_maxrss_bytes
from harness.procs import run_measured
from harness.results import jsonable, write_json
from harness.stores import disk_bytes

logger = logging.getLogger("scatac_dist.benchmarks.snapatac2_runner")

SCRIPT = Path(__file__).resolve()
RESULT_NAME = "result.json"
MODES = ("auto", "memory", "backed")
STEPS = ("select_features", "spectral", "knn", "leiden")
#: ``auto`` switches to backed mode from this many stored values (about 0.8 GB as float32
#: data + int32 indices in RAM, several times that once SnapATAC2 works on it).
DEFAULT_BACKED_MIN_NNZ = 100_000_000
_THREAD_ENV = ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMBA_NUM_THREADS", "POLARS_MAX_THREADS")


# --------------------------------------------------------------------------- input


def _is_zarr(path: Path) -> bool:
    return path.is_dir() or path.suffix == ".zarr"


def _csr_group_info(group: Any, where: str) -> tuple[int, int, int]:
    """(n_obs, n_vars, nnz) of an anndata-encoded CSR ``X`` group (h5py or zarr)."""
    enc = group.attrs.get("encoding-type")
    if isinstance(enc, bytes):
        enc = enc.decode()
    if enc != "csr_matrix":
        raise ValueError(
            f"{where}: X is encoded as {enc!r}, expected 'csr_matrix' (cells x peaks, CSR). "
            "Rewrite it with adata.X = scipy.sparse.csr_matrix(adata.X) before writing."
        )
    n_obs, n_vars = (int(v) for v in group.attrs["shape"])
    indptr = group["indptr"]
    nnz = int(indptr[indptr.shape[0] - 1])
    return n_obs, n_vars, nnz


def input_info(path: str | os.PathLike) -> dict[str, Any]:
    """Shape, non-zeros and format of an ``.h5ad`` file or anndata zarr store, without reading X.

    Reads only ``X``'s attributes and the last ``X/indptr`` entry.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or zarr store")
    if _is_zarr(p):
        import zarr

        g = zarr.open_group(str(p), mode="r")
        if "X" not in g:
            raise ValueError(f"{p}: no X in this zarr store")
        n_obs, n_vars, nnz = _csr_group_info(g["X"], str(p))
        fmt = "zarr"
    else:
        import h5py
        import hdf5plugin  # noqa: F401  (filters of SnapATAC2-written files)

        with h5py.File(p, "r") as f:
            if "X" not in f or not isinstance(f["X"], h5py.Group):
                raise ValueError(f"{p}: X is missing or dense; expected a CSR matrix (cells x peaks)")
            n_obs, n_vars, nnz = _csr_group_info(f["X"], str(p))
        fmt = "h5ad"
    return {"path": str(p.resolve()), "format": fmt, "n_obs": n_obs, "n_vars": n_vars, "nnz": nnz,
            "bytes_on_disk": disk_bytes(p)}


def zarr_to_h5ad(src: str | os.PathLike, dst: str | os.PathLike, *, nnz_per_block: int = 20_000_000) -> Path:
    """Stream an anndata zarr store's ``obs``, ``var`` and CSR ``X`` into an uncompressed ``.h5ad``.

    Memory stays at one block of ``nnz_per_block`` stored values plus ``X/indptr``.
    Reads ``obs``, ``var``, ``X`` of ``src``; writes those three into ``dst`` (overwritten).
    """
    import anndata as ad
    import h5py
    import zarr
    from anndata.io import read_elem

    src, dst = Path(src), Path(dst)
    g = zarr.open_group(str(src), mode="r")
    n_obs, n_vars, nnz = _csr_group_info(g["X"], str(src))
    obs, var = read_elem(g["obs"]), read_elem(g["var"])
    dst.parent.mkdir(parents=True, exist_ok=True)
    ad.AnnData(obs=obs, var=var).write_h5ad(dst)
    zx = g["X"]
    indptr = np.asarray(zx["indptr"][:], dtype=np.int64)
    zdata, zind = zx["data"], zx["indices"]
    with h5py.File(dst, "a") as f:
        gx = f.create_group("X")
        gx.attrs["encoding-type"] = "csr_matrix"
        gx.attrs["encoding-version"] = "0.1.0"
        gx.attrs["shape"] = np.array([n_obs, n_vars], dtype=np.int64)
        gx.create_dataset("indptr", data=indptr)
        ddata = gx.create_dataset("data", shape=(nnz,), dtype=zdata.dtype, chunks=(min(max(nnz, 1), 1 << 20),))
        dind = gx.create_dataset("indices", shape=(nnz,), dtype=zind.dtype, chunks=(min(max(nnz, 1), 1 << 20),))
        row = 0
        while row < n_obs:
            stop = int(np.searchsorted(indptr, indptr[row] + nnz_per_block, side="right")) - 1
            stop = min(max(stop, row + 1), n_obs)
            a, b = int(indptr[row]), int(indptr[stop])
            if b > a:
                ddata[a:b] = zdata[a:b]
                dind[a:b] = zind[a:b]
            row = stop
    return dst


def _load_memory(path: Path, fmt: str) -> Any:
    import anndata as ad
    import scipy.sparse as sp

    adata = ad.read_zarr(path) if fmt == "zarr" else ad.read_h5ad(path)
    if not sp.issparse(adata.X):
        adata.X = sp.csr_matrix(adata.X)
    elif not isinstance(adata.X, sp.csr_matrix):
        adata.X = sp.csr_matrix(adata.X)
    return adata


# --------------------------------------------------------------------------- pipeline


def _effective(func: Any, given: dict[str, Any]) -> dict[str, Any]:
    """SnapATAC2's defaults for ``func`` overlaid with what we pass (minus the data/inplace)."""
    eff = {**signature_defaults(func), **given}
    for k in ("inplace", "features", "verbose"):
        eff.pop(k, None)
    return {k: jsonable(v) for k, v in eff.items()}


def run_pipeline(
    input_path: str | os.PathLike,
    outdir: str | os.PathLike,
    *,
    n_features: int | None = None,
    seed: int = 0,
    mode: str = "auto",
    backed_min_nnz: int = DEFAULT_BACKED_MIN_NNZ,
    n_comps: int | None = None,
    n_neighbors: int | None = None,
    resolution: float | None = None,
    scratch: str | os.PathLike | None = None,
    keep_scratch: bool = False,
) -> dict[str, Any]:
    """Run the SnapATAC2 pipeline in this process and write OUTDIR; return the JSON dict.

    Call it through the command line or :func:`run_snapatac2` to get clean per-run memory
    figures; calling it in a process that already holds data mixes that memory in.
    """
    started_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; valid values: {', '.join(MODES)}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    sampler = TreeSampler(interval=0.1)
    sampler.start()
    sampler.set_stage("imports")

    import hdf5plugin  # noqa: F401  (before anything opens a SnapATAC2-written file)
    import snapatac2 as snap

    # SnapATAC2 logs its progress at INFO on import; keep it, but through our own handler.
    baseline_rss = sampler.sample()

    info = input_info(input_path)
    src = Path(info["path"])
    if mode == "auto":
        mode = "backed" if info["nnz"] >= backed_min_nnz else "memory"
    logger.info("input %s: %d cells x %d peaks, %d nnz; mode %s",
                src, info["n_obs"], info["n_vars"], info["nnz"], mode)

    times: dict[str, float] = {}
    scratch_file: Path | None = None
    sel_kw: dict[str, Any] = {} if n_features is None else {"n_features": int(n_features)}
    spec_kw: dict[str, Any] = {"random_state": seed}
    if n_comps is not None:
        spec_kw["n_comps"] = int(n_comps)
    knn_kw: dict[str, Any] = {"random_state": seed}
    if n_neighbors is not None:
        knn_kw["n_neighbors"] = int(n_neighbors)
    leiden_kw: dict[str, Any] = {"random_state": seed}
    if resolution is not None:
        leiden_kw["resolution"] = float(resolution)

    adata = None
    try:
        # each step is a stage of the sampler (its peak RSS) and timed into ``times``
        if mode == "backed" and info["format"] == "zarr":
            with sampler.timed_stage("convert", times):
                sdir = Path(scratch) if scratch is not None else outdir / "_scratch"
                scratch_file = zarr_to_h5ad(src, sdir / (src.stem + ".h5ad"))

        with sampler.timed_stage("load", times):
            if mode == "backed":
                adata = snap.read(scratch_file or src, backed="r")
            else:
                adata = _load_memory(src, info["format"])
        obs_names = list(adata.obs_names)

        with sampler.timed_stage("select_features", times):
            selected = snap.pp.select_features(adata, inplace=False, **sel_kw)
        with sampler.timed_stage("spectral", times):
            evals, emb = snap.tl.spectral(adata, features=selected, inplace=False, **spec_kw)
        with sampler.timed_stage("knn", times):
            graph = snap.pp.knn(emb, inplace=False, **knn_kw)
        with sampler.timed_stage("leiden", times):
            labels = snap.tl.leiden(graph, inplace=False, **leiden_kw)
        sampler.set_stage("write")
    finally:
        if adata is not None and mode == "backed":
            adata.close()
        if scratch_file is not None and not keep_scratch:
            if scratch is None:
                shutil.rmtree(scratch_file.parent, ignore_errors=True)
            else:
                scratch_file.unlink(missing_ok=True)

    times["total"] = sum(times[s] for s in STEPS)
    emb = np.asarray(emb, dtype=np.float64)
    labels = np.asarray(labels).astype(str)
    np.save(outdir / "X_spectral.npy", emb)
    np.save(outdir / "eigenvalues.npy", np.asarray(evals, dtype=np.float64))
    with open(outdir / "leiden.tsv", "w") as fh:
        fh.write("obs_name\tleiden\n")
        fh.writelines(f"{o}\t{lab}\n" for o, lab in zip(obs_names, labels))
    sampler.stop()

    uniq, counts = np.unique(labels, return_counts=True)
    times["process"] = time.time() - psutil.Process().create_time()
    result: dict[str, Any] = {
        "tool": "snapatac2",
        "started_at": started_at,
        "input": info,
        "mode": mode,
        "backed_min_nnz": int(backed_min_nnz),
        "seed": int(seed),
        "calls": {
            "read": "snap.read(path, backed='r')" if mode == "backed" else
                    f"anndata.read_{'zarr' if info['format'] == 'zarr' else 'h5ad'}(path)",
            "select_features": _effective(snap.pp.select_features, sel_kw),
            "spectral": _effective(snap.tl.spectral, spec_kw),
            "knn": _effective(snap.pp.knn, knn_kw),
            "leiden": _effective(snap.tl.leiden, leiden_kw),
        },
        "n_features_selected": int(np.count_nonzero(selected)),
        "n_components": int(emb.shape[1]),
        "n_clusters": int(np.count_nonzero(uniq != "-1")),
        "n_unassigned": int(counts[uniq == "-1"].sum()),
        "times_s": {k: round(v, 4) for k, v in times.items()},
        "memory": {
            "peak_rss_bytes": int(sampler.peak),
            "peak_rss_per_step_bytes": {k: int(v) for k, v in sampler.stage_peaks.items()},
            "baseline_rss_bytes": int(baseline_rss),
            "ru_maxrss_self_bytes": ru_maxrss_bytes(resource.RUSAGE_SELF),
            "ru_maxrss_children_bytes": ru_maxrss_bytes(resource.RUSAGE_CHILDREN),
            "sampler_interval_s": sampler.interval,
            "sampler_n_samples": int(sampler.n_samples),
            "sampler_max_gap_s": round(sampler.max_gap, 3),
        },
        "files": {"embedding": "X_spectral.npy", "eigenvalues": "eigenvalues.npy", "labels": "leiden.tsv"},
        "embedding_path": str((outdir / "X_spectral.npy").resolve()),
        "labels_path": str((outdir / "leiden.tsv").resolve()),
        "environment": {
            "snapatac2": snap.__version__,
            "versions": versions(("anndata", "numpy", "scipy", "pandas", "h5py", "hdf5plugin", "zarr", "igraph",
                                  "psutil")),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "threads_env": {k: os.environ[k] for k in _THREAD_ENV if k in os.environ},
            "host": platform.node(),
        },
    }
    write_json(outdir / RESULT_NAME, result, indent=2)
    return result


# --------------------------------------------------------------------------- subprocess API


def run_snapatac2(
    input_path: str | os.PathLike,
    outdir: str | os.PathLike,
    *,
    n_features: int | None = None,
    seed: int = 0,
    mode: str = "auto",
    threads: int | None = None,
    n_comps: int | None = None,
    n_neighbors: int | None = None,
    resolution: float | None = None,
    backed_min_nnz: int | None = None,
    scratch: str | os.PathLike | None = None,
    python: str | os.PathLike | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    sample_interval: float = 0.1,
    max_rss_bytes: int | None = None,
) -> dict[str, Any]:
    """Run this script on ``input_path`` in a fresh Python process; return its ``result.json``.

    The caller's memory is not mixed in. On top of the child's own figures, the returned
    dict has ``subprocess_wall_s`` (launch to exit, imports included) and
    ``memory['peak_rss_external_bytes']``, the child's process-tree RSS sampled from this
    process every ``sample_interval`` s. ``embedding_path`` is absolute. The child's log is
    ``OUTDIR/snapatac2_runner.log``.

    Parameters
    ----------
    input_path
        ``.h5ad`` file or anndata zarr store, X a CSR cells x peaks count matrix.
    outdir
        Output folder (created).
    n_features, n_comps, n_neighbors, resolution
        ``None`` keeps SnapATAC2's default.
    seed
        ``random_state`` of ``spectral``, ``knn`` and ``leiden``.
    mode
        ``"auto"``, ``"memory"`` or ``"backed"`` (see the module docstring).
    threads
        Sets ``RAYON_NUM_THREADS``, ``OMP_NUM_THREADS`` and friends in the child.
    python
        Interpreter with snapatac2 installed; this one by default.
    max_rss_bytes
        Kill the child once its process tree exceeds this RSS (before the kernel's OOM killer
        takes the whole machine down) and raise ``CalledProcessError`` saying so.

    Raises
    ------
    subprocess.CalledProcessError
        The child failed; the exception's ``stderr`` holds the end of its log.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; valid values: {', '.join(MODES)}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    cmd = [str(python or sys.executable), str(SCRIPT), str(input_path), str(outdir),
           "--seed", str(seed), "--mode", mode]
    for flag, val in (("--n-features", n_features), ("--n-comps", n_comps), ("--n-neighbors", n_neighbors),
                      ("--resolution", resolution), ("--backed-min-nnz", backed_min_nnz),
                      ("--threads", threads), ("--scratch", scratch)):
        if val is not None:
            cmd += [flag, str(val)]
    child_env = {**os.environ, **(env or {})}
    if threads is not None:
        child_env.update({k: str(threads) for k in _THREAD_ENV})
    result_file = outdir / RESULT_NAME
    result_file.unlink(missing_ok=True)
    log = outdir / "snapatac2_runner.log"
    m = run_measured(cmd, log=log, env=child_env, interval=sample_interval, timeout=timeout,
                     max_rss_bytes=max_rss_bytes)
    rc = m.returncode
    if m.stopped == "timeout":
        raise subprocess.TimeoutExpired(cmd, timeout)
    if m.stopped == "memory":
        raise subprocess.CalledProcessError(
            rc, cmd, output=None,
            stderr=f"stopped: process tree RSS {m.peak_rss_tree / 2**30:.1f} GiB exceeded the "
                   f"{max_rss_bytes / 2**30:.1f} GiB limit")
    if rc != 0 or not result_file.exists():
        tail = log.read_text(errors="replace")[-4000:]
        raise subprocess.CalledProcessError(rc, cmd, output=None, stderr=tail)
    result = json.loads(result_file.read_text())
    result["subprocess_wall_s"] = round(m.wall_s, 4)
    result["memory"]["peak_rss_external_bytes"] = int(m.peak_rss_tree)
    result["log_path"] = str(log.resolve())
    return result


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run SnapATAC2's select_features -> spectral -> knn -> leiden on a cells x peaks "
                    "matrix; write result.json, X_spectral.npy, eigenvalues.npy and leiden.tsv to OUTDIR.")
    p.add_argument("input", help=".h5ad file or anndata zarr store (X: CSR counts, cells x peaks)")
    p.add_argument("outdir", help="output folder (created)")
    p.add_argument("--n-features", type=int, default=None,
                   help="snap.pp.select_features n_features (default: SnapATAC2's, 500000 in 2.9.0)")
    p.add_argument("--seed", type=int, default=0, help="random_state of spectral, knn and leiden (default 0)")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="memory: anndata in RAM; backed: snap.read(backed='r'); auto: backed from "
                        "--backed-min-nnz stored values on (default auto)")
    p.add_argument("--backed-min-nnz", type=int, default=DEFAULT_BACKED_MIN_NNZ,
                   help=f"auto mode threshold (default {DEFAULT_BACKED_MIN_NNZ:,})")
    p.add_argument("--n-comps", type=int, default=None, help="snap.tl.spectral n_comps (default: SnapATAC2's)")
    p.add_argument("--n-neighbors", type=int, default=None, help="snap.pp.knn n_neighbors (default: SnapATAC2's)")
    p.add_argument("--resolution", type=float, default=None, help="snap.tl.leiden resolution (default: SnapATAC2's)")
    p.add_argument("--threads", type=int, default=None,
                   help="set RAYON_NUM_THREADS, OMP_NUM_THREADS, ... before SnapATAC2 is imported")
    p.add_argument("--scratch", default=None, help="folder for the zarr -> h5ad copy in backed mode "
                                                   "(default OUTDIR/_scratch, removed afterwards)")
    p.add_argument("--keep-scratch", action="store_true", help="keep the scratch h5ad")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads is not None and any(os.environ.get(k) != str(args.threads) for k in _THREAD_ENV):
        # numpy's BLAS pool is already sized by now: start again with the variables set.
        if argv is not None:
            raise ValueError("--threads: set the thread variables in the environment before calling main(argv)")
        os.environ.update({k: str(args.threads) for k in _THREAD_ENV})
        os.execv(sys.executable, [sys.executable, str(SCRIPT), *sys.argv[1:]])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    res = run_pipeline(args.input, args.outdir, n_features=args.n_features, seed=args.seed, mode=args.mode,
                       backed_min_nnz=args.backed_min_nnz, n_comps=args.n_comps,
                       n_neighbors=args.n_neighbors, resolution=args.resolution, scratch=args.scratch,
                       keep_scratch=args.keep_scratch)
    t, m = res["times_s"], res["memory"]
    logger.info("done (%s): total %.2f s (select_features %.2f, spectral %.2f, knn %.2f, leiden %.2f); "
                "peak RSS %.1f MiB (ru_maxrss %.1f MiB); %d clusters -> %s",
                res["mode"], t["total"], t["select_features"], t["spectral"], t["knn"], t["leiden"],
                m["peak_rss_bytes"] / 2**20, m["ru_maxrss_self_bytes"] / 2**20, res["n_clusters"],
                Path(args.outdir) / RESULT_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())

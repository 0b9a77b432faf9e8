"""scCASE peer runner: the authors' published scCASE package on a cells x peaks count matrix.

Runs ``scCASE.run`` (PyPI ``scCASE`` 0.2.5, BioX-NKU; the entry point its README documents,
``data_enhanced = scCASE.run(adata, method="scCASE")``) in a process of its own, so the memory
figures belong to this one run. It must be run with the interpreter of the separate scCASE
virtualenv (``make bench-sccase-install`` creates ``benchmarks/work/sccase-venv``); it does not
import ``scatac_dist``.

Every option left unset keeps scCASE's own default. The defaults are read from the installed
functions' signatures (``inspect.signature``) and written to the JSON (``defaults``). In 0.2.5:

``scCASE.run``
    ``method="scCASE"``, ``K="Auto"`` (number of factors estimated), ``K_ref="Auto"``,
    ``type_number_range=range(3, 15)`` (the cell-type numbers searched), ``threshold=0.01``
    (peak filter), ``saveZ=False``, ``save_result=False``.
``run_scCASE`` (the model; ``run`` passes ``K`` and ``Lambda``)
    ``S=0.95`` (keep-probability of the random n x n mask R), ``Alpha=1``, ``Gamma=1``,
    ``Gamma2=1``, ``Theta=0``, ``Seed=100``; ``Lambda`` comes from ``Lambda_calculate``:
    1e6 for scCASE, 1e5 for scCASER. Three outer iterations, fixed in the code.
``Aster.estimate_k`` (used by ``Estimate_k`` when ``K="Auto"``)
    ``binary=True``, ``fpeak=0.01``, ``seed=2022``.

What ``scCASE.run(adata, method="scCASE")`` does, for the record (read from the installed
package, which this script only calls): keeps peaks whose total count is at least
``threshold`` x n_cells; TF-IDF (scikit-learn ``TfidfTransformer(smooth_idf=False,
norm="l2")`` with ``idf - 1``, i.e. raw-count tf x ln(n/df), L2 per cell), float32; estimates
K with ASTER (mean of three estimators over ``type_number_range``, rounded up) plus one; factorises the
TF-IDF matrix with a cell-cell similarity Z initialised from Jaccard similarity; returns an
AnnData (cells x kept peaks, dense) whose X is TF-IDF @ Z, min-max scaled per peak and then
per cell, ``obsm["Embeding"]`` = H^T (cells x K), ``varm["Projection"]`` = W (peaks x K) and
``obsp["Similarity"]`` = Z (dense cells x cells). ``method="scCASER"`` needs a bulk reference
(``--extra ref_path=REF.csv``, peaks x samples, no header) and returns no embedding.

The package looks for ``Z0.npy`` in the current directory (and would load it); the call is
made from a fresh empty working folder (``OUTDIR/_cwd``, removed afterwards) so nothing
stale can be picked up.

Outputs in OUTDIR
-----------------
``result.json``
    status (``"ok"``, ``"out of memory (...)"`` or ``"error: ..."``), timings, peak RSS,
    package and dependency versions, defaults and the parameters passed, input shape, the
    peaks kept, the number of factors, output shapes.
``enhanced.npy`` (dense float32, cells x kept peaks) or ``enhanced.npz`` (CSR, if sparse)
    the enhanced matrix the package returns (its ``X``), unchanged apart from the dtype.
``embedding.npy``
    ``obsm["Embeding"]`` (H^T, cells x K, float32) where the method returns one.
``projection.npy``
    ``varm["Projection"]`` (W, kept peaks x K, float32) where the method returns one.
``var_names.txt``
    the peaks of the enhanced matrix, in order (one per line). Rows are the input cells in
    input order.
``similarity.npy``
    only with ``--save-similarity``: ``obsp["Similarity"]`` (Z, cells x cells, float32).

Timings (``times_s``): ``import`` (scCASE and its dependencies), ``load`` (read the input),
``sccase`` (the ``scCASE.run`` call: the wall time compared with other tools), its parts
(``select_peak``, ``tfidf``, ``estimate_k``, ``factorize``, ``scale``, ``other``), ``save``,
and ``process`` (process creation to the JSON write, imports included). The parts are timed
by pass-through wrappers put around the functions ``scCASE.main`` calls; they hand the
arguments and results through unchanged and also record the K estimated, the peak mask and
the ``Lambda`` passed to the model.

Memory (``memory``): the RSS of this process and its children, sampled every 0.1 s by a
psutil thread (``harness.memory.TreeSampler``: ``peak_rss_bytes``, and per part of the call), with ``resource.getrusage``
``ru_maxrss`` (self and children) as a cross-check; ``baseline_rss_bytes`` is the RSS after
the imports. NumPy and BLAS release the GIL, so the sampler keeps running during the
package's dense algebra; ``sampler_max_gap_s`` says how long its longest stall was.
``ru_maxrss_children_bytes`` is not extra memory: scikit-learn's KMeans (through joblib/loky)
runs ``lscpu`` to count physical cores, and that child's ``ru_maxrss`` is the size of the
forked copy of this process just before it execs ``lscpu``. For the same reason the sampler
skips a child whose command line is this process's own (a fork before its exec).

Memory limit (``memory_limit``): ``--max-rss-gib G`` (default 0.85 x the machine's RAM;
``0``: none) makes the sampler a watchdog: above the limit it writes ``result.json`` with
status ``"out of memory (RSS watchdog: ...)"`` and ends this process at once (exit 137)
before the machine runs out of memory. A ``MemoryError`` inside the package (for example
under ``ulimit -v``) gives status ``"out of memory (MemoryError ...)"``.

Preflight (``preflight``): after loading, the peaks the package will keep are counted (by
its rule, above) and a floor for its memory is computed: the n x n mask R (int64), Z and Z0
(float32) and the dense kept-peaks x n TF-IDF (float32), all alive together through the
updates. Above the limit the call is not made and the status says ``"out of memory
(predicted: ...; not run)"`` (``--no-preflight`` runs it anyway, under the watchdog). The
real peak is well above this floor because of float64 temporaries (at 10k cells x 32.8k kept
peaks: floor 2.7 GiB, measured peak about 10.8 GiB); ``predicted`` gives the sizes of the
largest single arrays. Memory grows as n^2 and n x q: 100k cells need 74.5 GiB for R alone.

SIGTERM and SIGHUP are routed (``signal.set_wakeup_fd``) to the sampler thread, which
writes ``result.json`` with status ``"terminated (SIGTERM during <part>)"`` and what was
measured so far, then exits with 128 + the signal number, even while the main thread is
inside a long BLAS call. (SIGKILL, e.g. from ``subprocess.run(timeout=...)``, leaves no JSON.)

Top-level summary keys: ``wall_s`` (the ``scCASE.run`` call), ``process_s``,
``peak_rss_bytes`` / ``peak_rss_gib`` (the larger of the sampled peak and ``ru_maxrss``),
``n_factors``, ``n_peaks_kept``.

Usage::

    benchmarks/work/sccase-venv/bin/python benchmarks/sccase_runner.py INPUT OUTDIR
        [--n-factors K] [--method scCASE|scCASER] [--extra key=value ...]
        [--max-rss-gib G] [--no-preflight] [--save-similarity]

INPUT is an ``.h5ad`` file or an anndata zarr store with raw counts, cells x peaks, in X
(sparse). X is passed as CSR float32 (counts unchanged). ``--extra`` values are Python
literals where they parse as one (``threshold=0.02``, ``saveZ=True``), strings otherwise;
``type_number_range=3:15`` gives ``range(3, 15)``.

Exit status: 0 when the call succeeded, 1 when it failed or the preflight refused it
(``result.json`` still written), 137 when the watchdog stopped it, 143 on SIGTERM.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import functools
import inspect
import os
import platform
import resource
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

# benchmarks/harness: only its modules that import the standard library and psutil (this runs
# under the scCASE virtualenv: numpy 1.26, psutil 5.9, no scatac_dist)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.environment import signature_defaults, versions
from harness.memory import TreeSampler, ru_maxrss_bytes
from harness.results import jsonable, write_json

SCRIPT = Path(__file__).resolve()
RESULT_NAME = "result.json"
METHODS = ("scCASE", "scCASER")
#: default RSS limit (watchdog and preflight) as a fraction of the machine's RAM
DEFAULT_LIMIT_FRACTION = 0.85
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
#: functions of ``scCASE.main`` timed as parts of the call (the name in the JSON)
_PARTS = {"load_data": "load_data", "select_peak": "select_peak", "tfidf": "tfidf",
          "Estimate_k": "estimate_k", "Lambda_calculate": "lambda", "run_scCASE": "factorize",
          "run_scCASER": "factorize", "myscaler": "scale"}


# --------------------------------------------------------------------------- memory


class MemoryWatch(TreeSampler):
    """The process tree's RSS every ``interval`` s, peak overall and per part (a
    :class:`~harness.memory.TreeSampler` of this process that skips its own forks, see
    ``skip_forks``), and a watchdog.

    With ``limit_bytes`` set, a sample above it calls ``on_limit(rss)`` once (from the sampler
    thread). ``signal_fd``: signals written there (``signal.set_wakeup_fd``) are handed to
    ``on_signal(signum)`` by the sampler thread.
    """

    def __init__(self, interval: float = 0.1, limit_bytes: int | None = None, on_limit: Any = None,
                 signal_fd: int | None = None, on_signal: Any = None) -> None:
        super().__init__(interval=interval, skip_forks=True, name="sccase-rss")
        self.limit_bytes = limit_bytes
        self._on_limit = on_limit
        self._fired = False
        self._signal_fd = signal_fd
        self._on_signal = on_signal

    def sample(self) -> int:
        rss = super().sample()
        with self._lock:
            fire = self.limit_bytes is not None and rss > self.limit_bytes and not self._fired
            if fire:
                self._fired = True
        if fire and self._on_limit is not None:
            self._on_limit(rss)
        return rss

    def _check_signals(self) -> None:
        """Signals written to the wakeup fd by Python's C-level handler (from any thread, at once)."""
        if self._signal_fd is None:
            return
        try:
            data = os.read(self._signal_fd, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # closed: the handlers were restored
            self._signal_fd = None
            return
        if data and self._on_signal is not None:
            self._on_signal(data[-1])

    def tick(self) -> None:
        self.sample()
        self._check_signals()

    def figures(self) -> dict[str, Any]:
        return {
            "peak_rss_bytes": int(self.peak),
            "peak_rss_per_part_bytes": {k: int(v) for k, v in self.stage_peaks.items()},
            "ru_maxrss_self_bytes": ru_maxrss_bytes(resource.RUSAGE_SELF),
            "ru_maxrss_children_bytes": ru_maxrss_bytes(resource.RUSAGE_CHILDREN),
            "sampler_interval_s": self.interval,
            "sampler_n_samples": int(self.n_samples),
            "sampler_max_gap_s": round(self.max_gap, 3),
            "limit_bytes": self.limit_bytes,
        }


# --------------------------------------------------------------------------- input


def read_counts(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """AnnData (X CSR float32, obs, var) from an ``.h5ad`` file or anndata zarr store.

    For zarr only ``X``, ``obs`` and ``var`` are read (element by element), so stores written
    by newer anndata versions than the one in this venv can be read too.
    """
    import anndata as ad
    import scipy.sparse as sp

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or zarr store")
    if p.is_dir() or p.suffix == ".zarr":
        import zarr

        try:
            from anndata.io import read_elem
        except ImportError:  # anndata < 0.11
            from anndata.experimental import read_elem
        g = zarr.open_group(str(p), mode="r")
        adata = ad.AnnData(X=read_elem(g["X"]), obs=read_elem(g["obs"]), var=read_elem(g["var"]))
        fmt = "zarr"
    else:
        adata = ad.read_h5ad(p)
        fmt = "h5ad"
    x = adata.X
    info = {"path": str(p.resolve()), "format": fmt, "n_obs": int(adata.n_obs), "n_vars": int(adata.n_vars),
            "x_type": type(x).__name__, "x_dtype": str(x.dtype)}
    if not sp.issparse(x):
        x = sp.csr_matrix(x)
    x = sp.csr_matrix(x, dtype=np.float32)
    info["nnz"] = int(x.nnz)
    info["density"] = float(x.nnz) / max(1, adata.n_obs * adata.n_vars)
    adata.X = x
    return adata, info


def minimum_bytes(n_cells: int, n_peaks: int) -> int:
    """A floor for scCASE's peak memory: arrays that are certainly alive together.

    The random mask R (n x n int64), Z and Z0 (n x n float32 each) and the dense TF-IDF
    (kept peaks x n float32) all live through the updates; the real peak is higher (float64
    temporaries: about 10.8 GiB at 10k cells x 32.8k peaks, where this floor is 2.7 GiB).
    """
    n, q = int(n_cells), int(n_peaks)
    return 8 * n * n + 2 * 4 * n * n + 4 * q * n


def predicted_bytes(n_cells: int, n_peaks: int) -> dict[str, int]:
    """Sizes of the largest single dense arrays scCASE builds (n cells, q kept peaks)."""
    n, q = int(n_cells), int(n_peaks)
    return {
        "cells_x_cells_float32": 4 * n * n,
        "cells_x_cells_float64": 8 * n * n,
        "mask_R_int64": 8 * n * n,
        "peaks_x_cells_float32": 4 * q * n,
        "peaks_x_cells_float64": 8 * q * n,
    }


# --------------------------------------------------------------------------- parameters


def _parse_value(text: str) -> Any:
    if ":" in text and all(part.strip().lstrip("-").isdigit() for part in text.split(":")):
        lo, hi = (int(v) for v in text.split(":"))
        return range(lo, hi)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_extra(items: Sequence[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: value}`` (values as described in the module docstring)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--extra {item!r}: expected key=value")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _defaults(func: Any) -> dict[str, Any]:
    return {k: jsonable(v) for k, v in signature_defaults(func).items()}


def package_defaults(sccase: Any) -> dict[str, dict[str, Any]]:
    """Defaults of the installed functions the call goes through."""
    import scCASE.Aster as aster
    import scCASE.main as main

    funcs = {"scCASE.run": sccase.run, "run_scCASE": main.run_scCASE, "run_scCASER": main.run_scCASER,
             "select_peak": main.select_peak, "Aster.estimate_k": aster.estimate_k,
             "Aster.getNClusters": aster.getNClusters}
    out = {name: _defaults(f) for name, f in funcs.items()}
    # Lambda_calculate(data, "p") for scCASE, (data, "r") for scCASER; it reads only data.shape
    stand_in = np.zeros((1, 1), dtype=np.float32)
    out["Lambda_calculate"] = {"scCASE": jsonable(main.Lambda_calculate(stand_in, "p")),
                               "scCASER": jsonable(main.Lambda_calculate(stand_in, "r"))}
    return out


# --------------------------------------------------------------------------- instrumentation


class CallLog:
    """Pass-through wrappers around the functions ``scCASE.main.run`` calls.

    They only time the call, switch the memory sampler's part, and keep a few results
    (peak mask, K estimated, arguments of the model); arguments and return values are
    handed through unchanged.
    """

    def __init__(self, watch: MemoryWatch) -> None:
        self.watch = watch
        self.times: dict[str, float] = {}
        self.calls: list[dict[str, Any]] = []
        self.peak_mask: np.ndarray | None = None
        self.estimated_k: int | None = None
        self.model_args: dict[str, Any] = {}
        self._originals: dict[str, Any] = {}

    def install(self, module: Any) -> None:
        for name, part in _PARTS.items():
            func = getattr(module, name, None)
            if func is None:
                continue
            self._originals[name] = func
            setattr(module, name, self._wrap(name, part, func))

    def uninstall(self, module: Any) -> None:
        for name, func in self._originals.items():
            setattr(module, name, func)
        self._originals.clear()

    def _wrap(self, name: str, part: str, func: Any) -> Any:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            previous = self.watch.set_stage(part)
            t = time.perf_counter()
            try:
                out = func(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                self.times[part] = self.times.get(part, 0.0) + dt
                self.calls.append({"function": name, "seconds": round(dt, 4)})
                self.watch.set_stage(previous)
            self._observe(name, args, kwargs, out)
            return out

        return wrapper

    def _observe(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        if name == "select_peak":
            self.peak_mask = np.asarray(out[2]).ravel().astype(bool)
        elif name == "Estimate_k":
            self.estimated_k = int(out)
        elif name in ("run_scCASE", "run_scCASER"):
            params = inspect.signature(self._originals[name]).bind(*args, **kwargs)
            params.apply_defaults()
            self.model_args = {"function": name}
            for k, v in params.arguments.items():
                if k in ("X2", "X1"):
                    self.model_args[k + "_shape"] = list(getattr(v, "shape", ()))
                elif v is None or isinstance(v, (int, float, str, bool, np.generic)):
                    self.model_args[k] = jsonable(v)


# --------------------------------------------------------------------------- run


def _versions() -> dict[str, str]:
    return versions(("scCASE", "numpy", "scipy", "pandas", "anndata", "scanpy", "scikit-learn", "episcanpy",
                     "louvain", "leidenalg", "igraph", "kneed", "numba", "h5py", "zarr", "psutil", "threadpoolctl"))


def _blas() -> list[dict[str, Any]]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("user_api", "internal_api", "version", "num_threads")
    return [{k: jsonable(d.get(k)) for k in keep} for d in threadpool_info()]


def _resolve_limit(max_rss_gib: float | None) -> tuple[int | None, str]:
    """RSS limit in bytes: ``None`` -> DEFAULT_LIMIT_FRACTION of RAM, 0 -> no limit."""
    if max_rss_gib is None:
        return int(DEFAULT_LIMIT_FRACTION * psutil.virtual_memory().total), f"{DEFAULT_LIMIT_FRACTION} x RAM"
    if max_rss_gib <= 0:
        return None, "none (--max-rss-gib 0)"
    return int(max_rss_gib * 2**30), "--max-rss-gib"


def _catch_termination() -> tuple[int | None, Any]:
    """Route SIGTERM and SIGHUP to a pipe the sampler thread reads; return (read fd, restore).

    Python's C-level handler writes the signal number to the wakeup fd as soon as the signal
    arrives, even while the main thread is inside a long BLAS call; the Python-level
    handler itself (a no-op) would only run once that call returns. Main thread only;
    ``restore()`` puts the previous handlers back.
    """
    if threading.current_thread() is not threading.main_thread():
        return None, lambda: None
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def restore() -> None:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(r)
        os.close(w)

    return r, restore


def _summary(result: dict[str, Any]) -> None:
    """Top-level copies of the headline figures (the details stay in times_s / memory)."""
    t, m = result.get("times_s", {}), result.get("memory", {})
    result["wall_s"] = t.get("sccase", t.get("sccase_until_stopped"))
    result["process_s"] = t.get("process")
    peak = max(m.get("peak_rss_bytes", 0), m.get("ru_maxrss_self_bytes", 0))
    result["peak_rss_bytes"] = int(peak) if peak else None
    result["peak_rss_gib"] = round(peak / 2**30, 3) if peak else None
    result.setdefault("n_factors", result.get("estimated_k"))
    result["n_peaks_kept"] = result.get("peaks", {}).get("n_kept")


def run_sccase(
    input_path: str | os.PathLike,
    outdir: str | os.PathLike,
    *,
    n_factors: int | None = None,
    method: str = "scCASE",
    extra: dict[str, Any] | None = None,
    max_rss_gib: float | None = None,
    preflight: bool = True,
    save_similarity: bool = False,
) -> dict[str, Any]:
    """Run ``scCASE.run`` on ``input_path`` in this process, write OUTDIR; return the JSON dict.

    Run it through the command line (a fresh process) for clean memory figures.
    """
    started_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    if method not in METHODS:
        raise ValueError(f"method={method!r}; valid values: {', '.join(METHODS)}")
    outdir = Path(outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    result_file = outdir / RESULT_NAME
    result_file.unlink(missing_ok=True)

    given: dict[str, Any] = {"method": method, **(extra or {})}
    if n_factors is not None:
        given["K"] = int(n_factors)
    result: dict[str, Any] = {
        "tool": "scCASE",
        "started_at": started_at,
        "status": "running",
        "call": "scCASE.run(adata, **params)",
        "params": jsonable(given),
        "input": {"path": str(Path(input_path).resolve())},
    }
    times: dict[str, float] = {}
    call_started: dict[str, float] = {}

    def abort(status: str, exit_code: int, rss: int = 0) -> None:
        # from the sampler thread: record what is known, write the JSON, end the process now
        result["status"] = status
        result["times_s"] = {k: round(v, 4) for k, v in times.items()}
        if "sccase" in call_started and "sccase" not in times:
            result["times_s"]["sccase_until_stopped"] = round(time.perf_counter() - call_started["sccase"], 4)
        result["memory"] = watch.figures()
        result["memory"]["peak_rss_bytes"] = max(int(rss), result["memory"]["peak_rss_bytes"])
        if calls is not None:
            result["times_s"].update({f"sccase.{k}": round(v, 4) for k, v in calls.times.items()})
            result["estimated_k"] = calls.estimated_k
            result["model_args"] = calls.model_args
            if calls.peak_mask is not None and "peaks" not in result:
                result["peaks"] = {"n_input": int(calls.peak_mask.size), "n_kept": int(calls.peak_mask.sum())}
        _summary(result)
        try:
            write_json(result_file, result, indent=2)
        finally:
            os._exit(exit_code)

    def on_limit(rss: int) -> None:
        abort(f"out of memory (RSS watchdog: process tree RSS {rss / 2**30:.2f} GiB above the "
              f"{limit / 2**30:.2f} GiB limit, during {watch.stage or 'setup'}; stopped)", 137, rss)

    def on_signal(signum: int) -> None:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        abort(f"terminated ({name} during {watch.stage or 'setup'})", 128 + signum)

    limit, limit_source = _resolve_limit(max_rss_gib)
    result["memory_limit"] = {"bytes": limit, "source": limit_source}
    signal_fd, restore_signals = _catch_termination()
    watch = MemoryWatch(limit_bytes=limit, on_limit=on_limit, signal_fd=signal_fd, on_signal=on_signal)
    calls: CallLog | None = None
    watch.start()
    watch.set_stage("import")
    t = time.perf_counter()
    import scCASE
    import scCASE.main as sccase_main

    times["import"] = time.perf_counter() - t
    baseline = watch.sample()
    result["defaults"] = package_defaults(scCASE)

    watch.set_stage("load")
    t = time.perf_counter()
    adata, info = read_counts(input_path)
    times["load"] = time.perf_counter() - t
    result["input"] = info
    n_obs, n_vars = adata.n_obs, adata.n_vars
    input_var_names = np.asarray(adata.var_names).astype(str)
    threshold = given.get("threshold", result["defaults"]["scCASE.run"]["threshold"])
    q_expected = int(np.count_nonzero(np.asarray(adata.X.sum(axis=0)).ravel() >= n_obs * float(threshold)))
    floor = minimum_bytes(n_obs, q_expected)
    result["preflight"] = {"n_peaks_expected": q_expected, "minimum_bytes": floor,
                           "minimum_gib": round(floor / 2**30, 2), "checked": bool(preflight and limit)}
    if preflight and limit and floor > limit:
        restore_signals()
        watch.stop()
        result["status"] = (f"out of memory (predicted: at least {floor / 2**30:.1f} GiB for the n x n mask R, "
                            f"Z, Z0 and the dense TF-IDF ({n_obs} cells x {q_expected} peaks) > the "
                            f"{limit / 2**30:.1f} GiB limit; not run)")
        result["predicted"] = predicted_bytes(n_obs, q_expected)
        times["process"] = time.time() - psutil.Process().create_time()
        result["times_s"] = {k: round(v, 4) for k, v in times.items()}
        result["memory"] = {**watch.figures(), "baseline_rss_bytes": int(baseline)}
        _summary(result)
        write_json(result_file, result, indent=2)
        return result

    calls = CallLog(watch)
    calls.install(sccase_main)
    cwd = Path.cwd()
    workdir = outdir / "_cwd"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    enhanced = None
    watch.set_stage("sccase")
    t = call_started["sccase"] = time.perf_counter()
    try:
        os.chdir(workdir)
        enhanced = scCASE.run(adata, **given)
        result["status"] = "ok"
    except MemoryError as exc:
        result["status"] = f"out of memory (MemoryError: {exc})"
        result["traceback"] = traceback.format_exc()[-4000:]
    except Exception as exc:  # noqa: BLE001  (any failure of the package is a result)
        result["status"] = f"error: {type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-4000:]
    finally:
        times["sccase"] = time.perf_counter() - t
        os.chdir(cwd)
        calls.uninstall(sccase_main)
        shutil.rmtree(workdir, ignore_errors=True)
    del adata
    if result["status"] == "ok" and (enhanced is None or isinstance(enhanced, int)):
        result["status"] = f"error: scCASE.run returned {enhanced!r}"
    parts = dict(calls.times)
    parts.pop("load_data", None)  # it only takes adata.X.T here; kept in calls
    parts["other"] = max(0.0, times["sccase"] - sum(calls.times.values()))
    times.update({f"sccase.{k}": v for k, v in parts.items()})

    files: dict[str, str] = {}
    if calls.peak_mask is not None:
        kept = calls.peak_mask
        dropped = np.flatnonzero(~kept)
        result["peaks"] = {
            "n_input": int(n_vars), "n_kept": int(kept.sum()), "n_dropped": int(dropped.size),
            "rule": "total count over cells >= threshold * n_cells (scCASE select_peak)",
            "threshold": jsonable(given.get("threshold", result["defaults"]["scCASE.run"]["threshold"])),
            "dropped_index": dropped.tolist() if dropped.size <= 5000 else None,
            "dropped_index_note": None if dropped.size <= 5000 else "more than 5000; compare var_names.txt",
        }
        result["predicted"] = predicted_bytes(n_obs, int(kept.sum()))
    else:
        result["predicted"] = predicted_bytes(n_obs, n_vars)
    result["estimated_k"] = calls.estimated_k
    result["model_args"] = calls.model_args
    result["calls"] = calls.calls

    if result["status"] == "ok":
        import scipy.sparse as sp

        watch.set_stage("save")
        t = time.perf_counter()
        x = enhanced.X
        if sp.issparse(x):
            sp.save_npz(outdir / "enhanced.npz", sp.csr_matrix(x))
            files["enhanced"] = "enhanced.npz"
            (outdir / "enhanced.npy").unlink(missing_ok=True)
        else:
            np.save(outdir / "enhanced.npy", np.asarray(x, dtype=np.float32))
            files["enhanced"] = "enhanced.npy"
            (outdir / "enhanced.npz").unlink(missing_ok=True)
        var_names = np.asarray(enhanced.var_names).astype(str)
        (outdir / "var_names.txt").write_text("".join(f"{v}\n" for v in var_names))
        files["var_names"] = "var_names.txt"
        result["enhanced"] = {"shape": [int(s) for s in x.shape], "dtype": str(x.dtype),
                              "sparse": bool(sp.issparse(x)),
                              "min": float(x.min()), "max": float(x.max())}
        if calls.peak_mask is not None:
            result["peaks"]["var_names_match_mask"] = bool(
                var_names.shape == input_var_names[calls.peak_mask].shape
                and np.all(var_names == input_var_names[calls.peak_mask]))
        for key, fname, label in (("Embeding", "embedding.npy", "embedding"),):
            if key in enhanced.obsm:
                emb = np.asarray(enhanced.obsm[key], dtype=np.float32)
                np.save(outdir / fname, emb)
                files[label] = fname
                result["embedding"] = {"key": f"obsm[{key!r}]", "what": "H^T (cells x K)",
                                       "shape": [int(s) for s in emb.shape]}
        if "Projection" in enhanced.varm:
            w = np.asarray(enhanced.varm["Projection"], dtype=np.float32)
            np.save(outdir / "projection.npy", w)
            files["projection"] = "projection.npy"
            result["projection"] = {"key": "varm['Projection']", "what": "W (kept peaks x K)",
                                    "shape": [int(s) for s in w.shape]}
        if "Similarity" in enhanced.obsp:
            z = enhanced.obsp["Similarity"]
            result["similarity"] = {"key": "obsp['Similarity']", "what": "Z (cells x cells)",
                                    "shape": [int(s) for s in z.shape], "saved": bool(save_similarity)}
            if save_similarity:
                np.save(outdir / "similarity.npy", np.asarray(z, dtype=np.float32))
                files["similarity"] = "similarity.npy"
        k = result.get("embedding", {}).get("shape", [None, None])[1]
        if k is None and calls.model_args.get("function") == "run_scCASER":
            # run() calls run_scCASER(data, ref, K_ref, K): its K1 is the reference's, K2 the data's
            k = calls.model_args.get("K1", 0) + calls.model_args.get("K2", 0)
        result["n_factors"] = int(k) if k is not None else None
        result["n_factors_source"] = ("--n-factors" if n_factors is not None or "K" in given
                                      else "estimated by scCASE (K='Auto')")
        times["save"] = time.perf_counter() - t
    del enhanced
    restore_signals()
    watch.stop()

    times["process"] = time.time() - psutil.Process().create_time()
    result["times_s"] = {k: round(v, 4) for k, v in times.items()}
    result["memory"] = {**watch.figures(), "baseline_rss_bytes": int(baseline)}
    result["files"] = files
    _summary(result)
    result["environment"] = {
        "sccase": _versions().get("scCASE"),
        "versions": _versions(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "threads_env": {k: os.environ[k] for k in _THREAD_ENV if k in os.environ},
        "threadpools": _blas(),
        "nice": os.nice(0),
        "host": platform.node(),
    }
    write_json(result_file, result, indent=2)
    return result


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run the scCASE package (scCASE.run) on a cells x peaks count matrix; write result.json, "
                    "enhanced.npy/.npz, embedding.npy, projection.npy and var_names.txt to OUTDIR.")
    p.add_argument("input", help=".h5ad file or anndata zarr store (X: sparse raw counts, cells x peaks)")
    p.add_argument("outdir", help="output folder (created)")
    p.add_argument("--n-factors", type=int, default=None,
                   help="K, the number of factors (default: scCASE's K='Auto', estimated)")
    p.add_argument("--method", choices=METHODS, default="scCASE",
                   help="scCASE (default) or scCASER (needs --extra ref_path=REF.csv)")
    p.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more keyword arguments of scCASE.run, e.g. threshold=0.02 type_number_range=3:15")
    p.add_argument("--max-rss-gib", type=float, default=None,
                   help=f"stop the run (status 'out of memory') once the process RSS exceeds this; 0: no limit "
                        f"(default: {DEFAULT_LIMIT_FRACTION} x RAM)")
    p.add_argument("--no-preflight", action="store_true",
                   help="run even when the predicted minimum memory is above the limit")
    p.add_argument("--save-similarity", action="store_true", help="also save Z (cells x cells) as similarity.npy")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    extra = parse_extra(args.extra)
    for reserved in ("data_path", "method", "save_result", "output_path"):
        if reserved in extra:
            raise SystemExit(f"--extra {reserved}=...: set by the runner; use the matching option")
    res = run_sccase(args.input, args.outdir, n_factors=args.n_factors, method=args.method, extra=extra,
                     max_rss_gib=args.max_rss_gib, preflight=not args.no_preflight,
                     save_similarity=args.save_similarity)
    t, m = res["times_s"], res["memory"]
    print(f"[sccase_runner] {res['status']}: scCASE.run {t.get('sccase', float('nan')):.2f} s "
          f"(process {t['process']:.2f} s); "
          f"peak RSS {m['peak_rss_bytes'] / 2**20:.1f} MiB (ru_maxrss {m['ru_maxrss_self_bytes'] / 2**20:.1f} MiB); "
          f"K={res.get('n_factors')}; enhanced {res.get('enhanced', {}).get('shape')} -> "
          f"{Path(args.outdir) / RESULT_NAME}", file=sys.stderr)
    return 0 if res["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())

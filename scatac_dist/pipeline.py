"""Config-driven batch runs of stages over a store, resumable.

A stage is a function ``fn(atlas, client, **params)`` that writes its results into the store
and records its provenance. :func:`run_stages` runs each stage inside one publication
(:meth:`scatac_dist.store.Atlas.publishing`): its results and its record
``uns/scatac_dist/pipeline_<name>`` (parameters and the list of outputs) appear together or
not at all. A stage is skipped when its recorded parameters equal the requested ones *and*
every output it recorded is still in the store, until one stage has to run, after which all
later stages run too (GUIDE invariant 5). Re-running a pipeline after a crash continues where
it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .store import Atlas

logger = logging.getLogger("scatac_dist")

__all__ = ["Stage", "run_stages", "STAGES"]


@dataclass
class Stage:
    """One step of a pipeline: its name, the function that runs it, and its parameters."""

    name: str
    fn: Callable[..., Any]
    params: dict[str, Any] = field(default_factory=dict)


def _qc(atlas: Atlas, client, progress: bool = True, **_):
    from .pp import calculate_qc_metrics

    return calculate_qc_metrics(atlas, client=client, progress=progress)


def _step(fn_path: str):
    """A stage calling ``scatac_dist.<fn_path>(atlas, **params)``, imported when run."""

    def run(atlas: Atlas, client, progress: bool = True, **params):
        import importlib

        mod, _, name = fn_path.rpartition(".")
        fn = getattr(importlib.import_module(f"scatac_dist.{mod}"), name)
        if "client" in fn.__code__.co_varnames:
            params = {**params, "client": client}
        return fn(atlas, **params)

    run.__name__ = fn_path
    run.target = fn_path
    return run


def _target(fn: Callable[..., Any]) -> Callable[..., Any] | None:
    import importlib

    path = getattr(fn, "target", None)
    if path is None:
        return None
    mod, _, name = path.rpartition(".")
    return getattr(importlib.import_module(f"scatac_dist.{mod}"), name)


def validate(stages: list[Stage]) -> None:
    """Check every stage's parameter names against its function, and the TF-IDF method, before
    anything runs: a typo in run.yaml should fail in a second, not after an hour of LSI."""
    import inspect

    from .ops.tfidf import check_method

    for st in stages:
        fn = _target(st.fn)
        if fn is not None:
            sig = inspect.signature(fn)
            valid = [p for p in sig.parameters if p not in ("atlas", "client")]
            bad = sorted(set(st.params) - set(valid))
            if bad:
                raise ValueError(f"stage {st.name!r} has no parameter(s) {bad}; valid: {', '.join(valid)}")
            for name, value in st.params.items():
                _check_type(st.name, name, value, sig.parameters[name].default)
        if st.name == "tfidf" and "method" in st.params:
            check_method(st.params["method"])


def _check_type(stage: str, name: str, value: Any, default: Any) -> None:
    """A parameter from run.yaml must have the type of its default (an int may stand for a float)."""
    import inspect

    if default is inspect.Parameter.empty or default is None or value is None:
        return
    want = type(default)
    if want is bool:
        ok = isinstance(value, bool)
    elif want is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif want is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, want)
    if not ok:
        raise ValueError(f"stage {stage!r}: {name} must be a {want.__name__} like its default {default!r}, "
                         f"not the {type(value).__name__} {value!r}")


#: Every stage by name. ``run`` uses DEFAULT_RUN unless a config names others.
STAGES: dict[str, Callable[..., Any]] = {
    "qc": _qc,
    "filter_cells": _step("pp.filter_cells"),
    "filter_peaks": _step("pp.filter_peaks"),
    "select_features": _step("pp.select_features"),
    "tfidf": _step("pp.tfidf"),
    "lsi": _step("tl.lsi"),
    "spectral": _step("tl.spectral"),
    "neighbors": _step("tl.neighbors"),
    "leiden": _step("tl.leiden"),
    "kmeans": _step("tl.kmeans"),
    "umap": _step("tl.umap"),
}

#: The default pipeline of ``scatac-dist run``: stage name and parameters.
DEFAULT_RUN: list[tuple[str, dict[str, Any]]] = [
    ("qc", {}),
    ("filter_cells", {"min_peaks": 1}),
    ("select_features", {}),
    ("tfidf", {}),
    ("lsi", {}),
    ("spectral", {}),
    ("neighbors", {"use_rep": "X_spectral"}),
    ("leiden", {}),
    ("umap", {"use_rep": "X_spectral"}),
]


def default_stages(n_clusters: int | None = None, overrides: dict[str, dict] | None = None) -> list[Stage]:
    """The default run; with ``n_clusters`` Leiden searches its resolution to that count and
    k-means runs too. ``overrides`` maps stage names to parameter updates (from run.yaml)."""
    overrides = overrides or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"the config must map stage names to parameters, not a {type(overrides).__name__}")
    unknown = set(overrides) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)} in the config; valid: {', '.join(STAGES)}")
    flat = [name for name, params in overrides.items() if not isinstance(params, dict)]
    if flat:
        raise ValueError(f"stage(s) {flat} must map parameter names to values (e.g. lsi: {{n_comps: 50}})")
    plan = [(name, dict(params)) for name, params in DEFAULT_RUN]
    if n_clusters is not None:
        plan = [(n, {**p, "n_clusters": n_clusters} if n == "leiden" else p) for n, p in plan]
        plan.insert(len(plan) - 1, ("kmeans", {"n_clusters": n_clusters}))
    stages = [Stage(name, STAGES[name], {**params, **overrides.get(name, {})}) for name, params in plan]
    validate(stages)
    return stages


def run_stages(atlas: Atlas, stages: list[Stage], *, client=None, force: bool = False,
               progress: bool = True) -> dict[str, dict]:
    """Run ``stages`` in order, skipping those already done with the same parameters.

    Returns
    -------
    dict
        Per stage: ``{"skipped": bool, "seconds": float}``.
    """
    from .cluster import current_client
    from .cluster.monitor import stage as monitored

    client = client or current_client()
    done = atlas.provenance()
    report = {}
    rerun = force  # once a stage runs, every later stage runs too: its input changed
    for st in stages:
        why = None if rerun else _why_rerun(atlas, done.get(f"pipeline_{st.name}"), st.params)
        if not rerun and why is None:
            logger.info("stage %s: already done with these parameters; skipping", st.name)
            report[st.name] = {"skipped": True, "seconds": 0.0}
            continue
        if why:
            logger.info("stage %s: %s", st.name, why)
        rerun = True
        t0 = time.perf_counter()
        logger.info("stage %s: running", st.name)
        with monitored(st.name), atlas.publishing(f"pipeline_{st.name}"):
            st.fn(atlas, client, progress=progress, **st.params)
            seconds = time.perf_counter() - t0
            atlas.record(f"pipeline_{st.name}", st.params, {"total": seconds})
        report[st.name] = {"skipped": False, "seconds": time.perf_counter() - t0}
    return report


def _why_rerun(atlas: Atlas, prev: dict | None, params: dict) -> str | None:
    """Why a stage recorded as ``prev`` must run again for ``params`` (``None``: it need not)."""
    if prev is None:
        return "not run yet"
    if prev.get("params") != params:
        return "recorded with other parameters"
    outputs = prev.get("outputs")
    if not outputs:
        return "its record lists no outputs to check (written by an older version)"
    missing = [o for o in outputs if not atlas.has(o)]
    if missing:
        return f"outputs missing from the store: {', '.join(missing)}"
    return None

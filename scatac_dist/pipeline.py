"""Config-driven batch runs of stages over a store, resumable.

A stage is a function ``fn(atlas, client, **params)`` that writes its results into the store
and records its provenance under ``uns/scatac_dist/<name>``. :func:`run_stages` skips a
stage whose recorded parameters equal the requested ones (GUIDE invariant 5), so re-running
a pipeline after a crash continues where it stopped.
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


#: The stages available so far, by name; later issues add filtering, TF-IDF, LSI, clustering.
STAGES: dict[str, Callable[..., Any]] = {"qc": _qc}


def run_stages(atlas: Atlas, stages: list[Stage], *, client=None, force: bool = False,
               progress: bool = True) -> dict[str, dict]:
    """Run ``stages`` in order, skipping those already done with the same parameters.

    Returns
    -------
    dict
        Per stage: ``{"skipped": bool, "seconds": float}``.
    """
    from .cluster import current_client

    client = client or current_client()
    done = atlas.provenance()
    report = {}
    for st in stages:
        prev = done.get(st.name)
        if not force and prev is not None and prev.get("params") == st.params:
            logger.info("stage %s: already done with these parameters; skipping", st.name)
            report[st.name] = {"skipped": True, "seconds": 0.0}
            continue
        t0 = time.perf_counter()
        logger.info("stage %s: running", st.name)
        st.fn(atlas, client, progress=progress, **st.params)
        report[st.name] = {"skipped": False, "seconds": time.perf_counter() - t0}
    return report

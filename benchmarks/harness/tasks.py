"""The Dask tasks of a measured run, summed per stage: what the scale-out model needs.

The rows come from the scheduler preload ``hooks/scatac_bench_tasks.py`` (one per finished
task: compute start and stop, compute and transfer seconds, output, input and remote bytes).
A task belongs to the stage whose wall-clock window (``time.time()`` at the stage's start and
end, same machine) holds the end of its compute. Standard library only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load_rows(tasks_dir: Path) -> list[list]:
    """Every task row written into ``tasks_dir`` (all schedulers of the run)."""
    rows: list[list] = []
    for p in sorted(Path(tasks_dir).glob("tasks-*.json")):
        try:
            rows += json.loads(p.read_text())["rows"]
        except (OSError, ValueError, KeyError) as exc:  # files are replaced atomically: say so, never guess
            print(f"task records: {p} unreadable ({exc}); its tasks are left out", file=sys.stderr)
    return rows


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``intervals``: the wall time during which at least one task ran."""
    total, end = 0.0, None
    start = None
    for a, b in sorted(intervals):
        if end is None or a > end:
            if end is not None:
                total += end - start
            start, end = a, b
        else:
            end = max(end, b)
    if end is not None:
        total += end - start
    return total


def summarise(rows: list[list], t0: float, t1: float, n_workers: int) -> dict:
    """The tasks that finished computing in ``[t0, t1]`` on a cluster of ``n_workers`` task
    slots (workers x threads; recorded as ``workers``).

    Returns ``n_tasks``; ``compute_s`` (sum of compute times: the work that divides between
    workers) and ``transfer_s`` (sum of the workers' fetch times); ``busy_s`` (wall time with
    at least one task computing); ``serial_s`` (the stage's wall time less ``busy_s``: what
    ran on the client or the scheduler with no task running); ``idle_per_task_s`` (worker
    time inside the busy span that no task used, per task: scheduling gaps and imbalance,
    at least 0); ``dep_bytes`` (inputs of every task), ``remote_bytes`` (inputs fetched from
    another worker), ``out_bytes``; ``by_name`` (the largest task groups by compute time).
    """
    sel = [r for r in rows if r[3] is not None and t0 <= r[3] <= t1]
    wall = t1 - t0
    compute = sum(r[4] for r in sel)
    transfer = sum(r[5] for r in sel)
    busy = busy_seconds([(max(r[2], t0), r[3]) for r in sel])
    groups: dict[str, list] = {}
    for r in sel:
        g = groups.setdefault(r[0], [0, 0.0])
        g[0] += 1
        g[1] += r[4]
    top = sorted(groups.items(), key=lambda kv: -kv[1][1])[:8]
    n = len(sel)
    return {
        "n_tasks": n, "compute_s": compute, "transfer_s": transfer, "busy_s": busy,
        "serial_s": max(wall - busy, 0.0), "wall_s": wall, "workers": n_workers,
        "idle_per_task_s": max(n_workers * busy - compute - transfer, 0.0) / n if n else 0.0,
        "dep_bytes": sum(r[7] for r in sel), "remote_bytes": sum(r[8] for r in sel),
        "out_bytes": sum(r[6] for r in sel),
        "by_name": {k: {"n": v[0], "compute_s": v[1]} for k, v in top},
    }

"""Launching measured processes: a command whose whole process tree is sampled for RSS
(a peer, a naive route, a CLI), and a benchmark script's own ``child`` runs, read back from
the JSON file they write.

Standard library and psutil only (``snapatac2_runner.run_snapatac2`` launches through it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .memory import TreeSampler, kill_tree
from .timing import Timer


@dataclass
class Measured:
    """What :func:`run_measured` saw. ``stopped``: ``"memory"``, ``"timeout"`` or ``None``."""

    returncode: int
    wall_s: float
    peak_rss_tree: int
    peak_rss_max_process: int
    stopped: str | None
    sampler: TreeSampler


def run_measured(cmd: list[str], *, log: Path | None = None, stderr_log: Path | None = None,
                 env: dict | None = None, interval: float = 0.1, timeout: float | None = None,
                 max_rss_bytes: float | None = None, sampler_factory=TreeSampler) -> Measured:
    """Run ``cmd`` with its process tree's RSS sampled every ``interval`` s.

    Output goes to ``log`` (stderr too, unless ``stderr_log`` is given; nowhere without a
    log). Past ``timeout`` seconds, or once the tree's RSS passes ``max_rss_bytes``, the whole
    tree is killed and ``stopped`` says why. ``sampler_factory(pid, interval)``: the sampler
    (a :class:`TreeSampler` by default; ``harness.reads.ReadSampler`` also keeps bytes read).
    """
    for p in (log, stderr_log):
        if p is not None:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
    files = [open(p, "w") if p is not None else None for p in (log, stderr_log)]
    out = files[0] or subprocess.DEVNULL
    err = files[1] or (subprocess.STDOUT if files[0] else subprocess.DEVNULL)
    stopped = None
    with Timer() as t:
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        finally:
            for fh in files:
                if fh is not None:
                    fh.close()
        with sampler_factory(proc.pid, interval) as sampler:
            while True:
                try:
                    proc.wait(timeout=interval)
                    break
                except subprocess.TimeoutExpired:
                    if timeout is not None and t.elapsed > timeout:
                        stopped = "timeout"
                    elif max_rss_bytes is not None and sampler.peak > max_rss_bytes:
                        stopped = "memory"
                    if stopped:
                        kill_tree(proc.pid)
                        proc.wait()
                        break
    return Measured(proc.returncode, t.seconds, sampler.peak, sampler.peak_process, stopped, sampler)


def run_child(cmd: list[str], out: Path, *, check: bool = False, missing: str = "no result (child crashed)",
              wall_key: str | None = "subprocess_wall_s", env: dict | None = None) -> dict:
    """Run ``cmd`` (a benchmark's own child process, which writes its result to ``out``) and
    return that result: ``{"status": missing}`` when it wrote none, the wall time from launch
    to exit under ``wall_key``. ``check``: a failed child raises."""
    out = Path(out)
    out.unlink(missing_ok=True)
    with Timer() as t:
        subprocess.run(cmd, check=check, env=env)
    res = json.loads(out.read_text()) if out.exists() else {"status": missing}
    if wall_key:
        res[wall_key] = t.seconds
    return res


def run_spec_child(script: str | Path, work: Path, name: str, spec: dict, *, command: str = "child") -> dict:
    """``python SCRIPT child WORK/NAME.spec.json``: the spec is written there, with ``out``
    (``WORK/NAME.json`` unless it names one) where the child writes its result."""
    work.mkdir(parents=True, exist_ok=True)
    if "out" not in spec:
        spec = spec | {"out": str(work / f"{name}.json")}
    path = work / f"{name}.spec.json"
    path.write_text(json.dumps(spec))
    return run_child([sys.executable, str(script), command, str(path)], Path(spec["out"]))

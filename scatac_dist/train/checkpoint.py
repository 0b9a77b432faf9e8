"""Training checkpoints: written atomically, read back to resume exactly where a run stopped.

A checkpoint is one ``torch.save`` file, ``step-<N>.pt``, in the checkpoint folder, plus
``latest`` (a text file naming the newest). Both are written to a temporary name and renamed,
so a run killed mid-write leaves the previous checkpoint readable. Only rank 0 writes;
every rank reads the same file on resume (DDP keeps the parameters identical).

A folder holds one run. A run that starts fresh (not resumed) takes it over: it retires the
step files an earlier run left there (:func:`start_fresh`) before it writes its own, so an
older run's later steps can never outlive, or be mistaken for, the new run's checkpoints.
Pruning keeps the ``keep`` newest steps and never the file just written.

A checkpoint may carry a ``fingerprint`` (the data and the parameters that decide the
computation); :func:`checkpoint_info` reads it without loading the tensors.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("scatac_dist")

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "checkpoint_info", "start_fresh",
           "step_files"]

_STEP = re.compile(r"^step-(\d+)\.pt$")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def step_files(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoint files in ``folder``, by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def start_fresh(folder: str | os.PathLike) -> list[Path]:
    """Take ``folder`` over for a run that starts from step 0: remove the step files, the
    ``latest`` marker and the temporary files an earlier (or killed) run left there. Other
    entries (e.g. a hand-off folder) are left alone. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = [p for _, p in step_files(folder)]
    gone += [p for p in folder.iterdir() if p.name == "latest" or
             (p.name.startswith((".step-", ".latest.")) and ".tmp-" in p.name)]
    for p in gone:
        p.unlink(missing_ok=True)
    if any(_STEP.match(p.name) for p in gone):
        logger.warning("%s: removed %d checkpoint(s) of an earlier run; this run starts fresh",
                       folder, sum(1 for p in gone if _STEP.match(p.name)))
    return gone


def save_checkpoint(folder: str | os.PathLike, state: dict[str, Any], step: int, keep: int = 2) -> Path:
    """Write ``state`` as ``folder/step-<step>.pt``, point ``latest`` at it, keep the newest ``keep``.

    The file just written is always kept (and ``latest`` names it); of the others, the
    ``keep - 1`` newest steps before ``step`` stay. Steps after ``step`` cannot belong to this
    run (it starts fresh or from ``latest``) and are removed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:09d}.pt"
    _atomic_write(path, lambda p: torch.save(state, p))
    _atomic_write(folder / "latest", lambda p: p.write_text(path.name + "\n"))
    if keep:
        others = [(s, p) for s, p in step_files(folder) if p != path]
        earlier = [p for s, p in others if s < step]
        drop = earlier[:max(len(earlier) - (keep - 1), 0)] + [p for s, p in others if s > step]
        for p in drop:
            p.unlink(missing_ok=True)
    return path


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``folder`` (from ``latest``), or ``None``."""
    folder = Path(folder)
    marker = folder / "latest"
    if marker.exists():
        p = folder / marker.read_text().strip()
        if p.is_file():
            return p
    found = step_files(folder)
    return found[-1][1] if found else None


def load_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint file (or the newest in a folder) onto the CPU; with ``mmap`` the
    tensors are mapped from the file, not read (for looking at its small entries)."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no checkpoint here (step-*.pt); train without --resume first")
        path = found
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def checkpoint_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The newest checkpoint of ``folder`` in brief: ``path``, ``step`` and ``fingerprint``
    (``None`` for a checkpoint written before fingerprints), or ``None`` if there is none.
    Cheap: the tensors are not read."""
    path = latest_checkpoint(folder)
    if path is None:
        return None
    ck = load_checkpoint(path, mmap=True)
    return {"path": path, "step": int(ck.get("trainer", {}).get("step", 0)), "fingerprint": ck.get("fingerprint")}

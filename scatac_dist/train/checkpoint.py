"""Training checkpoints: written atomically, read back to resume exactly where a run stopped.

A checkpoint is one ``torch.save`` file, ``step-<N>.pt``, in the checkpoint folder, plus
``latest`` (a text file naming the newest). Both are written to a temporary name and renamed,
so a run killed mid-write leaves the previous checkpoint readable. Only rank 0 writes;
every rank reads the same file on resume (DDP keeps the parameters identical).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint"]


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(folder: str | os.PathLike, state: dict[str, Any], step: int, keep: int = 2) -> Path:
    """Write ``state`` as ``folder/step-<step>.pt``, point ``latest`` at it, keep the newest ``keep``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:09d}.pt"
    _atomic_write(path, lambda p: torch.save(state, p))
    _atomic_write(folder / "latest", lambda p: p.write_text(path.name + "\n"))
    old = sorted(folder.glob("step-*.pt"))[:-keep] if keep else []
    for p in old:
        p.unlink(missing_ok=True)
    return path


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``folder`` (from ``latest``), or ``None``."""
    folder = Path(folder)
    marker = folder / "latest"
    if marker.exists():
        p = folder / marker.read_text().strip()
        if p.exists():
            return p
    found = sorted(folder.glob("step-*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file (or the newest in a folder) onto the CPU."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no checkpoint here (step-*.pt); train without --resume first")
        path = found
    return torch.load(path, map_location="cpu", weights_only=False)

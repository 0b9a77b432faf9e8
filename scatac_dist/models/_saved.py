"""The model folder of the neural models (SCALE, scMVP): ``model.pt`` (the trained module's
state and configuration, and the model's parameters), written atomically, and
``config.json`` (the parameters, for people)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_trained", "load_trained"]


def save_trained(folder: str | Path, module, params: dict[str, Any]) -> Path:
    """Write ``module`` (its state dict and ``config()``) and ``params`` into ``folder``;
    returns the path of ``model.pt``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"module": module.state_dict(), "module_config": module.config(), "params": params}
    tmp = folder / ".model.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(folder / "model.pt")
    (folder / "config.json").write_text(json.dumps(params, indent=1, default=str))
    return folder / "model.pt"


def load_trained(folder: str | Path) -> dict[str, Any]:
    """What :func:`save_trained` wrote: ``module``, ``module_config``, ``params``."""
    return torch.load(Path(folder) / "model.pt", map_location="cpu", weights_only=False)

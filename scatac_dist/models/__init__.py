"""The published methods, as classes that read a store and write their outputs into it.

``SCCASE`` (scCASE / scCASER, similarity-enhanced NMF), ``SCALE`` (VAE with a GMM prior),
``SCEMBED`` (scEmbed, word2vec over regions), ``SCMVP`` (scMVP, the joint RNA + ATAC
multi-view VAE). Each class is in the module named after its
method (``sccase.py``, ``scale.py``, ``scembed.py``, ``scmvp.py``); its parts (input, training, output
passes) are in the modules that start with that name. The methods themselves, with their
defaults and measurements, are described in ``docs/methods/``.

The classes are imported on first use: a Dask worker that unpickles a task of scCASE or
scEmbed imports this package, and should not pay for torch (about 180 MB per process),
which only SCALE and scMVP need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .scale import SCALE
    from .sccase import SCCASE
    from .scembed import SCEMBED
    from .scmvp import SCMVP

__all__ = ["SCALE", "SCCASE", "SCEMBED", "SCMVP"]
_HOME = {"SCALE": ".scale", "SCCASE": ".sccase", "SCEMBED": ".scembed", "SCMVP": ".scmvp"}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

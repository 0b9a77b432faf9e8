"""Versions and defaults of the installed packages, written into result files for the record.

Standard library only: the peer runners import it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any


def versions(names: Iterable[str]) -> dict[str, str]:
    """``{distribution: version}`` of those of ``names`` that are installed."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def signature_defaults(func: Any) -> dict[str, Any]:
    """The keyword defaults of ``func``, read from its signature."""
    return {k: p.default for k, p in inspect.signature(func).parameters.items()
            if p.default is not inspect.Parameter.empty}

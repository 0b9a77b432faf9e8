"""scatac-dist's defaults, kept in Dask's configuration system.

The package's ``scatac_dist.yaml`` is merged into ``dask.config`` as defaults, so a user's
Dask YAML files and ``DASK_SCATAC_DIST__...`` environment variables take precedence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.config
import distributed  # noqa: F401  (its defaults are in place first, so that ours below replace them)
import yaml

_DEFAULTS_FILE = Path(__file__).with_name("scatac_dist.yaml")

with _DEFAULTS_FILE.open() as _fh:
    _defaults = yaml.safe_load(_fh)
dask.config.update_defaults(_defaults)

# Settings of Dask's own (the "distributed" section) replace Dask's defaults, which
# update_defaults leaves in place; a value the user set differently is kept.
_LARGE_GRAPH = "distributed.admin.large-graph-warning-threshold"
if dask.config.get(_LARGE_GRAPH, None) in (None, "10MB"):
    dask.config.set({_LARGE_GRAPH: _defaults["distributed"]["admin"]["large-graph-warning-threshold"]})


def get(key: str, default: Any = None) -> Any:
    """Read ``scatac-dist.<key>`` from the Dask configuration (e.g. ``"store.chunk-rows"``)."""
    return dask.config.get(f"scatac-dist.{key}", default=default)

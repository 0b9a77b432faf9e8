"""scatac-dist's defaults, kept in Dask's configuration system.

The package's ``scatac_dist.yaml`` is merged into ``dask.config`` as defaults, so a user's
Dask YAML files and ``DASK_SCATAC_DIST__...`` environment variables take precedence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.config
import yaml

_DEFAULTS_FILE = Path(__file__).with_name("scatac_dist.yaml")

with _DEFAULTS_FILE.open() as _fh:
    dask.config.update_defaults(yaml.safe_load(_fh))


def get(key: str, default: Any = None) -> Any:
    """Read ``scatac-dist.<key>`` from the Dask configuration (e.g. ``"store.chunk-rows"``)."""
    return dask.config.get(f"scatac-dist.{key}", default=default)

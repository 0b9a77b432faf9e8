"""scatac-dist: atlas-scale single-cell ATAC-seq analysis on Dask.

The public entry points are re-exported here; see the README for the command line.
"""

from __future__ import annotations

import logging
from importlib import metadata

from . import (
    _config,  # noqa: F401  (registers the package's Dask config defaults)
    pp,
)
from .cluster import get_client
from .errors import ClusterError, InputError, OutputExistsError, ScatacError
from .store import Atlas, open_atlas

try:
    __version__ = metadata.version("scatac-dist")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

# A library never configures logging at import; it only names its logger.
logging.getLogger("scatac_dist").addHandler(logging.NullHandler())


def ingest(*args, **kwargs):
    """See :func:`scatac_dist.io.ingest`."""
    from .io import ingest as _ingest

    return _ingest(*args, **kwargs)


__all__ = ["pp", "Atlas", "open_atlas", "ingest", "get_client", "ScatacError", "InputError",
           "OutputExistsError", "ClusterError", "__version__"]

"""Shared fixtures: a real LocalCluster of worker processes, and paths to the real data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SCATAC_DIST_DATA", REPO.parent / "shared" / "data"))
BM0828 = DATA / "buenrostro2018_bm0828"
LEUKEMIA = DATA / "leukemia_corces2016.h5ad"
SNARE = DATA / "snare_mop"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():  # fail loudly: these tests are the point, never skip them silently
        raise FileNotFoundError(f"real datasets not found at {DATA}; check out ../shared beside "
                                "the repo or set SCATAC_DIST_DATA")
    return DATA


@pytest.fixture(scope="session")
def cluster():
    """A real LocalCluster: 2 worker processes, 1 thread each, on loopback."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit="3GiB") as lc:
        yield lc


@pytest.fixture(scope="session")
def client(cluster):
    from distributed import Client

    with Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def fcluster():
    """A LocalCluster of one test module's own (2 worker processes under nannies), for tests
    that kill its workers."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit="2GiB") as lc:
        yield lc


@pytest.fixture(scope="module")
def fclient(fcluster):
    """A client of :func:`fcluster`, current (not the global default) inside the module."""
    from distributed import Client

    with Client(fcluster, set_as_default=False) as c, c.as_current():
        yield c


@pytest.fixture
def small_chunks():
    """Tiny zarr chunks, so that X's assembly crosses many chunk and block boundaries."""
    import dask.config

    with dask.config.set({"scatac-dist.store.data-chunk-elements": 50_000}):
        yield


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    """Names in ``folder`` other than ``keep``: a failed run must leave nothing behind. The run
    summaries a CLI command that *succeeded* writes beside its store (``STORE.run-<id>.md``) are
    results, not leftovers (tests/test_bad_input.py checks that a refused command writes none)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in keep and not (p.suffix == ".md" and ".run-" in p.name))


@pytest.fixture
def counts():
    """A small random count matrix (60 cells x 40 peaks, CSR, integer-valued floats)."""
    rng = np.random.default_rng(0)
    m = sp.random(60, 40, density=0.2, format="csr", random_state=rng, dtype=np.float64)
    m.data = rng.integers(1, 5, m.nnz).astype(float)
    return m

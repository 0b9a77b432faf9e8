"""The atlas store: an AnnData (or MuData) zarr store with a lazy, row-chunked X.

Layout (see docs/architecture.md)::

    STORE/                       anndata zarr group (encoding-type "anndata")
      X/{data,indices,indptr}    CSR cells x peaks, unsigned integer counts, row order
      obs/  var/ (chr,start,end) dataframes
      obsm/ varm/ obsp/ layers/  results, one element each
      uns/scatac_dist/<stage>    provenance of every stage that wrote to the store (JSON)

A joint RNA+ATAC store is a MuData zarr store whose modalities ``mod/rna`` and ``mod/atac``
each have the layout above; :class:`Atlas` then works on one modality (``mod="atac"``).

Writes are atomic (GUIDE invariant 5): a new store is built beside its destination and
renamed into place; a result element is written into a staging folder beside the store and
swapped in with one rename. A killed run therefore leaves the previous state readable.
Only one process should write results to a store at a time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from anndata.io import read_elem, write_elem

from . import _config
from .errors import InputError, OutputExistsError

logger = logging.getLogger("scatac_dist")

__all__ = [
    "Atlas",
    "open_atlas",
    "count_dtype",
    "staged_output",
    "provenance_record",
    "replace_dir",
]

PROVENANCE_KEY = "scatac_dist"
_PACKAGES = ("scatac-dist", "anndata", "dask", "distributed", "zarr", "numpy", "scipy", "pandas")


def count_dtype(max_count: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds ``max_count``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_count <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


# --------------------------------------------------------------------------- atomic renames

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.renameat2  # noqa: B018 - glibc >= 2.28 has it
    except (OSError, AttributeError):
        _libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if _libc is None:
        return False
    rc = _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def replace_dir(src: Path, dst: Path) -> None:
    """Put directory ``src`` at ``dst``, replacing what is there, as atomically as the OS allows.

    On Linux the swap is one atomic exchange. Elsewhere (or on filesystems without
    RENAME_EXCHANGE) the old directory is renamed away first, so a crash between the two
    renames leaves it beside ``dst`` as ``dst.old-*`` rather than deleting it.
    """
    if dst.exists():
        if _exchange(src, dst):
            shutil.rmtree(src)
            return
        old = dst.with_name(f"{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old)
    else:
        os.rename(src, dst)


@contextmanager
def staged_output(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a new store beside ``out`` and publish it there only if the block succeeds.

    Yields the temporary path to write to. On any error the temporary store is removed and
    ``out`` is left as it was.

    Raises
    ------
    OutputExistsError
        If ``out`` exists and ``overwrite`` is False.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise OutputExistsError(
            out, "the output path already exists", "choose another path, or pass --overwrite "
            "(overwrite=True) to replace it once the new store is complete"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to the staging path {tmp}")
        zarr.consolidate_metadata(str(tmp))
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- provenance


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour a stored result depends on."""
    out = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def provenance_record(stage: str, params: Mapping[str, Any], timings: Mapping[str, float],
                      **extra: Any) -> dict[str, Any]:
    """One stage's provenance: its parameters, package versions, timings and a timestamp."""
    return _jsonable({
        "stage": stage,
        "params": dict(params),
        "timings_s": dict(timings),
        "versions": package_versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    })


# --------------------------------------------------------------------------- the atlas


class Atlas:
    """An open atlas store (one AnnData group: the root, or a MuData modality).

    Reads are lazy: :attr:`X` is a dask array of ``scipy.sparse.csr_matrix`` row blocks;
    ``obs``/``var`` are read when asked. Writes go through :meth:`write_obs`,
    :meth:`write_obsm` and friends, each atomic.

    Parameters
    ----------
    path
        The zarr store.
    mod
        For a MuData store, the modality to work on (default ``"atac"``).
    chunk_rows
        Rows per block of :attr:`X` (default ``scatac-dist.store.chunk-rows``).
    """

    def __init__(self, path: str | os.PathLike, *, mod: str | None = None,
                 chunk_rows: int | None = None):
        self.path = Path(path).absolute()
        if not self.path.exists():
            raise InputError(self.path, "no atlas store at this path",
                             "create one with `scatac-dist ingest` or `scatac-dist synth`")
        try:
            root = zarr.open_group(str(self.path), mode="r")
        except Exception as exc:  # zarr raises several types for "not a group"
            raise InputError(self.path, f"not a zarr store ({exc})",
                             "pass the folder written by `scatac-dist ingest`") from exc
        enc = root.attrs.get("encoding-type")
        self.is_mudata = enc == "MuData"
        if self.is_mudata:
            mods = sorted(root["mod"].group_keys())
            mod = mod or ("atac" if "atac" in mods else mods[0])
            if mod not in mods:
                raise InputError(self.path, f"has no modality {mod!r} (it has {mods})",
                                 f"use one of {mods}")
            self.group_path = f"mod/{mod}"
        elif enc == "anndata":
            if mod:
                raise InputError(self.path, f"is an AnnData store, not MuData; no modality {mod!r}",
                                 "omit mod/--mod")
            self.group_path = ""
        else:
            raise InputError(self.path, f"is not an AnnData/MuData zarr store (encoding-type={enc!r})",
                             "pass a store written by `scatac-dist ingest`")
        self.mod = mod
        self.chunk_rows = int(chunk_rows or _config.get("store.chunk-rows"))
        self.zarr_format = root.metadata.zarr_format

    # -- reading -------------------------------------------------------------------------

    def _group(self, mode: str = "r") -> zarr.Group:
        root = zarr.open_group(str(self.path), mode=mode, use_consolidated=False)
        return root[self.group_path] if self.group_path else root

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self._group()["X"].attrs["shape"])

    @property
    def n_obs(self) -> int:
        return self.shape[0]

    @property
    def n_vars(self) -> int:
        return self.shape[1]

    @property
    def nnz(self) -> int:
        return int(self._group()["X"]["indptr"][-1])

    @property
    def X(self):
        """Lazy counts: a dask array of ``csr_matrix`` blocks of :attr:`chunk_rows` rows."""
        from anndata.experimental import read_elem_lazy

        return read_elem_lazy(self._group()["X"], chunks=(self.chunk_rows, self.n_vars))

    @property
    def obs(self) -> pd.DataFrame:
        return read_elem(self._group()["obs"])

    @property
    def var(self) -> pd.DataFrame:
        return read_elem(self._group()["var"])

    def read(self, relpath: str) -> Any:
        """Read one element, e.g. ``"obsm/X_lsi"`` or ``"uns/scatac_dist/qc"``."""
        return read_elem(self._group()[relpath])

    def keys(self, slot: str) -> list[str]:
        """Names of the elements in a slot (``"obsm"``, ``"layers"``, ...)."""
        g = self._group()
        return sorted(g[slot].keys()) if slot in g else []

    def provenance(self) -> dict[str, dict]:
        """Provenance of every stage recorded in ``uns/scatac_dist``."""
        g = self._group()
        key = f"uns/{PROVENANCE_KEY}"
        if key not in g:
            return {}
        return {k: json.loads(read_elem(g[key][k])) for k in g[key].keys()}

    def to_memory(self) -> ad.AnnData:
        """Load the whole AnnData into memory. Only for small data (tests, examples)."""
        return ad.read_zarr(str(self.path)) if not self.is_mudata else \
            ad.io.read_elem(zarr.open_group(str(self.path), mode="r")[self.group_path])

    def __repr__(self) -> str:
        mod = f", mod={self.mod!r}" if self.mod else ""
        return f"Atlas({str(self.path)!r}{mod}: {self.n_obs} cells x {self.n_vars} peaks, nnz={self.nnz})"

    # -- atomic writes ---------------------------------------------------------------------

    def _publish(self, relpath: str, value: Any) -> None:
        """Write ``value`` with anndata's encoders aside, then swap it in at ``relpath``."""
        full = f"{self.group_path}/{relpath}".strip("/")
        parent, _, name = full.rpartition("/")
        root = zarr.open_group(str(self.path), mode="a", use_consolidated=False)
        if parent and parent not in root:
            # a plain dict group, tagged so anndata reads it without an OldFormatWarning
            g = root.require_group(parent)
            g.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        staging = self.path.with_name(f".{self.path.name}.staging-{uuid.uuid4().hex[:8]}")
        try:
            sg = zarr.open_group(str(staging), mode="w", zarr_format=self.zarr_format)
            write_elem(sg, name, value)
            replace_dir(staging / name, self.path / full)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        zarr.consolidate_metadata(str(self.path))

    def write_obs(self, columns: pd.DataFrame | Mapping[str, Any]) -> None:
        """Add or replace ``obs`` columns (rewrites ``obs`` atomically; it is O(n_cells))."""
        obs = self.obs
        for k, v in (columns.items()):
            obs[k] = np.asarray(v) if not isinstance(v, pd.Series) else v.to_numpy()
        self._publish("obs", obs)

    def write_var(self, columns: pd.DataFrame | Mapping[str, Any]) -> None:
        """Add or replace ``var`` columns (rewrites ``var`` atomically)."""
        var = self.var
        for k, v in columns.items():
            var[k] = np.asarray(v) if not isinstance(v, pd.Series) else v.to_numpy()
        self._publish("var", var)

    def write_obsm(self, key: str, value: Any) -> None:
        """Write ``obsm[key]`` (n_cells x d)."""
        self._check_len(value, self.n_obs, f"obsm[{key!r}]")
        self._publish(f"obsm/{key}", value)

    def write_varm(self, key: str, value: Any) -> None:
        """Write ``varm[key]`` (n_peaks x d)."""
        self._check_len(value, self.n_vars, f"varm[{key!r}]")
        self._publish(f"varm/{key}", value)

    def write_obsp(self, key: str, value: sp.spmatrix) -> None:
        """Write ``obsp[key]`` (sparse n_cells x n_cells, e.g. a kNN graph)."""
        self._check_len(value, self.n_obs, f"obsp[{key!r}]")
        self._publish(f"obsp/{key}", value)

    def write_uns(self, key: str, value: Any) -> None:
        """Write ``uns[key]``."""
        self._publish(f"uns/{key}", value)

    def record(self, stage: str, params: Mapping[str, Any], timings: Mapping[str, float],
               **extra: Any) -> dict:
        """Store a stage's provenance in ``uns/scatac_dist/<stage>`` and return it."""
        rec = provenance_record(stage, params, timings, **extra)
        self._publish(f"uns/{PROVENANCE_KEY}/{stage}", json.dumps(rec))
        return rec

    @staticmethod
    def _check_len(value: Any, n: int, what: str) -> None:
        if value.shape[0] != n:
            raise ValueError(f"{what} has {value.shape[0]} rows but the atlas has {n}")


def open_atlas(path: str | os.PathLike, *, mod: str | None = None,
               chunk_rows: int | None = None) -> Atlas:
    """Open an atlas store; see :class:`Atlas`."""
    return Atlas(path, mod=mod, chunk_rows=chunk_rows)

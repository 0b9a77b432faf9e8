"""The atlas store: an AnnData (or MuData) zarr store with a lazy, row-chunked X.

Layout (see docs/architecture.md)::

    STORE/                       anndata zarr group (encoding-type "anndata")
      X/{data,indices,indptr}    CSR cells x peaks, unsigned integer counts, row order
      obs/  var/ (chr,start,end) dataframes
      obsm/ varm/ obsp/ layers/  results, one element each
      uns/scatac_dist/<stage>    provenance of every stage that wrote to the store (JSON)

A joint RNA+ATAC store is a MuData zarr store whose modalities ``mod/rna`` and ``mod/atac``
each have the layout above; :class:`Atlas` then works on one modality (``mod="atac"``).

Writes are atomic per stage (GUIDE invariant 5, docs/architecture.md "Publishing"): a new
store is built beside its destination and renamed into place; a stage's results are written
into a *working copy* of the store (its metadata copied, its data files hard-linked, so the
copy costs one link per file) and the copy is swapped in with one atomic rename
(:meth:`Atlas.publishing`). A reader at any instant sees the store before the stage or after
it, consolidated metadata included, and a killed run leaves the previous state readable.
Every write holds the store's lock (:mod:`scatac_dist.lock`): one writer per store.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import errno
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
from .lock import store_lock

logger = logging.getLogger("scatac_dist")

__all__ = [
    "Atlas",
    "open_atlas",
    "count_dtype",
    "staged_output",
    "provenance_record",
    "replace_dir",
    "clone_tree",
    "clean_orphans",
    "scratch_dir",
    "read_count_rows",
    "Publication",
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


def replace_dir(src: Path, dst: Path, *, keep_old: bool = False) -> None:
    """Put directory ``src`` at ``dst``, replacing what is there, as atomically as the OS allows.

    On Linux the swap is one atomic exchange; the old directory is then removed, or with
    ``keep_old`` left at ``src`` for the caller to remove. Elsewhere (or on filesystems
    without RENAME_EXCHANGE) the old directory is renamed away first, so a crash between the
    two renames leaves it beside ``dst`` as ``dst.old-*`` rather than deleting it.
    """
    if dst.exists():
        if _exchange(src, dst):
            if not keep_old:
                shutil.rmtree(src)
            return
        old = dst.with_name(f"{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old)
    else:
        os.rename(src, dst)


# Files that zarr rewrites in place (group/array metadata, consolidated metadata): a working
# copy gets its own copies of these; every other file (chunks) is hard-linked, since nothing
# in scatac-dist writes into an existing chunk of a published store.
_METADATA = {"zarr.json", ".zattrs", ".zgroup", ".zarray", ".zmetadata"}


def clone_tree(src: Path, dst: Path) -> int:
    """Copy the store ``src`` to ``dst``: metadata files copied, data files hard-linked
    (copied where the filesystem has no hard links). Returns the number of files."""
    n = 0
    link = True
    for dirpath, _, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        target = dst if rel == "." else dst / rel
        target.mkdir(parents=True, exist_ok=rel != ".")
        for name in filenames:
            a, b = os.path.join(dirpath, name), target / name
            if link and name not in _METADATA:
                try:
                    os.link(a, b)
                    n += 1
                    continue
                except OSError as exc:
                    logger.warning("%s: no hard links on this filesystem (%s); publishing copies the store",
                                   src, exc.strerror)
                    link = False
            shutil.copy2(a, b)
            n += 1
    return n


def _fault_point(step: str) -> None:
    """Fault injection for the crash tests (tests/test_faults_client.py): with
    ``SCATAC_DIST_FAULT_TRACE`` set, append each publishing step's name to that file; with
    ``SCATAC_DIST_FAULT_AT=N``, SIGKILL this process at its N-th step (counted from 1)."""
    trace, at = os.environ.get("SCATAC_DIST_FAULT_TRACE"), os.environ.get("SCATAC_DIST_FAULT_AT")
    if not (trace or at):
        return
    _fault_point.count = getattr(_fault_point, "count", 0) + 1
    if trace:
        with open(trace, "a") as fh:
            fh.write(f"{_fault_point.count}\t{step}\n")
    if at and int(at) == _fault_point.count:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class Publication:
    """One stage's pending results: the working copy they are written to, and their names."""

    def __init__(self, stage: str, work: Path):
        self.stage = stage
        self.work = work
        self.outputs: list[str] = []

    def wrote(self, name: str) -> None:
        if name not in self.outputs:
            self.outputs.append(name)


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


@contextmanager
def _no_space_is_input_error(store: Path, doing: str) -> Iterator[None]:
    """Turn a full disk, a quota, or a read-only or forbidden folder met while writing into
    an :class:`InputError`: the write is abandoned and the store left as it was."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _FULL:
            raise
        where = exc.filename or store
        raise InputError(store, f"{doing} failed: {exc.strerror} ({where}); the store is unchanged",
                         "free space on that filesystem (or write somewhere you may), then run the same "
                         "command again: finished stages are kept") from exc


_ORPHANS = ("publish", "staging", "layer", "impute", "tmp", "spool", "buckets")
_ours: set[Path] = set()  # scratch folders of this process: never orphans


def clean_orphans(store: str | os.PathLike) -> list[Path]:
    """Remove what killed writers left beside ``store``: working copies, staging and spool
    folders (``.<name>.<kind>-*``) and old copies of an interrupted portable swap. Only the
    holder of the store's lock may call this; every publication and ingest does at its start."""
    store = Path(store).absolute()
    removed = []
    if not store.exists():  # killed between the two renames of the portable swap
        olds = sorted(store.parent.glob(f"{store.name}.old-*"))
        if olds:
            os.rename(olds[-1], store)
            logger.warning("%s: restored from %s (a swap was interrupted)", store, olds[-1].name)
    for kind in _ORPHANS:
        removed += sorted(store.parent.glob(f".{store.name}.{kind}-*"))
    removed += sorted(store.parent.glob(f"{store.name}.old-*"))
    removed = [p for p in removed if p not in _ours]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    if removed:
        logger.info("%s: removed %d folder(s) left by an interrupted run", store, len(removed))
    return removed


def scratch_dir(store: str | os.PathLike, kind: str) -> Path:
    """A new empty folder ``.<store>.<kind>-<id>`` beside ``store`` (``kind``: one of
    ``publish, staging, layer, impute, tmp, spool, buckets``), for building something large
    before it is published. The caller removes it; after a kill, :func:`clean_orphans` does."""
    if kind not in _ORPHANS:
        raise ValueError(f"scratch kind {kind!r}: use one of {_ORPHANS}")
    store = Path(store).absolute()
    p = store.with_name(f".{store.name}.{kind}-{uuid.uuid4().hex[:8]}")
    p.mkdir(parents=True)
    _ours.add(p)
    return p


@contextmanager
def staged_output(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a new store beside ``out`` and publish it there only if the block succeeds.

    Yields the temporary path to write to. On any error the temporary store is removed and
    ``out`` is left as it was. Holds the lock of ``out`` (:mod:`scatac_dist.lock`) throughout.

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
    with store_lock(out), _no_space_is_input_error(out, "writing the new store"):
        clean_orphans(out)
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
        self._pub: Publication | None = None
        self._check_counts()

    # -- reading -------------------------------------------------------------------------

    @property
    def current(self) -> Path:
        """Where reads go: the working copy while a stage publishes (its own results
        included), else the store. Lazy arrays of the counts always read the store itself."""
        return self._pub.work if self._pub is not None else self.path

    def _group(self, mode: str = "r", root_path: Path | None = None) -> zarr.Group:
        root = zarr.open_group(str(root_path or self.current), mode=mode, use_consolidated=False)
        return root[self.group_path] if self.group_path else root

    @property
    def shape(self) -> tuple[int, int]:
        g = self._group()
        if "X" not in g and self.is_mudata and not self.group_path:  # a MuData root: cells, no features
            return (len(read_elem(g["obs"]).index), 0)
        return tuple(int(s) for s in g["X"].attrs["shape"])

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
        """Lazy counts: a dask array of ``csr_matrix`` blocks of :attr:`chunk_rows` rows.

        Each block is read by one task (:func:`read_count_rows`); a block that cannot be
        decoded raises :class:`~scatac_dist.errors.InputError` naming the store and the rows.
        Reads go to the store's own path, never a working copy: a graph may outlive a
        publication."""
        import dask.array as da
        from dask.base import tokenize

        n, p = self.shape
        x = self._group(root_path=self.path)["X"]
        dtype = np.dtype(x["data"].dtype)
        rows = tuple(min(self.chunk_rows, n - a) for a in range(0, n, self.chunk_rows)) or (0,)
        stamp = os.stat(self.path / self.group_path / "X").st_mtime_ns
        name = "read-counts-" + tokenize(str(self.path), self.group_path, self.chunk_rows, n, p, stamp)
        return da.map_blocks(read_count_rows, chunks=(rows, (p,)), dtype=dtype, name=name,
                             meta=sp.csr_matrix((0, 0), dtype=dtype), store=str(self.path),
                             group=self.group_path, chunk_rows=self.chunk_rows)

    def _check_counts(self) -> None:
        """Refuse a store whose X is not CSR counts, or misses chunk files of X."""
        g = self._group(root_path=self.path)
        if "X" not in g:
            raise InputError(self.path, "has no X (no count matrix)",
                             "ingest the counts with `scatac-dist ingest`")
        enc = g["X"].attrs.get("encoding-type")
        if enc != "csr_matrix":
            kind = {"array": "a dense array", "csc_matrix": "a CSC matrix"}.get(enc, enc or "an unknown encoding")
            raise InputError(self.path, f"holds X as {kind}, not the CSR counts scatac-dist "
                             "works on (a store written by another tool?)",
                             "save it as .h5ad (adata.write_h5ad) and run `scatac-dist ingest FILE.h5ad -o "
                             "STORE.zarr`, which checks and converts it")
        # zarr leaves out a chunk whose values all equal the fill value (0), so a missing chunk
        # of indptr or indices can be legitimate (leading empty cells, a one-peak matrix); the
        # stored counts are never 0, so a missing chunk of data is damage
        for part in ("data",):
            arr = g["X"][part]
            if arr.shape[0] and arr.nchunks_initialized < arr.nchunks:
                raise InputError(self.path / self.group_path / "X" / part,
                                 f"{arr.nchunks - arr.nchunks_initialized} of its {arr.nchunks} chunk files "
                                 "are missing (the store is incomplete: an interrupted copy?)",
                                 "copy the store again from its source, or re-ingest the counts")

    @property
    def obs(self) -> pd.DataFrame:
        return read_elem(self._group()["obs"])

    @property
    def var(self) -> pd.DataFrame:
        return read_elem(self._group()["var"])

    def read(self, relpath: str) -> Any:
        """Read one element, e.g. ``"obsm/X_lsi"`` or ``"uns/scatac_dist/qc"``."""
        return read_elem(self._group()[relpath])

    def has(self, output: str) -> bool:
        """Whether an output exists: an element path (``"obsm/X_lsi"``) or a dataframe column
        (``"obs:leiden"``, ``"var:idf"``), as listed in a stage's provenance ``outputs``."""
        g = self._group()
        slot, sep, column = output.partition(":")
        if not sep:
            return output in g
        if slot not in g:
            return False
        attrs = g[slot].attrs
        return column in attrs.get("column-order", []) or column == attrs.get("_index")

    def keys(self, slot: str) -> list[str]:
        """Names of the elements in a slot (``"obsm"``, ``"layers"``, ...)."""
        g = self._group()
        return sorted(g[slot].keys()) if slot in g else []

    def provenance(self) -> dict[str, dict]:
        """Provenance of every stage recorded in ``uns/scatac_dist`` (run summaries, the
        ``run_<id>`` entries, are :meth:`runs`)."""
        return {k: v for k, v in self._records().items() if not k.startswith("run_")}

    def runs(self) -> dict[str, dict]:
        """The run summaries of the commands that wrote to this store (``uns/scatac_dist/run_<id>``,
        written by the CLI: :mod:`scatac_dist.cluster.monitor`), by run id, oldest first."""
        return {k[4:]: v for k, v in sorted(self._records().items()) if k.startswith("run_")}

    def _records(self) -> dict[str, dict]:
        g = self._group()
        key = f"uns/{PROVENANCE_KEY}"
        if key not in g:
            return {}
        return {k: json.loads(read_elem(g[key][k])) for k in g[key].keys()}

    # -- restart state of long stages ------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What identifies the counts: shape, nnz, and when and how they were ingested."""
        prov = self.provenance()
        ingest = {k: v.get("finished_at") for k, v in prov.items() if k.startswith("ingest")}
        return {"path": str(self.path), "mod": self.mod, "shape": list(self.shape), "nnz": self.nnz,
                "ingested": ingest}

    def resume_state(self, stage: str, params: Mapping[str, Any]) -> Path:
        """The folder where ``stage`` keeps its restart state (an iterate, an epoch's model):
        ``<parent>/.<store>.resume/<stage>/``. It belongs to one set of parameters on these
        counts (``fingerprint.json``); state left by other parameters or other data is
        discarded here, with a log line, so a resumed run never continues someone else's.
        Remove it with :meth:`clear_resume` once the stage has published."""
        folder = self.path.with_name(f".{self.path.name}.resume") / stage
        fp = json.dumps(_jsonable({"params": dict(params), "data": self.identity()}), sort_keys=True)
        marker = folder / "fingerprint.json"
        if folder.exists() and (not marker.exists() or marker.read_text() != fp):
            logger.warning("%s: restart state of %s was left by other parameters or data; starting afresh",
                           self.path, stage)
            shutil.rmtree(folder)
        if not folder.exists():
            tmp = folder.with_name(f".{stage}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.mkdir(parents=True)
            (tmp / "fingerprint.json").write_text(fp)
            os.rename(tmp, folder)
        return folder

    def clear_resume(self, stage: str) -> None:
        """Remove ``stage``'s restart state (after its results are published)."""
        base = self.path.with_name(f".{self.path.name}.resume")
        shutil.rmtree(base / stage, ignore_errors=True)
        if base.exists() and not any(base.iterdir()):
            base.rmdir()

    def to_memory(self) -> ad.AnnData:
        """Load the whole AnnData into memory. Only for small data (tests, examples)."""
        return ad.read_zarr(str(self.path)) if not self.is_mudata else \
            ad.io.read_elem(zarr.open_group(str(self.path), mode="r")[self.group_path])

    def __repr__(self) -> str:
        mod = f", mod={self.mod!r}" if self.mod else ""
        return f"Atlas({str(self.path)!r}{mod}: {self.n_obs} cells x {self.n_vars} peaks, nnz={self.nnz})"

    # -- atomic writes ---------------------------------------------------------------------

    @contextmanager
    def publishing(self, stage: str) -> Iterator[Publication]:
        """Make every write of the enclosed block visible together, or none of them.

        Writes (``write_*``, :meth:`record`, :meth:`put_group`) go to a working copy of the
        store beside it; reads inside the block see them. On success the copy's metadata is
        consolidated and the copy swapped in with one atomic rename; on an error (or a kill)
        the store is as it was. A nested block joins the outer one. The block holds the
        store's lock (:func:`scatac_dist.lock.store_lock`), taking it if this process does
        not hold it yet.
        """
        if self._pub is not None:
            yield self._pub
            return
        with store_lock(self.path), _no_space_is_input_error(self.path, f"publishing {stage}"):
            self.clean_orphans()
            _fault_point(f"{stage}: begin")
            work = self.path.with_name(f".{self.path.name}.publish-{uuid.uuid4().hex[:8]}")
            try:
                clone_tree(self.path, work)
                _fault_point(f"{stage}: working copy made")
                self._pub = pub = Publication(stage, work)
                try:
                    yield pub
                finally:
                    self._pub = None
                zarr.consolidate_metadata(str(work))
                _fault_point(f"{stage}: metadata consolidated")
                replace_dir(work, self.path, keep_old=True)  # the old store is now at `work`
                _fault_point(f"{stage}: swapped in")
            finally:
                if work.exists():
                    shutil.rmtree(work, ignore_errors=True)

    @contextmanager
    def joined(self, mod: str | None) -> Iterator[Atlas]:
        """Another part of this MuData store, whose writes join the enclosing
        :meth:`publishing` block: modality ``mod``, or the root (``mod=None``: ``obs``,
        ``obsm``, ``uns`` of the MuData itself). For outputs of a multi-modal method that belong
        in several places and must appear together."""
        if not self.is_mudata:
            raise ValueError(f"{self.path} is an AnnData store: it has no other modality or MuData root")
        if self._pub is None:
            raise RuntimeError("Atlas.joined is for use inside `with atlas.publishing(stage):`")
        other = copy.copy(self)
        other.mod, other.group_path = mod, f"mod/{mod}" if mod else ""
        if mod and mod not in zarr.open_group(str(self.path), mode="r")["mod"]:
            raise InputError(self.path, f"has no modality {mod!r}", "ingest a joint RNA + ATAC file")
        other._pub = self._pub
        try:
            yield other
        finally:
            other._pub = None

    def clean_orphans(self) -> list[Path]:
        """Remove what killed writers left beside the store; see :func:`clean_orphans`."""
        return clean_orphans(self.path)

    def scratch(self, kind: str) -> Path:
        """A new empty folder beside the store for building a large element; see :func:`scratch_dir`."""
        return scratch_dir(self.path, kind)

    def _ensure_parent(self, full: str) -> None:
        parent = full.rpartition("/")[0]
        root = zarr.open_group(str(self._pub.work), mode="a", use_consolidated=False)
        if parent and parent not in root:
            # a plain dict group, tagged so anndata reads it without an OldFormatWarning
            g = root.require_group(parent)
            g.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})

    def _publish(self, relpath: str, value: Any, outputs: tuple[str, ...] | None = None) -> None:
        """Write ``value`` with anndata's encoders aside, then swap it in at ``relpath`` of
        the working copy (of the enclosing publication, or of one of its own). ``outputs``:
        the names it counts as (default ``relpath``), e.g. ``obs:<column>``."""
        if self._pub is None:
            with self.publishing(relpath):
                return self._publish(relpath, value, outputs)
        full = f"{self.group_path}/{relpath}".strip("/")
        self._ensure_parent(full)
        staging = self.path.with_name(f".{self.path.name}.staging-{uuid.uuid4().hex[:8]}")
        try:
            sg = zarr.open_group(str(staging), mode="w", zarr_format=self.zarr_format)
            name = full.rpartition("/")[2]
            write_elem(sg, name, value)
            replace_dir(staging / name, self._pub.work / full)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for name in outputs or (relpath,):
            self._pub.wrote(name)
        _fault_point(f"{self._pub.stage}: wrote {relpath}")

    def put_group(self, relpath: str, src: str | os.PathLike) -> None:
        """Move a finished zarr array or group folder ``src`` (built in :meth:`scratch`) to
        ``relpath`` (e.g. ``"layers/sccase"``), replacing what is there, in the enclosing
        publication (or one of its own)."""
        if self._pub is None:
            with self.publishing(relpath):
                return self.put_group(relpath, src)
        full = f"{self.group_path}/{relpath}".strip("/")
        self._ensure_parent(full)
        replace_dir(Path(src), self._pub.work / full)
        self._pub.wrote(relpath)
        _fault_point(f"{self._pub.stage}: wrote {relpath}")

    def write_obs(self, columns: pd.DataFrame | Mapping[str, Any]) -> None:
        """Add or replace ``obs`` columns (rewrites ``obs`` atomically; it is O(n_cells))."""
        with self.publishing("obs"):
            obs = self.obs
            for k, v in (columns.items()):
                obs[k] = np.asarray(v) if not isinstance(v, pd.Series) else v.to_numpy()
            self._publish("obs", obs, outputs=tuple(f"obs:{k}" for k in columns))

    def write_var(self, columns: pd.DataFrame | Mapping[str, Any]) -> None:
        """Add or replace ``var`` columns (rewrites ``var`` atomically)."""
        with self.publishing("var"):
            var = self.var
            for k, v in columns.items():
                var[k] = np.asarray(v) if not isinstance(v, pd.Series) else v.to_numpy()
            self._publish("var", var, outputs=tuple(f"var:{k}" for k in columns))

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
        """Store a stage's provenance in ``uns/scatac_dist/<stage>`` and return it.

        Inside :meth:`publishing` the record lists the block's outputs so far (``outputs``),
        which a resumed run checks before it skips the stage."""
        with self.publishing(stage):
            outputs = [o for o in self._pub.outputs if not o.startswith(f"uns/{PROVENANCE_KEY}/")]
            rec = provenance_record(stage, params, timings, outputs=outputs, **extra)
            self._publish(f"uns/{PROVENANCE_KEY}/{stage}", json.dumps(rec))
        return rec

    @staticmethod
    def _check_len(value: Any, n: int, what: str) -> None:
        if value.shape[0] != n:
            raise ValueError(f"{what} has {value.shape[0]} rows but the atlas has {n}")


def read_count_rows(block_id=None, *, store: str, group: str, chunk_rows: int) -> sp.csr_matrix:
    """Rows ``[i * chunk_rows, (i + 1) * chunk_rows)`` of X (block ``i``) as CSR.

    Raises
    ------
    InputError
        If a chunk of X cannot be read or decoded (a damaged store), naming the rows.
    """
    from anndata.io import sparse_dataset

    a = block_id[0] * chunk_rows
    try:
        root = zarr.open_group(store, mode="r", use_consolidated=False)
        x = sparse_dataset((root[group] if group else root)["X"])
        return x[a: min(a + chunk_rows, x.shape[0])]
    except Exception as exc:  # every codec and filesystem error means the same to the user
        raise InputError(store, f"rows {a}-{a + chunk_rows} of X cannot be read ({type(exc).__name__}: {exc})",
                         "the store is damaged (a disk or copy error); restore it from a copy or re-ingest "
                         "the counts") from None


def open_atlas(path: str | os.PathLike, *, mod: str | None = None,
               chunk_rows: int | None = None) -> Atlas:
    """Open an atlas store; see :class:`Atlas`."""
    return Atlas(path, mod=mod, chunk_rows=chunk_rows)

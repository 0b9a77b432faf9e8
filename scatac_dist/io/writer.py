"""Write a new atlas store from row-block recipes, in two passes on the Dask cluster.

A *recipe* is a picklable ``(function, args)`` pair; calling it on a worker returns the CSR
counts of one block of consecutive cells (a ``csr_matrix``, or a dict of them for a
multi-modality store). Readers (``io/``) and the synthetic generator only describe blocks;
this module turns them into a store:

1. **Spool.** Each worker builds its block, checks the counts (non-negative integers) and
   saves ``data``/``indices``/row lengths as ``.npy`` files in a spool folder beside the
   output. Only per-block sizes come back to the client.
2. **Assemble.** From the sizes the client knows every block's offset in the final
   ``data``/``indices`` arrays and the smallest dtype that holds the largest count. It
   creates the zarr arrays, writes ``indptr`` (O(n_cells)), and each worker task fills
   whole zarr chunks of ``data``/``indices`` from the spool files. Tasks own disjoint
   chunks, so no locks are needed and the result does not depend on the number of workers.

Memory on any process is bounded by one block or one zarr chunk, never the atlas.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from .. import _config
from ..errors import InputError
from ..store import Atlas, count_dtype, staged_output

logger = logging.getLogger("scatac_dist")

Recipe = tuple[Callable[..., Any], tuple]

__all__ = ["BlockPlan", "write_atlas", "check_counts"]


@dataclass
class BlockPlan:
    """What a reader hands to :func:`write_atlas` for one input.

    Attributes
    ----------
    source
        The input's path, for messages.
    obs
        One row per cell, in block order; the index holds the barcodes.
    var
        Per modality key (``"X"`` for a plain AnnData store; ``"rna"``/``"atac"`` for
        MuData), the features in column order.
    recipes
        Recipes of consecutive row blocks; each returns a ``csr_matrix`` (single key) or a
        dict keyed like ``var``.
    colmaps
        Optional per-key integer arrays mapping this input's columns to the output's; ``-1``
        drops a column. Set by :func:`~scatac_dist.io.ingest` when inputs are concatenated.
    """

    source: Path
    obs: pd.DataFrame
    var: dict[str, pd.DataFrame]
    recipes: list[Recipe]
    colmaps: dict[str, np.ndarray] | None = None


def check_counts(data: np.ndarray, source: str | Path, *, round_counts: bool = False) -> np.ndarray:
    """Return ``data`` as non-negative integer counts, or raise :class:`InputError`.

    Float values must be whole numbers unless ``round_counts`` (then they are rounded to
    the nearest integer). Negative, NaN or infinite values are always rejected.
    """
    if data.dtype.kind == "f":
        if not np.isfinite(data).all():
            raise InputError(source, "the matrix holds NaN or infinite values",
                             "ingest the raw count matrix, not a transformed one")
        if round_counts:
            data = np.rint(data)
        else:
            frac = data != np.floor(data)
            if frac.any():
                bad = data[frac][:3]
                raise InputError(
                    source, f"the matrix holds non-integer counts (e.g. {', '.join(map(str, bad))})",
                    "ingest raw integer counts; if the values are counts stored with rounding "
                    "noise, pass --round-counts (round_counts=True) to round them")
    elif data.dtype.kind not in "iub":
        raise InputError(source, f"the matrix has non-numeric dtype {data.dtype}",
                         "ingest a numeric count matrix")
    if data.size and data.min() < 0:
        raise InputError(source, f"the matrix holds negative counts (minimum {data.min()})",
                         "ingest the raw count matrix; counts cannot be negative")
    maxv = int(data.max()) if data.size else 0
    return data.astype(count_dtype(maxv), copy=False)


def _remap_columns(m: sp.csr_matrix, colmap: np.ndarray, n_cols: int) -> sp.csr_matrix:
    keep = colmap[m.indices] >= 0
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))[keep]
    out = sp.csr_matrix((m.data[keep], (rows, colmap[m.indices[keep]])), shape=(m.shape[0], n_cols))
    out.sort_indices()
    return out


def _spool_block(recipe: Recipe, spool: str, index: int, source: str, keys: tuple[str, ...],
                 colmaps: Mapping[str, np.ndarray] | None, n_cols: Mapping[str, int],
                 round_counts: bool) -> dict[str, tuple[int, int, int, int]]:
    """Worker task: build one block, check it, save it; return (rows, nnz, max, empty rows)."""
    fn, args = recipe
    try:
        out = fn(*args)
    except InputError:
        raise
    except (OSError, EOFError, ValueError, KeyError) as exc:
        raise InputError(source, f"could not read cells of block {index} ({type(exc).__name__}: {exc})",
                         "the file looks truncated or corrupt: re-export or re-download it "
                         "(for .gz files, `gzip -t FILE` checks integrity)") from exc
    if not isinstance(out, Mapping):
        out = {keys[0]: out}
    meta = {}
    for key in keys:
        m = sp.csr_matrix(out[key])
        if colmaps is not None and key in colmaps:
            m = _remap_columns(m, colmaps[key], n_cols[key])
        elif m.shape[1] != n_cols[key]:
            raise InputError(source, f"block {index} has {m.shape[1]} columns, expected {n_cols[key]}",
                             "check that the feature list matches the matrix")
        m.sum_duplicates()  # also sorts indices, as the CSR encoding expects
        data = check_counts(m.data, source, round_counts=round_counts)
        base = Path(spool) / f"{index:07d}.{key}"
        np.save(f"{base}.data.npy", data)
        np.save(f"{base}.indices.npy", m.indices.astype(np.int32, copy=False))
        rownnz = np.diff(m.indptr)
        np.save(f"{base}.rownnz.npy", rownnz.astype(np.int64))
        meta[key] = (m.shape[0], int(m.nnz), int(data.max()) if data.size else 0,
                     int((rownnz == 0).sum()))
    return meta


def _fill_chunk(array_path: str, spool: str, key: str, part: str, start: int, stop: int,
                pieces: list[tuple[int, int, int]], dtype: str) -> int:
    """Worker task: write elements [start, stop) of X/data or X/indices from spool files."""
    parts = []
    for block, lo, hi in pieces:
        arr = np.load(Path(spool) / f"{block:07d}.{key}.{part}.npy", mmap_mode="r")
        parts.append(np.asarray(arr[lo:hi]))
    z = zarr.open_array(array_path, mode="r+")
    z[start:stop] = np.concatenate(parts).astype(dtype, copy=False)
    return stop - start


def _progress(futures, desc: str, show: bool):
    from ..progress import as_completed_bar

    return as_completed_bar(futures, desc=desc, enabled=show)


def _assemble_x(client, group: zarr.Group, group_path: Path, spool: Path, key: str,
                metas: Sequence[tuple[int, int, int, int]], n_cols: int, zarr_format: int,
                progress: bool) -> dict[str, Any]:
    n_rows = int(sum(m[0] for m in metas))
    nnz = np.array([m[1] for m in metas], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(nnz)])
    total = int(offsets[-1])
    maxv = max((m[2] for m in metas), default=0)
    dtype = count_dtype(maxv)
    chunk = int(_config.get("store.data-chunk-elements"))

    x = group.create_group("X")
    x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                    "shape": [n_rows, n_cols]})
    x.create_array("data", shape=(total,), chunks=(chunk,), dtype=dtype)
    x.create_array("indices", shape=(total,), chunks=(chunk,), dtype=np.int32)
    indptr = x.create_array("indptr", shape=(n_rows + 1,), chunks=(max(chunk // 2, 1),),
                            dtype=np.int64)
    # indptr is O(n_cells): built on the client from the spooled row lengths, block by block.
    row = 0
    buf = np.zeros(1, dtype=np.int64)
    indptr[0:1] = buf
    for b, m in enumerate(metas):
        rownnz = np.load(spool / f"{b:07d}.{key}.rownnz.npy")
        indptr[row + 1: row + 1 + m[0]] = offsets[b] + np.cumsum(rownnz)
        row += m[0]

    futures = []
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        first = int(np.searchsorted(offsets, start, side="right") - 1)
        pieces = []
        b = first
        while b < len(metas) and offsets[b] < stop:
            lo, hi = max(start, offsets[b]) - offsets[b], min(stop, offsets[b + 1]) - offsets[b]
            if hi > lo:
                pieces.append((b, int(lo), int(hi)))
            b += 1
        for part, dt in (("data", dtype.str), ("indices", "<i4")):
            futures.append(client.submit(
                _fill_chunk, str(group_path / "X" / part), str(spool), key, part, start, stop,
                pieces, dt, pure=False, key=f"fill-{part}-{key}-{start}-{uuid.uuid4().hex[:6]}"))
    for _ in _progress(futures, f"writing {key}", progress):
        pass
    client.gather(futures)  # re-raise the first error, if any
    return {"n_obs": n_rows, "n_vars": n_cols, "nnz": total, "max_count": maxv, "dtype": dtype.name}


def write_atlas(
    out: str | Path,
    plans: Sequence[BlockPlan],
    *,
    obs: pd.DataFrame,
    var: Mapping[str, pd.DataFrame],
    client=None,
    overwrite: bool = False,
    round_counts: bool = False,
    provenance: Mapping[str, Any] | None = None,
    stage: str = "ingest",
    progress: bool = True,
) -> Atlas:
    """Build a store at ``out`` from block plans, atomically.

    Parameters
    ----------
    out
        Destination store path. Refused if it exists, unless ``overwrite``.
    plans
        One :class:`BlockPlan` per input; their blocks are stacked in order.
    obs
        Final cell table (all inputs, in order).
    var
        Final feature tables: ``{"X": var}`` writes an AnnData store; ``{"rna": ..,
        "atac": ..}`` a MuData store with those modalities.
    client
        Dask client (default: the current one).
    provenance
        Parameters recorded in ``uns/scatac_dist/<stage>``.

    Writes
    ------
    The whole store: ``X`` (or ``mod/*/X``), ``obs``, ``var``, ``uns/scatac_dist/<stage>``.
    """
    from ..cluster import current_client

    client = client or current_client()
    keys = tuple(var)
    n_cols = {k: len(v) for k, v in var.items()}
    t0 = time.perf_counter()
    zarr_format = int(_config.get("store.zarr-format"))
    out = Path(out).absolute()
    spool = out.with_name(f".{out.name}.spool-{uuid.uuid4().hex[:8]}")
    with staged_output(out, overwrite=overwrite) as tmp:
        spool.mkdir(parents=True)
        try:
            futures, index = [], 0
            for plan in plans:
                for recipe in plan.recipes:
                    futures.append(client.submit(
                        _spool_block, recipe, str(spool), index, str(plan.source), keys,
                        plan.colmaps, n_cols, round_counts, pure=False,
                        key=f"spool-block-{index}-{uuid.uuid4().hex[:6]}"))
                    index += 1
            for _ in _progress(futures, "reading blocks", progress):
                pass
            metas = client.gather(futures)
            t_spool = time.perf_counter() - t0

            n_rows = sum(m[keys[0]][0] for m in metas)
            if n_rows != len(obs):
                raise InputError(plans[0].source if len(plans) == 1 else None,
                                 f"the matrix has {n_rows} cells but {len(obs)} barcodes were listed",
                                 "check that the barcode list belongs to this matrix")
            stats = {}
            for key in keys:
                total = sum(m[key][1] for m in metas)
                if total == 0:
                    raise InputError(plans[0].source if len(plans) == 1 else None,
                                     f"the {'matrix' if key == 'X' else key + ' matrix'} is empty "
                                     "(no non-zero counts)",
                                     "check that the right file was given and that it was not "
                                     "written before counting finished")
                n_empty = sum(m[key][3] for m in metas)
                if n_empty:
                    logger.warning("%d of %d cells have no %s counts; they are kept (filter them "
                                   "with scatac_dist.pp.filter_cells)", n_empty, n_rows,
                                   "" if key == "X" else key)
                stats[key] = {"empty_cells": n_empty}

            # The skeleton (obs, var, uns) comes from anndata/mudata themselves, so the layout
            # is exactly what they read; X is then added without ever being in memory.
            mods = {k: ad.AnnData(obs=obs if k == "X" else pd.DataFrame(index=obs.index),
                                  var=var[k]) for k in keys}
            if keys == ("X",):
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    ad.settings.zarr_write_format = zarr_format
                    mods["X"].write_zarr(str(tmp))
                targets = {"X": ""}
            else:
                import mudata

                mudata.set_options(pull_on_update=False)
                mdata = mudata.MuData(mods)
                mdata.obs = obs.copy()
                ad.settings.zarr_write_format = zarr_format
                mdata.write_zarr(str(tmp))
                targets = {k: f"mod/{k}" for k in keys}

            root = zarr.open_group(str(tmp), mode="a", use_consolidated=False)
            for key in keys:
                gpath = targets[key]
                group = root[gpath] if gpath else root
                if "X" in group:
                    del group["X"]
                stats[key].update(_assemble_x(client, group, tmp / gpath if gpath else tmp,
                                              spool, key, [m[key] for m in metas], n_cols[key],
                                              zarr_format, progress))
            timings = {"spool": t_spool, "total": time.perf_counter() - t0}
            for key in keys:
                atlas = Atlas(tmp, mod=None if key == "X" else key)
                atlas.record(stage, dict(provenance or {}), timings, result=stats[key])
        finally:
            shutil.rmtree(spool, ignore_errors=True)
    logger.info("wrote %s (%s) in %.1f s", out, ", ".join(
        f"{k}: {s['n_obs']} x {s['n_vars']}, nnz {s['nnz']}" for k, s in stats.items()),
        time.perf_counter() - t0)
    return Atlas(out)

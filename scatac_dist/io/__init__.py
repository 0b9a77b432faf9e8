"""Ingest real scATAC formats into an atlas store.

``ingest`` is the one entry point: it detects each input's format, checks it, concatenates
several inputs (with a ``batch`` column), joins a labels TSV, and writes the store through
:func:`scatac_dist.io.writer.write_atlas` on the current Dask cluster.

Formats: ``10x-mtx`` (Cell Ranger ATAC ``filtered_peak_bc_matrix/`` folder), ``10x-h5``
(Cell Ranger ATAC or ARC HDF5; ARC gives a MuData store with ``rna`` and ``atac``), and
``h5ad`` (AnnData; features named by index rather than ``chr:start-end`` are accepted with a
warning and no coordinates, see :func:`require_intervals`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .. import _config
from ..errors import InputError
from ..lock import store_lock
from ..store import Atlas, scratch_dir
from .features import COORDINATES, require_intervals
from .h5ad import plan_h5ad
from .labels import join_labels, read_labels
from .mtx import plan_10x_mtx
from .tenx_h5 import plan_10x_h5
from .writer import BlockPlan, write_atlas

logger = logging.getLogger("scatac_dist")

__all__ = ["ingest", "detect_format", "FORMATS", "require_intervals"]

FORMATS = ("auto", "10x-mtx", "10x-h5", "h5ad")
Format = Literal["auto", "10x-mtx", "10x-h5", "h5ad"]


def detect_format(path: str | Path) -> str:
    """Guess an input's format from what it is; raise :class:`InputError` if unknown."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist", "check the path")
    if path.is_dir():
        return "10x-mtx"
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic == b"\x89HDF\r\n\x1a\n":
        return "h5ad" if path.suffix == ".h5ad" else "10x-h5"
    raise InputError(path, "is neither a folder nor an HDF5 file",
                     f"give a 10x filtered_peak_bc_matrix/ folder, a 10x .h5 or an .h5ad "
                     f"(or set --format to one of {', '.join(FORMATS[1:])})")


def _batch_name(path: Path) -> str:
    if path.is_dir() and path.name.startswith("filtered_"):
        return path.parent.name
    return path.stem if path.is_file() else path.name


def _join_features(plans: Sequence[BlockPlan], key: str, how: str) -> pd.DataFrame:
    """The output's features for ``key`` and each plan's column map to it."""
    vars_ = [p.var[key] for p in plans]
    first = vars_[0]
    if all(v.index.equals(first.index) for v in vars_[1:]):
        return first
    sets = [set(v.index) for v in vars_]
    if how == "exact" and any(s != sets[0] for s in sets[1:]):
        shared = set.intersection(*sets)
        raise InputError(None, f"the inputs have different {'peaks' if key != 'rna' else 'genes'} "
                         f"({len(shared)} shared; sizes {[len(s) for s in sets]})",
                         "ingest them separately, or pass --join inner (shared features only) "
                         "or --join outer (all features, zero where absent)")
    if how == "inner":
        shared = set.intersection(*sets)
        out = first[first.index.isin(shared)]
    else:  # outer, or exact with the same set in another order
        out = pd.concat(vars_)
        out = out[~out.index.duplicated()]
    for p in plans:
        cmap = pd.Series(np.arange(len(out)), index=out.index).reindex(p.var[key].index)
        p.colmaps = (p.colmaps or {}) | {key: cmap.fillna(-1).to_numpy(np.int64)}
    return out


def ingest(
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    format: Format = "auto",
    labels: str | Path | None = None,
    chunk_rows: int | None = None,
    overwrite: bool = False,
    round_counts: bool = False,
    join: Literal["exact", "inner", "outer"] = "exact",
    batch_key: str = "batch",
    batch_names: Sequence[str] | None = None,
    layer: str | None = None,
    client=None,
    progress: bool = True,
) -> Atlas:
    """Turn one or more scATAC inputs into one atlas store.

    Parameters
    ----------
    inputs
        Paths of 10x folders, 10x ``.h5`` or ``.h5ad`` files. Several inputs are stacked in
        order and get ``obs[batch_key]``; if their barcodes collide, every barcode gets a
        ``-<batch>`` suffix (anndata's ``index_unique`` convention).
    out
        The store to create (refused if it exists, unless ``overwrite``).
    format
        One of ``auto``, ``10x-mtx``, ``10x-h5``, ``h5ad`` (applies to every input).
    labels
        A TSV of per-cell metadata joined on barcode into ``obs``.
    chunk_rows
        Cells per row block (default ``scatac-dist.store.chunk-rows``).
    round_counts
        Round non-integer counts instead of rejecting them.
    join
        How to join inputs with different features: ``exact`` (refuse), ``inner``, ``outer``.
    layer
        For ``.h5ad`` inputs, read this layer instead of ``X``.
    client
        Dask client (default: the current one, or a new local cluster).

    Returns
    -------
    Atlas
        The new store, opened.

    Writes
    ------
    A new store: ``X`` (or ``mod/rna``/``mod/atac`` for 10x ARC input), ``obs`` (barcodes,
    source metadata, labels, batch), ``var`` (``chr``, ``start``, ``end``; an ``.h5ad`` whose
    features are not intervals keeps its own names and columns, without coordinates, and a
    warning says which commands need them: see :func:`require_intervals`), and
    ``uns/scatac_dist/ingest``.
    """
    from ..cluster import current_client

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
    if join not in ("exact", "inner", "outer"):
        raise ValueError(f"join must be 'exact', 'inner' or 'outer', not {join!r}")
    inputs = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    if not inputs:
        raise ValueError("no inputs given")
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        from ..errors import OutputExistsError

        raise OutputExistsError(out, "the output path already exists",
                                "choose another path, or pass --overwrite to replace it")
    chunk_rows = int(chunk_rows or _config.get("store.chunk-rows"))
    client = client or current_client()
    label_table = read_labels(labels) if labels else None
    t0 = time.perf_counter()
    with store_lock(out):  # from the first byte written: the buckets go beside the output too
        workdir = scratch_dir(out, "buckets")
        try:
            plans = []
            formats = []
            for i, path in enumerate(inputs):
                fmt = detect_format(path) if format == "auto" else format
                if not path.exists():
                    raise InputError(path, "does not exist", "check the path")
                wd = workdir / str(i)
                if fmt == "10x-mtx":
                    plan = plan_10x_mtx(path, workdir=wd, chunk_rows=chunk_rows, client=client,
                                        round_counts=round_counts, progress=progress)
                elif fmt == "10x-h5":
                    plan = plan_10x_h5(path, chunk_rows=chunk_rows)
                else:
                    plan = plan_h5ad(path, chunk_rows=chunk_rows, workdir=wd, layer=layer, client=client,
                                     round_counts=round_counts, progress=progress)
                plans.append(plan)
                formats.append(fmt)

            keys = list(plans[0].var)
            for p in plans[1:]:
                if list(p.var) != keys:
                    raise InputError(p.source, f"has modalities {list(p.var)} but {plans[0].source} has {keys}",
                                     "ingest joint RNA+ATAC and ATAC-only inputs separately")
            for key in keys:
                placed = [set(COORDINATES) <= set(p.var[key].columns) for p in plans]
                if any(placed) and not all(placed):
                    with_c = [str(p.source) for p, c in zip(plans, placed) if c]
                    without = [str(p.source) for p, c in zip(plans, placed) if not c]
                    raise InputError(without[0], f"its features have no genomic coordinates but those of {with_c[0]} "
                                     "do, so the two cannot be matched peak for peak",
                                     "give every input coordinates (var columns chr, start and end, or features "
                                     "named chr:start-end), or ingest them separately")
            var = {key: _join_features(plans, key, join) for key in keys}

            obs = pd.concat([p.obs for p in plans]) if len(plans) > 1 else plans[0].obs.copy()
            if len(plans) > 1:
                names = list(batch_names) if batch_names else [_batch_name(p.source) for p in plans]
                if len(names) != len(plans) or len(set(names)) != len(names):
                    raise InputError(None, f"batch names {names} are not one unique name per input",
                                     "pass --batch-names with one distinct name per input")
                batch = np.repeat(names, [len(p.obs) for p in plans])
                obs[batch_key] = pd.Categorical(batch, categories=names)
                if obs.index.has_duplicates:
                    logger.info("barcodes collide across inputs: appending '-<batch>' to every barcode")
                    obs["barcode"] = obs.index.to_numpy()
                    obs.index = pd.Index([f"{b}-{n}" for b, n in zip(obs.index, batch)])
            obs.index = obs.index.astype(str)
            if label_table is not None:
                obs = join_labels(obs, label_table, labels)

            params = {"inputs": [str(p) for p in inputs], "formats": formats, "labels": labels,
                      "chunk_rows": chunk_rows, "round_counts": round_counts, "join": join,
                      "layer": layer}
            logger.info("planned %d input(s) in %.1f s; writing %s", len(plans), time.perf_counter() - t0, out)
            return write_atlas(out, plans, obs=obs, var=var, client=client, overwrite=overwrite,
                               round_counts=round_counts, provenance=params, progress=progress)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

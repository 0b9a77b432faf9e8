"""Cell labels and metadata from a TSV file, joined onto ``obs`` by barcode."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from ..errors import InputError

logger = logging.getLogger("scatac_dist")

__all__ = ["read_labels", "join_labels"]

_BARCODE_COLUMNS = ("barcode", "barcodes", "cell", "cell_id", "obs_names")


def read_labels(path: str | Path) -> pd.DataFrame:
    """Read a metadata TSV whose ``barcode`` column (or first column) holds barcodes.

    Text columns become categoricals, as scanpy expects for labels.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=[""])
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, EOFError) as exc:
        raise InputError(path, f"could not be read as a TSV ({exc})",
                         "give a tab-separated file with a header line and barcodes in the first column") from exc
    if df.shape[1] < 2:
        raise InputError(path, "has fewer than two columns",
                         "give a tab-separated file: barcode, then one or more label columns")
    key = next((c for c in df.columns if str(c).lower() in _BARCODE_COLUMNS), df.columns[0])
    df = df.set_index(key)
    df.index.name = None
    if df.index.has_duplicates:
        dup = df.index[df.index.duplicated()][0]
        raise InputError(path, f"lists barcode {dup} more than once",
                         "keep one row per barcode")
    for c in df.columns:
        num = pd.to_numeric(df[c], errors="coerce")
        if num.notna().sum() == df[c].notna().sum():
            df[c] = num
        else:
            df[c] = df[c].astype("category")
    return df


def join_labels(obs: pd.DataFrame, labels: pd.DataFrame, source: str | Path) -> pd.DataFrame:
    """Left-join ``labels`` onto ``obs`` by index; cells without a label get NaN.

    Raises
    ------
    InputError
        If no barcode matches (the usual sign of a TSV from another dataset).
    """
    shared = obs.index.intersection(labels.index)
    if len(shared) == 0:
        raise InputError(source, f"none of its {len(labels)} barcodes (e.g. {labels.index[0]}) match "
                         f"the matrix's {len(obs)} barcodes (e.g. {obs.index[0]})",
                         "use the labels file of this dataset; when several inputs were joined "
                         "and barcodes got a '-<batch>' suffix, add that suffix in the TSV")
    missing = len(obs) - len(shared)
    extra = len(labels) - len(shared)
    if missing:
        logger.warning("%s: %d of %d cells have no row in the labels file; their labels are NaN",
                       source, missing, len(obs))
    if extra:
        logger.warning("%s: %d labelled barcodes are not in the matrix and are ignored", source, extra)
    clash = [c for c in labels.columns if c in obs.columns]
    if clash:
        logger.warning("%s: replacing obs columns %s with the file's", source, clash)
    out = obs.drop(columns=clash)
    joined = labels.reindex(obs.index)
    for c in labels.columns:
        col = joined[c]
        if isinstance(labels[c].dtype, pd.CategoricalDtype):
            col = pd.Categorical(col, categories=labels[c].cat.categories)
        out[c] = col
    return out

"""Peak coordinates: read BED files and parse peak names into ``chr``/``start``/``end``.

An atlas's ``var`` has ``chr`` (str), ``start`` and ``end`` (int64, BED half-open) and
uses ``chr:start-end`` as the peak name, as Cell Ranger ATAC does.

**Features without coordinates.** Many public ``.h5ad`` files name their peaks by index
(``"0"``, ``"1"``, ... or ``"peak_123"``) and have no coordinate columns. Such a file is
ingested as it is, with a warning: ``var`` keeps its names and columns and has no
``chr``/``start``/``end`` (absent rather than filled with placeholders, so that anndata,
scanpy and SnapATAC2 read the store as they read the file). Everything that works on the
count matrix alone runs on it; what needs coordinates (scEmbed's region tokens and
projection, export to a peaks BED or a 10x matrix) calls :func:`require_intervals` first and
is refused with the fix. The rule, for a table with no coordinate columns:

* every name parses as ``chr:start-end`` (or ``chr_start_end``, ``chr-start-end``): the names
  give the coordinates, and an invalid interval among them (``chr1:500-100``) is an error;
* no name parses: the features have no coordinates (the warning case above);
* some parse and some do not: an error naming the first that does not, since a peak list
  that is part intervals and part something else is more likely damaged than meant.

A name of the form ``word_<int>_<int>`` (``peak_10_20``) parses as an interval on contig
``word``; name such features differently if they are not intervals.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ._open import open_text

logger = logging.getLogger("scatac_dist")

__all__ = ["read_bed", "peaks_from_names", "peak_var", "require_intervals"]

#: the ``var`` columns that hold a peak's coordinates
COORDINATES = ("chr", "start", "end")

# chr may itself hold "_" (chrUn_gl000220); the lazy match leaves the last two numbers to start/end
_NAME = re.compile(r"^(?P<chr>\S+?)[:_-](?P<start>\d+)[-_](?P<end>\d+)$")


def _unique_names(names, source: str | Path, what: str, fix: str) -> pd.Index:
    """``names`` as a string index, or :class:`InputError` naming the first listed twice."""
    index = pd.Index(np.asarray(names, dtype=object).astype(str))
    if index.has_duplicates:
        raise InputError(source, f"{what} {index[index.duplicated()][0]} is listed more than once", fix)
    return index


def peak_var(chrom: Sequence[str], start: Sequence[int], end: Sequence[int],
             source: str | Path, names: Sequence[str] | None = None) -> pd.DataFrame:
    """Build the ``var`` table of peaks, checking that every interval is valid and unique."""
    chrom = np.asarray(chrom, dtype=object).astype(str)
    start = np.asarray(start, dtype=np.int64)
    end = np.asarray(end, dtype=np.int64)
    bad = np.flatnonzero((start < 0) | (start >= end))
    if bad.size:
        i = int(bad[0])
        raise InputError(source, f"peak {i + 1} ({chrom[i]}:{start[i]}-{end[i]}) has start >= end "
                         f"or a negative start ({bad.size} such peaks)",
                         "peaks must be BED intervals with 0 <= start < end")
    if names is None:
        names = pd.Index(chrom).str.cat([pd.Index(start.astype(str)), pd.Index(end.astype(str))],
                                        sep=":").str.replace(r":(\d+)$", r"-\1", regex=True)
    index = _unique_names(names, source, "peak",
                          "remove duplicate peaks (e.g. `sort -u` the BED file) and re-export the matrix")
    _note_order(chrom, start, end, source)
    return pd.DataFrame({"chr": pd.Categorical(chrom), "start": start, "end": end}, index=index)


def _note_order(chrom: np.ndarray, start: np.ndarray, end: np.ndarray, source: str | Path) -> None:
    """Unsorted or overlapping peaks are accepted as they are (docs/architecture.md, "Bad
    input"): the columns of the matrix follow the peak file, and no method here needs the
    peaks sorted or disjoint (region overlaps are computed per chromosome after sorting).
    A warning says so, since either is unusual for a peak caller's output."""
    same_next = chrom[1:] == chrom[:-1]
    runs = 1 + int((~same_next).sum()) if len(chrom) else 0
    unsorted = int((same_next & (start[1:] < start[:-1])).sum()) + (runs - len(np.unique(chrom)))
    order = np.lexsort((start, chrom))
    c, s_, e = chrom[order], start[order], end[order]
    same = c[1:] == c[:-1]
    overlapping = int((same & (s_[1:] < e[:-1])).sum())
    if unsorted:
        logger.warning("%s: the peaks are not sorted by chromosome and start (%d places); they are "
                       "kept in file order, as the matrix's columns are", source, unsorted)
    if overlapping:
        logger.warning("%s: %d peaks overlap the previous one on their chromosome; they are kept as "
                       "separate features", source, overlapping)


def read_bed(path: str | Path) -> pd.DataFrame:
    """Read a peaks BED file (``chrom start end [...]``) into a ``var`` table.

    Raises
    ------
    InputError
        On a line with fewer than three fields, a non-numeric coordinate, or start >= end;
        the message gives the line number.
    """
    path = Path(path)
    chrom, start, end = [], [], []
    try:
        with open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip() or line.startswith(("#", "track", "browser")):
                    continue
                f = line.rstrip("\n").split("\t")
                if len(f) < 3:
                    f = line.split()
                if len(f) < 3:
                    raise InputError(path, f"line {lineno} has {len(f)} field(s), a BED line needs "
                                     f"chrom, start and end: {line.strip()[:60]!r}",
                                     "fix or remove that line")
                try:
                    s, e = int(f[1]), int(f[2])
                except ValueError:
                    raise InputError(path, f"line {lineno} has a non-numeric start or end: "
                                     f"{line.strip()[:60]!r}", "fix or remove that line") from None
                if not 0 <= s < e:
                    raise InputError(path, f"line {lineno} has start >= end or a negative start: "
                                     f"{line.strip()[:60]!r}",
                                     "BED intervals need 0 <= start < end; fix that line")
                chrom.append(f[0])
                start.append(s)
                end.append(e)
    except (EOFError, OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"could not be read ({exc})",
                         "the file looks truncated or corrupt; re-export it") from exc
    if not chrom:
        raise InputError(path, "holds no peaks", "give the peaks BED file of this matrix")
    return peak_var(chrom, start, end, path)


def peaks_from_names(names: Sequence[str], source: str | Path) -> pd.DataFrame:
    """Parse peak names such as ``chr1:100-200``, ``chr1_100_200`` or ``chr1-100-200``."""
    names = pd.Index(names).astype(str)
    parts = names.str.extract(_NAME)
    if parts.isna().any(axis=None):
        bad = names[parts.isna().any(axis=1).to_numpy()][0]
        raise InputError(source, f"feature name {bad!r} is not a genomic interval",
                         "name peaks chr:start-end (or chr_start_end), or give var columns "
                         "chr, start and end")
    return peak_var(parts["chr"], parts["start"].astype(np.int64), parts["end"].astype(np.int64),
                    source, names=names)


def var_from_table(var: pd.DataFrame, source: str | Path, *, allow_unplaced: bool = False) -> pd.DataFrame:
    """Peak ``var`` from an existing table: its chr/start/end columns, or else its index.

    With ``allow_unplaced``, a table whose feature names are none of them intervals (and
    that has no coordinate columns) comes back as it is, names as strings, without
    ``chr``/``start``/``end`` (module docstring); the caller warns. Otherwise, and when only
    some names are intervals, :class:`InputError` as :func:`peaks_from_names` raises it.
    """
    for c, s, e in (("chr", "start", "end"), ("chrom", "chromStart", "chromEnd"),
                    ("seqnames", "start", "end")):
        if {c, s, e} <= set(var.columns):
            out = peak_var(var[c].astype(str), var[s], var[e], source, names=var.index)
            rest = var.drop(columns=[c, s, e])
            return pd.concat([out, rest], axis=1)
    if allow_unplaced and not pd.Index(var.index).astype(str).str.match(_NAME).any():
        return var.set_axis(_unique_names(var.index, source, "feature", "make feature names unique "
                                          "(AnnData.var_names_make_unique()) and re-write the file"))
    out = peaks_from_names(var.index, source)
    return pd.concat([out, var.set_axis(out.index)], axis=1)


def _has_intervals(var: pd.DataFrame) -> bool:
    """Whether every feature of ``var`` has coordinates (``chr``, ``start``, ``end``, none missing)."""
    return all(c in var.columns for c in COORDINATES) and not var[list(COORDINATES)].isna().any(axis=None)


def require_intervals(atlas, what: str) -> pd.DataFrame:
    """The peaks' coordinates, or :class:`InputError` if the store's features have none.

    Call it first in anything that needs genomic coordinates (scEmbed, export to BED/10x):
    a store ingested from an ``.h5ad`` whose features are named by index has no
    ``chr``/``start``/``end`` in ``var`` (module docstring).

    Parameters
    ----------
    atlas
        An open :class:`~scatac_dist.store.Atlas` (reads ``var``).
    what
        What needs the coordinates, for the message (e.g. ``"scEmbed training"``).

    Returns
    -------
    pandas.DataFrame
        ``chr`` (str), ``start`` and ``end`` (int64), one row per feature, indexed like ``var``.

    Raises
    ------
    InputError
        Naming the store, saying that its features have no genomic coordinates and how to
        ingest them with coordinates.
    """
    var = atlas.var
    if not _has_intervals(var):
        missing = [c for c in COORDINATES if c not in var.columns]
        if missing:
            detail = f"var has no {'/'.join(missing)} column{'s' if len(missing) > 1 else ''}"
        else:
            n_bad = int(var[list(COORDINATES)].isna().any(axis=1).sum())
            detail = f"{n_bad} of {len(var)} features have no chr/start/end"
        names = ", ".join(repr(str(x)) for x in var.index[:3])
        raise InputError(
            atlas.path,
            f"{what} needs genomic coordinates, but the features have none ({detail}; "
            f"feature names such as {names} are not chr:start-end intervals)",
            "re-ingest the matrix with coordinates: give the .h5ad var columns chr, start and end "
            "(e.g. from the dataset's peaks BED), or name its features chr:start-end (e.g. chr1:10000-10500); "
            "a 10x folder or .h5 carries them already")
    return pd.DataFrame({"chr": var["chr"].astype(str).to_numpy(),
                         "start": var["start"].to_numpy(np.int64),
                         "end": var["end"].to_numpy(np.int64)}, index=var.index)

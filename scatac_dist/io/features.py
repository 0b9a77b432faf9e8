"""Peak coordinates: read BED files and parse peak names into ``chr``/``start``/``end``.

Every atlas's ``var`` has ``chr`` (str), ``start`` and ``end`` (int64, BED half-open) and
uses ``chr:start-end`` as the peak name, as Cell Ranger ATAC does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ._open import open_text

__all__ = ["read_bed", "peaks_from_names", "peak_var"]

# chr may itself hold "_" (chrUn_gl000220); the lazy match leaves the last two numbers to start/end
_NAME = re.compile(r"^(?P<chr>\S+?)[:_-](?P<start>\d+)[-_](?P<end>\d+)$")


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
    index = pd.Index(np.asarray(names, dtype=object).astype(str))
    if index.has_duplicates:
        dup = index[index.duplicated()][0]
        raise InputError(source, f"peak {dup} is listed more than once",
                         "remove duplicate peaks (e.g. `sort -u` the BED file) and re-export the matrix")
    return pd.DataFrame({"chr": pd.Categorical(chrom), "start": start, "end": end}, index=index)


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


def var_from_table(var: pd.DataFrame, source: str | Path) -> pd.DataFrame:
    """Peak ``var`` from an existing table: its chr/start/end columns, or else its index."""
    for c, s, e in (("chr", "start", "end"), ("chrom", "chromStart", "chromEnd"),
                    ("seqnames", "start", "end")):
        if {c, s, e} <= set(var.columns):
            out = peak_var(var[c].astype(str), var[s], var[e], source, names=var.index)
            rest = var.drop(columns=[c, s, e])
            return pd.concat([out, rest], axis=1)
    out = peaks_from_names(var.index, source)
    return pd.concat([out, var.set_axis(out.index)], axis=1)

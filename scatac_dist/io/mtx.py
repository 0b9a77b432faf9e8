"""Reader of a 10x Cell Ranger ATAC ``filtered_peak_bc_matrix/`` folder.

The folder holds ``matrix.mtx[.gz]`` (MatrixMarket coordinates, peaks x cells),
``peaks.bed[.gz]`` and ``barcodes.tsv[.gz]``. The matrix is streamed in batches on the
client (a gzip stream cannot be split) in pieces of whole lines, which Dask workers parse
and bucket by cell on disk in parallel (:mod:`scatac_dist.io._buckets`); workers then turn
buckets into CSR row blocks. At most a few pieces are in flight, so memory stays bounded.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .. import _config
from ..errors import InputError
from ._buckets import bucket_recipes, write_piece
from ._open import GZIP_ERRORS, gzip_reader, is_gzip, open_text
from .features import read_bed
from .writer import BlockPlan, check_counts

logger = logging.getLogger("scatac_dist")

__all__ = ["find_10x_mtx", "plan_10x_mtx", "read_barcodes", "read_mtx_header"]

_FIELDS = {"integer", "real", "double", "pattern", "unsigned-integer"}


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        for cand in (folder / n, folder / f"{n}.gz"):
            if cand.exists():
                return cand
    return None


def find_10x_mtx(folder: str | Path) -> tuple[Path, Path, Path]:
    """Locate ``(matrix.mtx, peaks.bed, barcodes.tsv)`` in a 10x folder (or its
    ``filtered_peak_bc_matrix/`` subfolder)."""
    folder = Path(folder)
    if (folder / "filtered_peak_bc_matrix").is_dir() and not _first_existing(folder, ("matrix.mtx",)):
        folder = folder / "filtered_peak_bc_matrix"
    mtx = _first_existing(folder, ("matrix.mtx",))
    peaks = _first_existing(folder, ("peaks.bed",))
    barcodes = _first_existing(folder, ("barcodes.tsv",))
    missing = [n for n, p in (("matrix.mtx[.gz]", mtx), ("peaks.bed[.gz]", peaks),
                              ("barcodes.tsv[.gz]", barcodes)) if p is None]
    if missing:
        have = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise InputError(folder, f"is not a 10x peak matrix folder: {', '.join(missing)} missing "
                         f"(found {have[:8]})",
                         "point to Cell Ranger ATAC's filtered_peak_bc_matrix/ folder")
    return mtx, peaks, barcodes


def read_barcodes(path: str | Path) -> pd.Index:
    """Read ``barcodes.tsv[.gz]`` (first column); duplicates are an error."""
    path = Path(path)
    try:
        with open_text(path) as fh:
            codes = [line.rstrip("\n").split("\t")[0] for line in fh if line.strip()]
    except (EOFError, OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"could not be read ({exc})",
                         "the file looks truncated or corrupt; re-export it") from exc
    if not codes:
        raise InputError(path, "lists no barcodes", "give the barcodes.tsv of this matrix")
    index = pd.Index(codes)
    if index.has_duplicates:
        dups = index[index.duplicated()].unique()
        raise InputError(path, f"lists {len(dups)} barcode(s) more than once (e.g. {dups[0]})",
                         "barcodes must be unique: remove the duplicates, or if several libraries "
                         "were merged, ingest each folder as its own input so they get a batch suffix")
    return index


def read_mtx_header(path: str | Path) -> tuple[int, int, int, str, int]:
    """Return ``(rows, cols, entries, field, header_lines)`` of a MatrixMarket file."""
    path = Path(path)
    try:
        with open_text(path) as fh:
            banner = fh.readline()
            t = banner.lower().split()
            if len(t) < 5 or t[0] != "%%matrixmarket" or t[1] != "matrix" or t[2] != "coordinate":
                raise InputError(path, f"is not a MatrixMarket coordinate file (first line "
                                 f"{banner.strip()[:60]!r})",
                                 "give Cell Ranger's matrix.mtx[.gz] (sparse coordinate format)")
            field, symmetry = t[3], t[4]
            if field not in _FIELDS or symmetry != "general":
                raise InputError(path, f"has an unsupported MatrixMarket type {field} {symmetry}",
                                 "export a 'coordinate integer general' matrix")
            n = 1
            line = fh.readline()
            while line.startswith("%") or not line.strip():
                if not line:
                    raise InputError(path, "ends before its size line", "the file is truncated; re-export it")
                n += 1
                line = fh.readline()
            n += 1
            try:
                rows, cols, entries = (int(v) for v in line.split()[:3])
            except ValueError:
                raise InputError(path, f"has a malformed size line {line.strip()[:60]!r}",
                                 "the file is corrupt; re-export it") from None
    except (*GZIP_ERRORS, UnicodeDecodeError) as exc:
        raise InputError(path, f"is truncated or corrupt ({exc})",
                         "re-download or re-export it (`gzip -t` checks a .gz file)") from exc
    return rows, cols, entries, field, n


def _parse_piece(text: bytes, piece: int, field: str, rows: int, cols: int, cell_col: int, n_cells: int,
                 chunk_rows: int, workdir: str, round_counts: bool, source: str):
    """Worker task: parse a run of whole MatrixMarket lines, check them, bucket them by cell."""
    ncol = 2 if field == "pattern" else 3
    arr = None
    if field in ("integer", "unsigned-integer", "pattern"):
        # Fast path (about 3x pandas): whole lines of integers only. Anything else, such as
        # a comment, a decimal point or a short line, falls through to pandas, which
        # reports it.
        try:
            arr = np.fromstring(text, dtype=np.int64, sep=" ")
            if arr.size != text.count(b"\n") * ncol:
                arr = None
        except ValueError:
            arr = None
    if arr is not None:
        arr = arr.reshape(-1, ncol)
        r, c = arr[:, 0], arr[:, 1]
        v = arr[:, 2] if ncol == 3 else None
    else:
        names = ["r", "c", "v"][:ncol]
        try:
            df = pd.read_csv(io.BytesIO(text), sep=r"\s+", header=None, names=names, usecols=range(ncol),
                             dtype={"r": np.int64, "c": np.int64, "v": np.float64}, comment="%", engine="c")
        except (pd.errors.ParserError, ValueError) as exc:
            raise InputError(source, f"has a malformed line ({exc})",
                             "the file is corrupt; re-export it") from exc
        r, c = df["r"].to_numpy(), df["c"].to_numpy()
        v = df["v"].to_numpy() if ncol == 3 else None
    n = len(r)
    if v is None:
        v = np.ones(n, dtype=np.uint32)
    else:
        if v.dtype.kind == "f" and np.isnan(v).any():
            raise InputError(source, "has a line with a missing value",
                             "the file is truncated or corrupt; re-export it")
        v = check_counts(v, source, round_counts=round_counts)
    if n and (r.min() < 1 or r.max() > rows or c.min() < 1 or c.max() > cols):
        raise InputError(source, f"has an entry outside its {rows} x {cols} size",
                         "the file is corrupt; re-export it")
    cell = (c if cell_col == 1 else r) - 1
    peak = (r if cell_col == 1 else c) - 1
    return n, (piece, write_piece(workdir, piece, cell, peak, v.astype(np.uint32),
                                        n_cells, chunk_rows))


def plan_10x_mtx(folder: str | Path, *, workdir: str | Path, chunk_rows: int, client,
                 round_counts: bool = False, progress: bool = True) -> BlockPlan:
    """Check a 10x folder and bucket its matrix by cell; return its :class:`BlockPlan`.

    Raises
    ------
    InputError
        On a corrupt or truncated file, counts of barcodes/peaks that do not match the
        matrix size, duplicate barcodes, malformed BED lines, or negative/non-integer counts.
    """
    mtx, peaks_path, barcodes_path = find_10x_mtx(folder)
    barcodes = read_barcodes(barcodes_path)
    var = read_bed(peaks_path)
    rows, cols, entries, field, n_header = read_mtx_header(mtx)
    if rows == len(var) and cols == len(barcodes):
        cell_col = 1  # Cell Ranger's orientation: peaks x cells
    elif rows == len(barcodes) and cols == len(var):
        cell_col = 0
        logger.info("%s is cells x peaks (transposed from Cell Ranger's layout); reading it so", mtx)
    else:
        raise InputError(mtx, f"is {rows} x {cols} but {peaks_path.name} lists {len(var)} peaks and "
                         f"{barcodes_path.name} {len(barcodes)} barcodes",
                         "the three files must come from the same Cell Ranger output folder")
    if entries == 0:
        raise InputError(mtx, "is empty (no non-zero counts)",
                         "check that the right file was given")

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    piece_bytes = int(_config.get("ingest.piece-bytes"))
    layout = (field, rows, cols, cell_col, len(barcodes), chunk_rows, str(workdir), round_counts, str(mtx))
    raw = open(mtx, "rb")
    bar = None
    if progress:
        from ..progress import bar as progress_bar

        bar = progress_bar(total=mtx.stat().st_size, unit="B", unit_scale=True, desc=f"parsing {mtx.name}")
    from distributed import wait

    counts, n_entries, pending = [], 0, []

    def collect(done):
        nonlocal n_entries
        for fut in done:
            n, c = fut.result()  # re-raises a worker's InputError here
            n_entries += n
            counts.append(c)

    try:
        stream = gzip_reader(raw) if is_gzip(mtx) else raw
        for _ in range(n_header):
            stream.readline()
        piece = 0
        max_pending = max(1, len(client.scheduler_info()["workers"])) + 1
        while True:
            text = stream.read(piece_bytes)
            if not text:
                break
            if not text.endswith(b"\n"):
                text += stream.readline()
            # the piece travels inside its task, not as scattered data: when the worker parsing it
            # dies, the scheduler still holds it and runs the task again on another worker
            pending.append(client.submit(_parse_piece, text, piece, *layout, pure=False))
            piece += 1
            if bar is not None:
                bar.update(raw.tell() - bar.n)
            if len(pending) >= max_pending:
                res = wait(pending, return_when="FIRST_COMPLETED")
                collect(res.done)
                pending = list(res.not_done)
        collect(wait(pending).done)
    except GZIP_ERRORS as exc:
        raise InputError(mtx, f"is truncated or corrupt ({type(exc).__name__}: {exc})",
                         "re-download or re-export it (`gzip -t` checks a .gz file)") from exc
    finally:
        client.cancel(pending)
        raw.close()
        if bar is not None:
            bar.close()
    if n_entries != entries:
        raise InputError(mtx, f"holds {n_entries} entries but its header announces {entries}",
                         "the file is truncated or was cut while being written; re-export it")
    # pieces are numbered in file order, but finish in any order: sort counts back by piece
    obs = pd.DataFrame(index=barcodes)
    return BlockPlan(source=Path(folder), obs=obs, var={"X": var},
                     recipes=bucket_recipes(workdir, [c for _, c in sorted(counts, key=lambda t: t[0])],
                                            len(barcodes), chunk_rows, len(var)))

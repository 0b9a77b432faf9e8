"""Every kind of bad input gets an error naming the file, the problem and the fix; the
command exits non-zero and leaves no store, partial store or temporary folder behind."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from click.testing import CliRunner

from scatac_dist.cli import main

from .conftest import leftovers


def write_10x(folder: Path, counts: sp.spmatrix, *, field: str = "integer") -> Path:
    """A Cell Ranger ATAC folder for ``counts`` (cells x peaks)."""
    folder.mkdir(parents=True, exist_ok=True)
    n_cells, n_peaks = counts.shape
    scipy.io.mmwrite(folder / "matrix.mtx", sp.coo_matrix(counts.T), field=field)
    with open(folder / "matrix.mtx", "rb") as src, gzip.open(folder / "matrix.mtx.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (folder / "matrix.mtx").unlink()
    (folder / "barcodes.tsv").write_text("".join(f"AAAC{i:06d}-1\n" for i in range(n_cells)))
    (folder / "peaks.bed").write_text("".join(f"chr1\t{1000 * i}\t{1000 * i + 500}\n" for i in range(n_peaks)))
    return folder


def rewrite_mtx(folder: Path, edit) -> None:
    """Apply ``edit(lines) -> lines`` to matrix.mtx.gz."""
    path = folder / "matrix.mtx.gz"
    lines = gzip.decompress(path.read_bytes()).decode().splitlines(keepends=True)
    path.write_bytes(gzip.compress("".join(edit(lines)).encode()))


@pytest.fixture
def run(cluster, tmp_path):
    """Run the CLI against the test cluster, from tmp_path."""

    def _run(*args):
        return CliRunner().invoke(main, ["--scheduler", cluster.scheduler_address, "--no-progress", *args])

    return _run


def check_refused(result, tmp_path, *phrases, keep=("in",)):
    assert result.exit_code == 2, result.output
    msg = result.output
    assert msg.startswith("error: ") or "\nerror: " in msg
    assert "Fix:" in msg
    for p in phrases:
        assert p in msg, msg
    assert leftovers(tmp_path, set(keep)) == []


def test_valid_input_passes(run, tmp_path, counts):
    """The baseline the bad cases are cut from is itself accepted."""
    folder = write_10x(tmp_path / "in", counts)
    res = run("ingest", str(folder), "-o", str(tmp_path / "out.zarr"))
    assert res.exit_code == 0, res.output
    got = ad.read_zarr(tmp_path / "out.zarr")
    assert (got.X != counts).nnz == 0


def test_truncated_gzip(run, tmp_path, counts):
    folder = write_10x(tmp_path / "in", counts)
    data = (folder / "matrix.mtx.gz").read_bytes()
    (folder / "matrix.mtx.gz").write_bytes(data[: len(data) // 2])
    res = run("ingest", str(folder), "-o", str(tmp_path / "out.zarr"))
    check_refused(res, tmp_path, "matrix.mtx.gz", "truncated or corrupt", "gzip -t")


def test_corrupt_gzip(run, tmp_path, counts):
    folder = write_10x(tmp_path / "in", counts)
    data = bytearray((folder / "matrix.mtx.gz").read_bytes())
    for i in range(30, len(data) - 20, 7):
        data[i] ^= 0xFF
    (folder / "matrix.mtx.gz").write_bytes(bytes(data))
    res = run("ingest", str(folder), "-o", str(tmp_path / "out.zarr"))
    check_refused(res, tmp_path, "matrix.mtx.gz")


def test_mtx_missing_entries(run, tmp_path, counts):
    folder = write_10x(tmp_path / "in", counts)
    rewrite_mtx(folder, lambda lines: lines[:-5])
    res = run("ingest", str(folder), "-o", str(tmp_path / "out.zarr"))
    check_refused(res, tmp_path, "matrix.mtx.gz", f"holds {counts.nnz - 5} entries", "announces")


def test_barcode_count_mismatch(run, tmp_path, counts):
    folder = write_10x(tmp_path / "in", counts)
    lines = (folder / "barcodes.tsv").read_text().splitlines(keepends=True)
    (folder / "barcodes.tsv").write_text("".join(lines[:-1]))
    res = run("ingest", str(folder), "-o", str(tmp_path / "out.zarr"))
    check_refused(res, tmp_path, "matrix.mtx.gz", "59 barcodes", "40 peaks")


def test_peak_count_mismatch(run, tmp_path, counts):
    folder = write_10x(tmp_path / "in", counts)
    lines = (folder / "peaks.bed").read_text().splitlines(keepends=True)
    (folder / "peaks.bed").write_text("".join(lines[:-2]))
    res = run("ingest", str(folder), "-o", str(tmp_path / "out.zarr"))
    check_refused(res, tmp_path, "matrix.mtx.gz", "lists 38 peaks")


def test_duplicate_barcodes(run, tmp_path, counts):
    folder = write_10x(tmp_path / "in", counts)
    lines = (folder / "barcodes.tsv").read_text().splitlines(keepends=True)
    lines[5] = lines[2]
    (folder / "barcodes.tsv").write_text("".join(lines))
    res = run("ingest", str(folder), "-o", str(tmp_path / "out.zarr"))
    check_refused(res, tmp_path, "barcodes.tsv", "more than once", "AAAC000002-1")


@pytest.mark.parametrize("line, phrase", [
    ("chr1\t5000\t5000\n", "start >= end"),
    ("chr1\tfive\t5500\n", "non-numeric"),
    ("chr1\t5000\n", "needs chrom, start and end"),
])
def test_malformed_bed(run, tmp_path, counts, line, phrase):
    folder = write_10x(tmp_path / "in", counts)
    lines = (folder / "peaks.bed").read_text().splitlines(keepends=True)
    lines[7] = line
    (folder / "peaks.bed").write_text("".join(lines))
    res = run("ingest", str(folder), "-o", str(tmp_path / "out.zarr"))
    check_refused(res, tmp_path, "peaks.bed", "line 8", phrase)


def test_negative_counts(run, tmp_path, counts):
    folder = write_10x(tmp_path / "in", counts)

    def edit(lines):
        head = next(i for i, ln in enumerate(lines) if not ln.startswith("%")) + 1
        r, c, _ = lines[head].split()
        lines[head] = f"{r} {c} -3\n"
        return lines

    rewrite_mtx(folder, edit)
    res = run("ingest", str(folder), "-o", str(tmp_path / "out.zarr"))
    check_refused(res, tmp_path, "matrix.mtx.gz", "negative counts")


def test_non_integer_counts_refused_then_rounded(run, tmp_path, counts):
    noisy = counts.copy()
    noisy.data = noisy.data + 0.25
    folder = write_10x(tmp_path / "in", noisy, field="real")
    res = run("ingest", str(folder), "-o", str(tmp_path / "out.zarr"))
    check_refused(res, tmp_path, "matrix.mtx.gz", "non-integer counts", "--round-counts")

    res = run("ingest", str(folder), "-o", str(tmp_path / "out.zarr"), "--round-counts")
    assert res.exit_code == 0, res.output
    got = ad.read_zarr(tmp_path / "out.zarr").X
    assert (got != counts).nnz == 0  # 1.25 -> 1, ..., rounded back to the integers


def test_non_integer_h5ad_refused(run, tmp_path, counts):
    (tmp_path / "in").mkdir()
    var = pd.DataFrame(index=[f"chr2_{100 * i}_{100 * i + 50}" for i in range(counts.shape[1])])
    adata = ad.AnnData(X=(counts * 0.5).astype(np.float32), var=var,
                       obs=pd.DataFrame(index=[f"c{i}" for i in range(counts.shape[0])]))
    adata.write_h5ad(tmp_path / "in" / "norm.h5ad")
    res = run("ingest", str(tmp_path / "in" / "norm.h5ad"), "-o", str(tmp_path / "out.zarr"))
    check_refused(res, tmp_path, "norm.h5ad", "non-integer counts")


def test_empty_matrix(run, tmp_path, counts):
    folder = write_10x(tmp_path / "in", sp.csr_matrix(counts.shape))
    res = run("ingest", str(folder), "-o", str(tmp_path / "out.zarr"))
    check_refused(res, tmp_path, "matrix.mtx.gz", "empty")


def test_truncated_h5(run, tmp_path, client, counts):
    from scatac_dist.io import ingest
    from scatac_dist.io.export import export_10x_h5
    from scatac_dist.store import open_atlas

    folder = write_10x(tmp_path / "src", counts)
    atlas = ingest(folder, tmp_path / "src.zarr", client=client, progress=False)
    (tmp_path / "in").mkdir()
    h5 = export_10x_h5(open_atlas(atlas.path), tmp_path / "in" / "filtered_peak_bc_matrix.h5")
    shutil.rmtree(tmp_path / "src")
    shutil.rmtree(tmp_path / "src.zarr")
    data = h5.read_bytes()
    h5.write_bytes(data[: len(data) * 2 // 3])
    res = run("ingest", str(h5), "-o", str(tmp_path / "out.zarr"))
    check_refused(res, tmp_path, "filtered_peak_bc_matrix.h5", "truncated or corrupt")


def test_labels_from_another_dataset(run, tmp_path, counts):
    folder = write_10x(tmp_path / "in", counts)
    (tmp_path / "in" / "labels.tsv").write_text("barcode\tcelltype\nXYZ-1\tB\nXYZ-2\tT\n")
    res = run("ingest", str(folder), "-o", str(tmp_path / "out.zarr"),
              "--labels", str(tmp_path / "in" / "labels.tsv"))
    check_refused(res, tmp_path, "labels.tsv", "match")


def test_output_exists(run, tmp_path, counts):
    folder = write_10x(tmp_path / "in", counts)
    out = tmp_path / "out.zarr"
    assert run("ingest", str(folder), "-o", str(out)).exit_code == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert len(list(tmp_path.glob("out.zarr.run-*.md"))) == 1  # the ingest's run summary
    res = run("ingest", str(folder), "-o", str(out))
    check_refused(res, tmp_path, "out.zarr", "already exists", "--overwrite", keep=("in", "out.zarr"))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before

    # --overwrite with bad input: the old store survives untouched
    (folder / "peaks.bed").write_text("chr1\t5\t1\n")
    res = run("ingest", str(folder), "-o", str(out), "--overwrite")
    check_refused(res, tmp_path, "peaks.bed", keep=("in", "out.zarr"))
    assert (ad.read_zarr(out).X != counts).nnz == 0


def test_unreachable_scheduler(tmp_path, counts):
    import socket

    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = write_10x(tmp_path / "in", counts)
    res = CliRunner().invoke(main, ["--scheduler", f"tcp://127.0.0.1:{port}", "ingest", str(folder),
                                    "-o", str(tmp_path / "out.zarr")])
    check_refused(res, tmp_path, f"tcp://127.0.0.1:{port}", "dask scheduler")

"""The bad-input corpus: every case is one way a user's input or situation goes wrong.

Each case builds its input in a fresh folder and names the command to run; the test checks
what every case must give (issue 23, GUIDE invariant 6): exit status 2, exactly one
``error:`` line naming the file, the problem and the fix (``Fix:``), nothing on stdout,
and nothing lost: every file of the store (or the folder) it guards is byte-for-byte as it
was, and no temporary folder is left beside it.

To add a case: write ``case_<name>(ctx) -> Case`` below and add it to ``CASES``. Inputs that
are accepted on purpose (unsorted or overlapping peaks) are tested at the end, with the
warning that says so.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from scatac_dist.cli import main
from scatac_dist.datasets import SynthParams, synthesize
from scatac_dist.lock import lock_path

from .test_validation import write_10x


@dataclass
class Case:
    args: list                        # the command line after the global options
    phrases: list                     # what the error line must say (besides "Fix:")
    guard: Path | None = None         # a store or folder that must come out unchanged
    cleanup: list = field(default_factory=list)  # callables run after the check


@dataclass
class Ctx:
    tmp: Path
    base_store: Path                  # a synthetic store (obs celltype, no results yet)
    counts: sp.csr_matrix
    other_store: Path                 # another synthetic dataset (other seed and size)

    def store(self) -> Path:
        dst = self.tmp / "s.zarr"
        shutil.copytree(self.base_store, dst)
        return dst


def _x_chunk(store: Path) -> Path:
    files = [p for p in sorted((store / "X" / "data").rglob("*"))
             if p.is_file() and p.name != "zarr.json" and not p.name.startswith(".")]
    return files[0]


# -- the store is damaged or not ours -------------------------------------------------------

def case_corrupt_x_chunk(ctx):
    s = ctx.store()
    _x_chunk(s).write_bytes(b"\x00garbage" * 16)
    return Case(["run", s], [str(s), "rows 0-", "cannot be read", "damaged"], guard=s)


def case_missing_x_chunk(ctx):
    s = ctx.store()
    _x_chunk(s).unlink()
    return Case(["run", s], ["X/data", "chunk files are missing", "copy the store again"], guard=s)


def case_store_of_another_tool(ctx):
    s = ctx.tmp / "scanpy.zarr"
    ad.AnnData(np.random.default_rng(0).random((20, 10), dtype=np.float32)).write_zarr(s)
    return Case(["run", s], [str(s), "dense array", "not the CSR counts", "scatac-dist ingest"], guard=s)


# -- keys and modalities ------------------------------------------------------------------------

def case_labels_key_missing(ctx):
    s = ctx.store()
    return Case(["scembed", "train", s, "--labels", "cell_type"], [str(s), "no column 'cell_type'", "celltype"],
                guard=s)


def case_truth_key_renamed(ctx):
    s = ctx.store()
    return Case(["evaluate", s, "--truth", "CellType", "--pred", "celltype"],
                [str(s), "no obs column 'CellType'", "celltype"], guard=s)


def _mudata(ctx) -> Path:
    import mudata

    rng = np.random.default_rng(1)
    rna = ad.AnnData(sp.csr_matrix(rng.poisson(0.5, (40, 25)).astype(np.uint8)),
                     var=pd.DataFrame(index=[f"Gene{i}" for i in range(25)]))
    peaks = pd.DataFrame({"chr": ["chr1"] * 30, "start": np.arange(30) * 1000, "end": np.arange(30) * 1000 + 500},
                         index=[f"chr1:{i * 1000}-{i * 1000 + 500}" for i in range(30)])
    atac = ad.AnnData(sp.csr_matrix(rng.poisson(0.5, (40, 30)).astype(np.uint8)), var=peaks)
    mudata.set_options(pull_on_update=False)
    path = ctx.tmp / "joint.zarr"
    mudata.MuData({"rna": rna, "atac": atac}).write_zarr(str(path))
    return path


def case_mudata_modality_missing(ctx):
    s = _mudata(ctx)
    return Case(["run", s, "--mod", "protein"], [str(s), "no modality 'protein'", "rna"], guard=s)


def case_mudata_wrong_modality(ctx):
    s = _mudata(ctx)  # scEmbed needs peaks with coordinates; the RNA modality has genes
    return Case(["scembed", "train", s, "--mod", "rna"], [str(s), "Gene0", "coordinates"], guard=s)


def case_mod_of_an_anndata_store(ctx):
    s = ctx.store()
    return Case(["run", s, "--mod", "atac"], [str(s), "AnnData store, not MuData", "omit"], guard=s)


# -- one writer per store -------------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys
    from scatac_dist.lock import store_lock
    with store_lock(sys.argv[1], command="scatac-dist run (the first one)"):
        print("held", flush=True)
        sys.stdin.read()
""")


def case_second_writer(ctx):
    s = ctx.store()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"

    def release():
        holder.stdin.close()
        holder.wait(timeout=30)

    return Case(["run", s], [str(s), "another scatac-dist writes", f"process {holder.pid}", "(the first one)",
                             "wait for it"], guard=s, cleanup=[release])


def case_lock_left_on_another_host(ctx):
    s = ctx.store()
    lock_path(s).write_text(json.dumps({"host": "gpu-node-3", "pid": 99, "started": "2026-12-01T10:00:00",
                                        "command": "scatac-dist scale"}))
    return Case(["run", s], [str(s), "gpu-node-3", "cannot be checked", f"delete {lock_path(s)}"], guard=s)


# -- run.yaml -------------------------------------------------------------------------------------

def _config(ctx, text):
    p = ctx.tmp / "run.yaml"
    p.write_text(text)
    return p


def case_config_unknown_stage(ctx):
    s, cfg = ctx.store(), _config(ctx, "cluster: {resolution: 2}\n")
    return Case(["run", s, "--config", cfg], [str(cfg), "unknown stage(s) ['cluster']", "leiden"], guard=s)


def case_config_wrong_type(ctx):
    s, cfg = ctx.store(), _config(ctx, "lsi: {n_comps: fifty}\n")
    return Case(["run", s, "--config", cfg], [str(cfg), "n_comps must be a int", "'fifty'"], guard=s)


def case_config_stage_not_a_mapping(ctx):
    s, cfg = ctx.store(), _config(ctx, "lsi: 50\n")
    return Case(["run", s, "--config", cfg], [str(cfg), "['lsi'] must map parameter names"], guard=s)


def case_config_not_yaml(ctx):
    s, cfg = ctx.store(), _config(ctx, "lsi: {n_comps: [50\n")
    return Case(["run", s, "--config", cfg], [str(cfg), "while parsing"], guard=s)


# -- where results go -------------------------------------------------------------------------

def _tmpfs(path: Path, size: str, *, readonly=False):
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:  # only root in a container that allows mounts can do this
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); this case needs root with mount rights")
    return lambda: subprocess.run(["umount", "-l", str(path)], check=True)


def case_unwritable_output_folder(ctx):
    folder = write_10x(ctx.tmp / "in", ctx.counts)
    ro = ctx.tmp / "readonly"
    umount = _tmpfs(ro, "1m", readonly=True)
    return Case(["ingest", folder, "-o", ro / "atlas.zarr"], [str(ro), "Read-only file system", "folder you can"],
                guard=folder, cleanup=[umount])


def case_disk_full_while_publishing(ctx):
    import os

    disk = ctx.tmp / "small-disk"
    umount = _tmpfs(disk, "16m")
    s = disk / "s.zarr"
    shutil.copytree(ctx.base_store, s)
    ballast = disk / "ballast"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    ballast.write_bytes(b"\0" * max(free - 24 * 1024, 0))  # leave 24 KiB: less than one working copy
    return Case(["run", s], [str(s), "No space left on device", "the store is unchanged", "free space"],
                guard=s, cleanup=[umount])


# -- parameters that cannot hold ------------------------------------------------------------------

def case_cuda_without_a_gpu(ctx):
    s = ctx.store()
    return Case(["scale", s, "--device", "cuda"], ["--device cuda", "no CUDA device", "--device cpu"], guard=s)


def case_checkpoint_of_another_dataset(ctx):
    from scatac_dist.models import SCALE
    from scatac_dist.store import open_atlas

    ck = ctx.tmp / "checkpoints"
    SCALE(n_clusters=3, max_iter=4, checkpoint_dir=str(ck), checkpoint_every=2, min_cells=1, min_reads=1,
          progress=False).fit(open_atlas(ctx.other_store), outputs=False)
    s = ctx.store()
    return Case(["scale", s, "--n-clusters", "3", "--max-iter", "8", "--checkpoint-dir", ck, "--resume", "auto"],
                [str(ck), "checkpoint of another run", "data: "], guard=s)


def case_more_clusters_than_cells(ctx):
    s = ctx.store()
    return Case(["run", s, "--n-clusters", "601"], [str(s), "--n-clusters 601", "600 cells"], guard=s)


def case_scale_more_clusters_than_cells(ctx):
    s = ctx.store()
    return Case(["scale", s, "--n-clusters", "601"], ["601", "600"], guard=s)


# -- ingest inputs ----------------------------------------------------------------------------------

def case_labels_with_duplicate_barcodes(ctx):
    folder = write_10x(ctx.tmp / "in", ctx.counts)
    (folder / "labels.tsv").write_text("barcode\tcelltype\nAAAC000000-1\tB\nAAAC000001-1\tT\nAAAC000000-1\tNK\n")
    return Case(["ingest", folder, "-o", ctx.tmp / "out.zarr", "--labels", folder / "labels.tsv"],
                ["labels.tsv", "AAAC000000-1 more than once", "one row per barcode"], guard=folder)


def case_h5ad_dense_non_integer(ctx):
    folder = ctx.tmp / "in"
    folder.mkdir()
    X = ctx.counts.toarray().astype(np.float32) * 0.5  # dense, normalised: not counts
    var = pd.DataFrame(index=[f"chr3:{100 * i}-{100 * i + 50}" for i in range(X.shape[1])])
    ad.AnnData(X, var=var, obs=pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])])).write_h5ad(folder / "n.h5ad")
    return Case(["ingest", folder / "n.h5ad", "-o", ctx.tmp / "out.zarr"], ["n.h5ad", "non-integer counts"],
                guard=folder)


CASES = [
    case_corrupt_x_chunk, case_missing_x_chunk, case_store_of_another_tool,
    case_labels_key_missing, case_truth_key_renamed,
    case_mudata_modality_missing, case_mudata_wrong_modality, case_mod_of_an_anndata_store,
    case_second_writer, case_lock_left_on_another_host,
    case_config_unknown_stage, case_config_wrong_type, case_config_stage_not_a_mapping, case_config_not_yaml,
    case_unwritable_output_folder, case_disk_full_while_publishing,
    pytest.param(case_cuda_without_a_gpu, marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="a GPU is visible: --device cuda is valid here")),
    case_checkpoint_of_another_dataset, case_more_clusters_than_cells, case_scale_more_clusters_than_cells,
    case_labels_with_duplicate_barcodes, case_h5ad_dense_non_integer,
]


@pytest.fixture(scope="module")
def base_store(tmp_path_factory, client):
    out = tmp_path_factory.mktemp("corpus") / "base.zarr"
    synthesize(out, SynthParams(n_cells=600, n_peaks=500, n_clusters=3, n_lineages=1, seed=2),
               chunk_rows=200, client=client, progress=False)
    return out


@pytest.fixture(scope="module")
def other_store(tmp_path_factory, client):
    out = tmp_path_factory.mktemp("corpus-other") / "other.zarr"
    synthesize(out, SynthParams(n_cells=300, n_peaks=500, n_clusters=3, n_lineages=1, seed=9),
               chunk_rows=100, client=client, progress=False)
    return out


def _snapshot(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: hashlib.sha1(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("make", CASES, ids=lambda f: f.__name__.removeprefix("case_"))
def test_bad_input_gets_one_clear_error_and_loses_nothing(make, cluster, base_store, other_store, tmp_path,
                                                          counts):
    case = make(Ctx(tmp_path, base_store, counts, other_store))
    try:
        before = _snapshot(case.guard) if case.guard else None
        beside = sorted(p.name for p in case.guard.parent.iterdir()) if case.guard else None
        r = CliRunner().invoke(main, ["--scheduler", cluster.scheduler_address, "--no-progress",
                                      *map(str, case.args)])
        assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, r.stderr
        assert r.stdout == ""
        line = errors[0]
        for phrase in [*case.phrases, "Fix:"]:
            assert phrase in line, f"{phrase!r} not in: {line}"
        if case.guard:
            assert _snapshot(case.guard) == before, "the input or store was changed"
            assert sorted(p.name for p in case.guard.parent.iterdir()) == beside, "something was left beside it"
    finally:
        for undo in case.cleanup:
            undo()


# -- accepted on purpose ------------------------------------------------------------------------

@pytest.mark.parametrize("order, warning", [
    ([3, 0, 1, 2], "not sorted by chromosome and start"),
    ("overlap", "overlap the previous one"),
])
def test_unsorted_or_overlapping_peaks_are_accepted_with_a_warning(order, warning, client, tmp_path, counts, caplog):
    """Peaks are the matrix's columns: kept in file order and as given (docs/architecture.md)."""
    from scatac_dist.io import ingest

    folder = write_10x(tmp_path / "in", counts)
    n = counts.shape[1]
    if order == "overlap":
        lines = [f"chr1\t{300 * i}\t{300 * i + 500}\n" for i in range(n)]  # each overlaps the next
    else:
        starts = [1000 * i for i in range(n)]
        starts[:4] = [starts[j] for j in order]
        lines = [f"chr1\t{s}\t{s + 500}\n" for s in starts]
    (folder / "peaks.bed").write_text("".join(lines))
    with caplog.at_level("WARNING", logger="scatac_dist"):
        atlas = ingest(folder, tmp_path / "out.zarr", client=client, progress=False)
    assert warning in caplog.text
    got = ad.read_zarr(atlas.path)
    assert list(got.var["start"]) == [int(line.split("\t")[1]) for line in lines]  # file order kept
    assert (got.X != counts).nnz == 0

"""Commands that make or describe a store: ``ingest``, ``info``, ``synth``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .. import _config
from .context import Session, bars_on_stderr, command, pass_session
from .defaults import option_from
from .describe import describe

__all__ = ["ingest", "info", "synth", "synth_options", "synth_params"]

#: where an unset --chunk-rows comes from (the user's Dask configuration can change it)
CHUNK_ROWS_HELP = f"Cells per row chunk (default: {_config.get('store.chunk-rows')}, the store.chunk-rows setting)."

ingest_option = option_from("scatac_dist.io:ingest")


@command("ingest")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="The atlas store to create (a .zarr folder).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False),
              help="TSV of per-cell metadata, joined on its barcode (or first) column.")
@ingest_option("--format", "fmt", param="format", type=click.Choice(["auto", "10x-mtx", "10x-h5", "h5ad"]))
@click.option("--chunk-rows", type=int, help=CHUNK_ROWS_HELP)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (only once the new store is complete).")
@click.option("--round-counts", is_flag=True, help="Round non-integer counts instead of refusing them.")
@ingest_option("--join", type=click.Choice(["exact", "inner", "outer"]), help="How to combine inputs whose peaks differ.")
@click.option("--batch-names", help="Comma-separated batch names, one per input (default: from paths).")
@click.option("--layer", help="For .h5ad input: read this layer instead of X.")
@pass_session
def ingest(session: Session, inputs, out, labels, fmt, chunk_rows, overwrite, round_counts, join, batch_names,
           layer):
    """Turn 10x folders, 10x .h5 or .h5ad files into one chunked zarr atlas.

    Several INPUTS are stacked into one atlas with a 'batch' column in obs.
    """
    from ..io import ingest as ingest_inputs

    client = session.client()
    with bars_on_stderr():
        atlas = ingest_inputs(list(inputs), out, format=fmt, labels=labels, chunk_rows=chunk_rows,
                              overwrite=overwrite, round_counts=round_counts, join=join,
                              batch_names=batch_names.split(",") if batch_names else None, layer=layer,
                              client=client, progress=session.progress)
    session.summarise(atlas.path)
    click.echo(f"wrote {atlas.path}")
    click.echo(describe(atlas.path))


@command("info")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the provenance as JSON.")
def info(store, as_json):
    """Describe an atlas store: shape, chunks, slots and the stages that wrote it."""
    from ..store import open_atlas

    if as_json:
        click.echo(json.dumps(open_atlas(store).provenance(), indent=2))
    else:
        click.echo(describe(store))


SYNTH_KEYS = ("n_cells", "n_peaks", "n_clusters", "fragments", "signal", "n_batches", "batch_effect", "seed",
              "n_genes")


def synth_options(preset: str = "scatac_dist.datasets:SynthParams") -> Callable[[Callable], Callable]:
    """The synthetic atlas's options (``synth``, ``demo``), with defaults from ``preset``: the
    ``SynthParams`` class or an instance of it (``"scatac_dist.demo:DEMO_ATLAS"``)."""
    option = option_from(preset)

    def decorate(f: Callable) -> Callable:
        for opt in reversed([
            option("--cells", "n_cells", type=int),
            option("--peaks", "n_peaks", type=int),
            option("--clusters", "n_clusters", type=int),
            option("--fragments", type=float, help="Median fragments per cell."),
            option("--signal", type=float, help="Share of a cell's fragments in its type's specific peaks."),
            option("--batches", "n_batches", type=int),
            option("--batch-effect", type=float),
            option("--seed", type=int),
            option("--genes", "n_genes", type=int,
                   help="Also generate gene counts for the same cells (a joint RNA + ATAC MuData store); 0: ATAC only."),
            click.option("--chunk-rows", type=int, help=CHUNK_ROWS_HELP),
        ]):
            f = opt(f)
        return f

    return decorate


def synth_params(kw: dict[str, Any], preset: Any = None):
    """``preset`` (default ``SynthParams()``) with the values of :func:`synth_options`."""
    from ..datasets import SynthParams

    return dataclasses.replace(preset if preset is not None else SynthParams(), **{k: kw[k] for k in SYNTH_KEYS})


#: the options of the plain generator that ``--like`` replaces with what it learned
LIKE_IGNORES = ("n_clusters", "fragments", "signal", "n_batches", "batch_effect", "n_genes")


@command("synth", user_errors=(ValueError,))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path))
@synth_options()
@click.option("--like", help="Generate cells like a reference: a preset (mouse: SNARE-seq MOp ATAC, mm10; "
              "human: bm0828 bone marrow, hg19), a parameter file (.npz) or a labelled store to learn from. "
              "--peaks defaults to the reference's peaks.")
@click.option("--label-key", help="With --like STORE: the cell-type column (default: celltype, cell_type, cluster "
              "or label).")
@click.option("--exclude-label", multiple=True, help="With --like STORE: a label to leave out (repeatable).")
@click.option("--save-params", type=click.Path(path_type=Path),
              help="With --like STORE: also write the learned parameters here (.npz), to reuse with --like FILE.")
@click.option("--overwrite", is_flag=True)
@pass_session
def synth(session: Session, out, overwrite, chunk_rows, like, label_key, exclude_label, save_params, **kw):
    """Generate a synthetic labelled atlas straight into a store."""
    ctx = click.get_current_context()
    given = {k for k in kw if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    if like is None:
        if label_key or exclude_label or save_params:
            raise click.UsageError("--label-key, --exclude-label and --save-params go with --like STORE")
        from ..datasets import synthesize

        params = synth_params(kw)
        client = session.client()
        with bars_on_stderr():
            atlas = synthesize(out, params, chunk_rows=chunk_rows, overwrite=overwrite, client=client,
                               progress=session.progress)
    else:
        from ..calibrated import learn_like, load_like

        clash = sorted(given & set(LIKE_IGNORES))
        if clash:
            raise click.UsageError(f"--like learns what {', '.join('--' + k.replace('n_', '') for k in clash)} "
                                   "would set; drop them (only --cells, --peaks, --seed and --chunk-rows apply)")
        if Path(like).is_dir():
            params = learn_like(like, label_key, exclude=tuple(exclude_label))
        elif label_key or exclude_label:
            raise click.UsageError("--label-key and --exclude-label apply when --like names a store to learn from")
        else:
            params = load_like(like)
        if save_params:
            click.echo(f"wrote the learned parameters to {params.save(save_params)}")
        from ..datasets import synthesize_like

        client = session.client()
        with bars_on_stderr():
            atlas = synthesize_like(out, params, n_cells=kw["n_cells"],
                                    n_peaks=kw["n_peaks"] if "n_peaks" in given else None, seed=kw["seed"],
                                    chunk_rows=chunk_rows, overwrite=overwrite, client=client,
                                    progress=session.progress)
    session.summarise(atlas.path)
    click.echo(f"wrote {atlas.path}")
    click.echo(describe(atlas.path))

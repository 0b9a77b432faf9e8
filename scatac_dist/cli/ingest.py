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


@command("synth", user_errors=(ValueError,))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path))
@synth_options()
@click.option("--overwrite", is_flag=True)
@pass_session
def synth(session: Session, out, overwrite, chunk_rows, **kw):
    """Generate a synthetic labelled atlas straight into a store."""
    from ..datasets import synthesize

    params = synth_params(kw)
    client = session.client()
    with bars_on_stderr():
        atlas = synthesize(out, params, chunk_rows=chunk_rows, overwrite=overwrite, client=client,
                           progress=session.progress)
    session.summarise(atlas.path)
    click.echo(f"wrote {atlas.path}")
    click.echo(describe(atlas.path))

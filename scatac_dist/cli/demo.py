"""``demo``: :func:`scatac_dist.demo.run_demo` on the session's cluster, then what to open."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .context import Session, bars_on_stderr, command, pass_session
from .defaults import option_from
from .describe import describe
from .ingest import synth_options, synth_params

__all__ = ["demo"]

DEMO = "scatac_dist.demo"


@command("demo", user_errors=(ValueError,))
@option_from(f"{DEMO}:run_demo")("--outdir", type=click.Path(path_type=Path),
                                  help="Where the store, report, plots and summary go.")
@synth_options(f"{DEMO}:DEMO_ATLAS")
@click.option("--force", is_flag=True, help="Regenerate the atlas and re-run every stage.")
@pass_session
def demo(session: Session, outdir: Path, force: bool, chunk_rows, **kw):
    """Generate a labelled atlas and run the default pipeline and scCASE on it, with plots,
    scores against the true cell types, a summary and Dask's performance report."""
    from ..demo import DEMO_ATLAS, run_demo

    if session.report is None:
        session.report = str(outdir / "dask-report.html")
    params = synth_params(kw, DEMO_ATLAS)
    client = session.client()
    with bars_on_stderr():
        res = run_demo(outdir, params=params, force=force, chunk_rows=chunk_rows, client=client,
                       progress=session.progress)
    files = {k: Path(v) for k, v in res.files.items()}
    store = files.get("store", Path(outdir) / "atlas.zarr")
    if "generate atlas" in res.reused:
        click.echo(f"{store} already holds this synthetic atlas; reusing it")
    click.echo(describe(store))
    steps = {name: {"skipped": name in res.reused, "seconds": sec} for name, sec in res.seconds.items()}
    click.echo(f"stages: {json.dumps(steps)}")
    click.echo(f"scores: {json.dumps(res.scores)}")
    click.echo(f"store:              {store.absolute()}")
    click.echo(f"performance report: {Path(session.report).absolute()} (written on exit)")
    plots = [p for p in files.values() if p.suffix == ".png"]
    click.echo(f"plots:              {', '.join(str(p.absolute()) for p in plots)}")
    for name in ("summary", "scores"):
        if name in files:
            click.echo(f"{name + ':':<20}{files[name].absolute()}")

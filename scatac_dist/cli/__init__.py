"""The ``scatac-dist`` command line. Commands are thin: they call the public functions.

Global options choose where work runs (``--scheduler`` or an embedded local cluster shaped
by ``--workers``/``--memory-limit``), whether a Dask performance report is written and
whether progress bars are drawn. Errors about input are printed as one line
(``error: FILE: problem. Fix: ...``) with exit status 2.

Layout: :mod:`.context` (the session, the one error handler, the progress policy),
:mod:`.defaults` (option defaults read from the models), one module per command group:
:mod:`.ingest` (ingest, info, synth), :mod:`.demo`, :mod:`.analysis` (run, plot, evaluate),
:mod:`.sccase`, :mod:`.scale`, :mod:`.scembed` (train, encode, annotate).
"""

from __future__ import annotations

import logging

import click

from . import analysis, demo, ingest, scale, sccase, scembed
from .context import Group, Session, show_progress

__all__ = ["main"]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--scheduler", metavar="tcp://HOST:PORT", envvar="SCATAC_DIST_SCHEDULER",
              help="Run on an existing Dask scheduler instead of an embedded local cluster.")
@click.option("--workers", type=int, help="Local cluster: worker processes (default: cores, max 8).")
@click.option("--threads-per-worker", type=int, help="Local cluster: threads per worker (default 1).")
@click.option("--memory-limit", metavar="SIZE", help="Local cluster: memory per worker, e.g. 4GiB.")
@click.option("--performance-report", type=click.Path(dir_okay=False),
              help="Write Dask's HTML performance report of the run to this file.")
@click.option("--progress/--no-progress", default=None,
              help="Draw progress bars on stderr, or not (default: only when stderr is a terminal).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for Dask's own).")
@click.version_option(package_name="scatac-dist")
@click.pass_context
def main(ctx: click.Context, scheduler, workers, threads_per_worker, memory_limit, performance_report, progress,
         verbose):
    """scatac-dist: atlas-scale single-cell ATAC-seq analysis on Dask."""
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s", level=logging.WARNING)
    logging.getLogger("scatac_dist").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    if verbose < 2:
        for name in ("distributed", "bokeh", "tornado"):
            logging.getLogger(name).setLevel(logging.ERROR)
    ctx.obj = Session(scheduler=scheduler, workers=workers, threads=threads_per_worker, memory_limit=memory_limit,
                      report=performance_report, progress=show_progress(progress))
    ctx.call_on_close(ctx.obj.close)


for _cmd in (ingest.ingest, ingest.info, ingest.synth, demo.demo, analysis.run, analysis.plot,
             analysis.evaluate, sccase.sccase, scale.scale, scembed.scembed):
    main.add_command(_cmd)
del _cmd


if __name__ == "__main__":  # pragma: no cover
    main()

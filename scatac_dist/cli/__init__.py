"""The ``scatac-dist`` command line. Commands are thin: they call the public functions.

Global options choose where work runs (``--scheduler`` or an embedded local cluster shaped
by ``--workers``/``--memory-limit``), whether a Dask performance report is written and
whether progress bars are drawn. Errors about input are printed as one line
(``error: FILE: problem. Fix: ...``) with exit status 2.

Layout: :mod:`.context` (the session, the one error handler, the progress policy),
:mod:`.defaults` (option defaults read from the models), one module per command group:
:mod:`.ingest` (ingest, info, synth), :mod:`.demo`, :mod:`.analysis` (run, plot, evaluate),
:mod:`.sccase`, :mod:`.scale`, :mod:`.scmvp`, :mod:`.scembed` (train, encode, annotate), :mod:`.batch` (job-script),
:mod:`.deploy` (deploy k8s).
"""

from __future__ import annotations

import logging
import signal
import threading

import click

from . import analysis, batch, demo, deploy, ingest, scale, sccase, scembed, scmvp
from .context import Group, Session, show_progress

__all__ = ["main"]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--cluster", "cluster_type", type=click.Choice(["local", "slurm", "pbs", "k8s"], case_sensitive=False),
              envvar="SCATAC_DIST_CLUSTER", help="Where workers run: an embedded local cluster (default), "
              "Dask workers submitted as SLURM or PBS jobs (settings: scatac-dist.cluster.jobqueue), or worker "
              "pods on Kubernetes (scatac-dist.cluster.kubernetes). With DASK_SCHEDULER_ADDRESS set (a DaskJob's "
              "pod) and no --cluster, that scheduler is used.")
@click.option("--scheduler", metavar="tcp://HOST:PORT", envvar="SCATAC_DIST_SCHEDULER",
              help="Run on an existing Dask scheduler (tls://HOST:PORT for TLS).")
@click.option("--workers", type=int, help="Local cluster: worker processes (default: cores, max 8); k8s: "
              "worker pods (default 2).")
@click.option("--threads-per-worker", type=int, help="Local cluster: threads per worker (default 1).")
@click.option("--memory-limit", metavar="SIZE", help="Local cluster: memory per worker, e.g. 4GiB.")
@click.option("--threads-only/--processes", "threads_only", default=None,
              help="Local cluster: workers as threads of this one process (least memory on one machine), or as "
              "processes (default: scatac-dist.cluster.processes, true).")
@click.option("--jobs", type=int, help="SLURM/PBS: number of worker jobs (default 2).")
@click.option("--adapt", metavar="MIN:MAX", help="SLURM/PBS/k8s: scale between MIN and MAX worker jobs (pods) with "
              "the load.")
@click.option("--queue", help="SLURM partition / PBS queue of the worker jobs.")
@click.option("--account", help="SLURM/PBS account the worker jobs are charged to.")
@click.option("--walltime", metavar="HH:MM:SS", help="SLURM/PBS: time limit of each worker job (default 01:00:00).")
@click.option("--job-cores", type=int, help="SLURM/PBS: cores per worker job (one worker process each).")
@click.option("--job-memory", metavar="SIZE", help="SLURM/PBS: memory per worker job, e.g. 16GiB.")
@click.option("--image", metavar="REGISTRY/NAME:TAG", help="k8s: the scatac-dist image of the worker pods.")
@click.option("--namespace", help="k8s: namespace of the worker pods (default: the kube config's).")
@click.option("--tls-ca-file", type=click.Path(dir_okay=False), help="TLS: the CA certificate (PEM).")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="TLS: this client's certificate (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="TLS: this client's key, if not in --tls-cert.")
@click.option("--performance-report", type=click.Path(dir_okay=False),
              help="Write Dask's HTML performance report of the run to this file.")
@click.option("--performance-report-dir", type=click.Path(file_okay=False),
              help="Write one Dask performance report per stage into this folder.")
@click.option("--progress/--no-progress", default=None,
              help="Draw progress bars on stderr, or not (default: only when stderr is a terminal).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for Dask's own).")
@click.version_option(package_name="scatac-dist")
@click.pass_context
def main(ctx: click.Context, cluster_type, scheduler, workers, threads_per_worker, memory_limit, threads_only, jobs, adapt, queue,
         account, walltime, job_cores, job_memory, image, namespace, tls_ca_file, tls_cert, tls_key, performance_report,
         performance_report_dir, progress, verbose):
    """scatac-dist: atlas-scale single-cell ATAC-seq analysis on Dask."""
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s", level=logging.WARNING)
    logging.getLogger("scatac_dist").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    if verbose < 2:
        for name in ("distributed", "bokeh", "tornado", "dask_jobqueue"):
            logging.getLogger(name).setLevel(logging.ERROR)
    # a batch system ends a job with SIGTERM (scancel, walltime, pre-emption): handle it as
    # Ctrl-C, so that the worker jobs are cancelled and the store lock released on the way out
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    job_options = {"queue": queue, "account": account, "walltime": walltime, "cores": job_cores,
                   "memory": job_memory, "image": image, "namespace": namespace}
    ctx.obj = Session(scheduler=scheduler, cluster_type=cluster_type, workers=workers, threads=threads_per_worker,
                      memory_limit=memory_limit, processes=None if threads_only is None else not threads_only, jobs=jobs, adapt=adapt, job_options=job_options,
                      tls={"ca_file": tls_ca_file, "cert": tls_cert, "key": tls_key}, report=performance_report,
                      report_dir=performance_report_dir, progress=show_progress(progress))
    ctx.call_on_close(ctx.obj.close)


for _cmd in (ingest.ingest, ingest.info, ingest.synth, demo.demo, analysis.run, analysis.plot,
             analysis.evaluate, sccase.sccase, scale.scale, scmvp.scmvp, scembed.scembed, batch.job_script, deploy.deploy):
    main.add_command(_cmd)
del _cmd


if __name__ == "__main__":  # pragma: no cover
    main()

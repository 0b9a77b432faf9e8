"""``scatac-dist job-script``: the batch script of one worker job, for checking a site's
settings before anything is submitted."""

from __future__ import annotations

import click

from .context import Session, command, pass_session

__all__ = ["job_script"]


@command("job-script")
@pass_session
def job_script(session: Session):
    """Print the script each worker job of --cluster slurm|pbs would be submitted with (its
    #SBATCH/#PBS directives and the `dask worker` command line). Nothing is submitted."""
    from ..cluster.jobqueue import JobSpec, parse_adapt
    from ..cluster.jobqueue import job_script as script
    from ..cluster.security import tls_security
    from ..errors import ClusterError

    kind = (session.cluster_type or "").lower()
    if kind not in ("slurm", "pbs"):
        raise ClusterError("job-script shows the worker job of a batch cluster. Fix: add --cluster slurm or "
                           "--cluster pbs before the command, e.g. `scatac-dist --cluster slurm job-script`.")
    security = tls_security(session.tls.get("ca_file"), session.tls.get("cert"), session.tls.get("key"))
    click.echo(script(JobSpec(kind, **session.job_options), adapt=parse_adapt(session.adapt), security=security))

"""What every command shares: the session the global options describe, the one error
handler, and the one progress-bar policy.

Errors
    A command fails for a reason the user can fix with one line on stderr,
    ``error: FILE: problem. Fix: ...``, and exit status 2 (:class:`CommandError`). Every
    :class:`~scatac_dist.errors.ScatacError` becomes one, in any command; a command also lists
    the exceptions of the library it calls that mean "bad input or parameters" (``user_errors=``
    of :func:`command`, e.g. a model's ``ValueError``). Anything else is a bug and keeps its
    traceback. Click's own usage errors (unknown option, bad choice) stay Click's (also status 2).

Progress
    Bars are shown when ``--progress`` is given, hidden with ``--no-progress``, and otherwise
    shown only when stderr is a terminal (a batch log gets none). The choice is passed as
    ``progress=`` to every library call that takes it; the bars are drawn in the package's one
    style (:mod:`scatac_dist.progress`) on stderr: stdout holds only a command's result (JSON,
    a path), so ``scatac-dist evaluate ... | jq`` works.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

import click

from ..errors import ScatacError

__all__ = ["CommandError", "Command", "Group", "command", "Session", "pass_session", "show_progress",
           "bars_on_stderr"]


# -- errors -----------------------------------------------------------------------------------

class CommandError(click.ClickException):
    """A failure the user can fix: printed as one ``error: ...`` line, exit status 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(part.strip() for part in str(message).splitlines() if part.strip()))

    def show(self, file: TextIO | None = None) -> None:
        click.echo(f"error: {self.format_message()}", file=file, err=file is None)


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and len(exc.args) == 1:  # str(KeyError) adds quotes
        return str(exc.args[0])
    return str(exc) or type(exc).__name__


class Command(click.Command):
    """A command whose expected failures go through :class:`CommandError` (the one handler).

    Parameters
    ----------
    user_errors
        Exception types, besides :class:`~scatac_dist.errors.ScatacError`, that the library
        this command calls raises for bad input or parameters.
    """

    def __init__(self, *args: Any, user_errors: Sequence[type[BaseException]] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.user_errors = (ScatacError, *user_errors)

    def invoke(self, ctx: click.Context) -> Any:
        session = ctx.find_object(Session)
        if session is not None:
            session.command = ctx.info_name
        try:
            result = super().invoke(ctx)
        except click.ClickException:
            _failed(session, "refused")
            raise
        except self.user_errors as exc:
            _failed(session, "refused")
            raise CommandError(_message(exc)) from exc
        except KeyboardInterrupt:
            _failed(session, "interrupted")
            raise
        except Exception as exc:
            _failed(session, "failed")
            why = session.explain(exc) if session is not None else None
            if why:
                raise CommandError(why) from exc
            raise
        if session is not None:
            session.status = "done"
        return result


def _failed(session: Session | None, status: str) -> None:
    if session is not None:
        session.status = status


class Group(click.Group):
    """A group whose commands (and subgroups' commands) are :class:`Command` s."""

    command_class = Command
    group_class = type  # subgroups are Groups too


def command(name: str | None = None, **attrs: Any):
    """``click.command`` with the shared error handler (``user_errors=`` as in :class:`Command`)."""
    return click.command(name, cls=Command, **attrs)


# -- progress ---------------------------------------------------------------------------------

def show_progress(flag: bool | None, stream: TextIO | None = None) -> bool:
    """Whether to draw progress bars: ``--progress``/``--no-progress`` when given (``flag``),
    else only when ``stream`` (stderr, where bars go) is a terminal."""
    if flag is not None:
        return bool(flag)
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextlib.contextmanager
def bars_on_stderr() -> Iterator[None]:
    """Run library code with stdout sent to stderr, so that anything it prints there (a
    third-party library's progress line or notice) does not mix with the command's result."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# -- the session ------------------------------------------------------------------------------

class Session:
    """What the global options chose, shared by the commands of one invocation.

    The Dask client (with its run log and the performance report around the work) starts on
    first use of :meth:`client` and stops when the invocation ends; SLURM/PBS worker jobs are
    cancelled then, also after an error or Ctrl-C (SIGTERM, as ``scancel`` sends, counts as
    Ctrl-C). The run summary is written beside every store the command wrote
    (``STORE.run-<id>.md``), and into the store (``uns/scatac_dist/run_<id>``) when the command
    succeeded. A failed or interrupted run (a bug, lost workers, Ctrl-C) leaves only the
    Markdown file; a command refused for bad input leaves nothing, store and folder as they were.

    Parameters
    ----------
    scheduler
        Address of an existing scheduler; ``None``: the cluster ``cluster_type`` names.
    cluster_type
        ``local`` (an embedded ``LocalCluster``), ``slurm`` or ``pbs`` (worker jobs).
    workers, threads, memory_limit, processes
        Shape of the embedded cluster (``None``: :func:`scatac_dist.cluster.get_client` decides).
    jobs, adapt, job_options
        SLURM/PBS: number of worker jobs, ``"MIN:MAX"`` adaptive scaling, the jobs' settings.
    tls
        TLS certificate paths (``ca_file``, ``cert``, ``key``).
    report, report_dir
        Path of Dask's HTML performance report of the whole run; a folder for one per stage.
    progress
        Whether to draw progress bars (see :func:`show_progress`).
    """

    def __init__(self, *, scheduler: str | None = None, cluster_type: str | None = None, workers: int | None = None,
                 threads: int | None = None, memory_limit: str | None = None, processes: bool | None = None,
                 jobs: int | None = None,
                 adapt: str | None = None, job_options: dict | None = None, tls: dict | None = None,
                 report: str | None = None, report_dir: str | None = None, progress: bool = False):
        self.scheduler = scheduler
        self.cluster_type = cluster_type
        self.workers = workers
        self.threads = threads
        self.memory_limit = memory_limit
        self.processes = processes
        self.jobs = jobs
        self.adapt = adapt
        self.job_options = job_options or {}
        self.tls = tls or {}
        self.report = report
        self.report_dir = report_dir
        self.progress = progress
        self.command: str | None = None
        self.status = "running"
        self.stores: list = []
        self.stack = ExitStack()
        self._client = None
        self.run_log = None

    def client(self):
        """Start (once) the cluster, the run log and the performance report, and print the
        dashboard link (with the ``ssh -L`` line that reaches a remote one)."""
        if self._client is None:
            from ..cluster import dashboard_hint, get_client, maybe_performance_report
            from ..cluster.monitor import RunLog, set_active

            self._client = get_client(self.scheduler, cluster=self.cluster_type, n_workers=self.workers,
                                      threads_per_worker=self.threads, memory_limit=self.memory_limit,
                                      processes=self.processes,
                                      jobs=self.jobs, adapt=self.adapt, tls=self.tls, **self.job_options)
            self.stack.callback(self._close_client)
            where = self.scheduler or (f"{self.cluster_type} worker jobs" if self.cluster_type not in (None, "local")
                                       else "embedded LocalCluster")
            n = len(self._client.scheduler_info(n_workers=-1)["workers"])
            click.echo(f"Dask: {where}, {n} workers; {dashboard_hint(self._client)}", err=True)
            self.stack.enter_context(maybe_performance_report(self.report))
            self.run_log = RunLog(self._client, report_dir=self.report_dir)
            set_active(self.run_log)
            self.stack.callback(set_active, None)
            if self.command not in ("run", "demo"):  # those mark their pipeline's stages themselves
                self.run_log.begin(self.command or "command")
        return self._client

    def lock(self, store) -> None:
        """Hold the write lock of ``store`` until the invocation ends (one writer per store,
        :mod:`scatac_dist.lock`). Every command that writes to a store calls this first; the
        run summary is written into the stores locked."""
        from ..lock import store_lock

        self.stack.enter_context(store_lock(store))
        self.stores.append(store)

    def summarise(self, store) -> None:
        """Write the run summary into ``store`` too (a store the command created, whose lock the
        library held while writing it)."""
        self.stores.append(store)

    def explain(self, exc: BaseException) -> str | None:
        """Why a run on SLURM/PBS workers failed when the batch system ended its worker jobs
        (walltime, pre-emption), as one error line with the fix; ``None`` otherwise."""
        if self._client is None:
            return None
        from ..cluster import job_spec
        from ..cluster.jobqueue import ended_jobs_reason

        spec = job_spec(self._client)
        return ended_jobs_reason(spec) if spec is not None else None

    def close(self) -> None:
        """Write the run summary, the performance reports, stop the client and the cluster
        it started (cancelling worker jobs), release the store locks."""
        try:
            self._write_summary()
        finally:
            self.stack.close()

    def _write_summary(self) -> None:
        if self.run_log is None:
            return
        if not self.stores or self.status == "refused":  # bad input: its one error line says it all
            self.run_log.end(self.status)
            return
        import logging

        from ..cluster.monitor import summary_markdown
        from ..store import open_atlas

        run_log, self.run_log = self.run_log, None
        run_log.end(self.status if self.status != "running" else "failed")  # the command's own stage
        summary = None
        for store in dict.fromkeys(str(s) for s in self.stores):
            try:
                if summary is None:
                    summary = run_log.summary(status=self.status)
                md = Path(store).with_name(f"{Path(store).name}.run-{run_log.id}.md")
                md.write_text(summary_markdown(summary))
                if self.status == "done":  # a failed run leaves the store as it was
                    open_atlas(store).write_uns(f"scatac_dist/run_{run_log.id}", json.dumps(summary))
                click.echo(f"run summary: {md}", err=True)
            except Exception as exc:  # a summary must never hide the run's own outcome
                logging.getLogger("scatac_dist").warning("run summary not written to %s: %s", store, exc)

    def _close_client(self) -> None:
        from ..cluster import close_client

        client, self._client = self._client, None
        close_client(client)


pass_session = click.make_pass_decorator(Session)

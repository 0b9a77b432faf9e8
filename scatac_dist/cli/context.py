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
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
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
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except self.user_errors as exc:
            raise CommandError(_message(exc)) from exc


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

    The Dask client (and the performance report around the work) starts on first use of
    :meth:`client` and stops when the invocation ends.

    Parameters
    ----------
    scheduler
        Address of an existing scheduler; ``None``: an embedded ``LocalCluster``.
    workers, threads, memory_limit
        Shape of the embedded cluster (``None``: :func:`scatac_dist.cluster.get_client` decides).
    report
        Path of Dask's HTML performance report, or ``None``.
    progress
        Whether to draw progress bars (see :func:`show_progress`).
    """

    def __init__(self, *, scheduler: str | None = None, workers: int | None = None, threads: int | None = None,
                 memory_limit: str | None = None, report: str | None = None, progress: bool = False):
        self.scheduler = scheduler
        self.workers = workers
        self.threads = threads
        self.memory_limit = memory_limit
        self.report = report
        self.progress = progress
        self.stack = ExitStack()
        self._client = None

    def client(self):
        """Start (once) the cluster and the performance report, and print the dashboard link."""
        if self._client is None:
            from ..cluster import get_client, maybe_performance_report

            self._client = get_client(self.scheduler, n_workers=self.workers, threads_per_worker=self.threads,
                                      memory_limit=self.memory_limit)
            self.stack.callback(self._close_client)
            where = self.scheduler or "embedded LocalCluster"
            click.echo(f"Dask: {where}, {len(self._client.scheduler_info()['workers'])} workers; "
                       f"dashboard: {self._client.dashboard_link}", err=True)
            self.stack.enter_context(maybe_performance_report(self.report))
        return self._client

    def lock(self, store) -> None:
        """Hold the write lock of ``store`` until the invocation ends (one writer per store,
        :mod:`scatac_dist.lock`). Every command that writes to a store calls this first."""
        from ..lock import store_lock

        self.stack.enter_context(store_lock(store))

    def close(self) -> None:
        """Write the performance report, stop the client and the cluster it started."""
        self.stack.close()

    def _close_client(self) -> None:
        client, self._client = self._client, None
        cluster = client.cluster
        client.close()
        if cluster is not None:
            cluster.close()


pass_session = click.make_pass_decorator(Session)

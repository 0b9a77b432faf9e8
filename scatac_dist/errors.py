"""Errors that tell the user what went wrong, where, and what to do next.

Every error raised for bad input names the file, the problem and the fix (GUIDE invariant 6).
They survive pickling, so an error raised inside a Dask worker reaches the client intact.
"""

from __future__ import annotations

from pathlib import Path


class ScatacError(Exception):
    """Base class of the errors scatac-dist raises on purpose."""


class InputError(ScatacError, ValueError):
    """Input that cannot be turned into an atlas as it stands.

    Parameters
    ----------
    path
        The file or folder at fault (``None`` when the problem is not in one file).
    problem
        What is wrong, in words a user can check.
    fix
        What to do about it.
    """

    def __init__(self, path: str | Path | None, problem: str, fix: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        self.fix = fix
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{problem}. Fix: {fix}")

    def __reduce__(self):
        return (type(self), (self.path, self.problem, self.fix))


class OutputExistsError(InputError):
    """The output path is taken and ``overwrite`` was not asked for."""


class ClusterError(ScatacError, RuntimeError):
    """The Dask cluster could not be reached or started."""

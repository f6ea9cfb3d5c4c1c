"""Errors a user can act on. The CLI prints them as one line and exits with `exit_code`."""

from __future__ import annotations

from pathlib import Path


class CovidsegError(Exception):
    """Base class: `path: cause`, printed without a traceback."""

    exit_code = 1

    def __init__(self, path: str | Path | None, cause: str) -> None:
        self.path = None if path is None else str(path)
        self.cause = cause
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.cause}" if self.path else self.cause


class InputError(CovidsegError):
    """One case's input cannot be used (unreadable, not a CT in HU, ...). Exit 1."""

    exit_code = 1


class UsageError(CovidsegError):
    """The command line or a configuration value is wrong. Exit 2."""

    exit_code = 2

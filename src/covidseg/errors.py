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
        return one_line(f"{self.path}: {self.cause}" if self.path else self.cause)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of a library's exception message (at most `limit` characters), or its type
    name when the message is empty: the cause part of a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def one_line(text: str) -> str:
    """`text` with control and line-separator characters escaped (a file named ``a\nfailed: b``
    prints as one line, ``a\\nfailed: b``, and cannot fake a second message)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class InputError(CovidsegError):
    """One case's input cannot be used (unreadable, not a CT in HU, ...). Exit 1."""

    exit_code = 1


class UsageError(CovidsegError):
    """The command line or a configuration value is wrong. Exit 2."""

    exit_code = 2

"""Atomic file writing: write to a temporary file in the same folder, then rename.

A reader never sees half a file, and a killed process leaves at most a hidden `.tmp-*` file. A write
that fails (disk full, file size limit) raises :class:`~covidseg.errors.InputError` naming the file
and leaves nothing. :func:`folder_lock` keeps two runs from writing one folder at the same time.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from covidseg.errors import InputError, UsageError

try:
    import fcntl
except ImportError:  # Windows: msvcrt locks the first byte of the lock file instead
    fcntl = None
    import msvcrt

#: The longest file name (bytes) of common file systems (ext4, XFS, APFS, NTFS in UTF-16 units).
NAME_MAX = 255
#: Characters mkstemp puts between a temporary name's prefix and its suffix.
_RANDOM_CHARS = 8


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _temp_suffix(name: str) -> str:
    """The extension a temporary file keeps: the last two suffixes at most ('.nii.gz', '.json')."""
    return "".join(Path(name).suffixes[-2:])


def shortened(name: str, max_bytes: int, digits: int) -> str:
    """`name` when its UTF-8 encoding fits in `max_bytes`, else its start + '~' + `digits` hex
    digits of its sha256 (deterministic, unique, never half a character), `max_bytes` long at most."""
    if len(name.encode()) <= max_bytes:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:digits]
    start = name.encode()[: max_bytes - digits - 1].decode("utf-8", errors="ignore")
    return f"{start}~{digest}"


def _temp_prefix(name: str) -> str:
    """The fixed start of the temporary names of `name`: `.NAME.tmp-`, with NAME shortened (start +
    '~' + a hash of the whole name) when the temporary name would pass NAME_MAX bytes."""
    budget = NAME_MAX - _RANDOM_CHARS - len(_temp_suffix(name).encode()) - len(".") - len(".tmp-")
    return f".{shortened(name, budget, digits=8)}.tmp-"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`.

    The temporary name keeps the extension (``.nii.gz``) so that writers choosing the format from
    it (SimpleITK) write the right one, and is never longer than NAME_MAX bytes when `path`'s name
    is not. On error the temporary file is removed; an OSError (disk full, file size limit, no
    permission) becomes an InputError naming `path`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix, suffix = _temp_prefix(path.name), _temp_suffix(path.name)
        fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions of a new file
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise InputError(path, f"cannot write ({exc.strerror or exc})") from exc
        raise


def remove_stale_temps(folder: str | Path, names: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporary files a killed writer left in `folder` (for the files `names`, or for
    any file); return them. Only for a folder this process alone writes to (or, with `names`, for
    files no other process writes), since a live writer's temporary file looks the same."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    if names is None:
        patterns = [".*.tmp-*"]
    else:
        patterns = [f"{glob.escape(_temp_prefix(name))}*" for name in names]
    removed = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def csv_text(columns: Sequence[str], rows: Iterable[Sequence | Mapping]) -> str:
    """CSV text: a header line of `columns`, then one line per row, each ending in a bare newline.

    A row is a sequence of cells in column order, or a mapping by column name (a missing column is an
    empty cell; a key that is not a column raises ValueError, as :class:`csv.DictWriter` does). Cells
    are written as :mod:`csv` writes them (``str``; floats as ``repr``; quoted where needed).
    """
    columns = list(columns)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        if isinstance(row, Mapping):
            unknown = row.keys() - set(columns)
            if unknown:
                names = ", ".join(sorted(map(repr, unknown)))
                raise ValueError(f"CSV row fields not in the columns: {names}")
            row = [row.get(column, "") for column in columns]
        writer.writerow(row)
    return buffer.getvalue()


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Sequence | Mapping]) -> None:
    """Write :func:`csv_text` of `columns` and `rows` (UTF-8) to `path` atomically."""
    write_text(path, csv_text(columns, rows))


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """Save `array` as a .npy file atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def _lock_nowait(fd: int) -> None:
    """Lock the open file `fd` exclusively or raise OSError at once (held until `fd` is closed)."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


def _read_holder(fd: int) -> str:
    """The pid the lock's holder wrote into the lock file, or '?'."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 32).decode("ascii", errors="replace").strip() or "?"
    except OSError:  # Windows: the holder's locked byte cannot be read
        return "?"


@contextlib.contextmanager
def folder_lock(folder: str | Path, name: str, command: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (the hidden file `name` in it) for the block.

    Another process holding it makes this raise UsageError at once ("another COMMAND (pid N) is
    writing to FOLDER"); `folder` must exist. The lock is an flock (on Windows an msvcrt lock): the
    system releases it when its process ends, even killed. The lock file stays (removing it could let
    two runs lock two different files).
    """
    folder = Path(folder)
    path = folder / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    except OSError as exc:
        raise UsageError(folder, f"cannot create the lock file {name} ({exc.strerror or exc})") from None
    try:
        try:
            _lock_nowait(fd)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EDEADLK):
                raise UsageError(folder, f"cannot lock {name} ({exc.strerror or exc})") from None
            holder = _read_holder(fd)
            raise UsageError(None, f"another {command} (pid {holder}) is writing to {folder}") from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock

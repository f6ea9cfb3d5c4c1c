"""Atomic file writing: write to a temporary file in the same folder, then rename.

A reader never sees half a file, and a killed process leaves at most a hidden `.tmp-*` file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`.

    The temporary name keeps the full suffix (``.nii.gz``) so that writers choosing the format
    from the extension (SimpleITK) write the right one. On error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) if path.suffixes else ""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions of a new file
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temps(folder: str | Path, names: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporary files a killed writer left in `folder` (for the files `names`, or for
    any file); return them. Only for a folder this process alone writes to (or, with `names`, for
    files no other process writes), since a live writer's temporary file looks the same."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = [f".{glob.escape(name)}.tmp-*" for name in names] if names is not None else [".*.tmp-*"]
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


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """Save `array` as a .npy file atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)

"""Finding cases: files by extension, DICOM files by content, series folders; never opening
anything that is not a regular file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from covidseg.errors import InputError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def case_id_of(path: str | Path) -> str:
    """Case id: the file name without its image extension (the whole name when it has none known),
    or the folder name of a DICOM series."""
    path = Path(path)
    if path.is_dir():  # the folder's own name also for ".", ".." and "dir/."
        return Path(os.path.abspath(path)).name or path.resolve().name
    name = path.name
    for suffix in VOLUME_SUFFIXES + IMAGE_2D_SUFFIXES + DICOM_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name  # no known extension: a DICOM file named by its UID, whose dots are not a suffix


def special_kind(path: Path) -> str | None:
    """What `path` is when it is neither a regular file nor a folder ("a named pipe", "a socket",
    "a device"; links followed), from its status only; None otherwise and for a broken link."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # a broken link: reported as missing when read
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    return "a socket" if stat.S_ISSOCK(mode) else "a device"


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    return path.name.lower().endswith(suffixes)


def is_dicom_file(path: Path) -> bool:
    """DICOM by extension, or by the 'DICM' magic at byte 128 whatever the name (TCIA names files by
    their UID, ``1.3.6.1.4.1.14519....``, which has a "suffix"). Files named as another image format
    are not DICOM; only regular files are opened (a FIFO would block), and only 4 bytes are read."""
    if _has_suffix(path, DICOM_SUFFIXES):
        return True
    if _has_suffix(path, VOLUME_SUFFIXES + IMAGE_2D_SUFFIXES):
        return False
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def find_cases(
    root: str | Path, allow_2d: bool = False, exclude: str | Path | None = None
) -> list[tuple[str, Path]]:
    """All cases under `root`: (case id, path) sorted by id.

    A file is one case. A folder is searched recursively (symbolic links followed, each folder
    once): every volume file is a case, and every folder that directly holds DICOM files is one
    case (a DICOM series folder). With `allow_2d`, 2D image files (PNG, JPEG, ...) count too. The
    folder `exclude` is not searched (an output folder inside an input folder). Duplicate case ids
    raise InputError.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(root, "no such file or folder")
    if not root.is_dir():  # a file (a named pipe too: read_ct refuses it without opening it)
        return [(case_id_of(root), root)]
    suffixes = VOLUME_SUFFIXES + (IMAGE_2D_SUFFIXES if allow_2d else ())
    cases: dict[str, Path] = {}

    def add(case_id: str, path: Path) -> None:
        if case_id in cases:
            raise InputError(path, f"case id {case_id!r} also used by {cases[case_id]}")
        cases[case_id] = path

    visited: set[str] = {os.path.realpath(exclude)} if exclude is not None else set()
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # a symlink loop, or a second link to a folder already searched
            dirnames.clear()
            continue
        visited.add(real)
        dirnames.sort()
        folder_path = Path(folder)
        has_dicom = False
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = folder_path / name
            if special_kind(path):  # never opened: a named pipe would block discovery forever
                continue
            if _has_suffix(path, suffixes):
                add(case_id_of(path), path)
            elif is_dicom_file(path):
                has_dicom = True
        if has_dicom:
            add(case_id_of(folder_path), folder_path)
    return sorted(cases.items())


def check_regular_file(path: Path) -> None:
    """Refuse what is not a regular file (named pipe, socket, device) without opening it: reading
    a named pipe waits for a writer forever, a device may never end."""
    kind = special_kind(path)
    if kind is not None:
        raise InputError(path, f"not a regular file ({kind})")

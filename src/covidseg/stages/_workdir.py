"""Reading the work folders that stages hand to each other (manifests and their arrays)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidseg.errors import InputError, UsageError
from covidseg.imaging.grid import HuScale

#: The hidden lock file a stage holds in its output folder while it writes there (preprocess,
#: make-masks; predict has its own per part): a second run into the folder stops at once.
STAGE_LOCK = ".covidseg.lock"


def read_manifest(folder: Path, expected_format: str, max_version: int = 1) -> dict:
    """The manifest.json of a stage output folder, checked for its format and version."""
    path = Path(folder) / "manifest.json"
    if not Path(folder).is_dir():
        raise UsageError(folder, "no such folder")
    if not path.is_file():
        raise UsageError(folder, f"no manifest.json: not a finished {expected_format} output")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise InputError(path, f"unreadable manifest ({str(exc)[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        raise InputError(path, f"not a {expected_format} manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise InputError(path, f"manifest without a valid version number ({version!r})")
    if version > max_version:
        raise InputError(path, f"manifest version {version} is newer than this covidseg")
    if not isinstance(manifest.get("cases", []), list):
        raise InputError(path, "'cases' is not a list")
    return manifest


def refuse_other_hu_scale(model_path: Path, trained: object, grids: HuScale, pre_dir: Path) -> None:
    """A model file trained on grids of one HU window is used only on grids of that window.

    `trained` is the ``hu_window`` the file records (None in files from before it was recorded: the
    default window); `grids` the scale of the grids in `pre_dir`. A mismatch is a UsageError naming
    the file and both windows; an unreadable window an InputError naming the file."""
    try:
        trained_scale = HuScale.from_json(trained)
    except ValueError as exc:
        raise InputError(model_path, str(exc)) from None
    if trained_scale != grids:
        cause = f"trained on HU window {trained_scale}, the grids in {pre_dir} use {grids}"
        raise UsageError(model_path, cause)


def check_output_dir(out_dir: Path) -> None:
    """Refuse (UsageError) an output folder that is a file or cannot be written; creates nothing."""
    out_dir = Path(out_dir)
    existing = out_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(out_dir, f"cannot be an output folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(out_dir, f"cannot write the output: {existing} is not writable")


def inside(folder: Path, relative: str) -> Path:
    """`folder / relative`, refusing paths that leave the folder (hand-edited manifests)."""
    folder = Path(folder).resolve()
    try:
        path = (folder / relative).resolve()
    except (OSError, ValueError) as exc:  # a symlink loop, a NUL character
        raise InputError(folder / "manifest.json", f"bad path {relative!r} ({exc})") from None
    if folder != path and folder not in path.parents:
        raise InputError(folder / "manifest.json", f"path {relative!r} points outside {folder}")
    return path


def portable_path(target: Path | str, folder: Path | str, work: Path | str | None = None) -> str:
    """How a file in `folder` (a manifest, a sidecar, run.json) stores a path to `target`.

    Relative to `folder`, with ``/`` separators, when `target` lies inside `work` — the folder that
    moves with the file: by default `folder`'s parent, i.e. the work folder holding the stage
    folders (``masks/`` stores ``../pre``). Anything outside it (the input CTs, a generator elsewhere)
    stays absolute: the work folder moves without it, so only its absolute path still finds it.
    Paths are made absolute lexically (no symlink resolution), as :func:`stored_path` reads them.
    """
    folder = os.path.abspath(folder)
    target = os.path.abspath(target)
    work = os.path.abspath(work) if work is not None else os.path.dirname(folder)
    try:
        inside_work = os.path.commonpath([target, work]) == work
    except ValueError:  # another drive (Windows)
        inside_work = False
    if not inside_work:
        return Path(target).as_posix()
    return Path(os.path.relpath(target, folder)).as_posix()


def stored_path(
    folder: Path | str, value: object, where: Path | None = None, work: Path | None = None
) -> Path:
    """The path that a file in `folder` stored with :func:`portable_path`.

    An absolute path stays absolute (inputs outside the work folder, and every path of manifests
    written before paths became relative); a relative one is taken from `folder`, and must stay
    inside `work` (default `folder`'s parent: the work folder), or it is refused as hand-edited.
    `where` names the file that holds the path in the error (default ``folder/manifest.json``).
    """
    where = where if where is not None else Path(folder) / "manifest.json"
    if not isinstance(value, str) or not value or "\0" in value:
        raise InputError(where, f"not a path: {str(value)[:100]!r}")
    if os.path.isabs(value):
        return Path(value)
    folder = os.path.abspath(folder)
    work = os.path.abspath(work) if work is not None else os.path.dirname(folder)
    path = os.path.normpath(os.path.join(folder, value))
    try:
        leaves = os.path.commonpath([path, work]) != work
    except ValueError:  # a drive-relative path on another drive (Windows)
        leaves = True
    if leaves:
        raise InputError(where, f"path {value!r} points outside {work}")
    return Path(path)


@dataclass
class GridCase:
    """One preprocessed case: grid arrays and its manifest record."""

    record: dict
    image: np.ndarray  # [z, y, x] float32 in [0, 1]
    lungs: np.ndarray  # [z, y, x] uint8 (0, 1 right, 2 left)
    ref: np.ndarray | None  # [z, y, x] uint8 reference lesion mask, if any
    folder: Path  # the preprocess folder whose manifest holds `record`

    @property
    def source(self) -> Path:
        """The case's source CT (the manifest stores it relative to the preprocess folder when it
        lies in the work folder, absolute otherwise)."""
        return stored_path(self.folder, self.record["source"])

    @property
    def case_id(self) -> str:
        return self.record["id"]

    @property
    def group(self) -> str:
        return self.record["group"]


def load_grid_cases(pre_dir: Path, groups: tuple[str, ...] = ("healthy", "covid")) -> list[GridCase]:
    """All cases of a preprocess output whose group is in `groups`, arrays loaded."""
    manifest = read_manifest(pre_dir, "covidseg.preprocess")
    path = Path(pre_dir) / "manifest.json"
    cases = []
    for i, record in enumerate(manifest.get("cases", [])):
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise InputError(path, f"case record {i} has no 'id'")
        if record.get("group") not in groups:
            continue
        for key in ("image", "lungs", "ref"):
            if not isinstance(record.get(key), str) and (key != "ref" or record.get(key) is not None):
                raise InputError(path, f"case {record['id']!r}: {key!r} is not a file name")
        image = load_array(inside(pre_dir, record["image"]))
        lungs = load_array(inside(pre_dir, record["lungs"]))
        ref = load_array(inside(pre_dir, record["ref"])) if record.get("ref") else None
        if image.ndim != 3 or image.shape != lungs.shape or (ref is not None and ref.shape != image.shape):
            raise InputError(pre_dir / record["image"], "image, lung and reference grids differ in shape")
        cases.append(GridCase(record, image.astype(np.float32), lungs, ref, folder=Path(pre_dir)))
    return cases


def median_slab_mm(records: list[dict], where: Path) -> float:
    """The median grid z spacing (mm, rounded to 0.001) of preprocessed case records: the z thickness
    of one network slice, which `predict` cuts CTs into for a segmenter trained on these grids."""
    slabs = [float(r["grid_spacing_mm"][0]) for r in records]
    if not slabs:
        raise InputError(where, "no preprocessed cases")
    return round(float(np.median(slabs)), 3)


def load_array(path: Path) -> np.ndarray:
    """A numeric .npy array of a work folder (never a pickle), with a one-line error when unusable."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(path, "missing: the work folder is incomplete") from None
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(path, f"not a readable .npy array ({str(exc)[:200]})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise InputError(path, f"not a numeric array (dtype {getattr(array, 'dtype', type(array))})")
    return array

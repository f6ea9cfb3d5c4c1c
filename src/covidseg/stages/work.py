"""Reading the work folders that stages hand to each other (manifests and their arrays)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidseg.errors import InputError, UsageError


def read_manifest(folder: Path, expected_format: str, max_version: int = 1) -> dict:
    """The manifest.json of a stage output folder, checked for its format and version."""
    path = Path(folder) / "manifest.json"
    if not Path(folder).is_dir():
        raise UsageError(folder, "no such folder")
    if not path.is_file():
        raise UsageError(folder, f"no manifest.json: not a finished {expected_format} output")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        raise InputError(path, f"not a {expected_format} manifest")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > max_version:
        raise InputError(path, f"manifest version {manifest.get('version')} is newer than this covidseg")
    return manifest


def inside(folder: Path, relative: str) -> Path:
    """`folder / relative`, refusing paths that leave the folder (hand-edited manifests)."""
    folder = Path(folder).resolve()
    path = (folder / relative).resolve()
    if folder != path and folder not in path.parents:
        raise InputError(folder / "manifest.json", f"path {relative!r} points outside {folder}")
    return path


@dataclass
class GridCase:
    """One preprocessed case: grid arrays and its manifest record."""

    record: dict
    image: np.ndarray  # [z, y, x] float32 in [0, 1]
    lungs: np.ndarray  # [z, y, x] uint8 (0, 1 right, 2 left)
    ref: np.ndarray | None  # [z, y, x] uint8 reference lesion mask, if any

    @property
    def case_id(self) -> str:
        return self.record["id"]

    @property
    def group(self) -> str:
        return self.record["group"]


def load_grid_cases(pre_dir: Path, groups: tuple[str, ...] = ("healthy", "covid")) -> list[GridCase]:
    """All cases of a preprocess output whose group is in `groups`, arrays loaded."""
    manifest = read_manifest(pre_dir, "covidseg.preprocess")
    cases = []
    for record in manifest["cases"]:
        if record.get("group") not in groups:
            continue
        image = np.load(inside(pre_dir, record["image"]), allow_pickle=False)
        lungs = np.load(inside(pre_dir, record["lungs"]), allow_pickle=False)
        ref = np.load(inside(pre_dir, record["ref"]), allow_pickle=False) if record.get("ref") else None
        if image.shape != lungs.shape or (ref is not None and ref.shape != image.shape):
            raise InputError(pre_dir / record["image"], "image, lung and reference grids differ in shape")
        cases.append(GridCase(record=record, image=image.astype(np.float32), lungs=lungs, ref=ref))
    return cases

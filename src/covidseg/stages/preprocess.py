"""`covidseg preprocess`: CT files/folders -> grid arrays + lung masks + manifest.json.

Output folder::

    images/<id>.npy   float32 [z, y, x] on the grid, HU window scaled to [0, 1]
    lungs/<id>.npy    uint8   [z, y, x] on the grid: 0 background, 1 right lung, 2 left lung
    refs/<id>.npy     uint8   [z, y, x] on the grid: reference lesion mask (only with --masks)
    manifest.json     per case: source, native geometry, orientation, crop box, files
    config.json       the PreprocessConfig used

See docs/formats.md for the full contract.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidseg import __version__
from covidseg.config import PreprocessConfig
from covidseg.errors import CovidsegError, InputError, UsageError
from covidseg.imaging.display_lungs import segment_input_lungs
from covidseg.imaging.grid import grid_spacing_mm, hu_to_grid, lung_crop_box, mask_to_grid
from covidseg.imaging.intensity import IntensityMapping
from covidseg.io import find_cases, read_ct, read_mask
from covidseg.io.atomic import folder_lock, save_npy, write_json
from covidseg.progress import Progress
from covidseg.stages._workdir import STAGE_LOCK, check_output_dir, portable_path

MANIFEST_FORMAT = "covidseg.preprocess"
MANIFEST_VERSION = 1
GROUPS = ("healthy", "covid")


@dataclass(frozen=True)
class CaseInput:
    """One case to preprocess: where its CT (and optional reference mask) is."""

    case_id: str
    group: str  # "healthy" or "covid"
    path: Path
    mask_path: Path | None = None


@dataclass
class PreprocessResult:
    manifest: dict
    failures: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def collect_inputs(
    healthy: Path | None, covid: Path | None, masks: Path | None, allow_2d: bool = False
) -> list[CaseInput]:
    """Discover cases in the healthy/covid inputs and match reference masks by case id."""
    if healthy is None and covid is None:
        raise UsageError(None, "give at least one of --healthy and --covid")
    if masks is not None and not masks.exists():
        raise UsageError(masks, "--masks input does not exist")
    mask_paths = dict(find_cases(masks, allow_2d=allow_2d)) if masks is not None else {}
    cases: list[CaseInput] = []
    seen: dict[str, Path] = {}
    for group, root in (("healthy", healthy), ("covid", covid)):
        if root is None:
            continue
        if not root.exists():
            raise UsageError(root, f"--{group} input does not exist")
        found = find_cases(root, allow_2d=allow_2d)
        if not found:
            raise UsageError(root, "no CT found (NIfTI, MHA/MHD, NRRD or DICOM series folders)")
        for case_id, path in found:
            if case_id in seen:
                raise UsageError(path, f"case id {case_id!r} is also used by {seen[case_id]}")
            seen[case_id] = path
            cases.append(CaseInput(case_id, group, path, mask_paths.get(case_id)))
    return cases


def preprocess_case(
    case: CaseInput,
    out_dir: Path,
    config: PreprocessConfig,
    series: str | None = None,
    intensity: IntensityMapping | None = None,
) -> dict:
    """Preprocess one case and write its arrays; return its manifest record.

    Everything is computed before anything is written, so a failing case leaves no files.
    """
    start = time.perf_counter()
    volume, note = read_ct(case.path, series=series, intensity=intensity)
    lungs = segment_input_lungs(volume.hu, volume.spacing_zyx, config.lungs, intensity)
    box = lung_crop_box(lungs, volume.spacing_zyx, config.margin_mm)
    if box is None:
        raise InputError(case.path, "no lungs found (is this a chest CT, and in HU?)")
    lung_labels = lungs.full()
    image = hu_to_grid(volume.hu, box, config.grid, config.hu_scale)
    lung_grid = mask_to_grid(lung_labels, box, config.grid)

    ref_grid = None
    ref_ml = None
    if case.mask_path is not None:
        ref_native, ref_geometry = read_mask(case.mask_path)
        if not ref_geometry.matches(volume.geometry):
            reason = ref_geometry.describe_mismatch(volume.geometry)
            raise InputError(case.mask_path, f"geometry differs from its CT {case.path}: {reason}")
        ref = volume.orientation.to_canonical(ref_native)
        ref_grid = mask_to_grid(ref, box, config.grid)
        ref_ml = float(ref.sum()) * volume.geometry.voxel_volume_ml

    voxel_ml = volume.geometry.voxel_volume_ml
    record = {
        "id": case.case_id,
        "group": case.group,
        "source": portable_path(case.path.resolve(), out_dir),
        "series_uid": volume.series_uid,
        "note": note,
        "mask_source": None if case.mask_path is None else portable_path(case.mask_path.resolve(), out_dir),
        "intensity": None if intensity is None else intensity.spec,
        "native_geometry": volume.geometry.to_json(),
        "orientation": volume.orientation.to_json(),
        "canonical_shape": list(volume.hu.shape),
        "canonical_spacing_zyx": list(volume.spacing_zyx),
        "crop_box": box.to_json(),
        "grid_spacing_mm": list(grid_spacing_mm(box, config.grid, volume.spacing_zyx)),
        "lung_ml": float((lung_labels > 0).sum()) * voxel_ml,
        "lung_ml_right": float((lung_labels == 1).sum()) * voxel_ml,
        "lung_ml_left": float((lung_labels == 2).sum()) * voxel_ml,
        "ref_lesion_ml": ref_ml,
        "image": f"images/{case.case_id}.npy",
        "lungs": f"lungs/{case.case_id}.npy",
        "ref": None if ref_grid is None else f"refs/{case.case_id}.npy",
    }
    arrays = {"image": image.astype(np.float32), "lungs": lung_grid.astype(np.uint8)}
    if ref_grid is not None:
        arrays["ref"] = ref_grid.astype(np.uint8)
    try:  # a write that fails (disk full) or Ctrl-C leaves no file of the case
        for key, array in arrays.items():
            save_npy(out_dir / record[key], array)
    except BaseException:
        for key in arrays:
            (out_dir / record[key]).unlink(missing_ok=True)
        raise
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_one(args: tuple) -> tuple[str, dict | None, str | None]:
    case, out_dir, config, series, intensity = args
    try:
        return case.case_id, preprocess_case(case, out_dir, config, series, intensity), None
    except CovidsegError as exc:
        return case.case_id, None, str(exc)
    except Exception as exc:  # an unexpected bug in one case must not stop the batch
        return case.case_id, None, f"{case.path}: unexpected error: {type(exc).__name__}: {exc}"


def _check_out_dir(out_dir: Path, inputs: list[CaseInput], overwrite: bool) -> None:
    for case in inputs:
        for p in (case.path, case.mask_path):
            if p is not None and out_dir.resolve() in (p.resolve(), *p.resolve().parents):
                raise UsageError(out_dir, f"output folder contains the input {p}; choose another")
    if (out_dir / "manifest.json").exists() and not overwrite:
        raise UsageError(out_dir, "holds a previous preprocess output; pass --overwrite to replace it")
    check_output_dir(out_dir)


def _run_cases(jobs: list[tuple], workers: int, progress) -> dict[str, tuple[dict | None, str | None]]:
    """Case id -> (record, None) or (None, one-line error) for every job, in `workers` processes."""
    workers = max(1, min(workers, len(jobs)))
    results: dict[str, tuple[dict | None, str | None]] = {}
    with contextlib.ExitStack() as stack:
        if workers == 1:
            outcomes = map(_run_one, jobs)
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            pool = ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(threads,))
            outcomes = stack.enter_context(pool).map(_run_one, jobs)
        for case_id, record, error in outcomes:
            results[case_id] = (record, error)
            if progress:
                progress(len(results), len(jobs), f"{case_id}: {'failed' if error else 'done'}")
    return results


def run_preprocess(
    out_dir: Path,
    healthy: Path | None = None,
    covid: Path | None = None,
    masks: Path | None = None,
    config: PreprocessConfig | None = None,
    *,
    workers: int = 1,
    series: str | None = None,
    intensity: IntensityMapping | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> PreprocessResult:
    """Preprocess every case; failing cases are recorded and the others go on.

    `progress` gets (cases finished, cases found, "<case id>: done|failed") after each case. The
    manifest lists the finished cases (`cases`) and the failed ones (`failed`) with the one-line
    reason. It is written last, so a folder with a manifest is complete.
    """
    config = config or PreprocessConfig()
    out_dir = Path(out_dir)
    inputs = collect_inputs(healthy, covid, masks, allow_2d=intensity is not None)
    _check_out_dir(out_dir, inputs, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(out_dir, STAGE_LOCK, "covidseg preprocess"):
        _check_out_dir(out_dir, inputs, overwrite)  # again: another run may have finished meanwhile
        (out_dir / "manifest.json").unlink(missing_ok=True)  # an incomplete folder has no manifest
        jobs = [(case, out_dir, config, series, intensity) for case in inputs]
        results = _run_cases(jobs, workers, progress)
        records, failures, notes = [], [], []
        for case in inputs:
            record, error = results[case.case_id]
            if error is not None:
                source = portable_path(case.path, out_dir)
                failures.append({"id": case.case_id, "group": case.group, "source": source, "error": error})
                continue
            records.append(record)
            if record["note"]:
                notes.append(f"{case.case_id}: {record['note']}")
        inputs_json = {
            "healthy": None if healthy is None else portable_path(healthy, out_dir),
            "covid": None if covid is None else portable_path(covid, out_dir),
            "masks": None if masks is None else portable_path(masks, out_dir),
            "series": series,
            "intensity": None if intensity is None else intensity.spec,
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "covidseg_version": __version__,
            "config": config.to_json(),
            "inputs": inputs_json,
            "cases": records,
            "failed": failures,
        }
        write_json(out_dir / "config.json", config.to_json())
        write_json(out_dir / "manifest.json", manifest)
    return PreprocessResult(manifest=manifest, failures=failures, notes=notes)

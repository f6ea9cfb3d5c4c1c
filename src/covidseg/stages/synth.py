"""`covidseg synth`: synthetic chest-CT phantoms with lung and lesion ground truth.

Output folder (paths in the manifest are relative to it)::

    healthy/healthy_000.nii.gz  int16 HU, LPS axis-aligned, volume centred on (0, 0, 0) mm
    covid/covid_000.nii.gz      int16 HU
    masks/covid_000.nii.gz      uint8 lesion ground truth (1 lesion), COVID cases only
    lungs/<id>.nii.gz           uint8 lung labels (0 background, 1 right lung, 2 left lung)
    montage/<id>.png            axial overlay montage (only with montage=True)
    manifest.json               written last: parameters and one record per case

With ``surroundings`` (the default) every phantom lies on a scanner table, with arms, clothing,
bowel gas and a random reconstruction kernel, noise level and streaks, as hospital scans do (see
:mod:`covidseg.imaging.phantom_surroundings`); without, the plain phantoms of earlier versions. The lung and
lesion ground truth is the same either way. With ``lesion_variety`` each COVID case draws its own
lesion style (a phantom family no network has learned: see ``make_phantom``); off by default.

Case ``covid_003`` is the same whatever the number of cases asked for: each case's seed is drawn
from ``SeedSequence([seed, kind, index])`` (kind 0 healthy, 1 COVID), so healthy and COVID cases
never share a seed and another ``seed`` gives unseen cases.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from covidseg import __version__
from covidseg.errors import UsageError
from covidseg.imaging.geometry import axis_aligned_geometry
from covidseg.imaging.phantom import HU_RANGE, Phantom, make_phantom
from covidseg.io import write_array
from covidseg.io.atomic import write_json
from covidseg.progress import Progress

MANIFEST_FORMAT = "covidseg.synth"
MANIFEST_VERSION = 1
KINDS = {"healthy": 0, "covid": 1}
MIN_SIDE = 8
MAX_VOXELS = 2**31


def case_seed(seed: int, kind: str, index: int) -> int:
    """The phantom seed of case `index` of `kind` ("healthy" or "covid") for a run `seed` (63 bits)."""
    state = np.random.SeedSequence([int(seed), KINDS[kind], int(index)]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & (2**63 - 1)


def centred_origin(shape_zyx, spacing_zyx) -> tuple[float, float, float]:
    """ITK origin (x, y, z mm) of the first voxel that centres the volume on (0, 0, 0) mm."""
    return tuple(-(n - 1) / 2.0 * s for n, s in zip(reversed(shape_zyx), reversed(spacing_zyx), strict=True))


def _validate(n_healthy, n_covid, seed, shape_zyx, spacing_zyx):
    """Refuse nonsense parameters with a UsageError; return (shape, spacing) as tuples."""
    if int(n_healthy) != n_healthy or int(n_covid) != n_covid or n_healthy < 0 or n_covid < 0:
        raise UsageError(
            None, f"case counts must be whole numbers >= 0, got {n_healthy} healthy, {n_covid} covid"
        )
    if int(seed) != seed or seed < 0:
        raise UsageError(None, f"--seed must be a whole number >= 0, got {seed}")
    try:
        shape = tuple(int(v) for v in shape_zyx)
        spacing = tuple(float(v) for v in spacing_zyx)
    except (TypeError, ValueError):
        raise UsageError(
            None, f"--shape and --spacing need three numbers, got {shape_zyx} and {spacing_zyx}"
        ) from None
    if len(shape) != 3 or any(n < MIN_SIDE for n in shape) or tuple(shape_zyx) != shape:
        raise UsageError(None, f"--shape must be three whole numbers >= {MIN_SIDE} (Z,Y,X), got {shape_zyx}")
    if math.prod(shape) > MAX_VOXELS:
        raise UsageError(None, f"--shape {shape} has more than {MAX_VOXELS} voxels")
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise UsageError(None, f"--spacing must be three positive sizes in mm (Z,Y,X), got {spacing_zyx}")
    return shape, spacing


def _case_record(case_id: str, kind: str, seed: int, phantom: Phantom, files: dict) -> dict:
    voxel_ml = phantom.voxel_ml
    lung_ml = float(np.count_nonzero(phantom.lungs)) * voxel_ml
    lesion_ml = float(np.count_nonzero(phantom.lesions)) * voxel_ml
    return {
        "id": case_id,
        "kind": kind,
        "seed": seed,
        "image": files["image"],
        "lungs": files["lungs"],
        "mask": files.get("mask"),
        "montage": files.get("montage"),
        "n_lesions": len(phantom.lesion_info),
        "lesion_ml": round(lesion_ml, 3),
        "lung_ml": round(lung_ml, 3),
        "lesion_percent_of_lung": round(100.0 * lesion_ml / lung_ml, 3) if lung_ml > 0 else 0.0,
        "lesions": phantom.lesion_info,
        "scene": phantom.scene_info,
    }


def _write_case(out_dir: Path, case_id: str, kind: str, phantom: Phantom, geometry, montage: bool) -> dict:
    """Write one phantom's files; returns their paths relative to `out_dir` (None where absent)."""
    files = {"image": f"{kind}/{case_id}.nii.gz", "lungs": f"lungs/{case_id}.nii.gz"}
    hu = np.clip(np.rint(phantom.hu), *HU_RANGE).astype(np.int16)
    write_array(out_dir / files["image"], hu, geometry)
    del hu
    write_array(out_dir / files["lungs"], phantom.lungs, geometry)
    if kind == "covid":
        files["mask"] = f"masks/{case_id}.nii.gz"
        write_array(out_dir / files["mask"], phantom.lesions, geometry)
    if montage:
        from covidseg.reporting.plots import overlay_montage

        files["montage"] = f"montage/{case_id}.png"
        lesions = phantom.lesions if kind == "covid" else None
        title = f"{case_id}: {len(phantom.lesion_info)} lesions" if kind == "covid" else case_id
        overlay_montage(
            phantom.hu,
            lesions,
            phantom.lungs,
            out_dir / files["montage"],
            title=title,
            spacing_zyx=phantom.spacing_zyx,
        )
    return files


def run_synth(
    out_dir: Path,
    n_healthy: int,
    n_covid: int,
    seed: int,
    shape_zyx: tuple[int, int, int],
    spacing_zyx: tuple[float, float, float],
    montage: bool = False,
    progress: Progress | None = None,
    surroundings: bool = True,
    lesion_variety: bool = False,
) -> dict:
    """Make `n_healthy` healthy and `n_covid` COVID phantoms in `out_dir`; returns the manifest.

    `shape_zyx` (voxels) and `spacing_zyx` (mm) set the grid; `progress` gets (phantoms made, all
    phantoms, case id) per finished case; `surroundings` puts table, arms, clothing, bowel gas and
    scanner variety around the patient (False: the plain phantoms); `lesion_variety` gives each COVID
    case its own lesion style (shapes, ground-glass level, margins, crazy paving, reversed halo; see
    :func:`covidseg.imaging.phantom.make_phantom`). Raises UsageError for nonsense
    parameters, before writing anything. Files of an earlier run in `out_dir` are overwritten case
    by case; the manifest lists this run's only.
    """
    shape, spacing = _validate(n_healthy, n_covid, seed, shape_zyx, spacing_zyx)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(out_dir, "exists and is not a folder")
    geometry = axis_aligned_geometry(shape, spacing, centred_origin(shape, spacing))
    total = n_healthy + n_covid
    cases = []
    for kind, count in (("healthy", n_healthy), ("covid", n_covid)):
        for index in range(count):
            case_id = f"{kind}_{index:03d}"
            phantom_seed = case_seed(seed, kind, index)
            phantom = make_phantom(
                shape,
                spacing,
                covid=kind == "covid",
                seed=phantom_seed,
                surroundings=surroundings,
                lesion_variety=lesion_variety,
            )
            files = _write_case(out_dir, case_id, kind, phantom, geometry, montage)
            cases.append(_case_record(case_id, kind, phantom_seed, phantom, files))
            if progress is not None:
                progress(len(cases), total, case_id)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "covidseg_version": __version__,
        "parameters": {
            "n_healthy": int(n_healthy),
            "n_covid": int(n_covid),
            "seed": int(seed),
            "shape_zyx": list(shape),
            "spacing_zyx": list(spacing),
            "montage": bool(montage),
            "surroundings": bool(surroundings),
            "lesion_variety": bool(lesion_variety),
            "orientation": "LPS",
            "origin_xyz": list(geometry.origin),
            "hu_dtype": "int16",
        },
        "cases": cases,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "manifest.json", manifest)
    return manifest

"""Stage `evaluate`: compare predicted lesion masks with reference masks, case by case.

Inputs
------
* `pred`: a folder (searched recursively) of mask files (NIfTI, MHA, NRRD, ...), or one file.
* `ref`: a folder of reference masks, or a ``manifest.json`` written by ``covidseg synth`` (or the
  folder holding it): its ``cases`` with a non-null ``"mask"`` (a path relative to the manifest's
  folder) are the references, named by their ``"id"``.

Cases are matched by case id (file name without extensions). Unmatched ids on either side are
listed in the summary; no match at all is a usage error. Masks are compared voxel by voxel in
their native grid, so a prediction must have the reference's exact geometry (size, spacing,
origin, direction). A case whose prediction has another geometry, or whose files cannot be read,
is recorded as a *failed case* with its error message and the others go on; the report is
always written (even when every case failed) and :attr:`EvaluationResult.ok` turns False so the
CLI exits 1.

Outputs (both written atomically)
---------------------------------
* ``metrics.csv``: one row per evaluated case: ``case_id`` and the metrics of
  :func:`covidseg.imaging.metrics.case_metrics` (plus ``lesion_slices, slice_dice_mean, slice_dice_std``
  with `per_slice`). An empty cell is an undefined value (NaN). No summary row.
* ``summary.json``: ``{"format": "covidseg.evaluate", "version": 1, "covidseg_version", "pred",
  "ref", "n_cases", "aggregate", "thresholds", "failed_thresholds", "threshold", "allow_missing",
  "failed_missing", "failed_cases", "unmatched", "cases"}``; ``aggregate`` is
  :func:`covidseg.imaging.metrics.aggregate`'s dict; undefined values are ``null``.

Thresholds compare the mean over cases of Dice / sensitivity / specificity with the given
minimum; an undefined mean (no case with a defined value) fails a threshold. A gate (any threshold)
also fails when a reference has no prediction, unless `allow_missing`: a mean over the few cases
that were predicted says nothing about the others. Without a threshold, missing predictions are
listed (``unmatched``) but do not fail the evaluation: it is then a report, not a check.

Predictions must be binary masks: voxel values {0, v} with v a whole number (0/1, 0/255 exports).
A probability map (fractional values, or more than two values) is refused as a failed case unless a
`threshold` binarises it (voxels >= threshold are lesion, as `predict` binarises). References keep
the plain rule: voxel > 0 is lesion.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidseg import __version__
from covidseg.errors import CovidsegError, InputError, UsageError
from covidseg.imaging.geometry import Geometry
from covidseg.imaging.metrics import (
    METRIC_KEYS,
    aggregate,
    case_metrics,
    per_slice_dice,
    summarize_slice_dice,
)
from covidseg.io import find_cases, read_labels, read_mask
from covidseg.io.atomic import write_csv, write_json
from covidseg.progress import Progress
from covidseg.stages._workdir import check_output_dir, inside, portable_path, stored_path

FORMAT = "covidseg.evaluate"
VERSION = 1
METRICS_CSV = "metrics.csv"
SUMMARY_JSON = "summary.json"
MANIFEST_NAME = "manifest.json"

#: CSV columns, in order (the per-slice ones only with `per_slice`).
CSV_COLUMNS = ("case_id",) + METRIC_KEYS + ("tp", "fp", "fn", "tn")
PER_SLICE_COLUMNS = ("lesion_slices", "slice_dice_mean", "slice_dice_std")
THRESHOLD_METRICS = ("dice", "sensitivity", "specificity")
MISSING_SHOWN = 5  # case ids named in the message about missing predictions


@dataclass
class EvaluationResult:
    """What `evaluate` found and wrote."""

    cases: list[dict]  # one dict per evaluated case: case_id, pred, ref and the metrics
    summary: dict  # the content of summary.json (NaN already replaced by None)
    failed_thresholds: list[str]  # e.g. "dice 0.812 < 0.9"
    failed_cases: list[dict]  # {"case_id", "pred", "ref", "error"} per case that could not be evaluated
    metrics_csv: Path
    summary_json: Path
    unmatched: dict = field(default_factory=dict)  # {"ref_without_pred": [...], "pred_without_ref": [...]}
    failed_missing: str | None = None  # "PRED: 8 of 9 reference case(s) have no prediction: ..." (a gate)

    @property
    def ok(self) -> bool:
        """True when every matched case was evaluated, every threshold was met and, with a threshold,
        every reference had a prediction (or `allow_missing`): exit code 0."""
        return not self.failed_thresholds and not self.failed_cases and not self.failed_missing

    @property
    def paths(self) -> list[Path]:
        return [self.metrics_csv, self.summary_json]


def _manifest_references(manifest_path: Path) -> list[tuple[str, Path]]:
    """(case id, mask path) for every case of a synth or preprocess manifest with a reference mask.

    A synth manifest names the mask relative to its folder (``"mask"``); a preprocess manifest
    names the reference mask it was given (``"mask_source"``) relative to its folder when it lies
    in the work folder, else (and in manifests of older versions) as an absolute path.
    """
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise UsageError(manifest_path, f"cannot read manifest: {str(exc)[:200]}") from None
    cases = manifest.get("cases") if isinstance(manifest, dict) else None
    if not isinstance(cases, list):
        raise UsageError(manifest_path, "not a covidseg manifest: no 'cases' list")
    references: dict[str, Path] = {}
    preprocess = manifest.get("format") == "covidseg.preprocess"
    for entry in cases:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str | int) or entry["id"] == "":
            raise UsageError(manifest_path, f"manifest case without an 'id': {str(entry)[:100]}")
        mask = entry.get("mask_source") if preprocess else entry.get("mask")
        if mask is None:
            continue
        case_id = str(entry["id"])
        if not isinstance(mask, str) or not mask or "\0" in mask:
            raise UsageError(
                manifest_path, f"case {case_id!r}: the mask is not a file name: {str(mask)[:100]!r}"
            )
        if case_id in references:
            raise UsageError(manifest_path, f"case id {case_id!r} appears twice")
        try:
            if preprocess:  # relative to the preprocess folder, or absolute
                references[case_id] = stored_path(manifest_path.parent, mask, where=manifest_path)
            else:  # a synth manifest names its masks inside its own folder
                inside(manifest_path.parent, mask)
                references[case_id] = manifest_path.parent / mask
        except InputError as exc:
            raise UsageError(manifest_path, exc.cause) from None
    return sorted(references.items())


def _references(ref: Path) -> list[tuple[str, Path]]:
    if ref.is_file() and ref.name.lower().endswith(".json"):
        return _manifest_references(ref)
    if ref.is_dir() and (ref / MANIFEST_NAME).is_file():
        return _manifest_references(ref / MANIFEST_NAME)
    return find_cases(ref, allow_2d=True)  # 2D label images (PNG) of 2D datasets too


def _check_threshold(name: str, value: float | None) -> None:
    """A threshold must be a finite number >= 0; above 1 is allowed and simply never met."""
    if value is not None and not (math.isfinite(value) and value >= 0.0):
        raise UsageError(None, f"--min-{name} must be a number >= 0, got {value}")


def _format_below(value: float, threshold: float) -> str:
    """`value` with 3 decimals, or more where 3 would round it up to `threshold`."""
    for digits in range(3, 12):
        text = f"{value:.{digits}f}"
        if float(text) < threshold:
            return text
    return repr(value)


def _json_safe(obj):
    """Replace NaN/inf by None and numpy scalars by Python numbers, recursively."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _csv_cell(value) -> str:
    """A metrics.csv cell: empty for an undefined value (None, NaN), floats as repr."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _not_binary(values: np.ndarray) -> str | None:
    """Why `values` are not a binary mask ({0, v}, v a whole number >= 1), or None when they are."""
    if values.size == 0:
        return None
    lo, hi = float(values.min()), float(values.max())
    whole_top = hi == 0 or (hi >= 1 and hi.is_integer())
    if lo >= 0 and whole_top and bool(np.all((values == 0) | (values == hi))):
        return None
    distinct = np.unique(values).size
    return (
        f"not a binary mask (values {lo:g}..{hi:g}, {distinct} distinct): "
        "a probability map? pass --threshold T"
    )


def _read_prediction(path: Path, threshold: float | None) -> tuple[np.ndarray, Geometry]:
    """A predicted lesion mask (bool ``[z, y, x]``) and its geometry.

    Without `threshold` the file must hold a binary mask (:func:`_not_binary`), else InputError;
    with one, voxels >= `threshold` are lesion.
    """
    values, geometry = read_labels(path)
    if threshold is not None:
        return values >= threshold, geometry
    cause = _not_binary(values)
    if cause is not None:
        raise InputError(path, cause)
    return values > 0, geometry


def _evaluate_case(
    case_id: str, pred_path: Path, ref_path: Path, per_slice: bool, threshold: float | None = None
) -> tuple[dict, np.ndarray]:
    pred_mask, pred_geometry = _read_prediction(pred_path, threshold)
    ref_mask, ref_geometry = read_mask(ref_path)
    if not pred_geometry.matches(ref_geometry):
        reason = pred_geometry.describe_mismatch(ref_geometry)
        raise InputError(pred_path, f"geometry differs from reference {ref_path}: {reason}")
    record = {"case_id": case_id, "pred": str(pred_path), "ref": str(ref_path)}
    record.update(case_metrics(pred_mask, ref_mask, ref_geometry.spacing_zyx))
    slices = np.zeros(0)
    if per_slice:
        slices = per_slice_dice(pred_mask, ref_mask)
        stats = summarize_slice_dice(slices)
        record["lesion_slices"] = stats["n_slices"]
        record["slice_dice_mean"] = stats["mean"]
        record["slice_dice_std"] = stats["std"]
    return record, slices


def run_evaluate(
    pred: Path,
    ref: Path,
    out_dir: Path,
    min_dice: float | None = None,
    min_sensitivity: float | None = None,
    min_specificity: float | None = None,
    per_slice: bool = False,
    progress: Progress | None = None,
    overwrite: bool = False,
    threshold: float | None = None,
    allow_missing: bool = False,
) -> EvaluationResult:
    """Evaluate the masks in `pred` against `ref`; write metrics.csv and summary.json to `out_dir`.

    `threshold` binarises probability-map predictions (voxel >= threshold); without it a prediction
    that is not a binary mask is a failed case. With any `min_*` threshold, references without a
    prediction fail the evaluation (``failed_missing``) unless `allow_missing`.

    Raises :class:`UsageError` for a missing input, a negative or non-finite threshold, an output
    folder that holds an input, a previous report (unless `overwrite`) or cannot be written, or when
    no case id is shared by `pred` and `ref`. Per-case problems (unreadable file, geometry mismatch,
    not a binary mask) are recorded in ``failed_cases`` instead of raised.
    """
    pred, ref, out_dir = Path(pred), Path(ref), Path(out_dir)
    thresholds = {"dice": min_dice, "sensitivity": min_sensitivity, "specificity": min_specificity}
    _check_arguments(pred, ref, out_dir, thresholds, threshold, overwrite)
    predictions, references = dict(find_cases(pred)), dict(_references(ref))
    matched, unmatched = _match(pred, ref, predictions, references)
    pairs = [(case_id, predictions[case_id], references[case_id]) for case_id in matched]
    cases, slice_dice, failed_cases = _evaluate_cases(pairs, per_slice, threshold, progress)

    summary_stats = aggregate(cases, slice_dice if per_slice else None)
    failed_thresholds = _failed_thresholds(thresholds, summary_stats)
    gated = any(minimum is not None for minimum in thresholds.values())
    failed_missing = None
    if gated and not allow_missing:
        failed_missing = _missing_predictions(pred, unmatched["ref_without_pred"], len(references))
    summary = _json_safe(
        {
            "format": FORMAT,
            "version": VERSION,
            "covidseg_version": __version__,
            "pred": str(pred),
            "ref": str(ref),
            "n_cases": len(cases),
            "aggregate": summary_stats,
            "thresholds": {f"min_{name}": value for name, value in thresholds.items()},
            "failed_thresholds": failed_thresholds,
            "threshold": threshold,
            "allow_missing": allow_missing,
            "failed_missing": failed_missing,
            "failed_cases": failed_cases,
            "unmatched": unmatched,
            "cases": cases,
        }
    )
    for record in (summary, *summary["cases"], *summary["failed_cases"]):  # as summary.json stores them
        record.update({key: portable_path(record[key], out_dir) for key in ("pred", "ref")})
    columns = CSV_COLUMNS + (PER_SLICE_COLUMNS if per_slice else ())
    metrics_csv, summary_json = out_dir / METRICS_CSV, out_dir / SUMMARY_JSON
    write_csv(metrics_csv, columns, ([_csv_cell(case.get(col)) for col in columns] for case in cases))
    write_json(summary_json, summary)
    return EvaluationResult(
        cases=cases,
        summary=summary,
        failed_thresholds=failed_thresholds,
        failed_cases=failed_cases,
        metrics_csv=metrics_csv,
        summary_json=summary_json,
        unmatched=unmatched,
        failed_missing=failed_missing,
    )


def _check_arguments(
    pred: Path, ref: Path, out_dir: Path, thresholds: dict, threshold: float | None, overwrite: bool
) -> None:
    """UsageError for a bad threshold, a missing input, an output folder that holds an input or (unless
    `overwrite`) a previous report, or one that cannot be written."""
    for name, value in thresholds.items():
        _check_threshold(name, value)
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise UsageError(None, f"--threshold must be a finite number > 0, got {threshold}")
    for label, path in (("--pred", pred), ("--ref", ref)):
        if not path.exists():
            raise UsageError(path, f"{label}: no such file or folder")
        if out_dir.resolve() in (path.resolve(), *path.resolve().parents):
            raise UsageError(out_dir, f"output folder contains the input {label} {path}; choose another")
    if not overwrite and any((out_dir / name).exists() for name in (METRICS_CSV, SUMMARY_JSON)):
        raise UsageError(out_dir, "holds a previous evaluation report; pass --overwrite to replace it")
    check_output_dir(out_dir)


def _match(pred: Path, ref: Path, predictions: dict, references: dict) -> tuple[list[str], dict]:
    """The case ids found on both sides (sorted) and the unmatched ones of each side; UsageError when
    no id is shared."""
    matched = sorted(predictions.keys() & references.keys())
    unmatched = {
        "ref_without_pred": sorted(references.keys() - predictions.keys()),
        "pred_without_ref": sorted(predictions.keys() - references.keys()),
    }
    if not matched:
        raise UsageError(
            None,
            f"no case id in common between --pred {pred} ({len(predictions)} cases) "
            f"and --ref {ref} ({len(references)} cases)",
        )
    return matched, unmatched


def _evaluate_cases(
    pairs: list[tuple[str, Path, Path]], per_slice: bool, threshold: float | None, progress: Progress | None
) -> tuple[list[dict], list[np.ndarray], list[dict]]:
    """Evaluate each (case id, prediction, reference): the records of the evaluated cases, their
    per-slice Dice, and a record with the error of each case that could not be evaluated."""
    cases: list[dict] = []
    slice_dice: list[np.ndarray] = []
    failed_cases: list[dict] = []
    for i, (case_id, pred_path, ref_path) in enumerate(pairs, start=1):
        try:
            record, slices = _evaluate_case(case_id, pred_path, ref_path, per_slice, threshold)
        except CovidsegError as exc:
            failed_cases.append(
                {"case_id": case_id, "pred": str(pred_path), "ref": str(ref_path), "error": str(exc)}
            )
            message = f"failed: {exc}"
        else:
            cases.append(record)
            slice_dice.append(slices)
            dice, hd95, lesion_ml = record["dice"], record["hd95_mm"], record["ref_ml"]
            message = f"dice {dice:.3f}, hd95 {hd95:.1f} mm, lesion {lesion_ml:.1f} mL"
        if progress is not None:
            progress(i, len(pairs), f"{case_id}: {message}")
    return cases, slice_dice, failed_cases


def _failed_thresholds(thresholds: dict[str, float | None], summary_stats: dict) -> list[str]:
    """One line per threshold the mean over cases does not reach (e.g. "dice 0.812 < 0.9"); an
    undefined mean fails."""
    failed = []
    for name, minimum in thresholds.items():
        if minimum is None:
            continue
        mean = summary_stats["metrics"][name]["mean"] if name in summary_stats["metrics"] else math.nan
        if math.isnan(mean):
            failed.append(f"{name} undefined (no case with a defined value) < {minimum:g}")
        elif mean < minimum:
            failed.append(f"{name} {_format_below(mean, minimum)} < {minimum:g}")
    return failed


def _missing_predictions(pred: Path, missing: list[str], n_references: int) -> str | None:
    """The gate's message when references have no prediction (`missing` case ids), else None."""
    if not missing:
        return None
    shown = ", ".join(missing[:MISSING_SHOWN]) + (", …" if len(missing) > MISSING_SHOWN else "")
    return (
        f"{pred}: {len(missing)} of {n_references} reference case(s) have no prediction: {shown} "
        "(pass --allow-missing to gate on the predicted cases only)"
    )

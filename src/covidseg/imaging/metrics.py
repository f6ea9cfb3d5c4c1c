"""Segmentation metrics on boolean masks: overlap, surface distance (mm) and volume (mL).

All masks are boolean arrays of equal shape ``[z, y, x]``; ``spacing_zyx`` is the voxel size in mm
along the same axes (never assume isotropy: thick-slice CT has 5-8 mm between slices).

Definitions (counts over all voxels of the volume)
--------------------------------------------------
* Dice = 2TP / (2TP + FP + FN); IoU = TP / (TP + FP + FN)
* sensitivity (recall) = TP / (TP + FN); specificity = TN / (TN + FP); precision = TP / (TP + FP)
* HD95 (mm) = the 95th percentile (linear interpolation, :func:`numpy.percentile`) of the
  *symmetric* surface distances: the distances from every surface voxel of `pred` to the nearest
  surface voxel of `ref`, pooled with those from `ref` to `pred` (as ``medpy.metric.hd95``).
  A surface voxel is a mask voxel with at least one 6-connected neighbour outside the mask
  (mask minus its erosion; the array border counts as outside).
* volumes in mL (1 mL = 1000 mm³).

Empty-mask conventions
----------------------
=====================  =====  =====  ===========  =========  ======  =====
case                   Dice   IoU    sensitivity  precision  HD95    note
=====================  =====  =====  ===========  =========  ======  =====
both empty             1      1      NaN          NaN        0 mm    nothing to find, nothing found
ref empty, pred not    0      0      NaN          0          NaN     sensitivity undefined
ref not, pred empty    0      0      0            NaN        NaN     precision undefined
=====================  =====  =====  ===========  =========  ======  =====

Specificity is NaN when there are no negatives (TN + FP = 0, the reference fills the volume).
NaN means *undefined*: :func:`aggregate` leaves NaN values out of means and counts them as
``n_undefined``; writers must store them as JSON ``null`` (never as the non-standard ``NaN``).

Aggregation
-----------
:func:`aggregate` reports, for each metric, the mean and the *population* standard deviation
(``ddof=0``) over cases, plus pooled (global) Dice/sensitivity/specificity computed from the summed
counts, which weights every voxel equally instead of every case. The per-slice statistic is the
mean ± population std of Dice over all lesion-containing axial slices of all cases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage, spatial

#: Per-case metrics that :func:`aggregate` summarises (the counts are pooled instead).
METRIC_KEYS = (
    "dice",
    "iou",
    "sensitivity",
    "specificity",
    "precision",
    "hd95_mm",
    "pred_ml",
    "ref_ml",
    "abs_volume_diff_ml",
)
COUNT_KEYS = ("tp", "fp", "fn", "tn")

NAN = float("nan")


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} != ref shape {ref.shape}")
    return pred, ref


def _check_spacing(spacing_zyx: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be {ndim} positive values in mm, got {spacing_zyx}")
    return spacing


def _ratio(num: int, den: int) -> float:
    return num / den if den else NAN


def confusion(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int, int]:
    """Voxel counts ``(tp, fp, fn, tn)`` of boolean `pred` against boolean `ref` (same shape)."""
    pred, ref = _check_pair(pred, ref)
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(ref)) - tp
    tn = int(pred.size) - tp - fp - fn
    return tp, fp, fn, tn


def dice(tp: int, fp: int, fn: int) -> float:
    """Dice = 2TP / (2TP + FP + FN), in [0, 1]; 1.0 when both masks are empty."""
    den = 2 * tp + fp + fn
    return 2 * tp / den if den else 1.0


def iou(tp: int, fp: int, fn: int) -> float:
    """Intersection over union (Jaccard) = TP / (TP + FP + FN); 1.0 when both masks are empty."""
    den = tp + fp + fn
    return tp / den if den else 1.0


def sensitivity(tp: int, fn: int) -> float:
    """Sensitivity (recall) = TP / (TP + FN); NaN when the reference is empty (nothing to find)."""
    return _ratio(tp, tp + fn)


def specificity(tn: int, fp: int) -> float:
    """Specificity = TN / (TN + FP); NaN when the reference has no negative voxels."""
    return _ratio(tn, tn + fp)


def precision(tp: int, fp: int) -> float:
    """Precision (positive predictive value) = TP / (TP + FP); NaN when the prediction is empty."""
    return _ratio(tp, tp + fp)


def volume_ml(mask: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """Volume of a boolean mask in mL (1 mL = 1000 mm³), `spacing_zyx` in mm."""
    mask = np.asarray(mask, dtype=bool)
    spacing = _check_spacing(spacing_zyx, mask.ndim)
    return int(np.count_nonzero(mask)) * math.prod(spacing) / 1000.0


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a 6-connected (face) neighbour outside the mask or outside the array."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _joint_crop(pred: np.ndarray, ref: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Slices of the joint bounding box of two non-empty masks, grown by `margin` voxels.

    A margin of one voxel keeps the erosion (a 1-voxel neighbourhood) identical to the uncropped
    one; where the box meets the array border the crop stops there, exactly as the array does.
    Every surface voxel of both masks lies inside the box, so distances between them are unchanged.
    """
    union = pred | ref
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(np.any(union, axis=other))
        lo = max(int(hits[0]) - margin, 0)
        hi = min(int(hits[-1]) + 1 + margin, union.shape[axis])
        slices.append(slice(lo, hi))
    return tuple(slices)


def surface_distances_mm(
    pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (pred surface -> ref surface, ref surface -> pred surface).

    Both masks must be non-empty. Surfaces are found on the joint bounding box only (plus a
    one-voxel margin, so the erosion is the uncropped one); the exact Euclidean distance from each
    surface voxel centre to the nearest surface voxel centre of the other mask (in mm, through
    `spacing_zyx`) comes from a k-d tree over the surface points. This equals
    ``distance_transform_edt(~surface, sampling=spacing)`` read at the other surface, but its cost
    grows with the number of surface voxels, not with the box: scattered lesions across both
    lungs of a 512x512x300 CT span most of the volume, where two distance transforms take ~8 s.
    """
    pred, ref = _check_pair(pred, ref)
    spacing = _check_spacing(spacing_zyx, pred.ndim)
    if not pred.any() or not ref.any():
        raise ValueError("surface distances need two non-empty masks")
    crop = _joint_crop(pred, ref)
    scale = np.asarray(spacing, dtype=np.float64)
    pred_points = np.argwhere(_surface(pred[crop])) * scale  # [n, ndim] mm
    ref_points = np.argwhere(_surface(ref[crop])) * scale  # [m, ndim] mm
    to_ref = spatial.KDTree(ref_points).query(pred_points, workers=-1)[0]
    to_pred = spatial.KDTree(pred_points).query(ref_points, workers=-1)[0]
    return to_ref, to_pred


def hd95_mm(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """95th percentile of the symmetric surface distances, in mm (see the module docstring).

    0.0 when both masks are empty; NaN when exactly one is empty (no surface to measure to).
    """
    pred, ref = _check_pair(pred, ref)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not (has_pred and has_ref):
        _check_spacing(spacing_zyx, pred.ndim)
        return NAN if has_pred or has_ref else 0.0
    to_ref, to_pred = surface_distances_mm(pred, ref, spacing_zyx)
    return float(np.percentile(np.concatenate([to_ref, to_pred]), 95))


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float]) -> dict:
    """All metrics of one case, as plain Python numbers.

    Keys: ``dice, iou, sensitivity, specificity, precision`` (fractions in [0, 1]), ``hd95_mm``
    (mm), ``pred_ml, ref_ml, abs_volume_diff_ml`` (mL), ``tp, fp, fn, tn`` (voxel counts).
    Undefined values are NaN (see the module docstring).
    """
    pred, ref = _check_pair(pred, ref)
    spacing = _check_spacing(spacing_zyx, pred.ndim)
    tp, fp, fn, tn = confusion(pred, ref)
    voxel_ml = math.prod(spacing) / 1000.0
    pred_ml = (tp + fp) * voxel_ml
    ref_ml = (tp + fn) * voxel_ml
    return {
        "dice": dice(tp, fp, fn),
        "iou": iou(tp, fp, fn),
        "sensitivity": sensitivity(tp, fn),
        "specificity": specificity(tn, fp),
        "precision": precision(tp, fp),
        "hd95_mm": hd95_mm(pred, ref, spacing),
        "pred_ml": pred_ml,
        "ref_ml": ref_ml,
        "abs_volume_diff_ml": abs(pred_ml - ref_ml),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def per_slice_dice(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Dice of each slice along axis 0 (z) that holds reference lesion; float64, one per such slice.

    Slices without reference lesion are left out (there Dice only measures false positives).
    """
    pred, ref = _check_pair(pred, ref)
    if pred.ndim < 2:
        raise ValueError(f"per-slice Dice needs at least 2D masks, got shape {pred.shape}")
    other = tuple(range(1, pred.ndim))
    ref_n = np.count_nonzero(ref, axis=other)
    pred_n = np.count_nonzero(pred, axis=other)
    tp_n = np.count_nonzero(pred & ref, axis=other)
    lesion = ref_n > 0
    return (2.0 * tp_n[lesion] / (pred_n[lesion] + ref_n[lesion])).astype(np.float64)


def summarize_slice_dice(values: np.ndarray) -> dict:
    """``{"mean", "std", "n_slices"}`` of per-slice Dice values (population std, ``ddof=0``).

    Mean and std are NaN when there are no values (no lesion-containing slice).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return {"mean": NAN, "std": NAN, "n_slices": 0}
    return {"mean": float(values.mean()), "std": float(values.std(ddof=0)), "n_slices": int(values.size)}


def _as_float(value: object) -> float:
    """A metric value as float; None (JSON null) counts as undefined."""
    return NAN if value is None else float(value)


def _summary(values: Sequence[float]) -> dict:
    defined = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if defined.size == 0:
        return {"mean": NAN, "std": NAN, "n": 0, "n_undefined": len(values)}
    return {
        "mean": float(defined.mean()),
        "std": float(defined.std(ddof=0)),
        "n": int(defined.size),
        "n_undefined": len(values) - int(defined.size),
    }


def aggregate(cases: Sequence[Mapping], slice_dice: Sequence[np.ndarray] | None = None) -> dict:
    """Summarise per-case metric dicts (from :func:`case_metrics`) over cases.

    Returns ``{"n_cases", "metrics", "pooled", "per_slice_dice"}``:

    * ``metrics[key] = {"mean", "std", "n", "n_undefined"}`` for each key of :data:`METRIC_KEYS`
      present in the cases; NaN (or None) values are left out of mean/std (population std,
      ``ddof=0``) and counted in ``n_undefined``; mean and std are NaN when ``n == 0``.
    * ``pooled = {"dice", "sensitivity", "specificity", "tp", "fp", "fn", "tn"}`` from the counts
      summed over cases (e.g. pooled Dice = 2ΣTP / (2ΣTP + ΣFP + ΣFN)).
    * ``per_slice_dice = {"mean", "std", "n_slices"}`` over all values of `slice_dice` (one array
      per case from :func:`per_slice_dice`), or None when `slice_dice` is None.
    """
    metrics = {}
    for key in METRIC_KEYS:
        if any(key in case for case in cases):
            metrics[key] = _summary([_as_float(case[key]) for case in cases if key in case])
    tp, fp, fn, tn = (sum(int(case.get(key, 0)) for case in cases) for key in COUNT_KEYS)
    pooled = {
        "dice": dice(tp, fp, fn),
        "sensitivity": sensitivity(tp, fn),
        "specificity": specificity(tn, fp),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }
    per_slice = None
    if slice_dice is not None:
        per_slice = summarize_slice_dice(
            np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in slice_dice])
            if len(slice_dice)
            else np.zeros(0)
        )
    return {"n_cases": len(cases), "metrics": metrics, "pooled": pooled, "per_slice_dice": per_slice}

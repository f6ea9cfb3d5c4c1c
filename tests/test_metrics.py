"""Metrics against hand-computed values on tiny masks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import ndimage

from covidseg.imaging import metrics
from covidseg.imaging.metrics import (
    aggregate,
    case_metrics,
    confusion,
    dice,
    hd95_mm,
    iou,
    per_slice_dice,
    precision,
    sensitivity,
    specificity,
    surface_distances_mm,
    volume_ml,
)


def line(values: str) -> np.ndarray:
    """A 1x1xN mask from a string of 0/1, e.g. '0110'."""
    return np.array([c == "1" for c in values], dtype=bool).reshape(1, 1, -1)


# pred 11100100, ref 01110000: TP at 1,2; FP at 0,5; FN at 3; TN at 4,6,7.
PRED = line("11100100")
REF = line("01110000")


def test_confusion_counts_by_hand():
    assert confusion(PRED, REF) == (2, 2, 1, 3)


def test_ratios_by_hand():
    tp, fp, fn, tn = confusion(PRED, REF)
    assert dice(tp, fp, fn) == pytest.approx(4 / 7)
    assert iou(tp, fp, fn) == pytest.approx(2 / 5)
    assert sensitivity(tp, fn) == pytest.approx(2 / 3)
    assert specificity(tn, fp) == pytest.approx(3 / 5)
    assert precision(tp, fp) == pytest.approx(1 / 2)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        confusion(np.zeros((1, 2, 3), bool), np.zeros((1, 3, 2), bool))


def test_volume_ml_uses_spacing():
    mask = np.zeros((4, 4, 4), bool)
    mask[0, 0, :] = True
    mask[1, :, 0] = True  # 4 + 4 = 8 voxels
    # 2 mm x 0.5 mm x 0.5 mm = 0.5 mm³ per voxel -> 4 mm³ = 0.004 mL
    assert volume_ml(mask, (2.0, 0.5, 0.5)) == pytest.approx(0.004)
    with pytest.raises(ValueError, match="spacing"):
        volume_ml(mask, (1.0, 0.0, 1.0))


def test_hd95_single_voxel_shift_anisotropic():
    pred = np.zeros((5, 5, 5), bool)
    ref = np.zeros((5, 5, 5), bool)
    pred[1, 2, 2] = True
    ref[3, 2, 2] = True  # 2 voxels along z at 2.5 mm
    assert hd95_mm(pred, ref, (2.5, 0.7, 0.7)) == pytest.approx(5.0)
    pred[1, 2, 2], pred[3, 2, 4] = False, True  # 2 voxels along x at 0.7 mm
    assert hd95_mm(pred, ref, (2.5, 0.7, 0.7)) == pytest.approx(1.4)


def test_hd95_two_voxel_shift_of_a_segment():
    # In a 1x1xN array every mask voxel is a surface voxel. Shift by 2 voxels of 0.5 mm along x:
    pred, ref = line("1111100000"), line("0011111000")
    to_ref, to_pred = surface_distances_mm(pred, ref, (3.0, 2.0, 0.5))
    np.testing.assert_allclose(to_ref, [1.0, 0.5, 0, 0, 0])
    np.testing.assert_allclose(to_pred, [0, 0, 0, 0.5, 1.0])
    # pooled, sorted: 0 x6, 0.5, 0.5, 1, 1 -> 95th percentile at position 8.55 -> 1.0
    assert hd95_mm(pred, ref, (3.0, 2.0, 0.5)) == pytest.approx(1.0)


def test_hd95_ignores_a_single_outlier_distance():
    # 41 surface distances, one of them 1 mm: the 95th percentile (position 38 of 0..40) is 0.
    pred, ref = line("1" * 20 + "0" * 10), line("1" * 21 + "0" * 9)
    assert hd95_mm(pred, ref, (1.0, 1.0, 1.0)) == 0.0
    to_ref, to_pred = surface_distances_mm(pred, ref, (1.0, 1.0, 1.0))
    assert max(to_ref.max(), to_pred.max()) == 1.0  # the Hausdorff distance would be 1 mm


def _brute_force_hd95(pred, ref, spacing):
    """All-pairs distances between surface voxels (6-neighbour definition, border = outside)."""

    def surface_points(mask):
        padded = np.pad(mask, 1)
        inner = padded[1:-1, 1:-1, 1:-1].copy()
        for axis, step in itertools.product(range(3), (-1, 1)):
            inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    p, r = surface_points(pred), surface_points(ref)
    d = np.sqrt(((p[:, None, :] - r[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


@pytest.mark.parametrize("seed", range(6))
def test_hd95_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (7, 9, 8)
    pred = np.zeros(shape, bool)
    ref = np.zeros(shape, bool)
    # random boxes, some touching the array border, to exercise the crop and its margin
    for mask in (pred, ref):
        for _ in range(2):
            lo = rng.integers(0, np.array(shape) - 1)
            hi = lo + rng.integers(1, 5, size=3)
            mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    spacing = (2.5, 0.8, 0.6)
    assert hd95_mm(pred, ref, spacing) == pytest.approx(_brute_force_hd95(pred, ref, spacing))


def _uncropped_edt_distances(pred, ref, spacing):
    """The textbook way: distance transforms of the full volume, read at the other surface."""
    pred_surface = pred & ~ndimage.binary_erosion(pred)
    ref_surface = ref & ~ndimage.binary_erosion(ref)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]
    return to_ref, to_pred


def test_surface_distances_equal_full_volume_distance_transform():
    shape = (40, 96, 96)
    pred = np.zeros(shape, bool)
    ref = np.zeros(shape, bool)
    ref[10:16, 30:45, 50:60] = True
    ref[30:40, 80:96, 0:5] = True  # a second lesion touching the array border
    pred[11:18, 33:47, 48:58] = True
    pred[25:35, 70:90, 3:9] = True
    spacing = (5.0, 0.75, 0.75)
    got = surface_distances_mm(pred, ref, spacing)
    expected = _uncropped_edt_distances(pred, ref, spacing)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b)
    assert hd95_mm(pred, ref, spacing) == pytest.approx(_brute_force_hd95(pred, ref, spacing))


def test_empty_conventions():
    empty, some = line("0000"), line("0110")
    both = case_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert both["dice"] == 1.0 and both["iou"] == 1.0 and both["hd95_mm"] == 0.0
    assert math.isnan(both["sensitivity"]) and math.isnan(both["precision"])
    assert both["specificity"] == 1.0

    fp_only = case_metrics(some, empty, (1.0, 1.0, 1.0))
    assert fp_only["dice"] == 0.0 and fp_only["iou"] == 0.0 and fp_only["precision"] == 0.0
    assert math.isnan(fp_only["sensitivity"]) and math.isnan(fp_only["hd95_mm"])
    assert fp_only["specificity"] == pytest.approx(2 / 4)

    missed = case_metrics(empty, some, (1.0, 1.0, 1.0))
    assert missed["dice"] == 0.0 and missed["sensitivity"] == 0.0
    assert math.isnan(missed["hd95_mm"]) and math.isnan(missed["precision"])

    full = line("1111")
    assert math.isnan(case_metrics(full, full, (1.0, 1.0, 1.0))["specificity"])  # no negatives


def test_case_metrics_by_hand():
    spacing = (2.0, 1.0, 0.5)  # 1 mm³ per voxel
    result = case_metrics(PRED, REF, spacing)
    assert set(result) == set(metrics.METRIC_KEYS) | set(metrics.COUNT_KEYS)
    assert (result["tp"], result["fp"], result["fn"], result["tn"]) == (2, 2, 1, 3)
    assert result["dice"] == pytest.approx(4 / 7)
    assert result["pred_ml"] == pytest.approx(0.004)
    assert result["ref_ml"] == pytest.approx(0.003)
    assert result["abs_volume_diff_ml"] == pytest.approx(0.001)
    # distances along x at 0.5 mm: pred->ref 0.5, 0, 0, 1.0 ; ref->pred 0, 0, 0.5
    # sorted 0,0,0,0,0.5,0.5,1.0 -> position 5.7 -> 0.5 + 0.7 * 0.5
    assert result["hd95_mm"] == pytest.approx(0.85)
    assert all(type(result[k]) is int for k in metrics.COUNT_KEYS)


def test_per_slice_dice_skips_slices_without_reference():
    ref = np.zeros((3, 2, 2), bool)
    pred = np.zeros((3, 2, 2), bool)
    pred[0, 0, 0] = True  # false positive on a slice without lesion: left out
    ref[1, 0, :] = True
    pred[1, :, 0] = True  # 1 overlap of 2 + 2 -> 0.5
    ref[2, 1, 1] = pred[2, 1, 1] = True  # -> 1.0
    np.testing.assert_allclose(per_slice_dice(pred, ref), [0.5, 1.0])
    assert per_slice_dice(pred, np.zeros_like(ref)).size == 0


def _two_cases():
    # A: ref 0..99, pred 10..109 in 200 voxels -> TP 90, FP 10, FN 10, TN 90; Dice 0.9
    a_ref = np.zeros(200, bool)
    a_ref[:100] = True
    a_pred = np.zeros(200, bool)
    a_pred[10:110] = True
    # B: ref 0..9, pred 0 in 20 voxels -> TP 1, FP 0, FN 9, TN 10; Dice 2/11
    b_ref = np.zeros(20, bool)
    b_ref[:10] = True
    b_pred = np.zeros(20, bool)
    b_pred[0] = True
    return [
        case_metrics(p.reshape(1, 1, -1), r.reshape(1, 1, -1), (1.0, 1.0, 1.0))
        for p, r in ((a_pred, a_ref), (b_pred, b_ref))
    ]


def test_aggregate_mean_differs_from_pooled():
    cases = _two_cases()
    assert cases[0]["dice"] == pytest.approx(0.9)
    assert cases[1]["dice"] == pytest.approx(2 / 11)
    result = aggregate(cases)
    assert result["n_cases"] == 2
    d = result["metrics"]["dice"]
    assert d["mean"] == pytest.approx((0.9 + 2 / 11) / 2)
    assert d["std"] == pytest.approx((0.9 - 2 / 11) / 2)  # population std of two values
    assert (d["n"], d["n_undefined"]) == (2, 0)
    pooled = result["pooled"]
    assert (pooled["tp"], pooled["fp"], pooled["fn"], pooled["tn"]) == (91, 10, 19, 100)
    assert pooled["dice"] == pytest.approx(182 / 211)
    assert pooled["sensitivity"] == pytest.approx(91 / 110)
    assert pooled["specificity"] == pytest.approx(100 / 110)
    assert result["per_slice_dice"] is None


def test_aggregate_excludes_undefined_values():
    cases = _two_cases()
    cases.append(case_metrics(line("0110"), line("0000"), (1.0, 1.0, 1.0)))  # sensitivity NaN
    sens = aggregate(cases)["metrics"]["sensitivity"]
    assert (sens["n"], sens["n_undefined"]) == (2, 1)
    assert sens["mean"] == pytest.approx((0.9 + 0.1) / 2)
    # JSON null (None) counts as undefined as well
    cases[2] = dict(cases[2], sensitivity=None)
    assert aggregate(cases)["metrics"]["sensitivity"]["n_undefined"] == 1


def test_aggregate_of_nothing_is_undefined():
    result = aggregate([])
    assert result["n_cases"] == 0 and result["metrics"] == {}
    assert result["pooled"]["dice"] == 1.0  # no voxels at all: the both-empty convention
    assert math.isnan(result["pooled"]["sensitivity"])
    one = aggregate([{"dice": float("nan"), "tp": 0, "fp": 0, "fn": 0, "tn": 0}])
    assert math.isnan(one["metrics"]["dice"]["mean"]) and one["metrics"]["dice"]["n"] == 0


def test_aggregate_per_slice_is_mean_and_std_over_all_slices():
    result = aggregate(_two_cases(), slice_dice=[np.array([0.5, 1.0]), np.array([0.0])])
    per_slice = result["per_slice_dice"]
    assert per_slice["n_slices"] == 3
    assert per_slice["mean"] == pytest.approx(0.5)
    assert per_slice["std"] == pytest.approx(math.sqrt(1 / 6))
    empty = aggregate([], slice_dice=[])["per_slice_dice"]
    assert empty["n_slices"] == 0 and math.isnan(empty["mean"])

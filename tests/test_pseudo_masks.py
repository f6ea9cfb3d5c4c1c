"""Hysteresis refinement of the pseudo-masks (``grow_percentile``): the lower threshold calibrated on
healthy lungs, seeds growing into connected less certain tissue, and off == the plain threshold; and the
trivial HU-threshold baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from covidseg.imaging.grid import DEFAULT_HU_SCALE, HuScale
from covidseg.method.pseudo_masks import (
    BASELINE_HU,
    BASELINE_MIN_COMPONENT,
    PseudoMaskConfig,
    binarise,
    calibrate_grow_threshold,
    calibrate_threshold,
    calibration_record,
    grow_from_seeds,
    hu_threshold_baseline,
    refined_mask,
    threshold_baseline,
)
from covidseg.settings import SettingError, check_config

HIGH, LOW = 0.10, 0.04  # thresholds on the [0, 1] difference scale


def _difference() -> tuple[np.ndarray, np.ndarray]:
    """A difference map [z, y, x] and its lung: a confident core (above HIGH) inside a connected halo
    (between LOW and HIGH), an isolated blob between LOW and HIGH, and a halo part outside the lung."""
    diff = np.zeros((6, 40, 40), np.float32)
    diff[1:5, 5:20, 5:20] = 0.06  # halo, connected to the core
    diff[2:4, 10:14, 10:14] = 0.3  # confident core (32 voxels)
    diff[1:5, 28:36, 28:36] = 0.06  # isolated blob above LOW only
    lung = np.ones(diff.shape, np.uint8)
    lung[:, :, 17:] = 0  # the halo's columns 17..19 lie outside the lung
    lung[:, 25:, 25:] = 1  # the blob's corner is lung
    return diff, lung


def test_a_seed_grows_into_its_connected_low_region_but_an_isolated_blob_is_not_added():
    diff, lung = _difference()
    seeds = binarise(diff, HIGH, min_component=20)
    assert seeds.sum() == 32
    grown = grow_from_seeds(diff, seeds, lung, LOW)
    halo = np.zeros_like(seeds)
    halo[1:5, 5:20, 5:17] = True  # the halo inside the lung
    assert np.array_equal(grown, halo)  # seeds included, the blob and the halo outside the lung not
    assert not grown[1:5, 28:36, 28:36].any()
    assert np.array_equal(refined_mask(diff, lung, HIGH, 20, LOW), grown)
    # no seed: nothing grows; a seed removed as a small component does not grow either
    assert not grow_from_seeds(diff, np.zeros_like(seeds), lung, LOW).any()
    assert not refined_mask(diff, lung, HIGH, 33, LOW).any()


def test_off_is_the_plain_threshold():
    diff, lung = _difference()
    plain = binarise(diff, HIGH, min_component=20)
    assert np.array_equal(refined_mask(diff, lung, HIGH, 20, None), plain)
    healthy = [np.linspace(0, 0.2, 1000, dtype=np.float32).reshape(10, 10, 10)]
    lungs = [np.ones((10, 10, 10))]
    off = PseudoMaskConfig(healthy_percentile=99.0, grow_percentile=None)  # the recipe before issue 16
    record = calibration_record(healthy, lungs, off, DEFAULT_HU_SCALE)
    assert "grow_percentile" not in record and "grow_threshold" not in record
    assert calibrate_grow_threshold(healthy, lungs, off, DEFAULT_HU_SCALE) is None
    assert PseudoMaskConfig().grow_percentile == 98.0  # on by default


def test_the_lower_threshold_is_calibrated_on_healthy_lungs_and_not_above_the_main_one():
    healthy = [np.linspace(0, 1, 1000, dtype=np.float32).reshape(10, 10, 10)]
    lungs = [np.ones((10, 10, 10))]
    cfg = PseudoMaskConfig(healthy_percentile=99.0, min_threshold_hu=0.0, grow_percentile=90.0)
    low = calibrate_grow_threshold(healthy, lungs, cfg, DEFAULT_HU_SCALE)
    assert low == pytest.approx(0.90, abs=1e-3)
    assert low <= calibrate_threshold(healthy, lungs, cfg, DEFAULT_HU_SCALE)
    record = calibration_record(healthy, lungs, cfg, DEFAULT_HU_SCALE)
    assert record["grow_percentile"] == 90.0 and record["grow_threshold"] == low
    assert record["threshold"] == pytest.approx(0.99, abs=1e-3)
    # the same floor as the main threshold: 700 HU is 0.5 on the default [0, 1] scale
    floored = PseudoMaskConfig(min_threshold_hu=700.0, grow_percentile=90.0)
    quiet = [healthy[0] * 0.2]  # healthy differences up to 0.2: both percentiles below the floor
    assert calibrate_grow_threshold(quiet, lungs, floored, DEFAULT_HU_SCALE) == pytest.approx(0.5)
    # healthy lungs outside the lung mask do not count
    masked = [np.where(np.arange(1000).reshape(10, 10, 10) < 500, 1, 0)]
    assert calibrate_grow_threshold(healthy, masked, cfg, DEFAULT_HU_SCALE) == pytest.approx(0.45, abs=1e-3)


@pytest.mark.parametrize(
    ("values", "cause"),
    [
        ({"grow_percentile": 50.0}, "must be a number in (50, 100) or none"),
        ({"grow_percentile": 100.0}, "must be a number in (50, 100) or none"),
        ({"grow_percentile": math.nan}, "must be a number in (50, 100) or none"),
        ({"grow_percentile": "95"}, "must be a number in (50, 100) or none"),
        ({"grow_percentile": 99.9}, "must be <= healthy_percentile (99.8)"),
        ({"grow_percentile": 96.0, "healthy_percentile": 95.0}, "must be <= healthy_percentile (95.0)"),
    ],
)
def test_bad_grow_settings_are_refused(values, cause):
    with pytest.raises(SettingError, match="grow_percentile") as caught:
        check_config(PseudoMaskConfig(**values))
    assert cause in str(caught.value)
    check_config(PseudoMaskConfig(grow_percentile=95.0))  # a good one passes
    check_config(PseudoMaskConfig(grow_percentile=99.0))


def _baseline_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU [z, y, x] (float64), its lung and the voxels the baseline must flag: a dense 27-voxel blob in
    the lung (flagged), a dense blob outside it, a 2-voxel dense speck in the lung (under 20 voxels,
    dropped) and a 27-voxel blob at exactly -600 HU (not above the level)."""
    hu = np.full((5, 24, 24), -850.0)
    lung = np.zeros(hu.shape, np.uint8)
    lung[:, :, :12] = 1
    hu[1:4, 2:5, 2:5] = -100.0  # dense blob in the lung: kept
    hu[1:4, 2:5, 16:19] = -100.0  # dense blob outside the lung
    hu[2, 15:17, 8] = -300.0  # 2-voxel speck in the lung
    hu[1:4, 18:21, 2:5] = -600.0  # at the level, not above it
    expected = np.zeros(hu.shape, bool)
    expected[1:4, 2:5, 2:5] = True
    return hu, lung, expected


def test_the_hu_baseline_flags_dense_lung_components_of_20_voxels_or_more():
    hu, lung, expected = _baseline_case()
    assert (BASELINE_HU, BASELINE_MIN_COMPONENT) == (-600.0, 20)
    flagged = hu_threshold_baseline(hu, lung)
    assert flagged.dtype == bool and np.array_equal(flagged, expected)
    speck = hu_threshold_baseline(hu, lung, min_component=1)  # the speck stays without the size filter
    assert speck.sum() == 27 + 2 and speck[2, 15:17, 8].all()
    assert hu_threshold_baseline(hu, lung, hu_level=-601.0).sum() == 2 * 27  # the -600 blob is above -601


@pytest.mark.parametrize("scale", [DEFAULT_HU_SCALE, HuScale(-1200.0, 600.0)])
def test_the_unit_scale_baseline_equals_the_hu_baseline(scale):
    hu, lung, expected = _baseline_case()
    unit = scale.to_unit(np.clip(hu, *scale.window))
    assert np.array_equal(threshold_baseline(unit, lung, scale), expected)
    for level, size in [(-600.0, 1), (-200.0, 20), (-900.0, 20)]:
        assert np.array_equal(
            threshold_baseline(unit, lung, scale, level, size), hu_threshold_baseline(hu, lung, level, size)
        )


# ---- self-training: the teacher's threshold and the refreshed masks ---------------------------------------


def test_the_teacher_threshold_is_the_lowest_that_keeps_healthy_lung_within_budget():
    from covidseg.method.pseudo_masks import healthy_probability_threshold

    lung = np.ones((1, 10, 10), dtype=np.uint8)
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, 0, :2] = True  # 2 % of the lung before the teacher
    prob = np.zeros((1, 10, 10), dtype=np.float32)
    prob[0, 5, :] = 0.6  # 10 voxels at 0.6
    prob[0, 6, :3] = 0.8  # 3 at 0.8
    assert healthy_probability_threshold([mask], [prob], [lung], budget_percent=15.0) == (0.5, 15.0)
    assert healthy_probability_threshold([mask], [prob], [lung], budget_percent=6.0) == (0.65, 5.0)
    assert healthy_probability_threshold([mask], [prob], [lung], budget_percent=1.0) is None  # 2 % before it
    prob[0, 5, :] = 0.99  # confident everywhere it speaks: no threshold helps
    assert healthy_probability_threshold([mask], [prob], [lung], budget_percent=5.0) is None


def test_the_teacher_adds_its_confident_lung_voxels_and_raises_the_soft_mask_there():
    from covidseg.method.pseudo_masks import with_teacher

    lung = np.zeros((1, 4, 4), dtype=np.uint8)
    lung[0, :, :3] = 1
    binary = np.zeros((1, 4, 4), dtype=bool)
    binary[0, 0, 0] = True
    soft = np.full((1, 4, 4), 0.2, dtype=np.float32)
    prob = np.full((1, 4, 4), 0.1, dtype=np.float32)
    prob[0, 1, :] = 0.9  # confident on a row that leaves the lung at x = 3
    new_binary, new_soft = with_teacher(binary, soft, prob, lung, threshold=0.7)
    expected = binary.copy()
    expected[0, 1, :3] = True
    assert np.array_equal(new_binary, expected)
    assert np.allclose(new_soft[0, 1, :3], 0.9) and new_soft[0, 1, 3] == np.float32(0.2)
    assert np.array_equal(new_soft[0, 2:], soft[0, 2:]) and new_soft.dtype == np.float32

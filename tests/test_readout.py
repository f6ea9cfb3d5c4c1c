"""imaging/readout: volumes per lung, the severity bands and the lung-volume check (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest

from covidseg.imaging.readout import MAX_LUNG_ML, MIN_LUNG_ML, read_out, severity, whole_lungs_in_view

# --- read-out: implausible lung volumes are warned about, not graded ---------------------------

SHAPE = (12, 20, 20)


def _lungs(shape=SHAPE, z=(2, 10), y=(4, 16), x=(4, 16)) -> np.ndarray:
    """Right lung (1) and left lung (2) side by side in a box of `shape`."""
    lungs = np.zeros(shape, np.uint8)
    middle = (x[0] + x[1]) // 2
    lungs[z[0] : z[1], y[0] : y[1], x[0] : middle] = 1
    lungs[z[0] : z[1], y[0] : y[1], middle : x[1]] = 2
    return lungs


def _read_out(lungs: np.ndarray, total_ml: float, **where) -> dict:
    """The read-out with voxels sized so that the lungs hold `total_ml`; a quarter of them lesion."""
    lesion = np.zeros(lungs.shape, bool)
    lesion.reshape(-1)[np.flatnonzero(lungs)[::4]] = True
    return read_out(lesion, lungs, voxel_ml=total_ml / np.count_nonzero(lungs), **where)


@pytest.mark.parametrize(
    ("total_ml", "shown"),
    [(1000.0, "1.0 L"), (1499.0, "1.5 L"), (9001.0, "9.0 L"), (12345.0, "12.3 L")],
)
def test_whole_lungs_of_an_implausible_volume_are_warned_about_and_not_graded(total_ml, shown):
    out = _read_out(_lungs(), total_ml)
    assert out["severity"] is None
    assert out["warnings"] == [f"lung volume {shown} is outside 1.5-9 L: lung mask implausible, not graded"]
    # the volumes are still measured
    assert out["lung_ml"] == pytest.approx(total_ml, abs=0.01)
    assert out["involvement_pct"] == pytest.approx(25.0)
    assert out["right"]["lung_ml"] + out["left"]["lung_ml"] == pytest.approx(total_ml, abs=0.02)


@pytest.mark.parametrize("total_ml", [MIN_LUNG_ML, 5000.0, MAX_LUNG_ML])
def test_whole_lungs_of_a_plausible_volume_are_graded(total_ml):
    out = _read_out(_lungs(), total_ml)
    assert out["warnings"] == []
    assert out["severity"] == severity(out["involvement_pct"]) == "CT-2"


@pytest.mark.parametrize(
    "lungs",
    [
        _lungs(z=(0, 10)),  # cut at the first slice
        _lungs(z=(2, 12)),  # cut at the last slice
        _lungs(y=(0, 16)),  # cut by the edge of the field of view (an in-plane crop)
        _lungs(x=(4, 20)),
        _lungs((1, 20, 20), z=(0, 1)),  # one slice
        _lungs((3, 20, 20), z=(0, 3)),  # a thin slab
        _lungs()[5],  # a 2D image
    ],
    ids=["first-slice", "last-slice", "y-edge", "x-edge", "one-slice", "slab", "2d"],
)
def test_partial_scans_are_graded_whatever_their_small_volume(lungs):
    assert not whole_lungs_in_view(lungs)
    out = _read_out(lungs, 300.0)
    assert out["warnings"] == [] and out["severity"] == "CT-2"


def test_too_much_lung_is_implausible_even_in_a_partial_scan():
    out = _read_out(_lungs(z=(0, 10)), 12345.0)  # cutting lungs only makes them smaller
    assert out["severity"] is None
    assert out["warnings"] == [
        "lung volume 12.3 L is outside 1.5-9 L (lungs cut by the scan): lung mask implausible, not graded"
    ]


def test_a_crop_of_the_scan_is_judged_by_where_it_lies_in_the_scan():
    """predict reads out the lung box only: a tight box touches its own faces, not the scan's."""
    scan = _lungs()
    crop = scan[2:10, 4:16, 4:16]
    assert whole_lungs_in_view(scan) and not whole_lungs_in_view(crop)
    inside = _read_out(crop, 1000.0, offset_zyx=(2, 4, 4), scan_shape=SHAPE)
    assert inside["severity"] is None and "1.0 L is outside" in inside["warnings"][0]
    # the same box at the scan's first slice: the lungs are cut, no lower bound
    at_edge = _read_out(crop, 1000.0, offset_zyx=(0, 4, 4), scan_shape=(10, 20, 20))
    assert at_edge["warnings"] == [] and at_edge["severity"] == "CT-2"
    # at the scan's last slice likewise
    at_end = _read_out(crop, 1000.0, offset_zyx=(4, 4, 4), scan_shape=SHAPE)
    assert at_end["warnings"] == [] and at_end["severity"] == "CT-2"


def test_no_lung_at_all_is_not_whole_lungs():
    empty = np.zeros(SHAPE, np.uint8)
    assert not whole_lungs_in_view(empty)
    out = read_out(np.zeros(SHAPE, bool), empty, voxel_ml=1.0)
    assert out["lung_ml"] == 0.0 and out["severity"] == "CT-0" and out["warnings"] == []


# --- read-out: volumes per lung and the severity bands --------------------------------------------


def test_read_out_volumes_and_severity_bands():
    lungs = np.zeros((2, 10, 10), np.uint8)
    lungs[:, :, :5], lungs[:, :, 5:] = 1, 2  # 100 voxels each
    lesion = np.zeros_like(lungs, dtype=bool)
    lesion[0, :, :5] = True  # half the right lung
    lesion[0, :2, 5:] = True  # a fifth of the left lung
    out = read_out(lesion, lungs, voxel_ml=0.5)
    assert out["right"] == {"lesion_ml": 25.0, "lung_ml": 50.0, "involvement_pct": 50.0}
    assert out["left"]["involvement_pct"] == 10.0
    assert out["lesion_ml"] == 30.0 and out["lung_ml"] == 100.0 and out["involvement_pct"] == 30.0
    assert out["severity"] == "CT-2"
    bands = [
        (0, "CT-0"),
        (0.01, "CT-1"),
        (24.99, "CT-1"),
        (25, "CT-2"),
        (50, "CT-3"),
        (75, "CT-4"),
        (100, "CT-4"),
    ]
    assert [severity(p) for p, _ in bands] == [name for _, name in bands]

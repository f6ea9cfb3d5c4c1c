"""The read-out's lung-volume check and the snapshot's choice of slices (pure functions, no model)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from covidseg.imaging.readout import MAX_LUNG_ML, MIN_LUNG_ML, read_out, severity, whole_lungs_in_view
from covidseg.reporting.plots import coronal_slice, montage_slices, overlay_montage

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


# --- snapshots: which slices the montage shows --------------------------------------------------

DEPTH = 20


def _chest() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU, lung labels and lesions of a [20, 16, 16] volume where the answer is known.

    Lungs on slices 2..17, large (12 x 12) on 4..15 and small (3 x 3) on 2, 3, 16, 17. Lesion
    area inside the lungs: slice 5: 30, slice 6: 25 (next to 5), slice 12: 20, slice 15: 10.
    More lesion voxels outside the lungs: 100 on slice 0 (no lung at all), 64 on slice 9 (beside
    the lungs), which must never count.
    """
    lungs = np.zeros((DEPTH, 16, 16), np.uint8)
    lungs[4:16, 2:14, 2:8], lungs[4:16, 2:14, 8:14] = 1, 2
    lungs[[2, 3, 16, 17], 6:9, 6:9] = 1
    lesion = np.zeros(lungs.shape, bool)
    lesion[0, 0:10, 0:10] = True
    lesion[9, 14:16, :] = lesion[9, :, 0:2] = True
    lesion[5, 3:8, 3:9] = True  # 30
    lesion[6, 3:8, 3:8] = True  # 25
    lesion[12, 4:8, 4:9] = True  # 20
    lesion[15, 4:6, 4:9] = True  # 10
    hu = np.where(lungs > 0, -850.0, 40.0).astype(np.float32)
    return hu, lungs, lesion


def test_snapshot_shows_the_largest_lesions_inside_the_lungs_not_neighbours():
    _, lungs, lesion = _chest()
    assert montage_slices(lesion, lungs, 1, DEPTH) == [5]
    assert montage_slices(lesion, lungs, 2, DEPTH) == [5, 12]
    assert montage_slices(lesion, lungs, 3, DEPTH) == [5, 12, 15]  # 6 is 5's neighbour


def test_snapshot_fills_up_with_large_lung_slices_spread_apart():
    _, lungs, lesion = _chest()
    shown = montage_slices(lesion, lungs, 6, DEPTH)
    assert len(shown) == 6 and {5, 12, 15} <= set(shown)
    assert min(np.diff(shown)) >= 2  # no two neighbours
    no_lesion = montage_slices(None, lungs, 3, DEPTH)
    assert all(4 <= k <= 15 for k in no_lesion)  # where the lungs are large
    assert min(np.diff(no_lesion)) >= 3 and no_lesion[0] <= 7 and no_lesion[-1] >= 12  # spread out


@pytest.mark.parametrize("n", range(1, DEPTH + 1))
def test_snapshot_never_shows_a_slice_without_lung(n):
    _, lungs, lesion = _chest()
    with_lung = set(np.flatnonzero(lungs.reshape(DEPTH, -1).any(axis=1)).tolist())
    for mask in (lesion, None):
        shown = montage_slices(mask, lungs, n, DEPTH)
        assert shown == sorted(set(shown)) and set(shown) <= with_lung
        assert len(shown) == min(n, len(with_lung))


def test_coronal_view_goes_through_the_lesions_inside_the_lungs():
    _, lungs, lesion = _chest()
    assert coronal_slice(None, None) is None
    assert coronal_slice(None, np.zeros_like(lungs)) is None
    assert 2 <= coronal_slice(None, lungs) <= 13
    only_outside = np.zeros_like(lesion)
    only_outside[9, 14:16, :] = True  # beside the lungs
    assert 2 <= coronal_slice(only_outside, lungs) <= 13
    inside = np.zeros_like(lesion)
    inside[7:12, 10, 3:12] = True
    assert coronal_slice(inside, lungs) == 10


def test_overlay_montage_draws_the_chosen_slices_and_a_coronal_view(tmp_path):
    hu, lungs, lesion = _chest()
    path = tmp_path / "snap" / "case.png"
    shown = overlay_montage(hu, lesion, lungs, path, n_slices=3, title="case: 3.0 %\nwarning", coronal=False)
    assert shown == [5, 12, 15]
    axial_only = np.asarray(Image.open(path).convert("RGB"))
    assert overlay_montage(hu, lesion, lungs, path, n_slices=3, spacing_zyx=(5.0, 1.0, 1.0)) == shown
    with_coronal = np.asarray(Image.open(path).convert("RGB"))
    assert with_coronal.shape[1] > axial_only.shape[1] + 16  # a panel more on the right
    red = (with_coronal[..., 0] > 200) & (with_coronal[..., 1] < 80) & (with_coronal[..., 2] < 80)
    yellow = (with_coronal[..., 0] > 200) & (with_coronal[..., 1] > 200) & (with_coronal[..., 2] < 80)
    assert red.sum() > 50 and yellow.sum() > 50  # lesions in red, lungs outlined
    assert not list(path.parent.glob(".*tmp*"))  # written atomically
    with pytest.raises(ValueError, match="path"):
        overlay_montage(hu, lesion, lungs)

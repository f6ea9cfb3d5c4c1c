"""reporting/plots: the snapshot's choice of slices, its coronal view and the overlay montage."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from covidseg.reporting.plots import coronal_slice, montage_slices, overlay_montage

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

"""inference/ct_segment: whole-CT slab inference (how many network slices a scan is cut into)."""

from __future__ import annotations

from covidseg.imaging.grid import CropBox
from covidseg.inference.ct_segment import slab_count


def test_slab_count_matches_the_training_grid_and_never_drops_to_zero():
    box = CropBox(0, 64, 0, 10, 0, 10)
    assert slab_count(box, (5.0, 1.0, 1.0), slab_mm=10.0) == 32
    assert slab_count(CropBox(0, 1, 0, 10, 0, 10), (1.0, 1.0, 1.0), slab_mm=9.0) == 1

"""inference/ct_segment: whole-CT slab inference (how many network slices a scan is cut into, what
is never lesion)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from covidseg.imaging.body import IN_PLANE_4, IN_PLANE_SQUARE
from covidseg.imaging.grid import CropBox
from covidseg.inference.ct_segment import SlicePreprocessing, segment_ct, slab_count, too_dense, too_light
from test_lungs import _hospital_scene


def test_slab_count_matches_the_training_grid_and_never_drops_to_zero():
    box = CropBox(0, 64, 0, 10, 0, 10)
    assert slab_count(box, (5.0, 1.0, 1.0), slab_mm=10.0) == 32
    assert slab_count(CropBox(0, 1, 0, 10, 0, 10), (1.0, 1.0, 1.0), slab_mm=9.0) == 1


def test_contrast_filled_vessels_and_their_rim_are_never_lesion():
    """A model that flags every lung voxel: a bright (contrast) vessel in the lung and the voxels
    next to it in-plane stay out; a dense but lesion-like (60 HU) blob stays in."""
    hu, lungs, _ = _hospital_scene(table_touches=False)
    z, y, x = np.mgrid[0 : hu.shape[0], 0 : hu.shape[1], 0 : hu.shape[2]]
    vessel = (np.abs(x - 40) <= 1) & (np.abs(y - 58) <= 1) & (z >= 20) & (z <= 40)
    blob = (np.abs(x - 88) <= 2) & (np.abs(y - 58) <= 2) & (z >= 28) & (z <= 32)
    hu[vessel], hu[blob] = 350.0, 60.0
    spec = SlicePreprocessing(hu_window=(-1000.0, 400.0), slice_size=(64, 64), slab_mm=5.0)
    flag_all = lambda batch: np.full_like(batch, 10.0)  # noqa: E731
    result = segment_ct(hu, (2.5, 2.0, 2.0), flag_all, spec, min_lesion_hu=None)  # the dense rule alone
    lesion = result.full(result.lesion) > 0
    rim = ndimage.binary_dilation(vessel, structure=IN_PLANE_4) & ~vessel
    assert not lesion[vessel].any() and not lesion[rim].any()
    assert lesion[blob].all()
    assert lesion[lungs & ~too_dense(hu)].mean() > 0.95  # the rest of the lung is flagged


def test_aerated_lung_is_never_lesion_in_hu_but_is_in_mapped_images():
    """A model that flags every lung voxel: aerated lung (-850 HU) stays out, ground glass (-600 HU)
    and its edge stay in; with the rule off (images whose values were mapped to HU) all is flagged."""
    hu, lungs, _ = _hospital_scene(table_touches=False)
    z, y, x = np.mgrid[0 : hu.shape[0], 0 : hu.shape[1], 0 : hu.shape[2]]
    ggo = (np.abs(x - 88) <= 4) & (np.abs(y - 58) <= 4) & (z >= 26) & (z <= 34) & lungs
    hu[ggo] = -600.0
    spec = SlicePreprocessing(hu_window=(-1000.0, 400.0), slice_size=(64, 64), slab_mm=5.0)
    flag_all = lambda batch: np.full_like(batch, 10.0)  # noqa: E731
    result = segment_ct(hu, (2.5, 2.0, 2.0), flag_all, spec)
    lesion = result.full(result.lesion) > 0
    assert lesion[ggo].all()
    near_ggo = ndimage.binary_dilation(ggo, IN_PLANE_SQUARE)
    aerated = ndimage.binary_erosion(lungs & ~ggo, IN_PLANE_SQUARE) & ~near_ggo  # 3 x 3 means of -850 HU
    assert aerated.sum() > 0.8 * lungs.sum() and not lesion[aerated].any()
    assert (lesion == ((result.full(result.lungs) > 0) & ~too_light(hu) & ~too_dense(hu))).all()
    mapped = segment_ct(hu, (2.5, 2.0, 2.0), flag_all, spec, min_lesion_hu=None)
    assert (mapped.full(mapped.lesion) > 0)[lungs].mean() > 0.95

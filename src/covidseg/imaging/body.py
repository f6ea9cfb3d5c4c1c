"""Where the patient is, on a coarse canonical CT in HU: the torso and the region it encloses.

Hospital scans hold more than the patient: the table (a thin curved shell with air inside),
mattress and blankets, clothing folds, arms beside the chest. Air enclosed by any of these looks
like lung to a threshold. The torso is found per axial slice as the largest component of tissue
(``>= air_hu``) after an in-plane opening that cuts thin shells and folds (``open_mm``) away from
it; arms, table and folds are other components. Lungs lie in what the torso encloses in each
slice; the air inside the table shell, beside an arm or under a blanket fold does not.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: in-plane 4-connectivity as a 3D structure (no links between slices): one ndimage.label call
#: on a [z, y, x] volume labels every axial slice on its own
IN_PLANE_4 = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE_4[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
#: the in-plane 3 x 3 square (8 neighbours and the voxel itself) as a 3D structure
IN_PLANE_SQUARE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE_SQUARE[1] = True


def touches_border(labels: np.ndarray, n: int) -> np.ndarray:
    """[n + 1] bool: which labels of a [y, x] or [z, y, x] label image have a pixel on the in-plane
    image border (the first or last row or column of a slice); label 0 included as found."""
    touches = np.zeros(n + 1, dtype=bool)
    for face in (labels[..., 0, :], labels[..., -1, :], labels[..., :, 0], labels[..., :, -1]):
        touches[np.unique(face)] = True
    return touches


def disk(radius_px: tuple[int, int]) -> np.ndarray:
    """An in-plane elliptical structuring element [1, 2ry+1, 2rx+1] (radii in pixels)."""
    ry, rx = (max(0, int(r)) for r in radius_px)
    y, x = np.ogrid[-ry : ry + 1, -rx : rx + 1]
    inside = (y / max(ry, 0.5)) ** 2 + (x / max(rx, 0.5)) ** 2 <= 1.0
    return inside[None]


def open_in_plane(tissue: np.ndarray, open_px: tuple[int, int]) -> np.ndarray:
    """In-plane opening of `tissue` [z, y, x] bool (voxels at or above the air threshold) with an
    elliptical element of radii `open_px` (y, x) pixels: structures thinner than about twice that
    (table shell, blanket, clothing folds) vanish or come apart from the torso."""
    return ndimage.binary_opening(tissue, structure=disk(open_px))


def largest_per_slice(mask: np.ndarray) -> np.ndarray:
    """Per axial slice, the largest 8-connected component of `mask` [z, y, x] bool: applied to the
    opened tissue, the torso. It is not grown back to the raw outline: that would re-attach the
    shell or fold that touches the skin and close the air under it."""
    out = np.zeros_like(mask)
    for k in range(mask.shape[0]):
        labels, n = ndimage.label(mask[k], structure=np.ones((3, 3), dtype=bool))
        if n:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            out[k] = labels == int(np.argmax(sizes))
    return out


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Per axial slice, `mask` [z, y, x] bool with the holes it encloses in-plane filled.

    One labelling of the background with in-plane 4-connectivity (no links between slices): the
    background components that touch an in-plane image border are outside, the others are holes.
    """
    labels, n = ndimage.label(~mask, structure=IN_PLANE_4)
    if n == 0:
        return mask.copy()
    outside = touches_border(labels, n)
    outside[0] = True  # label 0 is the mask itself
    return mask | ~outside[labels]

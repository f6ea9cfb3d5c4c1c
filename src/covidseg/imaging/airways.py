"""Trachea and main bronchi on a coarse canonical CT in HU, so that they are not taken for lung.

Lung masks as lungmask and TotalSegmentator users know them exclude the trachea and the main
bronchi. Their lumen is pure air (about -1000 HU), darker than aerated lung (about -850 HU), and in
each axial slice it is a small section. The trachea is found as a small, dark, central section in
the highest slice that has one; the airway is then followed down slice by slice: the dark sections
that overlap the airway of the slice above and stay small (``max_section_cm2``) are airway. A
bronchus that opens into lung as dark as air (emphysema) gives a large section and the tracing
stops there, so the tracing cannot leak into the lung.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class AirwayParams:
    """Thresholds of the airway tracing (HU, cm², mm)."""

    lumen_hu: float = -950.0  # coarse voxels darker than this are airway lumen candidates
    seed_min_cm2: float = 0.8  # area range of the trachea's section (cm²)
    seed_max_cm2: float = 8.0
    central_fraction: float = 0.2  # the trachea's centre lies within this share of the body width
    # from the body's centre line
    max_section_cm2: float = 8.0  # a section larger than this is lung, not airway
    max_length_mm: float = 220.0  # trachea + main bronchi + lobar bronchi, at most (mm)


def _seed(lumen: np.ndarray, inside: np.ndarray, pixel_cm2: float, params: AirwayParams):
    """The highest slice with a trachea-like section: (z, 2D bool section) or None."""
    lo, hi = params.seed_min_cm2, params.seed_max_cm2
    for k in range(lumen.shape[0] - 1, -1, -1):
        if not inside[k].any():
            continue
        labels, n = ndimage.label(lumen[k] & inside[k], structure=_EIGHT)
        if n == 0:
            continue
        xs = np.nonzero(inside[k].any(axis=0))[0]
        centre, width = 0.5 * (xs[0] + xs[-1]), xs[-1] - xs[0] + 1
        areas = np.bincount(labels.ravel()) * pixel_cm2
        for label in range(1, n + 1):
            if not lo <= areas[label] <= hi:
                continue
            cx = np.nonzero(labels == label)[1].mean()
            if abs(cx - centre) <= params.central_fraction * width:
                return k, labels == label
    return None


def trace_airway(
    hu: np.ndarray, inside: np.ndarray, spacing_zyx: tuple[float, float, float], params: AirwayParams
) -> np.ndarray:
    """Trachea and main/lobar bronchi lumen on a coarse canonical CT.

    Args:
        hu: [z, y, x] coarse CT in HU (canonical: z grows toward the head).
        inside: [z, y, x] bool, the region the lungs can lie in (what the torso encloses).
        spacing_zyx: voxel size of `hu` in mm.
        params: thresholds.

    Returns:
        [z, y, x] bool airway lumen; empty when no trachea is in view (a crop, a single slice).
    """
    airway = np.zeros(hu.shape, dtype=bool)
    if hu.shape[0] < 2:
        return airway
    pixel_cm2 = spacing_zyx[1] * spacing_zyx[2] / 100.0
    lumen = hu < params.lumen_hu
    seed = _seed(lumen, inside, pixel_cm2, params)
    if seed is None:
        return airway
    k, section = seed
    airway[k] = section
    max_slices = int(params.max_length_mm / spacing_zyx[0])
    _follow(airway, lumen & inside, range(k - 1, max(-1, k - 1 - max_slices), -1), pixel_cm2, params)
    _follow(airway, lumen & inside, range(k + 1, lumen.shape[0]), pixel_cm2, params)  # up the neck
    return airway


def _follow(airway: np.ndarray, lumen: np.ndarray, zs: range, pixel_cm2: float, params: AirwayParams) -> None:
    """Extend `airway` (in place) slice by slice along `zs` (one direction, starting next to a
    traced slice): the lumen sections overlapping the previous slice's airway that stay small."""
    for k in zs:
        reach = ndimage.binary_dilation(airway[k - zs.step], structure=_EIGHT)
        labels, n = ndimage.label(lumen[k], structure=_EIGHT)
        touched = np.unique(labels[reach & (labels > 0)])
        areas = np.bincount(labels.ravel(), minlength=n + 1) * pixel_cm2
        keep = [label for label in touched if areas[label] <= params.max_section_cm2]
        if not keep:
            return
        airway[k] = np.isin(labels, keep)

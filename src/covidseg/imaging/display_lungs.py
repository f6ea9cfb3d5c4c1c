"""Lung masks for display images: 8-bit lung-windowed slices (JPEG/PNG) read with ``--intensity window:``.

The classical mask (:mod:`covidseg.imaging.lungs`) needs true HU and the air around the patient:
it finds the torso first and calls air outside it "not lung". A display slice has neither: its
grey levels went through an unknown window and curve, and it is often cropped to the thorax, so
the lungs touch the image border. Here each axial slice is segmented on its own:

1. the slice is smoothed (Gaussian, ``smooth_px``) and split into dark and bright at its Otsu
   threshold (the grey level that best separates the two modes, air-like lung and soft tissue,
   whatever the window was);
2. dark components holding at least ``min_area_fraction`` of the slice are lung; smaller ones
   (trachea, bowel gas, noise) are not;
3. each lung (left/right split as in the classical mask) is closed with a disk whose radius is
   ``closing_fraction`` of the slice width and its holes are filled, which brings vessels,
   ground glass and subpleural consolidation inside it.

Known limits: a consolidation that fills a lung base from the chest wall inwards, with no
aerated lung behind it, stays outside (as in the classical mask); outside air in the corners of a
crop can be taken for lung when it is large, since a display slice does not tell air from lung by
its grey level. Made for single slices: in a stack every slice is segmented alone, so gas below the
diaphragm can be taken for lung where no lung is in the slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from covidseg.imaging.body import fill_holes_per_slice
from covidseg.imaging.intensity import IntensityMapping
from covidseg.imaging.lungs import LungMask, LungParams, segment_lungs, split_left_right


@dataclass(frozen=True)
class DisplayLungParams:
    """Settings of the display-slice lung mask (pixels and fractions: a display slice has no mm)."""

    smooth_px: float = 1.0  # Gaussian sigma before the threshold (pixels)
    min_area_fraction: float = 0.01  # dark components smaller than this share of the slice are not lung
    closing_fraction: float = 0.05  # closing radius per lung, as a share of the slice width


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The Otsu threshold of `values` (any unit): the level that maximises the between-class
    variance of the two classes below and at/above it (the middle of the gap when two modes are
    cleanly apart)."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight = np.cumsum(counts, dtype=np.float64)
    mass = np.cumsum(counts * centres, dtype=np.float64)
    total_w, total_m = weight[-1], mass[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_m * weight - mass * total_w) ** 2 / (weight * (total_w - weight))
    between[~np.isfinite(between)] = -1.0
    best = np.flatnonzero(between >= between.max() * (1.0 - 1e-9))  # a flat top: modes with a gap
    return float(0.5 * (edges[best[0] + 1] + edges[best[-1] + 1]))  # the middle of the gap


def _dark_lungs(slice_hu: np.ndarray, params: DisplayLungParams) -> np.ndarray:
    """[y, x] bool: the large dark components of one display slice."""
    smooth = ndimage.gaussian_filter(slice_hu.astype(np.float32), params.smooth_px)
    dark = smooth < otsu_threshold(smooth)
    labels, n = ndimage.label(dark)
    if n == 0:
        return dark
    sizes = np.bincount(labels.ravel())
    keep = sizes >= params.min_area_fraction * slice_hu.size
    keep[0] = False
    return keep[labels]


def _close_in_plane(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """[y, x] bool: `mask` closed with a disk of `radius_px` (Euclidean distance transforms, so
    the cost does not grow with the radius); the image border does not erode it."""
    pad = radius_px + 1
    padded = np.pad(mask, pad)
    dilated = ndimage.distance_transform_edt(~padded) <= radius_px
    closed = ndimage.distance_transform_edt(dilated) > radius_px
    return closed[pad:-pad, pad:-pad] | mask


def _close_and_fill(lung: np.ndarray, radius_px: int) -> np.ndarray:
    """[z, y, x] bool: `lung` closed in-plane with a disk of `radius_px`, holes filled per slice."""
    closed = np.stack([_close_in_plane(s, radius_px) if s.any() else s for s in lung])
    return fill_holes_per_slice(closed)


def segment_display_lungs(hu: np.ndarray, params: DisplayLungParams | None = None) -> LungMask:
    """Segment the lungs of display slices slice by slice.

    Args:
        hu: [z, y, x] canonical image in mapped HU (``--intensity window:LO,HI``); only the order
            of the grey levels matters.
        params: smoothing, minimum lung share and closing radius.

    Returns:
        A :class:`LungMask` at full resolution (labels 1 = right, 2 = left); empty when no slice
        has a dark component large enough.
    """
    params = params or DisplayLungParams()
    dark = np.stack([_dark_lungs(s, params) for s in hu])
    sides = split_left_right(dark)
    radius_px = max(1, int(round(params.closing_fraction * hu.shape[2])))
    labels = np.zeros_like(sides)
    for value in (1, 2):  # each lung on its own so the two never merge across the mediastinum
        lung = _close_and_fill(sides == value, radius_px)
        labels[lung & (labels == 0)] = value
    return LungMask(labels=labels, factors=(1, 1, 1), shape=tuple(hu.shape))


def segment_input_lungs(
    hu: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    params: LungParams,
    intensity: IntensityMapping | None,
) -> LungMask:
    """The lungs of a canonical image as read with `intensity`: the display-slice mask for
    ``window:`` images (rendered for display), the classical HU mask otherwise."""
    if intensity is not None and intensity.is_display:
        return segment_display_lungs(hu)
    return segment_lungs(hu, spacing_zyx, params)

"""Classical lung segmentation on a canonical CT in HU.

The method (threshold, components, closing) is the textbook one, with two choices made for COVID:

1. Air-like voxels are those below ``air_hu`` (default -300 HU), so ground-glass opacities
   (-700..-300 HU) are lung from the start.
2. Dense lesions (consolidation, -100..+50 HU) look like the chest wall. Each lung is closed
   in-plane with a large structuring element (``closing_mm``, default 12 mm radius) and its holes
   are filled, which brings subpleural consolidations back **inside** the lung mask.

It works on a coarser copy (about ``work_mm`` mm voxels) for speed: a 512x512x300 CT becomes
~256x256x150. Outside air is air that touches the border of an axial slice and averages below
``outside_hu`` (true air); a lung cut by a tight crop (common in CTA crops) averages ~-850 HU
and is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

# 2D (in-plane) 4-connectivity expressed as a 3D structure: no links between slices.
_IN_PLANE = np.array(
    [[[0, 0, 0], [0, 0, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]], [[0, 0, 0], [0, 0, 0], [0, 0, 0]]],
    dtype=bool,
)


@dataclass(frozen=True)
class LungParams:
    """Parameters of the classical lung segmentation (HU, mm, mL)."""

    air_hu: float = -300.0  # voxels below are air-like (lung incl. ground glass, airways, outside air)
    outside_hu: float = -950.0  # border-touching air darker than this on average is outside the body
    work_mm: float = 2.0  # target voxel size of the working copy (mm); never upsampled
    closing_mm: float = 12.0  # in-plane closing radius per lung (mm): pulls dense lesions inside
    z_gap_mm: float = 60.0  # per (y, x) column, gaps up to this long between lung above and below
    # are lung too (a dense lesion with aerated lung above and below it)
    min_lung_ml: float = 5.0  # components smaller than this are not lung (mL; area-based for 1 slice)
    min_fraction: float = 0.05  # ... nor smaller than this fraction of the largest component
    max_hole_cm2: float = 10.0  # in-slice holes up to this area are filled (cm²); larger ones only
    # when enclosed in 3D, so a diaphragm dome seen as an island in one slice stays out


@dataclass
class LungMask:
    """Lung labels (0 background, 1 right lung, 2 left lung) on a coarse working grid.

    ``labels[z, y, x]`` covers canonical voxels ``[z*fz:(z+1)*fz, y*fy:(y+1)*fy, x*fx:(x+1)*fx]``.
    """

    labels: np.ndarray  # [z, y, x] uint8 at working resolution
    factors: tuple[int, int, int]  # canonical voxels per working voxel along z, y, x
    shape: tuple[int, int, int]  # canonical (full resolution) shape

    def full(self) -> np.ndarray:
        """Labels upsampled (nearest) to the full canonical shape, uint8 [z, y, x]."""
        out = self.labels
        for axis, f in enumerate(self.factors):
            if f > 1:
                out = np.repeat(out, f, axis=axis)
        return np.ascontiguousarray(out[: self.shape[0], : self.shape[1], : self.shape[2]])

    def bbox(self) -> tuple[int, int, int, int, int, int] | None:
        """Bounding box of the lungs in full-resolution canonical voxels: z0, z1, y0, y1, x0, x1
        (end-exclusive), or None when no lung was found."""
        nonzero = np.nonzero(self.labels)
        if nonzero[0].size == 0:
            return None
        box = []
        for axis, idx in enumerate(nonzero):
            f = self.factors[axis]
            box += [int(idx.min()) * f, min(self.shape[axis], (int(idx.max()) + 1) * f)]
        return tuple(box)


def working_factors(spacing_zyx: tuple[float, float, float], work_mm: float) -> tuple[int, int, int]:
    """Integer downsampling factors that bring each axis to about `work_mm` (never below 1)."""
    return tuple(max(1, int(math.floor(work_mm / s + 1e-6))) for s in spacing_zyx)


def _downsample_mean(hu: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Block mean with partial blocks at the far edges averaged over what is there."""
    if factors == (1, 1, 1):
        return hu.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]  # [1, 1, Z, Y, X]
    t = F.avg_pool3d(t, kernel_size=factors, stride=factors, ceil_mode=True, count_include_pad=False)
    return t[0, 0].numpy()


def _outside_air(air: np.ndarray, hu: np.ndarray, outside_hu: float) -> np.ndarray:
    """Air outside the body: per axial slice, air components that touch the slice border and whose
    mean is below `outside_hu` (true air, ~-1000 HU; a lung cut by a crop averages ~-850 HU)."""
    labels, n = ndimage.label(air, structure=_IN_PLANE)
    if n == 0:
        return np.zeros_like(air)
    touches = np.zeros(n + 1, dtype=bool)
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        touches[np.unique(face)] = True
    touches[0] = False
    mean_hu = ndimage.mean(hu, labels, index=np.arange(n + 1))
    return (touches & (np.nan_to_num(mean_hu, nan=0.0) < outside_hu))[labels]


def _bbox_slices(mask: np.ndarray, margins: tuple[int, ...]) -> tuple[slice, ...] | None:
    """The bounding box of `mask` widened by `margins` voxels per axis (clamped); None if empty."""
    if not mask.any():
        return None
    box = []
    for axis, margin in enumerate(margins):
        nz = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, int(nz[0]) - margin), min(mask.shape[axis], int(nz[-1]) + 1 + margin)))
    return tuple(box)


def _fill_holes(mask: np.ndarray, max_hole_px: int) -> np.ndarray:
    """Fill holes enclosed in 3D, and in-slice holes of at most `max_hole_px` pixels."""
    filled = ndimage.binary_fill_holes(mask) if mask.shape[0] > 1 else mask
    labels, n = ndimage.label(~mask, structure=_IN_PLANE)
    if n == 0:
        return filled
    small = np.bincount(labels.ravel()) <= max_hole_px
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        small[np.unique(face)] = False  # touches the slice border: not a hole
    small[0] = False  # label 0 is the mask itself
    return filled | small[labels]


def _close_2d(mask: np.ndarray, radius_px: tuple[int, int]) -> np.ndarray:
    """In-plane binary closing with a (2ry+1) x (2rx+1) box, slice by slice.

    Works inside the mask's bounding box (plus the radius) with separable max/min filters, so the
    cost does not grow with the radius. The erosion treats the outside as foreground, so nothing
    is eaten away at the volume border.
    """
    ry, rx = radius_px
    if (ry == 0 and rx == 0) or not mask.any():
        return mask
    _, ys, xs = np.nonzero(mask.any(axis=0, keepdims=True))
    y0, y1 = max(0, ys.min() - 2 * ry), min(mask.shape[1], ys.max() + 2 * ry + 1)
    x0, x1 = max(0, xs.min() - 2 * rx), min(mask.shape[2], xs.max() + 2 * rx + 1)
    size = (1, 2 * ry + 1, 2 * rx + 1)
    box = mask[:, y0:y1, x0:x1].view(np.uint8)
    dilated = ndimage.maximum_filter(box, size=size, mode="constant", cval=0)
    closed = ndimage.minimum_filter(dilated, size=size, mode="constant", cval=1)
    out = mask.copy()
    out[:, y0:y1, x0:x1] = closed.astype(bool)
    return out


def _fill_z_gaps(mask: np.ndarray, max_gap: int) -> np.ndarray:
    """Along z, fill runs of background of at most `max_gap` voxels lying between mask voxels."""
    if max_gap < 1 or mask.shape[0] < 3:
        return mask
    z = np.arange(mask.shape[0], dtype=np.int32)[:, None, None]
    big = np.int32(1 << 30)
    # index of the last mask voxel at or below each z, and of the next one at or above it
    below = np.maximum.accumulate(np.where(mask, z, -big), axis=0)
    above = np.minimum.accumulate(np.where(mask, z, big)[::-1], axis=0)[::-1]
    return mask | ((above - below - 1) <= max_gap)


def _keep_lung_components(
    candidates: np.ndarray, voxel_ml: float, params: LungParams, z_extent_mm: float
) -> np.ndarray:
    """Connected components big enough to be a lung: boolean mask.

    The absolute minimum (`min_lung_ml`) is meant for whole chests; it shrinks in proportion for
    scans covering less than 100 mm in z (a single slice, a thin slab).
    """
    labels, n = ndimage.label(candidates)
    if n == 0:
        return candidates
    sizes = np.bincount(labels.ravel())[1:] * voxel_ml
    min_ml = params.min_lung_ml * min(1.0, z_extent_mm / 100.0)
    keep = (sizes >= min_ml) & (sizes >= params.min_fraction * sizes.max())
    return np.concatenate([[False], keep])[labels]


def _split_left_right(lungs: np.ndarray) -> np.ndarray:
    """Label the lung voxels 1 (right lung: small x) or 2 (left lung: large x).

    Two large components are the two lungs; one component (lungs joined through the airway, or a
    crop with a single lung) is split at the x position between the two lung halves.
    """
    labels, n = ndimage.label(lungs)
    out = np.zeros(lungs.shape, dtype=np.uint8)
    if n == 0:
        return out
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(-sizes)
    if n >= 2 and sizes[order[1]] >= 0.2 * sizes[order[0]]:
        a, b = order[0] + 1, order[1] + 1
        xa = np.nonzero(labels == a)[2].mean()
        xb = np.nonzero(labels == b)[2].mean()
        right, left = (a, b) if xa < xb else (b, a)
        cut = None
        out[labels == right] = 1
        out[labels == left] = 2
        rest = lungs & (out == 0)
        if rest.any():  # smaller pieces go to the nearer lung
            cut = 0.5 * (xa + xb)
            xs = np.arange(lungs.shape[2])[None, None, :]
            out[rest & (xs < cut)] = 1
            out[rest & (xs >= cut)] = 2
        return out
    # One component: split at the column with the least lung between the lungs' x range.
    xs_profile = lungs.sum(axis=(0, 1))
    nz = np.nonzero(xs_profile)[0]
    lo, hi = nz.min(), nz.max()
    middle = slice(lo + (hi - lo) // 4, hi - (hi - lo) // 4 + 1)
    cut = middle.start + int(np.argmin(xs_profile[middle]))
    xs = np.arange(lungs.shape[2])[None, None, :]
    out[lungs & (xs < cut)] = 1
    out[lungs & (xs >= cut)] = 2
    return out


def segment_lungs(
    hu: np.ndarray, spacing_zyx: tuple[float, float, float], params: LungParams | None = None
) -> LungMask:
    """Segment the lungs of a canonical CT.

    Args:
        hu: [z, y, x] CT in HU, canonical (LPS) orientation.
        spacing_zyx: voxel size in mm along z, y, x.
        params: thresholds and sizes; defaults suit chest CT from 0.5 to 8 mm slices.

    Returns:
        A :class:`LungMask` (labels 1 = right lung, 2 = left lung) on a working grid of about
        ``params.work_mm`` mm; empty when no lung is found.
    """
    params = params or LungParams()
    factors = tuple(
        min(f, n) for f, n in zip(working_factors(spacing_zyx, params.work_mm), hu.shape, strict=True)
    )
    work = _downsample_mean(hu, factors)
    work_spacing = tuple(s * f for s, f in zip(spacing_zyx, factors, strict=True))
    voxel_ml = float(np.prod(work_spacing)) / 1000.0

    air = work < params.air_hu
    outside = _outside_air(air, work, params.outside_hu)
    inside_air = air & ~outside
    lungs = _keep_lung_components(inside_air, voxel_ml, params, z_extent_mm=hu.shape[0] * spacing_zyx[0])
    sides = _split_left_right(lungs)

    body = ~outside
    radius_px = tuple(int(round(params.closing_mm / s)) for s in work_spacing[1:])
    gap_px = int(params.z_gap_mm / work_spacing[0])
    max_hole_px = int(params.max_hole_cm2 * 100.0 / (work_spacing[1] * work_spacing[2]))
    labels = np.zeros_like(sides)
    for value in (1, 2):  # close each lung on its own so the two never merge across the mediastinum
        box = _bbox_slices(sides == value, margins=(1, 2 * radius_px[0] + 1, 2 * radius_px[1] + 1))
        if box is None:
            continue
        # closing, z-gap and hole filling never reach beyond the lung's bounding box; with these
        # margins the crop sees the same holes and closing context as the whole volume: the same
        # result, in half the time
        lung = sides[box] == value
        closed = _close_2d(lung, radius_px) | _fill_z_gaps(lung, gap_px)
        closed = _fill_holes(closed, max_hole_px) & body[box]
        region = labels[box]
        region[closed & (region == 0)] = value
    return LungMask(labels=labels, factors=factors, shape=tuple(hu.shape))

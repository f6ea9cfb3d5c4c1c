"""Classical lung segmentation on a canonical CT in HU, made for hospital scans.

The method is the textbook one (threshold, components, closing), with the steps real scans need:

1. **Where the patient is** (:mod:`covidseg.imaging.body`): the torso per axial slice, without the table,
   mattress, blankets and arms; lungs can only lie inside its convex hull. Air enclosed in the
   table shell or between an arm and the chest wall is never lung.
2. Air-like voxels are those below ``air_hu`` (default -300 HU), so ground-glass opacities
   (-700..-300 HU) are lung from the start.
3. **Trachea and main bronchi** (:mod:`covidseg.imaging.airways`) are traced from the neck down and left
   out, as in lungmask and TotalSegmentator masks; bronchi inside the lung stay lung (hole filling).
4. **Lungs among the air pockets**: bowel and stomach gas are pure air (in-plane sections mostly
   below ``gas_hu``) and, when the trachea is in view, do not touch the airway; the lungs do.
5. Dense lesions (consolidation, -100..+50 HU) look like the chest wall. Each lung is closed
   in-plane with a large structuring element (``closing_mm``, default 12 mm radius) and its holes
   are filled, which brings subpleural consolidations back **inside** the lung mask. The tops of
   the diaphragm's domes, islands of tissue in the lung with liver or spleen under them, stay out,
   and so does the one slice of partial volume over them (it looks like ground glass).

It works on a coarser copy (about ``work_mm`` mm voxels) for speed: a 512x512x300 CT becomes
~256x256x150. In slices where the torso touches the image border (a tight crop, common in CTA),
air that touches the border but is mostly above ``outside_hu`` (a lung cut by the crop, ~-850 HU)
is lung too; true outside air (~-1000 HU) is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from covidseg.imaging.airways import AirwayParams, trace_airway
from covidseg.imaging.body import (
    IN_PLANE_4,
    IN_PLANE_SQUARE,
    disk,
    fill_holes_per_slice,
    largest_per_slice,
    open_in_plane,
    touches_border,
)


@dataclass(frozen=True)
class LungParams:
    """Parameters of the classical lung segmentation (HU, mm, mL)."""

    air_hu: float = -300.0  # voxels below are air-like (lung incl. ground glass, airways, outside air)
    outside_hu: float = -950.0  # border-touching air mostly (median) darker than this is outside the body
    work_mm: float = 2.0  # target voxel size of the working copy (mm); never upsampled
    closing_mm: float = 12.0  # in-plane closing radius per lung (mm): pulls dense lesions inside
    z_gap_mm: float = 60.0  # per (y, x) column, gaps up to this long between lung above and below
    # are lung too (a dense lesion with aerated lung above and below it)
    min_lung_ml: float = 5.0  # components smaller than this are not lung (mL; area-based for 1 slice)
    min_fraction: float = 0.05  # ... nor smaller than this fraction of the largest component
    max_hole_cm2: float = 10.0  # in-slice holes up to this area are filled (cm²); larger ones only
    # when enclosed in 3D or resting on lung in the slice below, so a diaphragm dome seen as an
    # island in one slice stays out
    vessel_cm2: float = 2.0  # in-slice holes up to this area are always filled (vessels; cm²)
    open_mm: float = 3.0  # in-plane opening radius that parts table shell, blankets and clothing
    # folds (thinner than ~2x this) from the torso (mm); a chest wall must be thicker than that
    gas_hu: float = -970.0  # an in-plane air section mostly darker than this is gas, not lung (HU)
    airway_fraction: float = 0.25  # with the trachea in view, an air pocket that does not touch
    # the airway is lung only if it holds at least this share of the largest pocket
    airway_rim_mm: float = 5.0  # the traced airway lumen grown by this much in-plane is not lung (mm)
    airway: AirwayParams = AirwayParams()

    @classmethod
    def from_json(cls, data: dict) -> LungParams:
        """From :func:`dataclasses.asdict` output; keys a file lacks (older versions) take defaults."""
        fields = {k: float(v) for k, v in data.items() if k != "airway"}
        return cls(**fields, airway=AirwayParams(**{k: float(v) for k, v in data.get("airway", {}).items()}))


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


def _border_air(air: np.ndarray, hu: np.ndarray, outside_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """Per slice, the air components that touch the image border, split by their median HU:
    (true outside air, mostly below `outside_hu`; air-like tissue, mostly above it, e.g. a lung cut
    by a crop). The median, not the mean: outside air joined to a foam mattress or a blanket
    (-900..-700 HU) under the patient can average above `outside_hu`, and taken for a cut lung it
    would let the table's enclosed air become lung."""
    labels, n = ndimage.label(air, structure=IN_PLANE_4)
    if n == 0:
        return np.zeros_like(air), np.zeros_like(air)
    touches = touches_border(labels, n)
    touches[0] = False
    counts = np.maximum(np.bincount(labels.ravel(), minlength=n + 1), 1)
    dark_share = np.bincount(labels.ravel(), weights=(hu < outside_hu).ravel(), minlength=n + 1) / counts
    dark = dark_share > 0.5  # median below outside_hu
    return (touches & dark)[labels], (touches & ~dark)[labels]


def _cropped_slices(body: np.ndarray, outside: np.ndarray, max_outside: float = 0.1) -> np.ndarray:
    """[z] bool: slices cut by a tight field of view: the torso reaches the image border and true
    outside air covers less than `max_outside` of the slice (a whole-body field of view has plenty,
    so the foam of a mattress that reaches the border is never mistaken for a cut lung).

    A series has one field of view: when most slices are cut by it, every slice where the torso
    reaches the border is cut too, also near the apex where the body narrows and more outside air
    shows (up to ~20 % of the slice in a CTA crop)."""
    on_border = body[:, 0, :].any(1) | body[:, -1, :].any(1) | body[:, :, 0].any(1) | body[:, :, -1].any(1)
    tight = on_border & (outside.mean(axis=(1, 2)) < max_outside)
    return on_border if tight.mean() > 0.5 else tight


def lung_region(work: np.ndarray, work_spacing: tuple[float, float, float], params: LungParams) -> np.ndarray:
    """Where lungs can lie on the working grid, [z, y, x] bool: what the torso encloses in each slice.

    In a slice cut by a tight field of view (a CTA crop: no table, hardly any outside air) the
    chest wall may be cut off the torso or thinned by the crop; there it is what any tissue
    encloses, plus the air that touches the border but is not outside air (a lung cut by the crop,
    ~-850 HU).
    """
    open_px = tuple(max(1, int(round(params.open_mm / s))) for s in work_spacing[1:])
    tissue = work >= params.air_hu
    body = largest_per_slice(open_in_plane(tissue, open_px))
    region = fill_holes_per_slice(body)
    outside, cut_lung = _border_air(~tissue, work, params.outside_hu)
    cropped = _cropped_slices(body, outside)
    region[cropped] = fill_holes_per_slice(tissue[cropped]) | cut_lung[cropped]
    return region


def _bbox_slices(mask: np.ndarray, margins: tuple[int, ...]) -> tuple[slice, ...] | None:
    """The bounding box of `mask` widened by `margins` voxels per axis (clamped); None if empty."""
    if not mask.any():
        return None
    box = []
    for axis, margin in enumerate(margins):
        nz = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, int(nz[0]) - margin), min(mask.shape[axis], int(nz[-1]) + 1 + margin)))
    return tuple(box)


def _dilate_near(mask: np.ndarray, structure: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Binary dilation of a small `mask` (the airway) computed inside its bounding box only."""
    margins = tuple(iterations * (n // 2) + 1 for n in structure.shape)
    box = _bbox_slices(mask, margins)
    out = np.zeros_like(mask)
    if box is not None:
        out[box] = ndimage.binary_dilation(mask[box], structure=structure, iterations=iterations)
    return out


def _slice_islands(
    background: np.ndarray, below: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The in-slice components of `background` [y, x] and what they rest on.

    Returns (labels [y, x], 4-connected, 0 where `background` is False; sizes [n + 1], pixels per
    label; enclosed [n + 1], True for a component off the slice border, never for label 0;
    support [n + 1], pixels of each component's footprint that are True in `below` [y, x], the
    slice under it).
    """
    labels, n = ndimage.label(background, structure=IN_PLANE_4[1])
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    enclosed = ~touches_border(labels, n)  # on the slice border: not enclosed
    enclosed[0] = False  # label 0 is the foreground
    support = np.bincount(labels.ravel(), weights=below.ravel(), minlength=n + 1)
    return labels, sizes, enclosed, support


def _fill_holes(mask: np.ndarray, max_hole_px: int, vessel_px: int, min_support: float = 0.5) -> np.ndarray:
    """Fill holes enclosed in 3D, in-slice holes of at most `vessel_px` pixels (vessels, small
    nodules), and in-slice holes of at most `max_hole_px` pixels that rest on lung: at least
    `min_support` of the hole's footprint in the slice below is lung (or a hole filled there). A
    lesion has lung above and below; a diaphragm dome cut by a slice is an island too, but under it
    lies liver or spleen, so it stays out. Slices go from the bottom (z = 0) up."""
    out = ndimage.binary_fill_holes(mask) if mask.shape[0] > 1 else mask.copy()
    for k in range(mask.shape[0]):
        below = out[k - 1] if k > 0 else np.ones_like(mask[k])  # the bottom slice: no support test
        labels, sizes, enclosed, support = _slice_islands(~mask[k], below)
        small = enclosed & (sizes <= max_hole_px)
        small &= (support >= min_support * sizes) | (sizes <= vessel_px)
        out[k] |= small[labels]
    return out


def _diaphragm_islands(
    lung: np.ndarray, mask: np.ndarray, min_px: int, min_support: float = 0.1
) -> np.ndarray:
    """The tops of the diaphragm's domes that the closing took into `mask`, with their partial volume.

    Islands: in-slice components of non-air enclosed by `lung` (the air candidates), larger than
    `min_px` pixels, that rest on no lung: less than `min_support` of their footprint in the slice
    below is in the mask, once that slice's own islands are out. A dome cut by a slice is such an
    island with liver or spleen under it, each one inside the one below; the box closing fills a
    small one and shrinks a large one's hole to a square, leaving a ring of dense tissue as lung. A
    lesion inside the lung has lung under it; one lying on a dome is mostly wider than the dome's
    top, which is why `min_support` is low (at 0.5, 3 of 32 COVID phantoms lost 7-15 % of their
    lesion; at 0.1 none lost more than the rim below). Partial volume with the dome looks like
    ground glass, so one pixel around each island in-plane and the slice over it go too (a lesion
    touching a dome loses that rim: at most 2.3 % of a phantom's lesion). Slices go from the bottom
    (z = 0) up; returns the voxels of `mask` to leave out."""
    islands = np.zeros_like(mask)
    for k in range(1, mask.shape[0]):
        labels, sizes, enclosed, support = _slice_islands(~lung[k], mask[k - 1] & ~islands[k - 1])
        dome = enclosed & (sizes > min_px) & (support < min_support * sizes)
        islands[k] = dome[labels] & mask[k]
    # partial volume with the dome: one pixel around each island in-plane, and the slice over it
    grown = ndimage.binary_dilation(islands, structure=IN_PLANE_SQUARE)
    grown[1:] |= grown[:-1].copy()
    return grown & mask


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


def _gas_sections(candidates: np.ndarray, work: np.ndarray, gas_hu: float) -> np.ndarray:
    """Per slice, the in-plane air sections that are mostly pure gas (more than half of their voxels
    below `gas_hu`): bowel or stomach gas. A slice through the diaphragm can join gas under it to
    the lung base in 3D (partial volume on thick slices); in-plane the two stay apart. A bulla is
    part of its lung's section, so it stays."""
    labels, n = ndimage.label(candidates, structure=IN_PLANE_4)
    if n == 0:
        return np.zeros_like(candidates)
    counts = np.maximum(np.bincount(labels.ravel()), 1)
    share = np.bincount(labels.ravel(), weights=(work < gas_hu).ravel()) / counts
    share[0] = 0.0
    return (share > 0.5)[labels]


def _keep_lung_components(
    candidates: np.ndarray,
    work: np.ndarray,
    airway: np.ndarray,
    voxel_ml: float,
    params: LungParams,
    z_extent_mm: float,
) -> np.ndarray:
    """The air pockets that are lung: boolean mask.

    Gas sections (:func:`_gas_sections`) go first, so no pocket left is mostly pure gas. A pocket
    is lung when it is big enough (`min_lung_ml`, shrunk in proportion for scans covering less than
    100 mm in z: a single slice, a thin slab) and either touches the traced airway or holds a large
    share of the largest pocket (`airway_fraction` with the trachea in view, `min_fraction`
    without).
    """
    candidates = candidates & ~_gas_sections(candidates, work, params.gas_hu)
    labels, n = ndimage.label(candidates)
    if n == 0:
        return candidates
    sizes = np.bincount(labels.ravel())[1:] * voxel_ml
    min_ml = params.min_lung_ml * min(1.0, z_extent_mm / 100.0)
    keep = sizes >= min_ml
    if not keep.any():
        return np.zeros_like(candidates)
    largest = sizes[keep].max()
    if airway.any():
        near = _dilate_near(airway, ndimage.generate_binary_structure(3, 1), iterations=2)
        touching = np.zeros(n + 1, dtype=bool)
        touching[np.unique(labels[near])] = True
        keep &= touching[1:] | (sizes >= params.airway_fraction * largest)
    else:
        keep &= sizes >= params.min_fraction * largest
    return np.concatenate([[False], keep])[labels]


def split_left_right(lungs: np.ndarray) -> np.ndarray:
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

    region = lung_region(work, work_spacing, params)
    airway = trace_airway(work, region, work_spacing, params.airway)
    rim_px = tuple(max(1, int(round(params.airway_rim_mm / s))) for s in work_spacing[1:])
    airway_rim = _dilate_near(airway, disk(rim_px))  # lumen + partial-volume wall
    candidates = (work < params.air_hu) & region & ~airway_rim
    z_extent_mm = hu.shape[0] * spacing_zyx[0]
    lungs = _keep_lung_components(candidates, work, airway, voxel_ml, params, z_extent_mm)
    sides = split_left_right(lungs)

    radius_px = tuple(int(round(params.closing_mm / s)) for s in work_spacing[1:])
    gap_px = int(params.z_gap_mm / work_spacing[0])
    pixel_mm2 = work_spacing[1] * work_spacing[2]
    max_hole_px, vessel_px = (
        int(cm2 * 100.0 / pixel_mm2) for cm2 in (params.max_hole_cm2, params.vessel_cm2)
    )
    labels = np.zeros_like(sides)
    for value in (1, 2):  # close each lung on its own so the two never merge across the mediastinum
        box = _bbox_slices(sides == value, margins=(1, 2 * radius_px[0] + 1, 2 * radius_px[1] + 1))
        if box is None:
            continue
        # closing, z-gap and hole filling never reach beyond the lung's bounding box; with these
        # margins the crop sees the same holes and closing context as the whole volume: the same
        # result, in half the time
        lung = sides[box] == value
        closed = (_close_2d(lung, radius_px) | _fill_z_gaps(lung, gap_px)) & ~airway_rim[box]
        closed = _fill_holes(closed, max_hole_px, vessel_px) & region[box]
        closed &= ~_diaphragm_islands(lung, closed, vessel_px)
        target = labels[box]
        target[closed & (target == 0)] = value
    return LungMask(labels=labels, factors=factors, shape=tuple(hu.shape))

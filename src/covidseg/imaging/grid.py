"""From a canonical CT in HU to the fixed network grid, and back.

Forward (``preprocess``): clip HU to a window -> crop to the lung box -> resize to a fixed grid
(default 32x128x128, z, y, x) -> scale to [0, 1]. Backward (:func:`grid_to_canonical`): resize a
grid array to the crop box and paste it into an empty canonical volume, so that a result computed
on the grid lands on the right voxels of the native scan.

:class:`HuScale` is the one HU window of a run: preprocess sets it (``--hu-window``), every manifest,
checkpoint and sidecar after it records it (``hu_window: [lo, hi]``), and every density a setting
gives in HU (lesion levels, thresholds, jitter) is put on the [0, 1] scale through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from covidseg.imaging.lungs import LungMask


@dataclass(frozen=True)
class HuScale:
    """The preprocess HU window: HU are clipped to ``low_hu..high_hu`` and scaled linearly to [0, 1],
    ``unit = (HU - low_hu) / (high_hu - low_hu)``. The default -1000..400 HU makes 1.0 unit = 1400 HU.

    JSON form: ``[low_hu, high_hu]`` (the ``hu_window`` of manifests, checkpoints and sidecars).
    """

    low_hu: float = -1000.0
    high_hu: float = 400.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low_hu) and math.isfinite(self.high_hu) and self.low_hu < self.high_hu):
            raise ValueError(f"HU window {self.low_hu}..{self.high_hu}: must be two finite numbers, lo < hi")

    @property
    def width_hu(self) -> float:
        """HU per unit of the [0, 1] scale (1400 HU on the default window)."""
        return self.high_hu - self.low_hu

    @property
    def window(self) -> tuple[float, float]:
        """(low_hu, high_hu)."""
        return (self.low_hu, self.high_hu)

    def to_unit(self, hu):
        """A density (HU; float, array or tensor) on the [0, 1] scale, not clipped."""
        return (hu - self.low_hu) / (self.high_hu - self.low_hu)

    def to_hu(self, unit):
        """A [0, 1]-scale value (float, array or tensor) back in HU."""
        return unit * (self.high_hu - self.low_hu) + self.low_hu

    def unit_of_hu_difference(self, delta_hu):
        """A density difference (HU) as a difference on the [0, 1] scale: 350 HU -> 0.25 by default."""
        return delta_hu / (self.high_hu - self.low_hu)

    def hu_of_unit_difference(self, delta_unit):
        """A difference on the [0, 1] scale as a density difference (HU): 0.25 -> 350 HU by default."""
        return delta_unit * (self.high_hu - self.low_hu)

    def normalise(self, hu: torch.Tensor | np.ndarray) -> torch.Tensor:
        """HU clipped to the window and scaled to [0, 1] (float32 tensor)."""
        lo, hi = self.low_hu, self.high_hu
        t = torch.as_tensor(hu, dtype=torch.float32)
        return ((t.clamp(lo, hi) - lo) / (hi - lo)).contiguous()

    def to_json(self) -> list[float]:
        return [self.low_hu, self.high_hu]

    @classmethod
    def from_json(cls, values: Sequence[float] | None) -> HuScale:
        """From ``[lo, hi]`` (HU); ValueError for anything else. None, for a file written before the
        window was recorded there (an older checkpoint), is the default window: the one those ran on."""
        if values is None:
            return cls()
        try:
            low_hu, high_hu = (float(v) for v in values)
        except (TypeError, ValueError):
            raise ValueError(f"hu_window {values!r}: must be two numbers [lo, hi] (HU)") from None
        return cls(low_hu, high_hu)

    def __str__(self) -> str:
        return f"{self.low_hu:g}..{self.high_hu:g}"


#: The default preprocess window, -1000..400 HU.
DEFAULT_HU_SCALE = HuScale()


@dataclass(frozen=True)
class CropBox:
    """A box in canonical voxel indices, end-exclusive: ``a[z0:z1, y0:y1, x0:x1]``."""

    z0: int
    z1: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return slice(self.z0, self.z1), slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z1 - self.z0, self.y1 - self.y0, self.x1 - self.x0)

    def to_json(self) -> list[int]:
        return [self.z0, self.z1, self.y0, self.y1, self.x0, self.x1]

    @classmethod
    def from_json(cls, values: list[int]) -> CropBox:
        return cls(*(int(v) for v in values))

    def is_within(self, shape: tuple[int, int, int]) -> bool:
        lo_hi = ((self.z0, self.z1), (self.y0, self.y1), (self.x0, self.x1))
        return all(0 <= lo < hi <= n for (lo, hi), n in zip(lo_hi, shape, strict=True))


def lung_crop_box(
    lungs: LungMask, spacing_zyx: tuple[float, float, float], margin_mm: float = 5.0
) -> CropBox | None:
    """The lungs' bounding box widened by `margin_mm` on every side (clamped to the volume)."""
    bbox = lungs.bbox()
    if bbox is None:
        return None
    out = []
    for axis in range(3):
        lo, hi = bbox[2 * axis], bbox[2 * axis + 1]
        pad = int(round(margin_mm / spacing_zyx[axis]))
        out += [max(0, lo - pad), min(lungs.shape[axis], hi + pad)]
    return CropBox(*out)


def resize(array: np.ndarray | torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Resize a [z, y, x] array to `shape` (float32 tensor), anti-aliased where it shrinks.

    Axes that shrink are first averaged over areas (no aliasing of thin vessels), then trilinear
    interpolation (align_corners=False: voxel centres map to voxel centres) gives the exact size.
    """
    t = torch.as_tensor(np.ascontiguousarray(array) if isinstance(array, np.ndarray) else array)
    t = t.to(torch.float32)[None, None]  # [1, 1, Z, Y, X]
    source = tuple(t.shape[2:])
    shrunk = tuple(min(s, d) for s, d in zip(source, shape, strict=True))
    if shrunk != source:
        t = F.adaptive_avg_pool3d(t, shrunk)
    if tuple(t.shape[2:]) != tuple(shape):
        t = F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)
    return t[0, 0]


def hu_to_grid(hu: np.ndarray, box: CropBox, grid: tuple[int, int, int], scale: HuScale) -> np.ndarray:
    """Canonical CT (HU) -> [0, 1] float32 array (on the HU `scale`) on the grid covering `box`.

    HU are clipped before resizing so that bone and metal do not bleed into the lung.
    """
    cropped = torch.from_numpy(np.ascontiguousarray(hu[box.slices], dtype=np.float32))
    clipped = cropped.clamp(*scale.window)
    return scale.normalise(resize(clipped, grid)).numpy()


def mask_to_grid(mask: np.ndarray, box: CropBox, grid: tuple[int, int, int]) -> np.ndarray:
    """A canonical label/boolean mask -> uint8 mask on the grid (fraction covered >= 0.5)."""
    if mask.dtype != bool and mask.max() > 1:  # several labels: resize each, keep the majority
        labels = [v for v in np.unique(mask[box.slices]) if v != 0]
        fractions = np.stack([resize(mask[box.slices] == v, grid).numpy() for v in labels])
        winner = np.asarray(labels, dtype=np.uint8)[fractions.argmax(0)]
        return np.where(fractions.max(0) >= 0.5, winner, 0).astype(np.uint8)
    return (resize(mask[box.slices] > 0, grid).numpy() >= 0.5).astype(np.uint8)


def grid_to_canonical(
    grid_array: np.ndarray | torch.Tensor,
    box: CropBox,
    canonical_shape: tuple[int, int, int],
    fill: float = 0.0,
) -> np.ndarray:
    """Map a grid array back onto the full canonical volume (float32; `fill` outside the box).

    Continuous values are interpolated; threshold the result for masks (>= 0.5).
    """
    out = np.full(canonical_shape, fill, dtype=np.float32)
    out[box.slices] = resize(grid_array, box.shape).numpy()
    return out


def grid_spacing_mm(box: CropBox, grid: tuple[int, int, int], spacing_zyx) -> tuple[float, float, float]:
    """Physical size (mm) of one grid voxel along z, y, x for a given crop box."""
    return tuple(float(n * s / g) for n, s, g in zip(box.shape, spacing_zyx, grid, strict=True))

"""Image geometry: native geometry records, the canonical orientation and the way back.

Conventions
-----------
* Physical space is ITK/DICOM LPS: +x toward the patient's Left, +y Posterior, +z Superior (mm).
* Arrays are indexed ``[z, y, x]`` (SimpleITK's numpy order).
* The **canonical orientation** is LPS with an axis-aligned grid: array axis 2 (x) runs toward the
  patient's left, axis 1 (y) toward posterior, axis 0 (z) toward superior. An axial slice
  ``a[k]`` then shows anterior at the top and the patient's left on the image right, the usual
  radiological view.
* Going to canonical only permutes and flips array axes (no resampling), so going back is exact:
  outputs get the input's size, spacing, origin and direction bit for bit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Geometry:
    """Where a 3D image lies in space (ITK conventions: x, y, z order; mm)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major; column i = direction of image axis i

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        """The geometry of a 3D SimpleITK image."""
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
        return cls(
            size=tuple(int(v) for v in image.GetSize()),
            spacing=tuple(float(v) for v in image.GetSpacing()),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    def apply(self, image: sitk.Image) -> sitk.Image:
        """Set spacing, origin and direction on `image` (whose size must match) and return it."""
        if tuple(image.GetSize()) != tuple(self.size):
            raise ValueError(f"size {image.GetSize()} does not match geometry size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return (self.size[2], self.size[1], self.size[0])

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (1 mL = 1000 mm³)."""
        return float(np.prod(self.spacing)) / 1000.0

    def matches(self, other: Geometry, atol: float = 1e-3) -> bool:
        """Same size, and spacing/origin/direction equal within `atol` (mm, or cosine units)."""
        return (
            tuple(self.size) == tuple(other.size)
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def describe_mismatch(self, other: Geometry, atol: float = 1e-3) -> str:
        """A short human-readable reason why two geometries differ ('' when they match)."""
        for name in ("size", "spacing", "origin", "direction"):
            a, b = getattr(self, name), getattr(other, name)
            same = tuple(a) == tuple(b) if name == "size" else np.allclose(a, b, atol=atol)
            if not same:
                fmt = (lambda v: tuple(round(float(x), 4) for x in v)) if name != "size" else tuple
                return f"{name} {fmt(a)} != {fmt(b)}"
        return ""

    def to_json(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> Geometry:
        return cls(
            size=tuple(int(v) for v in data["size"]),
            spacing=tuple(float(v) for v in data["spacing"]),
            origin=tuple(float(v) for v in data["origin"]),
            direction=tuple(float(v) for v in data["direction"]),
        )


@dataclass(frozen=True)
class Orientation:
    """How to turn a native ``[z, y, x]`` array into the canonical one and back.

    ``axes[i]`` is the native array axis that becomes canonical array axis ``i``; ``flips[i]``
    says whether canonical axis ``i`` is then reversed.
    """

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    @classmethod
    def of(cls, geometry: Geometry) -> Orientation:
        """The axis permutation and flips that bring `geometry` closest to LPS.

        Each image axis is assigned to the physical axis its direction cosine is largest along,
        greedily from the most clearly aligned axis, so oblique scans (a few degrees of gantry
        tilt, or even 45°) still get a one-to-one assignment.
        """
        d = geometry.direction_matrix  # d[:, i] = physical direction of image axis i (x, y, z)
        weights = np.abs(d)
        phys_of_image_axis = [-1, -1, -1]
        taken_phys: set[int] = set()
        order = np.dstack(np.unravel_index(np.argsort(-weights, axis=None), weights.shape))[0]
        for phys, img_axis in order:
            if phys_of_image_axis[img_axis] == -1 and phys not in taken_phys:
                phys_of_image_axis[img_axis] = int(phys)
                taken_phys.add(int(phys))
        # Canonical array axis for physical axis p (x=0, y=1, z=2) is 2 - p; likewise native.
        axes = [0, 0, 0]
        flips = [False, False, False]
        for img_axis, phys in enumerate(phys_of_image_axis):
            canonical_axis = 2 - phys
            axes[canonical_axis] = 2 - img_axis
            flips[canonical_axis] = bool(d[phys, img_axis] < 0)
        return cls(axes=tuple(axes), flips=tuple(flips))

    @property
    def is_identity(self) -> bool:
        return self.axes == (0, 1, 2) and not any(self.flips)

    def to_canonical(self, native: np.ndarray) -> np.ndarray:
        """Native ``[z, y, x]`` array -> canonical ``[z(S), y(P), x(L)]`` array (a view if possible)."""
        out = np.transpose(native, self.axes)
        flip_axes = tuple(i for i, f in enumerate(self.flips) if f)
        return np.flip(out, axis=flip_axes) if flip_axes else out

    def to_native(self, canonical: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_canonical`."""
        flip_axes = tuple(i for i, f in enumerate(self.flips) if f)
        out = np.flip(canonical, axis=flip_axes) if flip_axes else canonical
        return np.transpose(out, np.argsort(self.axes))

    def canonical_spacing_zyx(self, geometry: Geometry) -> tuple[float, float, float]:
        """Voxel spacing (mm) along the canonical array axes."""
        native = geometry.spacing_zyx
        return tuple(float(native[a]) for a in self.axes)

    def to_json(self) -> dict:
        return {"axes": list(self.axes), "flips": list(self.flips)}

    @classmethod
    def from_json(cls, data: dict) -> Orientation:
        return cls(axes=tuple(int(a) for a in data["axes"]), flips=tuple(bool(f) for f in data["flips"]))


def image_from_array(array_zyx: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image holding `array_zyx` (native order) with `geometry` exactly."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx), isVector=False)
    return geometry.apply(image)


def axis_aligned_geometry(
    shape_zyx: tuple[int, int, int],
    spacing_zyx: tuple[float, float, float],
    origin_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Geometry:
    """An LPS, axis-aligned geometry for a canonical array of `shape_zyx` (mm spacing)."""
    return Geometry(
        size=(int(shape_zyx[2]), int(shape_zyx[1]), int(shape_zyx[0])),
        spacing=(float(spacing_zyx[2]), float(spacing_zyx[1]), float(spacing_zyx[0])),
        origin=tuple(float(v) for v in origin_xyz),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    )


#: A direction matrix D is taken as a rotation when |DᵀD - I| <= this everywhere (a rotation written
#: with four decimals is off by ~1e-4; a shear or scale of 0.1 % or more is refused).
ORTHONORMAL_TOLERANCE = 1e-3


def is_orthonormal(direction: np.ndarray) -> bool:
    """Whether the square matrix `direction` is a rotation (or reflection) within ORTHONORMAL_TOLERANCE."""
    with np.errstate(over="ignore", invalid="ignore"):  # huge or NaN entries: not a rotation
        gram = direction.T @ direction
        return bool(np.all(np.abs(gram - np.eye(len(direction))) <= ORTHONORMAL_TOLERANCE))

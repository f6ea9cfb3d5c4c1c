"""Explicit intensity mappings for images that are not stored in Hounsfield units.

Syntax (command line ``--intensity``):

* ``window:LO,HI`` -- 8-bit display images: stored 0..255 maps linearly onto LO..HI HU.
  Lung-windowed JPEG/PNG slices (e.g. COVID-SemiSeg) are roughly ``window:-1350,150``. Their
  lungs are found by the display-slice mask (:mod:`covidseg.imaging.display_lungs`), which needs
  neither true HU nor air around the patient.
* ``linear:SLOPE,INTERCEPT`` -- HU = SLOPE * stored + INTERCEPT (a DICOM rescale that the file
  itself lacks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32: a smaller slope is 0


@dataclass(frozen=True)
class IntensityMapping:
    """HU = slope * stored + intercept."""

    slope: float
    intercept: float
    spec: str

    @property
    def is_display(self) -> bool:
        """True for ``window:`` mappings: the image was rendered for display, its HU are approximate."""
        return self.spec.strip().lower().startswith("window")

    def apply(self, stored: np.ndarray) -> np.ndarray:
        """Map stored values to HU (float32)."""
        return (stored.astype(np.float32) * np.float32(self.slope) + np.float32(self.intercept)).astype(
            np.float32
        )


def parse_intensity(spec: str) -> IntensityMapping:
    """Parse ``window:LO,HI`` or ``linear:SLOPE,INTERCEPT``; raise ValueError with the reason."""
    kind, sep, rest = spec.strip().partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in ("window", "linear"):
        raise ValueError(f"intensity mapping {spec!r}: expected 'window:LO,HI' or 'linear:SLOPE,INTERCEPT'")
    parts = [p.strip() for p in rest.split(",")]
    if len(parts) != 2:
        raise ValueError(f"intensity mapping {spec!r}: expected two numbers separated by a comma")
    try:
        a, b = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"intensity mapping {spec!r}: {rest!r} are not two numbers") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"intensity mapping {spec!r}: numbers must be finite")
    if kind == "window":
        if not b > a:
            raise ValueError(f"intensity mapping {spec!r}: HI must be greater than LO")
        slope, intercept = (b - a) / 255.0, a
    else:
        slope, intercept = a, b
    if not (_FLOAT32_TINY <= abs(slope) <= _FLOAT32_MAX and abs(intercept) <= _FLOAT32_MAX):
        raise ValueError(
            f"intensity mapping {spec!r}: slope must not be 0"
            if slope == 0
            else f"intensity mapping {spec!r}: numbers out of range (float32)"
        )
    return IntensityMapping(slope=slope, intercept=intercept, spec=spec)

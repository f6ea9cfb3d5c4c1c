"""Frozen configuration dataclasses, one per stage; saved as JSON beside every output."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from covidseg.lungs import LungParams


@dataclass(frozen=True)
class PreprocessConfig:
    """How CTs become network inputs (HU, mm, voxels)."""

    grid: tuple[int, int, int] = (32, 128, 128)  # z, y, x voxels of the network grid
    hu_window: tuple[float, float] = (-1000.0, 400.0)  # HU clipped to this, then scaled to [0, 1]
    margin_mm: float = 5.0  # added around the lung bounding box before cropping
    lungs: LungParams = field(default_factory=LungParams)

    def __post_init__(self) -> None:
        if len(self.grid) != 3 or any(int(g) < 1 for g in self.grid):
            raise ValueError(f"grid must be three positive sizes (z, y, x), got {self.grid}")
        lo, hi = self.hu_window
        if not hi > lo:
            raise ValueError(f"HU window must have hi > lo, got {self.hu_window}")
        if self.margin_mm < 0:
            raise ValueError("margin_mm must be >= 0")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> PreprocessConfig:
        return cls(
            grid=tuple(int(v) for v in data["grid"]),
            hu_window=tuple(float(v) for v in data["hu_window"]),
            margin_mm=float(data["margin_mm"]),
            lungs=LungParams(**data["lungs"]),
        )

"""From a whole CT to the 2D segmenter's input slices, and from its outputs to a native-size mask.

The 2D networks are trained on slices of the preprocess grid: the lung box resampled to
``slice_size`` in-plane, each slice a slab about ``slab_mm`` thick (the lung box's height divided by
the grid's z size). Prediction reproduces that for any scan: the lung box is cut into
``round(height_mm / slab_mm)`` slabs (at least one), every slab is resized to ``slice_size``, and the
network's probabilities are interpolated back onto the box's native voxels (trilinear), so a
thin-slice scan gets a smooth full-resolution mask and the network sees what it was trained on.
Lesions are kept inside the lung mask, below ``MAX_LESION_HU`` (with a voxel's margin) and, for
inputs in HU, above ``MIN_LESION_HU`` (aerated lung).

Everything here works on canonical ``[z, y, x]`` arrays (see :mod:`covidseg.imaging.geometry`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy import ndimage

from covidseg.imaging.airways import AirwayParams
from covidseg.imaging.grid import CropBox, HuScale, lung_crop_box, resize
from covidseg.imaging.lungs import LungMask, LungParams, segment_lungs
from covidseg.settings import check_config, check_values

#: logits for a batch of slices: [N, 1, H, W] float32 in -> [N, 1, H, W] float32 out
LogitsFn = Callable[[np.ndarray], np.ndarray]

#: No COVID-19 lesion is this dense (HU): ground glass to consolidation span about -750..+100 HU;
#: what is denser is a contrast-filled vessel, bone or calcification.
MAX_LESION_HU = 200.0

#: Aerated lung is lighter than this (HU, in-plane 3 x 3 mean): quantitative chest CT calls -950..-701
#: HU well-aerated lung; 50 HU below that boundary leaves room for noise and partial volume.
MIN_LESION_HU = -750.0


def _lung_params_from_json(data) -> LungParams:
    """:class:`LungParams` from JSON: known names only, each value checked by its rule
    (:mod:`covidseg.settings`) before it is converted; ValueError otherwise."""
    if not isinstance(data, dict) or not isinstance(data.get("airway", {}), dict):
        raise ValueError("lungs is not a JSON object of numbers")
    airway = data.get("airway", {})
    known = {f.name for f in dataclasses.fields(LungParams)}
    known_airway = {f.name for f in dataclasses.fields(AirwayParams)}
    unknown = sorted(set(data) - known) + sorted(f"airway.{k}" for k in set(airway) - known_airway)
    if unknown:
        raise ValueError(f"lungs: unknown parameters {', '.join(unknown)}")
    check_values(LungParams, {k: v for k, v in data.items() if k != "airway"}, "lungs.")
    check_values(AirwayParams, airway, "lungs.airway.")
    return LungParams.from_json(data)


@dataclass(frozen=True)
class SlicePreprocessing:
    """What a trained 2D segmenter expects: stored in checkpoints and ONNX sidecars."""

    hu_window: tuple[float, float]  # HU clipped to this and scaled to [0, 1]
    slice_size: tuple[int, int]  # (H, W) pixels of one network slice
    slab_mm: float  # thickness (mm) of one network slice along z
    margin_mm: float = 5.0  # added around the lung box
    threshold: float = 0.5  # probability -> lesion
    lungs: LungParams = field(default_factory=LungParams)

    def __post_init__(self) -> None:
        """Refuse values no trained model has and that would crash or exhaust memory at predict time
        (a hand-edited sidecar or checkpoint): SettingError (a ValueError) naming the value and its
        rule (:data:`covidseg.settings.RULES`)."""
        check_config(self)

    @property
    def hu_scale(self) -> HuScale:
        """The [0, 1] scale the model was trained on (`hu_window`, HU)."""
        return HuScale(*self.hu_window)

    def to_json(self) -> dict:
        """Plain JSON types (lists, not tuples), the same in a checkpoint and in a sidecar."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> SlicePreprocessing:
        """From :meth:`to_json` output (a checkpoint's or a sidecar's ``preprocessing``), checked: every
        value by its rule before it is converted (no strings or booleans for numbers, whole slice
        sizes). Raises ValueError with a one-line cause such as ``slab_mm = 0.01: must be a number in
        [0.5, 500] mm``."""
        if not isinstance(data, dict):
            raise ValueError(f"preprocessing is a {type(data).__name__}, not a JSON object")
        keys = ("hu_window", "slice_size", "slab_mm", "margin_mm", "threshold", "lungs")
        missing = [k for k in keys if k not in data]
        if missing:
            raise ValueError(f"preprocessing without {', '.join(missing)}")
        check_values(cls, {k: data[k] for k in keys if k != "lungs"})
        return cls(
            hu_window=tuple(float(v) for v in data["hu_window"]),
            slice_size=tuple(int(v) for v in data["slice_size"]),
            slab_mm=float(data["slab_mm"]),
            margin_mm=float(data["margin_mm"]),
            threshold=float(data["threshold"]),
            lungs=_lung_params_from_json(data["lungs"]),
        )


def slab_count(box: CropBox, spacing_zyx: tuple[float, float, float], slab_mm: float) -> int:
    """Number of network slices for the box: its height (mm) / slab thickness, at least 1."""
    return max(1, int(round(box.shape[0] * spacing_zyx[0] / slab_mm)))


def ct_to_slices(
    hu: np.ndarray, box: CropBox, spacing_zyx: tuple[float, float, float], spec: SlicePreprocessing
) -> np.ndarray:
    """Canonical CT (HU) -> network slices [n, H, W] float32 in [0, 1] covering `box`.

    HU are clipped before resizing so that bone and metal do not bleed into the lung, exactly as
    the preprocess stage does for training data.
    """
    shape = (slab_count(box, spacing_zyx, spec.slab_mm), *spec.slice_size)
    cropped = torch.from_numpy(np.ascontiguousarray(hu[box.slices], dtype=np.float32))
    scale = spec.hu_scale
    return scale.normalise(resize(cropped.clamp_(*scale.window), shape)).numpy()


@dataclass
class CTSegmentation:
    """A CT's lesion segmentation in canonical orientation; arrays cover `box` only."""

    box: CropBox  # lung box in canonical voxels; everything outside it is background
    canonical_shape: tuple[int, int, int]
    lesion: np.ndarray  # [bz, by, bx] bool, inside the lungs
    lungs: np.ndarray  # [bz, by, bx] uint8: 0 background, 1 right lung, 2 left lung
    probability: np.ndarray | None  # [bz, by, bx] float32 in [0, 1] (only when asked for)
    n_slices: int  # network slices the box was cut into

    def full(self, array: np.ndarray, dtype=np.uint8) -> np.ndarray:
        """A box array pasted into a zero canonical volume."""
        out = np.zeros(self.canonical_shape, dtype=dtype)
        out[self.box.slices] = array
        return out


def too_dense(hu: np.ndarray, max_hu: float = MAX_LESION_HU) -> np.ndarray:
    """Voxels of `hu` [z, y, x] (HU) that cannot be lesion: at or above `max_hu`, and their four
    in-plane neighbours (the partial volume around a contrast-filled vessel looks like ground glass).
    On a CT angiogram the model flagged enhanced hilar vessels and their rims; a scan without
    contrast has next to nothing here."""
    dense = hu >= max_hu
    near = dense.copy()  # the in-plane 4-neighbour dilation, as shifted copies (6x faster than scipy's)
    near[:, 1:] |= dense[:, :-1]
    near[:, :-1] |= dense[:, 1:]
    near[:, :, 1:] |= dense[:, :, :-1]
    near[:, :, :-1] |= dense[:, :, 1:]
    return near


def too_light(hu: np.ndarray, min_hu: float = MIN_LESION_HU) -> np.ndarray:
    """Voxels of `hu` [z, y, x] (HU) that are aerated lung: their in-plane 3 x 3 mean is below `min_hu`.

    The model sees slabs ~10 mm thick at 128 pixels, so its probability spills from anything dense
    (a diaphragm dome cut tangentially, a lesion's core) into the aerated lung beside it; on normal002
    most false positives were such a band around the left dome. At the scan's own resolution those
    voxels are plainly lung. Only for HU: a display image's mapped values are not. The mean is taken
    a few slices at a time (it is in-plane), so the float copy stays small on a large scan."""
    light = np.empty(hu.shape, dtype=bool)
    for z0 in range(0, hu.shape[0], 16):
        chunk = hu[z0 : z0 + 16].astype(np.float32, copy=False)
        light[z0 : z0 + 16] = ndimage.uniform_filter(chunk, size=(1, 3, 3)) < min_hu
    return light


def segment_ct(
    hu: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    logits_fn: LogitsFn,
    spec: SlicePreprocessing,
    batch_size: int = 16,
    keep_probability: bool = False,
    lungs: LungMask | None = None,
    min_lesion_hu: float | None = MIN_LESION_HU,
) -> CTSegmentation | None:
    """Lesion mask of a canonical CT in HU; None when no lungs are found.

    Lesions are only kept inside the lung mask (the classical lung segmentation of
    :mod:`covidseg.imaging.lungs`, the same the training data was cropped and gated with), off
    the voxels :func:`too_dense` for a lesion and, unless `min_lesion_hu` is None (an image whose
    values were mapped to HU), off those :func:`too_light` for one.
    """
    lungs = lungs if lungs is not None else segment_lungs(hu, spacing_zyx, spec.lungs)
    box = lung_crop_box(lungs, spacing_zyx, spec.margin_mm)
    if box is None:
        return None
    slices = ct_to_slices(hu, box, spacing_zyx, spec)  # [n, H, W]
    logits = np.empty(slices.shape, dtype=np.float32)
    for start in range(0, len(slices), batch_size):
        batch = np.ascontiguousarray(slices[start : start + batch_size, None])  # [b, 1, H, W]
        logits[start : start + batch_size] = logits_fn(batch)[:, 0]
    probability_grid = torch.sigmoid(torch.from_numpy(logits))
    probability = resize(probability_grid, box.shape).numpy()  # [bz, by, bx]
    lung_box = lungs.full()[box.slices]
    lesion = (probability >= spec.threshold) & (lung_box > 0) & ~too_dense(hu[box.slices])
    if min_lesion_hu is not None:
        lesion &= ~too_light(hu[box.slices], min_lesion_hu)
    return CTSegmentation(
        box=box,
        canonical_shape=tuple(hu.shape),
        lesion=lesion,
        lungs=lung_box,
        probability=probability if keep_probability else None,
        n_slices=len(slices),
    )

"""Pseudo-masks from pseudo-healthy volumes, and the trivial threshold baseline.

``M = I_C - Î_H``: lesions are denser than lung, so the lesion evidence is the positive part of the
difference inside the lung. Values are on the preprocess [0, 1] scale of the run's
:class:`~covidseg.imaging.grid.HuScale` (1.0 = 1400 HU on the default window); the densities a
setting gives (the smallest threshold, the full-lesion difference, the baseline's level) are HU,
put on that scale.

The binarisation threshold is chosen **without labels**: a high percentile of the (smoothed)
difference over the lungs of *healthy* training volumes, which fixes the share of healthy lung that
is flagged (1 - percentile/100). Components smaller than ``min_component`` voxels are removed.

Hysteresis (``grow_percentile``, default 98; None turns it off): a second, lower threshold is
calibrated the same way at a lower percentile of the same healthy lungs, and the binary mask becomes
the connected components of the lung above that lower threshold which hold a voxel of the confident
mask. Confident seeds grow into connected, less certain tissue; isolated blobs above only the lower
threshold are not added. With the seeds at the 99.8th percentile and growth at the 98th, about as
much healthy lung is flagged as with the 99th alone, and sensitivity rises (docs/results.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from covidseg.imaging.grid import HuScale

#: The difference (HU above the pseudo-healthy lung) that counts as a full lesion in the soft mask.
SOFT_SCALE_HU = 350.0


@dataclass(frozen=True)
class PseudoMaskConfig:
    smooth_sigma: float = 0.7  # Gaussian smoothing of the difference map (grid voxels)
    healthy_percentile: float = 99.8  # threshold = this percentile of healthy-lung differences (99 before
    # issue 16; 99.8 with growth at 98 flags the same ~1 % of healthy lung, see docs/results.md)
    min_threshold_hu: float = 28.0  # the calibrated threshold is never below this difference (HU)
    min_component: int = 20  # connected components smaller than this (voxels) are removed
    high_infected: float = 0.05  # slice lesion fraction of its lung >= this: high-infected set
    low_infected: float = 0.005  # slice lesion fraction <= this: low-infected set
    min_lung_fraction: float = 0.02  # slices with less lung than this share of the slice are skipped
    grow_percentile: float | None = 98.0  # hysteresis: seeds grow above this percentile's threshold
    # (None: off, the behaviour before issue 16)


def difference_map(image: np.ndarray, healthy: np.ndarray, lung: np.ndarray, sigma: float) -> np.ndarray:
    """Positive part of ``image - healthy`` inside `lung`, smoothed; float32 [z, y, x]."""
    diff = np.clip(image.astype(np.float32) - healthy.astype(np.float32), 0.0, None)
    if sigma > 0:
        diff = ndimage.gaussian_filter(diff, sigma=(sigma * 0.5, sigma, sigma))  # grids are thick in z
    return (diff * (lung > 0)).astype(np.float32)


def calibrate_threshold(
    healthy_differences: list[np.ndarray],
    lungs: list[np.ndarray],
    cfg: PseudoMaskConfig,
    scale: HuScale,
    percentile: float | None = None,
) -> float:
    """The label-free threshold (on the [0, 1] `scale`): a percentile (`percentile`, default
    ``cfg.healthy_percentile``) of difference values over healthy lung voxels, never below
    ``cfg.min_threshold_hu`` (HU) put on `scale`."""
    min_threshold = scale.unit_of_hu_difference(cfg.min_threshold_hu)
    values = np.concatenate([d[lung > 0].ravel() for d, lung in zip(healthy_differences, lungs, strict=True)])
    if values.size == 0:
        return min_threshold
    percentile = cfg.healthy_percentile if percentile is None else percentile
    return max(float(np.percentile(values, percentile)), min_threshold)


def calibrate_grow_threshold(
    healthy_differences: list[np.ndarray], lungs: list[np.ndarray], cfg: PseudoMaskConfig, scale: HuScale
) -> float | None:
    """The lower (hysteresis) threshold on the [0, 1] `scale`: :func:`calibrate_threshold` at
    ``cfg.grow_percentile`` (same healthy lungs, same floor of ``cfg.min_threshold_hu`` HU), never
    above the main threshold; None when ``cfg.grow_percentile`` is None (hysteresis off)."""
    if cfg.grow_percentile is None:
        return None
    high = calibrate_threshold(healthy_differences, lungs, cfg, scale)
    low = calibrate_threshold(healthy_differences, lungs, cfg, scale, percentile=cfg.grow_percentile)
    return min(low, high)


def calibration_record(
    healthy_differences: list[np.ndarray], lungs: list[np.ndarray], cfg: PseudoMaskConfig, scale: HuScale
) -> dict:
    """The label-free threshold (:func:`calibrate_threshold`) with how it was chosen, as train-gan
    writes it to calibration.json: the settings, the number of healthy volumes and the mean share of
    their lung above it before small components are removed. With hysteresis on
    (``cfg.grow_percentile``) also ``grow_percentile`` and its lower threshold ``grow_threshold``
    (:func:`calibrate_grow_threshold`, [0, 1] scale)."""
    threshold = calibrate_threshold(healthy_differences, lungs, cfg, scale)
    flagged = [
        float(((d > threshold) & (lung > 0)).sum() / max((lung > 0).sum(), 1))
        for d, lung in zip(healthy_differences, lungs, strict=True)
    ]
    record = {
        "threshold": threshold,
        "healthy_percentile": cfg.healthy_percentile,
        "smooth_sigma": cfg.smooth_sigma,
        "min_component": cfg.min_component,
        "n_healthy": len(healthy_differences),
        "healthy_lung_flagged_before_component_filter": float(np.mean(flagged)) if flagged else None,
    }
    if cfg.grow_percentile is not None:
        record["grow_percentile"] = cfg.grow_percentile
        record["grow_threshold"] = calibrate_grow_threshold(healthy_differences, lungs, cfg, scale)
    return record


def soft_mask(difference: np.ndarray, scale: HuScale, full_lesion_hu: float = SOFT_SCALE_HU) -> np.ndarray:
    """Continuous pseudo-mask in [0, 1] (float32): the difference map (on `scale`) divided by the
    difference of a full lesion, `full_lesion_hu` (HU) put on `scale`."""
    return np.clip(difference / scale.unit_of_hu_difference(full_lesion_hu), 0.0, 1.0).astype(np.float32)


#: Connectivity of pseudo-mask components (removal of small ones, hysteresis growth): 26 neighbours.
COMPONENT_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop 26-connected components with fewer than `min_voxels` voxels."""
    if min_voxels <= 1 or not mask.any():
        return mask.astype(bool)
    labels, n = ndimage.label(mask, structure=COMPONENT_STRUCTURE)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def binarise(difference: np.ndarray, threshold: float, min_component: int) -> np.ndarray:
    """Binary pseudo-mask: difference above `threshold`, small components removed (bool)."""
    return remove_small_components(difference > threshold, min_component)


def grow_from_seeds(
    difference: np.ndarray, seeds: np.ndarray, lung: np.ndarray, low_threshold: float
) -> np.ndarray:
    """Hysteresis: the 26-connected components of {`difference` > `low_threshold`} inside `lung` that
    hold at least one voxel of `seeds` (bool [z, y, x]), together with the seeds themselves.
    Components above the lower threshold without a seed are not added."""
    candidate = ((difference > low_threshold) & (lung > 0)) | seeds
    if not seeds.any():
        return seeds.astype(bool)
    labels, _ = ndimage.label(candidate, structure=COMPONENT_STRUCTURE)
    seeded = np.zeros(int(labels.max()) + 1, dtype=bool)
    seeded[np.unique(labels[seeds])] = True
    seeded[0] = False
    return seeded[labels]


def refined_mask(
    difference: np.ndarray,
    lung: np.ndarray,
    threshold: float,
    min_component: int,
    grow_threshold: float | None,
) -> np.ndarray:
    """The binary pseudo-mask (bool): :func:`binarise` at `threshold`, then, when `grow_threshold`
    is not None, grown by :func:`grow_from_seeds` into the lung above `grow_threshold` (both on the
    [0, 1] difference scale). None gives exactly :func:`binarise`."""
    binary = binarise(difference, threshold, min_component)
    if grow_threshold is None:
        return binary
    return grow_from_seeds(difference, binary, lung, grow_threshold)


#: The trivial baseline's density level (HU): voxels denser than this inside the lung are flagged.
BASELINE_HU = -600.0
#: The trivial baseline drops 26-connected components smaller than this (voxels; pixels on a slice).
BASELINE_MIN_COMPONENT = 20


def _above_in_lung(values: np.ndarray, lung: np.ndarray, level: float, min_component: int) -> np.ndarray:
    """`values` above `level` inside `lung`, components under `min_component` voxels removed (bool)."""
    return remove_small_components((values > level) & (lung > 0), min_component)


def hu_threshold_baseline(
    hu: np.ndarray,
    lung: np.ndarray,
    hu_level: float = BASELINE_HU,
    min_component: int = BASELINE_MIN_COMPONENT,
) -> np.ndarray:
    """The trivial baseline on HU: voxels of `hu` (HU, any shape, e.g. [z, y, x]) above `hu_level`
    (HU) inside `lung` (nonzero = lung, same shape), 26-connected components with fewer than
    `min_component` voxels removed; bool, the shape of `hu`.

    It flags vessels as well as lesions, which is exactly what a learned method must beat.
    """
    return _above_in_lung(hu, lung, hu_level, min_component)


def threshold_baseline(
    image: np.ndarray,
    lung: np.ndarray,
    scale: HuScale,
    hu: float = BASELINE_HU,
    min_component: int = BASELINE_MIN_COMPONENT,
) -> np.ndarray:
    """:func:`hu_threshold_baseline` on an `image` on the preprocess [0, 1] `scale`: voxels above
    `hu` HU (put on `scale`) inside the lung, small components removed (bool)."""
    return _above_in_lung(image, lung, scale.to_unit(hu), min_component)


#: Probability thresholds :func:`healthy_probability_threshold` tries, lowest first: 0.50 .. 0.95.
PROBABILITY_THRESHOLDS = tuple(round(0.50 + 0.05 * k, 2) for k in range(10))


def healthy_probability_threshold(
    masks: list[np.ndarray], probabilities: list[np.ndarray], lungs: list[np.ndarray], budget_percent: float
) -> tuple[float, float] | None:
    """A network's label-free probability threshold, calibrated on healthy lungs like the pseudo-mask
    thresholds: the lowest t of :data:`PROBABILITY_THRESHOLDS` at which `masks` (bool) with the voxels
    of probability >= t added flag at most `budget_percent` % of the healthy lungs' voxels. Returns
    (t, that %) or None when even the highest t flags more. Lists run over healthy volumes (or
    slices), arrays of one shape each.

    Self-training passes the healthy cases' pseudo-masks and the teacher's probabilities
    (:func:`with_teacher`); train-seg passes empty masks and its own probabilities on held-out
    healthy slices."""
    lung_voxels = max(sum(int((lung > 0).sum()) for lung in lungs), 1)
    for t in PROBABILITY_THRESHOLDS:
        flagged = sum(
            int((mask | ((prob >= t) & (lung > 0))).sum())
            for mask, prob, lung in zip(masks, probabilities, lungs, strict=True)
        )
        if 100.0 * flagged / lung_voxels <= budget_percent:
            return t, 100.0 * flagged / lung_voxels
    return None


def with_teacher(
    binary: np.ndarray, soft: np.ndarray, probability: np.ndarray, lung: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-masks refreshed by a teacher (self-training): the teacher's lung voxels of probability
    >= `threshold` join the binary mask, and there the soft mask becomes the larger of itself and the
    probability. Returns (binary bool, soft float32), arrays [z, y, x]."""
    confident = (probability >= threshold) & (lung > 0)
    return binary | confident, np.where(confident, np.maximum(soft, probability), soft).astype(np.float32)


def split_slices(binary: np.ndarray, lung: np.ndarray, cfg: PseudoMaskConfig) -> list[tuple[int, str, float]]:
    """(z, set, lesion fraction) for each slice with enough lung: set is 'high', 'low' or 'mid'.

    The high-infected and low-infected sets feed the contrastive loss of the 2D stage.
    """
    out = []
    plane = lung.shape[1] * lung.shape[2]
    for z in range(lung.shape[0]):
        lung_voxels = int((lung[z] > 0).sum())
        if lung_voxels < cfg.min_lung_fraction * plane:
            continue
        fraction = float((binary[z] & (lung[z] > 0)).sum()) / lung_voxels
        kind = "high" if fraction >= cfg.high_infected else ("low" if fraction <= cfg.low_infected else "mid")
        out.append((z, kind, fraction))
    return out

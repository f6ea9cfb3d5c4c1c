"""Pseudo-masks from pseudo-healthy volumes, and the trivial threshold baseline.

``M = I_C - Î_H``: lesions are denser than lung, so the lesion evidence is the positive part of the
difference inside the lung. Values are on the preprocess [0, 1] scale (1.0 = 1400 HU).

The binarisation threshold is chosen **without labels**: a high percentile of the (smoothed)
difference over the lungs of *healthy* training volumes, which fixes the share of healthy lung that
is flagged (1 - percentile/100). Components smaller than ``min_component`` voxels are removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class PseudoMaskConfig:
    smooth_sigma: float = 0.7  # Gaussian smoothing of the difference map (grid voxels)
    healthy_percentile: float = 99.0  # threshold = this percentile of healthy-lung differences
    min_threshold: float = 0.02  # never below (unit scale; 0.02 = 28 HU)
    min_component: int = 20  # connected components smaller than this (voxels) are removed
    high_infected: float = 0.05  # slice lesion fraction of its lung >= this: high-infected set
    low_infected: float = 0.005  # slice lesion fraction <= this: low-infected set
    min_lung_fraction: float = 0.02  # slices with less lung than this share of the slice are skipped


def difference_map(image: np.ndarray, healthy: np.ndarray, lung: np.ndarray, sigma: float) -> np.ndarray:
    """Positive part of ``image - healthy`` inside `lung`, smoothed; float32 [z, y, x]."""
    diff = np.clip(image.astype(np.float32) - healthy.astype(np.float32), 0.0, None)
    if sigma > 0:
        diff = ndimage.gaussian_filter(diff, sigma=(sigma * 0.5, sigma, sigma))  # grids are thick in z
    return (diff * (lung > 0)).astype(np.float32)


def calibrate_threshold(
    healthy_differences: list[np.ndarray], lungs: list[np.ndarray], cfg: PseudoMaskConfig
) -> float:
    """The label-free threshold: a percentile of difference values over healthy lung voxels."""
    values = np.concatenate([d[lung > 0].ravel() for d, lung in zip(healthy_differences, lungs, strict=True)])
    if values.size == 0:
        return cfg.min_threshold
    return max(float(np.percentile(values, cfg.healthy_percentile)), cfg.min_threshold)


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop 26-connected components with fewer than `min_voxels` voxels."""
    if min_voxels <= 1 or not mask.any():
        return mask.astype(bool)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def binarise(difference: np.ndarray, threshold: float, min_component: int) -> np.ndarray:
    """Binary pseudo-mask: difference above `threshold`, small components removed (bool)."""
    return remove_small_components(difference > threshold, min_component)


def threshold_baseline(
    image: np.ndarray, lung: np.ndarray, hu: float = -600.0, min_component: int = 20,
    window: tuple[float, float] = (-1000.0, 400.0),
) -> np.ndarray:  # fmt: skip
    """The trivial baseline: voxels above `hu` HU inside the lung, small components removed.

    `image` is on the preprocess [0, 1] scale of `window`. It flags vessels as well as lesions,
    which is exactly what a learned method must beat.
    """
    level = (hu - window[0]) / (window[1] - window[0])
    return remove_small_components((image > level) & (lung > 0), min_component)


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

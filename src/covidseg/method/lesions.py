"""Synthetic training lesions made of Perlin noise, painted into healthy lungs (image space).

The generator learns to *remove* lesions by restoring healthy volumes corrupted with these. What
decides how much it removes on real scans is how much they resemble real COVID-19 lesions, so:

* large and small: each volume gets a target lesion load drawn log-uniformly from
  ``load_range`` (fraction of the lung, default 0.5 %..30 %), cut from a fractal Perlin field;
* mostly subpleural and posterior: the field is biased toward the lung border and the back;
* ground glass with vessels kept: ``max(I, I + w (L_ggo - I))`` raises the parenchyma toward a
  ground-glass level but never darkens a vessel;
* consolidated cores: the densest part of some lesions goes to a consolidation level.

More looks, each off unless its setting is above 0 (then drawn per volume, as train-seg's 2D
lesions in :mod:`covidseg.method.slice_lesions`): a fine field mixed into the shape (``fine_mix``:
lobular foci instead of one patch), the dense part as the lesion's rim (``reversed_halo_probability``:
a ring of consolidation around ground glass), reticular lines over the ground glass
(``crazy_paving_probability``), and tubes of air through the dense part
(``air_bronchogram_probability``).

Values are on the preprocess scale: [0, 1] for the run's HU window, a
:class:`~covidseg.imaging.grid.HuScale` (default -1000..400, where HU = 1400 v - 1000). Lesion
levels and texture are given in HU and put on that scale, so a run preprocessed with another
``--hu-window`` gets lesions of the same density in HU. Shapes: ``[B, 1, D, H, W]``. Deterministic
given the torch.Generator. The settings, :class:`~covidseg.config.CorruptionConfig`, are train-gan's
``lesions`` (the ``[train-gan.lesions]`` table of a settings file).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from covidseg.config import CorruptionConfig
from covidseg.imaging.grid import HuScale
from covidseg.method.noise import fractal_perlin_3d

AIR_BRONCHOGRAM_HU = -900.0  # air in the bronchi crossing a consolidation (partial volume with it)


def _border_proximity(lung: torch.Tensor, radius: int = 4) -> torch.Tensor:
    """~1 at the lung border, falling to 0 deep inside (in-plane box blur of the mask)."""
    k = 2 * radius + 1
    blurred = F.avg_pool3d(lung, kernel_size=(1, k, k), stride=1, padding=(0, radius, radius))
    return (1.0 - blurred).clamp(0, 1) * 2.0  # border voxels of a straight edge: ~0.5 -> 1


def quantile_in_mask(values: torch.Tensor, mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per batch element, the `q` [B] quantile of `values` where `mask` > 0.5 (returns [B]; +inf for
    an element with an empty mask, so a threshold at it selects nothing). Any spatial shape."""
    out = []
    for v, m, qi in zip(values, mask, q, strict=True):
        inside = v[m > 0.5]
        out.append(torch.quantile(inside.float(), qi) if inside.numel() else v.new_tensor(float("inf")))
    return torch.stack(out)


def perlin_lesions(
    image: torch.Tensor,
    lung: torch.Tensor,
    generator: torch.Generator,
    config: CorruptionConfig | None = None,
    *,
    scale: HuScale,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint Perlin-noise lesions into healthy `image` inside `lung`.

    Args:
        image: [B, 1, D, H, W] healthy volumes, preprocess scale [0, 1] of the HU `scale`.
        lung: [B, 1, D, H, W] lung masks (0/1).
        generator: torch.Generator on the CPU (fields are moved to the image's device).
        config: lesion loads, shapes and levels (HU); the defaults when None.
        scale: the grids' HU window, which puts the lesion levels (HU) on the [0, 1] scale.

    Returns:
        (corrupted [B, 1, D, H, W], lesion mask [B, 1, D, H, W] in {0, 1}).
    """
    cfg = config or CorruptionConfig()
    b, _, d, h, w = image.shape
    device = image.device

    def uniform(lo: float, hi: float, n: int = b) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, generator=generator)).to(device)

    def field(times: float, octaves: int) -> torch.Tensor:  # [B, 1, D, H, W], unit std per volume
        frequency = tuple(times * f for f in cfg.frequency)
        f = fractal_perlin_3d((b, 1, d, h, w), frequency, octaves=octaves, generator=generator).to(device)
        return f / f.flatten(1).std(dim=1).clamp_min(1e-6).view(b, 1, 1, 1, 1)

    shape = field(1.0, cfg.octaves)
    if cfg.fine_mix > 0:  # lobular foci: part of the shape from a field three times finer
        share = uniform(0.0, cfg.fine_mix).view(b, 1, 1, 1, 1)
        shape = (1 - share) * shape + share * field(3.0, 2)
    y = torch.linspace(-1.0, 1.0, h, device=device).view(1, 1, 1, h, 1)  # -1 anterior .. 1 posterior
    score = shape + cfg.border_bias * _border_proximity(lung) + cfg.posterior_bias * y

    lo, hi = cfg.load_range
    load = torch.exp(uniform(math.log(lo), math.log(hi)))  # [B] lesion fraction of the lung
    threshold = quantile_in_mask(score, lung, 1.0 - load).view(b, 1, 1, 1, 1)
    weight = torch.sigmoid((score - threshold) / cfg.edge) * lung  # soft lesion [B, 1, D, H, W]

    texture = scale.unit_of_hu_difference(cfg.texture_hu) * fractal_perlin_3d(
        (b, 1, d, h, w), tuple(4 * f for f in cfg.frequency), octaves=2, generator=generator
    ).to(device)
    ggo = torch.tensor([scale.to_unit(v) for v in cfg.ggo_hu], device=device)
    ggo_level = (ggo[0] + (ggo[1] - ggo[0]) * uniform(0.0, 1.0)).view(b, 1, 1, 1, 1) + texture
    corrupted = torch.maximum(image, image + weight * (ggo_level - image))  # vessels stay brighter
    if cfg.crazy_paving_probability > 0:
        corrupted = corrupted + weight * _crazy_paving(field(3.5, 1), cfg, scale, uniform)

    has_core = uniform(0.0, 1.0) < cfg.core_probability
    core_share = uniform(*cfg.core_fraction)
    core_threshold = quantile_in_mask(score, lung, 1.0 - load * core_share).view(b, 1, 1, 1, 1)
    core = torch.sigmoid((score - core_threshold) / cfg.edge) * lung * has_core.view(b, 1, 1, 1, 1)
    if cfg.reversed_halo_probability > 0:  # the dense part is the lesion's rim instead of its core
        rim = (weight - erode_in_plane(weight, max(2, round(h / 48)))).clamp(0, 1)
        is_rim = (uniform(0.0, 1.0) < cfg.reversed_halo_probability).view(b, 1, 1, 1, 1)
        core = torch.where(is_rim, rim * has_core.view(b, 1, 1, 1, 1), core)
    cons = torch.tensor([scale.to_unit(v) for v in cfg.consolidation_hu], device=device)
    cons_level = (cons[0] + (cons[1] - cons[0]) * uniform(0.0, 1.0)).view(b, 1, 1, 1, 1) + texture
    corrupted = corrupted + core * (cons_level - corrupted)
    if cfg.air_bronchogram_probability > 0:  # tubes: where two coarse fields are both near zero
        crossed = (uniform(0.0, 1.0) < cfg.air_bronchogram_probability).view(b, 1, 1, 1, 1)
        tubes = torch.exp(-((field(1.5, 1) / 0.15) ** 2 + (field(1.5, 1) / 0.15) ** 2)) * crossed
        corrupted = corrupted + core * tubes * (scale.to_unit(AIR_BRONCHOGRAM_HU) - corrupted)
    return corrupted.clamp(0.0, 1.0), (weight >= 0.5).to(image.dtype)


def _crazy_paving(field: torch.Tensor, cfg: CorruptionConfig, scale: HuScale, uniform) -> torch.Tensor:
    """The density (unit scale) crazy-paving lines add: thin sheets along the zero set of `field`
    (lines in every slice), their rise drawn from ``crazy_paving_hu``, in a share of the volumes."""
    b = field.shape[0]
    chosen = (uniform(0.0, 1.0) < cfg.crazy_paving_probability).view(b, 1, 1, 1, 1)
    rise = scale.unit_of_hu_difference(uniform(*cfg.crazy_paving_hu)).view(b, 1, 1, 1, 1)
    return zero_set_lines(field) * rise * chosen


def erode_in_plane(weight: torch.Tensor, radius: int) -> torch.Tensor:
    """Grey-level erosion of `weight` ``[B, 1, H, W]`` or ``[B, 1, D, H, W]`` by a square of side
    2 radius + 1 (voxels) in each slice."""
    k = 2 * radius + 1
    planes = -weight.reshape(-1, 1, *weight.shape[-2:])  # [B·D, 1, H, W]
    rows = F.max_pool2d(planes, (k, 1), stride=1, padding=(radius, 0))
    return -F.max_pool2d(rows, (1, k), stride=1, padding=(0, radius)).reshape(weight.shape)


def zero_set_lines(field: torch.Tensor, width: float = 0.15) -> torch.Tensor:
    """~1 on the zero set of `field` (a unit-std Perlin field), falling to 0 within `width` of it: a
    network of thin lines in 2D, thin sheets in 3D (lines in every slice). Any shape."""
    return torch.exp(-((field / width) ** 2))

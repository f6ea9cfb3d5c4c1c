"""Diverse synthetic lesions painted into 2D training slices: train-seg's lesion synthesis.

train-seg learns from make-masks' pseudo-masks, which carry the look of the lesions one generator
removed from one kind of training data. So that the segmenter does not learn that one look only, a
share of its training slices (``--synth-lesion-p``) get a synthetic lesion painted into their lung,
and the painted region joins the slice's targets. Every painted slice draws its own lesion; densities
are HU, put on the run's [0, 1] scale (:class:`~covidseg.imaging.grid.HuScale`):

* **shape**: a per-slice mix of a coarse and a fine Perlin field plus a pull toward the pleura. The
  lesion is the top `load` share of the slice's lung under that score (load log-uniform), so one
  slice gets a large patchy area, another many small lobular foci, a subpleural band or diffuse
  ground glass;
* **ground glass**: the lung rises toward a level drawn per slice, with texture; vessels stay brighter
  (``max(I, I + w (L - I))``);
* **consolidation** (some slices): the densest part of the lesion (a halo sign: dense centre, ground
  glass around it) or its rim (reversed halo: a ring of consolidation around ground glass);
* **crazy paving** (some slices): thin bright reticular lines over the ground glass (the zero set of
  a fine Perlin field);
* **air bronchograms** (some consolidations): dark lines of air through the dense part;
* **partial volume**: the lesion's edge is soft over a width drawn per slice.

The target is the lesion (``weight >= 0.5``) inside the lung, vessels in it included, as readers
outline lesions. Shapes: ``[B, 1, H, W]``; all random draws come from one CPU ``torch.Generator``,
so a training run stays deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from covidseg.imaging.grid import HuScale
from covidseg.method.lesions import erode_in_plane, quantile_in_mask, zero_set_lines
from covidseg.method.noise import fractal_perlin_2d


@dataclass(frozen=True)
class SliceLesionLook:
    """The ranges the synthetic lesions are drawn from (HU; shares of the slice's lung).

    load: share of the lung under the lesion, log-uniform; ggo_hu: ground-glass level; texture_hu:
    largest amplitude of the ground glass's texture; consolidation_p: share of lesions with a dense
    part; reversed_halo_p: share of those whose dense part is the rim; consolidation_hu: its level;
    core_share: the dense part's share of the lesion; crazy_paving_p, crazy_paving_hu: share of
    lesions with reticular lines and how much denser the lines are; air_bronchogram_p: share of
    consolidations crossed by air, at air_hu; edge: range of the edge width (units of the score's std).
    """

    load: tuple[float, float] = (0.02, 0.35)
    ggo_hu: tuple[float, float] = (-650.0, -250.0)
    texture_hu: float = 60.0
    consolidation_p: float = 0.5
    reversed_halo_p: float = 0.3
    consolidation_hu: tuple[float, float] = (-150.0, 60.0)
    core_share: tuple[float, float] = (0.2, 0.7)
    crazy_paving_p: float = 0.3
    crazy_paving_hu: tuple[float, float] = (80.0, 250.0)
    air_bronchogram_p: float = 0.4
    air_hu: float = -900.0
    edge: tuple[float, float] = (0.03, 0.3)


@dataclass(frozen=True)
class PaintedLesions:
    """What :func:`paint_slice_lesions` did: the images after painting, the painted lesion masks
    (float 0/1) and their density rise (image after minus before, [0, 1] scale), all [B, 1, H, W],
    and which images were painted ([B] bool)."""

    image: torch.Tensor
    mask: torch.Tensor
    rise: torch.Tensor
    painted: torch.Tensor


def paint_slice_lesions(
    image: torch.Tensor,
    lung: torch.Tensor,
    generator: torch.Generator,
    scale: HuScale,
    p: float,
    look: SliceLesionLook = SliceLesionLook(),
) -> PaintedLesions:
    """Paint a synthetic lesion into the lung of each image of `image` [B, 1, H, W] (on `scale`'s
    [0, 1] scale) with probability `p`; `lung` [B, 1, H, W] is 0/1. Images not painted (and images
    without lung) come back bit for bit with an empty mask. Draws B numbers from `generator` and, when
    any image is painted, the painted images' lesions (callers skip the call for p = 0)."""
    painted = (torch.rand(image.shape[0], generator=generator) < p).to(image.device)
    chosen = torch.nonzero(painted).flatten()
    out, mask = image.clone(), torch.zeros_like(image)
    if len(chosen):
        out[chosen], mask[chosen] = _paint(
            image[chosen], (lung[chosen] > 0.5).to(image.dtype), generator, scale, look
        )
    return PaintedLesions(out, mask, (out - image).clamp_min(0.0), painted)


def _paint(
    image: torch.Tensor, lung: torch.Tensor, generator: torch.Generator, scale: HuScale, look: SliceLesionLook
) -> tuple[torch.Tensor, torch.Tensor]:
    """One lesion in each image of `image` [B, 1, H, W] inside `lung` (0/1): (painted images, masks)."""
    b, _, h, w = image.shape
    device = image.device

    def uniform(lo_hi: tuple[float, float], n: int = b) -> torch.Tensor:
        lo, hi = lo_hi
        return (lo + (hi - lo) * torch.rand(n, generator=generator)).to(device).view(n, 1, 1, 1)

    def chance(q: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator) < q).to(device).view(b, 1, 1, 1)

    def field(cells: float, octaves: int) -> torch.Tensor:  # [B, 1, H, W], unit std per image
        f = fractal_perlin_2d((b, 1, h, w), cells, octaves=octaves, generator=generator).to(device)
        return f / f.flatten(1).std(dim=1).clamp_min(1e-6).view(b, 1, 1, 1)

    coarse, fine = field(3.0, 3), field(10.0, 2)
    fine_share, pull = uniform((0.0, 1.0)), uniform((0.0, 1.0))
    score = (1 - fine_share) * coarse + fine_share * fine + pull * _pleura_proximity(lung)
    load = torch.exp(uniform((math.log(look.load[0]), math.log(look.load[1]))))
    edge = uniform(look.edge)
    weight = torch.sigmoid((score - _lung_quantile(score, lung, 1 - load)) / edge) * lung

    texture = uniform((0.0, look.texture_hu)) * field(24.0, 2)
    ggo = scale.to_unit(uniform(look.ggo_hu) + texture)
    out = torch.maximum(image, image + weight * (ggo - image))  # vessels stay brighter
    lines = zero_set_lines(field(14.0, 1))  # thin network along a zero set
    paving = chance(look.crazy_paving_p) * scale.unit_of_hu_difference(uniform(look.crazy_paving_hu))
    out = out + weight * lines * paving

    core_share = uniform(look.core_share)
    core = torch.sigmoid((score - _lung_quantile(score, lung, 1 - load * core_share)) / edge) * lung
    rim = (weight - erode_in_plane(weight, max(2, round(h / 48)))).clamp(0, 1)
    dense = torch.where(chance(look.reversed_halo_p), rim, core) * chance(look.consolidation_p)
    out = out + dense * (scale.to_unit(uniform(look.consolidation_hu)) - out)
    air = zero_set_lines(field(6.0, 1), width=0.12) * chance(look.air_bronchogram_p)
    out = out + dense * air * (scale.to_unit(look.air_hu) - out)

    return out.clamp(0.0, 1.0), ((weight >= 0.5) & (lung > 0)).to(image.dtype)


def _pleura_proximity(lung: torch.Tensor) -> torch.Tensor:
    """~1 at the lung's border falling to 0 a sixteenth of the slice's width inside ([B, 1, H, W])."""
    radius = max(2, lung.shape[-1] // 16)
    k = 2 * radius + 1
    inside = F.avg_pool2d(lung, (k, 1), stride=1, padding=(radius, 0))  # a box filter, one axis at a time
    inside = F.avg_pool2d(inside, (1, k), stride=1, padding=(0, radius))
    return ((1.0 - inside) * 2.0).clamp(0.0, 1.0)


def _lung_quantile(values: torch.Tensor, lung: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """:func:`~covidseg.method.lesions.quantile_in_mask` over each image's lung, shaped to broadcast
    against [B, 1, H, W]: `q` and the result are [B, 1, 1, 1]."""
    return quantile_in_mask(values, lung, q.flatten()).view(-1, 1, 1, 1)

"""2D augmentations suited to CT slices, applied to a batch on the training device.

Real CTs arrive in many orientations and windows, so training sees flips, 90° rotations, small
rotations and scaling (one affine warp), window (gain/offset) jitter and noise. The same geometric
transform is applied to the image and all its masks; only the image gets intensity changes, whose
amplitudes are HU put on the run's [0, 1] scale (:class:`~covidseg.imaging.grid.HuScale`), so that a
run preprocessed with another ``--hu-window`` is augmented by the same densities.

Two optional intensity changes (off by default, and then no random number is drawn for them) teach
the network 8-bit display slices (JPEG/PNG), which reach `predict` through a fixed
``--intensity window:LO,HI`` although an unknown display window and curve rendered them:
:func:`random_blur` (a Gaussian blur of random width) and, last, :func:`render_display` (a random
display window and gamma curve, 256 grey levels, read back through the fixed window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from covidseg.imaging.grid import HuScale

#: The density (HU) the gain jitter keeps in place: air stays air.
GAIN_PIVOT_HU = -1000.0
#: Grey levels of an 8-bit display image.
DISPLAY_LEVELS = 256
#: Gaussian kernels of :func:`random_blur` reach this many sigmas either side.
BLUR_TRUNCATE = 3.0


@dataclass(frozen=True)
class DisplayRendering:
    """How :func:`render_display` draws a display rendering (HU).

    center_hu, width_hu: ranges (lo, hi) of the display window's centre and width, drawn uniformly;
    gamma: the curve ``v ** g`` has g log-uniform in [1 / gamma, gamma] (gamma >= 1); assumed_window_hu:
    the fixed window (lo, hi) that reads a display image back in HU, the one the docs tell users to pass
    to ``predict --intensity window:LO,HI``.
    """

    center_hu: tuple[float, float] = (-750.0, -450.0)
    width_hu: tuple[float, float] = (1000.0, 1700.0)
    gamma: float = 1.3
    assumed_window_hu: tuple[float, float] = (-1350.0, 150.0)


def augment_batch(
    image: torch.Tensor,
    masks: list[torch.Tensor],
    generator: torch.Generator,
    hu_scale: HuScale,
    max_rotation_deg: float = 10.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    gain_jitter: float = 0.05,
    offset_jitter_hu: float = 70.0,
    noise_std_hu: float = 14.0,
    blur_p: float = 0.0,
    blur_sigma_px: float = 1.0,
    display_p: float = 0.0,
    display: DisplayRendering = DisplayRendering(),
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Augment `image` [B, 1, H, W] ([0, 1] scale of `hu_scale`) and `masks` (each [B, 1, H, W],
    float 0..1).

    Intensity, per image: a gain in ``1 ± gain_jitter`` about :data:`GAIN_PIVOT_HU`, an offset in
    ``± offset_jitter_hu`` (HU) and Gaussian noise of ``noise_std_hu`` (HU); then, with probability
    `blur_p`, a Gaussian blur of sigma up to `blur_sigma_px` (pixels, :func:`random_blur`) and, with
    probability `display_p`, an 8-bit display rendering drawn by `display` (:func:`render_display`).
    Random draws come from `generator` (CPU) so a resumed run augments as an uninterrupted one; a
    probability of 0 draws nothing. Binary masks come back interpolated (threshold them at 0.5).
    """
    b = image.shape[0]
    device = image.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator).to(device)

    # flips and 90° rotations (exact, on all tensors)
    k = int(torch.randint(4, (1,), generator=generator))
    flip_x, flip_y = (bool(v) for v in torch.rand(2, generator=generator) < 0.5)
    tensors = [image, *masks]
    tensors = [torch.rot90(t, k, dims=(2, 3)) for t in tensors]
    if flip_x:
        tensors = [torch.flip(t, dims=(3,)) for t in tensors]
    if flip_y:
        tensors = [torch.flip(t, dims=(2,)) for t in tensors]

    # small rotation + isotropic scale: one affine warp per sample
    angle = (rand(b) * 2 - 1) * math.radians(max_rotation_deg)
    scale = scale_range[0] + rand(b) * (scale_range[1] - scale_range[0])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zeros = torch.zeros_like(cos)
    theta = torch.stack(
        [torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1
    )  # [B, 2, 3]
    grid = F.affine_grid(theta, list(tensors[0].shape), align_corners=False)
    warped = [
        F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False) for t in tensors
    ]
    out_image, out_masks = warped[0], warped[1:]

    # window jitter and scanner-like noise on the image only; the pivot term is 0 on the default window
    gain = 1.0 + (rand(b, 1, 1, 1) * 2 - 1) * gain_jitter
    offset = (rand(b, 1, 1, 1) * 2 - 1) * hu_scale.unit_of_hu_difference(offset_jitter_hu)
    offset = offset + hu_scale.to_unit(GAIN_PIVOT_HU) * (1.0 - gain)  # (v - p) g + p = v g + p (1 - g)
    noise_std = hu_scale.unit_of_hu_difference(noise_std_hu)
    noise = torch.randn(out_image.shape, generator=generator).to(device) * noise_std
    out_image = (out_image * gain + offset + noise).clamp(0.0, 1.0)
    if blur_p > 0:
        out_image = random_blur(out_image, generator, blur_p, blur_sigma_px)
    if display_p > 0:
        out_image = render_display(out_image, generator, hu_scale, display_p, display)
    return out_image, out_masks


def _chosen(b: int, p: float, generator: torch.Generator, device) -> torch.Tensor:
    """[B, 1, 1, 1] bool: which of `b` images an augmentation of probability `p` changes (b draws)."""
    return (torch.rand(b, generator=generator) < p).to(device).view(b, 1, 1, 1)


def random_blur(
    image: torch.Tensor, generator: torch.Generator, p: float, max_sigma_px: float
) -> torch.Tensor:
    """Blur each image of `image` [B, 1, H, W] with probability `p` by a Gaussian of sigma uniform in
    (0, `max_sigma_px`] pixels (separable, borders replicated), as a soft reconstruction kernel or an
    up-scaled display image would; the others come back bit for bit. Draws 2 B numbers from `generator`.
    The blur keeps flat regions' density (HU) and lowers the HU contrast of fine detail and noise."""
    b, device = image.shape[0], image.device
    chosen = _chosen(b, p, generator, device)
    sigma = (1.0 - torch.rand(b, 1, generator=generator, dtype=torch.float64)) * max_sigma_px  # (0, max]
    radius = max(1, math.ceil(BLUR_TRUNCATE * max_sigma_px))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(device, image.dtype)  # [B, K]
    rows = image.transpose(0, 1)  # [1, B, H, W]: one group per image
    rows = F.conv2d(F.pad(rows, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=b)
    cols = F.conv2d(F.pad(rows, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None], groups=b)
    return torch.where(chosen, cols.transpose(0, 1), image)


def render_display(
    image: torch.Tensor, generator: torch.Generator, hu_scale: HuScale, p: float, display: DisplayRendering
) -> torch.Tensor:
    """Render each image of `image` [B, 1, H, W] (on the [0, 1] scale of `hu_scale`) with probability
    `p` as an 8-bit display slice, then read it back as `predict --intensity window:LO,HI` does.

    Its HU go through a random display window (centre and width drawn uniformly from
    ``display.center_hu`` and ``display.width_hu``, HU), clipped to [0, 1], a gamma curve ``v ** g``
    (g log-uniform in [1 / display.gamma, display.gamma]) and 256 grey levels; a grey level v becomes
    ``lo + v (hi - lo)`` HU on ``display.assumed_window_hu`` (lo, hi), and that back on the [0, 1] scale
    (clamped). The mapping is monotone (non-decreasing) in HU; the others come back bit for bit.
    Draws 4 B numbers from `generator`.
    """
    b, device = image.shape[0], image.device
    chosen = _chosen(b, p, generator, device)

    def uniform(lo_hi: tuple[float, float], shape=(b, 1, 1, 1)) -> torch.Tensor:
        lo, hi = lo_hi
        return (lo + torch.rand(shape, generator=generator) * (hi - lo)).to(device)

    centre, width = uniform(display.center_hu), uniform(display.width_hu)
    log_gamma = math.log(display.gamma)
    gamma = torch.exp(uniform((-log_gamma, log_gamma)))
    grey = ((hu_scale.to_hu(image) - (centre - width / 2)) / width).clamp(0.0, 1.0) ** gamma
    grey = torch.round(grey * (DISPLAY_LEVELS - 1)) / (DISPLAY_LEVELS - 1)
    lo, hi = display.assumed_window_hu
    rendered = hu_scale.to_unit(lo + grey * (hi - lo)).clamp(0.0, 1.0)
    return torch.where(chosen, rendered, image)

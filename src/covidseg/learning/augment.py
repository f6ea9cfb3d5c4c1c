"""2D augmentations suited to CT slices, applied to a batch on the training device.

Real CTs arrive in many orientations and windows, so training sees flips, 90° rotations, small
rotations and scaling (one affine warp), window (gain/offset) jitter and noise. The same geometric
transform is applied to the image and all its masks; only the image gets intensity changes, whose
amplitudes are HU put on the run's [0, 1] scale (:class:`~covidseg.imaging.grid.HuScale`), so that a
run preprocessed with another ``--hu-window`` is augmented by the same densities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from covidseg.imaging.grid import HuScale

#: The density (HU) the gain jitter keeps in place: air stays air.
GAIN_PIVOT_HU = -1000.0


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
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Augment `image` [B, 1, H, W] ([0, 1] scale of `hu_scale`) and `masks` (each [B, 1, H, W],
    float 0..1).

    Intensity, per image: a gain in ``1 ± gain_jitter`` about :data:`GAIN_PIVOT_HU`, an offset in
    ``± offset_jitter_hu`` (HU) and Gaussian noise of ``noise_std_hu`` (HU). Random draws come from
    `generator` (CPU) so a resumed run augments as an uninterrupted one. Binary masks come back
    interpolated (threshold them at 0.5).
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
    return out_image, out_masks

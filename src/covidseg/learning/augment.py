"""2D augmentations suited to CT slices, applied to a batch on the training device.

Real CTs arrive in many orientations and windows, so training sees flips, 90° rotations, small
rotations and scaling (one affine warp), window (scale/offset) jitter and noise. The same geometric
transform is applied to the image and all its masks; only the image gets intensity changes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment_batch(
    image: torch.Tensor,
    masks: list[torch.Tensor],
    generator: torch.Generator,
    max_rotation_deg: float = 10.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    intensity_jitter: float = 0.05,
    noise_std: float = 0.01,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Augment `image` [B, 1, H, W] (unit scale) and `masks` (each [B, 1, H, W], float 0..1).

    Random draws come from `generator` (CPU) so a resumed run augments as an uninterrupted one.
    Binary masks come back interpolated (threshold them at 0.5).
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

    # window jitter and scanner-like noise on the image only
    gain = 1.0 + (rand(b, 1, 1, 1) * 2 - 1) * intensity_jitter
    offset = (rand(b, 1, 1, 1) * 2 - 1) * intensity_jitter
    noise = torch.randn(out_image.shape, generator=generator).to(device) * noise_std
    out_image = (out_image * gain + offset + noise).clamp(0.0, 1.0)
    return out_image, out_masks

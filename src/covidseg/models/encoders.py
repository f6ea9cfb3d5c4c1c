"""The 2D CNN encoder and cascaded decoder shared by ``TransUNet2D`` and ``UNet2D``.

Both segmenters are *encoder -> bottleneck -> decoder*; only the bottleneck differs (a ViT over the
1/16 feature map for TransUNet, a residual conv block for the U-Net), so the U-Net is the ablation
"TransUNet without the transformer".

Shapes: images ``[B, C, H, W]`` with ``H`` and ``W`` multiples of 16 (``ENCODER_DIVISOR``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from covidseg.models.blocks import ConvNormAct, Down, ResBlock, Up

ENCODER_DIVISOR = 16  # input H and W must be multiples of this (four stride-2 stages)


class ResNetEncoder2D(nn.Module):
    """ResNet-style encoder: skip features at 1/2, 1/4, 1/8 and a feature map at 1/16.

    ``channels = (c0, c1, c2, c3)``: a 7x7 stride-2 stem + ResBlock gives ``c0`` at 1/2 (as the
    ResNet root of R50-ViT), then three stride-2 ``Down`` stages give ``c1`` at 1/4, ``c2`` at 1/8
    and ``c3`` at 1/16.
    """

    def __init__(self, in_channels: int, channels: tuple[int, int, int, int]) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"encoder needs 4 channel widths (1/2, 1/4, 1/8, 1/16), got {channels}")
        self.stem = nn.Sequential(
            ConvNormAct(2, in_channels, channels[0], kernel=7, stride=2),
            ResBlock(2, channels[0], channels[0]),
        )
        self.downs = nn.ModuleList(Down(2, channels[i], channels[i + 1], stride=2) for i in range(3))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x: [B, C_in, H, W] -> (skips [1/2: [B, c0, H/2, W/2], 1/4: c1, 1/8: c2], [B, c3, H/16, W/16])."""
        h, w = x.shape[-2:]
        if h % ENCODER_DIVISOR or w % ENCODER_DIVISOR:
            raise ValueError(f"input height and width must be multiples of {ENCODER_DIVISOR}, got {h}x{w}")
        skips = [self.stem(x)]  # [B, c0, H/2, W/2]
        for down in self.downs:
            skips.append(down(skips[-1]))  # [B, c1, H/4, W/4], [B, c2, H/8, W/8], [B, c3, H/16, W/16]
        return skips[:3], skips[3]


class CascadedDecoder2D(nn.Module):
    """Cascaded upsampler: four (upsample x2, concat skip, ResBlock) steps, then a 3x3 conv head.

    ``skip_channels = (c0, c1, c2)`` are the encoder's 1/2, 1/4, 1/8 widths; ``channels = (d8, d4,
    d2, d1)`` the decoder widths at 1/8, 1/4, 1/2 and full resolution (the last step has no skip,
    as in TransUNet). Output: ``out_channels`` logits at the input resolution.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: tuple[int, int, int],
        channels: tuple[int, int, int, int],
        out_channels: int = 1,
    ) -> None:
        super().__init__()
        if len(channels) != 4 or len(skip_channels) != 3:
            raise ValueError("decoder needs 4 widths (1/8, 1/4, 1/2, 1/1) and 3 skip widths (1/2, 1/4, 1/8)")
        c_skip = (skip_channels[2], skip_channels[1], skip_channels[0], 0)  # coarse -> fine
        c_in = (in_channels, *channels[:3])
        self.ups = nn.ModuleList(Up(2, c_in[i], c_skip[i], channels[i]) for i in range(4))
        self.head = nn.Conv2d(channels[3], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], size) -> torch.Tensor:
        """x: [B, C, H/16, W/16]; skips as from ``ResNetEncoder2D``; size: (H, W) -> [B, out, H, W]."""
        for up, skip in zip(self.ups, [skips[2], skips[1], skips[0], None], strict=True):
            target = skip.shape[-2:] if skip is not None else size
            x = up(x, target, skip)  # [B, d8, H/8, W/8] -> d4 at 1/4 -> d2 at 1/2 -> [B, d1, H, W]
        return self.head(x)  # [B, out, H, W]

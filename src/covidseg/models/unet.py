"""UNet2D: the baseline segmenter, TransUNet2D with its ViT replaced by a residual conv bottleneck.

Same CNN encoder (skips at 1/2, 1/4, 1/8, a 1/16 map) and cascaded decoder as ``TransUNet2D``
(``models/encoders.py``), so comparing the two isolates what the transformer adds.

Shapes: input ``[B, in_channels, H, W]`` (a CT slice in [0, 1]); ``H, W`` multiples of 16; output
logits ``[B, 1, H, W]``; global features ``[B, bottleneck_channels]`` (average-pooled bottleneck).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from covidseg.models.blocks import ResBlock
from covidseg.models.encoders import CascadedDecoder2D, ResNetEncoder2D


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1
    encoder_channels: tuple[int, int, int, int] = (32, 64, 128, 256)  # CNN widths at 1/2, 1/4, 1/8, 1/16
    bottleneck_channels: int = 128  # ResBlock at 1/16 feeding the decoder
    decoder_channels: tuple[int, int, int, int] = (128, 64, 32, 16)  # at 1/8, 1/4, 1/2, 1/1

    def __post_init__(self) -> None:
        if len(self.encoder_channels) != 4 or len(self.decoder_channels) != 4:
            raise ValueError("encoder_channels and decoder_channels need 4 entries each")


class UNet2D(nn.Module):
    """CT slice ``[B, C, H, W]`` -> lesion logits ``[B, 1, H, W]`` (+ global features for contrast)."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or UNetConfig()
        c = config.encoder_channels
        self.encoder = ResNetEncoder2D(config.in_channels, c)
        self.bottleneck = ResBlock(2, c[3], config.bottleneck_channels)
        self.decoder = CascadedDecoder2D(config.bottleneck_channels, c[:3], config.decoder_channels)

    @property
    def feature_dim(self) -> int:
        """Width of the vectors ``encode`` returns."""
        return self.config.bottleneck_channels

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x: [B, C, H, W] -> (CNN skips, bottleneck [B, bottleneck_channels, H/16, W/16])."""
        skips, fmap = self.encoder(x)  # fmap: [B, c3, H/16, W/16]
        return skips, self.bottleneck(fmap)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> global feature [B, bottleneck_channels]: average-pooled bottleneck."""
        return self._encode(x)[1].mean(dim=(2, 3))  # [B, Cb]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, C, H, W] -> (logits [B, 1, H, W], features [B, bottleneck_channels]) in one pass."""
        skips, z = self._encode(x)
        return self.decoder(z, skips, x.shape[-2:]), z.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> logits [B, 1, H, W]."""
        return self.forward_with_features(x)[0]


# Same encoder/decoder widths as the TransUNet preset of the same name (bottleneck = its bridge width).
UNET_PRESETS: dict[str, UNetConfig] = {
    "tiny": UNetConfig(
        encoder_channels=(16, 32, 64, 96), bottleneck_channels=64, decoder_channels=(64, 32, 16, 8)
    ),
    "small": UNetConfig(),
    "base": UNetConfig(
        encoder_channels=(64, 256, 512, 1024), bottleneck_channels=512, decoder_channels=(256, 128, 64, 16)
    ),
}

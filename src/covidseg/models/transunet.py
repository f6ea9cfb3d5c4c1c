"""TransUNet2D: a CNN encoder, a ViT over the 1/16 feature map, and a cascaded upsampler.

Follows Chen et al., "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation"
(R50-ViT-B/16 hybrid): the CNN gives skips at 1/2, 1/4, 1/8 and a 1/16 feature map whose pixels are
the ViT's tokens (patch size 1 on that map). Tokens are linearly projected to ``embed_dim``, get a
learnable position embedding (bilinearly resized when the token grid differs from the one it was
made for, so any input whose sides are multiples of 16 works), pass ``depth`` pre-norm transformer
blocks and a final LayerNorm, and are folded back into a map for the decoder.

Shapes: input ``[B, in_channels, H, W]`` (a CT slice in [0, 1]); ``H, W`` multiples of 16; output
logits ``[B, 1, H, W]``; global features ``[B, embed_dim]`` (the mean of the final tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from covidseg.models.blocks import ConvNormAct, TransformerBlock
from covidseg.models.encoders import ENCODER_DIVISOR, CascadedDecoder2D, ResNetEncoder2D


@dataclass(frozen=True)
class TransUNetConfig:
    in_channels: int = 1
    encoder_channels: tuple[int, int, int, int] = (32, 64, 128, 256)  # CNN widths at 1/2, 1/4, 1/8, 1/16
    embed_dim: int = 256  # ViT token width
    depth: int = 4  # transformer blocks
    heads: int = 4
    mlp_dim: int = 512
    image_size: tuple[int, int] = (128, 128)  # (H, W) the position embedding is made for (the data grid)
    bridge_channels: int = 128  # 3x3 conv from the ViT map into the decoder ("conv_more")
    decoder_channels: tuple[int, int, int, int] = (128, 64, 32, 16)  # at 1/8, 1/4, 1/2, 1/1
    dropout: float = 0.0  # after the position embedding and in the MLPs
    attn_dropout: float = 0.0

    def __post_init__(self) -> None:
        if len(self.encoder_channels) != 4 or len(self.decoder_channels) != 4:
            raise ValueError("encoder_channels and decoder_channels need 4 entries each")
        if self.embed_dim % self.heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by heads {self.heads}")
        if len(self.image_size) != 2 or any(s <= 0 or s % ENCODER_DIVISOR for s in self.image_size):
            raise ValueError(f"image_size must be two positive multiples of {ENCODER_DIVISOR}")

    @property
    def token_grid(self) -> tuple[int, int]:
        """(h, w) token grid of the position embedding: image_size / 16."""
        return (self.image_size[0] // ENCODER_DIVISOR, self.image_size[1] // ENCODER_DIVISOR)


class TransUNet2D(nn.Module):
    """CT slice ``[B, C, H, W]`` -> lesion logits ``[B, 1, H, W]`` (+ global features for contrast)."""

    def __init__(self, config: TransUNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or TransUNetConfig()
        c = config.encoder_channels
        self.encoder = ResNetEncoder2D(config.in_channels, c)
        self.patch_embed = nn.Linear(c[3], config.embed_dim)  # patch size 1 on the 1/16 map
        gh, gw = config.token_grid
        self.pos_embed = nn.Parameter(torch.zeros(1, gh * gw, config.embed_dim))  # [1, gh*gw, D]
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                config.embed_dim, config.heads, config.mlp_dim, config.dropout, config.attn_dropout
            )
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.embed_dim)
        self.bridge = ConvNormAct(2, config.embed_dim, config.bridge_channels)
        self.decoder = CascadedDecoder2D(config.bridge_channels, c[:3], config.decoder_channels)

    @property
    def feature_dim(self) -> int:
        """Width of the vectors ``encode`` returns."""
        return self.config.embed_dim

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """Position embedding ``[1, h*w, D]`` for an ``h x w`` token grid (bilinear resize if needed)."""
        gh, gw = self.config.token_grid
        if (h, w) == (gh, gw):
            return self.pos_embed
        grid = rearrange(self.pos_embed, "1 (h w) d -> 1 d h w", h=gh, w=gw)  # [1, D, gh, gw]
        grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)  # [1, D, h, w]
        return rearrange(grid, "1 d h w -> 1 (h w) d")  # [1, h*w, D]

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, tuple[int, int]]:
        """x: [B, C, H, W] -> (CNN skips, final tokens [B, N, D], token grid (H/16, W/16))."""
        skips, fmap = self.encoder(x)  # fmap: [B, c3, H/16, W/16]
        h, w = fmap.shape[-2:]
        tokens = rearrange(fmap, "b c h w -> b (h w) c")  # [B, N = h*w, c3]
        tokens = self.embed_dropout(self.patch_embed(tokens) + self.position_embedding(h, w))  # [B, N, D]
        for block in self.blocks:
            tokens = block(tokens)  # [B, N, D]
        return skips, self.norm(tokens), (h, w)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> global feature [B, embed_dim]: mean of the final ViT tokens."""
        return self._encode(x)[1].mean(dim=1)  # [B, D]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, C, H, W] -> (logits [B, 1, H, W], features [B, embed_dim]) in one pass."""
        skips, tokens, (h, w) = self._encode(x)
        fmap = rearrange(tokens, "b (h w) d -> b d h w", h=h, w=w)  # [B, D, H/16, W/16]
        logits = self.decoder(self.bridge(fmap), skips, x.shape[-2:])  # [B, 1, H, W]
        return logits, tokens.mean(dim=1)  # features: [B, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> logits [B, 1, H, W]."""
        return self.forward_with_features(x)[0]


TRANSUNET_PRESETS: dict[str, TransUNetConfig] = {
    # a few minutes of CPU training
    "tiny": TransUNetConfig(
        encoder_channels=(16, 32, 64, 96),
        embed_dim=96,
        depth=2,
        heads=2,
        mlp_dim=192,
        bridge_channels=64,
        decoder_channels=(64, 32, 16, 8),
    ),
    # CPU-able, the default
    "small": TransUNetConfig(),
    # close to the paper's R50-ViT-B/16 (ViT-B: 768 wide, 12 blocks, 12 heads, MLP 3072); for a GPU
    "base": TransUNetConfig(
        encoder_channels=(64, 256, 512, 1024),
        embed_dim=768,
        depth=12,
        heads=12,
        mlp_dim=3072,
        bridge_channels=512,
        decoder_channels=(256, 128, 64, 16),
        dropout=0.1,
    ),
}

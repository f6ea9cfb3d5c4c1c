"""Building blocks shared by the models (2D and 3D), so no model copies another's layers."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv3d if dims == 3 else nn.Conv2d


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups (batch-size independent: batches here are tiny)."""
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ConvNormAct(nn.Sequential):
    """conv (k=3 by default, same padding) -> GroupNorm -> SiLU."""

    def __init__(self, dims: int, c_in: int, c_out: int, kernel=3, stride=1) -> None:
        kernel_t = (kernel,) * dims if isinstance(kernel, int) else tuple(kernel)
        padding = tuple(k // 2 for k in kernel_t)
        super().__init__(
            _conv(dims)(c_in, c_out, kernel_t, stride=stride, padding=padding, bias=False),
            group_norm(c_out),
            nn.SiLU(inplace=True),
        )


class ResBlock(nn.Module):
    """Two ConvNormAct with a residual connection (1x1 projection when channels change)."""

    def __init__(self, dims: int, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(dims, c_in, c_out)
        self.conv2 = nn.Sequential(
            _conv(dims)(c_out, c_out, 3, padding=1, bias=False),
            group_norm(c_out),
        )
        self.skip = nn.Identity() if c_in == c_out else _conv(dims)(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.conv2(self.conv1(x)) + self.skip(x))


class Down(nn.Module):
    """Strided conv downsampling (stride per axis, e.g. (1, 2, 2) for thick-slice grids) + ResBlock."""

    def __init__(self, dims: int, c_in: int, c_out: int, stride) -> None:
        super().__init__()
        stride_t = (stride,) * dims if isinstance(stride, int) else tuple(stride)
        kernel = tuple(3 if s > 1 else 1 for s in stride_t)
        self.down = ConvNormAct(dims, c_in, c_out, kernel=kernel, stride=stride_t)
        self.block = ResBlock(dims, c_out, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.down(x))


class Up(nn.Module):
    """Upsample (trilinear/bilinear) to the skip's size, concatenate the skip if any, ResBlock."""

    def __init__(self, dims: int, c_in: int, c_skip: int, c_out: int) -> None:
        super().__init__()
        self.mode = "trilinear" if dims == 3 else "bilinear"
        self.block = ResBlock(dims, c_in + c_skip, c_out)

    def forward(self, x: torch.Tensor, size, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, size=tuple(size), mode=self.mode, align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.block(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens ``[B, N, dim]`` -> ``[B, N, dim]``.

    Uses ``F.scaled_dot_product_attention``: ``softmax(q k^T / sqrt(d_head)) v`` (divided by the
    square root of the head width; the popular TransUNet re-implementation multiplied by it).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)  # 3x[B,h,N,d]
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=p)  # [B, h, N, d]
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # [B, N, dim]


class TransformerBlock(nn.Module):
    """Pre-norm ViT block on ``[B, N, dim]``: x + MSA(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, attn_dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

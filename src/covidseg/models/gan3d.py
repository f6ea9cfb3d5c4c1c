"""3D pseudo-healthy GAN: a generator ``Î_H = De(En(I_C) + U_N)`` and a patch discriminator.

Generator
---------
``En`` is a 3D conv encoder down to a coarse latent grid (default 32x128x128 -> 4x8x8). ``U_N``
adds noise there: fractal **Perlin** noise (default), uniform noise, or none (ablation). ``De``
upsamples back. Skip connections are a deliberate choice: the default passes encoder features only
from the coarse levels (``skip_levels``: 1/4 and 1/8 in-plane), never from full or half resolution.
Because the output is *input minus removal*, letting a lesion through means predicting no removal,
which the restoration loss on Perlin-corrupted healthy volumes penalises; the coarse skips tell
the decoder where the dense regions are. The decoder ends in a *removal map* ``R >= 0`` (softplus) and

    Î_H = clamp(I_C - gate ⊙ R, 0, 1)

where ``gate`` is the (slightly dilated) lung mask. Lesions are denser than lung, so making a scan
healthy removes density; outside the lung the input is returned unchanged. The last layer also sees
the input image at full resolution, which keeps the removal map sharp at lesion borders and lets
vessels survive, while the decision *what* to remove comes through the noisy bottleneck.

Shapes: images and masks are ``[B, 1, D, H, W]`` with values in [0, 1]; ``D, H, W`` must be
divisible by the product of the strides (default 8, 16, 16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from covidseg.method.noise import fractal_perlin_3d
from covidseg.models.blocks import ConvNormAct, Down, ResBlock, Up

LATENT_NOISE = ("perlin", "uniform", "none")


@dataclass(frozen=True)
class GeneratorConfig:
    channels: tuple[int, ...] = (16, 32, 64, 96, 128)  # feature channels at each level (0 = full res)
    strides: tuple[tuple[int, int, int], ...] = ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    skip_levels: tuple[int, ...] = (2, 3)  # levels whose encoder features reach the decoder
    latent_noise: str = "perlin"  # perlin | uniform | none
    noise_std: float = 1.0  # std of U_N (latent features are GroupNorm-ed, so ~unit scale)
    noise_frequency: tuple[float, float, float] = (1.0, 2.0, 2.0)  # Perlin lattice cells on the latent
    noise_octaves: int = 2
    gate_dilation: int = 1  # in-plane voxels the lung gate is widened by

    def __post_init__(self) -> None:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError("need one stride per level transition (len(channels) - 1)")
        if self.latent_noise not in LATENT_NOISE:
            raise ValueError(f"latent_noise must be one of {LATENT_NOISE}")
        if any(not 0 <= level < len(self.channels) for level in self.skip_levels):
            raise ValueError("skip_levels must index existing levels")

    @property
    def divisor(self) -> tuple[int, int, int]:
        """Input sizes (z, y, x) must be multiples of this."""
        return tuple(math.prod(s[i] for s in self.strides) for i in range(3))

    @classmethod
    def from_json(cls, data: dict) -> GeneratorConfig:
        """From ``asdict(config)`` as stored in generator.pt (``model.generator``) and sidecars."""
        return cls(
            **{
                **data,
                "channels": tuple(data["channels"]),
                "strides": tuple(tuple(s) for s in data["strides"]),
                "skip_levels": tuple(data["skip_levels"]),
                "noise_frequency": tuple(data["noise_frequency"]),
            }
        )


@dataclass(frozen=True)
class DiscriminatorConfig:
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[tuple[int, int, int], ...] = ((1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))


@dataclass(frozen=True)
class GanModelConfig:
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)


def latent_noise(
    shape: tuple[int, ...],
    kind: str,
    std: float,
    frequency: tuple[float, float, float],
    octaves: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """U_N for a latent tensor of `shape` ``[B, C, d, h, w]``, with standard deviation ~`std`."""
    if kind == "none" or std == 0:
        return torch.zeros(shape, device=device)
    if kind == "uniform":  # U(-a, a) has std a / sqrt(3)
        u = torch.rand(shape, generator=generator, device=generator.device if generator else device)
        return ((u * 2 - 1) * (std * math.sqrt(3.0))).to(device)
    field_ = fractal_perlin_3d(shape, frequency, octaves=octaves, generator=generator, device=device)
    return field_ * (std / field_.std().clamp_min(1e-6))


def generator_latent_shape(config: GeneratorConfig, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Latent shape ``[B, C_L, d, h, w]`` for an input ``[B, 1, D, H, W]`` (``[C_L, d, h, w]`` for
    ``[D, H, W]``): each strided conv (kernel 3, padding 1) gives ``ceil(n / stride)`` voxels."""
    spatial = [int(n) for n in image_shape[-3:]]
    for stride in config.strides:
        spatial = [(n - 1) // s + 1 for n, s in zip(spatial, stride, strict=True)]
    lead = tuple(int(b) for b in image_shape[:-4])  # the batch, if any
    return (*lead, config.channels[-1], *spatial)


def sample_latent_noise(
    config: GeneratorConfig,
    latent: tuple[int, ...],
    generator: torch.Generator | int | None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``U_N`` ``[B, C_L, d, h, w]`` (float32 on `device`) as :meth:`Generator3D.forward` draws it.

    Args:
        latent: the latent shape, see :func:`generator_latent_shape`.
        generator: the random source (advanced), or an int seed for a fresh CPU generator.

    The same generator state gives bit-identical noise on the CPU (Perlin gradients are drawn on
    the generator's device, then moved), so a seeded torch run and an ONNX run fed this noise agree.
    """
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    return latent_noise(
        tuple(latent), config.latent_noise, config.noise_std, config.noise_frequency, config.noise_octaves,
        generator, torch.device(device),
    )  # fmt: skip


def lung_gate(lung: torch.Tensor, dilation: int) -> torch.Tensor:
    """Lung mask [B, 1, D, H, W] widened in-plane by `dilation` voxels (max pooling)."""
    if dilation <= 0:
        return lung
    r = dilation
    return F.max_pool3d(lung, kernel_size=(1, 2 * r + 1, 2 * r + 1), stride=1, padding=(0, r, r))


class Generator3D(nn.Module):
    """COVID volume (+ lung mask) -> pseudo-healthy volume and the removal map."""

    def __init__(self, config: GeneratorConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or GeneratorConfig()
        ch = config.channels
        self.stem = nn.Sequential(ConvNormAct(3, 1, ch[0]), ResBlock(3, ch[0], ch[0]))
        self.downs = nn.ModuleList(Down(3, ch[i], ch[i + 1], config.strides[i]) for i in range(len(ch) - 1))
        self.bottleneck = ResBlock(3, ch[-1], ch[-1])
        self.ups = nn.ModuleList(
            Up(3, ch[i + 1], ch[i] if i in config.skip_levels else 0, ch[i]) for i in range(len(ch) - 1)
        )
        self.head = nn.Sequential(ConvNormAct(3, ch[0] + 1, ch[0]), nn.Conv3d(ch[0], 1, 3, padding=1))

    def gate(self, lung: torch.Tensor) -> torch.Tensor:
        """Lung mask widened in-plane by `gate_dilation` voxels: where removal may happen."""
        return lung_gate(lung, self.config.gate_dilation)

    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the latent ``En(I_C)`` (and of ``U_N``) for an input of `image_shape`.

        Args:
            image_shape: ``[B, 1, D, H, W]`` or ``[D, H, W]`` in voxels.

        Returns:
            ``[B, C_L, d, h, w]``, or ``[C_L, d, h, w]`` for a ``[D, H, W]`` input.
        """
        return generator_latent_shape(self.config, image_shape)

    def sample_noise(
        self,
        latent: tuple[int, ...],
        generator: torch.Generator | int | None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """``U_N`` of shape `latent` ``[B, C_L, d, h, w]`` as :meth:`forward` draws it (an int seeds a
        fresh CPU generator); see :func:`sample_latent_noise`."""
        return sample_latent_noise(self.config, latent, generator, device)

    def forward(
        self,
        image: torch.Tensor,
        lung: torch.Tensor,
        noise_generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image, lung: [B, 1, D, H, W] -> (pseudo-healthy [B, 1, D, H, W], removal [B, 1, D, H, W]).

        `noise` ``[B, C_L, d, h, w]`` (see :meth:`latent_shape`) is ``U_N`` itself; when given it is
        added instead of drawing noise from `noise_generator`. Drawing it with :meth:`sample_noise`
        and the same generator state gives the same result (the ONNX export takes it as an input).
        """
        features = [self.stem(image)]  # level 0: [B, c0, D, H, W]
        for down in self.downs:
            features.append(down(features[-1]))  # level i+1: [B, c_{i+1}, D/s, H/s, W/s]
        z = self.bottleneck(features[-1])  # latent En(I_C): [B, c_L, d, h, w]
        cfg = self.config
        if noise is None:
            noise = self.sample_noise(tuple(z.shape), noise_generator, z.device)
        elif tuple(noise.shape[1:]) != tuple(z.shape[1:]):
            raise ValueError(
                f"noise must be [B, {', '.join(map(str, z.shape[1:]))}], got {list(noise.shape)}"
            )
        z = z + noise.to(z.dtype)
        y = z
        for level in reversed(range(len(self.ups))):
            skip = features[level] if level in cfg.skip_levels else None
            y = self.ups[level](y, features[level].shape[2:], skip)  # [B, c_level, ...]
        removal = F.softplus(self.head(torch.cat([y, image], dim=1)))  # [B, 1, D, H, W], >= 0
        healthy = (image - self.gate(lung) * removal).clamp(0.0, 1.0)
        return healthy, removal


def to_device(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model` (a 3D network of this module) moved to `device`, in place; on the CPU also into the
    channels-last-3d layout, where oneDNN runs the 3D convolutions of these narrow networks faster
    (tiny generator on 2 cores: a training step 1.47x, make-masks' windowed inference 1.59x;
    ``python bench/generator.py``). Inputs may stay contiguous; results equal the default layout's up
    to float rounding. Other devices keep the default layout (not measured there)."""
    model.to(device)
    if torch.device(device).type == "cpu":
        model.to(memory_format=torch.channels_last_3d)
    return model


class GeneratorRemoval(nn.Module):
    """The generator as a backend: ``(image, lung, noise) -> removal``, noise given, no compositing.

    This is what is exported to ONNX (inputs ``image``, ``lung`` ``[B, 1, D, H, W]`` and ``noise``
    ``[B, C_L, d, h, w]``, output ``removal`` ``[B, 1, D, H, W]``) and what
    :func:`covidseg.inference.sliding_window.run_generator` calls for a torch model, so both
    backends share the host-side noise, windows and blending.
    """

    def __init__(self, model: Generator3D) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, image: torch.Tensor, lung: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.model(image, lung, noise=noise)[1]


class Discriminator3D(nn.Module):
    """Patch discriminator: (image, lung mask) [B, 2, D, H, W] -> logits [B, 1, d, h, w]."""

    def __init__(self, config: DiscriminatorConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DiscriminatorConfig()
        ch = config.channels
        layers: list[nn.Module] = [nn.Conv3d(2, ch[0], 3, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        for i, stride in enumerate(config.strides):
            c_out = ch[min(i + 1, len(ch) - 1)]
            layers += [ConvNormAct(3, ch[min(i, len(ch) - 1)], c_out, stride=stride)]
        layers.append(nn.Conv3d(ch[-1], 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, lung: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([image, lung], dim=1))


#: Training crop (z, y, x) each preset uses unless told otherwise (None = whole 32x128x128 grids).
PRESET_CROPS: dict[str, tuple[int, int, int] | None] = {"tiny": (16, 64, 64), "small": None, "base": None}

GAN_PRESETS: dict[str, GanModelConfig] = {
    # trains meaningfully on 2 CPU cores in minutes (with training crops)
    "tiny": GanModelConfig(
        GeneratorConfig(channels=(8, 16, 32, 48, 64)),
        DiscriminatorConfig(channels=(8, 16, 32, 64)),
    ),
    "small": GanModelConfig(),
    # for a GPU
    "base": GanModelConfig(
        GeneratorConfig(channels=(32, 64, 128, 192, 256)),
        DiscriminatorConfig(channels=(32, 64, 128, 256)),
    ),
}

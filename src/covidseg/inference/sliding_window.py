"""Sliding-window generator inference: one pseudo-healthy volume from a grid volume.

The generator runs on overlapping windows of its training crop (~50 % overlap), blended with tent
weights, so it sees what it saw in training (GroupNorm statistics and context size). The latent
noise ``U_N`` is drawn here, on the host, one per window in window order, and handed to the backend
(a torch :class:`~covidseg.models.gan3d.Generator3D` or an exported one on ONNX Runtime, see
:class:`~covidseg.inference.generator_files.OnnxGenerator`), so both give the same result for a seed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from covidseg.models.gan3d import (
    Generator3D,
    GeneratorConfig,
    GeneratorRemoval,
    generator_latent_shape,
    lung_gate,
    sample_latent_noise,
)

#: Windows per generator call. A batch of one runs CPU conv3d on a slow path (0.27-0.37 s per
#: 16x64x64 window for the tiny preset, vs 0.05 s per window in batches of 2-6; measured with
#: torch 2.13 on 2 cores), so windows go through in small batches; the result is the same.
WINDOW_BATCH = 4

#: ``(image [B, 1, D, H, W], lung [B, 1, D, H, W], noise [B, C_L, d, h, w]) -> removal [B, 1, D, H, W]``:
#: float32 torch tensors in (on the device given to :func:`run_generator`), a float tensor out (any
#: device). :class:`~covidseg.models.gan3d.GeneratorRemoval` is the torch backend,
#: :class:`~covidseg.inference.generator_files.OnnxGenerator` the ONNX Runtime one.
GeneratorBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: An index into a [1, 1, z, y, x] tensor: ``(..., z slice, y slice, x slice)``.
Window = tuple


def _window_starts(size: int, window: int) -> list[int]:
    """Start indices of windows of `window` covering `size` with ~50 % overlap."""
    if window >= size:
        return [0]
    step = max(1, window // 2)
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def _blend_weight(window: tuple[int, int, int]) -> torch.Tensor:
    """Separable tent weights [1, 1, d, h, w], highest in the window centre, never zero."""
    axes = [torch.hann_window(n + 2, periodic=False)[1:-1] for n in window]
    return (axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :])[None, None] + 1e-3


def _windows(shape: tuple[int, int, int], window: tuple[int, int, int]) -> list[Window]:
    """Overlapping windows covering a volume of `shape` (z, y, x voxels), in z, y, x order."""
    return [
        (..., slice(z0, z0 + window[0]), slice(y0, y0 + window[1]), slice(x0, x0 + window[2]))
        for z0 in _window_starts(shape[0], window[0])
        for y0 in _window_starts(shape[1], window[1])
        for x0 in _window_starts(shape[2], window[2])
    ]


def _backend_and_config(
    model: Generator3D | GeneratorBackend, config: GeneratorConfig | None
) -> tuple[GeneratorBackend, GeneratorConfig]:
    """The removal backend of `model` and the generator config that goes with it."""
    if isinstance(model, Generator3D):
        model.eval()
        return GeneratorRemoval(model), model.config
    if config is None:
        raise ValueError("a backend callable needs the generator's config")
    return model, config


def _blended_removal(
    removal_of: Callable[[list[Window]], torch.Tensor], x: torch.Tensor, window: tuple[int, int, int]
) -> torch.Tensor:
    """Removal map [1, 1, z, y, x] of `x` from windows of `window`, WINDOW_BATCH per call, blended."""
    weight = _blend_weight(window).to(x.device)
    removal = torch.zeros_like(x)
    total = torch.zeros_like(x)
    windows = _windows(tuple(x.shape[2:]), window)
    for first in range(0, len(windows), WINDOW_BATCH):
        chunk = windows[first : first + WINDOW_BATCH]
        for sl, part in zip(chunk, removal_of(chunk), strict=True):
            removal[sl] += part[None] * weight
            total[sl] += weight
    return removal / total


@torch.no_grad()
def run_generator(
    model: Generator3D | GeneratorBackend,
    image: np.ndarray,
    lung: np.ndarray,
    device: torch.device | str = "cpu",
    seed: int = 0,
    window: tuple[int, int, int] | None = None,
    config: GeneratorConfig | None = None,
) -> np.ndarray:
    """Pseudo-healthy volume for one grid volume.

    Args:
        model: a :class:`Generator3D`, or a :data:`GeneratorBackend` callable (then `config`, the
            generator's config, gives the latent shape, the noise and the lung gate).
        image: [z, y, x] float32, preprocess scale [0, 1].
        lung: [z, y, x] lung mask (nonzero = lung).
        device: where inputs and noise are made (the CPU for an ONNX Runtime backend).
        seed: seed of the latent noise, so the result is reproducible.
        window: if given (the training crop), the removal map is computed on overlapping windows
            of this size and blended; None runs the whole grid at once.

    Returns:
        [z, y, x] float32 pseudo-healthy volume on the same scale.
    """
    backend, config = _backend_and_config(model, config)
    device = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    m = torch.from_numpy(np.ascontiguousarray(lung > 0, dtype=np.float32))[None, None].to(device)
    noise = torch.Generator().manual_seed(int(seed))

    def removal_of(windows: list[Window]) -> torch.Tensor:  # [n, 1, d, h, w] float32 on `device`
        image = torch.cat([x[sl] for sl in windows])
        lung = torch.cat([m[sl] for sl in windows])
        shapes = [generator_latent_shape(config, x[sl].shape) for sl in windows]
        u_n = torch.cat([sample_latent_noise(config, s, noise, device) for s in shapes])  # in window order
        return backend(image, lung, u_n).float().to(device)

    shape = tuple(x.shape[2:])
    if window is None or all(w >= s for w, s in zip(window, shape, strict=True)):
        removal = removal_of([(..., slice(None), slice(None), slice(None))])
    else:
        removal = _blended_removal(
            removal_of, x, tuple(min(w, s) for w, s in zip(window, shape, strict=True))
        )
    healthy = (x - lung_gate(m, config.gate_dilation) * removal).clamp(0.0, 1.0)
    return healthy[0, 0].cpu().numpy()

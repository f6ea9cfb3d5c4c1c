"""Vectorised, seeded 2D and 3D (fractal) Perlin gradient noise in torch, on CPU or GPU.

Units and conventions
---------------------
* ``shape`` is in **voxels**. Its last 2 (``*_2d``) or 3 (``*_3d``) entries are the spatial axes,
  e.g. ``(H, W)`` or ``(D, H, W)`` = ``(z, y, x)``. Any entries before them are *leading* dimensions:
  each leading index gets an independent field, so ``fractal_perlin_3d((B, C, D, H, W), ...)``
  gives one field per batch element and channel (latent noise for the GAN), in one call.
* ``frequency`` is the number of **lattice cells** across the whole field along each axis: a float
  for all axes or one per spatial axis. Anisotropic CT grids take per-axis values, e.g. a
  32x128x128 volume with ``frequency=(2, 8, 8)`` has cells of 16x16x16 voxels.
  Voxel ``i`` of an axis with ``n`` voxels sits at lattice coordinate ``i * f / n`` (lattice cells),
  so the voxels with integer ``i * f / n`` lie on lattice points, where single-octave noise is 0.
  Non-integer frequencies are fine: an axis uses ``ceil(f) + 1`` lattice corners. The noise is
  not periodic (no tiling).
* Every lattice corner gets a random **unit** gradient from ``generator``: 2D a uniform random
  angle, 3D a normalised Gaussian vector (uniform on the sphere). The corner contributions
  ``g . (x - corner)`` are blended with the quintic fade ``6t^5 - 15t^4 + 10t^3`` (Perlin 2002).
* Range: with unit gradients ``|noise| <= sqrt(N) / 2`` for N spatial dims (0.707 in 2D, 0.866 in
  3D). The bound is the value at a cell centre when all corner gradients point at it: each corner
  contributes at most its distance, and the fade-weighted mean distance is largest at the centre.
  ``normalise=True`` divides by it so the output lies in [-1, 1]. Typical std is ~0.2 in 2D and ~0.17
  in 3D (unnormalised); it falls by a few percent per octave in fractal noise.
* Determinism: gradients are drawn in float32 on ``generator.device`` (CPU for ``generator=None``,
  which uses torch's global CPU generator) and only then moved to ``device``. The same generator
  state therefore gives bit-identical output on CPU, and the same field (to float rounding) on any
  device and in any floating dtype. Each call advances the generator.

Implementation: Perlin noise is separable per gradient component. Component ``a`` contributes
``sum_corners w(x) g_a(corner) (x_a - corner_a)``, which is the lattice array ``g_a`` contracted along
every axis with a sparse ``(voxels, corners)`` matrix: the fade weights ``w`` along the other axes,
weight x displacement along axis ``a``. The contractions are small matrix products instead of
gathering 2^N corners per voxel, and all octaves share the last, full-size one. Voxels on lattice
points still get exactly 0.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import torch

__all__ = [
    "fractal_perlin_2d",
    "fractal_perlin_3d",
    "perlin_2d",
    "perlin_3d",
    "perlin_bound",
]

Frequency = float | Sequence[float]


def perlin_bound(ndim: int) -> float:
    """Largest possible |value| of ``ndim``-dimensional Perlin noise with unit gradients: sqrt(ndim) / 2."""
    return math.sqrt(ndim) / 2.0


def perlin_2d(
    shape: Sequence[int],
    frequency: Frequency,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    normalise: bool = False,
) -> torch.Tensor:
    """Single-octave 2D Perlin noise.

    Args:
        shape: ``(*lead, H, W)`` in voxels; each leading index is an independent field.
        frequency: lattice cells across the field, one float or ``(f_y, f_x)``; > 0.
        generator: source of the random gradients (``None``: torch's global CPU generator).
        device: where the output lives (``None``: torch's default device).
        dtype: floating output dtype.
        normalise: divide by :func:`perlin_bound` (``sqrt(2)/2``) so values lie in [-1, 1].

    Returns:
        ``(*lead, H, W)`` tensor; exactly 0 on voxels that lie on lattice points.
    """
    return fractal_perlin_2d(shape, frequency, 1, 0.5, 2.0, generator, device, dtype, normalise)


def perlin_3d(
    shape: Sequence[int],
    frequency: Frequency,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    normalise: bool = False,
) -> torch.Tensor:
    """Single-octave 3D Perlin noise.

    Args:
        shape: ``(*lead, D, H, W)`` in voxels; each leading index is an independent field.
        frequency: lattice cells across the field, one float or ``(f_z, f_y, f_x)``; > 0.
        generator: source of the random gradients (``None``: torch's global CPU generator).
        device: where the output lives (``None``: torch's default device).
        dtype: floating output dtype.
        normalise: divide by :func:`perlin_bound` (``sqrt(3)/2``) so values lie in [-1, 1].

    Returns:
        ``(*lead, D, H, W)`` tensor; exactly 0 on voxels that lie on lattice points.
    """
    return fractal_perlin_3d(shape, frequency, 1, 0.5, 2.0, generator, device, dtype, normalise)


def fractal_perlin_2d(
    shape: Sequence[int],
    frequency: Frequency,
    octaves: int = 4,
    persistence: float = 0.5,
    lacunarity: float = 2.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    normalise: bool = False,
) -> torch.Tensor:
    """Fractal (fBm) 2D Perlin noise: ``sum_k p^k perlin(f * l^k) / sum_k p^k``.

    Octave ``k`` (0-based) has amplitude ``persistence**k`` and ``frequency * lacunarity**k``
    lattice cells; the sum is divided by the sum of amplitudes (as ``noise.pnoise2`` does), so the
    bound of :func:`perlin_bound` still holds. See :func:`perlin_2d` for ``shape``, ``frequency``,
    ``generator``, ``device``, ``dtype`` and ``normalise``.

    Returns:
        ``(*lead, H, W)`` tensor.
    """
    return _fractal(
        shape, 2, frequency, octaves, persistence, lacunarity, generator, device, dtype, normalise
    )


def fractal_perlin_3d(
    shape: Sequence[int],
    frequency: Frequency,
    octaves: int = 4,
    persistence: float = 0.5,
    lacunarity: float = 2.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    normalise: bool = False,
) -> torch.Tensor:
    """Fractal (fBm) 3D Perlin noise: ``sum_k p^k perlin(f * l^k) / sum_k p^k``.

    Octave ``k`` (0-based) has amplitude ``persistence**k`` and ``frequency * lacunarity**k``
    lattice cells; the sum is divided by the sum of amplitudes (as ``noise.pnoise3`` does). See
    :func:`perlin_3d` for the other arguments. Latent noise for a batch:
    ``fractal_perlin_3d((B, C, D, H, W), (1, 2, 2), generator=g, device=z.device)``.

    Returns:
        ``(*lead, D, H, W)`` tensor.
    """
    return _fractal(
        shape, 3, frequency, octaves, persistence, lacunarity, generator, device, dtype, normalise
    )


# --------------------------------------------------------------------------------------------------
# internals


def _fractal(
    shape: Sequence[int],
    ndim: int,
    frequency: Frequency,
    octaves: int,
    persistence: float,
    lacunarity: float,
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
    normalise: bool,
) -> torch.Tensor:
    lead, spatial = _split_shape(shape, ndim)
    freqs = _frequencies(frequency, ndim)
    if isinstance(octaves, bool) or not isinstance(octaves, int) or octaves < 1:
        raise ValueError(f"octaves must be an integer >= 1, got {octaves!r}")
    if not (math.isfinite(persistence) and persistence > 0):
        raise ValueError(f"persistence must be a finite number > 0, got {persistence!r}")
    if not (math.isfinite(lacunarity) and lacunarity > 0):
        raise ValueError(f"lacunarity must be a finite number > 0, got {lacunarity!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    device = torch.device(device) if device is not None else torch.get_default_device()
    # half types: compute in float32, cast once at the end
    work_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32

    # Each octave is `term @ kernel` (see _perlin_factors); concatenating the octaves along the
    # contracted axis, with the amplitudes folded into the kernels, makes the whole fractal sum one
    # matrix product that writes the full-size output once.
    terms, kernels = [], []
    amplitude, amplitude_sum = 1.0, 0.0
    for k in range(octaves):
        octave_freqs = tuple(f * lacunarity**k for f in freqs)
        corners = tuple(math.ceil(f) + 1 for f in octave_freqs)
        gradients = _random_gradients(lead, corners, generator)  # (*lead, *corners, ndim), float32
        term, kernel = _perlin_factors(gradients.to(device, work_dtype), spatial, octave_freqs)
        terms.append(term)  # (*lead, n_0, ..., n_{N-2}, 2 L_k)
        kernels.append(kernel * amplitude)  # (2 L_k, n_{N-1})
        amplitude_sum += amplitude
        amplitude *= persistence
    scale = amplitude_sum * (perlin_bound(ndim) if normalise else 1.0)
    kernel = torch.cat(kernels, dim=0) / scale  # (sum_k 2 L_k, n_{N-1})
    term = terms[0] if octaves == 1 else torch.cat(terms, dim=-1)  # (*lead, n_0, ..., n_{N-2}, sum_k 2 L_k)
    return (term @ kernel).to(dtype)  # (*lead, n_0, ..., n_{N-1})


def _split_shape(shape: Sequence[int], ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(*lead, *spatial)`` -> ``(lead, spatial)`` with ``len(spatial) == ndim``; validates sizes."""
    shape = tuple(shape)
    if len(shape) < ndim:
        raise ValueError(f"shape {shape} needs at least {ndim} entries (the spatial axes)")
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"shape {shape}: every entry must be a positive integer")
    return shape[:-ndim], shape[-ndim:]


def _frequencies(frequency: Frequency, ndim: int) -> tuple[float, ...]:
    """One float or one per spatial axis -> ``ndim`` floats > 0 (lattice cells across the field)."""
    if isinstance(frequency, numbers.Real):
        freqs = (float(frequency),) * ndim
    else:
        freqs = tuple(float(f) for f in frequency)
        if len(freqs) != ndim:
            raise ValueError(f"frequency {tuple(frequency)} needs 1 or {ndim} values")
    for f in freqs:
        if not (math.isfinite(f) and f > 0):
            raise ValueError(f"frequency must be finite and > 0 (lattice cells), got {frequency!r}")
    return freqs


def _random_gradients(
    lead: tuple[int, ...], corners: tuple[int, ...], generator: torch.Generator | None
) -> torch.Tensor:
    """Random unit gradients, float32 on the generator's device: ``(*lead, *corners, ndim)``."""
    ndim = len(corners)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    kw = {"generator": generator, "device": gen_device, "dtype": torch.float32}
    if ndim == 2:
        angle = torch.rand(*lead, *corners, **kw) * (2 * math.pi)  # (*lead, *corners)
        return torch.stack((torch.cos(angle), torch.sin(angle)), dim=-1)
    g = torch.randn(*lead, *corners, ndim, **kw)  # isotropic, so g/|g| is uniform on the sphere
    return g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _fade(t: torch.Tensor) -> torch.Tensor:
    """Quintic fade 6t^5 - 15t^4 + 10t^3: 0 and 1 at t = 0, 1 with zero 1st and 2nd derivatives."""
    return t * t * t * (t * (t * 6 - 15) + 10)


@functools.lru_cache(maxsize=256)
def _axis_matrices(n: int, f: float, corners: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Interpolation matrices of one axis (float64, CPU), each ``(n voxels, corners)``.

    Voxel ``i`` sits at ``x = i * f / n`` lattice cells, between corners ``c = floor(x)`` and
    ``c + 1`` at fraction ``t = x - c``. ``weight`` holds the fade weights ``1 - u(t)`` and
    ``u(t)`` of those two corners; ``displacement`` holds ``weight * (x - corner)``, i.e.
    ``(1 - u) t`` and ``u (t - 1)``. All other entries are 0.
    """
    x = torch.arange(n, dtype=torch.float64) * f / n  # (n,) lattice coordinate; exact when integer
    c = x.floor()
    t = x - c
    u = _fade(t)
    rows = torch.arange(n)
    lo, hi = c.long(), c.long() + 1  # hi <= ceil(f) = corners - 1
    weight = torch.zeros(n, corners, dtype=torch.float64)
    displacement = torch.zeros(n, corners, dtype=torch.float64)
    weight[rows, lo] = 1 - u
    weight[rows, hi] = u
    displacement[rows, lo] = (1 - u) * t
    displacement[rows, hi] = u * (t - 1)
    return weight, displacement


def _perlin_factors(
    gradients: torch.Tensor, spatial: tuple[int, ...], frequency: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Perlin noise for given lattice gradients, as ``noise = term @ kernel``.

    Component ``a`` of the gradients contributes ``g_a`` contracted along axis ``a`` with the
    ``displacement`` matrix and along every other axis with the ``weight`` matrix (see
    :func:`_axis_matrices`). All axes but the last are contracted here, for all components at once;
    the last is left to the caller's matrix product, so that octaves can share it.

    Args:
        gradients: ``(*lead, L_0, ..., L_{N-1}, N)``, with ``L_a >= ceil(frequency[a]) + 1``.
        spatial: ``(n_0, ..., n_{N-1})`` voxels.
        frequency: lattice cells across each axis.

    Returns:
        ``term`` ``(*lead, n_0, ..., n_{N-2}, 2 L_{N-1})`` and ``kernel`` ``(2 L_{N-1}, n_{N-1})``,
        in the dtype and on the device of ``gradients``.
    """
    ndim = len(spatial)
    n_lead = gradients.ndim - ndim - 1
    corners = tuple(gradients.shape[n_lead:-1])
    component = torch.arange(ndim, device=gradients.device)
    t = gradients
    for b in range(ndim - 1):
        weight, displacement = (m.to(gradients) for m in _axis_matrices(spatial[b], frequency[b], corners[b]))
        batch = t.shape[: n_lead + b]  # (*lead, n_0, ..., n_{b-1})
        rest = t.shape[n_lead + b + 1 :]  # (L_{b+1}, ..., L_{N-1}, N)
        flat = t.reshape(*batch, corners[b], -1)  # (*batch, L_b, R)
        both = torch.cat((weight, displacement)) @ flat  # (*batch, 2 n_b, R)
        both = both.reshape(*batch, 2, spatial[b], *rest)  # (*batch, 2, n_b, L_{b+1}, ..., N)
        # component b takes the displacement along axis b, the others the weight
        t = torch.where(component == b, both.select(n_lead + b, 1), both.select(n_lead + b, 0))
    # t: (*lead, n_0, ..., n_{N-2}, L_{N-1}, N)
    term = torch.stack((t[..., :-1].sum(-1), t[..., -1]), dim=-1)  # (..., L_{N-1}, 2): weight, displacement
    term = term.flatten(-2)  # (*lead, n_0, ..., n_{N-2}, 2 L_{N-1})
    weight, displacement = (m.to(gradients) for m in _axis_matrices(spatial[-1], frequency[-1], corners[-1]))
    kernel = torch.stack((weight.mT, displacement.mT), dim=1).flatten(0, 1)  # (2 L_{N-1}, n_{N-1})
    return term, kernel

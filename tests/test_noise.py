"""Tests for covidseg.method.noise: closed-form values, and the qualitative properties of Perlin noise checked
side by side with the C reference ``noise.pnoise2/pnoise3`` sampled on the same grid.

Our voxel ``i`` of an axis with ``n`` voxels and ``f`` cells sits at lattice coordinate ``i * f / n``;
the reference is sampled at the same coordinates, so both have the same lattice.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from covidseg.method.noise import (
    _random_gradients,
    fractal_perlin_2d,
    fractal_perlin_3d,
    perlin_2d,
    perlin_3d,
    perlin_bound,
)


@pytest.fixture(scope="module")
def ref():
    """The C reference implementation (dev extra ``noise``)."""
    return pytest.importorskip("noise")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coords(n: int, f: float) -> list[float]:
    """Lattice coordinate of each voxel of an axis: i * f / n (lattice cells)."""
    return [i * f / n for i in range(n)]


def ref_2d(ref, shape, freq, base=0, octaves=1) -> np.ndarray:
    """noise.pnoise2 on our grid: (H, W) array."""
    ys, xs = coords(shape[0], freq[0]), coords(shape[1], freq[1])
    return np.array([[ref.pnoise2(x, y, octaves, 0.5, 2.0, 1024, 1024, base) for x in xs] for y in ys])


def ref_3d(ref, shape, freq, base=0, octaves=1) -> np.ndarray:
    """noise.pnoise3 on our grid: (D, H, W) array."""
    zs, ys, xs = (coords(n, f) for n, f in zip(shape, freq, strict=True))
    p = ref.pnoise3
    return np.array(
        [[[p(x, y, z, octaves, 0.5, 2.0, 1024, 1024, 1024, base) for x in xs] for y in ys] for z in zs]
    )


def autocorrelation(v: np.ndarray, lag: int, axis: int) -> float:
    """Normalised autocorrelation of the field(s) ``v`` at ``lag`` voxels along ``axis``."""
    v = v - v.mean()
    n = v.shape[axis]
    a = np.take(v, range(n - lag), axis=axis)
    b = np.take(v, range(lag, n), axis=axis)
    return float((a * b).mean() / (v * v).mean())


def half_lag(v: np.ndarray, axis: int) -> float:
    """Lag (voxels, interpolated linearly) at which the autocorrelation along ``axis`` falls to 0.5."""
    previous = 1.0
    for lag in range(1, v.shape[axis]):
        current = autocorrelation(v, lag, axis)
        if current < 0.5:
            return lag - 1 + (previous - 0.5) / (previous - current)
        previous = current
    raise AssertionError("autocorrelation never falls below 0.5")


def naive_perlin(gradients: np.ndarray, position: tuple[float, ...]) -> float:
    """Textbook Perlin noise at one point: quintic-fade blend of g(corner) . (x - corner) over 2^N corners.

    ``gradients``: (N, L_0, ..., L_{N-1}); ``position`` in lattice cells.
    """
    cell = [math.floor(p) for p in position]
    frac = [p - c for p, c in zip(position, cell, strict=True)]
    fade = [t**3 * (t * (t * 6 - 15) + 10) for t in frac]
    total = 0.0
    for offset in itertools.product((0, 1), repeat=len(position)):
        weight = math.prod(u if o else 1 - u for u, o in zip(fade, offset, strict=True))
        g = gradients[(slice(None), *(c + o for c, o in zip(cell, offset, strict=True)))]
        total += weight * sum(g[a] * (frac[a] - offset[a]) for a in range(len(position)))
    return total


# ------------------------------------------------------------------------------------------------
# exact values


@pytest.mark.parametrize(
    ("shape", "freq"),
    [((12, 10), (3.0, 2.5)), ((6, 8, 5), (2.0, 3.0, 1.7))],
)
def test_matches_textbook_formula_voxel_by_voxel(shape, freq):
    ndim = len(shape)
    corners = tuple(math.ceil(f) + 1 for f in freq)
    gradients = _random_gradients((), corners, gen(3)).double().numpy()  # the draw perlin_*d makes
    norms = np.sqrt((gradients**2).sum(0))
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)  # unit gradients

    ours = (perlin_2d if ndim == 2 else perlin_3d)(shape, freq, gen(3), dtype=torch.float64).numpy()
    expected = np.zeros(shape)
    for idx in itertools.product(*(range(n) for n in shape)):
        expected[idx] = naive_perlin(
            gradients, tuple(i * f / n for i, f, n in zip(idx, freq, shape, strict=True))
        )
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_zero_at_lattice_points_like_the_reference(ref):
    # 3D: 16x32x32 voxels, (2, 4, 4) cells -> a lattice point every 8 voxels on every axis
    v = perlin_3d((16, 32, 32), (2, 4, 4), gen(0))
    on_lattice = v[::8, ::8, ::8]
    assert on_lattice.shape == (2, 4, 4)
    assert torch.all(on_lattice == 0)
    assert v.abs().max() > 0.1  # and not zero elsewhere
    # 2D, non-integer frequency: i * 2.5 / 50 is an integer at i = 0, 20, 40
    v2 = perlin_2d((50, 50), 2.5, gen(0))
    assert torch.all(v2[::20, ::20] == 0)
    # the reference shares the property: pnoise at integer lattice coordinates is 0
    for x, y, z in itertools.product(range(0, 7, 3), range(1, 9, 4), range(2, 5)):
        assert ref.pnoise3(float(x), float(y), float(z)) == 0.0
        assert ref.pnoise2(float(x), float(y)) == 0.0


# ------------------------------------------------------------------------------------------------
# qualitative properties, side by side with the reference


def test_continuity_improves_with_resolution_like_the_reference(ref):
    ours_steps, ref_steps = [], []
    for n in (64, 128, 256):
        ours = perlin_2d((4, n, n), 4, gen(n)).numpy()
        reference = ref_2d(ref, (n, n), (4, 4))
        ours_steps.append(max(np.abs(np.diff(ours, axis=a)).max() for a in (-1, -2)))
        ref_steps.append(max(np.abs(np.diff(reference, axis=a)).max() for a in (-1, -2)))
    # small, and halving with each doubling of resolution (a C1 field has bounded slope)
    assert ours_steps[0] < 0.15  # 16 voxels per cell: a step of 1/16 cell
    for coarse, fine in itertools.pairwise(ours_steps):
        assert 1.6 < coarse / fine < 2.5
    for o, r in zip(ours_steps, ref_steps, strict=True):
        assert 0.5 < o / r < 2.0
    # 3D: same order as pnoise3 on the same grid
    ours3 = perlin_3d((2, 16, 32, 32), (2, 4, 4), gen(1)).numpy()
    ref3 = ref_3d(ref, (16, 32, 32), (2, 4, 4))
    o3 = max(np.abs(np.diff(ours3, axis=a)).max() for a in (-1, -2, -3))
    r3 = max(np.abs(np.diff(ref3, axis=a)).max() for a in (-1, -2, -3))
    assert 0.5 < o3 / r3 < 2.0


def test_value_range_and_spread_like_the_reference(ref):
    v2 = perlin_2d((16, 64, 64), 8, gen(5))
    v3 = perlin_3d((16, 16, 32, 32), (4, 8, 8), gen(5))
    assert v2.abs().max() <= perlin_bound(2) == pytest.approx(math.sqrt(2) / 2)
    assert v3.abs().max() <= perlin_bound(3) == pytest.approx(math.sqrt(3) / 2)
    assert v2.abs().max() > 0.5 and v3.abs().max() > 0.5  # the bound is not loose by much
    # normalise=True divides by the bound -> [-1, 1]
    n3 = perlin_3d((16, 16, 32, 32), (4, 8, 8), gen(5), normalise=True)
    torch.testing.assert_close(n3, v3 / perlin_bound(3))
    assert n3.abs().max() <= 1.0
    # fractal sums are normalised by the sum of amplitudes, so the bound still holds
    f3 = fractal_perlin_3d((16, 16, 32, 32), 4, octaves=5, persistence=0.9, generator=gen(5))
    assert f3.abs().max() <= perlin_bound(3)
    # spread: std within a factor 2 of the reference's on the same grid
    r2 = ref_2d(ref, (128, 128), (16, 16))
    r3 = ref_3d(ref, (16, 32, 32), (4, 8, 8))
    assert 0.5 < float(v2.std()) / r2.std() < 2.0
    assert 0.5 < float(v3.std()) / r3.std() < 2.0
    assert abs(float(v2.mean())) < 0.02 and abs(float(v3.mean())) < 0.02


def test_correlation_length_scales_as_one_over_frequency_like_the_reference(ref):
    n = 256
    lags, ac8 = {}, {}
    for f in (4, 8, 16):
        ours = perlin_2d((4, n, n), f, gen(f)).numpy()
        reference = ref_2d(ref, (n, n), (f, f))
        lags[f] = np.mean([half_lag(ours, axis) for axis in (-1, -2)])
        ref_lag = np.mean([half_lag(reference, axis) for axis in (-1, -2)])
        assert 1 / 1.3 < lags[f] / ref_lag < 1.3, (f, lags[f], ref_lag)
        ac8[f] = autocorrelation(ours, 8, -1)
    # in lattice cells the half-correlation length is the same at every frequency (~0.39 cells)
    for f, lag in lags.items():
        assert 0.33 < lag * f / n < 0.45
    for f_lo, f_hi in ((4, 8), (8, 16)):
        assert 1.7 < lags[f_lo] / lags[f_hi] < 2.3
        assert ac8[f_lo] > ac8[f_hi]  # correlation at a fixed lag drops as frequency rises


def test_anisotropic_frequency_gives_anisotropic_correlation():
    # CT-like grid: 32x64x64 voxels with (2, 8, 8) cells -> 16 voxels per cell in z, 8 in y and x
    v = perlin_3d((4, 32, 64, 64), (2, 8, 8), gen(0)).numpy()
    lag_z, lag_y, lag_x = (half_lag(v, axis) for axis in (-3, -2, -1))
    assert 1.7 < lag_z / lag_y < 2.4
    assert 0.85 < lag_y / lag_x < 1.15
    # 2D: (64, 256) with 4 cells each -> cells of 16 x 64 voxels
    w = perlin_2d((8, 64, 256), (4, 4), gen(0)).numpy()
    assert 2.8 < half_lag(w, -1) / half_lag(w, -2) < 5.5


def test_fractal_octaves_add_high_frequency_energy_like_the_reference(ref):
    def high_frequency_fraction(v: np.ndarray, cutoff: float) -> float:
        """Share of spectral power above ``cutoff`` cycles per field (radial) in the last two axes."""
        power = np.abs(np.fft.fft2(v - v.mean(axis=(-2, -1), keepdims=True))) ** 2
        ky = np.fft.fftfreq(v.shape[-2]) * v.shape[-2]
        kx = np.fft.fftfreq(v.shape[-1]) * v.shape[-1]
        radius = np.hypot(*np.meshgrid(ky, kx, indexing="ij"))
        return float(power[..., radius > cutoff].sum() / power.sum())

    shape, f = (128, 128), 4
    fractions = {}
    for octaves in (1, 2, 4):
        v = fractal_perlin_2d((4, *shape), f, octaves=octaves, generator=gen(octaves)).numpy()
        fractions[octaves] = high_frequency_fraction(v, 2 * f)
    assert fractions[1] < fractions[2] < fractions[4]
    assert fractions[4] > 2 * fractions[1]
    reference = ref_2d(ref, shape, (f, f), octaves=4)
    assert 0.5 < fractions[4] / high_frequency_fraction(reference, 2 * f) < 2.0
    # one octave is plain Perlin noise
    torch.testing.assert_close(
        fractal_perlin_3d((8, 16, 16), 2, octaves=1, generator=gen(7)), perlin_3d((8, 16, 16), 2, gen(7))
    )


def test_non_integer_frequency_and_lacunarity():
    v = fractal_perlin_3d((2, 20, 30, 40), (1.3, 2.7, 3.1), octaves=3, lacunarity=1.7, generator=gen(0))
    assert v.shape == (2, 20, 30, 40)
    assert torch.isfinite(v).all() and 0.05 < float(v.std()) < 0.3
    w = perlin_2d((37, 23), 0.6, gen(0))  # less than one cell: 2 corners per axis
    assert torch.isfinite(w).all() and w[0, 0] == 0 and w.abs().max() > 0


# ------------------------------------------------------------------------------------------------
# determinism, shapes, dtypes, devices, errors


def test_deterministic_given_the_generator_state_and_seed_dependent():
    a = fractal_perlin_3d((2, 8, 16, 16), (1, 2, 2), generator=gen(42))
    b = fractal_perlin_3d((2, 8, 16, 16), (1, 2, 2), generator=gen(42))
    assert torch.equal(a, b)
    assert not torch.allclose(a, fractal_perlin_3d((2, 8, 16, 16), (1, 2, 2), generator=gen(43)))
    g = gen(42)
    first, second = perlin_2d((32, 32), 4, g), perlin_2d((32, 32), 4, g)
    assert not torch.allclose(first, second)  # the generator advances
    torch.manual_seed(9)
    c = perlin_2d((32, 32), 4)
    torch.manual_seed(9)
    assert torch.equal(c, perlin_2d((32, 32), 4))  # generator=None uses the global CPU generator


def test_leading_dimensions_are_independent_fields():
    # GAN latent: [B, C, D, H, W]
    v = fractal_perlin_3d((3, 4, 2, 8, 8), (1, 2, 2), generator=gen(0))
    assert v.shape == (3, 4, 2, 8, 8)
    fields = v.reshape(12, -1).numpy()
    corr = np.corrcoef(fields)
    off_diagonal = corr[~np.eye(12, dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.99
    assert len({f.tobytes() for f in fields}) == 12
    # shapes may come as torch.Size or numpy integers
    assert perlin_2d(torch.Size((2, 8, 8)), 2).shape == (2, 8, 8)
    assert perlin_2d(tuple(np.array([8, 8])), 2).shape == (8, 8)


def test_dtypes():
    v32 = fractal_perlin_3d((8, 16, 16), 2, generator=gen(1))
    v64 = fractal_perlin_3d((8, 16, 16), 2, generator=gen(1), dtype=torch.float64)
    vbf = fractal_perlin_3d((8, 16, 16), 2, generator=gen(1), dtype=torch.bfloat16, device="cpu")
    assert (v32.dtype, v64.dtype, vbf.dtype) == (torch.float32, torch.float64, torch.bfloat16)
    torch.testing.assert_close(v64.float(), v32, atol=1e-6, rtol=0)  # same field, float rounding
    torch.testing.assert_close(vbf.float(), v32, atol=1e-2, rtol=0)
    assert v32.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_field():
    cpu = fractal_perlin_3d((2, 32, 128, 128), (2, 8, 8), generator=gen(5))
    cuda = fractal_perlin_3d((2, 32, 128, 128), (2, 8, 8), generator=gen(5), device="cuda")
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-5, rtol=0)
    # a CUDA generator draws on the GPU; still deterministic
    g1 = torch.Generator(device="cuda").manual_seed(1)
    g2 = torch.Generator(device="cuda").manual_seed(1)
    a = perlin_2d((64, 64), 4, g1, device="cuda")
    assert torch.equal(a, perlin_2d((64, 64), 4, g2, device="cuda"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": (8,), "frequency": 2}, "at least 3"),
        ({"shape": (0, 8, 8), "frequency": 2}, "positive integer"),
        ({"shape": (8, 8, 8), "frequency": 0}, "frequency"),
        ({"shape": (8, 8, 8), "frequency": (1, 2)}, "1 or 3 values"),
        ({"shape": (8, 8, 8), "frequency": float("nan")}, "frequency"),
        ({"shape": (8, 8, 8), "frequency": 2, "octaves": 0}, "octaves"),
        ({"shape": (8, 8, 8), "frequency": 2, "lacunarity": -2.0}, "lacunarity"),
        ({"shape": (8, 8, 8), "frequency": 2, "persistence": 0.0}, "persistence"),
        ({"shape": (8, 8, 8), "frequency": 2, "dtype": torch.int32}, "floating"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fractal_perlin_3d(**kwargs)

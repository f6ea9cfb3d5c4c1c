"""3D GAN models, Perlin training lesions and pseudo-mask maths."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from covidseg.config import CorruptionConfig
from covidseg.imaging.grid import DEFAULT_HU_SCALE, HuScale
from covidseg.method.lesions import perlin_lesions
from covidseg.method.pseudo_masks import (
    PseudoMaskConfig,
    binarise,
    calibrate_threshold,
    difference_map,
    remove_small_components,
    split_slices,
    threshold_baseline,
)
from covidseg.models.gan3d import GAN_PRESETS, Discriminator3D, Generator3D, latent_noise, to_device


def _lung(shape=(1, 1, 16, 64, 64)) -> torch.Tensor:
    lung = torch.zeros(shape)
    lung[..., 2:14, 10:54, 6:30] = 1.0
    lung[..., 2:14, 10:54, 34:58] = 1.0
    return lung


hu_to_unit = DEFAULT_HU_SCALE.to_unit  # HU on the default window's [0, 1] scale


@pytest.mark.parametrize("preset", list(GAN_PRESETS))
def test_generator_and_discriminator_shapes(preset):
    cfg = GAN_PRESETS[preset]
    g, d = Generator3D(cfg.generator), Discriminator3D(cfg.discriminator)
    x = torch.rand(2, 1, 16, 64, 64)
    lung = _lung((2, 1, 16, 64, 64))
    healthy, removal = g(x, lung, noise_generator=torch.Generator().manual_seed(0))
    assert healthy.shape == x.shape and removal.shape == x.shape
    assert (removal >= 0).all()
    logits = d(healthy, lung)
    assert logits.shape[:2] == (2, 1) and logits.dim() == 5
    assert g.config.divisor == (8, 16, 16)


def test_generator_only_removes_density_and_only_in_the_lung():
    g = Generator3D(GAN_PRESETS["tiny"].generator)
    x = torch.rand(1, 1, 16, 64, 64)
    lung = _lung()
    healthy, _ = g(x, lung, noise_generator=torch.Generator().manual_seed(0))
    outside = g.gate(lung) == 0
    assert torch.equal(healthy[outside], x[outside])  # composited: the body is untouched
    assert (healthy <= x + 1e-6).all()  # lesions are dense: making healthy only removes density


def test_explicit_noise_reproduces_the_seeded_forward():
    torch.manual_seed(0)
    g = Generator3D(GAN_PRESETS["tiny"].generator).eval()
    x, lung = torch.rand(2, 1, 8, 48, 48), torch.ones(2, 1, 8, 48, 48)
    latent = g.latent_shape(x.shape)
    assert latent == (2, 64, 1, 3, 3)
    with torch.no_grad():
        drawn = g(x, lung, noise_generator=torch.Generator().manual_seed(5))
        given = g(x, lung, noise=g.sample_noise(latent, 5))
    assert torch.equal(drawn[0], given[0]) and torch.equal(drawn[1], given[1])
    with pytest.raises(ValueError, match="noise must be"):
        g(x, lung, noise=torch.zeros(2, 64, 1, 2, 2))


def test_to_device_on_the_cpu_takes_the_channels_last_layout_and_keeps_the_values():
    torch.manual_seed(0)
    g = Generator3D(GAN_PRESETS["tiny"].generator).eval()
    x, lung = torch.rand(2, 1, 16, 64, 64), torch.ones(2, 1, 16, 64, 64)
    with torch.no_grad():
        before = g(x, lung, noise_generator=torch.Generator().manual_seed(3))[0]
        assert to_device(g, "cpu") is g
        after = g(x, lung, noise_generator=torch.Generator().manual_seed(3))[0]
    wide = g.downs[0].down[0].weight  # [c1, c0, 3, 3, 3] (the stem's one in-channel fits both layouts)
    assert wide.is_contiguous(memory_format=torch.channels_last_3d) and not wide.is_contiguous()
    assert torch.allclose(before, after, atol=1e-4)  # the same network, rounded in another order


@pytest.mark.parametrize("kind", ["perlin", "uniform", "none"])
def test_latent_noise_kinds(kind):
    gen = torch.Generator().manual_seed(1)
    noise = latent_noise((2, 8, 4, 8, 8), kind, 1.0, (1.0, 2.0, 2.0), 2, gen, torch.device("cpu"))
    if kind == "none":
        assert torch.count_nonzero(noise) == 0
    else:
        assert noise.std().item() == pytest.approx(1.0, rel=0.2)
        again = latent_noise(
            (2, 8, 4, 8, 8), kind, 1.0, (1.0, 2.0, 2.0), 2, torch.Generator().manual_seed(1), "cpu"
        )
        assert torch.equal(noise, again)


def test_perlin_noise_makes_the_generator_stochastic_and_none_makes_it_deterministic():
    x, lung = torch.rand(1, 1, 16, 64, 64), _lung()
    torch.manual_seed(0)
    g = Generator3D(GAN_PRESETS["tiny"].generator).eval()
    a, _ = g(x, lung, noise_generator=torch.Generator().manual_seed(1))
    b, _ = g(x, lung, noise_generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)
    g_none = Generator3D(replace(GAN_PRESETS["tiny"].generator, latent_noise="none")).eval()
    c, _ = g_none(x, lung, noise_generator=torch.Generator().manual_seed(1))
    d, _ = g_none(x, lung, noise_generator=torch.Generator().manual_seed(2))
    assert torch.equal(c, d)


def test_perlin_lesions_are_dense_inside_the_lung_and_keep_vessels():
    image = torch.full((2, 1, 16, 64, 64), hu_to_unit(-850.0))
    image[..., 8, 30:34, 16:20] = hu_to_unit(40.0)  # a vessel
    lung = _lung((2, 1, 16, 64, 64))
    corrupted, lesion = perlin_lesions(image, lung, torch.Generator().manual_seed(3), scale=DEFAULT_HU_SCALE)
    assert (corrupted >= image - 1e-6).all()  # only denser: vessels never darkened
    assert (lesion <= lung).all() and lesion.sum() > 0
    load = (lesion.sum(dim=(1, 2, 3, 4)) / lung.sum(dim=(1, 2, 3, 4))).tolist()
    lo, hi = CorruptionConfig().load_range
    assert all(lo * 0.5 <= v <= hi * 1.5 for v in load)
    ggo_lo = hu_to_unit(-720.0)
    assert (corrupted[lesion > 0] >= ggo_lo).float().mean() > 0.9  # ground glass or denser
    again, _ = perlin_lesions(image, lung, torch.Generator().manual_seed(3), scale=DEFAULT_HU_SCALE)
    assert torch.equal(corrupted, again)


def test_perlin_lesions_have_the_same_hu_on_another_window():
    """Grids preprocessed with another HU window get lesions of the same density in HU (the levels
    are HU, put on the run's scale), not the default window's unit values read on another scale."""
    hu = torch.full((1, 1, 16, 64, 64), -850.0)
    lung = _lung((1, 1, 16, 64, 64))
    out_hu = []
    for lo, hi in ((-1000.0, 400.0), (-1350.0, 150.0)):
        image = (hu - lo) / (hi - lo)
        gen = torch.Generator().manual_seed(3)
        corrupted, lesion = perlin_lesions(image, lung, gen, scale=HuScale(lo, hi))
        out_hu.append(corrupted * (hi - lo) + lo)
    assert lesion.sum() > 0
    assert torch.allclose(out_hu[0], out_hu[1], atol=0.05)  # HU


def test_perlin_lesions_prefer_the_lung_border():
    image = torch.full((4, 1, 16, 64, 64), hu_to_unit(-850.0))
    lung = _lung((4, 1, 16, 64, 64))
    _, lesion = perlin_lesions(image, lung, torch.Generator().manual_seed(4), scale=DEFAULT_HU_SCALE)
    border = (lung - (-torch.nn.functional.max_pool3d(-lung, (1, 9, 9), 1, (0, 4, 4)))).clamp(0, 1)
    share_on_border = (lesion * border).sum() / lesion.sum()
    assert share_on_border > border.sum() / lung.sum()


def _looks(**looks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eight uniform -850 HU lungs painted with `looks` (CorruptionConfig fields): image, corrupted HU,
    lesion mask."""
    image = torch.full((8, 1, 16, 64, 64), hu_to_unit(-850.0))
    lung = _lung((8, 1, 16, 64, 64))
    cfg = CorruptionConfig(**looks)
    corrupted, lesion = perlin_lesions(
        image, lung, torch.Generator().manual_seed(6), cfg, scale=DEFAULT_HU_SCALE
    )
    return lung, DEFAULT_HU_SCALE.to_hu(corrupted), lesion


def _erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    k = 2 * radius + 1
    return -torch.nn.functional.max_pool3d(-mask, (1, k, k), 1, (0, radius, radius))


def test_perlin_lesions_more_looks_each_do_what_they_say():
    """fine_mix: more, smaller foci; reversed halo: the consolidation at the lesion's rim, not its
    centre; crazy paving: lines denser than the ground glass; air bronchograms: air inside the
    consolidation. Each against the lesions without it, on the same lungs."""
    from scipy import ndimage

    def foci(lesion):
        return np.mean([ndimage.label(m[0].numpy())[1] for m in lesion])

    _, _, plain = _looks(core_probability=0.0)
    _, _, fine = _looks(core_probability=0.0, fine_mix=1.0)
    assert foci(fine) > 1.5 * foci(plain)

    _, hu_core, lesion_core = _looks(core_probability=1.0)
    _, hu_rim, lesion_rim = _looks(core_probability=1.0, reversed_halo_probability=1.0)
    shares = []  # of the dense voxels, those within 1 voxel of the lesion's edge
    for hu, lesion in ((hu_core, lesion_core), (hu_rim, lesion_rim)):
        dense = (hu > -250.0) & (lesion > 0)
        shares.append(float((dense & (_erode(lesion, 1) == 0)).sum() / dense.sum()))
    assert shares[1] > shares[0] + 0.2, shares  # measured 0.75 vs 0.44

    _, hu_ggo, lesion_ggo = _looks(core_probability=0.0)
    _, hu_paved, lesion_paved = _looks(core_probability=0.0, crazy_paving_probability=1.0)
    assert torch.equal(lesion_ggo, lesion_paved)  # the same lesions, lines added
    assert (hu_paved >= hu_ggo - 1e-3).all() and (
        hu_paved[lesion_paved > 0] > hu_ggo[lesion_ggo > 0] + 60
    ).any()

    lung, hu_air, lesion_air = _looks(core_probability=1.0, air_bronchogram_probability=1.0)
    inside = lesion_air > 0
    assert torch.equal(lesion_air, lesion_core)
    assert ((hu_air < -700.0) & inside & (hu_core > -250.0)).sum() > 0  # air tubes through the dense part
    assert (hu_air[lung == 0] == hu_core[lung == 0]).all()


def test_difference_threshold_and_components():
    image = np.zeros((4, 32, 32), np.float32)
    image[1:3, 10:20, 10:20] = 0.3  # a lesion
    image[2, 2, 2] = 0.5  # a single bright voxel: removed as a small component
    lung = np.ones_like(image, dtype=np.uint8)
    diff = difference_map(image, np.zeros_like(image), lung, sigma=0.0)
    binary = binarise(diff, 0.1, min_component=20)
    assert binary[1:3, 10:20, 10:20].all() and not binary[2, 2, 2] and binary.sum() == 200
    assert remove_small_components(np.ones((2, 2, 2), bool), 9).sum() == 0

    healthy_diff = [np.linspace(0, 1, 1000, dtype=np.float32).reshape(10, 10, 10)]
    cfg = PseudoMaskConfig(healthy_percentile=99.0, min_threshold_hu=0.0)
    threshold = calibrate_threshold(healthy_diff, [np.ones((10, 10, 10))], cfg, DEFAULT_HU_SCALE)
    assert threshold == pytest.approx(0.99, abs=1e-3)


def test_threshold_baseline_flags_vessels_too():
    image = np.full((2, 16, 16), hu_to_unit(-850.0), np.float32)
    image[:, 4:8, 4:8] = hu_to_unit(40.0)  # a vessel: the baseline cannot tell it from a lesion
    lung = np.ones_like(image, dtype=np.uint8)
    assert threshold_baseline(image, lung, DEFAULT_HU_SCALE, min_component=1)[:, 4:8, 4:8].all()
    assert threshold_baseline(image, lung, DEFAULT_HU_SCALE, min_component=1).sum() == 32


def test_slice_sets():
    lung = np.ones((3, 10, 10), np.uint8)
    binary = np.zeros((3, 10, 10), bool)
    binary[0, :5] = True  # 50 %
    binary[2, 0, 0] = True  # 1 %
    sets = {z: kind for z, kind, _ in split_slices(binary, lung, PseudoMaskConfig())}
    assert sets == {0: "high", 1: "low", 2: "mid"}

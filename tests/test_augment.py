"""2D augmentation keeps image and masks aligned and stays deterministic; the display-slice
augmentations (blur, 8-bit display rendering) are off by default and then change nothing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from covidseg.imaging.grid import DEFAULT_HU_SCALE, HuScale
from covidseg.learning.augment import (
    GAIN_PIVOT_HU,
    DisplayRendering,
    augment_batch,
    random_blur,
    render_display,
)

NO_INTENSITY = {"gain_jitter": 0.0, "offset_jitter_hu": 0.0, "noise_std_hu": 0.0}


def test_masks_follow_the_image_and_draws_are_reproducible():
    image = torch.zeros(4, 1, 32, 32)
    image[:, :, 8:16, 10:20] = 1.0
    mask = (image > 0.5).float()
    out, (warped,) = augment_batch(
        image, [mask], torch.Generator().manual_seed(0), DEFAULT_HU_SCALE, **NO_INTENSITY
    )
    assert out.shape == image.shape and warped.shape == mask.shape
    # the mask still covers the bright block wherever it went
    assert ((out > 0.5) == (warped > 0.5)).float().mean() > 0.98
    again, (warped2,) = augment_batch(
        image, [mask], torch.Generator().manual_seed(0), DEFAULT_HU_SCALE, **NO_INTENSITY
    )
    assert torch.equal(out, again) and torch.equal(warped, warped2)
    other, _ = augment_batch(image, [mask], torch.Generator().manual_seed(1), DEFAULT_HU_SCALE)
    assert not torch.equal(out, other)


def test_intensity_changes_touch_the_image_only():
    image = torch.full((2, 1, 16, 16), 0.5)
    mask = torch.ones(2, 1, 16, 16)
    out, (warped,) = augment_batch(image, [mask], torch.Generator().manual_seed(2), DEFAULT_HU_SCALE,
                                   max_rotation_deg=0, scale_range=(1.0, 1.0), gain_jitter=0.1,
                                   offset_jitter_hu=140.0, noise_std_hu=28.0)  # fmt: skip
    assert torch.allclose(warped, mask)
    assert not torch.allclose(out, image) and out.min() >= 0 and out.max() <= 1


def _augment_batch_before_16(image, masks, generator, hu_scale, max_rotation_deg=10.0, scale_range=(0.9, 1.1),
                             gain_jitter=0.05, offset_jitter_hu=70.0, noise_std_hu=14.0):  # fmt: skip
    """augment_batch as it was before the display augmentations (#16), copied verbatim (CPU)."""
    b = image.shape[0]

    def rand(*shape):
        return torch.rand(shape, generator=generator)

    k = int(torch.randint(4, (1,), generator=generator))
    flip_x, flip_y = (bool(v) for v in torch.rand(2, generator=generator) < 0.5)
    tensors = [torch.rot90(t, k, dims=(2, 3)) for t in [image, *masks]]
    if flip_x:
        tensors = [torch.flip(t, dims=(3,)) for t in tensors]
    if flip_y:
        tensors = [torch.flip(t, dims=(2,)) for t in tensors]
    angle = (rand(b) * 2 - 1) * math.radians(max_rotation_deg)
    scale = scale_range[0] + rand(b) * (scale_range[1] - scale_range[0])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(theta, list(tensors[0].shape), align_corners=False)
    warped = [
        F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False) for t in tensors
    ]
    out_image, out_masks = warped[0], warped[1:]
    gain = 1.0 + (rand(b, 1, 1, 1) * 2 - 1) * gain_jitter
    offset = (rand(b, 1, 1, 1) * 2 - 1) * hu_scale.unit_of_hu_difference(offset_jitter_hu)
    offset = offset + hu_scale.to_unit(GAIN_PIVOT_HU) * (1.0 - gain)
    noise = torch.randn(out_image.shape, generator=generator) * hu_scale.unit_of_hu_difference(noise_std_hu)
    return (out_image * gain + offset + noise).clamp(0.0, 1.0), out_masks


@pytest.mark.parametrize("scale", [DEFAULT_HU_SCALE, HuScale(-1200.0, 600.0)], ids=str)
def test_display_augmentations_off_are_bit_identical_and_draw_nothing(scale):
    image = torch.rand(3, 1, 24, 24, generator=torch.Generator().manual_seed(5))
    mask = (image > 0.6).float()
    old_gen, new_gen, off_gen = (torch.Generator().manual_seed(11) for _ in range(3))
    old, (old_mask,) = _augment_batch_before_16(image, [mask], old_gen, scale)
    new, (new_mask,) = augment_batch(image, [mask], new_gen, scale)
    off, _ = augment_batch(image, [mask], off_gen, scale, blur_p=0.0, blur_sigma_px=2.0, display_p=0.0,
                           display=DisplayRendering(gamma=2.0))  # fmt: skip
    assert torch.equal(old, new) and torch.equal(old_mask, new_mask) and torch.equal(new, off)
    state = old_gen.get_state()
    assert torch.equal(new_gen.get_state(), state) and torch.equal(off_gen.get_state(), state)
    # switched on, they do change the image (and draw more)
    on_gen = torch.Generator().manual_seed(11)
    on, (on_mask,) = augment_batch(image, [mask], on_gen, scale, blur_p=1.0, display_p=1.0)
    assert not torch.equal(on, old) and torch.equal(on_mask, old_mask)
    assert not torch.equal(on_gen.get_state(), state)


def _lattice_steps(image: torch.Tensor, scale: HuScale, window: tuple[float, float]) -> torch.Tensor:
    """Where the values of `image` ([0, 1] scale) lie on the 256 grey levels of `window` (HU): k."""
    lo, hi = window
    return (scale.to_hu(image.double()) - lo) / ((hi - lo) / 255)


@pytest.mark.parametrize("scale", [DEFAULT_HU_SCALE, HuScale(-1350.0, 150.0)], ids=str)
def test_display_rendering_gives_256_levels_of_the_assumed_window_and_is_monotone(scale):
    hu = torch.linspace(-1000.0, 400.0, 64 * 64).reshape(1, 1, 64, 64).repeat(4, 1, 1, 1)  # a ramp
    image = scale.normalise(hu)
    gen = torch.Generator().manual_seed(3)
    out = render_display(image, gen, scale, 1.0, DisplayRendering())
    steps = _lattice_steps(out, scale, (-1350.0, 150.0))
    inside = (out > 0) & (out < 1)  # the run's scale clamps the rest (below -1000 HU on the default one)
    assert inside.float().mean() > 0.5
    assert (steps[inside] - steps[inside].round()).abs().max() < 1e-3
    assert 2 < len(torch.unique(out[0])) <= 256
    for rendered in out.flatten(1):  # monotone in HU: the ramp's order is kept
        assert torch.all(rendered[1:] >= rendered[:-1])
    assert not all(torch.equal(out[0], o) for o in out[1:])  # each image has its own window and curve
    assert not torch.equal(torch.Generator().manual_seed(3).get_state(), gen.get_state())


def test_display_rendering_reads_a_known_window_back_exactly():
    """Display window = assumed window and gamma 1: the slice is the HU, quantised to 256 levels."""
    hu = torch.linspace(-1000.0, 150.0, 1000).reshape(1, 1, 1, 1000)
    display = DisplayRendering(center_hu=(-600.0, -600.0), width_hu=(1500.0, 1500.0), gamma=1.0)
    out = render_display(DEFAULT_HU_SCALE.normalise(hu), torch.Generator(), DEFAULT_HU_SCALE, 1.0, display)
    step_hu = 1500.0 / 255
    assert (DEFAULT_HU_SCALE.to_hu(out.double()) - hu.double()).abs().max() <= step_hu / 2 + 0.01


def test_render_display_and_blur_take_a_share_of_the_images():
    image = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for change in (
        lambda g: render_display(image, g, DEFAULT_HU_SCALE, 0.5, DisplayRendering()),
        lambda g: random_blur(image, g, 0.5, 1.0),
    ):
        out = change(torch.Generator().manual_seed(1))
        kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, image, strict=True)])
        assert 60 < int(kept.sum()) < 140  # about half, bit for bit


def test_blur_lowers_the_variance_of_noise_and_keeps_a_flat_image():
    noise = torch.randn(6, 1, 48, 48, generator=torch.Generator().manual_seed(2)) * 0.05 + 0.5
    blurred = random_blur(noise, torch.Generator().manual_seed(0), 1.0, 1.0)
    before, after = noise.var(dim=(1, 2, 3)), blurred.var(dim=(1, 2, 3))
    assert torch.all(after <= before * (1 + 1e-5))  # a sigma near 0 is nearly no blur
    assert after.mean() < 0.7 * before.mean() and after.min() < 0.3 * before.min()
    assert (blurred.mean() - noise.mean()).abs() < 1e-3
    flat = torch.full((2, 1, 16, 16), 0.25)
    torch.testing.assert_close(random_blur(flat, torch.Generator(), 1.0, 3.0), flat, rtol=0, atol=1e-6)
    # a wider sigma blurs more
    narrow = random_blur(noise, torch.Generator().manual_seed(0), 1.0, 0.3)
    assert narrow.var() > blurred.var()

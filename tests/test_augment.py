"""2D augmentation keeps image and masks aligned and stays deterministic."""

from __future__ import annotations

import torch

from covidseg.imaging.grid import DEFAULT_HU_SCALE
from covidseg.learning.augment import augment_batch

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

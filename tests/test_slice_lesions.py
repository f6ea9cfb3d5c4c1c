"""train-seg's synthetic lesions (method/slice_lesions.py) and how a micro-batch takes them in."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from covidseg.config import SegTrainConfig
from covidseg.imaging.grid import HuScale
from covidseg.method.slice_lesions import SliceLesionLook, paint_slice_lesions
from covidseg.stages.train_seg import _batch, _micro_batch

SCALE = HuScale()
LUNG_HU, BODY_HU, VESSEL_HU = -860.0, 40.0, 60.0


def _slices(b: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 1, S, S] body with two lungs of uniform density and a few vessels; lung masks 0/1."""
    yy, xx = np.mgrid[:size, :size] / size
    lung = ((xx - 0.3) ** 2 + (yy - 0.5) ** 2 < 0.04) | ((xx - 0.7) ** 2 + (yy - 0.5) ** 2 < 0.04)
    hu = np.where(lung, LUNG_HU, BODY_HU)
    hu[size // 2, size // 4 : size // 4 + 6] = VESSEL_HU  # a vessel in the left lung
    image = SCALE.to_unit(torch.tensor(hu, dtype=torch.float32)).expand(b, 1, size, size).clone()
    return image, torch.tensor(lung, dtype=torch.float32).expand(b, 1, size, size).clone()


def _paint(image, lung, seed=0, p=1.0, look=SliceLesionLook()):
    return paint_slice_lesions(image, lung, torch.Generator().manual_seed(seed), SCALE, p, look)


def test_lesions_stay_in_the_lung_and_are_denser():
    image, lung = _slices(16)
    out = _paint(image, lung)
    assert out.painted.all()
    outside = lung == 0
    assert torch.equal(out.image[outside], image[outside])  # bit for bit outside the lung
    assert out.mask.sum() > 0 and torch.all(out.mask <= lung)
    rise_hu = SCALE.hu_of_unit_difference(out.rise)
    for k in range(16):
        inside = out.mask[k] > 0
        assert inside.sum() > 0
        assert float(rise_hu[k][inside].mean()) > 100.0  # ground glass from -650 HU on, on -860 HU lung
    assert torch.equal(out.rise, (out.image - image).clamp_min(0.0))


def test_a_share_of_the_slices_is_painted_and_the_others_come_back_unchanged():
    image, lung = _slices(64)
    out = _paint(image, lung, p=0.3)
    n = int(out.painted.sum())
    assert 8 <= n <= 32
    untouched = ~out.painted
    assert torch.equal(out.image[untouched], image[untouched]) and out.mask[untouched].sum() == 0
    none = _paint(image, torch.zeros_like(lung))  # no lung: nothing to paint
    assert torch.equal(none.image, image) and none.mask.sum() == 0


def test_the_same_seed_paints_the_same_lesions():
    image, lung = _slices(4)
    a, b, c = _paint(image, lung, seed=3), _paint(image, lung, seed=3), _paint(image, lung, seed=4)
    assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask, c.mask)


def test_lesions_differ_in_size_and_density_from_slice_to_slice():
    image, lung = _slices(48)
    out = _paint(image, lung)
    share = (out.mask.flatten(1).sum(1) / lung.flatten(1).sum(1)).numpy()
    assert share.min() < 0.06 and share.max() > 0.15  # small foci and large areas
    peak_hu = [float(SCALE.to_hu(out.image[k][out.mask[k] > 0]).max()) for k in range(48)]
    assert min(peak_hu) < -250.0 < -150.0 < max(peak_hu)  # pure ground glass and consolidation


def test_ground_glass_never_darkens_a_vessel():
    image, lung = _slices(16)
    look = SliceLesionLook(consolidation_p=0.0, air_bronchogram_p=0.0)
    out = _paint(image, lung, look=look)
    assert torch.all(out.image >= image)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_a_micro_batch_adds_the_painted_lesions_to_its_targets(p):
    image, lung = _slices(6)
    soft = torch.zeros_like(image)
    soft[:, :, 30:34, 10:14] = 0.5  # a pseudo-lesion in every slice
    data = SimpleNamespace(
        images=image[:, 0].numpy(), lungs=lung[:, 0].numpy(), soft=soft[:, 0].numpy(),
        binary=(soft[:, 0] > 0).numpy().astype(np.uint8), hu_scale=SCALE,
        sets=np.array(["high", "low", "mid", "high", "low", "mid"]),
    )  # fmt: skip
    config = SegTrainConfig(batch_size=6, augment=False, synth_lesion_p=p)
    train = np.arange(6)
    idx = _batch(data, train, 6, torch.Generator().manual_seed(0))  # the slices the batch draws first
    image, soft, binary, _, contrast = _micro_batch(
        data, train, config, torch.Generator().manual_seed(0), "cpu"
    )

    def picked(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a[idx].astype(np.float32))[:, None]

    assert torch.all(binary >= picked(data.binary)) and torch.all(soft >= picked(data.soft))
    if p == 0:  # nothing painted or drawn: the slices as make-masks wrote them
        assert torch.equal(image, picked(data.images)) and torch.equal(binary, picked(data.binary))
        assert torch.equal(contrast, torch.from_numpy(data.sets[idx] != "mid"))
    else:  # every slice painted: larger targets, soft targets where the lesion raised the density
        added = (binary > 0) & (picked(data.binary) == 0)
        assert added.flatten(1).any(1).all() and not contrast.any()
        rose = added & (image > picked(data.images))
        assert torch.all(soft[rose] > 0)

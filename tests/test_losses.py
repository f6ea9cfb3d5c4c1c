"""Segmentation losses against closed-form values on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from covidseg.config import SegLossConfig
from covidseg.learning.losses import (
    ContrastiveLoss,
    SegmentationLoss,
    adversarial_loss,
    dice_loss,
    masked_mse,
    mse_to_soft,
    sensitivity_enhanced_bce,
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _identity_head(loss: ContrastiveLoss) -> ContrastiveLoss:
    """Make the projection head the identity on non-negative features (so z = normalise(features))."""
    with torch.no_grad():
        for layer in (loss.head[0], loss.head[2]):
            layer.weight.copy_(torch.eye(layer.weight.shape[0]))
            layer.bias.zero_()
    return loss


# --- mse_to_soft -----------------------------------------------------------------------------------


def test_mse_to_soft_plain_and_masked():
    prob = torch.tensor([0.0, 0.5, 1.0, 0.2]).reshape(1, 1, 2, 2)
    soft = torch.tensor([0.0, 1.0, 0.5, 0.2]).reshape(1, 1, 2, 2)
    # squared errors 0, 0.25, 0.25, 0
    assert mse_to_soft(prob, soft).item() == pytest.approx(0.125)
    lung = torch.tensor([False, True, False, True]).reshape(1, 1, 2, 2)
    assert mse_to_soft(prob, soft, mask=lung).item() == pytest.approx(0.125)  # (0.25 + 0) / 2
    lung = torch.tensor([False, True, True, False]).reshape(1, 1, 2, 2)
    assert mse_to_soft(prob, soft, mask=lung).item() == pytest.approx(0.25)


def test_masked_mean_of_an_empty_mask_is_zero_with_gradient():
    prob = torch.rand(2, 1, 3, 3, requires_grad=True)
    loss = mse_to_soft(prob, torch.rand(2, 1, 3, 3), mask=torch.zeros(2, 1, 3, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(prob.grad, torch.zeros_like(prob))


# --- sensitivity_enhanced_bce ----------------------------------------------------------------------


def _sens_bce(x: float, t: float, beta: float) -> float:
    p = _sigmoid(x)
    bce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    return bce * (1 + beta * t * (1 - p))


def test_sensitivity_bce_hand_values():
    x = torch.tensor([0.0, 0.0, 2.0, -3.0]).reshape(1, 1, 2, 2)
    t = torch.tensor([1.0, 0.0, 1.0, 1.0]).reshape(1, 1, 2, 2)
    # voxel by voxel, beta = 1:
    #   x=0,  t=1: p=0.5,    BCE=log 2 = 0.693147, FN=0.5    -> 1.039721
    #   x=0,  t=0: p=0.5,    BCE=log 2,            FN=0      -> 0.693147
    #   x=2,  t=1: p=0.8808, BCE=0.126928,         FN=0.1192 -> 0.142058
    #   x=-3, t=1: p=0.0474, BCE=3.048587,         FN=0.9526 -> 5.952593
    per_voxel = [1.039721, 0.693147, 0.142058, 5.952593]
    for value, (xi, ti) in zip(per_voxel, [(0, 1), (0, 0), (2, 1), (-3, 1)], strict=True):
        assert _sens_bce(xi, ti, 1.0) == pytest.approx(value, abs=1e-6)
    assert sensitivity_enhanced_bce(x, t).item() == pytest.approx(sum(per_voxel) / 4, abs=1e-5)
    assert sensitivity_enhanced_bce(x, t, beta=2.5).item() == pytest.approx(
        sum(_sens_bce(xi, ti, 2.5) for xi, ti in [(0, 1), (0, 0), (2, 1), (-3, 1)]) / 4, abs=1e-5
    )
    # beta = 0 is plain BCE; a mask keeps only its voxels
    assert sensitivity_enhanced_bce(x, t, beta=0.0).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(x, t).item(), abs=1e-6
    )
    mask = torch.tensor([True, True, False, False]).reshape(1, 1, 2, 2)
    assert sensitivity_enhanced_bce(x, t, mask=mask).item() == pytest.approx((1.039721 + 0.693147) / 2, 1e-5)
    assert sensitivity_enhanced_bce(x, t.bool()).item() == pytest.approx(sum(per_voxel) / 4, abs=1e-5)


def test_sensitivity_bce_is_stable_for_large_logits():
    x = torch.tensor([-200.0, 200.0, -200.0, 200.0])
    t = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = sensitivity_enhanced_bce(x, t, beta=1.0)
    # misses cost |x| (x2 for the missed lesion: FN = 1), hits cost 0
    assert loss.item() == pytest.approx((400.0 + 200.0) / 4)


@pytest.mark.parametrize("x", [-4.0, -1.0, 0.0, 1.5])
def test_sensitivity_bce_gradient_on_a_lesion_voxel(x):
    beta = 1.0
    logit = torch.tensor([x], dtype=torch.float64, requires_grad=True)
    target = torch.ones(1, dtype=torch.float64)
    sensitivity_enhanced_bce(logit, target, beta).backward()
    p = _sigmoid(x)
    closed_form = -(1 - p) * (1 + beta * (1 - p)) - beta * p * (1 - p) * (-math.log(p))
    assert logit.grad.item() == pytest.approx(closed_form, rel=1e-9)
    plain_bce = p - 1.0  # d BCE / dx for t = 1
    detached_weight = plain_bce * (1 + beta * (1 - p))
    # right sign (descent raises the logit), stronger than plain BCE and than a detached weight
    assert logit.grad.item() < detached_weight < plain_bce < 0


@pytest.mark.parametrize("x", [-2.0, 0.0, 3.0])
def test_sensitivity_bce_gradient_on_background_is_plain_bce(x):
    logit = torch.tensor([x], dtype=torch.float64, requires_grad=True)
    sensitivity_enhanced_bce(logit, torch.zeros(1, dtype=torch.float64), beta=3.0).backward()
    assert logit.grad.item() == pytest.approx(_sigmoid(x), rel=1e-9)  # d BCE / dx = p for t = 0


# --- dice_loss -------------------------------------------------------------------------------------


def test_dice_loss_hard_predictions_per_sample_mean():
    big = 50.0  # sigmoid(±50) is 0 / 1 to float32 precision
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, 0, :] = 1  # 4 lesion voxels
    logits = torch.full((2, 1, 4, 4), -big)
    logits[0, 0, 0, :2] = big  # 2 hits
    logits[0, 0, 1, :2] = big  # 2 false positives
    # sample 0: 1 - (2*2 + 1) / (4 + 4 + 1) = 4/9; sample 1: empty target, empty prediction -> 0
    assert dice_loss(logits, target).item() == pytest.approx((4 / 9 + 0.0) / 2, abs=1e-6)
    assert dice_loss(logits[:1], target[:1]).item() == pytest.approx(4 / 9, abs=1e-6)
    assert dice_loss(logits[:1], target[:1], eps=0.0).item() == pytest.approx(1 - 4 / 8, abs=1e-6)
    # a mask that hides the false positives leaves a perfect... half: 1 - (4 + 1) / (2 + 4 + 1)
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[:, :, 0, :] = True
    assert dice_loss(logits[:1], target[:1], mask=mask[:1]).item() == pytest.approx(1 - 5 / 7, abs=1e-6)


def test_dice_loss_at_half_probability():
    target = torch.zeros(1, 1, 4, 5)
    target[0, 0, :2, :3] = 1  # n1 = 6 of N = 20
    # p = 0.5 everywhere: 1 - (2 * 0.5 * 6 + 1) / (0.5 * 20 + 6 + 1) = 1 - 7/17
    assert dice_loss(torch.zeros(1, 1, 4, 5), target).item() == pytest.approx(1 - 7 / 17, abs=1e-6)


# --- ContrastiveLoss -------------------------------------------------------------------------------


def test_contrastive_identical_positives_orthogonal_negatives():
    loss_fn = _identity_head(ContrastiveLoss(3, proj_dim=3, init_temperature=0.1, symmetric=False))
    e1, e2, e3 = torch.eye(3)
    features = torch.stack([e1, e1, e1, e2, e3])
    is_high = torch.tensor([True, True, True, False, False])
    # each high anchor: 2 positives at s=1, 2 negatives at s=0 -> -log(2e^10 / (2e^10 + 2)) = log(1 + e^-10)
    high_side = math.log1p(math.exp(-10))
    assert loss_fn(features, is_high).item() == pytest.approx(high_side, rel=1e-5)
    # symmetric: each low anchor has 1 positive at s=0 (e2 . e3) and 3 negatives at s=0 -> log 4
    loss_fn.symmetric = True
    assert loss_fn(features, is_high).item() == pytest.approx(0.5 * (high_side + math.log(4)), rel=1e-5)


def test_contrastive_closed_form_at_an_angle():
    loss_fn = _identity_head(
        ContrastiveLoss(2, proj_dim=2, init_temperature=1.0, max_temperature=1.0, symmetric=True)
    )
    c, s = math.cos(math.pi / 3), math.sin(math.pi / 3)
    features = torch.tensor([[2.0, 0.0], [c, s], [0.0, 3.0]])  # norms do not matter
    is_high = torch.tensor([True, True, False])
    # s(h1, h2) = 0.5, s(h1, l) = 0, s(h2, l) = sin 60°; one low sample: the low side does not count
    expected = 0.5 * (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(s - 0.5)))
    assert loss_fn(features, is_high).item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_decreases_as_positives_get_closer():
    loss_fn = _identity_head(ContrastiveLoss(4, proj_dim=4))
    base = torch.tensor([1.0, 0.2, 0.0, 0.0])
    spread = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.5]])
    low = torch.tensor([[0.0, 1.0, 0.3, 0.0], [0.1, 0.8, 0.0, 0.4]])
    is_high = torch.tensor([True, True, True, False, False])
    values = [
        loss_fn(torch.cat([base + alpha * spread, low]), is_high).item()
        for alpha in (2.0, 1.0, 0.5, 0.1, 0.0)
    ]
    assert all(a > b for a, b in zip(values, values[1:], strict=False)), values


def test_contrastive_temperature_gets_a_gradient_and_moves():
    torch.manual_seed(0)
    loss_fn = ContrastiveLoss(8, proj_dim=4, init_temperature=0.1)
    assert loss_fn.temperature == pytest.approx(0.1)
    features = torch.randn(6, 8)
    is_high = torch.tensor([True, True, True, False, False, False])
    loss_fn(features, is_high).backward()
    assert loss_fn.log_tau.grad is not None and loss_fn.log_tau.grad.item() != 0.0
    assert all(p.grad is not None for p in loss_fn.head.parameters())
    before = loss_fn.temperature
    torch.optim.SGD(loss_fn.parameters(), lr=0.1).step()
    assert loss_fn.temperature != pytest.approx(before)


def _separated_batch():
    e1, e2 = torch.eye(2)
    return torch.stack([e1, e1, e2, e2]), torch.tensor([True, True, False, False])


def _confused_batch():
    # positives orthogonal, each anchor identical to a negative: a larger tau lowers the loss
    e1, e2 = torch.eye(2)
    return torch.stack([e1, e2, e1, e2]), torch.tensor([True, True, False, False])


def test_contrastive_temperature_stays_clamped_and_comes_back():
    loss_fn = _identity_head(ContrastiveLoss(2, proj_dim=2, init_temperature=0.1, min_temperature=0.05))
    opt = torch.optim.Adam([loss_fn.log_tau], lr=0.3)
    features, is_high = _separated_batch()  # well separated: a smaller tau lowers the loss
    for _ in range(40):
        opt.zero_grad()
        loss_fn(features, is_high).backward()
        opt.step()
        assert 0.05 <= loss_fn.temperature <= 1.0
    assert loss_fn.temperature == pytest.approx(0.05)
    assert loss_fn.log_tau.item() < math.log(0.05)  # Adam's momentum overshot the bound...
    features, is_high = _confused_batch()
    for _ in range(40):
        opt.zero_grad()
        loss_fn(features, is_high).backward()
        opt.step()
        assert 0.05 <= loss_fn.temperature <= 1.0
    assert loss_fn.temperature > 0.05  # ...yet tau was not stuck there
    loss_fn.log_tau.data.fill_(10.0)
    assert loss_fn.temperature == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("is_high", "symmetric"),
    [
        ([True, False, False], False),  # one high sample: no positive for a high anchor
        ([True, True, True], True),  # no low sample: no negatives
        ([False, False, False], True),
        ([True, False], True),
        ([True], True),
    ],
)
def test_contrastive_degenerate_batches_give_zero_with_gradient(is_high, symmetric):
    loss_fn = ContrastiveLoss(5, proj_dim=3, symmetric=symmetric)
    features = torch.randn(len(is_high), 5, requires_grad=True)
    loss = loss_fn(features, torch.tensor(is_high))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert loss_fn.log_tau.grad is not None and loss_fn.log_tau.grad.item() == 0.0
    assert features.grad is not None and torch.equal(features.grad, torch.zeros_like(features))


def test_contrastive_symmetric_uses_the_low_side_when_only_one_high():
    loss_fn = _identity_head(ContrastiveLoss(2, proj_dim=2, init_temperature=1.0))
    e1, e2 = torch.eye(2)
    features, is_high = torch.stack([e1, e2, e2]), torch.tensor([True, False, False])
    # low anchors: one positive at s=1, one negative at s=0 -> log(1 + e^-1)
    assert loss_fn(features, is_high).item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-5)


def test_contrastive_pools_spatial_features():
    torch.manual_seed(1)
    loss_fn = ContrastiveLoss(4, proj_dim=3)
    fmap = torch.randn(4, 4, 3, 5)
    is_high = torch.tensor([True, True, False, False])
    assert loss_fn(fmap, is_high).item() == pytest.approx(
        loss_fn(fmap.mean((2, 3)), is_high).item(), rel=1e-6
    )


def test_contrastive_rejects_bad_temperatures():
    with pytest.raises(ValueError):
        ContrastiveLoss(4, init_temperature=2.0)
    with pytest.raises(ValueError):
        ContrastiveLoss(4, min_temperature=0.0)


# --- SegmentationLoss ------------------------------------------------------------------------------


def _seg_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 1, 8, 8, generator=g, requires_grad=True)
    features = torch.randn(4, 16, generator=g, requires_grad=True)
    soft = torch.rand(4, 1, 8, 8, generator=g)
    binary = soft > 0.6
    is_high = torch.tensor([True, True, False, False])
    lung = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    lung[..., 1:7, 1:7] = True
    return logits, features, soft, binary, is_high, lung


def test_segmentation_loss_is_the_weighted_sum_of_its_parts():
    config = SegLossConfig(w_sensitivity=1.5, beta=2.0, w_mse=0.5, w_contrastive=0.2, w_dice=0.3)
    torch.manual_seed(0)
    module = SegmentationLoss(16, config)
    logits, features, soft, binary, is_high, lung = _seg_batch()
    total, parts = module(logits, features, soft, binary, is_high, lung)
    expected = {
        "loss_sensitivity": sensitivity_enhanced_bce(logits, binary, 2.0, mask=lung).item(),
        "loss_mse": mse_to_soft(torch.sigmoid(logits), soft, mask=lung).item(),
        "loss_contrastive": module.contrastive(features, is_high).item(),
        "loss_dice": dice_loss(logits, binary, mask=lung).item(),
    }
    for key, value in expected.items():
        assert parts[key] == pytest.approx(value, rel=1e-5), key
    weighted = 1.5 * expected["loss_sensitivity"] + 0.5 * expected["loss_mse"]
    weighted += 0.2 * expected["loss_contrastive"] + 0.3 * expected["loss_dice"]
    assert total.item() == pytest.approx(weighted, rel=1e-5)
    assert parts["loss_total"] == pytest.approx(weighted, rel=1e-5)
    assert parts["temperature"] == pytest.approx(0.1)
    assert all(isinstance(v, float) for v in parts.values())
    total.backward()
    assert logits.grad is not None and features.grad is not None
    assert module.contrastive.log_tau.grad is not None and module.contrastive.log_tau.grad.item() != 0.0


def test_segmentation_loss_trains_tau_with_the_model_optimizer():
    module = SegmentationLoss(16)
    assert any(p is module.contrastive.log_tau for p in module.parameters())
    assert "contrastive.log_tau" in module.state_dict()


def test_segmentation_loss_zero_weights_are_skipped_and_reported_as_zero():
    module = SegmentationLoss(16, SegLossConfig(w_contrastive=0.0, w_dice=0.0))
    logits, features, soft, binary, is_high, _ = _seg_batch(1)
    total, parts = module(logits, features, soft, binary, is_high)
    assert parts["loss_contrastive"] == 0.0 and parts["loss_dice"] == 0.0
    assert total.item() == pytest.approx(parts["loss_sensitivity"] + parts["loss_mse"], rel=1e-6)


def test_seg_loss_config_validates_and_round_trips():
    with pytest.raises(ValueError):
        SegLossConfig(w_mse=-1.0)
    config = SegLossConfig(w_dice=0.5, init_temperature=0.2)
    assert SegLossConfig.from_json(config.to_json()) == config


def test_gan_adversarial_loss_in_closed_form():
    logits = torch.tensor([[0.0, 2.0]])
    real_bce = (math.log(2.0) - math.log(_sigmoid(2.0))) / 2  # -log σ(0), -log σ(2), averaged
    assert adversarial_loss(logits, True, "bce").item() == pytest.approx(real_bce, rel=1e-6)
    fake_bce = (math.log(2.0) - math.log(1.0 - _sigmoid(2.0))) / 2
    assert adversarial_loss(logits, False, "bce").item() == pytest.approx(fake_bce, rel=1e-6)
    assert adversarial_loss(logits, True, "lsgan").item() == pytest.approx((1.0 + 1.0) / 2)  # (0-1)², (2-1)²
    assert adversarial_loss(logits, False, "lsgan").item() == pytest.approx((0.0 + 4.0) / 2)


def test_gan_masked_mse_counts_only_the_gate_and_is_zero_for_an_empty_one():
    a = torch.tensor([[[[[1.0, 3.0, 10.0]]]]])  # [1, 1, 1, 1, 3]
    b = torch.zeros_like(a)
    gate = torch.tensor([[[[[1.0, 1.0, 0.0]]]]])
    assert masked_mse(a, b, gate).item() == pytest.approx((1.0 + 9.0) / 2)
    assert masked_mse(a, b, torch.zeros_like(gate)).item() == 0.0

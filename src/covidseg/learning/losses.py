"""Losses of the 2D segmentation stage (a network trained only on pseudo-masks) and of the 3D GAN.

Shapes
------
* ``logits``, ``prob``, ``target``, ``soft_target``, ``mask``: ``[B, 1, H, W]`` (any ``[B, ...]`` works;
  ``mask`` may be any shape that broadcasts to the input). ``mask`` is boolean (or 0/1 float): the
  voxels that count, typically the lung.
* ``features``: ``[B, C]`` pooled encoder features (``[B, C, *spatial]`` is average-pooled to ``[B, C]``).
* ``is_high``: ``[B]`` bool, True for slices of the high-infected set, False for the low-infected set.

Every function returns a 0-dim tensor (a scalar) that can be back-propagated.

Masked means
------------
With a mask, a mean is ``sum(value * mask) / max(sum(mask), 1)``: only mask voxels count, and an empty
mask gives 0 (still connected to the graph, so ``backward()`` works and yields zero gradients).

The terms
---------
* :func:`sensitivity_enhanced_bce` - BCE against the binary pseudo-mask, up-weighted where a lesion is
  predicted as background (soft false negatives), to favour sensitivity.
* :func:`mse_to_soft` - MSE between the predicted probability and the continuous pseudo-mask.
* :func:`dice_loss` - soft Dice, per sample, averaged over the batch.
* :class:`ContrastiveLoss` - InfoNCE over projected encoder features with a learnable temperature:
  high-infected slices attract each other and repel low-infected slices (and, symmetrically, the
  other way round).
* :class:`SegmentationLoss` - their weighted sum (:class:`~covidseg.config.SegLossConfig`, a setting
  of train-seg); it owns the contrastive head and temperature, so they are trained by the model's
  optimizer.

GAN terms (train-gan; volumes ``[B, 1, D, H, W]``)
--------------------------------------------------
* :func:`adversarial_loss` - the discriminator's logits against "real" or "fake" (BCE or least squares).
* :func:`masked_mse` - MSE of a restored volume against the clean one over the generator's lung gate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from covidseg.config import SegLossConfig


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over all elements, or over the True/1 elements of ``mask`` (0 if none)."""
    if mask is None:
        return values.mean()
    weight = mask.to(values.dtype).expand_as(values)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def mse_to_soft(
    prob: torch.Tensor, soft_target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error between a predicted probability and the continuous pseudo-mask.

    Args:
        prob: ``[B, 1, H, W]`` predicted lesion probability in [0, 1] (sigmoid of the logits).
        soft_target: ``[B, 1, H, W]`` continuous pseudo-mask in [0, 1].
        mask: optional ``[B, 1, H, W]`` bool; when given, the mean runs over mask voxels only.

    Returns:
        scalar ``mean((prob - soft_target)²)``.
    """
    return _masked_mean((prob - soft_target.to(prob.dtype)).square(), mask)


def sensitivity_enhanced_bce(
    logits: torch.Tensor, target: torch.Tensor, beta: float = 1.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """BCE up-weighted on soft false negatives: ``mean(BCE(p, t) · (1 + β · t · (1 − p)))``.

    ``p = sigmoid(logits)``; the BCE is computed stably from the logits
    (:func:`torch.nn.functional.binary_cross_entropy_with_logits`). ``FN = t · (1 − p)`` is the soft
    false negative (target lesion, predicted background); on background voxels (``t = 0``) the loss is
    plain BCE.

    The FN weight is **not** detached: the gradient flows through both factors. For a lesion voxel
    (``t = 1``) the derivative with respect to the logit ``x`` is

        ``dL/dx = −(1 − p)(1 + β(1 − p)) − β · p(1 − p) · (−log p)``,

    both terms negative, so the loss pushes the logit up - more strongly than plain BCE
    (``−(1 − p)``) and more than with a detached weight (the first term only). With binary targets no
    voxel gets a gradient of the wrong sign. With soft targets ``0 < t < 1`` the minimum lies above
    ``t`` (the loss is deliberately biased towards predicting lesion): pass the binary pseudo-mask.

    Args:
        logits: ``[B, 1, H, W]`` raw network output.
        target: ``[B, 1, H, W]`` binary pseudo-mask (bool or 0/1 float).
        beta: weight β >= 0 of the false-negative term (0 gives plain BCE).
        mask: optional ``[B, 1, H, W]`` bool; when given, the mean runs over mask voxels only.

    Returns:
        scalar loss.
    """
    target = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    fn = target * (1.0 - torch.sigmoid(logits))
    return _masked_mean(bce * (1.0 + beta * fn), mask)


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft Dice loss per sample, averaged over the batch.

    For each sample ``b`` (sums over all voxels of that sample, restricted to ``mask`` if given):
    ``1 − (2 Σ p·t + eps) / (Σ p + Σ t + eps)`` with ``p = sigmoid(logits)``; the result is the mean
    over the batch. Per sample (rather than one Dice over the whole batch) so that slices with small
    lesions weigh as much as slices with large ones. ``eps`` smooths the ratio: a sample with an empty
    target and an empty prediction has loss 0, one with an empty target and any prediction is pushed
    towards predicting nothing.

    Args:
        logits: ``[B, 1, H, W]`` raw network output.
        target: ``[B, 1, H, W]`` binary (or soft) pseudo-mask in [0, 1].
        eps: additive smoothing (> 0).
        mask: optional ``[B, 1, H, W]`` bool; voxels outside it are ignored.

    Returns:
        scalar loss in [0, 1].
    """
    prob = torch.sigmoid(logits)
    target = target.to(prob.dtype)
    if mask is not None:
        weight = mask.to(prob.dtype).expand_as(prob)
        prob, target = prob * weight, target * weight
    dims = tuple(range(1, prob.ndim))
    intersection = (prob * target).sum(dims)  # [B]
    dice = (2.0 * intersection + eps) / (prob.sum(dims) + target.sum(dims) + eps)  # [B]
    return (1.0 - dice).mean()


class _ClampTowardsRange(torch.autograd.Function):
    """``x.clamp(lo, hi)`` whose gradient is never stuck outside the range.

    Inside ``[lo, hi]`` it is the identity. Outside it the value is clamped and the gradient passes
    only when a descent step would move ``x`` back towards the range (below ``lo``: gradients < 0;
    above ``hi``: gradients > 0); otherwise it is zero. A plain clamp gives zero gradient outside the
    range, so a parameter that an optimizer step (or momentum) pushed beyond a bound would stay there.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        passes = ((x >= ctx.lo) & (x <= ctx.hi)) | ((x < ctx.lo) & (grad < 0)) | ((x > ctx.hi) & (grad > 0))
        return grad * passes, None, None


class ContrastiveLoss(nn.Module):
    """Supervised InfoNCE between high- and low-infected slices, with a learnable temperature τ.

    Features ``[B, C]`` go through a projection head (Linear(C, C) - ReLU - Linear(C, proj_dim)) and
    are L2-normalised to ``z``; ``s_ij = z_i · z_j`` (cosine similarity). For a high anchor ``i``, the
    positives ``P(i)`` are the other high samples and the negatives ``N(i)`` the low samples::

        loss_i = −log( Σ_{j∈P(i)} exp(s_ij/τ) / (Σ_{j∈P(i)} exp(s_ij/τ) + Σ_{k∈N(i)} exp(s_ik/τ)) )

    computed stably as ``softplus(lse_N − lse_P)`` (``lse`` = ``logsumexp`` of ``s/τ`` over a set), which
    equals ``lse_{P∪N} − lse_P`` and stays accurate when the loss is near 0. The high side is the mean of
    ``loss_i`` over high anchors. With ``symmetric=True`` low samples are anchors too (low-low
    positives, high negatives) and the loss is the mean of the two sides, each side weighted equally
    whatever the number of its anchors (the high set is usually the minority).

    A side contributes when it has >= 2 samples (an anchor needs a positive) and the other side >= 1
    (a negative). With ``symmetric=False`` that is: >= 2 high and >= 1 low samples. When no side
    contributes the loss is 0 - a zero tensor still connected to the head and τ (``(…).sum() * 0``),
    so ``backward()`` works and they get zero (not ``None``) gradients.

    The temperature is ``τ = exp(log_tau)`` with ``log_tau`` an ``nn.Parameter``, clamped in forward to
    ``[min_temperature, max_temperature]``. The gradient reaches ``log_tau`` while τ is inside the
    range; outside it the value is clamped and only gradients that move τ back into the range pass
    (a plain clamp would leave a parameter stuck beyond a bound for good).
    """

    def __init__(
        self,
        in_dim: int,
        proj_dim: int = 64,
        init_temperature: float = 0.1,
        min_temperature: float = 0.01,
        max_temperature: float = 1.0,
        symmetric: bool = True,
    ) -> None:
        super().__init__()
        if in_dim < 1 or proj_dim < 1:
            raise ValueError("in_dim and proj_dim must be >= 1")
        if not 0 < min_temperature <= init_temperature <= max_temperature:
            raise ValueError(
                "need 0 < min_temperature <= init_temperature <= max_temperature, got "
                f"{min_temperature}, {init_temperature}, {max_temperature}"
            )
        self.head = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, proj_dim)
        )
        self.log_tau = nn.Parameter(torch.tensor(math.log(init_temperature)))
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        self.symmetric = symmetric

    def _tau(self) -> torch.Tensor:
        """The clamped temperature as a differentiable 0-dim tensor."""
        return _ClampTowardsRange.apply(self.log_tau.exp(), self.min_temperature, self.max_temperature)

    @property
    def temperature(self) -> float:
        """The temperature τ used by forward (clamped to its range)."""
        return float(self._tau().detach())

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` (or ``[B, C, *spatial]``, average-pooled) features → ``[B, proj_dim]`` unit vectors."""
        if features.ndim > 2:
            features = features.flatten(2).mean(-1)  # [B, C, *spatial] -> [B, C]
        return F.normalize(self.head(features).float(), dim=1)

    def forward(self, features: torch.Tensor, is_high: torch.Tensor) -> torch.Tensor:
        """Contrastive loss of a batch.

        Args:
            features: ``[B, C]`` encoder features (``[B, C, *spatial]`` is average-pooled).
            is_high: ``[B]`` bool, True for high-infected, False for low-infected samples.

        Returns:
            scalar loss (0 when no side has enough samples, see the class docstring).
        """
        z = self.project(features)  # [B, D]
        if is_high.numel() != z.shape[0]:
            raise ValueError(f"is_high has {is_high.numel()} entries for a batch of {z.shape[0]}")
        n_high = int(is_high.sum())  # counted where is_high lives (no device sync when it is on the CPU)
        counts = {True: n_high, False: z.shape[0] - n_high}
        is_high = is_high.to(device=z.device, dtype=torch.bool).reshape(-1)
        tau = self._tau()
        sim = z @ z.T / tau  # [B, B]
        not_self = ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)  # [B, B]
        terms = []
        for high_side in (True, False) if self.symmetric else (True,):
            if counts[high_side] < 2 or counts[not high_side] < 1:
                continue
            anchors = is_high if high_side else ~is_high  # [B]
            rows = sim[anchors]  # [n_anchor, B]
            valid = not_self[anchors]  # [n_anchor, B]
            positive = valid & anchors[None, :]  # [n_anchor, B]: same side, not self
            negative = valid & ~anchors[None, :]  # [n_anchor, B]: other side
            lse_pos = torch.logsumexp(rows.masked_fill(~positive, float("-inf")), dim=1)  # [n_anchor]
            lse_neg = torch.logsumexp(rows.masked_fill(~negative, float("-inf")), dim=1)  # [n_anchor]
            terms.append(F.softplus(lse_neg - lse_pos).mean())  # = lse_{P∪N} - lse_P
        if not terms:
            return (z.sum() + self.log_tau) * 0.0
        return torch.stack(terms).mean()


class SegmentationLoss(nn.Module):
    """The weighted sum of the segmentation losses (weights in :class:`SegLossConfig`).

    ``total = w_sensitivity · sensitivity_enhanced_bce(logits, binary, beta)
    + w_mse · mse_to_soft(sigmoid(logits), soft) + w_contrastive · contrastive(features, is_high)
    + w_dice · dice_loss(logits, binary)``, the voxel terms restricted to ``lung`` when given.

    The contrastive head and its temperature are submodules: put this module's parameters in the
    model's optimizer (and its state dict in the checkpoint) so τ is learned with the model.
    """

    def __init__(self, feature_dim: int, config: SegLossConfig | None = None) -> None:
        super().__init__()
        self.config = config or SegLossConfig()
        self.contrastive = ContrastiveLoss(
            feature_dim,
            proj_dim=self.config.contrastive_proj_dim,
            init_temperature=self.config.init_temperature,
        )

    def forward(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        soft: torch.Tensor,
        binary: torch.Tensor,
        is_high: torch.Tensor,
        lung: torch.Tensor | None = None,
        contrast: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its parts.

        Args:
            logits: ``[B, 1, H, W]`` raw network output.
            features: ``[B, C]`` (or ``[B, C, *spatial]``) encoder features, ``C = feature_dim``.
            soft: ``[B, 1, H, W]`` continuous pseudo-mask in [0, 1].
            binary: ``[B, 1, H, W]`` binary pseudo-mask.
            is_high: ``[B]`` bool, True for slices of the high-infected set.
            lung: optional ``[B, 1, H, W]`` bool lung mask; voxel terms count lung voxels only.
            contrast: optional ``[B]`` bool: which samples take part in the contrastive term
                (high- and low-infected slices; slices in between are left out). Default: all.

        Returns:
            ``(total, parts)``: the scalar total to back-propagate and a dict of floats with keys
            ``loss_sensitivity``, ``loss_mse``, ``loss_contrastive``, ``loss_dice`` (unweighted),
            ``loss_total`` and ``temperature``. Terms with weight 0 are not computed and reported as 0.
        """
        cfg = self.config
        logits = logits.float()  # the losses run in float32, also under autocast
        zero = logits.sum() * 0.0
        terms = {
            "loss_sensitivity": (
                sensitivity_enhanced_bce(logits, binary, cfg.beta, mask=lung) if cfg.w_sensitivity else zero
            ),
            "loss_mse": mse_to_soft(torch.sigmoid(logits), soft, mask=lung) if cfg.w_mse else zero,
            "loss_contrastive": (
                self.contrastive(
                    features if contrast is None else features[contrast],
                    is_high if contrast is None else is_high[contrast],
                )
                if cfg.w_contrastive
                else zero
            ),  # fmt: skip
            "loss_dice": dice_loss(logits, binary, mask=lung) if cfg.w_dice else zero,
        }
        weights = {
            "loss_sensitivity": cfg.w_sensitivity,
            "loss_mse": cfg.w_mse,
            "loss_contrastive": cfg.w_contrastive,
            "loss_dice": cfg.w_dice,
        }
        total = sum((weights[k] * v for k, v in terms.items()), zero)
        names = [*terms, "loss_total", "temperature"]
        values = torch.stack([*terms.values(), total, self.contrastive._tau()]).detach().tolist()  # one sync
        return total, dict(zip(names, values, strict=True))


def adversarial_loss(logits: torch.Tensor, real: bool, kind: str = "bce") -> torch.Tensor:
    """The GAN term for discriminator `logits` (any shape) that should read `real` (True) or fake:
    ``bce`` (binary cross-entropy on the logits, as in the method) or ``lsgan`` (least squares)."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.mse_loss(logits, target)


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean((a - b)²)`` over the voxels of `mask` (0/1 float, same shape; 0 when the mask is empty)."""
    return _masked_mean((a - b) ** 2, mask)

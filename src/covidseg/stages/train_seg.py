"""`covidseg train-seg`: train the 2D segmenter (TransUNet or UNet) on make-masks' pseudo-masks.

No ground truth is used for training or for choosing the best checkpoint: validation is on the
pseudo-labels of held-out cases. When the make-masks folder carries reference masks (phantoms),
Dice against them is logged too, in columns named ``ref_*``, for information only.

With ``healthy_budget_percent`` the probability threshold is calibrated at the end, without labels,
like make-masks' thresholds: the lowest of 0.50..0.95 at which the held-out healthy cases' slices
have at most that share of their lung flagged (:func:`calibrate_on_healthy`); best.pt and the
manifest's ``threshold`` record it.

Output folder::

    checkpoint.pt   latest state (model, loss module incl. the temperature, optimizer, step)
    best.pt         the model with the best validation Dice against held-out pseudo-masks
    metrics.csv     step, losses, temperature, val_dice_pseudo, ref_dice (if references)
    plots/loss.png, plots/overlay_<step>.png   (slice | pseudo-mask | prediction)
    config.json, manifest.json (written last)
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from covidseg import __version__
from covidseg.config import PreprocessConfig, SegLossConfig, SegTrainConfig
from covidseg.devices import autocast
from covidseg.errors import InputError, UsageError
from covidseg.imaging.grid import HuScale
from covidseg.imaging.metrics import dice
from covidseg.inference.ct_segment import SlicePreprocessing
from covidseg.inference.model_files import MODEL_FORMAT, segmenter_from_payload
from covidseg.inference.runners import predict_probabilities
from covidseg.io.atomic import write_json
from covidseg.learning import distributed
from covidseg.learning.augment import DisplayRendering, augment_batch
from covidseg.learning.loop import (
    CsvLog,
    RunningMeans,
    load_checkpoint,
    lr_at,
    open_run_folder,
    parallel_summary,
    resume_checkpoint_path,
    resumed_config,
    save_checkpoint,
    seed_everything,
    step_generator,
)
from covidseg.learning.losses import SegmentationLoss
from covidseg.method.pseudo_masks import PROBABILITY_THRESHOLDS, SOFT_SCALE_HU, healthy_probability_threshold
from covidseg.method.slice_lesions import paint_slice_lesions
from covidseg.models.segmenters import make_segmenter, segmenter_config_dict
from covidseg.progress import Progress, losses_text
from covidseg.reporting.plots import loss_curves, panels
from covidseg.stages._workdir import inside, median_slab_mm, portable_path, read_manifest, stored_path

CHECKPOINT_FORMAT = "covidseg.seg.checkpoint"
LOSS_COLUMNS = ["loss_sensitivity", "loss_mse", "loss_contrastive", "loss_dice", "loss_total"]


class SliceSet:
    """make-masks' 2D training set: arrays [N, H, W] and the per-slice index."""

    def __init__(self, masks_dir: Path) -> None:
        self.manifest = read_manifest(masks_dir, "covidseg.masks")
        try:  # the slices' [0, 1] scale; a masks manifest without hu_window: the default window
            self.hu_scale = HuScale.from_json(self.manifest.get("hu_window"))
        except ValueError as exc:
            raise InputError(Path(masks_dir) / "manifest.json", str(exc)) from None
        folder = inside(masks_dir, "slices")
        with open(folder / "index.csv", newline="", encoding="utf-8") as fh:
            self.index = list(csv.DictReader(fh))
        if not self.index:
            raise InputError(folder / "index.csv", "the 2D training set is empty")

        def load(name: str) -> np.ndarray:
            return np.load(folder / f"{name}.npy", allow_pickle=False)

        self.images, self.lungs = load("images"), load("lungs")
        self.soft, self.binary = load("soft"), load("binary")
        self.refs = load("refs") if (folder / "refs.npy").exists() else None
        n = len(self.index)
        if any(len(a) != n for a in (self.images, self.lungs, self.soft, self.binary)):
            raise InputError(folder, "slice arrays and index.csv disagree in length")
        self.case_ids = np.array([row["case_id"] for row in self.index])
        self.groups = np.array([row["group"] for row in self.index])
        self.sets = np.array([row["set"] for row in self.index])

    def split(self, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Slice indices (train, val), split by case so no case is in both."""
        cases = sorted(set(self.case_ids))
        rng = np.random.default_rng(seed)
        order = [cases[i] for i in rng.permutation(len(cases))]
        n_val = min(len(cases) - 1, math.ceil(val_fraction * len(cases))) if val_fraction > 0 else 0
        val_cases = set(order[:n_val])
        is_val = np.array([c in val_cases for c in self.case_ids])
        return np.nonzero(~is_val)[0], np.nonzero(is_val)[0]


def _batch(data: SliceSet, train_idx: np.ndarray, size: int, gen: torch.Generator) -> np.ndarray:
    """Half from the high-infected set (when there is one), the rest from all training slices."""
    high = train_idx[data.sets[train_idx] == "high"]
    n_high = min(size // 2, len(high)) if len(high) else 0
    pick_high = high[torch.randint(len(high), (n_high,), generator=gen).numpy()] if n_high else high[:0]
    pick_rest = train_idx[torch.randint(len(train_idx), (size - n_high,), generator=gen).numpy()]
    return np.concatenate([pick_high, pick_rest])


def slice_preprocessing(masks_dir: Path, masks_manifest: dict, threshold: float) -> SlicePreprocessing:
    """How `predict` must cut a CT into slices for a model trained on this data: the preprocess
    settings, the grid's in-plane size and its median slab thickness (mm) over the training cases,
    as make-masks recorded them (`preprocess_config`, `slab_mm`). A masks manifest written before
    they existed names its preprocess folder instead, which is read for them."""
    if "preprocess_config" in masks_manifest:
        pre_config, slab_mm = masks_manifest["preprocess_config"], masks_manifest["slab_mm"]
    else:
        pre_dir = stored_path(masks_dir, masks_manifest.get("preprocess"))
        pre = read_manifest(pre_dir, "covidseg.preprocess")
        pre_config, slab_mm = pre["config"], median_slab_mm(pre["cases"], pre_dir / "manifest.json")
    try:
        config = PreprocessConfig.from_json(pre_config)
        return SlicePreprocessing(
            hu_window=config.hu_window,
            slice_size=tuple(config.grid[1:]),
            slab_mm=float(slab_mm),
            margin_mm=config.margin_mm,
            threshold=threshold,
            lungs=config.lungs,
        )
    except (KeyError, TypeError, ValueError) as exc:  # a hand-edited manifest
        where = Path(masks_dir) / "manifest.json"
        raise InputError(where, f"bad preprocess_config or slab_mm ({exc})") from None


class _SegStep(torch.nn.Module):
    """The segmenter and its loss as one module, so one DDP wrapper averages the gradients of both
    (network, contrastive head and learnable temperature) and the forward goes through DDP even
    though it calls ``forward_with_features``."""

    def __init__(self, model: torch.nn.Module, criterion: SegmentationLoss) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(
        self, image: torch.Tensor, soft: torch.Tensor, binary: torch.Tensor, is_high, contrast
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """image, soft, binary: [B, 1, H, W]; is_high, contrast: [B] bool -> (loss, parts)."""
        with autocast(image.device):
            logits, features = self.model.forward_with_features(image)
        return self.criterion(logits, features.float(), soft, binary, is_high, contrast=contrast)


def _micro_batch(
    data: SliceSet, train_idx: np.ndarray, config: SegTrainConfig, gen: torch.Generator, device
) -> tuple[torch.Tensor, ...]:
    """One (augmented) micro-batch drawn from `gen`: with ``config.synth_lesion_p`` > 0 a share of
    the slices first get a synthetic lesion (:mod:`covidseg.method.slice_lesions`), added to their
    binary and soft targets (the soft one: the density rise over ``SOFT_SCALE_HU``, as make-masks
    scales differences) and left out of the contrastive term, whose high/low sets they no longer fit.

    Returns image, soft, binary ``[B, 1, H, W]`` and is_high, contrast ``[B]`` bool (the lung mask
    is warped along so the draws stay as they were, but the loss does not use it).
    """
    idx = _batch(data, train_idx, config.batch_size, gen)
    image, lung, soft, binary = (
        torch.from_numpy(np.ascontiguousarray(a[idx], dtype=np.float32))[:, None].to(device)
        for a in (data.images, data.lungs > 0, data.soft, data.binary)
    )  # each [B, 1, H, W]
    sets = data.sets[idx]
    is_high = torch.from_numpy(sets == "high").to(device)
    contrast = torch.from_numpy(sets != "mid").to(device)
    if config.synth_lesion_p > 0:  # painted slices join the targets and leave the contrastive term
        lesions = paint_slice_lesions(image, lung, gen, data.hu_scale, config.synth_lesion_p)
        image, binary = lesions.image, torch.maximum(binary, lesions.mask)
        rise = lesions.rise / data.hu_scale.unit_of_hu_difference(SOFT_SCALE_HU)
        soft = torch.maximum(soft, rise.clamp(0.0, 1.0))
        contrast = contrast & ~lesions.painted
    if config.augment:
        image, (lung, soft, binary) = augment_batch(
            image, [lung, soft, binary], gen, data.hu_scale, config.max_rotation_deg, config.scale_range,
            config.gain_jitter, config.offset_jitter_hu, config.noise_std_hu,
            blur_p=config.blur_p, blur_sigma_px=config.blur_sigma_px, display_p=config.display_p,
            display=_display_rendering(config),
        )  # fmt: skip
        binary = (binary >= 0.5).float()
    return image, soft, binary, is_high, contrast


def _display_rendering(config: SegTrainConfig) -> DisplayRendering:
    """The display-slice augmentation's draws (HU) of `config`."""
    return DisplayRendering(
        center_hu=config.display_center_hu, width_hu=config.display_width_hu, gamma=config.display_gamma,
        assumed_window_hu=config.display_assumed_window_hu,
    )  # fmt: skip


def _volume_dice(pred: np.ndarray, target: np.ndarray, case_ids: np.ndarray) -> list[float]:
    """Dice per case over its slices (volume-level, not per slice)."""
    out = []
    for case in sorted(set(case_ids)):
        sel = case_ids == case
        p, t = pred[sel], target[sel] > 0
        tp = int((p & t).sum())
        out.append(dice(tp, int((p & ~t).sum()), int((~p & t).sum())))
    return out


def evaluate_slices(model, data: SliceSet, idx: np.ndarray, threshold: float, device) -> dict:
    """Validation: per-case Dice against pseudo-masks (and references when present)."""
    if len(idx) == 0:
        return {}
    probs = predict_probabilities(model, data.images[idx], device)
    pred = (probs >= threshold) & (data.lungs[idx] > 0)
    result = {"val_dice_pseudo": float(np.mean(_volume_dice(pred, data.binary[idx], data.case_ids[idx])))}
    if data.refs is not None:
        covid = np.array([row["group"] == "covid" for row in data.index])[idx]
        if covid.any():
            ref = _volume_dice(pred[covid], data.refs[idx][covid], data.case_ids[idx][covid])
            result["ref_dice"] = float(np.mean(ref))
    return result


def _overlay(
    out_dir: Path, model, data: SliceSet, idx: np.ndarray, step: int, cfg: SegTrainConfig, device
) -> None:
    if len(idx) == 0:
        return
    pool = idx[data.sets[idx] == "high"]
    k = int((pool if len(pool) else idx)[0])
    prob = predict_probabilities(model, data.images[k : k + 1], device)[0]
    pred = (prob >= cfg.threshold) & (data.lungs[k] > 0)
    ref = data.refs[k] if data.refs is not None else None
    panels(
        [data.images[k], data.binary[k].astype(np.float32), pred.astype(np.float32)],
        ["CT slice", "pseudo-mask", "prediction" + (" (red: reference)" if ref is not None else "")],
        out_dir / "plots" / f"overlay_{step:06d}.png",
        ranges=[(0.0, 0.8), (0.0, 1.0), (0.0, 1.0)],
        contours=[None, None, ref],
        suptitle=f"{data.index[k]['case_id']} z={data.index[k]['z']}, step {step}",
    )


def run_train_seg(
    masks_dir: Path,
    out_dir: Path,
    config: SegTrainConfig | None = None,
    loss_config: SegLossConfig | None = None,
    device: str = "auto",
    resume: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Train (or resume) the 2D segmenter; return the output manifest.

    Under torchrun every rank calls this; it joins the process group from the environment, trains
    with DistributedDataParallel and rank 0 alone writes the output folder (see docs/scaling.md).
    """
    with distributed.process_group(device) as torch_device:
        return _train_seg(Path(masks_dir), Path(out_dir), config, loss_config, torch_device, resume, progress)


def _train_seg(
    masks_dir: Path,
    out_dir: Path,
    config: SegTrainConfig | None,
    loss_config: SegLossConfig | None,
    device: torch.device,
    resume: bool,
    progress: Progress | None,
) -> dict:
    checkpoint_path = resume_checkpoint_path(out_dir, resume)
    data = SliceSet(masks_dir)
    config, loss_config, state = _resume(
        config or SegTrainConfig(), loss_config or SegLossConfig(), checkpoint_path, resume, device
    )
    train_idx, val_idx = data.split(config.val_fraction, config.seed)
    if len(train_idx) == 0:
        raise UsageError(masks_dir, "no training slices left after the validation split")
    run = _build_training(config, loss_config, state, device, masks_dir, data)
    log = None
    if distributed.is_main():
        settings = {"train": config.to_json(), "loss": loss_config.to_json()}
        columns = ["step", *LOSS_COLUMNS, "temperature", "val_dice_pseudo", "ref_dice", "seconds"]
        log = open_run_folder(out_dir, settings, columns, resume_step=int(state["step"]) if state else None)
    best = _train_steps(run, data, (train_idx, val_idx), out_dir, checkpoint_path, log, state, progress)
    if not distributed.is_main():
        return distributed.broadcast_object(None)  # rank 0's manifest, once it is written
    threshold = {"value": config.threshold, "source": "fixed"}
    if config.healthy_budget_percent is not None:
        threshold = calibrate_on_healthy(
            out_dir / "best.pt", data, val_idx, config.healthy_budget_percent, device
        )
    manifest = {
        "format": "covidseg.seg",
        "version": 1,
        "covidseg_version": __version__,
        "masks": portable_path(masks_dir, out_dir),
        "device": str(device),
        "arch": config.arch,
        "preset": config.preset,
        "steps": config.steps,
        "distributed": parallel_summary(config.batch_size, config.grad_accum),
        "n_train_slices": int(len(train_idx)),
        "n_val_slices": int(len(val_idx)),
        "val_cases": sorted(set(data.case_ids[val_idx])),
        "best": best,
        "threshold": threshold,
        "files": {"best": "best.pt", "checkpoint": "checkpoint.pt", "metrics": "metrics.csv"},
    }
    write_json(out_dir / "manifest.json", manifest)
    return distributed.broadcast_object(manifest)


def calibrate_on_healthy(
    model_path: Path, data: SliceSet, val_idx: np.ndarray, budget_percent: float, device
) -> dict:
    """Choose the model's probability threshold without labels and write it into `model_path`
    (best.pt): the lowest of 0.50..0.95 at which the held-out healthy cases' slices have at most
    `budget_percent` % of their lung flagged
    (:func:`~covidseg.method.pseudo_masks.healthy_probability_threshold`); the highest when none is
    that low; the threshold in the file is kept when no healthy case was held out. Returns the
    manifest's ``threshold`` record (value, source, flagged %, slices)."""
    payload = load_checkpoint(model_path)
    healthy = val_idx[data.groups[val_idx] == "healthy"]
    if len(healthy) == 0:
        return {
            "value": payload["threshold"],
            "source": "fixed: no healthy case was held out to calibrate on",
        }
    model = segmenter_from_payload(payload)
    probabilities, lungs = (
        predict_probabilities(model.to(device), data.images[healthy], device),
        data.lungs[healthy] > 0,
    )
    chosen = healthy_probability_threshold([np.zeros_like(lungs)], [probabilities], [lungs], budget_percent)
    if chosen is None:
        top = PROBABILITY_THRESHOLDS[-1]
        chosen = (top, 100.0 * float(((probabilities >= top) & lungs).sum()) / max(int(lungs.sum()), 1))
    payload["threshold"] = payload["preprocessing"]["threshold"] = chosen[0]
    save_checkpoint(model_path, payload)
    cases = len(set(data.case_ids[healthy]))
    return {
        "value": chosen[0],
        "source": f"calibrated on {len(healthy)} slices of {cases} held-out healthy cases",
        "budget_percent": budget_percent,
        "healthy_flagged_percent": chosen[1],
    }


def _resume(
    config: SegTrainConfig, loss_config: SegLossConfig, checkpoint_path: Path, resume: bool, device
) -> tuple[SegTrainConfig, SegLossConfig, dict | None]:
    """(the settings to train with, the loss settings, the checkpoint's state or None)."""
    if not resume:
        return config, loss_config, None
    state = load_checkpoint(checkpoint_path, map_location=device)
    return resumed_config(config, state["train_config"]), SegLossConfig.from_json(state["loss_config"]), state


@dataclass
class _SegTraining:
    """The model, loss module, optimizer and settings of one train-seg run, and its training step."""

    config: SegTrainConfig
    loss_config: SegLossConfig
    model: torch.nn.Module
    criterion: SegmentationLoss  # owns the contrastive head and the learnable temperature
    optimizer: torch.optim.Optimizer
    seg_step: torch.nn.Module  # _SegStep(model, criterion), DDP-wrapped under torchrun
    device: torch.device
    streams: list[int]  # this process's micro-batch streams (distributed.batch_streams)
    preprocessing: dict  # how predict must cut a CT into slices (SlicePreprocessing.to_json)

    @property
    def model_config(self) -> dict:
        return {"arch": self.config.arch, "config": segmenter_config_dict(self.model)}

    def step(self, step: int, data: SliceSet, train_idx: np.ndarray) -> dict[str, float]:
        """One optimizer step over the micro-batches (gradients all-reduced on the last one only);
        returns the mean loss parts."""
        cfg, streams = self.config, self.streams
        self.seg_step.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.lr_schedule, cfg.warmup_steps)
        self.optimizer.zero_grad(set_to_none=True)
        parts: dict[str, float] = {}
        for m, stream in enumerate(streams):
            batch = _micro_batch(data, train_idx, cfg, step_generator(cfg.seed, step, stream), self.device)
            with distributed.no_sync(self.seg_step, skip=m < len(streams) - 1):
                loss, micro_parts = self.seg_step(*batch)
                (loss / len(streams)).backward()
            for key, value in micro_parts.items():
                parts[key] = parts.get(key, 0.0) + value / len(streams)
        self.optimizer.step()
        return parts

    def model_file(self, step: int, validation: dict) -> dict:
        """The trained model as predict and export read it (best.pt)."""
        return {
            "format": MODEL_FORMAT,
            "covidseg_version": __version__,
            "step": step,
            "model": self.model_config,
            "weights": self.model.state_dict(),
            "threshold": self.config.threshold,
            "validation": validation,
            "preprocessing": self.preprocessing,
        }

    def checkpoint(self, step: int, best: dict) -> dict:
        """The full state a --resume continues from (checkpoint.pt)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "covidseg_version": __version__,
            "step": step,
            "train_config": self.config.to_json(),
            "loss_config": self.loss_config.to_json(),
            "model_config": self.model_config,
            "model": self.model.state_dict(),
            "loss": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best": best,
            "world_size": distributed.world_size(),
        }


def _build_training(
    config: SegTrainConfig, loss_config: SegLossConfig, state: dict | None, device, masks_dir, data
) -> _SegTraining:
    """The seeded segmenter, its loss and optimizer on `device` (from `state` when resuming),
    wrapped for DDP; refuses slices whose size the networks cannot take."""
    seed_everything(config.seed)
    try:
        model = make_segmenter(config.arch, config.preset)
    except ValueError as exc:
        raise UsageError(None, str(exc)) from None
    h, w = data.images.shape[1:]
    if h % 16 or w % 16:
        raise UsageError(masks_dir, f"slice size {h}x{w} must be a multiple of 16 for the 2D networks")
    criterion = SegmentationLoss(model.feature_dim, loss_config)
    model.to(device)
    criterion.to(device)
    params = [*model.parameters(), *criterion.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if state is not None:
        model.load_state_dict(state["model"])
        criterion.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
    distributed.seed_rank(config.seed)
    # the contrastive head and τ get no gradient when the contrastive weight is 0
    unused = loss_config.w_contrastive == 0
    seg_step = distributed.wrap(_SegStep(model, criterion), device, find_unused_parameters=unused)
    streams = distributed.batch_streams(config.grad_accum)
    preprocessing = slice_preprocessing(masks_dir, data.manifest, config.threshold).to_json()
    return _SegTraining(
        config, loss_config, model, criterion, optimizer, seg_step, device, streams, preprocessing
    )


def _train_steps(
    run: _SegTraining, data: SliceSet, split: tuple[np.ndarray, np.ndarray], out_dir: Path,
    checkpoint_path: Path, log: CsvLog | None, state: dict | None, progress: Progress | None,
) -> dict:  # fmt: skip
    """Steps after the checkpoint's (or 1) .. steps, with the log rows and, on evaluation steps,
    validation, best.pt, checkpoint.pt and plots (rank 0 writes; every rank takes part in the means
    and the sync check). Returns the best step's record."""
    config, device, main = run.config, run.device, distributed.is_main()
    train_idx, val_idx = split
    start_step = int(state["step"]) if state else 0
    best = dict(state["best"]) if state else {"val_dice_pseudo": -1.0, "step": 0}
    started = time.perf_counter()
    means = RunningMeans()
    for step in range(start_step + 1, config.steps + 1):
        parts = run.step(step, data, train_idx)
        means.add(parts)
        evaluating = step % config.eval_every == 0 or step == config.steps
        row = {"step": step, **means.pop(device)} if evaluating or step % config.log_every == 0 else None
        if evaluating:
            distributed.check_in_sync(run.seg_step, device)
        if main and evaluating:
            val = evaluate_slices(run.model, data, val_idx, config.threshold, device)
            row.update({k: round(v, 4) for k, v in val.items()})
            best = _keep_best(run, out_dir, step, val, best)
        if main and row is not None:  # before the checkpoint, so a run resumed from it has this row
            log.write({**row, "seconds": round(time.perf_counter() - started, 2)})
        if main and evaluating:
            save_checkpoint(checkpoint_path, run.checkpoint(step, best))
            _overlay(out_dir, run.model, data, val_idx, step, config, device)
            loss_curves(log.read(), LOSS_COLUMNS, out_dir / "plots" / "loss.png", title="train-seg losses")
        if progress and main:
            progress(step, config.steps, losses_text(parts))
    return best


def _keep_best(run: _SegTraining, out_dir: Path, step: int, val: dict, best: dict) -> dict:
    """best.pt becomes this step's model when its validation Dice against the held-out pseudo-masks
    is at least the best so far; without validation cases (val_fraction 0 or a single case) the
    latest model is kept. Returns the best step's record."""
    score = val.get("val_dice_pseudo")
    if score is not None and score < best["val_dice_pseudo"]:
        return best
    save_checkpoint(out_dir / "best.pt", run.model_file(step, val))
    return {"step": step, **val, "val_dice_pseudo": -1.0 if score is None else score}

"""`covidseg train-gan`: train the 3D pseudo-healthy GAN on a preprocess output.

Per step (the method's algorithm):

(a) update D on real healthy volumes vs G(COVID) (skipped when ``w_adv == 0``);
(b) update G adversarially on COVID volumes (COVID -> looks healthy);
(c) paint Perlin-noise lesions into healthy volumes and update G with the lung-masked MSE that
    restores the clean volume; optionally an identity term (healthy in -> same out).

Output folder::

    checkpoint.pt     latest full state (models, optimizers, step), atomic; --resume reads it
    generator.pt      the trained generator + its calibration, for make-masks/export
    calibration.json  the label-free pseudo-mask threshold and how it was chosen
    metrics.csv       step, losses, seconds
    plots/loss.png, plots/sample_<step>.png   (COVID input | pseudo-healthy | difference)
    config.json, manifest.json (written last)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from covidseg import __version__
from covidseg.config import GanTrainConfig
from covidseg.devices import autocast
from covidseg.errors import UsageError
from covidseg.imaging.grid import HuScale
from covidseg.inference.generator_files import GENERATOR_FORMAT
from covidseg.inference.sliding_window import run_generator
from covidseg.io.atomic import remove_stale_temps, write_json
from covidseg.learning import distributed
from covidseg.learning.loop import (
    CsvLog,
    load_checkpoint,
    resume_checkpoint_path,
    save_checkpoint,
    seed_everything,
    step_generator,
)
from covidseg.method.lesions import perlin_lesions
from covidseg.method.pseudo_masks import PseudoMaskConfig, calibrate_threshold, difference_map
from covidseg.models.gan3d import GAN_PRESETS, Discriminator3D, Generator3D
from covidseg.progress import Progress, losses_text
from covidseg.reporting.plots import loss_curves, panels
from covidseg.stages._workdir import GridCase, load_grid_cases, portable_path, read_manifest

CHECKPOINT_FORMAT = "covidseg.gan.checkpoint"
LOSS_COLUMNS = ["loss_d", "loss_adv", "loss_rec", "loss_identity", "loss_g"]


def _stack(cases: list[GridCase]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([c.image for c in cases]))[:, None]  # [N, 1, D, H, W]
    lungs = torch.from_numpy(np.stack([(c.lungs > 0).astype(np.float32) for c in cases]))[:, None]
    return images, lungs


def _sample(
    images: torch.Tensor, lungs: torch.Tensor, batch: int, crop, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of volumes (or crops centred on a random lung voxel): ([B,1,d,h,w], [B,1,d,h,w])."""
    index = torch.randint(len(images), (batch,), generator=gen)
    if crop is None:
        return images[index], lungs[index]
    size = images.shape[2:]
    out_i, out_l = [], []
    for i in index.tolist():
        lung_voxels = torch.nonzero(lungs[i, 0])
        centre = (
            lung_voxels[torch.randint(len(lung_voxels), (1,), generator=gen)][0] if len(lung_voxels) else None
        )
        start = []
        for axis in range(3):
            c = int(centre[axis]) if centre is not None else size[axis] // 2
            start.append(min(max(0, c - crop[axis] // 2), size[axis] - crop[axis]))
        sl = (i, slice(None)) + tuple(slice(s, s + n) for s, n in zip(start, crop, strict=True))
        out_i.append(images[sl])
        out_l.append(lungs[sl])
    return torch.stack(out_i), torch.stack(out_l)


def _adversarial(logits: torch.Tensor, real: bool, kind: str) -> torch.Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.mse_loss(logits, target)  # least squares GAN


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (((a - b) ** 2) * mask).sum() / mask.sum().clamp_min(1.0)


def build_models(config: GanTrainConfig) -> tuple[Generator3D, Discriminator3D]:
    if config.preset not in GAN_PRESETS:
        raise UsageError(None, f"--preset must be one of {', '.join(GAN_PRESETS)}")
    preset = GAN_PRESETS[config.preset]
    gen_cfg = replace(preset.generator, latent_noise=config.latent_noise)
    return Generator3D(gen_cfg), Discriminator3D(preset.discriminator)


def _check_grid(grid: tuple[int, ...], config: GanTrainConfig, divisor: tuple[int, ...]) -> None:
    for name, size in (("grid", grid), ("crop", config.crop)):
        if size is None:
            continue
        if any(s % d for s, d in zip(size, divisor, strict=True)):
            raise UsageError(None, f"{name} {tuple(size)} must be a multiple of {divisor} for this generator")
    if config.crop is not None and any(c > g for c, g in zip(config.crop, grid, strict=True)):
        raise UsageError(None, f"crop {config.crop} is larger than the grid {tuple(grid)}")


def _write_plots(
    out_dir: Path, log: CsvLog, model: Generator3D, sample: GridCase, step: int, device, window
) -> None:
    rows = log.read()
    if rows:
        loss_curves(rows, LOSS_COLUMNS, out_dir / "plots" / "loss.png", title="train-gan losses")
    healthy = run_generator(model, sample.image, sample.lungs > 0, device, seed=0, window=window)
    z = int(np.argmax((sample.lungs > 0).sum(axis=(1, 2))))
    diff = np.clip(sample.image[z] - healthy[z], 0, None)
    panels(
        [sample.image[z], healthy[z], diff],
        ["COVID input", "pseudo-healthy", "difference (positive)"],
        out_dir / "plots" / f"sample_{step:06d}.png",
        ranges=[(0.0, 0.8), (0.0, 0.8), (0.0, 0.3)],
        cmaps=["gray", "gray", "magma"],
        suptitle=f"{sample.case_id}, slice {z}, step {step}",
    )


def _refuse_other_hu_scale(checkpoint_path: Path, state: dict, hu_scale: HuScale) -> None:
    """A run resumes only on grids of the HU window it started on (a checkpoint without one is from
    before it was recorded: the default window)."""
    trained = HuScale.from_json(state.get("hu_window"))
    if trained != hu_scale:
        raise UsageError(checkpoint_path, f"trained on HU window {trained}, these grids use {hu_scale}")


def _calibrate(
    model, healthy: list[GridCase], device, mask_config: PseudoMaskConfig, window, scale: HuScale
) -> dict:
    """Label-free threshold (on the grids' HU `scale`) from the difference maps on the healthy
    training volumes; `window` is the generator's spatial window (voxels)."""
    diffs, lungs = [], []
    for case in healthy:
        pseudo = run_generator(model, case.image, case.lungs > 0, device, seed=0, window=window)
        diffs.append(difference_map(case.image, pseudo, case.lungs, mask_config.smooth_sigma))
        lungs.append(case.lungs)
    threshold = calibrate_threshold(diffs, lungs, mask_config, scale)
    flagged = [
        float(((d > threshold) & (lung > 0)).sum() / max((lung > 0).sum(), 1))
        for d, lung in zip(diffs, lungs, strict=True)
    ]
    return {
        "threshold": threshold,
        "healthy_percentile": mask_config.healthy_percentile,
        "smooth_sigma": mask_config.smooth_sigma,
        "min_component": mask_config.min_component,
        "n_healthy": len(healthy),
        "healthy_lung_flagged_before_component_filter": float(np.mean(flagged)) if flagged else None,
    }


@dataclass
class _Micro:
    """One micro-batch of a training step and the random stream it was drawn from.

    The stream goes on to draw the latent noise and the Perlin lesions of the same micro-batch, in
    the order an unsplit step always drew them.
    """

    gen: torch.Generator
    h_img: torch.Tensor  # [b, 1, d, h, w] healthy volumes (or crops), [0, 1] scale
    h_lung: torch.Tensor  # [b, 1, d, h, w] their lung masks as float {0, 1}
    c_img: torch.Tensor | None  # [b, 1, d, h, w] COVID volumes; None without the adversarial term
    c_lung: torch.Tensor | None


def _draw(
    healthy: tuple[torch.Tensor, torch.Tensor],
    covid: tuple[torch.Tensor, torch.Tensor] | None,
    config: GanTrainConfig,
    gen: torch.Generator,
    device: torch.device,
) -> _Micro:
    """Sample one micro-batch (healthy first, then COVID) from `gen` onto `device`."""
    h_img, h_lung = (t.to(device) for t in _sample(*healthy, config.batch_size, config.crop, gen))
    c_img = c_lung = None
    if covid is not None:
        c_img, c_lung = (t.to(device) for t in _sample(*covid, config.batch_size, config.crop, gen))
    return _Micro(gen, h_img, h_lung, c_img, c_lung)


def _update_d(
    micros: list[_Micro], generator: Generator3D, d_model: torch.nn.Module, opt_d, config, device
) -> float:
    """(a) One D step on real healthy vs G(COVID), gradients summed over the micro-batches (all-reduced
    over ranks on the last one only); returns the mean D loss."""
    k = len(micros)
    opt_d.zero_grad(set_to_none=True)
    total = 0.0
    for m, mb in enumerate(micros):
        with distributed.no_sync(d_model, skip=m < k - 1), autocast(device):
            with torch.no_grad():
                fake, _ = generator(mb.c_img, mb.c_lung, noise_generator=mb.gen)
            loss_d = 0.5 * (
                _adversarial(d_model(mb.h_img, mb.h_lung), True, config.adversarial)
                + _adversarial(d_model(fake, mb.c_lung), False, config.adversarial)
            )
            (loss_d / k).backward()
        total += loss_d.item()
    opt_d.step()
    return total / k


def _update_g(
    micros: list[_Micro], g_model: torch.nn.Module, discriminator: Discriminator3D, opt_g, config, device,
    hu_scale: HuScale,
) -> dict[str, float]:  # fmt: skip
    """(b) adversarial term on COVID volumes and (c) restoration of Perlin-corrupted healthy ones: one
    G step over the micro-batches; returns the mean losses. The synthetic lesions get their HU on the
    grids' scale, the preprocess `hu_scale`."""
    k = len(micros)
    generator = distributed.unwrap(g_model)
    opt_g.zero_grad(set_to_none=True)
    means: dict[str, float] = {}
    for m, mb in enumerate(micros):
        parts = {"loss_adv": 0.0, "loss_identity": 0.0}
        with distributed.no_sync(g_model, skip=m < k - 1):
            with autocast(device):
                corrupted, _ = perlin_lesions(mb.h_img, mb.h_lung, mb.gen, scale=hu_scale)
                restored, _ = g_model(corrupted, mb.h_lung, noise_generator=mb.gen)
                gate = generator.gate(mb.h_lung)
                loss_rec = _masked_mse(restored.float(), mb.h_img, gate)
                loss_g = config.w_rec * loss_rec
                if mb.c_img is not None:
                    fake, _ = g_model(mb.c_img, mb.c_lung, noise_generator=mb.gen)
                    # the plain D (not its DDP wrapper): its gradients from this term are never used
                    loss_adv = _adversarial(discriminator(fake, mb.c_lung), True, config.adversarial)
                    loss_g = loss_g + config.w_adv * loss_adv
                    parts["loss_adv"] = loss_adv.item()
                if config.w_identity > 0:
                    same, _ = g_model(mb.h_img, mb.h_lung, noise_generator=mb.gen)
                    loss_id = _masked_mse(same.float(), mb.h_img, gate)
                    loss_g = loss_g + config.w_identity * loss_id
                    parts["loss_identity"] = loss_id.item()
            (loss_g / k).backward()
        parts.update(loss_rec=loss_rec.item(), loss_g=loss_g.item())
        for key, value in parts.items():
            means[key] = means.get(key, 0.0) + value / k
    opt_g.step()
    return means


def run_train_gan(
    pre_dir: Path,
    out_dir: Path,
    config: GanTrainConfig | None = None,
    device: str = "auto",
    resume: bool = False,
    mask_config: PseudoMaskConfig | None = None,
    progress: Progress | None = None,
) -> dict:
    """Train (or resume) the GAN; return the output manifest.

    Under torchrun every rank calls this; it joins the process group from the environment, trains
    with DistributedDataParallel and rank 0 alone writes the output folder (see docs/scaling.md).
    """
    with distributed.process_group(device) as torch_device:
        return _train_gan(Path(pre_dir), Path(out_dir), config, torch_device, resume, mask_config, progress)


def _train_gan(
    pre_dir: Path,
    out_dir: Path,
    config: GanTrainConfig | None,
    torch_device: torch.device,
    resume: bool,
    mask_config: PseudoMaskConfig | None,
    progress: Progress | None,
) -> dict:
    config = config or GanTrainConfig()
    mask_config = mask_config or PseudoMaskConfig()
    main = distributed.is_main()
    checkpoint_path = resume_checkpoint_path(out_dir, resume)

    cases = load_grid_cases(pre_dir)
    pre_config = read_manifest(pre_dir, "covidseg.preprocess")["config"]
    hu_scale = HuScale.from_json(pre_config["hu_window"])  # the [0, 1] scale of the grids
    healthy = [c for c in cases if c.group == "healthy"]
    covid = [c for c in cases if c.group == "covid"]
    if not healthy:
        raise UsageError(pre_dir, "no healthy cases: the restoration loss and D need healthy volumes")
    if not covid and config.w_adv > 0:
        raise UsageError(pre_dir, "no COVID cases for the adversarial term (or set w_adv to 0)")

    start_step = 0
    state = None
    if resume:
        state = load_checkpoint(checkpoint_path, map_location=torch_device)
        _refuse_other_hu_scale(checkpoint_path, state, hu_scale)
        # steps and grad_accum are taken from this call: a run may resume on another number of processes
        overrides = {"steps": config.steps, "grad_accum": config.grad_accum}
        config = GanTrainConfig.from_json({**state["train_config"], **overrides})
        start_step = int(state["step"])
    seed_everything(config.seed)
    generator, discriminator = build_models(config)
    _check_grid(healthy[0].image.shape, config, generator.config.divisor)
    generator.to(torch_device)
    discriminator.to(torch_device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr_g, betas=config.betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr_d, betas=config.betas)
    if state is not None:
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
    distributed.seed_rank(config.seed)
    use_adv = config.w_adv > 0
    g_model = distributed.wrap(generator, torch_device)
    d_model = distributed.wrap(discriminator, torch_device) if use_adv else discriminator

    log = None
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "manifest.json").unlink(missing_ok=True)
        for folder in (out_dir, out_dir / "plots"):  # what a killed run left half-written
            remove_stale_temps(folder)
        write_json(out_dir / "config.json", {"train": config.to_json(), "pseudo_mask": asdict(mask_config)})
        log = CsvLog(
            out_dir / "metrics.csv",
            ["step", *LOSS_COLUMNS, "seconds"],
            keep_until_step=start_step if resume else None,
        )

    h_data = _stack(healthy)
    c_data = _stack(covid) if use_adv else None
    model_config = {"generator": asdict(generator.config), "discriminator": asdict(discriminator.config)}
    world = distributed.world_size()
    parallel = {
        "world_size": world,
        "grad_accum": config.grad_accum,
        "global_batch_size": config.batch_size * world * config.grad_accum,
    }
    streams = distributed.batch_streams(config.grad_accum)

    def save(step: int) -> None:
        save_checkpoint(
            checkpoint_path,
            {
                "format": CHECKPOINT_FORMAT,
                "covidseg_version": __version__,
                "step": step,
                "train_config": config.to_json(),
                "hu_window": hu_scale.to_json(),  # the grids' HU scale (a resume must use the same)
                "model": model_config,
                "world_size": world,
                "generator": generator.state_dict(),
                "discriminator": discriminator.state_dict(),
                "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(),
            },
        )

    started = time.perf_counter()
    sums: dict[str, float] = {}
    for step in range(start_step + 1, config.steps + 1):
        g_model.train()
        d_model.train()
        micros = [
            _draw(h_data, c_data, config, step_generator(config.seed, step, s), torch_device) for s in streams
        ]
        losses = {
            "loss_d": _update_d(micros, generator, d_model, opt_d, config, torch_device) if use_adv else 0.0
        }
        losses.update(_update_g(micros, g_model, discriminator, opt_g, config, torch_device, hu_scale))
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + value
        if step % config.log_every == 0 or step == config.steps:
            n = config.log_every if step % config.log_every == 0 else step % config.log_every
            means = distributed.mean_over_ranks({k: v / n for k, v in sums.items()}, torch_device)
            if main:
                row = {"step": step, **{k: round(v, 6) for k, v in means.items()}}
                row["seconds"] = round(time.perf_counter() - started, 2)
                log.write(row)
            sums = {}
        if step % config.checkpoint_every == 0 or step == config.steps:
            distributed.check_in_sync(generator, torch_device)
            distributed.check_in_sync(discriminator, torch_device)
            if main:
                save(step)
        if main and (step % config.sample_every == 0 or step == config.steps):
            sample = covid[0] if covid else healthy[0]
            _write_plots(out_dir, log, generator, sample, step, torch_device, config.crop)
        if progress and main:
            progress(step, config.steps, losses_text(losses))

    manifest = None
    if main:
        calibration = _calibrate(generator, healthy, torch_device, mask_config, config.crop, hu_scale)
        write_json(out_dir / "calibration.json", calibration)
        save_checkpoint(
            out_dir / "generator.pt",
            {
                "format": GENERATOR_FORMAT,
                "covidseg_version": __version__,
                "step": config.steps,
                "model": model_config,
                "generator": generator.state_dict(),
                "calibration": calibration,
                "preprocess": pre_config,  # with its hu_window: make-masks refuses grids of another
                "train_config": config.to_json(),
            },
        )
        manifest = {
            "format": "covidseg.gan",
            "version": 1,
            "covidseg_version": __version__,
            "preprocess": portable_path(pre_dir, out_dir),
            "device": str(torch_device),
            "steps": config.steps,
            "distributed": parallel,
            "n_healthy": len(healthy),
            "n_covid": len(covid),
            "hu_window": hu_scale.to_json(),
            "calibration": calibration,
            "files": {"generator": "generator.pt", "checkpoint": "checkpoint.pt", "metrics": "metrics.csv"},
        }
        write_json(out_dir / "manifest.json", manifest)
    return distributed.broadcast_object(manifest)  # the other ranks wait here for rank 0

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

from covidseg import __version__
from covidseg.config import GanTrainConfig
from covidseg.devices import autocast
from covidseg.errors import UsageError
from covidseg.imaging.grid import HuScale
from covidseg.inference.generator_files import GENERATOR_FORMAT
from covidseg.inference.sliding_window import run_generator
from covidseg.io.atomic import write_json
from covidseg.learning import distributed
from covidseg.learning.loop import (
    CsvLog,
    RunningMeans,
    load_checkpoint,
    open_run_folder,
    parallel_summary,
    resume_checkpoint_path,
    resumed_config,
    save_checkpoint,
    seed_everything,
    step_generator,
)
from covidseg.learning.losses import adversarial_loss, masked_mse
from covidseg.method.lesions import perlin_lesions
from covidseg.method.pseudo_masks import PseudoMaskConfig, calibration_record, difference_map
from covidseg.models.gan3d import GAN_PRESETS, Discriminator3D, Generator3D, to_device
from covidseg.progress import Progress, losses_text
from covidseg.reporting.plots import loss_curves, panels
from covidseg.stages._workdir import (
    GridCase,
    load_grid_cases,
    portable_path,
    read_manifest,
    refuse_other_hu_scale,
)

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
    return calibration_record(diffs, lungs, mask_config, scale)


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
                adversarial_loss(d_model(mb.h_img, mb.h_lung), True, config.adversarial)
                + adversarial_loss(d_model(fake, mb.c_lung), False, config.adversarial)
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
                corrupted, _ = perlin_lesions(mb.h_img, mb.h_lung, mb.gen, config.lesions, scale=hu_scale)
                restored, _ = g_model(corrupted, mb.h_lung, noise_generator=mb.gen)
                gate = generator.gate(mb.h_lung)
                loss_rec = masked_mse(restored.float(), mb.h_img, gate)
                loss_g = config.w_rec * loss_rec
                if mb.c_img is not None:
                    fake, _ = g_model(mb.c_img, mb.c_lung, noise_generator=mb.gen)
                    # the plain D (not its DDP wrapper): its gradients from this term are never used
                    loss_adv = adversarial_loss(discriminator(fake, mb.c_lung), True, config.adversarial)
                    loss_g = loss_g + config.w_adv * loss_adv
                    parts["loss_adv"] = loss_adv.item()
                if config.w_identity > 0:
                    same, _ = g_model(mb.h_img, mb.h_lung, noise_generator=mb.gen)
                    loss_id = masked_mse(same.float(), mb.h_img, gate)
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
    device: torch.device,
    resume: bool,
    mask_config: PseudoMaskConfig | None,
    progress: Progress | None,
) -> dict:
    config = config or GanTrainConfig()
    mask_config = mask_config or PseudoMaskConfig()
    checkpoint_path = resume_checkpoint_path(out_dir, resume)
    data = _load_data(pre_dir, config)
    config, state, start_step = _resume(config, checkpoint_path, resume, device, (pre_dir, data.hu_scale))
    run = _build_training(config, state, device, data.healthy[0].image.shape)
    log = None
    if distributed.is_main():
        settings = {"train": config.to_json(), "pseudo_mask": asdict(mask_config)}
        columns = ["step", *LOSS_COLUMNS, "seconds"]
        log = open_run_folder(out_dir, settings, columns, resume_step=start_step if resume else None)
    _train_steps(run, data, out_dir, checkpoint_path, log, start_step, progress)
    manifest = _finish(run, data, pre_dir, out_dir, mask_config) if distributed.is_main() else None
    return distributed.broadcast_object(manifest)  # the other ranks wait here for rank 0


@dataclass
class _GanData:
    """The preprocess output a GAN trains on."""

    healthy: list[GridCase]
    covid: list[GridCase]
    pre_config: dict  # the preprocess settings, as its manifest holds them (generator.pt keeps them)
    hu_scale: HuScale  # the [0, 1] scale of the grids


def _load_data(pre_dir: Path, config: GanTrainConfig) -> _GanData:
    cases = load_grid_cases(pre_dir)
    pre_config = read_manifest(pre_dir, "covidseg.preprocess")["config"]
    healthy = [c for c in cases if c.group == "healthy"]
    covid = [c for c in cases if c.group == "covid"]
    if not healthy:
        raise UsageError(pre_dir, "no healthy cases: the restoration loss and D need healthy volumes")
    if not covid and config.w_adv > 0:
        raise UsageError(pre_dir, "no COVID cases for the adversarial term (or set w_adv to 0)")
    return _GanData(healthy, covid, pre_config, HuScale.from_json(pre_config["hu_window"]))


def _resume(
    config: GanTrainConfig, checkpoint_path: Path, resume: bool, device: torch.device, grids: tuple
) -> tuple[GanTrainConfig, dict | None, int]:
    """(the settings to train with, the checkpoint's state or None, the last step done); `grids`:
    (the preprocess folder, its HU scale), which the checkpoint must have been trained on."""
    if not resume:
        return config, None, 0
    state = load_checkpoint(checkpoint_path, map_location=device)
    pre_dir, hu_scale = grids
    refuse_other_hu_scale(checkpoint_path, state.get("hu_window"), hu_scale, pre_dir)
    return resumed_config(config, state["train_config"]), state, int(state["step"])


@dataclass
class _GanTraining:
    """The models, optimizers and settings of one train-gan run, and its training step."""

    config: GanTrainConfig
    generator: Generator3D
    discriminator: Discriminator3D
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    g_model: torch.nn.Module  # the generator, DDP-wrapped under torchrun
    d_model: torch.nn.Module  # the discriminator, DDP-wrapped when it is trained (w_adv > 0)
    device: torch.device
    streams: list[int]  # this process's micro-batch streams (distributed.batch_streams)

    @property
    def model_config(self) -> dict:
        """The architecture of both networks (checkpoint.pt and generator.pt record it)."""
        return {
            "generator": asdict(self.generator.config),
            "discriminator": asdict(self.discriminator.config),
        }

    def step(self, step: int, healthy, covid, hu_scale: HuScale) -> dict[str, float]:
        """One optimizer step of D (when adversarial) and G; `healthy`, `covid`: the stacked
        (images, lungs) of :func:`_stack` (covid None without the adversarial term)."""
        cfg = self.config
        self.g_model.train()
        self.d_model.train()
        micros = [
            _draw(healthy, covid, cfg, step_generator(cfg.seed, step, s), self.device) for s in self.streams
        ]
        losses = {"loss_d": 0.0}
        if covid is not None:  # the adversarial term is on: D is trained
            losses["loss_d"] = _update_d(micros, self.generator, self.d_model, self.opt_d, cfg, self.device)
        g_losses = _update_g(micros, self.g_model, self.discriminator, self.opt_g, cfg, self.device, hu_scale)
        losses.update(g_losses)
        return losses

    def checkpoint(self, step: int, hu_scale: HuScale) -> dict:
        """The full state a --resume continues from (checkpoint.pt)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "covidseg_version": __version__,
            "step": step,
            "train_config": self.config.to_json(),
            "hu_window": hu_scale.to_json(),  # the grids' HU scale (a resume must use the same)
            "model": self.model_config,
            "world_size": distributed.world_size(),
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
        }


def _build_training(
    config: GanTrainConfig, state: dict | None, device: torch.device, grid: tuple[int, ...]
) -> _GanTraining:
    """Seeded models and optimizers on `device` (from `state` when resuming), wrapped for DDP."""
    seed_everything(config.seed)
    generator, discriminator = build_models(config)
    _check_grid(grid, config, generator.config.divisor)
    to_device(generator, device)
    to_device(discriminator, device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr_g, betas=config.betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr_d, betas=config.betas)
    if state is not None:
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
    distributed.seed_rank(config.seed)
    g_model = distributed.wrap(generator, device)
    d_model = distributed.wrap(discriminator, device) if config.w_adv > 0 else discriminator
    streams = distributed.batch_streams(config.grad_accum)
    return _GanTraining(config, generator, discriminator, opt_g, opt_d, g_model, d_model, device, streams)


def _train_steps(
    run: _GanTraining, data: _GanData, out_dir: Path, checkpoint_path: Path, log: CsvLog | None,
    start_step: int, progress: Progress | None,
) -> None:  # fmt: skip
    """Steps start_step + 1 .. steps, with the log rows, checkpoints and sample plots on their steps
    (rank 0 writes; every rank takes part in the means and the sync checks)."""
    config, device, main = run.config, run.device, distributed.is_main()
    healthy = _stack(data.healthy)
    covid = _stack(data.covid) if config.w_adv > 0 else None
    started = time.perf_counter()
    means = RunningMeans()
    for step in range(start_step + 1, config.steps + 1):
        losses = run.step(step, healthy, covid, data.hu_scale)
        means.add(losses)
        last = step == config.steps
        if step % config.log_every == 0 or last:
            row = {"step": step, **means.pop(device)}
            if main:
                log.write({**row, "seconds": round(time.perf_counter() - started, 2)})
        if step % config.checkpoint_every == 0 or last:
            distributed.check_in_sync(run.generator, device)
            distributed.check_in_sync(run.discriminator, device)
            if main:
                save_checkpoint(checkpoint_path, run.checkpoint(step, data.hu_scale))
        if main and (step % config.sample_every == 0 or last):
            sample = data.covid[0] if data.covid else data.healthy[0]
            _write_plots(out_dir, log, run.generator, sample, step, device, config.crop)
        if progress and main:
            progress(step, config.steps, losses_text(losses))


def _finish(run: _GanTraining, data: _GanData, pre_dir: Path, out_dir: Path, mask_config) -> dict:
    """Rank 0, after the last step: calibration.json, generator.pt, and manifest.json (last)."""
    config = run.config
    calibration = _calibrate(run.generator, data.healthy, run.device, mask_config, config.crop, data.hu_scale)
    write_json(out_dir / "calibration.json", calibration)
    save_checkpoint(
        out_dir / "generator.pt",
        {
            "format": GENERATOR_FORMAT,
            "covidseg_version": __version__,
            "step": config.steps,
            "model": run.model_config,
            "generator": run.generator.state_dict(),
            "calibration": calibration,
            "preprocess": data.pre_config,  # with its hu_window: make-masks refuses grids of another
            "train_config": config.to_json(),
        },
    )
    manifest = {
        "format": "covidseg.gan",
        "version": 1,
        "covidseg_version": __version__,
        "preprocess": portable_path(pre_dir, out_dir),
        "device": str(run.device),
        "steps": config.steps,
        "distributed": parallel_summary(config.batch_size, config.grad_accum),
        "n_healthy": len(data.healthy),
        "n_covid": len(data.covid),
        "hu_window": data.hu_scale.to_json(),
        "calibration": calibration,
        "files": {"generator": "generator.pt", "checkpoint": "checkpoint.pt", "metrics": "metrics.csv"},
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest

"""The `covidseg` command line: one thin function per subcommand.

Each command parses and validates its options, calls one stage, prints a short rich summary and maps
errors to exit codes: 0 ok, 1 a case failed or a threshold was not met, 2 usage error. Heavy
imports (torch, SimpleITK) happen inside the commands so that `covidseg --help` is instant.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from covidseg import __version__
from covidseg.errors import CovidsegError, UsageError

app = typer.Typer(
    name="covidseg",
    help="Label-free COVID-19 lesion segmentation on chest CT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()


def _version(value: bool) -> None:
    if value:
        out.print(f"covidseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Label-free COVID-19 lesion segmentation on chest CT."""


def _fail(exc: CovidsegError) -> None:
    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def _triple(text: str, kind: type, name: str) -> tuple:
    """Parse 'A,B,C' into a tuple of three numbers (z, y, x)."""
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise UsageError(None, f"{name} must be three numbers 'Z,Y,X', got {text!r}") from None
    if len(values) != 3 or any(v <= 0 for v in values):
        raise UsageError(None, f"{name} must be three positive numbers 'Z,Y,X', got {text!r}")
    return values


def _pair(text: str, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(None, f"{name} must be two numbers 'LO,HI', got {text!r}") from None
    return lo, hi


@contextlib.contextmanager
def _progress(total: int, description: str, enabled: bool) -> Iterator[Callable[[str], None]]:
    """A rich progress bar advanced by a callback that takes one message per finished item."""
    if not enabled or total == 0:
        yield lambda message: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[last]}"),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total, last="")
        yield lambda message: bar.update(task, advance=1, last=message)


NoProgress = Annotated[bool, typer.Option("--no-progress", help="No progress bar (batch jobs, logs).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in OUTPUT.")]


@app.command()
def synth(
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write the phantoms to.")],
    healthy: Annotated[int, typer.Option(help="Number of healthy phantoms.")] = 2,
    covid: Annotated[int, typer.Option(help="Number of COVID phantoms (with lesion masks).")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed; other seeds give unseen cases.")] = 0,
    shape: Annotated[str, typer.Option(help="Volume size in voxels 'Z,Y,X'.")] = "64,256,256",
    spacing: Annotated[
        str, typer.Option(help="Voxel size in mm 'Z,Y,X' (5 mm clinical slices).")
    ] = "5,1.4,1.4",
    montage: Annotated[bool, typer.Option("--montage", help="Also write a PNG montage per case.")] = False,
    no_progress: NoProgress = False,
) -> None:
    """Make synthetic chest-CT phantoms (HU) with lung and lesion ground truth."""
    try:
        shape_zyx = _triple(shape, int, "--shape")
        spacing_zyx = _triple(spacing, float, "--spacing")
        from covidseg.stages.synth import run_synth

        with _progress(healthy + covid, "synth", not no_progress) as advance:
            manifest = run_synth(
                output, healthy, covid, seed, shape_zyx, spacing_zyx, montage=montage, progress=advance
            )
    except CovidsegError as exc:
        _fail(exc)
    out.print(f"wrote {len(manifest['cases'])} phantoms to {output} (manifest.json)")


@app.command()
def preprocess(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (e.g. WORK/pre).")],
    healthy: Annotated[Path | None, typer.Option(help="Healthy CTs: a file or a folder (recursive).")] = None,
    covid: Annotated[Path | None, typer.Option(help="COVID CTs: a file or a folder (recursive).")] = None,
    masks: Annotated[
        Path | None, typer.Option(help="Reference lesion masks, matched by case id (for evaluate).")
    ] = None,
    grid: Annotated[str, typer.Option(help="Network grid in voxels 'Z,Y,X'.")] = "32,128,128",
    hu_window: Annotated[str, typer.Option(help="HU clip window 'LO,HI' before scaling to [0,1].")] = (
        "-1000,400"
    ),
    intensity: Annotated[
        str | None,
        typer.Option(help="Map non-HU images to HU: 'window:LO,HI' (0..255 -> LO..HI) or 'linear:A,B'."),
    ] = None,
    series: Annotated[str | None, typer.Option(help="DICOM SeriesInstanceUID to read.")] = None,
    workers: Annotated[int, typer.Option(help="Cases processed in parallel.")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous output.")] = False,
    no_progress: NoProgress = False,
) -> None:
    """CTs -> lung-cropped, HU-windowed, fixed-size arrays + lung masks + manifest."""
    try:
        from covidseg.config import PreprocessConfig
        from covidseg.intensity import parse_intensity

        try:
            config = PreprocessConfig(
                grid=_triple(grid, int, "--grid"), hu_window=_pair(hu_window, "--hu-window")
            )
            mapping = parse_intensity(intensity) if intensity else None
        except ValueError as exc:
            raise UsageError(None, str(exc)) from None
        if workers < 1:
            raise UsageError(None, "--workers must be >= 1")
        from covidseg.stages.preprocess import collect_inputs, run_preprocess

        total = len(collect_inputs(healthy, covid, masks, allow_2d=mapping is not None))
        with _progress(total, "preprocess", not no_progress) as advance:
            result = run_preprocess(
                output, healthy, covid, masks, config, workers, series, mapping, overwrite, advance
            )
    except CovidsegError as exc:
        _fail(exc)
    for note in result.notes:
        console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    for failure in result.failures:
        console.print(f"[red]failed:[/] {escape(failure['error'])}", highlight=False, soft_wrap=True)
    n_ok = len(result.manifest["cases"])
    out.print(
        f"preprocessed {n_ok} case(s) into {escape(str(output))}; {len(result.failures)} failed",
        soft_wrap=True,
    )
    if result.failures:
        raise typer.Exit(1)


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Option(help="Folder of predicted masks (NIfTI/MHA/NRRD).")],
    ref: Annotated[Path, typer.Option(help="Folder of reference masks, or a synth manifest.json.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for metrics.csv and summary.json.")],
    min_dice: Annotated[float | None, typer.Option(help="Exit 1 if mean Dice is below this.")] = None,
    min_sensitivity: Annotated[
        float | None, typer.Option(help="Exit 1 if mean sensitivity is below.")
    ] = None,
    min_specificity: Annotated[
        float | None, typer.Option(help="Exit 1 if mean specificity is below.")
    ] = None,
    per_slice: Annotated[bool, typer.Option("--per-slice", help="Also Dice over lesion slices.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous report.")] = False,
    no_progress: NoProgress = False,
) -> None:
    """Dice, sensitivity, specificity, IoU, HD95 and volumes per case and pooled."""
    try:
        from covidseg.stages.evaluate import run_evaluate

        with _progress(0, "evaluate", False) as advance:
            result = run_evaluate(
                pred, ref, output, min_dice, min_sensitivity, min_specificity, per_slice, progress=advance,
                overwrite=overwrite,
            )  # fmt: skip
    except CovidsegError as exc:
        _fail(exc)
    _print_evaluation(result)
    if not result.ok:
        raise typer.Exit(1)


@app.command("train-gan")
def train_gan(
    pre: Annotated[Path, typer.Argument(help="A preprocess output folder (healthy + COVID cases).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (e.g. WORK/gan).")],
    preset: Annotated[
        str, typer.Option(help="Model size: tiny (2 CPU cores), small (GPU), base (GPU).")
    ] = "small",
    steps: Annotated[int, typer.Option(help="Total training steps (with --resume: the new total).")] = 900,
    batch_size: Annotated[
        int, typer.Option(help="Volumes per step and process (global batch: × processes × K).")
    ] = 2,
    grad_accum: Annotated[
        int, typer.Option(help="K: micro-batches whose gradients are summed per optimizer step.")
    ] = 1,
    crop: Annotated[
        str, typer.Option(help="Training crop 'Z,Y,X', 'none' (whole grids) or 'auto' (tiny: 16,64,64).")
    ] = "auto",
    latent_noise: Annotated[str, typer.Option(help="U_N in the latent: perlin, uniform or none.")] = "perlin",
    adversarial: Annotated[str, typer.Option(help="Adversarial loss: bce or lsgan.")] = "bce",
    w_adv: Annotated[float, typer.Option(help="Weight of the adversarial term (0 = off).")] = 0.05,
    w_rec: Annotated[float, typer.Option(help="Weight of the restoration MSE.")] = 100.0,
    w_identity: Annotated[float, typer.Option(help="Weight of the identity MSE.")] = 0.0,
    lr: Annotated[float, typer.Option(help="Adam learning rate (G and D).")] = 2e-4,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint and sample PNG every N steps.")] = 100,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    resume: ResumeOpt = False,
    no_progress: NoProgress = False,
) -> None:
    """Train the 3D pseudo-healthy GAN: Î_H = De(En(I_C) + U_N)."""
    try:
        from covidseg.config import GanTrainConfig

        try:
            config = GanTrainConfig(
                preset=preset, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                crop=_gan_crop(crop, preset),
                latent_noise=latent_noise, adversarial=adversarial, w_adv=w_adv, w_rec=w_rec,
                w_identity=w_identity, lr_g=lr, lr_d=lr, seed=seed,
                checkpoint_every=checkpoint_every, sample_every=checkpoint_every,
            )  # fmt: skip
        except ValueError as exc:
            raise UsageError(None, str(exc)) from None
        from covidseg.distributed import env_rank
        from covidseg.stages.train_gan import run_train_gan

        with _step_progress(steps, "train-gan", not no_progress and env_rank() == 0) as advance:
            manifest = run_train_gan(pre, output, config, device=device, resume=resume, progress=advance)
    except CovidsegError as exc:
        _fail(exc)
    if env_rank() > 0:  # under torchrun rank 0 reports for all
        return
    cal = manifest["calibration"]
    out.print(
        f"trained {manifest['steps']} steps on {manifest['device']}; generator: {output / 'generator.pt'}; "
        f"pseudo-mask threshold {cal['threshold']:.4f} (healthy lung percentile {cal['healthy_percentile']})"
    )


def _gan_crop(text: str, preset: str) -> tuple[int, int, int] | None:
    if text.lower() == "auto":
        from covidseg.models.gan3d import PRESET_CROPS

        return PRESET_CROPS.get(preset)
    return None if text.lower() == "none" else _triple(text, int, "--crop")


@app.command("make-masks")
def make_masks(
    pre: Annotated[Path, typer.Argument(help="A preprocess output folder.")],
    gan: Annotated[
        Path,
        typer.Option(help="A train-gan output folder, its generator.pt, or an exported generator .onnx."),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (e.g. WORK/masks).")],
    threshold: Annotated[
        float | None,
        typer.Option(help="Binary threshold on the difference (unit scale; default: calibrated)."),
    ] = None,
    high_infected: Annotated[float, typer.Option(help="Slice lesion share of lung for the high set.")] = 0.05,
    low_infected: Annotated[float, typer.Option(help="Slice lesion share of lung for the low set.")] = 0.005,
    min_component: Annotated[
        int | None, typer.Option(help="Remove components smaller than N voxels.")
    ] = None,
    native: Annotated[bool, typer.Option(help="Also write NIfTI in the source CT's geometry.")] = True,
    backend: Annotated[
        str, typer.Option(help="auto (onnx for a .onnx file, torch otherwise), torch or onnx.")
    ] = "auto",
    device: DeviceOpt = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous output.")] = False,
    no_progress: NoProgress = False,
) -> None:
    """Pseudo-healthy volumes and pseudo-masks M = I_C - Î_H; high/low-infected slice sets."""
    try:
        from dataclasses import replace

        from covidseg.masks import PseudoMaskConfig
        from covidseg.stages.make_masks import generator_calibration, run_make_masks
        from covidseg.stages.work import read_manifest

        n_cases = len(read_manifest(pre, "covidseg.preprocess")["cases"])
        calibration = generator_calibration(gan, backend)
        config = PseudoMaskConfig(
            smooth_sigma=calibration.get("smooth_sigma", PseudoMaskConfig.smooth_sigma),
            healthy_percentile=calibration.get("healthy_percentile", PseudoMaskConfig.healthy_percentile),
            min_component=calibration.get("min_component", PseudoMaskConfig.min_component),
        )
        config = replace(config, high_infected=high_infected, low_infected=low_infected)
        if min_component is not None:
            config = replace(config, min_component=min_component)
        with _progress(n_cases, "make-masks", not no_progress) as advance:
            manifest = run_make_masks(
                pre,
                gan,
                output,
                device,
                config,
                threshold,
                native=native,
                overwrite=overwrite,
                progress=advance,
                backend=backend,
            )
    except CovidsegError as exc:
        _fail(exc)
    if manifest["backend"]["kind"] == "onnx":
        console.print(f"generator on ONNX Runtime: {manifest['backend']['providers'][0]}", highlight=False)
    for failure in manifest["failed"]:
        console.print(f"[red]failed:[/] {escape(failure['error'])}", highlight=False, soft_wrap=True)
    s = manifest["slices"]
    out.print(
        f"pseudo-masks for {len(manifest['cases'])} case(s) in {output} "
        f"(threshold {manifest['threshold']:.4f}); "
        f"2D set: {s['n']} slices, {s['high']} high-infected, {s['low']} low-infected"
    )
    if manifest["failed"]:
        raise typer.Exit(1)


@app.command("train-seg")
def train_seg(
    masks: Annotated[Path, typer.Argument(help="A make-masks output folder.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (e.g. WORK/seg).")],
    arch: Annotated[str, typer.Option(help="transunet or unet (baseline).")] = "transunet",
    preset: Annotated[str, typer.Option(help="tiny, small (CPU) or base (GPU, R50-ViT-B/16-like).")] = "tiny",
    steps: Annotated[int, typer.Option(help="Total training steps (with --resume: the new total).")] = 1000,
    batch_size: Annotated[
        int, typer.Option(help="Slices per step and process, half high-infected (global: × processes × K).")
    ] = 16,
    grad_accum: Annotated[
        int, typer.Option(help="K: micro-batches whose gradients are summed per optimizer step.")
    ] = 1,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 5e-4,
    w_contrastive: Annotated[float, typer.Option(help="Weight of the contrastive loss.")] = 0.1,
    w_mse: Annotated[float, typer.Option(help="Weight of the MSE to the continuous pseudo-mask.")] = 1.0,
    w_sensitivity: Annotated[float, typer.Option(help="Weight of the sensitivity-enhanced BCE.")] = 1.0,
    beta: Annotated[float, typer.Option(help="β of the sensitivity-enhanced BCE.")] = 1.0,
    w_dice: Annotated[float, typer.Option(help="Weight of the Dice loss.")] = 0.0,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Train without augmentation.")] = False,
    eval_every: Annotated[int, typer.Option(help="Validate, checkpoint and plot every N steps.")] = 50,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    resume: ResumeOpt = False,
    no_progress: NoProgress = False,
) -> None:
    """Train the 2D TransUNet (or UNet) on pseudo-masks: contrastive + MSE + sensitivity-enhanced loss."""
    try:
        from covidseg.config import SegTrainConfig
        from covidseg.losses import SegLossConfig

        try:
            config = SegTrainConfig(
                arch=arch, preset=preset, steps=steps, batch_size=batch_size, lr=lr, augment=not no_augment,
                eval_every=eval_every, seed=seed, grad_accum=grad_accum,
            )  # fmt: skip
            loss_config = SegLossConfig(
                w_sensitivity=w_sensitivity,
                beta=beta,
                w_mse=w_mse,
                w_contrastive=w_contrastive,
                w_dice=w_dice,
            )
        except ValueError as exc:
            raise UsageError(None, str(exc)) from None
        from covidseg.distributed import env_rank
        from covidseg.stages.train_seg import run_train_seg

        with _step_progress(steps, "train-seg", not no_progress and env_rank() == 0) as advance:
            manifest = run_train_seg(masks, output, config, loss_config, device, resume, advance)
    except CovidsegError as exc:
        _fail(exc)
    if env_rank() > 0:  # under torchrun rank 0 reports for all
        return
    best = manifest["best"]
    text = f"best step {best['step']}: validation Dice vs held-out pseudo-masks {best['val_dice_pseudo']:.3f}"
    if best["val_dice_pseudo"] < 0:
        text = f"no validation cases: kept the last step ({best['step']})"
    if "ref_dice" in best:
        text += f"; vs reference masks (not used for training) {best['ref_dice']:.3f}"
    out.print(f"{text}\nmodel: {output / 'best.pt'}")


@contextlib.contextmanager
def _step_progress(total: int, description: str, enabled: bool):
    """A progress bar for training: callback(step, total, losses)."""
    if not enabled:
        yield lambda step, total, losses: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[losses]}"), console=console,
    ) as bar:  # fmt: skip
        task = bar.add_task(description, total=total, losses="")

        def advance(step: int, total: int, losses: dict) -> None:
            text = " ".join(f"{k.removeprefix('loss_')}={v:.3g}" for k, v in losses.items() if v)
            bar.update(task, completed=step, losses=text)

        yield advance


def _print_evaluation(result) -> None:
    from rich.table import Table

    agg = result.summary["aggregate"]
    table = Table(title=f"{result.summary['n_cases']} case(s): mean ± std over cases")
    table.add_column("metric")
    table.add_column("mean ± std", justify="right")
    table.add_column("pooled", justify="right")
    for name in ("dice", "sensitivity", "specificity", "iou", "hd95_mm"):
        stats = agg["metrics"].get(name) or {}
        pooled = agg["pooled"].get(name)
        table.add_row(
            name,
            "n/a" if stats.get("mean") is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}",
            "" if pooled is None else f"{pooled:.3f}",
        )
    slices = agg.get("per_slice_dice")
    if slices and slices.get("mean") is not None:
        table.add_row(
            f"dice per lesion slice (n={slices['n_slices']})",
            f"{slices['mean']:.3f} ± {slices['std']:.3f}",
            "",
        )
    out.print(table)
    for failure in result.failed_cases:
        console.print(f"[red]failed:[/] {escape(failure['error'])}", highlight=False, soft_wrap=True)
    for failed in result.failed_thresholds:
        console.print(f"[red]threshold not met:[/] {failed}", highlight=False)
    out.print(
        f"report: {escape(str(result.summary_json))} and {escape(str(result.metrics_csv))}", soft_wrap=True
    )


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)

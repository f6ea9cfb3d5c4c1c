"""The `covidseg` command line: one thin function per subcommand.

Each command turns its options into a config, calls one stage, prints a short rich summary and maps
errors to exit codes: 0 ok, 1 a case failed or a threshold was not met, 2 usage error. Progress bars
go to stderr (`--no-progress` turns them off); heavy imports (torch, SimpleITK) happen inside the
commands so that `covidseg --help` is instant.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape as _rich_escape
from typer.core import TyperCommand, TyperGroup

from covidseg import __version__
from covidseg.errors import CovidsegError, UsageError, one_line
from covidseg.progress import Progress, ProgressFor, silent_for


def _no_type_on_flags(params: list) -> list:
    """Flags (--overwrite, --help) take no value: no metavar beside them in --help (typer 0.29's
    rich help would show ``<bool>``)."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx) -> list:
        return _no_type_on_flags(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx) -> list:
        return _no_type_on_flags(super().get_params(ctx))


app = typer.Typer(
    name="covidseg",
    help="Label-free COVID-19 lesion segmentation on chest CT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)
command = functools.partial(app.command, cls=_Command)
console = Console(stderr=True)
out = Console()


def escape(text: str) -> str:
    """Text for a rich console line: rich markup escaped, control characters too (a file name
    holding a newline must not print as two lines)."""
    return _rich_escape(one_line(str(text)))


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


def _option_error(exc: ValueError, options: dict[str, str] | None = None) -> UsageError:
    """A settings rule broken by an option (covidseg.settings.SettingError) as a usage error naming
    the option: `--lr nan: must be a finite number > 0`. `options` maps fields to options where the
    option is not the field's name with dashes (lr_g -> --lr)."""
    from covidseg.settings import SettingError, show

    if not isinstance(exc, SettingError):
        return UsageError(None, str(exc))
    option = (options or {}).get(exc.key, "--" + exc.key.replace("_", "-"))
    return UsageError(None, f"{option} {show(exc.value)}: {exc.cause}")


def _check_options(config: object, **extra: float | None) -> None:
    """Check a settings dataclass built from options (one whose class does not check itself) and
    optional extra numbers >= 0 (None: not given); a broken rule is a usage error naming the option."""
    from covidseg.settings import NON_NEGATIVE, SettingError, check_config

    try:
        check_config(config)
        for name, value in extra.items():
            if value is not None and not NON_NEGATIVE.ok(value):
                raise SettingError(name, value, NON_NEGATIVE.text)
    except SettingError as exc:
        raise _option_error(exc) from None


def _intensity(text: str | None):
    """`--intensity` ('window:LO,HI' or 'linear:A,B': non-HU images to HU) as a mapping, or None."""
    from covidseg.imaging.intensity import parse_intensity

    try:
        return parse_intensity(text) if text else None
    except ValueError as exc:
        raise UsageError(None, str(exc)) from None


def _notes(notes) -> None:
    for note in notes:
        console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)


def _failures(errors) -> None:
    """One red line per failed case (its one-line error)."""
    for error in errors:
        console.print(f"[red]failed:[/] {escape(error)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _bars(enabled: bool, *, remaining: bool = False, label_width: int = 0) -> Iterator[ProgressFor]:
    """Rich progress bars on stderr: ``bars(name)`` is the :data:`~covidseg.progress.Progress` of the
    bar `name`. A bar appears at its first report (a job with nothing to report draws none) and
    stops the bar before it (`run` and `demo` draw one per stage). `remaining`: show the time left
    (training) instead of the time taken."""
    if not enabled:
        yield silent_for
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    bar = RichProgress(
        TextColumn(f"{{task.description:<{label_width}}}"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn() if remaining else TimeElapsedColumn(), TextColumn("{task.fields[last]}"),
        console=console,
    )  # fmt: skip
    tasks: dict[str, int] = {}

    def bar_for(name: str) -> Progress:
        def progress(done: int, total: int, message: str) -> None:
            if name not in tasks:
                if not tasks:
                    bar.start()
                for task in tasks.values():  # the previous stage has finished
                    bar.stop_task(task)
                tasks[name] = bar.add_task(name, total=total, last="")
            bar.update(tasks[name], completed=done, total=total, last=escape(message[:80]))

        return progress

    try:
        yield bar_for
    finally:
        if tasks:
            bar.stop()


NoProgress = Annotated[bool, typer.Option("--no-progress", help="No progress bar (batch jobs, logs).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in OUTPUT.")]


@command()
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
    surroundings: Annotated[
        bool,
        typer.Option(
            "--surroundings/--no-surroundings",
            help="Table, arms, clothing, bowel gas and scanner variety around the patient (default), "
            "or the plain phantoms.",
        ),
    ] = True,
    lesion_variety: Annotated[
        bool,
        typer.Option(
            "--lesion-variety",
            help="Each COVID case draws its own lesion style: shapes (blobs, subpleural bands, lobular "
            "foci), ground-glass level, margins, crazy paving, reversed halos.",
        ),
    ] = False,
    no_progress: NoProgress = False,
) -> None:
    """Make synthetic chest-CT phantoms (HU) with lung and lesion ground truth."""
    try:
        shape_zyx = _triple(shape, int, "--shape")
        spacing_zyx = _triple(spacing, float, "--spacing")
        from covidseg.stages.synth import run_synth

        with _bars(not no_progress) as bars:
            manifest = run_synth(
                output, healthy, covid, seed, shape_zyx, spacing_zyx, montage=montage, progress=bars("synth"),
                surroundings=surroundings, lesion_variety=lesion_variety,
            )  # fmt: skip
    except CovidsegError as exc:
        _fail(exc)
    out.print(f"wrote {len(manifest['cases'])} phantoms to {output} (manifest.json)")


@command()
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

        try:
            config = PreprocessConfig(
                grid=_triple(grid, int, "--grid"), hu_window=_pair(hu_window, "--hu-window")
            )
        except ValueError as exc:
            raise _option_error(exc) from None
        mapping = _intensity(intensity)
        if workers < 1:
            raise UsageError(None, "--workers must be >= 1")
        from covidseg.stages.preprocess import run_preprocess

        with _bars(not no_progress) as bars:
            result = run_preprocess(
                output, healthy, covid, masks, config, workers=workers, series=series, intensity=mapping,
                overwrite=overwrite, progress=bars("preprocess"),
            )  # fmt: skip
    except CovidsegError as exc:
        _fail(exc)
    _notes(result.notes)
    _failures(f["error"] for f in result.failures)
    n_ok = len(result.manifest["cases"])
    out.print(
        f"preprocessed {n_ok} case(s) into {escape(str(output))}; {len(result.failures)} failed",
        soft_wrap=True,
    )
    if result.failures:
        raise typer.Exit(1)


@command()
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
    threshold: Annotated[
        float | None,
        typer.Option(help="Binarise probability-map predictions: voxel >= T is lesion (default: refuse)."),
    ] = None,
    allow_missing: Annotated[
        bool,
        typer.Option("--allow-missing", help="Let --min-* pass with references that have no prediction."),
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous report.")] = False,
    no_progress: NoProgress = False,
) -> None:
    """Dice, sensitivity, specificity, IoU, HD95 and volumes per case and pooled."""
    try:
        from covidseg.stages.evaluate import run_evaluate

        with _bars(not no_progress) as bars:
            result = run_evaluate(
                pred, ref, output, min_dice=min_dice, min_sensitivity=min_sensitivity,
                min_specificity=min_specificity, per_slice=per_slice, progress=bars("evaluate"),
                overwrite=overwrite, threshold=threshold, allow_missing=allow_missing,
            )  # fmt: skip
    except CovidsegError as exc:
        _fail(exc)
    _print_evaluation(result)
    if not result.ok:
        raise typer.Exit(1)


@command("train-gan")
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
        from covidseg.config import GanTrainConfig, gan_crop

        try:
            config = GanTrainConfig(
                preset=preset, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                crop=gan_crop(_crop_option(crop), preset),
                latent_noise=latent_noise, adversarial=adversarial, w_adv=w_adv, w_rec=w_rec,
                w_identity=w_identity, lr_g=lr, lr_d=lr, seed=seed,
                checkpoint_every=checkpoint_every, sample_every=checkpoint_every,
            )  # fmt: skip
        except ValueError as exc:
            raise _option_error(
                exc, {"lr_g": "--lr", "lr_d": "--lr", "sample_every": "--checkpoint-every"}
            ) from None
        from covidseg.learning.distributed import env_rank
        from covidseg.stages.train_gan import run_train_gan

        with _bars(not no_progress and env_rank() == 0, remaining=True) as bars:
            manifest = run_train_gan(
                pre, output, config, device=device, resume=resume, progress=bars("train-gan")
            )
    except CovidsegError as exc:
        _fail(exc)
    if env_rank() == 0:  # under torchrun rank 0 reports for all
        _print_gan(manifest, output)


def _crop_option(text: str) -> object:
    """`--crop`: 'auto', 'none' or 'Z,Y,X' voxels, for :func:`covidseg.config.gan_crop`."""
    return text.lower() if text.lower() in ("auto", "none") else _triple(text, int, "--crop")


def _print_gan(manifest: dict, output: Path) -> None:
    cal = manifest["calibration"]
    out.print(
        f"trained {manifest['steps']} steps on {manifest['device']}; generator: {output / 'generator.pt'}; "
        f"pseudo-mask threshold {cal['threshold']:.4f} (healthy lung percentile {cal['healthy_percentile']})"
    )


@command("make-masks")
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
    healthy_percentile: Annotated[
        float | None,
        typer.Option(
            help="Binary threshold = this percentile of healthy training lungs' differences (default: "
            "the calibration's; another value is calibrated on the generator's training grids)."
        ),
    ] = None,
    grow_percentile: Annotated[
        float | None,
        typer.Option(
            help="Hysteresis: grow the mask into connected lung above this healthy-lung percentile "
            "(50-100, <= healthy_percentile; default: the calibration's, 98)."
        ),
    ] = None,
    no_grow: Annotated[
        bool, typer.Option("--no-grow", help="No hysteresis: the thresholded mask as it is.")
    ] = False,
    teacher: Annotated[
        Path | None,
        typer.Option(
            help="Self-training: a train-seg folder, model .pt or exported .onnx trained on earlier "
            "pseudo-masks of these grids; its confident voxels join the masks."
        ),
    ] = None,
    teacher_budget: Annotated[
        float,
        typer.Option(
            help="With --teacher: the teacher's threshold is the lowest probability (0.50-0.95) at which "
            "the healthy cases' masks flag at most this % of their lung."
        ),
    ] = 1.0,
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
        from covidseg.method.pseudo_masks import PseudoMaskConfig
        from covidseg.settings import SettingError
        from covidseg.stages.make_masks import run_make_masks

        asked = {"high_infected": high_infected, "low_infected": low_infected}
        if min_component is not None:
            asked["min_component"] = min_component
        if grow_percentile is not None or no_grow:
            asked["grow_percentile"] = None if no_grow else grow_percentile
        if healthy_percentile is not None:
            asked["healthy_percentile"] = healthy_percentile
        _check_options(PseudoMaskConfig(**asked), threshold=threshold)  # before anything is read
        if not 0.0 <= teacher_budget <= 100.0:  # also refuses nan
            raise UsageError(None, f"--teacher-budget {teacher_budget}: must be a number in [0, 100] %")
        with _bars(not no_progress) as bars:
            manifest = run_make_masks(
                pre, gan, output, device, threshold=threshold, native=native, overwrite=overwrite,
                progress=bars("make-masks"), backend=backend, overrides=asked, teacher=teacher,
                teacher_budget_percent=teacher_budget,
            )  # fmt: skip
    except SettingError as exc:  # the generator's calibrated settings with the options
        _fail(_option_error(exc))
    except CovidsegError as exc:
        _fail(exc)
    _print_masks(manifest, output)
    if manifest["failed"]:
        raise typer.Exit(1)


def _print_masks(manifest: dict, output: Path) -> None:
    if manifest["backend"]["kind"] == "onnx":
        console.print(f"generator on ONNX Runtime: {manifest['backend']['providers'][0]}", highlight=False)
    _failures(f["error"] for f in manifest["failed"])
    s = manifest["slices"]
    out.print(
        f"pseudo-masks for {len(manifest['cases'])} case(s) in {output} "
        f"(threshold {manifest['threshold']:.4f}); "
        f"2D set: {s['n']} slices, {s['high']} high-infected, {s['low']} low-infected"
    )
    if manifest.get("teacher"):
        t = manifest["teacher"]
        before, after = t["healthy_flagged_percent"]
        out.print(
            f"teacher p >= {t['threshold']:.2f} added {t['added_percent_of_masks']:.1f} % to the COVID "
            f"masks; healthy lung flagged {before:.2f} -> {after:.2f} %"
        )


@command("train-seg")
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
    lr_schedule: Annotated[
        str, typer.Option(help="constant, or cosine (50-step warm-up, then down to 1 % of --lr).")
    ] = "constant",
    w_contrastive: Annotated[float, typer.Option(help="Weight of the contrastive loss.")] = 0.1,
    w_mse: Annotated[float, typer.Option(help="Weight of the MSE to the continuous pseudo-mask.")] = 1.0,
    w_sensitivity: Annotated[float, typer.Option(help="Weight of the sensitivity-enhanced BCE.")] = 1.0,
    beta: Annotated[float, typer.Option(help="β of the sensitivity-enhanced BCE.")] = 4.0,
    w_dice: Annotated[float, typer.Option(help="Weight of the Dice loss.")] = 0.0,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Train without augmentation.")] = False,
    display_p: Annotated[
        float,
        typer.Option(
            help="Share of augmented slices rendered as 8-bit display images (random display window and "
            "gamma, 256 grey levels, read back through window -1350..150 HU, as JPEG/PNG inputs of "
            "predict --intensity window:-1350,150 are); 0: off."
        ),
    ] = 0.5,
    blur_p: Annotated[
        float, typer.Option(help="Share of augmented slices blurred (Gaussian, sigma up to 1 px); 0: off.")
    ] = 0.3,
    synth_lesion_p: Annotated[
        float,
        typer.Option(
            help="Share of training slices given a synthetic lesion in their lung (random shape, ground "
            "glass, consolidation, crazy paving, air bronchograms), added to their targets; 0: off."
        ),
    ] = 0.3,
    healthy_budget: Annotated[
        float | None,
        typer.Option(
            help="Threshold: the lowest probability (0.50-0.95) at which the held-out healthy cases' "
            "slices have at most this % of their lung flagged (default: a fixed 0.5)."
        ),
    ] = None,
    eval_every: Annotated[int, typer.Option(help="Validate, checkpoint and plot every N steps.")] = 50,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    resume: ResumeOpt = False,
    no_progress: NoProgress = False,
) -> None:
    """Train the 2D TransUNet (or UNet) on pseudo-masks: contrastive + MSE + sensitivity-enhanced loss."""
    try:
        from covidseg.config import SegLossConfig, SegTrainConfig

        try:
            config = SegTrainConfig(
                arch=arch, preset=preset, steps=steps, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule,
                augment=not no_augment, eval_every=eval_every, seed=seed, grad_accum=grad_accum,
                display_p=display_p, blur_p=blur_p, synth_lesion_p=synth_lesion_p,
                healthy_budget_percent=healthy_budget,
            )  # fmt: skip
            loss_config = SegLossConfig(
                w_sensitivity=w_sensitivity,
                beta=beta,
                w_mse=w_mse,
                w_contrastive=w_contrastive,
                w_dice=w_dice,
            )  # checks itself (covidseg.settings), like SegTrainConfig
        except ValueError as exc:
            raise _option_error(exc) from None
        from covidseg.learning.distributed import env_rank
        from covidseg.stages.train_seg import run_train_seg

        with _bars(not no_progress and env_rank() == 0, remaining=True) as bars:
            manifest = run_train_seg(masks, output, config, loss_config, device, resume, bars("train-seg"))
    except CovidsegError as exc:
        _fail(exc)
    if env_rank() == 0:  # under torchrun rank 0 reports for all
        _print_seg(manifest, output)


def _print_seg(manifest: dict, output: Path) -> None:
    best = manifest["best"]
    text = f"best step {best['step']}: validation Dice vs held-out pseudo-masks {best['val_dice_pseudo']:.3f}"
    if best["val_dice_pseudo"] < 0:
        text = f"no validation cases: kept the last step ({best['step']})"
    if "ref_dice" in best:
        text += f"; vs reference masks (not used for training) {best['ref_dice']:.3f}"
    threshold = manifest["threshold"]
    text += f"\nthreshold {threshold['value']:.2f} ({threshold['source']}"
    if "healthy_flagged_percent" in threshold:
        text += f": {threshold['healthy_flagged_percent']:.2f} % of their lung flagged"
    out.print(f"{text})\nmodel: {output / 'best.pt'}")


def _is_gan_output(source: Path) -> bool:
    """A train-gan output folder or its generator.pt (export makes the generator's ONNX)."""
    return (source.is_dir() and (source / "generator.pt").is_file()) or source.name == "generator.pt"


@command()
def export(
    source: Annotated[
        Path, typer.Argument(help="A train-seg output folder or its best.pt; or a train-gan folder.")
    ],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="The .onnx file to write (sidecar .json beside)."),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Install a segmenter into the model home under this name.")
    ] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Half-precision weights (for GPUs).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing model.")] = False,
) -> None:
    """A trained segmenter (or GAN generator) -> ONNX + sidecar JSON, checked against torch.

    For a train-gan folder the generator is exported (default: GAN/generator.onnx), so that
    `make-masks --backend onnx` can run it.
    """
    generator = _is_gan_output(source)
    try:
        if generator:
            if fp16 or name:
                raise UsageError(source, "--fp16 and --name are for segmenters, not the GAN generator")
            from covidseg.stages.export import export_generator

            folder = source if source.is_dir() else source.parent
            with console.status("exporting the generator and checking parity ..."):
                result = export_generator(source, output or folder / "generator.onnx", overwrite)
        else:
            from covidseg.stages.export import run_export

            with console.status("exporting and checking parity ..."):
                result = run_export(source, output, name, fp16, overwrite)
    except CovidsegError as exc:
        _fail(exc)
    _print_export(result, generator)


def _print_export(result: dict, generator: bool) -> None:
    """The files an export wrote and its parity figures (`result`: what export_generator returns
    for the `generator`, the sidecar for a segmenter)."""
    parity = result["parity"]
    if generator:
        text = f"wrote {escape(result['onnx'])} and {Path(result['sidecar']).name}; parity: max "
        text += f"|removal diff| {parity['max_abs_removal_diff']:.2g}"
    else:
        text = f"wrote {escape(result['path'])} ({result['precision']}) and {Path(result['sidecar']).name}; "
        text += f"parity on {parity['slices']} slices: max |logit diff| {parity['max_abs_logit_diff']:.2g}, "
        text += f"mask Dice {parity['mask_dice']:.4f}"
    out.print(text, soft_wrap=True)


@command()
def predict(
    inputs: Annotated[
        list[Path], typer.Argument(help="CT files and folders (recursive: NIfTI, MHA, NRRD, DICOM series).")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for masks, read-outs and reports.")],
    model: Annotated[
        str | None,
        typer.Option(help="An .onnx (with sidecar), a .pt or train-seg folder, or a model-home name."),
    ] = None,
    backend: Annotated[str, typer.Option(help="auto (as the model file is), onnx or torch.")] = "auto",
    device: DeviceOpt = "auto",
    resume: Annotated[
        bool, typer.Option("--continue", help="Skip cases whose outputs are complete.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo cases that have outputs.")] = False,
    probabilities: Annotated[
        bool, typer.Option("--probabilities", help="Also write <case>_probability.nii.gz.")
    ] = False,
    snapshots: Annotated[
        bool, typer.Option("--snapshots", help="Also write an overlay PNG per case.")
    ] = False,
    intensity: Annotated[
        str | None,
        typer.Option(help="Map non-HU images to HU: 'window:LO,HI' (0..255 -> LO..HI) or 'linear:A,B'."),
    ] = None,
    series: Annotated[str | None, typer.Option(help="DICOM SeriesInstanceUID to read.")] = None,
    tensorrt: Annotated[
        bool, typer.Option("--tensorrt", help="Ask ONNX Runtime for TensorRT first (slow first build).")
    ] = False,
    num_parts: Annotated[int, typer.Option(help="Split the batch over K jobs (see --part-id).")] = 1,
    part_id: Annotated[int, typer.Option(help="Which part this job runs: 0..K-1.")] = 0,
    keep_metadata: Annotated[
        bool,
        typer.Option(
            "--keep-metadata",
            help="Copy DICOM identifiers (PatientName, PatientID, Study/Series UIDs, StudyDate, "
            "AccessionNumber) into each <case>.json; off: no patient data in any output.",
        ),
    ] = False,
    output_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="nifti, dicom-seg (one DICOM SEG per DICOM series, <case>.seg.dcm, linked to its "
            "study) or both.",
        ),
    ] = "nifti",
    seg_lungs: Annotated[
        bool, typer.Option("--seg-lungs", help="Add the lungs as a second segment of the DICOM SEG.")
    ] = False,
    no_progress: NoProgress = False,
) -> None:
    """Lesion masks and a clinical read-out (mL, % of lung, CT-0..CT-4) for every CT."""
    try:
        options = _predict_options(
            probabilities=probabilities, snapshots=snapshots, resume=resume, overwrite=overwrite,
            series=series, intensity=_intensity(intensity), tensorrt=tensorrt, num_parts=num_parts,
            part_id=part_id, keep_metadata=keep_metadata, output_format=output_format, seg_lungs=seg_lungs,
        )  # fmt: skip
        from covidseg.stages.predict import predict_inputs

        with _bars(not no_progress) as bars:
            result = predict_inputs(
                inputs, output, model, backend, device, options, bars("predict"), _announce
            )
    except CovidsegError as exc:
        _failures(f["error"] for f in getattr(exc, "failures", []))  # cases that failed before a report write
        _fail(exc)
    except KeyboardInterrupt:
        console.print("interrupted: finished cases are kept; rerun with --continue", highlight=False)
        raise typer.Exit(130) from None
    _print_predict(result, output / f"summary{options.part_suffix}.csv")
    if result.failures:
        raise typer.Exit(1)


def _predict_options(**values):
    """predict's command-line options as PredictOptions; a broken rule or a pair of options that
    exclude each other is a usage error naming the options."""
    from covidseg.config import PredictOptions

    if values["resume"] and values["overwrite"]:
        raise UsageError(None, "--continue and --overwrite exclude each other")
    try:
        options = PredictOptions(**values)
    except ValueError as exc:
        raise _option_error(exc, {"output_format": "--format"}) from None
    if options.seg_lungs and not options.writes_seg:
        raise UsageError(None, "--seg-lungs adds a segment to the DICOM SEG: use --format dicom-seg or both")
    return options


def _announce(runner) -> None:
    """The runner predict loaded (device, ONNX Runtime provider) and why it fell back, if it did."""
    console.print(f"model runs with {escape(runner.description)}", highlight=False)
    if runner.warning:
        console.print(f"[yellow]warning:[/] {escape(runner.warning)}", highlight=False)


def _print_predict(result, summary: Path) -> None:
    _notes(result.notes)
    _failures(f["error"] for f in result.failures)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    report = result.report
    per_case = report["seconds_per_case"]
    timing = f" in {report['seconds']:.1f} s ({per_case:.2f} s/case)" if per_case else ""
    not_graded = f", {len(report['not_graded'])} not graded" if report["not_graded"] else ""
    kept = f", {len(result.kept)} of earlier batches kept" if result.kept else ""
    out.print(
        f"predicted {report['predicted']} case(s){timing}, {len(result.skipped)} already done, "
        f"{len(result.failures)} failed{not_graded}{kept} -> {escape(str(summary))}",
        soft_wrap=True,
    )


@command("merge-reports")
def merge_reports(
    output: Annotated[Path, typer.Argument(help="The folder the predict parts wrote to.")],
) -> None:
    """Join the summaries and reports of `predict --num-parts K` jobs into one."""
    try:
        from covidseg.stages.predict import merge_reports as merge

        report = merge(output)
    except CovidsegError as exc:
        _fail(exc)
    not_graded = f", {len(report['not_graded'])} not graded" if report["not_graded"] else ""
    out.print(
        f"merged {len(report['parts'])} parts: {report['cases']} case(s), {report['predicted']} predicted, "
        f"{len(report['failed'])} failed{not_graded} -> {escape(str(output / 'summary.csv'))}",
        soft_wrap=True,
    )
    if report["failed"]:
        raise typer.Exit(1)


def _stage_text(record: dict) -> str:
    """One line of key figures of a pipeline stage record."""
    f = record.get("figures") or {}
    stage = record["stage"]
    if stage in ("train-gan", "train-seg"):
        text = f"{f.get('steps')} steps on {f.get('device')}"
        best = f.get("best") or {}
        if best.get("val_dice_pseudo", -1) >= 0:
            text += f"; best step {best['step']}, val. Dice (pseudo-masks) {best['val_dice_pseudo']:.3f}"
        if "threshold" in f:
            text += f"; threshold {f['threshold']:.4f}"
        return text
    if stage == "export":
        return f"{f.get('precision')}, parity mask Dice {(f.get('parity') or {}).get('mask_dice', 0):.4f}"
    if stage == "evaluate":
        dice = f.get("dice") or {}
        return f"{f.get('cases')} case(s): Dice {dice.get('mean') or 0:.3f} ± {dice.get('std') or 0:.3f}"
    if stage == "predict":
        not_graded = f", {len(f['not_graded'])} not graded" if f.get("not_graded") else ""
        done = f"{f.get('predicted')} predicted, {f.get('skipped')} already done{not_graded}"
        return f"{done} ({f.get('runs_on')})"
    if "cases" in f:
        return f"{f['cases']} case(s), {len(f.get('failed', []))} failed"
    return ""


def _print_stages(records: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="covidseg run")
    for name, justify in (("stage", "left"), ("status", "left"), ("seconds", "right"), ("result", "left")):
        table.add_column(name, justify=justify)
    for record in records:
        seconds = record.get("seconds")
        seconds_text = "" if seconds is None else f"{seconds:.1f}"
        table.add_row(record["stage"], record["status"], seconds_text, _stage_text(record))
    out.print(table)


@command()
def run(
    healthy: Annotated[Path, typer.Option(help="Healthy CTs: a file or a folder (recursive).")],
    covid: Annotated[Path, typer.Option(help="COVID CTs: a file or a folder (recursive).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Work folder (a subfolder per stage).")],
    masks: Annotated[
        Path | None, typer.Option(help="Reference lesion masks of the COVID CTs (for evaluation only).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Stage settings: a .toml or .json file, one table per stage.")
    ] = None,
    predict_inputs: Annotated[
        list[Path] | None,
        typer.Option("--predict", help="CTs to predict instead of the COVID CTs (repeatable)."),
    ] = None,
    ref: Annotated[
        Path | None, typer.Option(help="Reference masks for the predicted CTs (folder or synth manifest).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo every stage, even finished ones.")] = False,
    device: DeviceOpt = "auto",
    no_progress: NoProgress = False,
) -> None:
    """The whole pipeline: preprocess, train-gan, make-masks, train-seg, export, predict (, evaluate)."""
    try:
        from covidseg.config import load_config
        from covidseg.stages.run import RunInputs, run_pipeline

        settings = load_config(config)
        inputs = RunInputs(healthy, covid, masks, tuple(predict_inputs or ()), ref)
        with _bars(not no_progress, label_width=18) as bars:
            result = run_pipeline(output, inputs, settings, device, force, bars)
    except CovidsegError as exc:
        _fail(exc)
    _print_stages(result.stages)
    _failures(result.failures)
    out.print(
        f"work folder: {escape(str(output))} (model.onnx, pred/, settings in config.json)", soft_wrap=True
    )
    if result.failures:
        raise typer.Exit(1)


@command()
def demo(
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Folder for the phantoms, the run and report.html.")
    ] = Path("covidseg-demo"),
    seed: Annotated[int, typer.Option(help="Training phantoms' seed; the test phantoms use seed + 1.")] = 0,
    quick: Annotated[
        bool, typer.Option("--quick", help="A 1-2 minute smoke run with tiny settings (CI); weak numbers.")
    ] = False,
    device: DeviceOpt = "auto",
    no_progress: NoProgress = False,
) -> None:
    """Phantoms -> the whole label-free pipeline -> scores on unseen phantoms -> report.html."""
    try:
        if seed < 0:
            raise UsageError(None, f"--seed must be >= 0, got {seed}")
        from covidseg.stages.demo import run_demo

        with _bars(not no_progress, label_width=18) as bars:
            result = run_demo(output, seed, quick, device, bars)
    except CovidsegError as exc:
        _fail(exc)
    _print_demo(result)


def _print_demo(result) -> None:
    from rich.table import Table

    table = Table(title="unseen test phantoms: Dice per volume (mean ± std)")
    table.add_column("method")
    table.add_column("Dice", justify="right")
    table.add_column("pooled Dice", justify="right")
    for name, scores in result.numbers["methods"].items():
        dice = scores["dice"]
        table.add_row(escape(name), f"{dice['mean']:.3f} ± {dice['std']:.3f}", f"{scores['pooled_dice']:.3f}")
    out.print(table)
    minutes = result.seconds / 60
    out.print(f"finished in {minutes:.1f} min; report: {escape(str(result.report))}", soft_wrap=True)


@command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
) -> None:
    """Versions, CUDA, the ONNX Runtime providers that really work, and the model home.

    Exits 1 when a model in the home is broken (after listing everything; one error line each)."""
    from covidseg.stages.doctor import run_doctor

    found = run_doctor()
    broken = [m for m in found["home"]["models"] if m["status"] != "ok"]
    if as_json:
        import json

        out.print_json(json.dumps(found))
    else:
        _print_doctor_table(found)
    for entry in broken:
        console.print(f"[bold red]error:[/] {escape(entry['error'])}", highlight=False, soft_wrap=True)
    if broken:
        raise typer.Exit(1)


def _print_doctor_table(found: dict) -> None:
    """`covidseg doctor`'s findings as a table on stdout."""
    from rich.table import Table

    table = Table(title=f"covidseg {found['covidseg']}", show_header=False)
    for key in (
        "python",
        "platform",
        "torch",
        "torch_cuda_build",
        "cuda_available",
        "onnxruntime",
        "SimpleITK",
    ):
        table.add_row(key, str(found[key]))
    if found["cuda_devices"]:
        table.add_row("cuda_devices", ", ".join(found["cuda_devices"]))
    for provider, status in found["onnxruntime_providers"].items():
        table.add_row(f"ORT {provider.removesuffix('ExecutionProvider')}", status)
    home = found["home"]
    table.add_row("model home", f"{home['path']} ({home['from']})")
    models = home["models"] or [{"name": "(none)", "status": "add one with covidseg export --name NAME"}]
    for entry in models:
        detail = (
            entry["status"]
            if entry["status"] != "ok"
            else f"{entry['kind']} {entry['arch']} {entry['precision']}"
        )
        table.add_row(f"model {entry['name']}", detail)
    out.print(table)


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
    _failures(f["error"] for f in result.failed_cases)
    missing = result.unmatched.get("ref_without_pred") or []
    if result.failed_missing:
        console.print(f"[red]failed:[/] {escape(result.failed_missing)}", highlight=False, soft_wrap=True)
    elif missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        console.print(
            f"[yellow]not scored:[/] {len(missing)} reference case(s) without a prediction: {escape(shown)}",
            highlight=False,
        )
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

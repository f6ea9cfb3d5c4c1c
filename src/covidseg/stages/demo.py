"""`covidseg demo`: phantoms -> the whole label-free pipeline -> scores on unseen phantoms -> report.html.

Output folder::

    phantoms/train/    synth, seed S: the training CTs (healthy and COVID; lesion masks only for
                       evaluation of the training run, never used for training or selection)
    phantoms/test/     synth, seed S + 1: unseen test phantoms with ground truth
    work/              a `covidseg run` folder (pre/, gan/, masks/, seg/, model.onnx, pred/, eval/)
    work/pre_test/, work/masks_test/, work/eval_pseudo/   the GAN's pseudo-masks of the test phantoms
    work/baseline/, work/eval_baseline/                   HU > -600 inside the lung, same test phantoms
    figures/*.png      the report's figures
    report.html        one self-contained file (written last); report.json: its numbers

The settings (:data:`PRESETS`) were chosen on phantoms of another seed, never on the test ones.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from covidseg import __version__
from covidseg.config import GanTrainConfig, PreprocessConfig, RunConfig, SegTrainConfig
from covidseg.imaging.grid import HuScale
from covidseg.imaging.lungs import LungParams, segment_lungs
from covidseg.io import read_ct, read_mask, write_array
from covidseg.io.atomic import write_json
from covidseg.method.pseudo_masks import BASELINE_HU, threshold_baseline
from covidseg.progress import ProgressFor, silent_for
from covidseg.reporting.html import DemoReport, MethodScores, demo_report, write_report
from covidseg.stages._workdir import read_manifest
from covidseg.stages.run import RunInputs, run_pipeline
from covidseg.versions import software_versions

TEST_SEED_OFFSET = 1  # test phantoms: synth seed S + 1 (unseen cases)
ARCH_NAMES = {"transunet": "TransUNet", "unet": "UNet"}


@dataclass(frozen=True)
class DemoPreset:
    """Phantom sizes and counts and the pipeline settings of one demo variant."""

    name: str
    shape_zyx: tuple[int, int, int]  # phantom voxels
    spacing_zyx: tuple[float, float, float]  # phantom voxel size, mm
    train: tuple[int, int]  # (healthy, COVID) training phantoms
    test: tuple[int, int]  # (healthy, COVID) unseen test phantoms
    run: RunConfig
    overlay_cases: int = 4  # test cases shown in the overlay figure
    surroundings: bool = True  # phantoms with table, arms, clothing, bowel gas, scanner variety


DEFAULT = DemoPreset(
    name="default",
    shape_zyx=(64, 256, 256),
    spacing_zyx=(5.0, 1.4, 1.4),
    train=(16, 16),
    test=(4, 8),
    run=RunConfig(
        workers=2,
        train_gan=GanTrainConfig(
            preset="tiny",
            steps=600,
            crop=(16, 64, 64),
            w_adv=0.0,
            lr_g=5e-4,
            lr_d=5e-4,
            checkpoint_every=100,
            sample_every=600,
        ),
        train_seg=SegTrainConfig(preset="tiny", steps=600, eval_every=100),
    ),
)

QUICK = DemoPreset(
    name="quick",
    shape_zyx=(32, 128, 128),
    spacing_zyx=(10.0, 2.8, 2.8),
    train=(3, 3),
    test=(1, 2),
    run=replace(
        DEFAULT.run,
        preprocess=PreprocessConfig(grid=(16, 64, 64)),
        train_gan=replace(DEFAULT.run.train_gan, steps=100, sample_every=100),
        train_seg=replace(DEFAULT.run.train_seg, steps=300, batch_size=8),
    ),
    overlay_cases=2,
    # the plain phantoms: at this toy budget (100 GAN steps) the GAN learns nothing on the noisier
    # hospital-like ones (TransUNet Dice 0.03 vs 0.23), and the quick demo is a smoke test of the
    # pipeline; the default demo and the tests of the lung mask and phantoms meet the surroundings
    surroundings=False,
)

PRESETS = {"default": DEFAULT, "quick": QUICK}


@dataclass
class DemoResult:
    report: Path
    numbers: dict  # what report.json holds
    seconds: float


class _Clock:
    """Wall time of each demo step: (name, status, seconds)."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str, float]] = []
        self.started = time.perf_counter()
        self._last = self.started

    def lap(self, name: str, status: str = "ran") -> None:
        now = time.perf_counter()
        self.steps.append((name, status, now - self._last))
        self._last = now

    def skip(self) -> None:
        self._last = time.perf_counter()


def _synth(
    folder: Path, counts: tuple[int, int], seed: int, preset: DemoPreset, progress: ProgressFor
) -> bool:
    """Make the phantoms unless `folder` already holds exactly these; True when (re)made."""
    from covidseg.stages.synth import run_synth

    wanted = {
        "n_healthy": counts[0],
        "n_covid": counts[1],
        "seed": seed,
        "shape_zyx": list(preset.shape_zyx),
        "spacing_zyx": list(preset.spacing_zyx),
        "surroundings": preset.surroundings,  # phantoms made before it existed are made again
    }
    if (folder / "manifest.json").is_file():
        parameters = read_manifest(folder, "covidseg.synth")["parameters"]
        if all(parameters.get(k) == v for k, v in wanted.items()):
            return False
    run_synth(
        folder,
        counts[0],
        counts[1],
        seed,
        preset.shape_zyx,
        preset.spacing_zyx,
        progress=progress(f"synth {folder.name}"),
        surroundings=preset.surroundings,
    )
    return True


def _baseline(test_dir: Path, out_dir: Path, scale: HuScale) -> dict[str, float]:
    """HU > -600 inside the classical lung mask for every test CT (on the run's HU `scale`), written
    in its native geometry; returns the % of lung flagged per healthy case."""
    manifest = read_manifest(test_dir, "covidseg.synth")
    flagged = {}
    for record in manifest["cases"]:
        volume, _ = read_ct(test_dir / record["image"])
        lungs = segment_lungs(volume.hu, volume.spacing_zyx, LungParams()).full()
        unit = scale.to_unit(np.clip(volume.hu, *scale.window))
        mask = threshold_baseline(unit, lungs, scale, BASELINE_HU)
        write_array(out_dir / f"{record['id']}.nii.gz", volume.orientation.to_native(mask.astype(np.uint8)),
                    volume.geometry)  # fmt: skip
        if record["kind"] == "healthy":
            flagged[record["id"]] = 100.0 * float(mask.sum()) / max(int((lungs > 0).sum()), 1)
    return flagged


def _test_pseudo_masks(work: Path, test_dir: Path, config: RunConfig, device: str) -> dict[str, float]:
    """The trained GAN's pseudo-masks of the test phantoms (native NIfTI in work/masks_test);
    returns the % of lung flagged per healthy case (on the grid)."""
    from covidseg.stages.make_masks import run_make_masks
    from covidseg.stages.preprocess import run_preprocess

    pre = work / "pre_test"
    run_preprocess(pre, test_dir / "healthy", test_dir / "covid", None, config.preprocess,
                   workers=config.workers, overwrite=True)  # fmt: skip
    manifest = run_make_masks(
        pre, work / "gan", work / "masks_test", device, config.make_masks, overwrite=True
    )
    return {r["id"]: r["pseudo_lesion_percent_of_lung"] for r in manifest["cases"] if r["group"] == "healthy"}


def _evaluate(pred: Path, reference: Path, out: Path) -> dict:
    from covidseg.stages.evaluate import run_evaluate

    return run_evaluate(pred, reference, out, overwrite=True).summary


def _predicted_flagged(pred_dir: Path, healthy_ids: list[str]) -> dict[str, float]:
    """% of lung predicted as lesion on the healthy test cases (predict's read-out)."""
    import json

    out = {}
    for case_id in healthy_ids:
        record = json.loads((pred_dir / f"{case_id}.json").read_text(encoding="utf-8"))
        out[case_id] = float(record["involvement_pct"])
    return out


def _loss_figures(work: Path, fig_dir: Path) -> list[tuple[Path, str]]:
    """Loss curves of both trainings and the segmenter's validation Dice, re-drawn from metrics.csv."""
    import csv

    from covidseg.reporting.plots import loss_curves

    def rows(path: Path) -> list[dict]:
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    def used(table: list[dict], columns: list[str]) -> list[str]:
        return [c for c in columns if any(r.get(c) not in (None, "", "0.0", "0") for r in table)]

    gan, seg = rows(work / "gan" / "metrics.csv"), rows(work / "seg" / "metrics.csv")
    figures = [
        (fig_dir / "gan_loss.png", "train-gan losses", gan,
         ["loss_d", "loss_adv", "loss_rec", "loss_identity", "loss_g"]),
        (fig_dir / "seg_loss.png", "train-seg losses", seg,
         ["loss_sensitivity", "loss_mse", "loss_contrastive", "loss_dice", "loss_total"]),
        (fig_dir / "seg_validation.png", "train-seg validation Dice",
         [r for r in seg if r.get("val_dice_pseudo")], ["val_dice_pseudo", "ref_dice"]),
    ]  # fmt: skip
    out = []
    for path, title, table, columns in figures:
        columns = used(table, columns)
        if table and columns:
            loss_curves(table, columns, path, title=title)
            out.append((path, title))
    return out


def _overlay_figure(test_dir: Path, work: Path, fig_dir: Path, n_cases: int) -> Path | None:
    """For the first `n_cases` COVID test phantoms: the slice with the most lesion, ground truth vs
    the TransUNet, the pseudo-masks and the baseline."""
    from covidseg.reporting.plots import mask_comparison

    manifest = read_manifest(test_dir, "covidseg.synth")
    covid = [r for r in manifest["cases"] if r["kind"] == "covid"][:n_cases]
    methods = [
        ("TransUNet", work / "pred"),
        ("pseudo-mask (GAN)", work / "masks_test" / "pseudo_masks"),
        ("baseline HU > -600", work / "baseline"),
    ]
    images, refs, preds, titles = [], [], [], []
    aspect = 1.0
    for record in covid:
        volume, _ = read_ct(test_dir / record["image"])
        ref = volume.orientation.to_canonical(read_mask(test_dir / record["mask"])[0])
        z = int(np.argmax(ref.reshape(ref.shape[0], -1).sum(axis=1)))
        masks = []
        for _, folder in methods:
            path = folder / f"{record['id']}.nii.gz"
            mask = (
                volume.orientation.to_canonical(read_mask(path)[0]) if path.is_file() else np.zeros_like(ref)
            )
            masks.append(mask[z])
        images.append(volume.hu[z])
        refs.append(ref[z])
        preds.append(masks)
        titles.append(f"{record['id']} z={z}")
        aspect = volume.spacing_zyx[1] / volume.spacing_zyx[2]
    if not images:
        return None
    path = fig_dir / "overlays.png"
    mask_comparison(images, refs, preds, titles, [m for m, _ in methods], path, aspect)
    return path


def _versions(run_records: list[dict]) -> dict[str, object]:
    """The report's versions table: the software, torch's CPU threads, the cores and the devices used."""
    import torch

    figures = {r["stage"]: r.get("figures", {}) for r in run_records}
    versions = software_versions()
    versions["torch"] += f" ({torch.get_num_threads()} threads)"
    return {
        **versions,
        "CPU cores": os.cpu_count(),
        "training device": figures.get("train-gan", {}).get("device", "?"),
        "predict ran on": figures.get("predict", {}).get("runs_on", "?"),
    }


def _numbers(methods: list[MethodScores]) -> dict:
    out = {}
    for method in methods:
        agg = method.summary["aggregate"]
        flagged = method.healthy_flagged_pct
        out[method.name] = {
            "dice": agg["metrics"]["dice"],
            "pooled_dice": agg["pooled"]["dice"],
            "sensitivity": agg["metrics"]["sensitivity"],
            "specificity": agg["metrics"]["specificity"],
            "healthy_flagged_pct": sum(flagged) / len(flagged) if flagged else None,
            "per_case_dice": method.case_dice(),
        }
    return out


def _notes(preset: DemoPreset) -> list[str]:
    gan, seg = preset.run.train_gan, preset.run.train_seg
    return [
        "Bold: the label-free model that covidseg predict runs (not necessarily the best row). "
        "GAN pseudo-masks: what the segmenter learns from (the GAN's pseudo-healthy difference, thresholded "
        "without labels), here made for the test phantoms too. Baseline: every voxel above -600 HU inside "
        "the classical lung mask (it cannot tell vessels from lesions).",
        "No step learned from or was selected on a lesion label: the GAN learns from healthy phantoms "
        "(restoring synthetic Perlin lesions painted into them), the segmenter from the GAN's pseudo-masks, "
        "and its best checkpoint is chosen on held-out pseudo-masks. Ground truth is used only here, "
        "to score.",
        f"Small CPU settings: GAN preset {gan.preset}, {gan.steps} steps, adversarial weight {gan.w_adv:g} "
        f"(no measurable effect at this budget, see docs/results.md); {seg.arch} preset {seg.preset}, "
        f"{seg.steps} steps of {seg.batch_size} slices. docs/results.md has longer runs (GAN pseudo-mask "
        "Dice rose from 0.30 at 300 steps to 0.51 at 900 and fell to 0.42 at 2000).",
        "Dice and sensitivity are per COVID test volume (mean ± population std), pooled Dice over all their "
        "voxels, specificity over the whole volume; 'healthy lung flagged' is the share of lung marked as "
        "lesion on the healthy test phantoms. With few test volumes the standard error of a mean Dice is "
        "about std / sqrt(n).",
    ]


def run_demo(
    out_dir: Path,
    seed: int = 0,
    quick: bool = False,
    device: str = "auto",
    progress: ProgressFor | None = None,
) -> DemoResult:
    """Phantoms -> `run` -> scores on unseen phantoms -> report.html in `out_dir`.

    A rerun into the same folder reuses the phantoms and the finished stages (the pipeline is redone
    from scratch when the seed or the variant changed).
    """
    preset = QUICK if quick else DEFAULT
    progress = progress or silent_for
    out_dir = Path(out_dir)
    work, test_dir, fig_dir = out_dir / "work", out_dir / "phantoms" / "test", out_dir / "figures"
    load_before = os.getloadavg()
    clock = _Clock()
    stages = _phantoms_and_pipeline(out_dir, preset, seed, device, progress, clock)
    methods, test_manifest = _scored_methods(work, test_dir, preset.run, device, progress, clock)
    progress("report")(0, 1, "figures")
    fig_dir.mkdir(parents=True, exist_ok=True)
    loss_figures = _loss_figures(work, fig_dir)
    overlay = _overlay_figure(test_dir, work, fig_dir, preset.overlay_cases)
    clock.lap("figures")
    numbers = {
        "format": "covidseg.demo",
        "version": 1,
        "covidseg_version": __version__,
        "preset": preset.name,
        "seed": seed,
        "test_seed": seed + TEST_SEED_OFFSET,
        "methods": _numbers(methods),
        "seconds": {name: round(s, 2) for name, _, s in clock.steps},
        "load_average": {"start": list(load_before), "end": list(os.getloadavg())},
    }
    report = _report(preset, seed, methods, test_manifest, loss_figures, overlay, clock, load_before,
                     stages, preset.run)  # fmt: skip
    write_json(out_dir / "report.json", numbers)
    path = write_report(out_dir / "report.html", report)
    progress("report")(1, 1, "done")
    return DemoResult(report=path, numbers=numbers, seconds=time.perf_counter() - clock.started)


def _phantoms_and_pipeline(
    out_dir: Path, preset: DemoPreset, seed: int, device: str, progress: ProgressFor, clock: _Clock
) -> list[dict]:
    """The training and test phantoms (unless already there), then `covidseg run` in work/ (redone
    from scratch when the phantoms or the settings changed); returns run's stage records."""
    train_dir, test_dir = out_dir / "phantoms" / "train", out_dir / "phantoms" / "test"
    work = out_dir / "work"
    made = _synth(train_dir, preset.train, seed, preset, progress)
    clock.lap("synth training phantoms", "ran" if made else "skipped")
    made_test = _synth(test_dir, preset.test, seed + TEST_SEED_OFFSET, preset, progress)
    clock.lap("synth test phantoms", "ran" if made_test else "skipped")
    inputs = RunInputs(
        train_dir / "healthy", train_dir / "covid", train_dir / "masks",
        predict=(test_dir / "covid", test_dir / "healthy"), reference=test_dir / "manifest.json",
    )  # fmt: skip
    previous = _read_config(work)
    force = made or made_test or (previous is not None and previous != preset.run.to_json())
    result = run_pipeline(work, inputs, preset.run, device, force, progress)
    clock.skip()
    clock.steps += [(r["stage"], r["status"], float(r.get("seconds") or 0.0)) for r in result.stages]
    return result.stages


def _scored_methods(
    work: Path, test_dir: Path, config: RunConfig, device: str, progress: ProgressFor, clock: _Clock
) -> tuple[list[MethodScores], dict]:
    """The scores on the test phantoms of the label-free segmenter (from run's evaluate), of the GAN's
    pseudo-masks and of the HU baseline (both made here); and the test phantoms' manifest."""
    reference = test_dir / "manifest.json"
    progress("test pseudo-masks")(0, 1, "make-masks on the test phantoms")
    pseudo_flagged = _test_pseudo_masks(work, test_dir, config, device)
    pseudo = _evaluate(work / "masks_test" / "pseudo_masks", reference, work / "eval_pseudo")
    progress("test pseudo-masks")(1, 1, "done")
    clock.lap("test pseudo-masks (make-masks + evaluate)")
    progress("baseline")(0, 1, f"HU > {BASELINE_HU:g} in the lung")
    baseline_flagged = _baseline(test_dir, work / "baseline", config.preprocess.hu_scale)
    baseline = _evaluate(work / "baseline", reference, work / "eval_baseline")
    progress("baseline")(1, 1, "done")
    clock.lap("baseline (threshold + evaluate)")

    test_manifest = read_manifest(test_dir, "covidseg.synth")
    healthy_ids = [r["id"] for r in test_manifest["cases"] if r["kind"] == "healthy"]
    segmenter = _read_json_file(work / "eval" / "summary.json")
    methods = [
        MethodScores(f"{ARCH_NAMES[config.train_seg.arch]} (label-free)", segmenter,
                     list(_predicted_flagged(work / "pred", healthy_ids).values())),
        MethodScores("GAN pseudo-masks", pseudo,
                     list(pseudo_flagged.values())),
        MethodScores(f"baseline: HU > {BASELINE_HU:g} in the lung", baseline,
                     list(baseline_flagged.values())),
    ]  # fmt: skip
    return methods, test_manifest


def _read_config(work: Path) -> dict | None:
    path = work / "config.json"
    return _read_json_file(path) if path.is_file() else None


def _read_json_file(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text(encoding="utf-8"))


def _report(preset, seed, methods, test_manifest, loss_figures, overlay, clock, load_before, stages, config):
    """The DemoReport of this run, rendered to HTML text."""
    n_h, n_c = preset.train
    t_h, t_c = preset.test
    shape = "×".join(map(str, preset.shape_zyx))
    spacing = "×".join(f"{s:g}" for s in preset.spacing_zyx)
    data_text = (
        f"Trained on {n_h} healthy + {n_c} COVID phantoms (synth seed {seed}); scored on {t_c} COVID + "
        f"{t_h} healthy phantoms never seen in training (seed {seed + TEST_SEED_OFFSET}); {shape} voxels of "
        f"{spacing} mm, scored voxel by voxel on the CTs' own grid against the phantoms' lesion ground truth."
    )
    lesion_ml = {r["id"]: r["lesion_ml"] for r in test_manifest["cases"] if r["kind"] == "covid"}
    total = time.perf_counter() - clock.started
    load_end = os.getloadavg()
    timing_note = (
        f"Wall time of this run: {total / 60:.1f} min on {os.cpu_count()} CPU cores (load average "
        f"{load_before[0]:.1f} at the start, {load_end[0]:.1f} at the end; other work on the machine slows "
        "it down). Skipped steps were finished by an earlier run in this folder (their time is that run's)."
    )
    return demo_report(
        DemoReport(
            title="covidseg demo: label-free COVID-19 lesion segmentation on synthetic chest CT",
            lead=f"covidseg {__version__}, preset '{preset.name}', seed {seed}: {total / 60:.1f} minutes on "
            f"{os.cpu_count()} CPU cores, from synthetic phantoms to this page.",
            data_text=data_text,
            methods=methods,
            highlight=0,
            lesion_ml=lesion_ml,
            notes=_notes(preset),
            loss_figures=loss_figures,
            overlay_figure=overlay,
            overlay_caption=(
                "Each row: one unseen COVID test phantom at its slice with the most lesion. Red: ground "
                "truth (filled on the left, outlined elsewhere); cyan: what each method marks."
            ),
            timings=clock.steps,
            timing_note=timing_note,
            versions=_versions(stages),
            settings=config.to_json(),
        )
    )

"""Quality of the label-free pseudo-masks on phantoms, against the input-threshold baseline.

Trains the GAN on synthetic phantoms (default 20 healthy + 20 COVID, seed 100), runs make-masks on
*other* phantoms (5 healthy + 10 COVID, seed 200) with the threshold calibrated on the training
healthy lungs, and scores on the 32x128x128 grid against the phantom ground truth:

* per-volume Dice mean ± std, pooled Dice, sensitivity, specificity (COVID test cases);
* % of the lung flagged on the healthy test phantoms;
* the same for the trivial baseline: HU > -600 inside the lung, components < 20 voxels removed.

Variants (ablation): ``perlin`` (default), ``uniform``, ``none`` latent noise, and ``noadv``
(Perlin, adversarial term off).

    python bench/pseudo_masks.py --steps 900 --variants perlin          # ~13 min on 2 CPU cores
    python bench/pseudo_masks.py --steps 900 --variants perlin,uniform,none,noadv --device cuda
    python bench/pseudo_masks.py --json     # the figures as rows (for bench/run_all.py)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from covidseg.config import GanTrainConfig, PreprocessConfig
from covidseg.imaging.grid import DEFAULT_HU_SCALE
from covidseg.imaging.metrics import aggregate, case_metrics, per_slice_dice
from covidseg.method.pseudo_masks import threshold_baseline
from covidseg.stages._workdir import load_grid_cases
from covidseg.stages.make_masks import run_make_masks
from covidseg.stages.preprocess import run_preprocess
from covidseg.stages.synth import run_synth
from covidseg.stages.train_gan import run_train_gan

VARIANTS = {
    "perlin": {"latent_noise": "perlin"},
    "uniform": {"latent_noise": "uniform"},
    "none": {"latent_noise": "none"},
    "noadv": {"latent_noise": "perlin", "w_adv": 0.0},
}


def _data(
    work: Path, n_train: int, n_test_healthy: int, n_test_covid: int, workers: int
) -> tuple[Path, Path]:
    """Synthesise and preprocess the train and test sets once (reused when present)."""
    sets = {"train": (n_train, n_train, 100), "test": (n_test_healthy, n_test_covid, 200)}
    for name, (n_h, n_c, seed) in sets.items():
        synth, pre = work / f"synth_{name}", work / f"pre_{name}"
        if not (synth / "manifest.json").exists():
            run_synth(synth, n_h, n_c, seed, (64, 256, 256), (5.0, 1.4, 1.4))
        if not (pre / "manifest.json").exists():
            run_preprocess(
                pre, synth / "healthy", synth / "covid", synth / "masks", PreprocessConfig(), workers=workers
            )
    return work / "pre_train", work / "pre_test"


def score(binaries: dict[str, np.ndarray], cases) -> dict:
    """Grid-level scores of binary masks against the phantom ground truth (COVID cases) and the
    share of lung flagged on healthy cases."""
    covid = [c for c in cases if c.group == "covid"]
    healthy = [c for c in cases if c.group == "healthy"]
    per_case = [case_metrics(binaries[c.case_id] > 0, c.ref > 0, (1.0, 1.0, 1.0)) for c in covid]
    slices = np.concatenate([per_slice_dice(binaries[c.case_id] > 0, c.ref > 0) for c in covid])
    agg = aggregate(per_case, slice_dice=slices)
    flagged = [
        100.0 * float((binaries[c.case_id] > 0).sum()) / max(int((c.lungs > 0).sum()), 1) for c in healthy
    ]
    m = agg["metrics"]
    return {
        "dice": (m["dice"]["mean"], m["dice"]["std"]),
        "pooled_dice": agg["pooled"]["dice"],
        "sensitivity": (m["sensitivity"]["mean"], m["sensitivity"]["std"]),
        "specificity": (m["specificity"]["mean"], m["specificity"]["std"]),
        "slice_dice": (agg["per_slice_dice"]["mean"], agg["per_slice_dice"]["std"]),
        "healthy_flagged_percent": (float(np.mean(flagged)), float(np.std(flagged)))
        if flagged
        else (0.0, 0.0),
        "per_case_dice": {c.case_id: float(r["dice"]) for c, r in zip(covid, per_case, strict=True)},
    }


def _row(name: str, s: dict, minutes: float | None) -> str:
    hf = s["healthy_flagged_percent"]
    return (
        f"| {name} | {s['dice'][0]:.3f} ± {s['dice'][1]:.3f} | {s['pooled_dice']:.3f} | "
        f"{s['sensitivity'][0]:.3f} ± {s['sensitivity'][1]:.3f} | {s['specificity'][0]:.4f} | "
        f"{hf[0]:.2f} ± {hf[1]:.2f} | {'' if minutes is None else f'{minutes:.1f}'} |"
    )


TARGET_DICE = 0.5  # pseudo-masks, Dice per volume (at least)
TARGET_HEALTHY_PERCENT = 2.0  # % of healthy lung flagged (at most)


def bench_row(
    name: str, value: float | None, unit: str = "", target: float | None = None, at_least: bool = True
) -> dict:
    """One figure for bench/run_all.py: {name, value, unit, target, ratio = value / target, ok}."""
    ok = None
    if value is not None and target is not None:
        ok = bool(value >= target) if at_least else bool(value <= target)
    ratio = None if value is None or not target else round(value / target, 3)
    value = None if value is None else round(float(value), 4)
    return {"name": name, "value": value, "unit": unit, "target": target, "ratio": ratio, "ok": ok}


def json_rows(results: dict, minutes: dict[str, float]) -> list[dict]:
    """Rows of the baseline and every variant (Dice per volume, healthy lung flagged, train time)."""
    rows = []
    for name, s in results.items():
        is_baseline = name == "baseline"
        label = "baseline HU > -600 in lung" if is_baseline else f"pseudo-masks {name}"
        target = None if is_baseline else TARGET_DICE
        rows.append(bench_row(f"{label}: Dice per volume", s["dice"][0], "", target))
        rows.append(bench_row(f"  {label}: pooled Dice", s["pooled_dice"]))
        flagged = s["healthy_flagged_percent"][0]
        target = None if is_baseline else TARGET_HEALTHY_PERCENT
        rows.append(bench_row(f"  {label}: healthy lung flagged", flagged, "%", target, at_least=False))
        if name in minutes:
            rows.append(bench_row(f"  {label}: train-gan wall", minutes[name], "min"))
    return rows


def main(args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    """Train the variants and score them; return (markdown table lines, rows for --json)."""
    work = Path(args.work)
    pre_train, pre_test = _data(work, args.train, args.test_healthy, args.test_covid, args.workers)
    test_cases = load_grid_cases(pre_test)
    baseline = {c.case_id: threshold_baseline(c.image, c.lungs, DEFAULT_HU_SCALE) for c in test_cases}
    rows = [
        "| method | Dice (per volume) | pooled Dice | sensitivity | specificity "
        "| healthy lung flagged % | train min |",
        "|---|---|---|---|---|---|---|",
        _row("baseline: HU > -600 in lung", score(baseline, test_cases), None),
    ]
    results = {"baseline": score(baseline, test_cases)}
    minutes_by_variant = {}
    for variant in args.variants.split(","):
        overrides = VARIANTS[variant]
        crop = None if args.crop == "none" else tuple(int(v) for v in args.crop.split(","))
        lr = {} if args.lr is None else {"lr_g": args.lr, "lr_d": args.lr}
        config = GanTrainConfig(
            steps=args.steps, preset=args.preset, seed=args.seed, crop=crop, **overrides, **lr
        )
        tag = f"{variant}_{args.preset}_{args.steps}" + ("_full" if crop is None else "")
        tag += "" if args.lr is None else f"_lr{args.lr:g}"
        gan_dir = work / f"gan_{tag}"
        start = time.perf_counter()
        if not (gan_dir / "manifest.json").exists():
            run_train_gan(
                pre_train, gan_dir, config, device=args.device, resume=(gan_dir / "checkpoint.pt").exists()
            )
        minutes = (time.perf_counter() - start) / 60
        masks_dir = work / f"masks_{tag}"
        manifest = run_make_masks(
            pre_test, gan_dir, masks_dir, device=args.device, native=False, overwrite=True
        )
        binaries = {r["id"]: np.load(masks_dir / r["files"]["binary_grid"]) for r in manifest["cases"]}
        results[variant] = score(binaries, test_cases)
        results[variant]["threshold"] = manifest["threshold"]
        minutes_by_variant[variant] = minutes
        rows.append(_row(f"pseudo-masks: {tag}", results[variant], minutes))
        print(rows[-1], flush=True)
        with open(work / "results.md", "a", encoding="utf-8") as fh:
            fh.write(rows[-1] + "\n")
    (work / f"results_{args.preset}_{args.steps}.json").write_text(json.dumps(results, indent=2))
    return rows, json_rows(results, minutes_by_variant)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default="bench-work/pseudo_masks", help="folder for data and runs")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--crop", default="16,64,64", help="training crop 'Z,Y,X' or 'none'")
    parser.add_argument("--variants", default="perlin")
    parser.add_argument("--lr", type=float, default=None, help="Adam lr of G and D (default: config's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=20, help="healthy and COVID training phantoms (each)")
    parser.add_argument("--test-healthy", type=int, default=5)
    parser.add_argument("--test-covid", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the figures as rows of JSON")
    arguments = parser.parse_args()
    lines, figures = main(arguments)
    print(json.dumps(figures, indent=1) if arguments.json else "\n".join(lines))

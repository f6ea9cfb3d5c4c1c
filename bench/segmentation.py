"""Quality of the 2D segmenters trained only on pseudo-masks (phantoms + 50 real COVID slices).

Uses the data and a trained GAN of ``bench/pseudo_masks.py`` (same ``--work`` folder): make-masks on
the training phantoms, train-seg (TransUNet and UNet) on those pseudo-masks, then predicts every
slice of the *unseen* test phantoms and scores on the 32x128x128 grid against the phantom ground
truth, next to the pseudo-masks of the same test cases and the HU-threshold baseline.

Real slices: the 50 COVID-SemiSeg slices (8-bit, lung-windowed; expert masks never used for
training or tuning) are mapped with ``window:-1350,150``, transposed to the radiological view,
resized to the grid and segmented; Dice against the expert masks at the image's own size.

    python bench/segmentation.py --gan gan_perlin_tiny_900 --steps 300
    python bench/segmentation.py --json     # the figures as rows (for bench/run_all.py)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from covidseg.config import SegLossConfig, SegTrainConfig
from covidseg.imaging.grid import DEFAULT_HU_SCALE
from covidseg.imaging.intensity import parse_intensity
from covidseg.inference.runners import predict_probabilities
from covidseg.io import read_ct
from covidseg.learning.loop import load_checkpoint
from covidseg.method.pseudo_masks import remove_small_components, threshold_baseline
from covidseg.models.segmenters import segmenter_from_config
from covidseg.stages._workdir import load_grid_cases
from covidseg.stages.make_masks import run_make_masks
from covidseg.stages.train_seg import run_train_seg
from pseudo_masks import bench_row, score

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TARGET_PHANTOM_DICE = 0.70  # issue 6: label-free segmenter on unseen phantoms, Dice per volume
TARGET_HEALTHY_PERCENT = 1.0  # issue 6: healthy lung flagged (at most)
TARGET_REAL_DICE = 0.50  # issue 6: the 50 real COVID-SemiSeg slices
MAPPING = parse_intensity("window:-1350,150")


def load_model(path: Path):
    payload = load_checkpoint(path)
    model = segmenter_from_config(payload["model"]["arch"], payload["model"]["config"])
    model.load_state_dict(payload["weights"])
    return model.eval(), float(payload["threshold"])


def row(name: str, s: dict) -> str:
    return (
        f"| {name} | {s['dice'][0]:.3f} ± {s['dice'][1]:.3f} | {s['pooled_dice']:.3f} | "
        f"{s['sensitivity'][0]:.3f} ± {s['sensitivity'][1]:.3f} | {s['specificity'][0]:.4f} | "
        f"{s['slice_dice'][0]:.3f} ± {s['slice_dice'][1]:.3f} | {s['healthy_flagged_percent'][0]:.2f} |"
    )


def paired(scores: dict, other: dict, label: str) -> str:
    """Per-volume Dice differences on the same test volumes: mean ± std, and how many are better."""
    diff = np.array([scores["per_case_dice"][k] - other["per_case_dice"][k] for k in scores["per_case_dice"]])
    return (
        f"paired Dice difference {label}: {diff.mean():+.3f} ± {diff.std():.3f} "
        f"(better on {int((diff > 0).sum())} of {diff.size} volumes)"
    )


def segment_volume(model, threshold: float, case, device) -> np.ndarray:
    probs = predict_probabilities(model, case.image, device)
    return remove_small_components((probs >= threshold) & (case.lungs > 0), 20)


def real_slices(model, threshold: float, device, grid=(128, 128)) -> dict:
    """Dice on the 50 COVID-SemiSeg slices (no lung gating: the classical lung mask needs HU)."""
    folder = SHARED / "covid_semiseg_infnet" / "train"
    dices, inter, total = [], 0, 0
    for image_path in sorted((folder / "Imgs").glob("*.jpg")):
        stored = (
            sitk.GetArrayFromImage(sitk.ReadImage(str(image_path))).astype(np.float32).T
        )  # radiological view
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "GT" / f"{image_path.stem}.png"))).T > 127
        hu = stored * (1500.0 / 255.0) - 1350.0
        unit = np.clip((hu + 1000.0) / 1400.0, 0.0, 1.0)
        small = F.interpolate(torch.from_numpy(unit)[None, None], size=grid, mode="area")[0, 0].numpy()
        prob = predict_probabilities(model, small[None], device)[0]
        back = F.interpolate(torch.from_numpy(prob)[None, None], size=unit.shape, mode="bilinear")[
            0, 0
        ].numpy()
        pred = back >= threshold
        tp = int((pred & gt).sum())
        dices.append(2 * tp / max(int(pred.sum() + gt.sum()), 1))
        inter, total = inter + tp, total + int(pred.sum() + gt.sum())
    return {"dice": (float(np.mean(dices)), float(np.std(dices))), "pooled_dice": 2 * inter / max(total, 1)}


def real_baseline() -> dict:
    """The classical baseline on the real slices: mapped HU > -600 (no lung mask either)."""
    folder = SHARED / "covid_semiseg_infnet" / "train"
    dices, inter, total = [], 0, 0
    for image_path in sorted((folder / "Imgs").glob("*.jpg")):
        hu = read_ct(image_path, intensity=MAPPING)[0].hu[0]
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "GT" / f"{image_path.stem}.png"))) > 127
        pred = (hu > -600) & (hu < -100)  # denser than lung, lighter than soft tissue
        tp = int((pred & gt).sum())
        dices.append(2 * tp / max(int(pred.sum() + gt.sum()), 1))
        inter, total = inter + tp, total + int(pred.sum() + gt.sum())
    return {"dice": (float(np.mean(dices)), float(np.std(dices))), "pooled_dice": 2 * inter / max(total, 1)}


def _phantom_rows(label: str, s: dict, targets: bool) -> list[dict]:
    dice_target = TARGET_PHANTOM_DICE if targets else None
    return [
        bench_row(f"{label}: phantom Dice per volume", s["dice"][0], "", dice_target),
        bench_row(f"  {label}: phantom pooled Dice", s["pooled_dice"]),
        bench_row(f"  {label}: healthy lung flagged", s["healthy_flagged_percent"][0], "%",
                  TARGET_HEALTHY_PERCENT if targets else None, at_least=False),
    ]  # fmt: skip


def main(args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    """Train and score the segmenters; return (markdown table lines, rows for --json)."""
    work = Path(args.work)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    masks_train = work / f"masks_train_{args.gan}"
    if not (masks_train / "manifest.json").exists():
        run_make_masks(
            work / "pre_train", work / args.gan, masks_train, device=args.device, native=False, overwrite=True
        )
    test_cases = load_grid_cases(work / "pre_test")
    pseudo_test = work / args.gan.replace("gan_", "masks_")
    figures: list[dict] = []
    baseline = {c.case_id: threshold_baseline(c.image, c.lungs, DEFAULT_HU_SCALE) for c in test_cases}
    baseline_scores = score(baseline, test_cases)
    lines = [
        "| method (test phantoms) | Dice per volume | pooled Dice | sensitivity | specificity "
        "| Dice per lesion slice | healthy lung flagged % |",
        "|---|---|---|---|---|---|---|",
        row("baseline: HU > -600 in lung", baseline_scores),
    ]
    figures += _phantom_rows("baseline HU > -600", baseline_scores, False)
    if (pseudo_test / "manifest.json").exists():
        manifest = json.loads((pseudo_test / "manifest.json").read_text())
        pseudo = {r["id"]: np.load(pseudo_test / r["files"]["binary_grid"]) for r in manifest["cases"]}
        pseudo_scores = score(pseudo, test_cases)
        lines.append(row("pseudo-masks (GAN)", pseudo_scores))
        figures += _phantom_rows("pseudo-masks (GAN)", pseudo_scores, False)
    real_lines = ["| method (50 real COVID-SemiSeg slices) | Dice per slice | pooled Dice |", "|---|---|---|"]
    b = real_baseline()
    real_lines.append(
        f"| baseline: mapped HU in (-600, -100) | {b['dice'][0]:.3f} ± {b['dice'][1]:.3f} "
        f"| {b['pooled_dice']:.3f} |"
    )
    figures.append(bench_row("baseline mapped HU in (-600, -100): real slices Dice", b["dice"][0]))
    for arch in args.archs.split(","):
        variant = (f"_{args.lr_schedule}" if args.lr_schedule != "constant" else "") + (
            f"_beta{args.beta:g}" if args.beta != 1.0 else ""  # names of the runs made when 1 was the default
        )
        seg_dir = work / f"seg_{arch}_{args.preset}_{args.steps}{variant}_{args.gan}"
        if not (seg_dir / "manifest.json").exists():
            config = SegTrainConfig(
                arch=arch, preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                lr_schedule=args.lr_schedule,
            )  # fmt: skip
            run_train_seg(
                masks_train, seg_dir, config, SegLossConfig(beta=args.beta), device=args.device,
                resume=(seg_dir / "checkpoint.pt").exists(),
            )  # fmt: skip
        model, threshold = load_model(seg_dir / "best.pt")
        model.to(device)
        binaries = {c.case_id: segment_volume(model, threshold, c, device) for c in test_cases}
        scores = score(binaries, test_cases)
        lines.append(row(f"{arch} ({args.preset}, {args.steps} steps{variant})", scores))
        figures += _phantom_rows(f"{arch} {args.preset} {args.steps} steps", scores, True)
        print(lines[-1], flush=True)
        if (pseudo_test / "manifest.json").exists():
            print(paired(scores, pseudo_scores, f"{arch} - pseudo-masks"), flush=True)
        r = real_slices(model, threshold, device)
        real_lines.append(
            f"| {arch} ({args.preset}) | {r['dice'][0]:.3f} ± {r['dice'][1]:.3f} | {r['pooled_dice']:.3f} |"
        )
        print(real_lines[-1], flush=True)
        figures.append(bench_row(f"{arch} {args.preset} {args.steps} steps: real COVID-SemiSeg slices Dice",
                                 r["dice"][0], "", TARGET_REAL_DICE))  # fmt: skip
    return lines + [""] + real_lines, figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default="bench-work/pseudo_masks")
    parser.add_argument("--gan", default="gan_perlin_tiny_900", help="GAN folder name inside --work")
    parser.add_argument("--archs", default="transunet,unet")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    parser.add_argument(
        "--beta", type=float, default=SegLossConfig().beta, help="FN weight, sensitivity loss"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the figures as rows of JSON")
    arguments = parser.parse_args()
    lines, figures = main(arguments)
    print(json.dumps(figures, indent=1) if arguments.json else "\n".join(lines))

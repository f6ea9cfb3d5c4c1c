"""Real display slices (issue 16): the 50 COVID-SemiSeg slices with expert masks through `predict`.

The slices are 8-bit lung-windowed JPEGs, cropped to the thorax; they go through the command a user
runs, ``covidseg predict --intensity window:-1350,150`` (the display-slice lung mask of
``covidseg.imaging.display_lungs``), and are scored per slice with ``covidseg evaluate`` against the
experts' masks (never used for training or tuning). Next to each model, on the same slices and the
same lung mask:

* ``baseline``: mapped HU > -600 inside the lung mask, components under 20 pixels dropped
  (``covidseg.method.pseudo_masks.hu_threshold_baseline``, the threshold baseline of every other table).

    python bench/real_slices.py --model NAME=MODEL [--model ...] [--data DIR] [--out DIR] [--json]
        [--picture PNG]

Prints per method: slices scored / lost, Dice per slice (mean ± std), pooled Dice, sensitivity,
specificity, and the paired per-slice Dice difference against the baseline (mean ± std, wins);
``--json``: the rows of ``bench/run_all.py`` (Dice per slice, target 0.50 for a model; slices lost).
Exit 0 with a note when the data folder is missing.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from covidseg.imaging.display_lungs import segment_display_lungs
from covidseg.imaging.intensity import parse_intensity
from covidseg.io import read_ct, write_array
from covidseg.method.pseudo_masks import hu_threshold_baseline

DEFAULT_DATA = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "covid_semiseg_infnet" / "train"
)
INTENSITY = "window:-1350,150"


def baseline_masks(images: Path, out_dir: Path) -> None:
    """Write the threshold baseline's mask for every image of `images` (NIfTI, source geometry)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mapping = parse_intensity(INTENSITY)
    for path in sorted(images.iterdir()):
        volume, _ = read_ct(path, intensity=mapping)
        lungs = segment_display_lungs(volume.hu).full() > 0
        lesion = hu_threshold_baseline(volume.hu, lungs)
        native = volume.orientation.to_native(lesion.astype(np.uint8))
        write_array(out_dir / f"{path.name.rsplit('.', 1)[0]}.nii.gz", native, volume.geometry)


def covidseg(*args: str) -> None:
    """Run the covidseg command line (this interpreter); fail loudly."""
    subprocess.run([sys.executable, "-m", "covidseg", *args, "--no-progress"], check=True)


def scores(eval_dir: Path) -> dict[str, dict]:
    """Per-slice rows of an evaluate report (metrics.csv), by case id."""
    with open(eval_dir / "metrics.csv", newline="") as f:
        return {row["case_id"]: row for row in csv.DictReader(f)}


def case_figures(rows: dict[str, dict]) -> dict:
    """Per-case Dice (by case id), pooled Dice and mean sensitivity of evaluate's rows (`scores`)."""
    tp, fp, fn = (sum(int(r[k]) for r in rows.values()) for k in ("tp", "fp", "fn"))
    return {
        "dice": {k: float(r["dice"]) for k, r in rows.items()},
        "pooled": 2 * tp / max(2 * tp + fp + fn, 1),
        "sensitivity": float(np.mean([float(r["sensitivity"]) for r in rows.values()])),
    }


def summarise(rows: dict[str, dict], reference: dict[str, dict] | None, n_cases: int) -> dict:
    """Dice per slice (mean ± std) and pooled, sensitivity, specificity (:func:`case_figures` and
    evaluate's rows); paired difference against `reference`."""
    figures = case_figures(rows)
    dice = np.array(list(figures["dice"].values()))
    out = {
        "scored": len(rows),
        "lost": n_cases - len(rows),
        "dice_mean": float(dice.mean()),
        "dice_std": float(dice.std()),
        "dice_pooled": figures["pooled"],
        "sensitivity": figures["sensitivity"],
        "specificity": float(np.mean([float(r["specificity"]) for r in rows.values()])),
    }
    if reference is not None:
        shared = sorted(set(rows) & set(reference))
        diff = np.array([float(rows[k]["dice"]) - float(reference[k]["dice"]) for k in shared])
        out.update(paired_mean=float(diff.mean()), paired_std=float(diff.std()), wins=int((diff > 0).sum()))
    return out


def picture(images: Path, truth: Path, pred: Path, path: Path, n: int = 8) -> None:
    """Every k-th slice: the image, the experts' mask (red), the display-slice lung mask (yellow)
    and the model's mask (cyan)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    files = sorted(images.iterdir())[:: max(1, len(list(images.iterdir())) // n)][:n]
    fig, axes = plt.subplots(2, (n + 1) // 2, figsize=(3.2 * ((n + 1) // 2), 6.8))
    mapping = parse_intensity(INTENSITY)
    for ax, path_in in zip(axes.ravel(), files, strict=False):
        stem = path_in.name.rsplit(".", 1)[0]
        volume, _ = read_ct(path_in, intensity=mapping)
        lungs = volume.orientation.to_native(segment_display_lungs(volume.hu).full())[0] > 0
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(path_in)))
        expert = sitk.GetArrayFromImage(sitk.ReadImage(str(truth / f"{stem}.png"))) > 127
        model = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / f"{stem}.nii.gz"))).reshape(expert.shape)
        ax.imshow(image, cmap="gray")
        for mask, colour in ((lungs, "yellow"), (expert, "red"), (model > 0, "cyan")):
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=colour, linewidths=0.7)
        ax.set_title(stem, fontsize=9)
        ax.axis("off")
    fig.suptitle("lungs (yellow), experts (red), model (cyan)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=64)
    plt.close(fig)


TARGET_DICE = 0.50  # issue 16: Dice per slice of a model through predict


def _row(name: str, value, target, ratio, ok) -> dict:
    return {"name": name, "value": value, "unit": "", "target": target, "ratio": ratio, "ok": ok}


def rows(results: dict[str, dict]) -> list[dict]:
    """run_all rows: Dice per slice (models: target 0.50) and slices lost (target none lost)."""
    out = []
    for name, r in results.items():
        target = None if name == "baseline" else TARGET_DICE
        ratio = None if target is None else round(r["dice_mean"] / target, 3)
        dice = round(r["dice_mean"], 3)
        ok = None if target is None else r["dice_mean"] >= target
        out.append(_row(f"real slices, {name}: Dice per slice", dice, target, ratio, ok))
        out.append(_row(f"real slices, {name}: slices lost", r["lost"], 0, None, r["lost"] == 0))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with Imgs/ and GT/")
    parser.add_argument("--model", action="append", default=[], help="NAME=MODEL (.onnx, best.pt or name)")
    parser.add_argument("--out", type=Path, default=Path("bench-work/real_slices"))
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--picture", type=Path, help="PNG of 8 slices with the first model's masks")
    args = parser.parse_args()
    images, truth = args.data / "Imgs", args.data / "GT"
    if not images.is_dir():
        print(f"no data at {images}: nothing to measure")
        return 0
    n_cases = len(list(images.iterdir()))
    baseline_masks(images, args.out / "pred-baseline")
    covidseg("evaluate", "--pred", str(args.out / "pred-baseline"), "--ref", str(truth),
             "-o", str(args.out / "eval-baseline"), "--overwrite")  # fmt: skip
    reference = scores(args.out / "eval-baseline")
    results = {"baseline": summarise(reference, None, n_cases)}
    for spec in args.model:
        name, _, model = spec.partition("=")
        pred = args.out / f"pred-{name}"
        covidseg(
            "predict", str(images), "-o", str(pred), "--model", model, "--intensity", INTENSITY, "--overwrite"
        )
        covidseg("evaluate", "--pred", str(pred), "--ref", str(truth), "-o", str(args.out / f"eval-{name}"),
                 "--overwrite")  # fmt: skip
        results[name] = summarise(scores(args.out / f"eval-{name}"), reference, n_cases)
    if args.picture and args.model:
        picture(images, truth, args.out / f"pred-{args.model[0].partition('=')[0]}", args.picture)
    if args.json:
        print(json.dumps(rows(results), indent=2))
        return 0
    print(f"{'method':<22} scored lost  Dice/slice       pooled  sens   spec    vs baseline (wins)")
    for name, r in results.items():
        paired = (
            f"{r['paired_mean']:+.3f} ± {r['paired_std']:.3f} ({r['wins']}/{r['scored']})"
            if "wins" in r
            else ""
        )
        print(
            f"{name:<22} {r['scored']:>6} {r['lost']:>4}  {r['dice_mean']:.3f} ± {r['dice_std']:.3f}  "
            f"{r['dice_pooled']:.3f}  {r['sensitivity']:.3f}  {r['specificity']:.4f}  {paired}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

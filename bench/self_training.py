"""One round of label-free self-training (issue 16, item 3): a teacher refreshes the pseudo-labels.

    python bench/self_training.py --masks MASKS --teacher SEG_OR_MODEL --out NEW_MASKS
    python bench/recipes.py ... --variant student="..." --masks "student=NEW_MASKS_{seed}"

The teacher (a train-seg folder or model file, e.g. the same seed's run of the current recipe) runs
on make-masks' 2D training slices. Its confident pixels (probability >= t) join the pseudo-masks
(binary: union; soft: the larger of the soft mask and the teacher's probability). t is chosen without
labels, the way make-masks calibrates its thresholds: the lowest t of 0.50, 0.55, ..., 0.95 at which
the refreshed masks flag at most ``--healthy-budget`` % (default 1) of the healthy training slices'
lung. The high/low/mid slice sets are recomputed from the new masks; images, lungs and the manifest
are copied.

Printed, label-free: t, the share of mask pixels the round added and the % of healthy training lung
flagged before and after (the stopping rule: another round only while a round adds >= 1 % of the
mask pixels). When the masks folder has reference masks (phantoms), their Dice and sensitivity
against the old and new pseudo-labels are printed too, for information only: they choose nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from covidseg.inference.model_files import open_seg_model
from covidseg.inference.runners import OnnxRunner, TorchRunner
from covidseg.method.pseudo_masks import PseudoMaskConfig, split_slices


def teacher_probabilities(model_path: Path, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """The teacher's lesion probabilities [N, H, W] on `images` [N, H, W] (preprocess scale)."""
    model = open_seg_model(model_path)
    if model.kind == "torch":
        runner = TorchRunner(model.torch_model(), "cpu")
    else:
        runner = OnnxRunner(str(model.path), "cpu")
    logits = np.concatenate([runner(images[i : i + batch, None])[:, 0] for i in range(0, len(images), batch)])
    return 1.0 / (1.0 + np.exp(-logits))


def healthy_share(mask: np.ndarray, lungs: np.ndarray, healthy: np.ndarray) -> float:
    """% of the healthy slices' lung that `mask` flags."""
    return 100.0 * float(mask[healthy].sum()) / max(float(lungs[healthy].sum()), 1.0)


def teacher_threshold(old, prob, lungs, healthy, budget: float) -> float | None:
    """The lowest t in 0.50..0.95 whose refreshed masks flag <= `budget` % of healthy lung (None: none)."""
    for t in np.round(np.arange(0.50, 0.951, 0.05), 2):
        if healthy_share(old | ((prob >= t) & lungs), lungs, healthy) <= budget:
            return float(t)
    return None


def scores(mask: np.ndarray, refs: np.ndarray) -> str:
    tp = float((mask & refs).sum())
    dice = 2 * tp / max(float(mask.sum() + refs.sum()), 1.0)
    return f"Dice {dice:.3f}, sensitivity {tp / max(float(refs.sum()), 1.0):.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--masks", type=Path, required=True, help="a make-masks output folder")
    parser.add_argument("--teacher", type=Path, required=True, help="a train-seg folder, .pt or .onnx")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--healthy-budget", type=float, default=1.0, help="%% of healthy lung flagged, at most"
    )
    args = parser.parse_args()
    manifest = json.loads((args.masks / "manifest.json").read_text())
    folder = args.masks / "slices"
    images, lungs = np.load(folder / "images.npy"), np.load(folder / "lungs.npy") > 0
    soft, old = np.load(folder / "soft.npy"), np.load(folder / "binary.npy") > 0
    with open(folder / "index.csv", newline="") as fh:
        index = list(csv.DictReader(fh))
    healthy = np.array([row["group"] == "healthy" for row in index])
    prob = teacher_probabilities(args.teacher, images)
    t = teacher_threshold(old, prob, lungs, healthy, args.healthy_budget)
    if t is None:
        sys.exit(
            f"{args.teacher}: even at p >= 0.95 the refreshed masks flag more than {args.healthy_budget} % "
            "of healthy lung"
        )
    confident = (prob >= t) & lungs
    new = old | confident
    flagged = [healthy_share(m, lungs, healthy) for m in (old, new)]
    added = 100.0 * (new & ~old).sum() / max(old.sum(), 1)
    print(
        f"t = {t:.2f}: added {added:.1f} % of the mask pixels; "
        f"healthy lung flagged {flagged[0]:.2f} -> {flagged[1]:.2f} %"
    )
    if (folder / "refs.npy").exists():
        refs = np.load(folder / "refs.npy") > 0
        covid = ~healthy
        before, after = scores(old[covid], refs[covid]), scores(new[covid], refs[covid])
        print(f"COVID slices' pseudo-labels vs references (information): {before} -> {after}")

    out = args.out / "slices"
    out.mkdir(parents=True, exist_ok=False)
    for name in ("images", "lungs", "refs"):
        if (folder / f"{name}.npy").exists():
            shutil.copyfile(folder / f"{name}.npy", out / f"{name}.npy")
    np.save(out / "binary.npy", new.astype(np.uint8))
    np.save(out / "soft.npy", np.where(confident, np.maximum(soft, prob), soft).astype(np.float32))
    _write_index(out / "index.csv", index, new, lungs, PseudoMaskConfig(**manifest["config"]))
    manifest["self_training"] = {
        "teacher": str(args.teacher),
        "added_percent": added,
        "healthy_flagged": flagged,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return 0


def _write_index(path: Path, index: list[dict], binary: np.ndarray, lungs: np.ndarray, config) -> None:
    """index.csv with each slice's set and lesion fraction recomputed from the new masks (every slice
    keeps its place: it had enough lung for make-masks)."""
    every_slice = replace(config, min_lung_fraction=0.0)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(index[0]))
        writer.writeheader()
        for k, row in enumerate(index):
            (_, kind, fraction), *_ = split_slices(binary[k : k + 1], lungs[k : k + 1], every_slice)
            writer.writerow({**row, "set": kind, "lesion_fraction": round(fraction, 5)})


if __name__ == "__main__":
    sys.exit(main())

"""Pseudo-mask hysteresis (issue 16): make-masks settings scored on phantoms the GAN never saw.

    python bench/hysteresis.py --demo DEMO [--family DIR ...] [--settings off,g97,h99.8g98,...] [--out DIR]

DEMO is a `covidseg demo` output folder (its work/pre, work/gan and phantoms/test are used; nothing in it
is written). For each setting, ``make-masks`` runs the demo's trained generator on the test phantoms
(the demo's seed + 1) and on each ``--family`` synth folder (preprocessed here with the demo's
settings), and ``evaluate`` scores the binary pseudo-masks against the phantoms' truth. Settings:

* ``off``: today's calibrated threshold (train-gan's, the 99th percentile of healthy training lungs);
* ``g<Q>``: hysteresis, growing into connected lung above the Q-th percentile;
* ``h<P>g<Q>``: the binary threshold at the P-th percentile and growth at the Q-th (``h<P>g``: no growth).

Every percentile is of the *healthy training* lungs' differences (label-free; make-masks calibrates
what train-gan did not). Prints per setting and phantom set: Dice per volume (mean ± std), pooled Dice,
sensitivity, % of healthy lung flagged, and the paired per-volume Dice difference against ``off``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from covidseg.config import PreprocessConfig
from covidseg.stages.evaluate import run_evaluate
from covidseg.stages.make_masks import run_make_masks
from covidseg.stages.preprocess import run_preprocess


def overrides(setting: str) -> dict:
    """'off' | 'g<Q>' | 'h<P>g[<Q>]' -> PseudoMaskConfig fields."""
    if setting == "off":
        return {}
    if setting.startswith("g"):
        return {"grow_percentile": float(setting[1:])}
    healthy, _, grow = setting[1:].partition("g")
    return {"healthy_percentile": float(healthy), **({"grow_percentile": float(grow)} if grow else {})}


def score(gan: Path, pre: Path, reference: Path, setting: str, out: Path) -> dict:
    """make-masks with generator `gan` and `setting` on `pre`, scored against `reference` (a synth
    manifest; also used by bench/gan_lesions.py)."""
    masks = out / f"masks-{setting}"
    manifest = run_make_masks(pre, gan, masks, "cpu", native=True, overwrite=True,
                              overrides=overrides(setting))  # fmt: skip
    run_evaluate(masks / "pseudo_masks", reference, out / f"eval-{setting}", overwrite=True)
    with open(out / f"eval-{setting}" / "metrics.csv", newline="") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    tp, fp, fn = (sum(int(r[k]) for r in rows.values()) for k in ("tp", "fp", "fn"))
    healthy = [c["pseudo_lesion_percent_of_lung"] for c in manifest["cases"] if c["group"] == "healthy"]
    return {
        "dice": {k: float(r["dice"]) for k, r in rows.items()},
        "pooled": 2 * tp / max(2 * tp + fp + fn, 1),
        "sensitivity": float(np.mean([float(r["sensitivity"]) for r in rows.values()])),
        "healthy_flagged_pct": float(np.mean(healthy)),
        "threshold": manifest["threshold"],
        "grow_threshold": manifest["grow_threshold"],
    }


def family_grids(demo: Path, family: Path, out: Path) -> Path:
    """A synth folder preprocessed with the demo's settings (once)."""
    pre = out / "pre"
    if not (pre / "manifest.json").exists():
        config = json.loads((demo / "work" / "config.json").read_text())["preprocess"]
        run_preprocess(
            pre, healthy=family / "healthy", covid=family / "covid", config=PreprocessConfig.from_json(config)
        )
    return pre


def report(name: str, results: dict[str, dict]) -> None:
    off = results.get("off")
    print(f"\n{name}: setting, Dice per volume, pooled, sensitivity, healthy flagged %, paired vs off (wins)")
    for setting, r in results.items():
        dice = np.array(list(r["dice"].values()))
        line = f"  {setting:<12} {dice.mean():.3f} ± {dice.std():.3f}  {r['pooled']:.3f}  "
        line += f"{r['sensitivity']:.3f}  {r['healthy_flagged_pct']:.2f}"
        if off is not None and setting != "off":
            diff = np.array([d - off["dice"][k] for k, d in r["dice"].items()])
            line += f"  {diff.mean():+.3f} ± {diff.std():.3f} ({int((diff > 0).sum())}/{diff.size})"
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="a covidseg demo output folder")
    parser.add_argument("--family", type=Path, action="append", default=[], help="another synth folder")
    parser.add_argument("--settings", default="off,g98,h99.8g,h99.8g98")
    parser.add_argument("--out", type=Path, default=Path("bench-work/hysteresis"))
    args = parser.parse_args()
    sets = {"demo test": (args.demo / "work" / "pre_test", args.demo / "phantoms" / "test" / "manifest.json")}
    for family in args.family:
        sets[family.name] = (
            family_grids(args.demo, family, args.out / family.name),
            family / "manifest.json",
        )
    for name, (pre, reference) in sets.items():
        out = args.out / name.replace(" ", "_")
        gan = args.demo / "work" / "gan"
        results = {s: score(gan, pre, reference, s, out) for s in args.settings.split(",")}
        report(name, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

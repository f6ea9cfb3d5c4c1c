"""GAN lesion looks (issue 16): train-gan with the extra synthetic-lesion looks on and off, over seeds,
scored by the pseudo-masks its generator makes.

    python bench/gan_lesions.py --demo DEMO \\
        --set "demo test=DEMO/work/pre_test,DEMO/phantoms/test/manifest.json" \\
        --set "family2=FAMILY_PRE,FAMILY/manifest.json" [--seeds 0,1,2] [--out bench-work/gan_lesions]
    python bench/gan_lesions.py --out bench-work/gan_lesions --table

DEMO is a `covidseg demo` output folder: its work/pre are the training grids and its work/config.json
the train-gan settings (600 steps of the tiny preset on 16x64x64 crops). Per variant and seed:
``train-gan`` with the variant's ``[train-gan.lesions]`` (calibrated with today's make-masks defaults),
then ``make-masks`` (native outputs) and ``evaluate`` on every ``--set`` (preprocessed grids and the
synth manifest that holds their truth; the training grids, DEMO/work/pre with
DEMO/phantoms/train/manifest.json, score the labels train-seg learns from). Variants: ``plain``
(today's lesions), ``looks`` (fine_mix 1, reversed halo 0.3, crazy paving 0.3, air bronchograms
0.4, the shares train-seg's 2D lesions use) and each of the four alone (``fine_mix``,
``reversed_halo``, ``crazy_paving``, ``air_bronchogram``).

Results go to OUT/results.jsonl (one line per variant, seed and set; a finished run is not repeated);
``--table`` prints per variant and set the mean ± std over seeds of the per-run mean Dice, pooled Dice,
sensitivity, % of healthy lung flagged, and the paired per-volume Dice difference against ``plain``
(pooled over seeds: mean ± std, wins). Nothing is tuned on a label.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from covidseg.config import GanTrainConfig
from covidseg.method.pseudo_masks import PseudoMaskConfig
from covidseg.stages.train_gan import run_train_gan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hysteresis import score  # noqa: E402  (make-masks + evaluate on one phantom set, shared)

LOOKS = {  # each look at the share train-seg's 2D lesions use
    "fine_mix": {"fine_mix": 1.0},
    "reversed_halo": {"reversed_halo_probability": 0.3},
    "crazy_paving": {"crazy_paving_probability": 0.3},
    "air_bronchogram": {"air_bronchogram_probability": 0.4},
}
VARIANTS = {"plain": {}, "looks": {k: v for look in LOOKS.values() for k, v in look.items()}, **LOOKS}


def train(demo: Path, variant: str, seed: int, out: Path, steps: int | None) -> Path:
    """The variant's generator for `seed` (trained once, kept under OUT; `steps`: the demo's if None)."""
    gan = out / f"{variant}-seed{seed}" / "gan"
    if not (gan / "manifest.json").exists():
        settings = json.loads((demo / "work" / "config.json").read_text())["train-gan"]
        settings.update(seed=seed, lesions=VARIANTS[variant])
        if steps is not None:  # a quick check of the script
            settings.update(steps=steps, checkpoint_every=steps, sample_every=steps)
        run_train_gan(demo / "work" / "pre", gan, GanTrainConfig.from_json(settings), "cpu",
                      mask_config=PseudoMaskConfig())  # fmt: skip
    return gan


def table(results: list[dict]) -> None:
    sets = dict.fromkeys(r["set"] for r in results)
    for name in sets:
        runs = [r for r in results if r["set"] == name]
        plain = {r["seed"]: r["dice"] for r in runs if r["variant"] == "plain"}
        print(f"\n{name}: variant, seeds, Dice per volume (mean ± std over seeds), pooled, sensitivity, "
              "healthy flagged %, paired vs plain (wins)")  # fmt: skip
        for variant in dict.fromkeys(r["variant"] for r in runs):
            mine = [r for r in runs if r["variant"] == variant]
            means = [np.mean(list(r["dice"].values())) for r in mine]
            line = f"  {variant:<15} {len(mine)}  {np.mean(means):.3f} ± {np.std(means):.3f}"
            for key in ("pooled", "sensitivity", "healthy_flagged_pct"):
                values = [r[key] for r in mine]
                line += f"  {np.mean(values):.3f} ± {np.std(values):.3f}"
            paired = [r for r in mine if r["seed"] in plain]
            diffs = [d - plain[r["seed"]][case] for r in paired for case, d in r["dice"].items()]
            if variant != "plain" and diffs:
                diffs = np.array(diffs)
                line += f"  {diffs.mean():+.3f} ± {diffs.std():.3f} ({int((diffs > 0).sum())}/{diffs.size})"
            print(line)


def measure(demo: Path, sets: dict, variants: list[str], seeds: list[int], out: Path, steps) -> None:
    """Every variant and seed on every set, appended to OUT/results.jsonl (finished runs are kept)."""
    log = out / "results.jsonl"
    earlier = [json.loads(line) for line in log.open()] if log.exists() else []
    done = {(r["variant"], r["seed"], r["set"]) for r in earlier}
    for seed in seeds:
        for variant in variants:
            gan = train(demo, variant, seed, out, steps)
            for name, (pre, reference) in sets.items():
                if (variant, seed, name) in done:
                    continue
                run = out / f"{variant}-seed{seed}" / name.replace(" ", "_")
                result = score(gan, pre, reference, "off", run)  # "off": the generator's calibration
                with log.open("a") as f:
                    f.write(json.dumps({"variant": variant, "seed": seed, "set": name, **result}) + "\n")
                print(name, variant, seed, f"{np.mean(list(result['dice'].values())):.3f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, help="a covidseg demo output folder (its work/ is read)")
    parser.add_argument("--set", action="append", default=[], help="NAME=PRE,MANIFEST")
    parser.add_argument("--variants", default="plain,looks")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("bench-work/gan_lesions"))
    parser.add_argument("--steps", type=int, help="train-gan steps (default: the demo's)")
    parser.add_argument("--table", action="store_true", help="print the table of OUT/results.jsonl")
    args = parser.parse_args()
    log = args.out / "results.jsonl"
    if not args.table:
        sets = {}
        for item in args.set:
            name, _, paths = item.partition("=")
            pre, reference = paths.split(",")
            sets[name] = (Path(pre), Path(reference))
        seeds = [int(s) for s in args.seeds.split(",")]
        measure(args.demo, sets, args.variants.split(","), seeds, args.out, args.steps)
    table([json.loads(line) for line in log.open()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

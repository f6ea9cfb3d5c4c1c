"""Phantom lesion variety (issue 16): the label-free pipeline trained on COVID phantoms whose lesions
vary per case (``synth --lesion-variety``) against the same pipeline on today's phantoms, over seeds.

    python bench/phantom_variety.py --demo DEMO --out bench-work/phantom_variety \\
        [--healthy NORMAL002] [--seeds 0,1,2]
    python bench/phantom_variety.py --demo DEMO --out bench-work/phantom_variety --rescore TAG
    python bench/phantom_variety.py --out bench-work/phantom_variety --table [--against NAME]

DEMO is a `covidseg demo` output folder: its training phantoms (synth seed 0, 16 healthy + 16 COVID),
its grids (work/pre) and its settings. Variants:

* ``plain``: the demo's own phantoms;
* ``varied``: the same 16 healthy phantoms and the same 16 COVID patients (synth seed 0) with
  ``--lesion-variety``: each COVID case draws its own lesion style (see ``covidseg synth --help``).

Per seed: one GAN (the demo's for seed 0, else ``train-gan`` with the demo's settings and that seed;
with the demo's ``w_adv = 0`` the generator learns from the healthy grids only, which both variants
share, so both use it), then per variant ``make-masks`` (the defaults) and ``bench/recipes.py``'s run:
``train-seg`` (the demo's 600 steps, that seed), ``export``, ``predict`` + ``evaluate`` on the demo's
test phantoms, the second phantom family, the 50 real display slices and the real healthy CT; and on
``varied test``: the demo's 12 test patients (synth seed 1) with lesion variety, which no run trains
on. Nothing is tuned on a label. Results: OUT/results.jsonl (a finished run is not repeated);
``--table`` prints recipes.py's table (paired per volume against ``plain``, same seed, or
``--against``). ``--rescore TAG`` scores every finished run's model again with the code installed now
(no training), as variant ``<variant>+TAG`` in OUT/results-TAG.jsonl: a change in predict measured on
the same models.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gan_lesions  # noqa: E402  (the demo-settings GAN per seed, shared)
import real_slices  # noqa: E402
import recipes  # noqa: E402

SETS = ("demo", "varied_test", "family2", "real")


def synth_varied(demo: Path, folder: str, out: Path) -> Path:
    """The demo's phantoms of `folder` (train or test) again, with lesion variety (made once)."""
    target = out / f"phantoms-varied-{folder}"
    if not (target / "manifest.json").exists():
        p = json.loads((demo / "phantoms" / folder / "manifest.json").read_text())["parameters"]
        args = ["synth", "-o", str(target), "--healthy", str(p["n_healthy"]), "--covid", str(p["n_covid"])]
        args += ["--seed", str(p["seed"]), "--shape", ",".join(map(str, p["shape_zyx"]))]
        args += ["--spacing", ",".join(map(str, p["spacing_zyx"])), "--lesion-variety"]
        recipes.covidseg(*args)
    return target


def grids(demo: Path, variant: str, out: Path) -> Path:
    """The training grids of `variant` (the demo's own for plain; preprocessed once for varied)."""
    if variant == "plain":
        return demo / "work" / "pre"
    pre = out / "pre-varied"
    if not (pre / "manifest.json").exists():
        phantoms = synth_varied(demo, "train", out)
        recipes.covidseg("preprocess", "--healthy", str(phantoms / "healthy"),
                         "--covid", str(phantoms / "covid"), "-o", str(pre), "--workers", "2")  # fmt: skip
    return pre


def gan_for(demo: Path, seed: int, out: Path) -> Path:
    """The seed's generator: the demo's own for seed 0, else trained once with its settings."""
    return demo / "work" / "gan" if seed == 0 else gan_lesions.train(demo, "plain", seed, out / "gans", None)


def one_run(args, variant: str, seed: int) -> dict:
    masks = args.out / f"{variant}-seed{seed}" / "masks"
    if not (masks / "manifest.json").exists():
        pre, gan = grids(args.demo, variant, args.out), gan_for(args.demo, seed, args.out)
        recipes.covidseg("make-masks", str(pre), "--gan", str(gan), "-o", str(masks), "--overwrite")
    result = recipes.one_run(args, variant, "", masks, seed)
    run = args.out / f"{variant}-seed{seed}"
    return {**result, "varied_test": varied_scores(args, run / "model.onnx", run)}


def varied_scores(args, model: Path, out: Path) -> dict:
    """`model` on the varied test phantoms (outputs under `out`/varied)."""
    return recipes.phantom_scores(model, synth_varied(args.demo, "test", args.out), out / "varied")


def rescore(args, finished: dict, tag: str) -> dict:
    """A finished run's model scored again on every set with today's code (no training), as variant
    ``<variant>+<tag>``: what a change in predict does to the same models."""
    run = args.out / f"{finished['variant']}-seed{finished['seed']}"
    model, out = run / "model.onnx", run / f"rescore-{tag}"
    return {
        "variant": f"{finished['variant']}+{tag}", "seed": finished["seed"],
        **recipes.model_scores(args, model, out), "varied_test": varied_scores(args, model, out),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, help="a covidseg demo output folder")
    parser.add_argument("--out", type=Path, default=Path("bench-work/phantom_variety"))
    parser.add_argument("--real", type=Path, default=real_slices.DEFAULT_DATA)
    parser.add_argument("--healthy", type=Path, action="append", default=[recipes.HEALTHY_DATA],
                        help="real healthy CT (files, folders; normal002 of bench/real_ct.py)")  # fmt: skip
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="plain,varied")
    parser.add_argument(
        "--rescore", metavar="TAG", help="score the finished runs' models again (today's code)"
    )
    parser.add_argument("--table", action="store_true", help="print the table of OUT/results*.jsonl")
    parser.add_argument("--against", default="plain", help="the variant the table pairs the others with")
    args = parser.parse_args()
    log = args.out / "results.jsonl"
    if args.rescore:
        args.test = args.demo / "phantoms" / "test"
        tagged = args.out / f"results-{args.rescore}.jsonl"
        done = {(r["variant"], r["seed"]) for r in recipes._read(tagged)}
        for finished in recipes._read(log):
            if (f"{finished['variant']}+{args.rescore}", finished["seed"]) not in done:
                with open(tagged, "a") as f:
                    f.write(json.dumps(rescore(args, finished, args.rescore)) + "\n")
    elif not args.table:
        args.out.mkdir(parents=True, exist_ok=True)
        args.test, args.steps = args.demo / "phantoms" / "test", 600
        done = {(r["variant"], r["seed"]) for r in recipes._read(log)}
        for seed in (int(s) for s in args.seeds.split(",")):
            for variant in args.variants.split(","):
                if (variant, seed) not in done:
                    result = one_run(args, variant, seed)
                    with open(log, "a") as f:
                        f.write(json.dumps(result) + "\n")
    results = [r for path in sorted(args.out.glob("results*.jsonl")) for r in recipes._read(path)]
    baselines = {}
    if args.demo is not None:
        args.test = args.demo / "phantoms" / "test"
        baselines = recipes._baselines(args)
        baselines["varied_test"] = recipes.baseline_scores(synth_varied(args.demo, "test", args.out),
                                                           args.out / "baseline-varied_test")  # fmt: skip
    recipes.table(results, baselines, args.against, SETS)
    recipes.healthy_table(results)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"phantom_variety: {exc}") from exc

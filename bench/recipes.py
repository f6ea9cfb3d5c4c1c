"""Training recipes over seeds (issue 16): train-seg variants on one GAN's pseudo-masks, each scored on
the demo's test phantoms, a second phantom family and the 50 real display slices.

    python bench/recipes.py --work DEMO/work --test DEMO/phantoms/test --out bench-work/recipes \\
        --variant base= --variant display="--display-p 0.5 --blur-p 0.3" [--masks NAME=DIR] \\
        [--seeds 0,1,2] [--steps 600]
    python bench/recipes.py --out bench-work/recipes --table

Per variant and seed: ``covidseg train-seg`` on WORK/masks (or the variant's ``--masks`` folder, e.g.
made by ``make-masks --grow-percentile``) with the demo's settings (600 steps, best step chosen every
100 on held-out pseudo-labels) plus the variant's arguments, ``export``, then ``predict`` +
``evaluate`` on

* the demo's unseen test phantoms (``--test``, the demo's seed + 1): Dice per volume and pooled, and
  the % of healthy lung flagged (predict's read-out on the healthy test phantoms);
* a second phantom family made once by this script and fixed before any tuning: synth seeds from 900,
  2.5 mm slices of 1.3 mm pixels (96 x 256 x 256) and 6-14 lesions per case instead of 1-10;
* the 50 real COVID-SemiSeg display slices (``bench/real_slices.py``'s protocol).

Nothing is tuned on a label: the labels only score. Results go to OUT/results.jsonl (one line per run,
kept across invocations: a finished run is not repeated); ``--table`` prints, per variant, the mean ±
std over seeds of the per-run means and the paired per-volume (per-slice) Dice difference against the
first variant (or ``--against NAME``), pooled over seeds (mean ± std, wins).
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_slices  # noqa: E402  (the real-slice protocol, shared)

HEALTHY_DATA = real_slices.DEFAULT_DATA.parents[1] / "healthy_chest_ct"
FAMILY_SEED = 900
FAMILY_SHAPE = (96, 256, 256)
FAMILY_SPACING = (2.5, 1.3, 1.3)
FAMILY_LESIONS = (6, 14)
FAMILY_COUNTS = (4, 8)  # healthy, COVID


def covidseg(*args: str, progress: bool = False, check: bool = True) -> None:
    """Run the covidseg command line (this interpreter); fail loudly unless `check` is False."""
    flags = [] if progress else ["--no-progress"]
    subprocess.run([sys.executable, "-m", "covidseg", *args, *flags], check=check)


def second_family(out: Path) -> Path:
    """The second phantom family (made once; its settings are fixed above, before tuning)."""
    if (out / "manifest.json").exists():
        return out
    from covidseg.imaging import phantom
    from covidseg.stages import synth

    synth.make_phantom = functools.partial(phantom.make_phantom, n_lesions=FAMILY_LESIONS)
    synth.run_synth(out, *FAMILY_COUNTS, FAMILY_SEED, FAMILY_SHAPE, FAMILY_SPACING)
    return out


def _evaluate(pred: Path, reference: Path, out: Path) -> None:
    covidseg("evaluate", "--pred", str(pred), "--ref", str(reference), "-o", str(out), "--overwrite")


def _predict_and_evaluate(model: Path, inputs: list[Path], reference: Path, out: Path, *flags: str) -> dict:
    pred = out / "pred"
    covidseg("predict", *map(str, inputs), "-o", str(pred), "--model", str(model), "--overwrite", *flags)
    _evaluate(pred, reference, out / "eval")
    return real_slices.scores(out / "eval")


def phantom_scores(model: Path, test: Path, out: Path) -> dict:
    """predict + evaluate on a synth folder: per-volume Dice, pooled, sensitivity, healthy flagged %."""
    rows = _predict_and_evaluate(model, [test / "covid", test / "healthy"], test / "manifest.json", out)
    flagged = [
        json.loads((out / "pred" / f"{p.name.split('.')[0]}.json").read_text())["involvement_pct"]
        for p in sorted((test / "healthy").iterdir())
    ]
    return {**real_slices.case_figures(rows), "healthy_flagged_pct": float(np.mean(flagged))}


def baseline_scores(test: Path, out: Path) -> dict:
    """HU > -600 inside the classical lung mask on a synth folder, scored like a model (made once)."""
    from covidseg.imaging.lungs import segment_lungs
    from covidseg.io import read_ct, write_array
    from covidseg.method.pseudo_masks import hu_threshold_baseline

    pred = out / "pred"
    if not (out / "eval" / "metrics.csv").exists():
        pred.mkdir(parents=True, exist_ok=True)
        for path in sorted((test / "covid").iterdir()) + sorted((test / "healthy").iterdir()):
            volume, _ = read_ct(path)
            lungs = segment_lungs(volume.hu, volume.spacing_zyx).full() > 0
            mask = hu_threshold_baseline(volume.hu, lungs)
            stem = path.name.split(".")[0]
            write_array(
                pred / f"{stem}.nii.gz", volume.orientation.to_native(mask.astype(np.uint8)), volume.geometry
            )
            (pred / f"{stem}.json").write_text(
                json.dumps({"involvement_pct": 100.0 * mask.sum() / max(lungs.sum(), 1)})
            )
        _evaluate(pred, test / "manifest.json", out / "eval")
    flagged = [json.loads((pred / f"{p.name.split('.')[0]}.json").read_text())["involvement_pct"]
               for p in sorted((test / "healthy").iterdir())]  # fmt: skip
    return {
        **real_slices.case_figures(real_slices.scores(out / "eval")),
        "healthy_flagged_pct": float(np.mean(flagged)),
    }


def real_scores(model: Path, out: Path, data: Path) -> dict:
    """predict + evaluate on the real display slices (Imgs/, GT/); `lost`: slices without a mask."""
    flags = ("--intensity", real_slices.INTENSITY)
    rows = _predict_and_evaluate(model, [data / "Imgs"], data / "GT", out, *flags)
    return {**real_slices.case_figures(rows), "lost": len(list((data / "Imgs").iterdir())) - len(rows)}


def healthy_real_scores(model: Path, out: Path, inputs: list[Path]) -> dict[str, float]:
    """% of lung flagged on real healthy CT (predict's read-out), per case that has lungs."""
    pred = out / "pred"
    covidseg("predict", *map(str, inputs), "-o", str(pred), "--model", str(model), "--overwrite", check=False)
    records = (json.loads(p.read_text()) for p in sorted(pred.glob("*.json")) if p.name != "report.json")
    return {r["case_id"]: r["involvement_pct"] for r in records if r.get("status") == "ok"}


def one_run(args, name: str, extra: str, masks: Path, seed: int) -> dict:
    run = args.out / f"{name}-seed{seed}"
    seg = run / "seg"
    if not (seg / "best.pt").exists():
        covidseg("train-seg", str(masks), "-o", str(seg), "--steps", str(args.steps), "--eval-every", "100",
                 "--seed", str(seed), *shlex.split(extra))  # fmt: skip
    model = run / "model.onnx"
    covidseg("export", str(seg), "-o", str(model), "--overwrite", progress=True)  # export has no bar
    scores = model_scores(args, model, run)
    return {"variant": name, "seed": seed, "args": extra, "masks": str(masks), **scores}


def model_scores(args, model: Path, out: Path) -> dict:
    """`model` on the demo's test phantoms, the second family, the real slices and the real healthy CT
    (outputs under `out`)."""
    return {
        "demo": phantom_scores(model, args.test, out / "demo"),
        "family2": phantom_scores(model, second_family(args.out / "family2"), out / "family2"),
        "real": real_scores(model, out / "real", args.real),
        "healthy_real": healthy_real_scores(model, out / "healthy_real", args.healthy),
    }


def _mean_std(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std():.3f}"


def table(
    results: list[dict],
    baselines: dict[str, dict],
    against: str | None = None,
    sets: tuple[str, ...] = ("demo", "family2", "real"),
) -> None:
    """Per variant and set: mean ± std over seeds of the per-run means; paired differences vs
    `against` (default: the first variant). The HU baseline (one run: it has no seed) comes first,
    compared with each."""
    variants = list(dict.fromkeys(r["variant"] for r in results))
    by = {(r["variant"], r["seed"]): r for r in results}
    first = against or variants[0]
    for data in sets:
        print(f"\n{data}: variant, seeds, Dice per volume (mean ± std over seeds), pooled, sensitivity,"
              f" {'lost' if data == 'real' else 'healthy flagged %'}, paired vs {first} (wins)")  # fmt: skip
        if data in baselines:
            b = baselines[data]
            extra = b.get("healthy_flagged_pct", b.get("lost", 0))
            print(f"  {'HU baseline':<16} -  {np.mean(list(b['dice'].values())):.3f}  {b['pooled']:.3f}  "
                  f"{b['sensitivity']:.3f}  {extra:.3f}")  # fmt: skip
        for v in variants:
            runs = [r for r in results if r["variant"] == v]
            means = [np.mean(list(r[data]["dice"].values())) for r in runs]
            extra = "lost" if data == "real" else "healthy_flagged_pct"
            references = {
                r["seed"]: by[(first, r["seed"])][data]["dice"] for r in runs if (first, r["seed"]) in by
            }
            paired = _paired(runs, data, references) if v != first else ""
            if data in baselines:
                hu = baselines[data]["dice"]
                paired += f"  vs HU baseline {_paired(runs, data, {r['seed']: hu for r in runs})}"
            columns = [_mean_std(means)] + [
                _mean_std([r[data][k] for r in runs]) for k in ("pooled", "sensitivity", extra)
            ]
            print(f"  {v:<16} {len(runs)}  " + "  ".join(columns) + f"  {paired}")


def _paired(runs: list[dict], data: str, references: dict[int, dict[str, float]]) -> str:
    """Per-case Dice differences of `runs` against `references` (by seed), pooled: mean ± std (wins/n)."""
    diffs = [
        d - references[r["seed"]][k]
        for r in runs if r["seed"] in references
        for k, d in r[data]["dice"].items() if k in references[r["seed"]]
    ]  # fmt: skip
    return f"{_mean_std(diffs)} ({sum(d > 0 for d in diffs)}/{len(diffs)})" if diffs else ""


def healthy_table(results: list[dict]) -> None:
    """Per variant: % of lung flagged on each real healthy CT, mean ± std over seeds."""
    print("\nreal healthy CT, % of lung flagged (mean ± std over seeds)")
    for v in dict.fromkeys(r["variant"] for r in results):
        runs = [r["healthy_real"] for r in results if r["variant"] == v and "healthy_real" in r]
        cases = sorted(set().union(*runs)) if runs else []
        print(f"  {v:<16} " + "  ".join(f"{c} {_mean_std([r[c] for r in runs if c in r])}" for c in cases))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="a demo's work folder (masks/ = the pseudo-masks)")
    parser.add_argument("--test", type=Path, help="the demo's test phantoms (synth folder)")
    parser.add_argument("--real", type=Path, default=real_slices.DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("bench-work/recipes"))
    parser.add_argument(
        "--healthy", type=Path, action="append", default=[HEALTHY_DATA],
        help="real healthy CT (files or folders; normal002 of bench/real_ct.py too)",
    )  # fmt: skip
    parser.add_argument("--variant", action="append", default=[], help="NAME=EXTRA TRAIN-SEG ARGS")
    parser.add_argument(
        "--masks", action="append", default=[], help="NAME=MAKE-MASKS FOLDER ({seed}: the run's seed)"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--table", action="store_true", help="print the table of OUT/results.jsonl")
    parser.add_argument("--against", help="the variant the table pairs the others with (default: the first)")
    args = parser.parse_args()
    log = args.out / "results.jsonl"
    if not args.table:
        args.out.mkdir(parents=True, exist_ok=True)
        masks = dict(spec.split("=", 1) for spec in args.masks)
        done = {(r["variant"], r["seed"]) for r in _read(log)}
        for seed in (int(s) for s in args.seeds.split(",")):
            for spec in args.variant:
                name, _, extra = spec.partition("=")
                if (name, seed) in done:
                    continue
                masks_dir = Path(masks.get(name, str(args.work / "masks")).format(seed=seed))
                result = one_run(args, name, extra, masks_dir, seed)
                with open(log, "a") as f:
                    f.write(json.dumps(result) + "\n")
        _complete(log, args)
    table(_read(log), _baselines(args), args.against)
    healthy_table(_read(log))
    return 0


def _baselines(args) -> dict[str, dict]:
    """The HU baseline on the test phantoms, the second family and the real slices (made once)."""
    out: dict[str, dict] = {}
    if args.test is not None:
        out["demo"] = baseline_scores(args.test, args.out / "baseline-demo")
    if (args.out / "family2" / "manifest.json").exists():
        out["family2"] = baseline_scores(args.out / "family2", args.out / "baseline-family2")
    real = args.out / "baseline-real"
    if not (real / "eval" / "metrics.csv").exists():
        real_slices.baseline_masks(args.real / "Imgs", real / "pred")
        _evaluate(real / "pred", args.real / "GT", real / "eval")
    out["real"] = {**real_slices.case_figures(real_slices.scores(real / "eval")), "lost": 0}
    return out


def _complete(log: Path, args) -> None:
    """Score the real healthy CT for runs logged before that section existed (their models are kept)."""
    results = _read(log)
    missing = [r for r in results if "healthy_real" not in r]
    for r in missing:
        run = args.out / f"{r['variant']}-seed{r['seed']}"
        r["healthy_real"] = healthy_real_scores(run / "model.onnx", run / "healthy_real", args.healthy)
    if missing:
        log.with_suffix(".tmp").write_text("".join(json.dumps(r) + "\n" for r in results))
        log.with_suffix(".tmp").replace(log)


def _read(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


if __name__ == "__main__":
    raise SystemExit(main())

"""Real whole-thorax CT (issue 13): lungs and lesions on three COVID-CT-MD scans, each method next to
an HU-threshold baseline inside the same lung mask, against the radiologists' slice-level labels.

The scans (COVID-19 P002, pneumonia cap002, normal002; 512x512, 2 mm, table and arms in view) come
from ../shared/tools/get_covid_ct_md.sh (read its header); they are never copied into the repository.

    python bench/real_ct.py --data DIR [--model NAME=MODEL ...] [--out bench-work/real_ct] [--json]

Per scan and method: lung mL, lesion mL and % of lung, CT-0..4 (the read-out of `predict`); slice
AUC (slice score = lesion area in mm², label = the radiologists' 0/1 infection label), slice
sensitivity and specificity at >= 50 mm² of lesion; for normal002 the % of lung flagged is the
false-positive rate. Methods:

* ``baseline``: HU > -600 inside the lung mask, components under 20 voxels dropped
  (``covidseg.method.pseudo_masks.hu_threshold_baseline``), on the lung mask of ``covidseg.imaging.lungs``;
* each ``--model NAME=MODEL``: ``covidseg predict`` (the command a user runs, default flags, with
  ``--snapshots``) with that model (an exported .onnx, a train-seg best.pt or a model-home name).

Writes ``OUT/<scan>.png`` (coronal view, axial slices with each method's mask, the slice score strip
against the labels) and ``OUT/pred-<NAME>/`` (predict's own outputs). Exit 0 with a note when the
data folder is missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

from covidseg.imaging.lungs import segment_lungs
from covidseg.imaging.readout import read_out
from covidseg.io import read_ct, read_mask
from covidseg.method.pseudo_masks import hu_threshold_baseline

SCANS = ("P002", "cap002", "normal002")
POSITIVE_MM2 = 50.0  # a slice with at least this much lesion counts as infected


def slice_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for 0/1 `labels` (ties count half); None without both."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if pos.size == 0 or neg.size == 0:
        return None
    ranks = stats.rankdata(np.concatenate([pos, neg]))
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def slice_figures(lesion: np.ndarray, pixel_mm2: float, labels: np.ndarray | None) -> dict:
    """Slice scores (lesion mm² per axial slice) and, with labels, AUC, sensitivity, specificity."""
    scores = lesion.sum(axis=(1, 2)) * pixel_mm2
    out: dict = {"scores_mm2": scores}
    if labels is not None:
        called = scores >= POSITIVE_MM2
        out["auc"] = slice_auc(scores, labels)
        out["sensitivity"] = float(called[labels == 1].mean()) if (labels == 1).any() else None
        out["specificity"] = float((~called[labels == 0]).mean()) if (labels == 0).any() else None
    return out


def run_predict(name: str, model: str, data: Path, out: Path) -> Path:
    """`covidseg predict` over the three scans with `model`; returns its output folder."""
    pred = out / f"pred-{name}"
    inputs = [str(data / s) for s in SCANS]
    cmd = [sys.executable, "-m", "covidseg", "predict", *inputs, "-o", str(pred), "--model", model,
           "--snapshots", "--overwrite", "--no-progress"]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(cmd, check=False)
    print(f"  predict with {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return pred


def scan_labels(data: Path, scan: str, n_slices: int) -> np.ndarray | None:
    """The radiologists' 0/1 labels in canonical order (inferior -> superior), or None (normal)."""
    labels = json.loads((data / "labels.json").read_text()).get(scan)
    if labels is None:
        return None
    if len(labels) != n_slices:
        raise SystemExit(f"{data / 'labels.json'}: {scan} has {len(labels)} labels for {n_slices} slices")
    return np.asarray(labels[::-1], dtype=np.int8)  # stored superior -> inferior


def method_row(lesion: np.ndarray, lungs: np.ndarray, voxel_ml: float, pixel_mm2: float, labels) -> dict:
    readout = read_out(lesion, lungs, voxel_ml)
    figures = slice_figures(lesion, pixel_mm2, labels)
    return {**{k: readout[k] for k in ("lung_ml", "lesion_ml", "involvement_pct", "severity")}, **figures}


def evaluate_scan(data: Path, scan: str, predictions: dict[str, Path]) -> tuple[dict, dict]:
    """Rows per method for one scan, and the arrays the picture needs."""
    volume, _ = read_ct(data / scan)
    spacing = volume.spacing_zyx
    voxel_ml, pixel_mm2 = float(np.prod(spacing)) / 1000.0, spacing[1] * spacing[2]
    lungs = segment_lungs(volume.hu, spacing).full()
    labels = scan_labels(data, scan, volume.hu.shape[0])
    masks = {"baseline": hu_threshold_baseline(volume.hu, lungs)}
    for name, pred in predictions.items():
        path = pred / f"{scan}.nii.gz"
        if not path.exists():
            print(f"  {name}: no mask for {scan} (see {pred / 'report.json'})", file=sys.stderr)
            continue
        native, _ = read_mask(path)
        masks[name] = volume.orientation.to_canonical(native).astype(bool)
    rows = {name: method_row(mask, lungs, voxel_ml, pixel_mm2, labels) for name, mask in masks.items()}
    for name, pred in predictions.items():  # predict's own read-out (its lung mask, grade, warnings)
        record = pred / f"{scan}.json"
        if record.exists() and name in rows:
            case = json.loads(record.read_text())
            rows[name].update(severity=case["severity"], warnings=case.get("warnings", []))
    return rows, {"hu": volume.hu, "lungs": lungs, "masks": masks, "labels": labels, "spacing": spacing}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_table(results: dict[str, dict]) -> None:
    print(f"{'scan':<10} {'method':<12} {'lung mL':>8} {'lesion mL':>9} {'% lung':>7} {'grade':>10} "
          f"{'slice AUC':>9} {'sens':>6} {'spec':>6}")  # fmt: skip
    for scan, rows in results.items():
        for name, r in rows.items():
            volumes = f"{r['lung_ml']:8.0f} {r['lesion_ml']:9.1f} {r['involvement_pct']:7.2f}"
            sens, spec = _fmt(r.get("sensitivity"), 2), _fmt(r.get("specificity"), 2)
            slices = f"{_fmt(r.get('auc')):>9} {sens:>6} {spec:>6}"
            print(f"{scan:<10} {name:<12} {volumes} {_fmt(r['severity']):>10} {slices}")


def json_rows(results: dict[str, dict]) -> list[dict]:
    """Rows for bench/run_all.py (issue 13 targets where there is one)."""
    out = []
    for scan, rows in results.items():
        for name, r in rows.items():
            out.append({"name": f"{scan} {name}: lung volume", "value": r["lung_ml"], "unit": "mL",
                        "target": None, "ratio": None, "ok": None})  # fmt: skip
            if scan == "normal002":
                out.append({"name": f"normal002 {name}: % of lung flagged", "value": r["involvement_pct"],
                            "unit": "%", "target": 1.0, "ratio": round(r["involvement_pct"] / 1.0, 3),
                            "ok": r["involvement_pct"] <= 1.0})  # fmt: skip
            if r.get("auc") is not None:
                target = 0.95 if scan == "P002" else None
                ratio = None if target is None else round(r["auc"] / target, 3)
                out.append({"name": f"{scan} {name}: slice AUC", "value": round(r["auc"], 3), "unit": "",
                            "target": target, "ratio": ratio,
                            "ok": None if target is None else r["auc"] >= target})  # fmt: skip
    return out


def picture(scan: str, arrays: dict, rows: dict, path: Path) -> None:
    """Coronal view, four axial slices (each method's mask in colour), slice scores vs labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hu, lungs, masks, labels, spacing = (arrays[k] for k in ("hu", "lungs", "masks", "labels", "spacing"))
    learned_colours = [(1.0, 0.1, 0.1), (1.0, 0.8, 0.0), (0.2, 1.0, 0.2)]
    colours = {"baseline": (0.2, 0.6, 1.0)}
    colours |= {name: learned_colours[i % 3] for i, name in enumerate(n for n in masks if n != "baseline")}
    window = np.clip((hu + 1350.0) / 1500.0, 0, 1)
    lung_z = np.flatnonzero(lungs.any(axis=(1, 2)))
    learned = [m for n, m in masks.items() if n != "baseline"]
    area = (learned[0] if learned else masks["baseline"]).sum(axis=(1, 2)) * (lungs.sum(axis=(1, 2)) > 0)
    picks = sorted({int(lung_z[len(lung_z) * q // 5]) for q in (1, 3)} | set(np.argsort(-area)[:2].tolist()))
    y_mid = int(np.flatnonzero(lungs.any(axis=(0, 2))).mean())
    fig = plt.figure(figsize=(4.2 * (len(picks) + 1), 9.5))
    grid = fig.add_gridspec(2, len(picks) + 1, height_ratios=[4, 1.3])

    def draw(ax, image, mask_by_name, lung, aspect=1.0):
        rgb = np.repeat(image[..., None], 3, axis=2)
        for name, mask in mask_by_name.items():
            rgb[mask] = 0.45 * rgb[mask] + 0.55 * np.array(colours[name])
        ax.imshow(rgb, aspect=aspect, interpolation="nearest")
        ax.contour(lung > 0, [0.5], colors="yellow", linewidths=0.5)
        ax.set_axis_off()

    ax = fig.add_subplot(grid[0, 0])
    draw(ax, window[::-1, y_mid, :], {n: m[::-1, y_mid, :] for n, m in masks.items()}, lungs[::-1, y_mid, :],
         aspect=spacing[0] / spacing[2])  # fmt: skip
    ax.set_title(f"{scan} coronal (head up)")
    for i, z in enumerate(picks):
        ax = fig.add_subplot(grid[0, i + 1])
        draw(ax, window[z], {n: m[z] for n, m in masks.items()}, lungs[z])
        label = "" if labels is None else f", label {int(labels[z])}"
        ax.set_title(f"axial z={z}{label}")
    ax = fig.add_subplot(grid[1, :])
    z = np.arange(hu.shape[0])
    if labels is not None:
        ax.fill_between(z, 0, labels, step="mid", color="0.85", label="radiologists: infected")
    for name, r in rows.items():
        scores = r["scores_mm2"]
        ax.plot(z, scores / max(scores.max(), 1.0), color=colours[name], lw=1.2,
                label=f"{name} (AUC {_fmt(r.get('auc'))}, {r['involvement_pct']:.2f} % of lung)")  # fmt: skip
    ax.set_xlabel("slice (inferior → superior)")
    ax.set_ylabel("lesion area / max")
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("bench-work/covid_ct_md"),
                        help="folder made by ../shared/tools/get_covid_ct_md.sh")  # fmt: skip
    parser.add_argument("--model", action="append", default=[], metavar="NAME=MODEL",
                        help="a segmenter to run through predict, repeatable")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench-work/real_ct"))
    parser.add_argument("--json", action="store_true", help="print the figures as rows of JSON")
    args = parser.parse_args()
    if not all((args.data / s).is_dir() for s in SCANS):
        print(
            f"no COVID-CT-MD scans in {args.data}: run ../shared/tools/get_covid_ct_md.sh first",
            file=sys.stderr,
        )
        if args.json:
            print("[]")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    predictions = {}
    for spec in args.model:
        name, _, model = spec.partition("=")
        if not model:
            parser.error(f"--model takes NAME=MODEL, got {spec!r}")
        predictions[name] = run_predict(name, model, args.data, args.out)
    results = {}
    for scan in SCANS:
        rows, arrays = evaluate_scan(args.data, scan, predictions)
        results[scan] = rows
        picture(scan, arrays, rows, args.out / f"{scan}.png")
    if args.json:
        print(json.dumps(json_rows(results), indent=1))
    else:
        print_table(results)
        print(f"pictures: {args.out}/<scan>.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

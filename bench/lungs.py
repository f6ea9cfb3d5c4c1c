"""Quality of the classical lung segmentation used by `preprocess`.

Phantoms (default size, 64x256x256 at 5x1.4x1.4 mm, COVID seeds 0..N-1): lung Dice against the
phantom lung mask (target >= 0.95) and the share of lesion voxels inside the lung mask
(target >= 0.98). Real HU data in ../shared/data: Dice against the Zenodo COVID-19-CT-Seg lung masks
(target >= 0.9) and lung volumes found on the LIDC slice and the TotalSegmentator CTA crops.

    python bench/lungs.py [--phantoms 16] [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from covidseg.imaging.lungs import segment_lungs
from covidseg.imaging.phantom import make_phantom
from covidseg.io import read_ct

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def phantom_figures(n: int) -> dict:
    dices, inside = [], []
    inside_voxels = lesion_voxels = 0
    for seed in range(n):
        phantom = make_phantom(covid=True, seed=seed)
        lungs = segment_lungs(phantom.hu, phantom.spacing_zyx).full()
        lesion = phantom.lesions > 0
        dices.append(_dice(lungs, phantom.lungs))
        inside.append(float((lungs[lesion] > 0).mean()))
        inside_voxels += int((lungs[lesion] > 0).sum())
        lesion_voxels += int(lesion.sum())
    return {
        "lung_dice": dices,
        "lesion_inside": inside,
        "lesion_inside_pooled": inside_voxels / lesion_voxels,
    }


def zenodo_figures() -> dict:
    folder = SHARED / "zenodo_covid19_ct_seg_slices"
    per_slice, inter, total = {}, 0, 0
    for image_path in sorted(folder.glob("*_image_*.npy")):
        hu = np.load(image_path).astype(np.float32)[None]
        ref = np.load(str(image_path).replace("_image_", "_masks_")) > 0
        found = segment_lungs(hu, (5.0, 0.7, 0.7)).full()[0] > 0  # spacing not stored: ~0.7 mm
        per_slice[image_path.stem.replace("_image", "")] = _dice(found, ref)
        inter, total = inter + int((found & ref).sum()), total + int(found.sum() + ref.sum())
    return {"per_slice": per_slice, "pooled": 2.0 * inter / total}


def healthy_volumes() -> dict:
    out = {}
    for name in (
        "lidc_chest_slice_lungmask_testdata_0.dcm",
        "totalseg_chest_cta_crop_pulmonary.nii.gz",
        "totalseg_chest_cta_crop_aorta.nii.gz",
    ):
        volume, _ = read_ct(SHARED / "healthy_chest_ct" / name)
        labels = segment_lungs(volume.hu, volume.spacing_zyx).full()
        voxel_ml = float(np.prod(volume.spacing_zyx)) / 1000.0
        out[name] = ((labels == 1).sum() * voxel_ml, (labels == 2).sum() * voxel_ml)
    return out


def _row(name: str, value: float, unit: str = "", target: float | None = None) -> dict:
    """One figure for bench/run_all.py; `target` is a lower bound."""
    ok = None if target is None else bool(value >= target)
    ratio = None if target is None else round(value / target, 3)
    return {"name": name, "value": round(float(value), 3), "unit": unit, "target": target, "ratio": ratio,
            "ok": ok}  # fmt: skip


def rows(n_phantoms: int = 16) -> list[dict]:
    """The benchmark's figures as rows {name, value, unit, target, ratio, ok}."""
    ph = phantom_figures(n_phantoms)
    z = zenodo_figures()
    out = [
        _row(f"phantom lung Dice, mean of {n_phantoms}", np.mean(ph["lung_dice"]), "", 0.95),
        _row("  min over phantoms", np.min(ph["lung_dice"])),
        _row("phantom lesion voxels inside the lung mask, pooled", ph["lesion_inside_pooled"], "", 0.98),
        _row("Zenodo COVID-19-CT-Seg slices, lung Dice pooled", z["pooled"], "", 0.9),
    ]
    for name, (right, left) in healthy_volumes().items():
        out.append(_row(f"lungs found (right + left), {name}", right + left, "mL"))
    return out


def main(n_phantoms: int = 16) -> None:
    ph = phantom_figures(n_phantoms)
    d, i = np.array(ph["lung_dice"]), np.array(ph["lesion_inside"])
    print(f"phantoms (n={n_phantoms}, default size)")
    print(f"  lung Dice            mean {d.mean():.3f} ± {d.std():.3f}  min {d.min():.3f}   (target >= 0.95)")
    print(
        f"  lesion voxels inside mean {i.mean():.3f} ± {i.std():.3f}  min {i.min():.3f}  "
        f"pooled {ph['lesion_inside_pooled']:.3f}   (target >= 0.98)"
    )
    z = zenodo_figures()
    print("Zenodo COVID-19-CT-Seg slices, lung Dice (target >= 0.9)")
    for name, value in z["per_slice"].items():
        print(f"  {name:<32} {value:.3f}")
    print(f"  pooled                           {z['pooled']:.3f}")
    print("real healthy HU CT: lung found (right, left)")
    for name, (right, left) in healthy_volumes().items():
        print(f"  {name:<42} {right:8.1f} mL {left:8.1f} mL")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phantoms", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (for bench/run_all.py)")
    args = parser.parse_args()
    if args.json:
        print(json.dumps(rows(args.phantoms), indent=1))
    else:
        main(args.phantoms)

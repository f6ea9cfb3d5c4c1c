"""DICOM SEG on real scans: predict --format both --seg-lungs, the SEG read back == the NIfTI mask,
and a picture rendered from the read-back SEG over the source DICOM slices.

    python bench/dicom_seg.py --data DIR --model MODEL.onnx --out OUT [--picture PNG]

DIR holds the three COVID-CT-MD series of ../shared/tools/get_covid_ct_md.sh (P002, cap002,
normal002). Their de-identification emptied SOPInstanceUID and FrameOfReferenceUID and made the
Study/Series UIDs UUIDs, so predict refuses a SEG for them as they are (a SEG must reference its
source instances); this script first checks that refusal, then copies the series to OUT/series with
the UIDs a PACS export carries (deterministic, from the case and file name; pixels, positions and
every other field untouched) and runs the round trip on the copy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

CASES = ("P002", "cap002", "normal002")


def _predict(inputs: list[Path], out: Path, model: Path) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "covidseg", "predict", *map(str, inputs), "-o", str(out),
            "--model", str(model), "--format", "both", "--seg-lungs", "--no-progress"]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True)


def _with_uids(source: Path, target: Path, case: str) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    target.mkdir(parents=True, exist_ok=True)
    study, series, frame = (generate_uid(entropy_srcs=[case, k]) for k in ("study", "series", "frame"))
    for path in sorted(source.glob("*.dcm")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=[case, path.name]
        )
        ds.save_as(target / path.name)


def _round_trip(series: Path, out: Path, case: str) -> dict:
    from covidseg.io.dicom import read_dicom_folder
    from covidseg.io.dicom_seg import LESION_LABEL, read_dicom_seg

    files = read_dicom_folder(series, None)[3]
    segments = read_dicom_seg(out / f"{case}.seg.dcm", files)
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz"))) > 0
    record = json.loads((out / f"{case}.json").read_text(encoding="utf-8"))
    frames = int(segments[LESION_LABEL].any(axis=(1, 2)).sum())
    return {"case": case, "seg_equals_nifti": bool(np.array_equal(segments[LESION_LABEL], nifti)),
            "lesion_voxels": int(nifti.sum()), "slices_with_lesion": frames, "slices": len(files),
            "lesion_ml": record["lesion_ml"], "severity": record["severity"], "files": files,
            "segments": segments}  # fmt: skip


def _picture(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from covidseg.io.dicom_seg import LESION_LABEL, LUNGS_LABEL

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 5.4))
    for ax, r in zip(np.atleast_1d(axes), results, strict=True):
        lesion, lungs = r["segments"][LESION_LABEL], r["segments"][LUNGS_LABEL]
        k = int(np.argmax((lesion if lesion.any() else lungs).sum(axis=(1, 2))))
        hu = sitk.GetArrayFromImage(sitk.ReadImage(r["files"][k]))[0]  # SimpleITK applies the rescale
        ax.imshow(np.clip(hu, -1350, 150), cmap="gray")
        ax.contour(lungs[k], levels=[0.5], colors="yellow", linewidths=0.8)
        ax.imshow(np.ma.masked_where(~lesion[k], lesion[k]), cmap="autumn", alpha=0.5)
        ax.set_title(f"{r['case']}: slice {k + 1} of {r['slices']}, {r['lesion_ml']:.1f} mL, {r['severity']}")
        ax.axis("off")
    fig.suptitle("DICOM SEG read back (highdicom) over its source DICOM slices: lesions red, lungs yellow")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=72)


def main(data: Path, model: Path, out: Path, picture: Path | None) -> None:
    refused = _predict([data / CASES[0]], out / "as-distributed", model)
    print(f"as distributed: exit {refused.returncode}:", refused.stdout.strip().splitlines()[-1])
    for case in CASES:
        _with_uids(data / case, out / "series" / case, case)
    result = _predict([out / "series" / c for c in CASES], out / "pred", model)
    if result.returncode != 0:
        raise SystemExit(result.stdout + result.stderr)
    results = [_round_trip(out / "series" / c, out / "pred", c) for c in CASES]
    for r in results:
        print({k: v for k, v in r.items() if k not in ("files", "segments")})
    if picture:
        _picture(results, picture)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="folder with P002, cap002, normal002")
    parser.add_argument("--model", type=Path, required=True, help="an exported .onnx (with sidecar)")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for copies and outputs")
    parser.add_argument("--picture", type=Path, default=None, help="write the overlay PNG here")
    args = parser.parse_args()
    main(args.data, args.model, args.out, args.picture)

"""Benchmark: `predict` on full-size synthetic chest CTs (issue 5 targets).

    python bench/predict.py [--model best.pt] [--repeats 3]

Figures (each measured run in a fresh child process, so its peak RSS is its own):

* 512x512x300 @ 1 mm, ONNX Runtime on the CPU, read -> lungs -> network -> write mask + read-out:
  target <= 10 s on 2 cores.
* ONNX Runtime / torch eager throughput (slices/s) on the same model and slices: target >= 1.3.
* predict wall / (read the input + write a mask of its size): target <= 3.
* peak RSS predicting a 512x512x600 scan: target <= 3 GB.
* the `--snapshots` PNG of a 512x512x300 scan (slice choice + drawing + writing): target <= 0.5 s.
* on a GPU (when one is usable): seconds per 512x512x300 scan and scans per minute over 20 scans.
* the DICOM SEG (`predict --format dicom-seg`) of a 512x512x300 DICOM series, headers read +
  SEG built + written, next to the NIfTI write of the same mask: target <= 1.5 s and <= 2x.

`--model` takes a train-seg best.pt (default: an untrained tiny TransUNet, the default preset:
the compute is the same; only the mask content, and so its compression, differs).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 10.0
TARGET_ORT_SPEEDUP = 1.3
TARGET_IO_RATIO = 3.0
TARGET_RSS_GB = 3.0
TARGET_SNAPSHOT_SECONDS = 0.5
TARGET_SEG_SECONDS = 1.5
TARGET_SEG_RATIO = 2.0
SPACING = (1.0, 0.7, 0.7)  # mm, z y x: a typical thin-slice chest CT


def _untrained_model(path: Path) -> None:
    import torch

    from covidseg.inference.ct_segment import SlicePreprocessing
    from covidseg.inference.model_files import MODEL_FORMAT
    from covidseg.learning.loop import save_checkpoint
    from covidseg.models.segmenters import make_segmenter, segmenter_config_dict

    torch.manual_seed(0)
    model = make_segmenter("transunet", "tiny")
    spec = SlicePreprocessing(hu_window=(-1000.0, 400.0), slice_size=(128, 128), slab_mm=9.0)
    payload = {
        "format": MODEL_FORMAT,
        "model": {"arch": "transunet", "config": segmenter_config_dict(model)},
        "weights": model.state_dict(),
        "preprocessing": spec.to_json(),
    }
    save_checkpoint(path, payload)


def _child_predict(image: Path, model: Path, out_dir: Path, backend: str, device: str) -> None:
    """One case through predict; prints timings and this process's peak RSS."""
    from covidseg.inference.model_files import open_seg_model
    from covidseg.io import read_ct
    from covidseg.stages.predict import PredictOptions, make_runner, predict_volume

    seg = open_seg_model(model)
    runner = make_runner(seg, backend, device)
    start = time.perf_counter()
    volume, note = read_ct(image)
    read_s = time.perf_counter() - start
    record = predict_volume("bench", volume, note, runner, seg, out_dir, PredictOptions())
    seconds = time.perf_counter() - start
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps({"seconds": seconds, "read_s": read_s, "rss_gb": rss_gb, "runs_on": runner.description,
                      "involvement_pct": record["involvement_pct"]}))  # fmt: skip


def _child_io(image: Path, mask: Path, out_dir: Path) -> None:
    """The floor: read the CT and write a mask of its size (the mask predict wrote)."""
    import SimpleITK as sitk

    from covidseg.io import read_ct, write_image

    labels = sitk.ReadImage(str(mask))
    start = time.perf_counter()
    read_ct(image)
    write_image(out_dir / "floor.nii.gz", labels)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def _child_snapshot(image: Path, out_dir: Path, repeats: int = 3) -> None:
    """Seconds of one overlay montage (predict --snapshots) of the CT, with its classical lung mask
    and a lesion-like mask (lung voxels above -700 HU), median of `repeats`."""
    from covidseg.imaging.lungs import segment_lungs
    from covidseg.io import read_ct
    from covidseg.reporting.plots import overlay_montage

    volume, _ = read_ct(image)
    lungs = segment_lungs(volume.hu, volume.spacing_zyx).full()
    lesion = (volume.hu > -700) & (lungs > 0)
    times = []
    for k in range(repeats):
        start = time.perf_counter()
        overlay_montage(volume.hu, lesion, lungs, out_dir / f"s{k}.png", title="bench",
                        spacing_zyx=volume.spacing_zyx)  # fmt: skip
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times)}))


def _write_dicom_series(folder: Path, image: Path) -> None:
    """The CT as a DICOM series (one file per slice, UIDs, positions and a Frame of Reference), as a
    scanner would give it to predict."""
    import SimpleITK as sitk

    volume = sitk.Cast(sitk.ReadImage(str(image)), sitk.sitkInt16)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    root = "1.2.826.0.1.3680043.2.1125.7"
    for k in range(volume.GetDepth()):
        slice_k = volume[:, :, k]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{root}.3.{k + 1}",
            "0020|000d": f"{root}.1", "0020|000e": f"{root}.2", "0020|0052": f"{root}.4",
            "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": str(volume.GetSpacing()[2]),
            "0028|1052": "0", "0028|1053": "1",
        }  # fmt: skip
        for key, value in tags.items():
            slice_k.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(slice_k)


def _child_seg(series: Path, mask: Path, out_dir: Path, repeats: int = 3) -> None:
    """Seconds (median of `repeats`) of the DICOM SEG of a predicted mask over its DICOM series
    (headers read, SEG built and written) and of the NIfTI write of the same mask."""
    import SimpleITK as sitk

    from covidseg.io import write_image
    from covidseg.io.dicom import read_dicom_folder
    from covidseg.io.dicom_seg import LESION_LABEL, SegSegment, read_source_headers, write_dicom_seg

    files = read_dicom_folder(series, None)[3]
    labels = sitk.ReadImage(str(mask))
    lesion = sitk.GetArrayFromImage(labels) > 0  # native [z, y, x] = the series' slice order
    seg_s, nifti_s = [], []
    for k in range(repeats):
        start = time.perf_counter()
        headers = read_source_headers(files)  # part of the SEG's cost in predict
        write_dicom_seg(out_dir / f"s{k}.seg.dcm", headers, [SegSegment(LESION_LABEL, lesion)], "b", "b")
        seg_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        write_image(out_dir / f"m{k}.nii.gz", labels)
        nifti_s.append(time.perf_counter() - start)
    print(json.dumps({"seg": statistics.median(seg_s), "nifti": statistics.median(nifti_s),
                      "frames": int(lesion.any(axis=(1, 2)).sum()), "slices": len(files)}))  # fmt: skip


def _child_throughput(model: Path, onnx_model: Path, n_slices: int = 64, repeats: int = 5) -> None:
    """Slices per second of torch eager and ONNX Runtime on the same inputs (CPU, batch 16)."""
    import numpy as np

    from covidseg.inference.model_files import open_seg_model
    from covidseg.inference.runners import OnnxRunner, TorchRunner

    seg = open_seg_model(model)
    h, w = seg.spec.slice_size
    x = np.random.default_rng(0).random((n_slices, 1, h, w), dtype=np.float32)
    result = {}
    for name, run in (
        ("torch", TorchRunner(seg.torch_model(), "cpu")),
        ("onnx", OnnxRunner(str(onnx_model), "cpu")),
    ):
        run(x[:16])  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for k in range(0, n_slices, 16):
                run(x[k : k + 16])
            times.append(time.perf_counter() - start)
        result[name] = n_slices / statistics.median(times)
    print(json.dumps(result))


def _run_child(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def _write_ct(path: Path, shape: tuple[int, int, int]) -> None:
    from covidseg.imaging.geometry import axis_aligned_geometry
    from covidseg.imaging.phantom import make_phantom
    from covidseg.io import write_array

    phantom = make_phantom(shape_zyx=shape, spacing_zyx=SPACING, covid=True, seed=0)
    write_array(path, phantom.hu.round().astype("int16"), axis_aligned_geometry(shape, SPACING))


def _gpu_usable() -> str | None:
    """'cuda' when torch or ONNX Runtime can really use a GPU here, else None."""
    import torch

    from covidseg.stages.doctor import usable_providers

    if torch.cuda.is_available() or usable_providers().get("CUDAExecutionProvider") == "usable":
        return "cuda"
    return None


def main(model: Path | None = None, repeats: int = 3) -> list[dict]:
    from covidseg.stages.export import run_export

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if model is None:
            model = tmp / "untrained.pt"
            _untrained_model(model)
        onnx_model = tmp / "model.onnx"
        run_export(model, onnx_model)
        ct300, ct600 = tmp / "ct300.nii.gz", tmp / "ct600.nii.gz"
        _write_ct(ct300, (300, 512, 512))

        runs = [_run_child("predict", str(ct300), str(onnx_model), str(tmp / "p"), "onnx", "cpu")
                for _ in range(repeats)]  # fmt: skip
        floors = [
            _run_child("io", str(ct300), str(tmp / "p" / "bench.nii.gz"), str(tmp)) for _ in range(repeats)
        ]
        seconds = statistics.median(r["seconds"] for r in runs)
        floor = statistics.median(r["seconds"] for r in floors)
        speed = _run_child("throughput", str(model), str(onnx_model))
        snapshot = _run_child("snapshot", str(ct300), str(tmp))
        _write_dicom_series(tmp / "dicom300", ct300)
        seg = _run_child("seg", str(tmp / "dicom300"), str(tmp / "p" / "bench.nii.gz"), str(tmp))

        _write_ct(ct600, (600, 512, 512))
        big = _run_child("predict", str(ct600), str(onnx_model), str(tmp / "p600"), "onnx", "cpu")

        read_s = statistics.median(r["read_s"] for r in runs)
        speedup = speed["onnx"] / speed["torch"]
        rows += [
            _row(f"predict 512x512x300 @1 mm, ONNX CPU, read->write (median of {repeats})", seconds, "s",
                 TARGET_SECONDS),
            _row("  of which reading the .nii.gz", read_s, "s"),
            _row("ONNX Runtime / torch eager throughput (CPU)", speedup, "x", TARGET_ORT_SPEEDUP, True),
            _row("  torch eager, slices/s", speed["torch"], "1/s"),
            _row("  ONNX Runtime, slices/s", speed["onnx"], "1/s"),
            _row("predict / (read + write a mask)", seconds / floor, "x", TARGET_IO_RATIO),
            _row("  read + write a mask", floor, "s"),
            _row("peak RSS, predict 512x512x600", big["rss_gb"], "GB", TARGET_RSS_GB),
            _row("  wall, 512x512x600", big["seconds"], "s"),
            _row("--snapshots PNG of a 512x512x300 scan", snapshot["seconds"], "s", TARGET_SNAPSHOT_SECONDS),
            _row(f"DICOM SEG of a 512x512x300 series ({seg['frames']} of {seg['slices']} frames)",
                 seg["seg"], "s", TARGET_SEG_SECONDS),
            _row("  SEG / NIfTI write of the same mask", seg["seg"] / seg["nifti"], "x", TARGET_SEG_RATIO),
            _row("  NIfTI write of the mask", seg["nifti"], "s"),
        ]  # fmt: skip

        if _gpu_usable():
            gpu = [_run_child("predict", str(ct300), str(onnx_model), str(tmp / "g"), "onnx", "cuda")
                   for _ in range(20)]  # fmt: skip
            rows += [
                _row(f"GPU ({gpu[0]['runs_on']}): s per 512x512x300 scan",
                     statistics.median(r["seconds"] for r in gpu), "s"),
                _row("GPU: scans per minute over 20 scans", 1200.0 / sum(r["seconds"] for r in gpu), "1/min"),
            ]  # fmt: skip
        else:
            rows.append(_row("GPU figures: no usable GPU on this machine", None, ""))
    return rows


def _row(
    name: str, value: float | None, unit: str, target: float | None = None, at_least: bool = False
) -> dict:
    """One figure; `ok` compares it with `target` (an upper bound unless `at_least`)."""
    ok = None
    if value is not None and target is not None:
        ok = value >= target if at_least else value <= target
    ratio = None if value is None or not target else round(value / target, 2)
    return {"name": name, "value": None if value is None else round(value, 3), "target": target,
            "unit": unit, "ratio": ratio, "ok": ok}  # fmt: skip


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        target = "" if r["target"] is None else f"target {r['target']:g} {r['unit']}"
        value = "n/a" if r["value"] is None else f"{r['value']:g} {r['unit']}"
        verdict = "" if r["ok"] is None else ("ok" if r["ok"] else "MISSED")
        print(f"{r['name']:<62} {value:>14}  {target:<18} {verdict}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, args = sys.argv[2], sys.argv[3:]
        if kind == "predict":
            _child_predict(Path(args[0]), Path(args[1]), Path(args[2]), args[3], args[4])
        elif kind == "io":
            _child_io(Path(args[0]), Path(args[1]), Path(args[2]))
        elif kind == "snapshot":
            _child_snapshot(Path(args[0]), Path(args[1]))
        elif kind == "seg":
            _child_seg(Path(args[0]), Path(args[1]), Path(args[2]))
        else:
            _child_throughput(Path(args[0]), Path(args[1]))
        sys.exit(0)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="a train-seg best.pt (default: untrained tiny)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    rows = main(args.model, args.repeats)
    print(json.dumps(rows, indent=1) if args.json else "", end="")
    if not args.json:
        print_rows(rows)

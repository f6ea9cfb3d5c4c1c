"""export, predict and doctor: ONNX parity, geometry exactness, batches, --continue, model home."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from conftest import LAS, LPS, oblique_direction, save_untrained_segmenter, write_dicom_series
from covidseg.cli import app
from covidseg.errors import InputError, UsageError
from covidseg.imaging.geometry import Geometry, Orientation
from covidseg.imaging.grid import CropBox
from covidseg.imaging.phantom import make_phantom
from covidseg.imaging.readout import read_out, severity
from covidseg.inference.ct_segment import slab_count
from covidseg.inference.model_files import open_seg_model
from covidseg.inference.onnx import onnx_session, sidecar_path
from covidseg.inference.runners import requested_providers
from covidseg.io import write_array
from covidseg.stages.export import run_export

runner = CliRunner()
SHAPE, SPACING = (28, 96, 96), (10.0, 3.75, 3.75)  # small phantoms: a second each


def _invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory):
    """An untrained tiny TransUNet saved as train-seg saves its best.pt: its masks are arbitrary
    but neither empty nor full, which is all geometry and parity checks need."""
    return save_untrained_segmenter(tmp_path_factory.mktemp("model") / "best.pt")


@pytest.fixture(scope="module")
def model_onnx(model_pt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    run_export(model_pt, out)
    return out


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SHAPE, SPACING, covid=True, seed=3)


def _lps_geometry(shape_zyx, spacing_zyx, direction=LPS) -> Geometry:
    size = tuple(int(v) for v in reversed(shape_zyx))
    spacing = tuple(float(v) for v in reversed(spacing_zyx))
    return Geometry(size=size, spacing=spacing, origin=(-180.0, -170.0, -140.0), direction=direction)


# --- export and parity --------------------------------------------------------------------------


def test_export_writes_a_checked_model_and_sidecar(model_pt, model_onnx):
    sidecar = json.loads(sidecar_path(model_onnx).read_text())
    assert sidecar["format"] == "covidseg.onnx-segmenter" and sidecar["opset"] >= 18
    assert sidecar["precision"] == "fp32"
    assert sidecar["parity"]["max_abs_logit_diff"] <= 1e-4
    assert sidecar["parity"]["mask_dice"] >= 0.999
    assert sidecar["preprocessing"]["slice_size"] == [128, 128]
    assert not list(model_onnx.parent.glob(".*tmp*"))

    # the batch dimension is dynamic and ONNX Runtime agrees with torch on new inputs
    torch_model = open_seg_model(model_pt).torch_model()
    session = onnx_session(model_onnx)
    for batch in (1, 5):
        x = torch.rand(batch, 1, 128, 128, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            expected = torch_model(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == (batch, 1, 128, 128)
        assert np.abs(got - expected).max() <= 1e-4


def test_fp16_export_is_checked_at_mask_level(model_pt, tmp_path):
    result = run_export(model_pt, tmp_path / "half.onnx", fp16=True)
    assert result["precision"] == "fp16"
    assert result["parity"]["mask_dice"] >= 0.99


def test_export_refuses_to_overwrite_and_checks_its_arguments(model_pt, model_onnx):
    with pytest.raises(UsageError, match="--overwrite"):
        run_export(model_pt, model_onnx)
    with pytest.raises(UsageError, match=".onnx"):
        run_export(model_pt, model_onnx.with_suffix(".bin"))
    with pytest.raises(UsageError, match="exactly one"):
        run_export(model_pt)


def test_a_model_whose_sha256_does_not_match_its_sidecar_is_refused(model_onnx, tmp_path, phantom):
    tampered = tmp_path / "model.onnx"
    shutil.copy(model_onnx, tampered)
    shutil.copy(sidecar_path(model_onnx), sidecar_path(tampered))
    with open(tampered, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(InputError, match="sha256"):
        open_seg_model(tampered)
    ct = tmp_path / "ct.nii.gz"
    write_array(ct, phantom.hu.astype(np.int16), _lps_geometry(SHAPE, SPACING))
    result = _invoke(
        "predict", str(ct), "-o", str(tmp_path / "out"), "--model", str(tampered), "--no-progress"
    )
    assert result.exit_code == 1
    assert "sha256" in result.output and str(tampered) in result.output
    assert not (tmp_path / "out").exists()

    sidecar_path(tampered).unlink()
    with pytest.raises(InputError, match="no sidecar"):
        open_seg_model(tampered)


# --- predict: geometry, inputs, batches ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_masks_lie_exactly_on_the_input_in_every_orientation(
    model_pt, model_onnx, phantom, tmp_path, backend
):
    """The same voxels stored as LPS, LAS and oblique: each mask has its input's exact geometry,
    and in canonical orientation all three masks are the same."""
    inputs = tmp_path / "in"
    canonical = phantom.hu.astype(np.int16)
    directions = {"lps": LPS, "las": LAS, "oblique": oblique_direction()}
    for name, direction in directions.items():
        geometry = _lps_geometry(SHAPE, SPACING, direction)
        native = Orientation.of(geometry).to_native(canonical)
        write_array(inputs / f"{name}.nii.gz", native, geometry)
    model = model_onnx if backend == "onnx" else model_pt
    out = tmp_path / "out"
    result = _invoke("predict", str(inputs), "-o", str(out), "--model", str(model), "--no-progress")
    assert result.exit_code == 0, result.output

    masks = {}
    for name in directions:
        source = sitk.ReadImage(str(inputs / f"{name}.nii.gz"))
        mask = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        assert mask.GetSize() == source.GetSize()
        assert mask.GetSpacing() == source.GetSpacing()
        assert mask.GetOrigin() == source.GetOrigin()
        # NIfTI keeps the affine in float32: an oblique direction read, written and read again
        # moves by about one float32 ulp (1e-8); axis-aligned ones come back bit for bit
        exact = name != "oblique"
        np.testing.assert_allclose(
            mask.GetDirection(), source.GetDirection(), rtol=0, atol=0 if exact else 1e-6
        )
        assert mask.GetPixelID() == sitk.sitkUInt8
        masks[name] = Orientation.of(Geometry.of(mask)).to_canonical(sitk.GetArrayFromImage(mask))
    assert 0 < masks["lps"].sum() < (phantom.lungs > 0).sum()
    np.testing.assert_array_equal(masks["las"], masks["lps"])
    np.testing.assert_array_equal(masks["oblique"], masks["lps"])

    record = json.loads((out / "lps.json").read_text())
    assert record["status"] == "ok" and record["severity"].startswith("CT-")
    assert record["lung_ml"] > 0 and 0 <= record["involvement_pct"] <= 100
    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == backend and report["predicted"] == 3
    assert "CPU" in report["runs_on"] or "cpu" in report["runs_on"]


def test_dicom_series_and_one_slice_inputs(model_onnx, phantom, tmp_path):
    inputs = tmp_path / "in"
    write_dicom_series(inputs / "series_a", phantom.hu[8:20], spacing_zyx=SPACING)
    one = phantom.hu[14:15].astype(np.int16)
    write_array(inputs / "one_slice.nii.gz", one, _lps_geometry(one.shape, SPACING))
    out = tmp_path / "out"
    result = _invoke("predict", str(inputs), "-o", str(out), "--model", str(model_onnx), "--no-progress")
    assert result.exit_code == 0, result.output

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(inputs / "series_a")))
    series = reader.Execute()
    mask = sitk.ReadImage(str(out / "series_a.nii.gz"))
    assert mask.GetSize() == series.GetSize()
    np.testing.assert_allclose(mask.GetOrigin(), series.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mask.GetSpacing(), series.GetSpacing(), atol=1e-4)
    assert sitk.ReadImage(str(out / "one_slice.nii.gz")).GetSize() == (96, 96, 1)
    assert json.loads((out / "one_slice.json").read_text())["network_slices"] == 1
    # no patient name from the DICOM header in any output
    for path in out.iterdir():
        if path.suffix in (".json", ".csv"):
            assert "Doe" not in path.read_text()


def test_a_broken_file_fails_alone_and_the_batch_exits_1(model_onnx, phantom, tmp_path):
    inputs = tmp_path / "in"
    write_array(inputs / "good.nii.gz", phantom.hu.astype(np.int16), _lps_geometry(SHAPE, SPACING))
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    out = tmp_path / "out"
    result = _invoke("predict", str(inputs), "-o", str(out), "--model", str(model_onnx), "--no-progress")
    assert result.exit_code == 1
    failed = [line for line in result.output.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "broken.nii.gz" in failed[0]
    assert (out / "good.nii.gz").exists() and (out / "good.json").exists()
    assert not list(out.glob("broken*"))
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[1].startswith("broken,failed") and rows[2].startswith("good,ok")
    assert json.loads((out / "report.json").read_text())["failed"][0]["case_id"] == "broken"


def test_continue_skips_complete_cases_and_redoes_incomplete_ones(model_onnx, phantom, tmp_path):
    inputs = tmp_path / "in"
    for k in range(3):
        write_array(inputs / f"c{k}.nii.gz", phantom.hu.astype(np.int16), _lps_geometry(SHAPE, SPACING))
    out = tmp_path / "out"
    args = ["predict", str(inputs), "-o", str(out), "--model", str(model_onnx), "--no-progress"]
    assert _invoke(*args).exit_code == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("c*.nii.gz")}
    (out / "c1.json").unlink()  # as if killed between the mask and its read-out

    again = _invoke(*args)
    assert again.exit_code == 2 and "--continue" in again.output
    result = _invoke(*args, "--continue")
    assert result.exit_code == 0, result.output
    assert "1 case(s)" in result.output and "2 already done" in result.output
    assert (out / "c0.nii.gz").stat().st_mtime_ns == stamps["c0.nii.gz"]
    assert (out / "c1.nii.gz").stat().st_mtime_ns != stamps["c1.nii.gz"]
    assert (out / "c1.json").exists()
    assert len((out / "summary.csv").read_text().splitlines()) == 4


def test_output_folder_must_not_be_an_input_and_outputs_inside_inputs_are_skipped(
    model_onnx, phantom, tmp_path
):
    inputs = tmp_path / "in"
    write_array(inputs / "a.nii.gz", phantom.hu.astype(np.int16), _lps_geometry(SHAPE, SPACING))
    result = _invoke("predict", str(inputs), "-o", str(inputs), "--model", str(model_onnx), "--no-progress")
    assert result.exit_code == 2
    nested = inputs / "pred"
    args = ["predict", str(inputs), "-o", str(nested), "--model", str(model_onnx), "--no-progress"]
    assert _invoke(*args).exit_code == 0
    result = _invoke(*args, "--continue")  # pred/a.nii.gz must not become a second case 'a'
    assert result.exit_code == 0, result.output


def test_model_home_names(model_pt, phantom, tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDSEG_HOME", str(tmp_path / "home"))
    ct = tmp_path / "ct.nii.gz"
    write_array(ct, phantom.hu.astype(np.int16), _lps_geometry(SHAPE, SPACING))
    result = _invoke("predict", str(ct), "-o", str(tmp_path / "o1"), "--model", "mine", "--no-progress")
    assert result.exit_code == 2 and "installed: none" in result.output

    result = _invoke("export", str(model_pt), "--name", "mine")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "home" / "models" / "mine.onnx").exists()
    result = _invoke("predict", str(ct), "-o", str(tmp_path / "o2"), "--model", "mine", "--no-progress")
    assert result.exit_code == 0, result.output
    result = _invoke("doctor", "--json")
    assert result.exit_code == 0
    found = json.loads(result.output)
    assert found["onnxruntime_providers"]["CPUExecutionProvider"] == "usable"
    assert [m["name"] for m in found["home"]["models"]] == ["mine"]
    assert found["home"]["models"][0]["status"] == "ok"


def test_an_implausible_lung_volume_is_a_warning_not_a_grade(model_onnx, phantom, tmp_path):
    """Whole lungs in view (two slices of soft tissue added below and above) of 20 L and of
    0.9 L are warned about and not graded; the same lungs at a plausible size are graded, and a
    scan that cuts the lungs (the phantom itself ends inside them) is graded at 0.9 L. The batch
    still exits 0."""
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    tissue = np.where((yy - 48) ** 2 + (xx - 48) ** 2 < 40**2, 40, -1000)[None].astype(np.int16)
    whole = np.concatenate([tissue, tissue, phantom.hu.astype(np.int16), tissue, tissue])
    inputs = tmp_path / "in"
    cases = {
        "plausible": (whole, SPACING),
        "huge": (whole, (10.0, 7.5, 7.5)),  # 4x the voxel volume: ~21 L
        "small": (whole, (10.0, 1.5, 1.5)),  # ~0.9 L
        "cut": (phantom.hu.astype(np.int16), (10.0, 1.5, 1.5)),
    }
    for name, (hu, spacing) in cases.items():
        write_array(inputs / f"{name}.nii.gz", hu, _lps_geometry(hu.shape, spacing))
    out = tmp_path / "out"
    args = ["predict", str(inputs), "-o", str(out), "--model", str(model_onnx), "--snapshots"]
    result = _invoke(*args, "--no-progress")
    assert result.exit_code == 0, result.output
    records = {name: json.loads((out / f"{name}.json").read_text()) for name in cases}
    for name in ("plausible", "cut"):
        assert records[name]["severity"].startswith("CT-") and records[name]["warnings"] == []
    assert records["plausible"]["lung_ml"] > 1500 and records["cut"]["lung_ml"] < 1500
    for name, shown in (("huge", "outside 1.5-9 L"), ("small", "outside 1.5-9 L")):
        assert records[name]["severity"] is None and records[name]["status"] == "ok"
        assert len(records[name]["warnings"]) == 1 and shown in records[name]["warnings"][0]
        assert f"warning: {name}: lung volume" in result.output
        assert (out / f"{name}.png").is_file() and (out / f"{name}.nii.gz").is_file()
    assert "2 not graded" in result.output and "0 failed" in result.output
    rows = {r["case_id"]: r for r in csv.DictReader(io.StringIO((out / "summary.csv").read_text()))}
    assert rows["huge"]["severity"] == "not graded" and "not graded" in rows["huge"]["warnings"]
    assert rows["plausible"]["severity"].startswith("CT-") and rows["plausible"]["warnings"] == ""
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["not_graded"]) == ["huge", "small"] and report["failed"] == []
    assert {r["case_id"]: r["severity"] for r in report["results"]}["small"] is None

    # --continue reads the not-graded cases back as done and says so again
    again = _invoke(*args, "--continue", "--no-progress")
    assert again.exit_code == 0 and "4 already done" in again.output and "2 not graded" in again.output


# --- small pieces -------------------------------------------------------------------------------


def test_read_out_volumes_and_severity_bands():
    lungs = np.zeros((2, 10, 10), np.uint8)
    lungs[:, :, :5], lungs[:, :, 5:] = 1, 2  # 100 voxels each
    lesion = np.zeros_like(lungs, dtype=bool)
    lesion[0, :, :5] = True  # half the right lung
    lesion[0, :2, 5:] = True  # a fifth of the left lung
    out = read_out(lesion, lungs, voxel_ml=0.5)
    assert out["right"] == {"lesion_ml": 25.0, "lung_ml": 50.0, "involvement_pct": 50.0}
    assert out["left"]["involvement_pct"] == 10.0
    assert out["lesion_ml"] == 30.0 and out["lung_ml"] == 100.0 and out["involvement_pct"] == 30.0
    assert out["severity"] == "CT-2"
    bands = [
        (0, "CT-0"),
        (0.01, "CT-1"),
        (24.99, "CT-1"),
        (25, "CT-2"),
        (50, "CT-3"),
        (75, "CT-4"),
        (100, "CT-4"),
    ]
    assert [severity(p) for p, _ in bands] == [name for _, name in bands]


def test_slab_count_matches_the_training_grid_and_never_drops_to_zero():
    box = CropBox(0, 64, 0, 10, 0, 10)
    assert slab_count(box, (5.0, 1.0, 1.0), slab_mm=10.0) == 32
    assert slab_count(CropBox(0, 1, 0, 10, 0, 10), (1.0, 1.0, 1.0), slab_mm=9.0) == 1


def test_provider_requests():
    assert requested_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(UsageError, match="--device"):
        requested_providers("gpu7")
    if not os.path.exists("/dev/nvidiactl") and not torch.cuda.is_available():
        assert requested_providers("auto") == ["CPUExecutionProvider"]


def test_parts_split_a_batch_without_overlap_or_gap_and_merge(model_onnx, phantom, tmp_path):
    inputs = tmp_path / "in"
    for k in range(3):
        write_array(inputs / f"c{k}.nii.gz", phantom.hu.astype(np.int16), _lps_geometry(SHAPE, SPACING))
    out = tmp_path / "out"
    base = ["predict", str(inputs), "-o", str(out), "--model", str(model_onnx), "--no-progress"]
    assert _invoke(*base, "--num-parts", "2", "--part-id", "0").exit_code == 0
    result = _invoke("merge-reports", str(out))
    assert result.exit_code == 1 and "missing part 2 of 2" in result.output
    assert _invoke(*base, "--num-parts", "2", "--part-id", "1").exit_code == 0
    assert sorted(p.name for p in out.glob("c*.json")) == ["c0.json", "c1.json", "c2.json"]
    parts = [json.loads((out / f"report.part-{i}-of-2.json").read_text()) for i in (1, 2)]
    assert [[r["case_id"] for r in p["results"]] for p in parts] == [["c0", "c2"], ["c1"]]

    result = _invoke("merge-reports", str(out))
    assert result.exit_code == 0, result.output
    rows = (out / "summary.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["c0", "c1", "c2"]
    merged = json.loads((out / "report.json").read_text())
    assert merged["cases"] == 3 and merged["predicted"] == 3 and len(merged["parts"]) == 2
    assert _invoke(*base, "--num-parts", "2", "--part-id", "2").exit_code == 2


def test_a_corrupt_onnx_file_with_a_matching_sidecar_is_refused_in_one_line(model_onnx, phantom, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf" * 100)
    sidecar = json.loads(sidecar_path(model_onnx).read_text())
    sidecar["sha256"] = hashlib.sha256(broken.read_bytes()).hexdigest()
    sidecar_path(broken).write_text(json.dumps(sidecar))
    ct = tmp_path / "ct.nii.gz"
    write_array(ct, phantom.hu.astype(np.int16), _lps_geometry(SHAPE, SPACING))
    result = _invoke("predict", str(ct), "-o", str(tmp_path / "out"), "--model", str(broken), "--no-progress")
    assert result.exit_code == 1
    assert "ONNX Runtime cannot load this model" in result.output and str(broken) in result.output
    assert not (tmp_path / "out").exists()


def test_backend_and_model_kind_must_agree(model_pt, phantom, tmp_path):
    ct = tmp_path / "ct.nii.gz"
    write_array(ct, phantom.hu.astype(np.int16), _lps_geometry(SHAPE, SPACING))
    args = ["predict", str(ct), "-o", str(tmp_path / "out"), "--model", str(model_pt), "--no-progress"]
    result = _invoke(*args, "--backend", "onnx")
    assert result.exit_code == 2 and "needs an .onnx model" in result.output


def test_a_scan_without_lungs_fails_alone(model_onnx, phantom, tmp_path):
    inputs = tmp_path / "in"
    write_array(inputs / "chest.nii.gz", phantom.hu.astype(np.int16), _lps_geometry(SHAPE, SPACING))
    abdomen = np.full(SHAPE, -1000, np.int16)
    zz, yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    abdomen[(yy - 48) ** 2 + (xx - 48) ** 2 < 40**2] = 40  # soft tissue, no air inside the body
    write_array(inputs / "abdomen.nii.gz", abdomen, _lps_geometry(SHAPE, SPACING))
    out = tmp_path / "out"
    result = _invoke("predict", str(inputs), "-o", str(out), "--model", str(model_onnx), "--no-progress")
    assert result.exit_code == 1
    assert "abdomen.nii.gz: no lungs found" in result.output
    assert (out / "chest.json").exists() and not list(out.glob("abdomen*"))

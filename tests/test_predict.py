"""`covidseg predict`: geometry exactness, DICOM and one-slice inputs, batches, --continue, parts."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import SimpleITK as sitk

from _small_inputs import SHAPE, SPACING, invoke, lps_geometry
from conftest import LAS, LPS, oblique_direction, write_dicom_series
from covidseg.imaging.geometry import Geometry, Orientation
from covidseg.io import write_array

# model_pt, model_onnx and phantom are fixtures in conftest.py


# --- geometry, inputs, batches ------------------------------------------------------------------------------


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
        geometry = lps_geometry(SHAPE, SPACING, direction)
        native = Orientation.of(geometry).to_native(canonical)
        write_array(inputs / f"{name}.nii.gz", native, geometry)
    model = model_onnx if backend == "onnx" else model_pt
    out = tmp_path / "out"
    result = invoke("predict", str(inputs), "-o", str(out), "--model", str(model), "--no-progress")
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
    write_array(inputs / "one_slice.nii.gz", one, lps_geometry(one.shape, SPACING))
    out = tmp_path / "out"
    result = invoke("predict", str(inputs), "-o", str(out), "--model", str(model_onnx), "--no-progress")
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
    write_array(inputs / "good.nii.gz", phantom.hu.astype(np.int16), lps_geometry(SHAPE, SPACING))
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    out = tmp_path / "out"
    result = invoke("predict", str(inputs), "-o", str(out), "--model", str(model_onnx), "--no-progress")
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
        write_array(inputs / f"c{k}.nii.gz", phantom.hu.astype(np.int16), lps_geometry(SHAPE, SPACING))
    out = tmp_path / "out"
    args = ["predict", str(inputs), "-o", str(out), "--model", str(model_onnx), "--no-progress"]
    assert invoke(*args).exit_code == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("c*.nii.gz")}
    (out / "c1.json").unlink()  # as if killed between the mask and its read-out

    again = invoke(*args)
    assert again.exit_code == 2 and "--continue" in again.output
    result = invoke(*args, "--continue")
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
    write_array(inputs / "a.nii.gz", phantom.hu.astype(np.int16), lps_geometry(SHAPE, SPACING))
    result = invoke("predict", str(inputs), "-o", str(inputs), "--model", str(model_onnx), "--no-progress")
    assert result.exit_code == 2
    nested = inputs / "pred"
    args = ["predict", str(inputs), "-o", str(nested), "--model", str(model_onnx), "--no-progress"]
    assert invoke(*args).exit_code == 0
    result = invoke(*args, "--continue")  # pred/a.nii.gz must not become a second case 'a'
    assert result.exit_code == 0, result.output


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
        write_array(inputs / f"{name}.nii.gz", hu, lps_geometry(hu.shape, spacing))
    out = tmp_path / "out"
    args = ["predict", str(inputs), "-o", str(out), "--model", str(model_onnx), "--snapshots"]
    result = invoke(*args, "--no-progress")
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
    again = invoke(*args, "--continue", "--no-progress")
    assert again.exit_code == 0 and "4 already done" in again.output and "2 not graded" in again.output


# --- parts, backends, scans without lungs -------------------------------------------------------------------


def test_parts_split_a_batch_without_overlap_or_gap_and_merge(model_onnx, phantom, tmp_path):
    inputs = tmp_path / "in"
    for k in range(3):
        write_array(inputs / f"c{k}.nii.gz", phantom.hu.astype(np.int16), lps_geometry(SHAPE, SPACING))
    out = tmp_path / "out"
    base = ["predict", str(inputs), "-o", str(out), "--model", str(model_onnx), "--no-progress"]
    assert invoke(*base, "--num-parts", "2", "--part-id", "0").exit_code == 0
    result = invoke("merge-reports", str(out))
    assert result.exit_code == 1 and "missing part 2 of 2" in result.output
    assert invoke(*base, "--num-parts", "2", "--part-id", "1").exit_code == 0
    assert sorted(p.name for p in out.glob("c*.json")) == ["c0.json", "c1.json", "c2.json"]
    parts = [json.loads((out / f"report.part-{i}-of-2.json").read_text()) for i in (1, 2)]
    assert [[r["case_id"] for r in p["results"]] for p in parts] == [["c0", "c2"], ["c1"]]

    result = invoke("merge-reports", str(out))
    assert result.exit_code == 0, result.output
    rows = (out / "summary.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["c0", "c1", "c2"]
    merged = json.loads((out / "report.json").read_text())
    assert merged["cases"] == 3 and merged["predicted"] == 3 and len(merged["parts"]) == 2
    assert invoke(*base, "--num-parts", "2", "--part-id", "2").exit_code == 2


def test_backend_and_model_kind_must_agree(model_pt, phantom, tmp_path):
    ct = tmp_path / "ct.nii.gz"
    write_array(ct, phantom.hu.astype(np.int16), lps_geometry(SHAPE, SPACING))
    args = ["predict", str(ct), "-o", str(tmp_path / "out"), "--model", str(model_pt), "--no-progress"]
    result = invoke(*args, "--backend", "onnx")
    assert result.exit_code == 2 and "needs an .onnx model" in result.output


def test_a_scan_without_lungs_fails_alone(model_onnx, phantom, tmp_path):
    inputs = tmp_path / "in"
    write_array(inputs / "chest.nii.gz", phantom.hu.astype(np.int16), lps_geometry(SHAPE, SPACING))
    abdomen = np.full(SHAPE, -1000, np.int16)
    zz, yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    abdomen[(yy - 48) ** 2 + (xx - 48) ** 2 < 40**2] = 40  # soft tissue, no air inside the body
    write_array(inputs / "abdomen.nii.gz", abdomen, lps_geometry(SHAPE, SPACING))
    out = tmp_path / "out"
    result = invoke("predict", str(inputs), "-o", str(out), "--model", str(model_onnx), "--no-progress")
    assert result.exit_code == 1
    assert "abdomen.nii.gz: no lungs found" in result.output
    assert (out / "chest.json").exists() and not list(out.glob("abdomen*"))

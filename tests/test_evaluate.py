"""The `evaluate` stage on tiny NIfTI masks written to tmp_path."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from covidseg import __version__
from covidseg.errors import UsageError
from covidseg.imaging.geometry import axis_aligned_geometry
from covidseg.io import write_array
from covidseg.stages.evaluate import CSV_COLUMNS, PER_SLICE_COLUMNS, run_evaluate

SHAPE = (4, 6, 8)
SPACING = (2.0, 1.0, 0.5)  # mm, z y x -> 1 mm³ per voxel


def write_mask(path, mask, spacing=SPACING):
    write_array(path, np.asarray(mask, dtype=np.uint8), axis_aligned_geometry(mask.shape, spacing))


def block(z, y, x, shape=SHAPE):
    mask = np.zeros(shape, bool)
    mask[z, y, x] = True
    return mask


@pytest.fixture
def refs(tmp_path):
    """Two reference cases: 'a' (2x2x2 block) and 'b' (one row of 4 voxels)."""
    folder = tmp_path / "ref"
    write_mask(folder / "a.nii.gz", block(slice(1, 3), slice(1, 3), slice(1, 3)))
    write_mask(folder / "b.nii.gz", block(2, 3, slice(2, 6)))
    return folder


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def strict_json(path):
    def refuse(name):
        raise AssertionError(f"{name} in JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_self_comparison_is_perfect(tmp_path, refs, capsys):
    calls = []
    result = run_evaluate(
        refs, refs, tmp_path / "out", min_dice=0.99, progress=lambda *call: calls.append(call)
    )
    assert result.ok
    assert [c["case_id"] for c in result.cases] == ["a", "b"]
    for case in result.cases:
        assert case["dice"] == 1.0 and case["iou"] == 1.0 and case["hd95_mm"] == 0.0
        assert case["sensitivity"] == 1.0 and case["specificity"] == 1.0
    assert result.cases[0]["ref_ml"] == pytest.approx(0.008)  # 8 voxels of 1 mm³
    assert [call[:2] for call in calls] == [(1, 2), (2, 2)] and calls[0][2].startswith("a: dice 1.000")
    assert capsys.readouterr() == ("", "")  # the stage never prints
    assert result.metrics_csv == tmp_path / "out" / "metrics.csv"
    assert all(p.is_file() for p in result.paths)


def test_known_metrics_and_files(tmp_path, refs):
    pred = tmp_path / "pred"
    # a: 2x2x2 block shifted by one voxel along x: TP 4, FP 4, FN 4 -> Dice 0.5
    write_mask(pred / "a.nii.gz", block(slice(1, 3), slice(1, 3), slice(2, 4)))
    # b: 2 of the 4 reference voxels -> Dice 2*2/(2+4) = 2/3, sensitivity 0.5
    write_mask(pred / "b.nii.gz", block(2, 3, slice(2, 4)))
    out = tmp_path / "out"
    result = run_evaluate(pred, refs, out)
    assert result.ok
    a, b = result.cases
    assert (a["tp"], a["fp"], a["fn"]) == (4, 4, 4) and a["dice"] == pytest.approx(0.5)
    assert b["dice"] == pytest.approx(2 / 3) and b["sensitivity"] == pytest.approx(0.5)
    assert a["hd95_mm"] == pytest.approx(0.5)  # one voxel along x at 0.5 mm

    rows = read_csv(out / "metrics.csv")
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r[0] for r in rows[1:]] == ["a", "b"]  # one row per case, no summary row
    assert float(rows[1][CSV_COLUMNS.index("dice")]) == pytest.approx(0.5)
    assert int(rows[2][CSV_COLUMNS.index("tp")]) == 2

    summary = strict_json(out / "summary.json")
    assert summary["format"] == "covidseg.evaluate" and summary["version"] == 1
    assert summary["covidseg_version"] == __version__
    assert summary["n_cases"] == 2
    assert summary["aggregate"]["metrics"]["dice"]["mean"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert summary["aggregate"]["pooled"]["dice"] == pytest.approx(2 * 6 / (12 + 4 + 6))
    assert summary["aggregate"]["per_slice_dice"] is None
    assert summary["thresholds"] == {"min_dice": None, "min_sensitivity": None, "min_specificity": None}
    assert summary["failed_thresholds"] == [] and summary["failed_cases"] == []
    assert summary["unmatched"] == {"ref_without_pred": [], "pred_without_ref": []}
    assert [c["case_id"] for c in summary["cases"]] == ["a", "b"]


def test_thresholds_fail_but_report_is_written(tmp_path, refs):
    pred = tmp_path / "pred"
    write_mask(pred / "a.nii.gz", block(slice(1, 3), slice(1, 3), slice(2, 4)))  # Dice 0.5
    write_mask(pred / "b.nii.gz", block(2, 3, slice(2, 6)))  # Dice 1
    result = run_evaluate(
        pred, refs, tmp_path / "out", min_dice=0.9, min_sensitivity=0.7, min_specificity=0.5
    )
    assert not result.ok
    assert result.failed_thresholds == ["dice 0.750 < 0.9"]  # sensitivity 0.75 and specificity pass
    summary = strict_json(tmp_path / "out" / "summary.json")
    assert summary["failed_thresholds"] == ["dice 0.750 < 0.9"]
    assert summary["thresholds"]["min_dice"] == 0.9
    assert (tmp_path / "out" / "metrics.csv").is_file()


def test_threshold_message_never_rounds_up_to_the_threshold(tmp_path):
    pred = tmp_path / "pred"
    ref = np.ones((10, 10, 13), bool)  # 1300 voxels
    write_mask(tmp_path / "ref2" / "c.nii.gz", ref)
    almost = ref.copy()
    almost[0, 0, 0] = False  # Dice 2*1299/(1299+1300) = 0.999615..., "1.000" with 3 decimals
    write_mask(pred / "c.nii.gz", almost)
    result = run_evaluate(pred, tmp_path / "ref2", tmp_path / "out", min_dice=0.9997)
    assert result.failed_thresholds == ["dice 0.9996 < 0.9997"]


def test_invalid_threshold_and_missing_inputs(tmp_path, refs):
    with pytest.raises(UsageError, match="min-dice"):
        run_evaluate(refs, refs, tmp_path / "out", min_dice=-0.1)
    with pytest.raises(UsageError, match="no such"):
        run_evaluate(tmp_path / "nope", refs, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_geometry_mismatch_is_a_failed_case(tmp_path, refs):
    pred = tmp_path / "pred"
    write_mask(pred / "a.nii.gz", block(slice(1, 3), slice(1, 3), slice(1, 3)), spacing=(5.0, 1.0, 0.5))
    write_mask(pred / "b.nii.gz", block(2, 3, slice(2, 6)))
    result = run_evaluate(pred, refs, tmp_path / "out")
    assert not result.ok and result.failed_thresholds == []
    assert [c["case_id"] for c in result.cases] == ["b"]
    (failure,) = result.failed_cases
    assert failure["case_id"] == "a"
    assert str(pred / "a.nii.gz") in failure["error"]
    assert "geometry differs from reference" in failure["error"] and "spacing" in failure["error"]
    summary = strict_json(tmp_path / "out" / "summary.json")
    # summary.json names the files relative to its own folder (the work folder can move)
    relative = {"pred": "../pred/a.nii.gz", "ref": "../ref/a.nii.gz"}
    assert summary["n_cases"] == 1 and summary["failed_cases"] == [{**failure, **relative}]
    assert [r[0] for r in read_csv(tmp_path / "out" / "metrics.csv")[1:]] == ["b"]


def test_all_cases_failed_still_writes_report(tmp_path, refs):
    pred = tmp_path / "pred"
    write_mask(pred / "a.nii.gz", np.zeros((4, 6, 9), bool))  # other size
    (pred / "b.nii.gz").write_bytes(b"")  # unreadable
    result = run_evaluate(pred, refs, tmp_path / "out", min_dice=0.5)
    assert result.cases == [] and len(result.failed_cases) == 2
    assert "size" in result.failed_cases[0]["error"]
    assert "empty file" in result.failed_cases[1]["error"]
    assert result.failed_thresholds == ["dice undefined (no case with a defined value) < 0.5"]
    summary = strict_json(tmp_path / "out" / "summary.json")
    assert summary["n_cases"] == 0 and summary["aggregate"]["metrics"] == {}
    assert read_csv(tmp_path / "out" / "metrics.csv") == [list(CSV_COLUMNS)]


def test_unmatched_cases_are_listed(tmp_path, refs):
    pred = tmp_path / "pred"
    write_mask(pred / "a.nii.gz", block(slice(1, 3), slice(1, 3), slice(1, 3)))
    write_mask(pred / "extra.nii.gz", block(0, 0, 0))
    result = run_evaluate(pred, refs, tmp_path / "out")
    assert result.unmatched == {"ref_without_pred": ["b"], "pred_without_ref": ["extra"]}
    assert result.ok  # unmatched ids are reported, not failures
    assert strict_json(tmp_path / "out" / "summary.json")["unmatched"] == result.unmatched


def test_no_matching_case_is_a_usage_error(tmp_path, refs):
    pred = tmp_path / "pred"
    write_mask(pred / "zzz.nii.gz", block(0, 0, 0))
    with pytest.raises(UsageError, match="no case id in common"):
        run_evaluate(pred, refs, tmp_path / "out")


def test_undefined_values_are_null_in_json_and_empty_in_csv(tmp_path):
    empty = np.zeros(SHAPE, bool)
    write_mask(tmp_path / "ref" / "h.nii.gz", empty)  # no lesion in the reference
    write_mask(tmp_path / "pred" / "h.nii.gz", block(0, 0, slice(0, 2)))  # two false positives
    result = run_evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "out", min_sensitivity=0.5)
    assert math.isnan(result.cases[0]["sensitivity"])
    summary = strict_json(tmp_path / "out" / "summary.json")
    case = summary["cases"][0]
    assert case["sensitivity"] is None and case["hd95_mm"] is None and case["dice"] == 0.0
    sens = summary["aggregate"]["metrics"]["sensitivity"]
    assert sens == {"mean": None, "std": None, "n": 0, "n_undefined": 1}
    assert result.failed_thresholds == ["sensitivity undefined (no case with a defined value) < 0.5"]
    row = read_csv(tmp_path / "out" / "metrics.csv")[1]
    assert row[CSV_COLUMNS.index("sensitivity")] == "" and row[CSV_COLUMNS.index("hd95_mm")] == ""


def test_per_slice_statistics(tmp_path, refs):
    pred = tmp_path / "pred"
    # a: ref slices 1 and 2 each 2x2; pred only slice 1 -> slice Dice 1.0 and 0.0
    write_mask(pred / "a.nii.gz", block(1, slice(1, 3), slice(1, 3)))
    write_mask(pred / "b.nii.gz", block(2, 3, slice(2, 6)))  # one slice, Dice 1.0
    result = run_evaluate(pred, refs, tmp_path / "out", per_slice=True)
    assert result.cases[0]["lesion_slices"] == 2 and result.cases[0]["slice_dice_mean"] == 0.5
    per_slice = result.summary["aggregate"]["per_slice_dice"]
    assert per_slice["n_slices"] == 3
    assert per_slice["mean"] == pytest.approx(2 / 3)
    assert per_slice["std"] == pytest.approx(np.std([1.0, 0.0, 1.0]))
    rows = read_csv(tmp_path / "out" / "metrics.csv")
    assert tuple(rows[0]) == CSV_COLUMNS + PER_SLICE_COLUMNS


def _synth_like(tmp_path, refs_folder):
    """A manifest in the shape `covidseg synth` writes: masks relative to its folder."""
    root = tmp_path / "synth"
    masks = root / "masks"
    masks.mkdir(parents=True)
    for name in ("a.nii.gz", "b.nii.gz"):
        (masks / name).write_bytes((refs_folder / name).read_bytes())
    manifest = {
        "cases": [
            {"id": "a", "kind": "covid", "mask": "masks/a.nii.gz"},
            {"id": "b", "kind": "covid", "mask": "masks/b.nii.gz"},
            {"id": "h0", "kind": "healthy", "mask": None},
        ]
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize("use_folder", [False, True])
def test_manifest_as_reference(tmp_path, refs, use_folder):
    root = _synth_like(tmp_path, refs)
    pred = tmp_path / "pred"
    write_mask(pred / "a.nii.gz", block(slice(1, 3), slice(1, 3), slice(1, 3)))
    write_mask(pred / "h0.nii.gz", block(0, 0, 0))
    ref = root if use_folder else root / "manifest.json"
    result = run_evaluate(pred, ref, tmp_path / "out")
    assert [c["case_id"] for c in result.cases] == ["a"]
    assert result.cases[0]["dice"] == 1.0
    assert result.cases[0]["ref"] == str(root / "masks" / "a.nii.gz")
    # healthy cases have no reference mask: a prediction for one is unmatched
    assert result.unmatched == {"ref_without_pred": ["b"], "pred_without_ref": ["h0"]}


def test_bad_manifest_is_a_usage_error(tmp_path):
    bad = tmp_path / "manifest.json"
    bad.write_text("{not json")
    (tmp_path / "pred").mkdir()
    with pytest.raises(UsageError, match="cannot read manifest"):
        run_evaluate(tmp_path / "pred", bad, tmp_path / "out")
    bad.write_text(json.dumps({"no": "cases"}))
    with pytest.raises(UsageError, match="'cases'"):
        run_evaluate(tmp_path / "pred", bad, tmp_path / "out")

"""Bad settings and a dishonest evaluate gate, through the real command line.

Settings (covidseg.settings): every value of a settings file or option is checked before any stage
runs; a broken rule is exit 2 and one line naming the file (or option), the key and the cause.
evaluate: a probability map is not a mask, and a gate (--min-*) does not pass on the few cases
that were predicted.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from conftest import ct_like
from covidseg.config import (
    CorruptionConfig,
    ExportConfig,
    GanTrainConfig,
    PredictOptions,
    PreprocessConfig,
    SegLossConfig,
    SegTrainConfig,
)
from covidseg.imaging.airways import AirwayParams
from covidseg.imaging.geometry import axis_aligned_geometry
from covidseg.imaging.lungs import LungParams
from covidseg.inference.ct_segment import SlicePreprocessing
from covidseg.io import write_array
from covidseg.method.pseudo_masks import PseudoMaskConfig
from covidseg.models.gan3d import GAN_PRESETS
from covidseg.settings import RULES, check_config
from test_bad_inputs import cli, error_line

SHAPE = (4, 8, 8)


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_array(path, array, axis_aligned_geometry(array.shape, (2.0, 1.0, 1.0)))
    return path


# ---- the rules cover every setting ------------------------------------------------------------------

SETTINGS_CLASSES = (PreprocessConfig, LungParams, AirwayParams, GanTrainConfig, CorruptionConfig,
                    PseudoMaskConfig, SegTrainConfig, SegLossConfig, ExportConfig,
                    SlicePreprocessing)  # fmt: skip


def test_every_setting_has_a_rule_and_every_default_passes_it():
    for cls in SETTINGS_CLASSES:
        assert set(RULES[cls.__name__]) == {f.name for f in fields(cls)}, cls.__name__
        check_config(
            cls() if cls is not SlicePreprocessing else SlicePreprocessing((-1000, 400), (128, 128), 9.0)
        )
    assert set(RULES["RunConfig"]) == {"workers"}
    # predict's settings-file fields; the others (--continue, --series, ...) are command-line flags
    assert set(RULES["PredictOptions"]) == {"batch_size", "snapshots", "probabilities"}
    check_config(PredictOptions())
    for preset in GAN_PRESETS:  # the preset rule knows every GAN preset, and only those
        GanTrainConfig(preset=preset)
    assert RULES["GanTrainConfig"]["preset"].text == f"must be one of {', '.join(GAN_PRESETS)}"


# ---- item 15: preprocess --grid -----------------------------------------------------------------------


def test_preprocess_refuses_an_impossible_grid_before_any_case(tmp_path):
    _write(tmp_path / "scans" / "a.nii.gz", ct_like())
    out = tmp_path / "pre"
    result = cli("preprocess", "--healthy", tmp_path / "scans", "-o", out, "--grid", "2048,2048,2048")
    assert result.exit_code == 2, result.output
    line = error_line(result.stderr, "--grid", r"^error: --grid \[2048, 2048, 2048\]: must be three whole")
    assert "134217728 (2^27) voxels in all; this one has 8589934592 voxels, 32 GiB" in line
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
    result = cli("preprocess", "--healthy", tmp_path / "scans", "-o", out, "--grid", "1,2048,8")
    assert result.exit_code == 2 and "from 1 to 1024" in result.stderr and not out.exists()


# ---- item 22: `covidseg run` settings files and the single stages' options -------------------------------

BAD_SETTINGS = [
    ("[train-gan]\nlr_g = nan", "[train-gan] lr_g = nan: must be a finite number > 0"),
    ("[preprocess]\nmargin_mm = inf", "[preprocess] margin_mm = inf: must be a number in [0, 100] mm"),
    (
        "[make-masks]\nhealthy_percentile = 250",
        "[make-masks] healthy_percentile = 250.0: must be a number in",
    ),
    ("[train-seg]\nsteps = -3", "[train-seg] steps = -3: must be a whole number >= 1"),
    ("[predict]\nbatch_size = 0", "[predict] batch_size = 0: must be a whole number >= 1"),
    ('[train-gan]\npreset = "huge"', '[train-gan] preset = "huge": must be one of tiny, small, base'),
    ('[train-seg]\npreset = "huge"', '[train-seg] preset = "huge": must be one of tiny, small, base for'),
    ("[preprocess]\nhu_window = [400, -1000]", "[preprocess] hu_window = [400.0, -1000.0]: must be two"),
    ('[train-seg]\nlr = "fast"', '[train-seg] lr = "fast": must be a finite number > 0'),
    ("[train-seg.loss]\nbeta = nan", "[train-seg.loss] beta = nan: must be a finite number >= 0"),
    ("[preprocess.lungs]\nwork_mm = 0", "[preprocess.lungs] work_mm = 0.0: must be a number in [0.1, 20] mm"),
    ("[train-gan.lesions]\ntexture_hu = -5", "[train-gan.lesions] texture_hu = -5.0: must be a number in [0"),
    ("[train-gan]\nseed = -1", "[train-gan] seed = -1: must be a whole number in 0.."),
    ("[make-masks]\nlow_infected = 0.5", "[make-masks] low_infected = 0.5: must be <= high_infected"),
    ("[make-masks]\ngrow_percentile = 40", "[make-masks] grow_percentile = 40.0: must be a number in (50,"),
    ("[make-masks]\ngrow_percentile = 99.9", "[make-masks] grow_percentile = 99.9: must be <= healthy_perc"),
    ("[preprocess]\ngrid = [30, 128, 128]", "[preprocess] grid = [30, 128, 128]: must be a multiple of"),
    ('[train-gan]\npreset = "tiny"\ncrop = [64, 64, 64]', "[train-gan] crop = [64, 64, 64]: must fit in"),
]


@pytest.mark.parametrize(("text", "cause"), BAD_SETTINGS, ids=[c.split(":")[0] for _, c in BAD_SETTINGS])
def test_run_refuses_a_bad_setting_before_any_stage(tmp_path, text, cause):
    settings = tmp_path / "run.toml"
    settings.write_text(text + "\n", encoding="utf-8")
    (tmp_path / "healthy").mkdir()
    (tmp_path / "covid").mkdir()
    work = tmp_path / "work"
    result = cli("run", "--healthy", tmp_path / "healthy", "--covid", tmp_path / "covid", "-o", work,
                 "--config", settings, "--no-progress")  # fmt: skip
    assert result.exit_code == 2, result.output
    line = error_line(result.stderr, "run.toml", "")
    assert line.startswith(f"error: {settings}: {cause}"), line
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not work.exists()


@pytest.mark.parametrize(
    ("args", "cause"),
    [
        (("train-gan", "pre", "--lr", "nan"), "--lr nan: must be a finite number > 0"),
        (("train-gan", "pre", "--preset", "huge"), '--preset "huge": must be one of tiny, small, base'),
        (
            ("train-gan", "pre", "--checkpoint-every", "0"),
            "--checkpoint-every 0: must be a whole number >= 1",
        ),
        (("train-seg", "masks", "--beta", "inf"), "--beta inf: must be a finite number >= 0"),
        (("train-seg", "masks", "--lr", "-1"), "--lr -1.0: must be a finite number > 0"),
        (("make-masks", "pre", "--gan", "gan", "--threshold", "nan"), "--threshold nan: must be a finite"),
        (
            ("make-masks", "pre", "--gan", "gan", "--high-infected", "1.5"),
            "--high-infected 1.5: must be a number in",
        ),
        (
            ("make-masks", "pre", "--gan", "gan", "--grow-percentile", "nan"),
            "--grow-percentile nan: must be a number in (50, 100) or none",
        ),
    ],  # fmt: skip
)
def test_single_stages_check_their_options_with_the_same_rules(tmp_path, args, cause):
    stage, folder, *options = args
    out = tmp_path / "out"
    extra = [tmp_path / o if o == "gan" else o for o in options]
    result = cli(stage, tmp_path / folder, "-o", out, *extra)  # the input folders do not even exist
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {cause}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


# ---- items 25 and 26: evaluate ------------------------------------------------------------------------


def _lesion() -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[1:3, 2:6, 2:5] = 1
    return mask


@pytest.fixture
def refs(tmp_path) -> Path:
    """Reference masks a.nii.gz and b.nii.gz (the same lesion)."""
    for name in ("a", "b"):
        _write(tmp_path / "ref" / f"{name}.nii.gz", _lesion())
    return tmp_path / "ref"


def _probability_map() -> np.ndarray:
    """A float map whose voxels >= 0.5 are exactly the lesion; every other voxel is above 0."""
    rng = np.random.default_rng(0)
    low = rng.uniform(0.001, 0.4, SHAPE)
    high = rng.uniform(0.6, 0.998, SHAPE)
    return np.where(_lesion() > 0, high, low).astype(np.float32)


def test_evaluate_refuses_a_probability_map_and_thresholds_one_when_asked(tmp_path, refs):
    pred = tmp_path / "pred"
    _write(pred / "a.nii.gz", _lesion())
    bad = _write(pred / "b.nii.gz", _probability_map())
    result = cli("evaluate", "--pred", pred, "--ref", refs, "-o", tmp_path / "eval")
    assert result.exit_code == 1, result.output
    error_line(
        result.stderr, bad,
        r"^failed: .*pred/b\.nii\.gz: not a binary mask \(values 0\.0\d+\.\.0\.99\d*, 256 distinct\): "
        r"a probability map\? pass --threshold T$",
    )  # fmt: skip
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert [c["case_id"] for c in summary["cases"]] == ["a"]
    assert [f["case_id"] for f in summary["failed_cases"]] == ["b"]
    result = cli("evaluate", "--pred", pred, "--ref", refs, "-o", tmp_path / "eval2", "--threshold", "0.5")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval2" / "summary.json").read_text())
    assert [c["dice"] for c in summary["cases"]] == [1.0, 1.0] and summary["threshold"] == 0.5
    result = cli("evaluate", "--pred", pred, "--ref", refs, "-o", tmp_path / "eval3", "--threshold", "nan")
    assert result.exit_code == 2 and "--threshold must be a finite number > 0" in result.stderr


@pytest.mark.parametrize(
    ("values", "binary"),
    [((0, 255), True), ((0, 1), True), ((0, 1.0), True), ((0, 1, 2), False), ((0, 0.5), False)],
)
def test_evaluate_takes_two_valued_whole_masks_as_binary(tmp_path, refs, values, binary):
    lesion = _lesion()
    array = np.where(lesion > 0, values[1], values[0]).astype(np.float32 if 0.5 in values else np.uint8)
    if len(values) == 3:
        array[0, 0, 0] = values[2]
    pred = tmp_path / "pred"
    _write(pred / "a.nii.gz", array)
    result = cli("evaluate", "--pred", pred, "--ref", refs, "-o", tmp_path / "eval", "--allow-missing")
    assert result.exit_code == (0 if binary else 1), result.output
    assert ("not a binary mask" in result.stderr) is not binary


@pytest.fixture
def nine_refs(tmp_path) -> Path:
    for i in range(9):
        _write(tmp_path / "ref9" / f"case{i}.nii.gz", _lesion())
    return tmp_path / "ref9"


def test_a_gate_fails_when_references_lack_a_prediction(tmp_path, nine_refs):
    pred = tmp_path / "pred"
    _write(pred / "case0.nii.gz", _lesion())  # the one predicted case is perfect
    result = cli("evaluate", "--pred", pred, "--ref", nine_refs, "-o", tmp_path / "gate", "--min-dice", "0.5")
    assert result.exit_code == 1, result.output
    line = error_line(result.stderr, "have no prediction", r"^failed: ")
    assert line == (
        f"failed: {pred}: 8 of 9 reference case(s) have no prediction: case1, case2, case3, case4, case5, … "
        "(pass --allow-missing to gate on the predicted cases only)"
    )
    summary = json.loads((tmp_path / "gate" / "summary.json").read_text())
    assert summary["unmatched"]["ref_without_pred"] == [f"case{i}" for i in range(1, 9)]
    assert summary["failed_missing"] == line.removeprefix("failed: ")
    assert summary["failed_thresholds"] == [] and summary["cases"][0]["dice"] == 1.0
    gate = ("--min-dice", "0.5", "--allow-missing")
    allowed = cli("evaluate", "--pred", pred, "--ref", nine_refs, "-o", tmp_path / "allowed", *gate)
    assert allowed.exit_code == 0, allowed.output
    # without a gate the evaluation is a report: exit 0, the missing cases listed in summary.json
    report = cli("evaluate", "--pred", pred, "--ref", nine_refs, "-o", tmp_path / "report")
    assert report.exit_code == 0, report.output
    assert "8 reference case(s) without a prediction" in report.stderr
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert len(summary["unmatched"]["ref_without_pred"]) == 8 and summary["failed_missing"] is None

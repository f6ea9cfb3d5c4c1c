"""`covidseg make-masks` with an exported generator: ONNX Runtime against torch, the backend choice,
the fixed ONNX window, and the lock on its output folder."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from _small_inputs import runner
from covidseg.cli import app
from covidseg.errors import UsageError
from covidseg.stages.make_masks import _onnx_grid_check, resolve_generator, run_make_masks

# trained (a preprocess folder, a tiny GAN and its ONNX export) is a fixture in conftest.py


def test_make_masks_on_onnx_runtime_equals_torch(trained, tmp_path):
    torch_out = tmp_path / "torch"
    run_make_masks(trained.pre, trained.gan, torch_out, device="cpu", native=False)
    onnx_path = trained.root / "onnx" / "generator.onnx"
    result = runner.invoke(
        app, ["make-masks", str(trained.pre), "--gan", str(onnx_path), "-o", str(tmp_path / "onnx"),
              "--no-native", "--device", "cpu", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["backend"]["kind"] == "onnx"
    assert manifest["backend"]["providers"][0] == "CPUExecutionProvider"
    reference = json.loads((torch_out / "manifest.json").read_text())
    assert manifest["threshold"] == reference["threshold"] and reference["backend"]["kind"] == "torch"
    lesion_voxels = 0
    for record in reference["cases"]:
        a = np.load(torch_out / record["files"]["binary_grid"]).astype(bool)
        b = np.load(tmp_path / "onnx" / record["files"]["binary_grid"]).astype(bool)
        lesion_voxels += int(a.sum())
        if not np.array_equal(a, b):
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.999
        soft_a = np.load(torch_out / record["files"]["soft_grid"])
        soft_b = np.load(tmp_path / "onnx" / record["files"]["soft_grid"])
        assert np.abs(soft_a - soft_b).max() < 1e-3
    assert lesion_voxels > 0  # the comparison is not between two empty masks


def test_backend_choice_and_fixed_window(tmp_path):
    folder = tmp_path / "gan"
    folder.mkdir()
    assert resolve_generator(folder) == ("torch", folder / "generator.pt")
    assert resolve_generator(folder, "onnx") == ("onnx", folder / "generator.onnx")
    assert resolve_generator(tmp_path / "g.onnx") == ("onnx", tmp_path / "g.onnx")
    with pytest.raises(UsageError, match="--backend torch"):
        resolve_generator(tmp_path / "g.onnx", "torch")
    with pytest.raises(UsageError, match="--backend onnx"):
        resolve_generator(tmp_path / "generator.pt", "onnx")
    with pytest.raises(UsageError, match="--backend must be"):
        resolve_generator(folder, "tensorrt")
    case = SimpleNamespace(image=np.zeros((16, 64, 64), np.float32), case_id="c1")
    cropped = SimpleNamespace(window=(8, 32, 32), sidecar={"crop": [8, 32, 32]})
    _onnx_grid_check(cropped, [case], tmp_path)  # windows of 8x32x32 cover the grid
    whole = SimpleNamespace(window=(32, 128, 128), sidecar={"crop": None})
    with pytest.raises(UsageError, match="fixed"):
        _onnx_grid_check(whole, [case], tmp_path)


def test_make_masks_into_a_folder_another_run_is_writing_is_refused(trained, tmp_path):
    from covidseg.io.atomic import folder_lock

    out = tmp_path / "masks"
    out.mkdir()
    command = ["make-masks", str(trained.pre), "--gan", str(trained.gan), "-o", str(out), "--no-native",
               "--device", "cpu", "--no-progress"]  # fmt: skip
    with folder_lock(out, ".covidseg.lock", "covidseg make-masks"):  # as a running make-masks holds it
        result = runner.invoke(app, command)
    assert result.exit_code == 2, result.output
    assert "another covidseg make-masks" in result.output and not (out / "grid").exists()


def test_make_masks_grow_percentile_off_is_the_plain_threshold_and_on_is_recorded(trained, tmp_path):
    from covidseg.method.pseudo_masks import binarise, difference_map
    from covidseg.stages._workdir import load_grid_cases

    off = run_make_masks(trained.pre, trained.gan, tmp_path / "off", device="cpu", native=False)
    assert off["config"]["grow_percentile"] is None and off["grow_threshold"] is None
    cases = {c.case_id: c for c in load_grid_cases(trained.pre)}
    for record in off["cases"]:  # off: exactly today's binary mask of the saved difference map
        case = cases[record["id"]]
        pseudo = np.load(tmp_path / "off" / record["files"]["pseudo_healthy_grid"])
        diff = difference_map(case.image, pseudo, case.lungs, off["config"]["smooth_sigma"])
        expected = binarise(diff, off["threshold"], off["config"]["min_component"])
        written = np.load(tmp_path / "off" / record["files"]["binary_grid"]).astype(bool)
        assert np.array_equal(written, expected)

    # on: t_low calibrated on the generator's healthy training grids (its calibration has none)
    on = run_make_masks(trained.pre, trained.gan, tmp_path / "on", device="cpu", native=False,
                        overrides={"grow_percentile": 90.0})  # fmt: skip
    written = json.loads((tmp_path / "on" / "manifest.json").read_text())
    assert written["config"]["grow_percentile"] == 90.0
    assert 0 < written["grow_threshold"] <= written["threshold"] == off["threshold"]
    assert written["grow_threshold_source"].startswith("calibrated on 1 healthy grids of")
    for record in on["cases"]:  # the grown mask holds the plain one
        plain = np.load(tmp_path / "off" / record["files"]["binary_grid"]).astype(bool)
        grown = np.load(tmp_path / "on" / record["files"]["binary_grid"]).astype(bool)
        assert (grown | plain).sum() == grown.sum()
    given = run_make_masks(trained.pre, trained.gan, tmp_path / "given", device="cpu", native=False,
                           overrides={"grow_percentile": 90.0}, grow_threshold=0.01)  # fmt: skip
    assert given["grow_threshold"] == 0.01 and given["grow_threshold_source"] == "given"
    assert off["threshold_source"] == "calibration"


def test_make_masks_recalibrates_another_healthy_percentile_on_the_training_grids(trained, tmp_path):
    """--healthy-percentile other than the calibration's: both thresholds from the generator's healthy
    training grids, as train-gan would have calibrated them (a higher percentile, a higher threshold)."""
    base = run_make_masks(trained.pre, trained.gan, tmp_path / "base", device="cpu", native=False)
    command = [
        "make-masks",
        str(trained.pre),
        "--gan",
        str(trained.gan),
        "-o",
        str(tmp_path / "strict"),
        "--healthy-percentile",
        "99.8",
        "--grow-percentile",
        "98",
        "--no-native",
        "--no-progress",
    ]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    strict = json.loads((tmp_path / "strict" / "manifest.json").read_text())
    assert strict["config"]["healthy_percentile"] == 99.8
    assert strict["threshold_source"].startswith("calibrated on 1 healthy grids of")
    assert strict["threshold"] >= base["threshold"] and strict["grow_threshold"] <= strict["threshold"]


def test_thresholds_make_the_healthy_maps_once_and_only_when_calibrating_and_record_a_portable_path(trained):
    """Both thresholds recalibrated: the healthy training grids go through the generator once; both
    from the calibration: not at all. The source names the training grids relative to the output
    folder when they lie in its work folder (as ``preprocess`` is), else absolute."""
    from covidseg.imaging.grid import DEFAULT_HU_SCALE
    from covidseg.method.pseudo_masks import PseudoMaskConfig
    from covidseg.stages._workdir import stored_path
    from covidseg.stages.make_masks import _thresholds

    calls = []

    def generate(case):  # pseudo-healthy = the image itself: every difference is 0
        calls.append(case.case_id)
        return case.image

    config = PseudoMaskConfig(healthy_percentile=99.5, grow_percentile=97.0)
    generator = trained.gan / "generator.pt"
    out = trained.root / "masks"  # never written: _thresholds only names it
    chosen = _thresholds(config, {}, (None, None), generator, generate, DEFAULT_HU_SCALE, out)
    assert len(calls) == 1  # one healthy training grid, made once for both percentiles
    assert (
        chosen["threshold_source"]
        == chosen["grow_threshold_source"]
        == "calibrated on 1 healthy grids of ../pre"
    )
    assert stored_path(out, chosen["threshold_source"].rsplit(" of ", 1)[1]) == trained.pre
    elsewhere = _thresholds(
        config, {}, (None, None), generator, generate, DEFAULT_HU_SCALE, Path("/x/y/masks")
    )
    assert elsewhere["threshold_source"] == f"calibrated on 1 healthy grids of {trained.pre.as_posix()}"
    calls.clear()
    calibration = {
        "healthy_percentile": 99.5,
        "threshold": 0.2,
        "grow_percentile": 97.0,
        "grow_threshold": 0.1,
    }
    chosen = _thresholds(config, calibration, (None, None), generator, generate, DEFAULT_HU_SCALE, out)
    assert calls == [] and chosen["threshold_source"] == chosen["grow_threshold_source"] == "calibration"
    chosen = _thresholds(config, calibration, (0.3, None), generator, generate, DEFAULT_HU_SCALE, out)
    assert calls == [] and chosen["threshold"] == 0.3 and chosen["threshold_source"] == "given"


def test_make_masks_grow_percentile_option_is_checked_and_needs_the_training_grids(trained, tmp_path):
    import shutil

    command = ["make-masks", str(trained.pre), "--gan", str(trained.gan), "-o", str(tmp_path / "bad"),
               "--grow-percentile", "99.5", "--no-progress"]  # fmt: skip
    result = runner.invoke(app, command)
    assert result.exit_code == 2 and "--grow-percentile 99.5: must be <= healthy_percentile" in result.output
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(trained.gan / "generator.pt", lone / "generator.pt")  # no train-gan manifest beside it
    with pytest.raises(UsageError, match="no threshold for percentile 95"):
        run_make_masks(trained.pre, lone / "generator.pt", tmp_path / "out", device="cpu", native=False,
                       overrides={"grow_percentile": 95.0})  # fmt: skip


def test_train_gan_calibrates_the_grow_threshold_and_make_masks_uses_it(trained, tmp_path):
    from _small_inputs import CROP
    from covidseg.config import GanTrainConfig
    from covidseg.method.pseudo_masks import PseudoMaskConfig
    from covidseg.stages.train_gan import run_train_gan

    config = GanTrainConfig(
        preset="tiny", steps=1, batch_size=1, crop=CROP, checkpoint_every=1, sample_every=1, log_every=1
    )
    gan = run_train_gan(
        trained.pre, tmp_path / "gan", config, "cpu", mask_config=PseudoMaskConfig(grow_percentile=95.0)
    )
    calibration = json.loads((tmp_path / "gan" / "calibration.json").read_text())
    assert calibration == gan["calibration"] and calibration["grow_percentile"] == 95.0
    assert 0 < calibration["grow_threshold"] <= calibration["threshold"]
    masks = run_make_masks(trained.pre, tmp_path / "gan", tmp_path / "masks", device="cpu", native=False)
    assert masks["config"]["grow_percentile"] == 95.0  # taken from the calibration, like the percentile
    assert masks["grow_threshold"] == calibration["grow_threshold"]
    assert masks["grow_threshold_source"] == "calibration"


def test_make_masks_with_a_teacher_adds_its_voxels_at_the_threshold_healthy_lungs_allow(
    trained, tmp_path, monkeypatch
):
    from _small_inputs import GRID
    from conftest import save_untrained_segmenter
    from covidseg.inference.model_files import open_seg_model
    from covidseg.inference.runners import TorchRunner
    from covidseg.stages import make_masks
    from covidseg.stages._workdir import load_grid_cases, stored_path

    calls = []
    counted = make_masks.run_generator
    monkeypatch.setattr(make_masks, "run_generator", lambda *a, **k: calls.append(1) or counted(*a, **k))
    teacher = save_untrained_segmenter(tmp_path / "teacher" / "best.pt", slice_size=GRID[1:])
    plain = run_make_masks(trained.pre, trained.gan, tmp_path / "plain", device="cpu", native=False)
    plain_calls = len(calls)
    taught = run_make_masks(trained.pre, trained.gan, tmp_path / "taught", device="cpu", native=False,
                            teacher=teacher, teacher_budget_percent=100.0)  # fmt: skip
    assert len(calls) == 2 * plain_calls  # the generator runs once per case with a teacher too
    record = json.loads((tmp_path / "taught" / "manifest.json").read_text())["teacher"]
    assert record["threshold"] == 0.5  # a budget of 100 %: the lowest threshold
    assert stored_path(tmp_path / "taught", record["model"]).resolve() == teacher.resolve()
    run = TorchRunner(open_seg_model(teacher).torch_model(), "cpu")
    cases = {c.case_id: c for c in load_grid_cases(trained.pre)}
    added = 0
    for before, after in zip(plain["cases"], taught["cases"], strict=True):
        case = cases[before["id"]]
        prob = 1 / (1 + np.exp(-run(case.image[:, None])[:, 0]))
        old = np.load(tmp_path / "plain" / before["files"]["binary_grid"]).astype(bool)
        new = np.load(tmp_path / "taught" / after["files"]["binary_grid"]).astype(bool)
        assert np.array_equal(new, old | ((prob >= 0.5) & (case.lungs > 0)))
        added += after["teacher_added_voxels"]
    assert added > 0 and record["added_percent_of_masks"] > 0
    before_percent, after_percent = record["healthy_flagged_percent"]
    assert before_percent <= after_percent <= 100.0

    strict = run_make_masks(trained.pre, trained.gan, tmp_path / "strict", device="cpu", native=False,
                            teacher=teacher, teacher_budget_percent=after_percent - 1e-6)  # fmt: skip
    assert strict["teacher"]["threshold"] > 0.5  # the budget rules out t = 0.5
    assert strict["teacher"]["healthy_flagged_percent"][1] < after_percent


def test_a_teacher_made_for_other_grids_is_refused_before_anything_is_written(trained, tmp_path):
    from conftest import save_untrained_segmenter

    teacher = save_untrained_segmenter(tmp_path / "other.pt", slice_size=(64, 64))
    with pytest.raises(
        UsageError, match=r"other\.pt: a teacher must be trained on grids like these: it takes 64x64"
    ):
        run_make_masks(
            trained.pre, trained.gan, tmp_path / "out", device="cpu", native=False, teacher=teacher
        )
    assert not (tmp_path / "out").exists()
    args = ["make-masks", str(trained.pre), "--gan", str(trained.gan), "-o", str(tmp_path / "cli")]
    result = runner.invoke(app, [*args, "--teacher", str(teacher), "--teacher-budget", "120"])
    assert result.exit_code == 2 and "--teacher-budget 120.0: must be a number in [0, 100] %" in result.output

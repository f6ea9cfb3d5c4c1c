"""`covidseg run` (stages/run.py): settings files, skip on rerun, resume, --force."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from covidseg.cli import app
from covidseg.config import config_from_tables, load_config
from covidseg.stages.synth import run_synth

runner = CliRunner()

TINY = """
[preprocess]
grid = [16, 64, 64]

[train-gan]
preset = "tiny"
steps = 2
batch_size = 1
crop = [8, 32, 32]
checkpoint_every = 1
sample_every = 2

[train-seg]
steps = 2
batch_size = 4
eval_every = 1

[train-seg.loss]
w_dice = 0.5
"""


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("run") / "synth"
    run_synth(root, 2, 2, seed=21, shape_zyx=(28, 96, 96), spacing_zyx=(10.0, 3.75, 3.75))
    return root


@pytest.fixture(scope="module")
def tiny_toml(tmp_path_factory):
    path = tmp_path_factory.mktemp("settings") / "tiny.toml"
    path.write_text(TINY, encoding="utf-8")
    return path


def _run(phantoms, work, config, *extra):
    args = ["run", "--healthy", str(phantoms / "healthy"), "--covid", str(phantoms / "covid"),
            "--masks", str(phantoms / "masks"), "-o", str(work), "--config", str(config), "--device", "cpu",
            "--no-progress", *extra]  # fmt: skip
    return runner.invoke(app, args)


def _statuses(work) -> dict[str, str]:
    stages = json.loads((work / "run.json").read_text())["stages"]
    return {r["stage"]: r["status"] for r in stages}


# ---- a bad settings file -------------------------------------------------------------------------------


def test_cli_exits_2_on_a_bad_settings_file_before_doing_anything(phantoms, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train-seg": {"stepz": 10}}), encoding="utf-8")
    result = _run(phantoms, tmp_path / "work", bad)
    assert result.exit_code == 2
    assert "unknown key 'stepz' in [train-seg]" in result.output
    assert not (tmp_path / "work").exists()
    yaml = tmp_path / "settings.yaml"
    yaml.write_text("steps: 3\n", encoding="utf-8")
    assert _run(phantoms, tmp_path / "work", yaml).exit_code == 2


def _folder_with_config(tmp_path, config_json: dict):
    """(work folder holding `config_json` as an earlier run's config.json, that run's RunInputs)."""
    from covidseg.stages.run import RunInputs

    inputs = RunInputs(tmp_path / "healthy", tmp_path / "covid")
    inputs.healthy.mkdir(), inputs.covid.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.json").write_text(json.dumps(config_json), encoding="utf-8")
    return work, inputs


def test_a_config_json_from_before_lesion_settings_counts_as_the_default_lesions(tmp_path):
    from covidseg.config import CorruptionConfig, RunConfig
    from covidseg.errors import UsageError
    from covidseg.stages.run import check_work_dir

    old = RunConfig().to_json()
    del old["train-gan"]["lesions"]  # config.json written before [train-gan.lesions] existed
    work, inputs = _folder_with_config(tmp_path, old)
    assert check_work_dir(work, inputs, RunConfig(), force=False) == {}
    other = RunConfig(train_gan=replace(RunConfig().train_gan, lesions=CorruptionConfig(octaves=2)))
    with pytest.raises(UsageError, match=r"train-gan\.lesions\.octaves: 3 -> 2"):
        check_work_dir(work, inputs, other, force=False)


def test_a_config_json_from_before_synthetic_lesions_counts_as_trained_without_them(tmp_path):
    from covidseg.config import RunConfig
    from covidseg.errors import UsageError
    from covidseg.stages.run import check_work_dir

    old = RunConfig().to_json()
    del old["train-seg"]["synth_lesion_p"], old["train-seg"]["healthy_budget_percent"]  # written before them
    work, inputs = _folder_with_config(tmp_path, old)
    with pytest.raises(UsageError, match=r"other settings \(train-seg\.synth_lesion_p: 0\.0 -> 0\.3\)"):
        check_work_dir(work, inputs, RunConfig(), force=False)
    without = RunConfig(train_seg=replace(RunConfig().train_seg, synth_lesion_p=0.0))
    assert check_work_dir(work, inputs, without, force=False) == {}  # the same recipe: resumable


# ---- a whole tiny run -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(phantoms, tiny_toml, tmp_path_factory):
    work = tmp_path_factory.mktemp("work") / "run"
    result = _run(phantoms, work, tiny_toml)
    assert result.exit_code == 0, result.output
    return work


def test_a_run_writes_every_stage_and_its_settings(finished, tiny_toml):
    for path in ("pre/manifest.json", "gan/generator.pt", "masks/manifest.json", "seg/best.pt", "model.onnx",
                 "model.json", "pred/summary.csv", "eval/summary.json"):  # fmt: skip
        assert (finished / path).is_file(), path
    assert set(_statuses(finished).values()) == {"ran"}
    saved = json.loads((finished / "config.json").read_text())
    assert saved["train-gan"]["steps"] == 2 and saved["train-seg"]["loss"]["w_dice"] == 0.5
    assert config_from_tables(saved) == load_config(tiny_toml)
    summary = json.loads((finished / "eval" / "summary.json").read_text())
    assert summary["n_cases"] == 2  # the two COVID phantoms, against their masks


def test_a_rerun_skips_finished_stages_and_resumes_an_interrupted_one(phantoms, finished, tiny_toml):
    onnx_mtime = (finished / "model.onnx").stat().st_mtime_ns
    result = _run(phantoms, finished, tiny_toml)
    assert result.exit_code == 0, result.output
    assert set(_statuses(finished).values()) == {"skipped"}
    assert (finished / "model.onnx").stat().st_mtime_ns == onnx_mtime
    # train-seg interrupted after its checkpoint: it resumes, the later stages run again
    (finished / "seg" / "manifest.json").unlink()
    result = _run(phantoms, finished, tiny_toml)
    assert result.exit_code == 0, result.output
    statuses = _statuses(finished)
    assert [statuses[s] for s in ("preprocess", "train-gan", "make-masks")] == ["skipped"] * 3
    assert statuses["train-seg"] == "resumed"
    assert [statuses[s] for s in ("export", "predict", "evaluate")] == ["ran"] * 3
    assert (finished / "model.onnx").stat().st_mtime_ns != onnx_mtime


def test_other_settings_need_force(phantoms, finished, tmp_path):
    changed = tmp_path / "changed.toml"
    changed.write_text(
        TINY.replace("steps = 2\nbatch_size = 4", "steps = 3\nbatch_size = 4"), encoding="utf-8"
    )
    result = _run(phantoms, finished, changed)
    assert result.exit_code == 2
    assert "train-seg.steps: 2 -> 3" in result.output and "--force" in result.output
    result = _run(phantoms, finished, changed, "--force")
    assert result.exit_code == 0, result.output
    assert set(_statuses(finished).values()) == {"ran"}
    assert json.loads((finished / "seg" / "manifest.json").read_text())["steps"] == 3


def test_a_folder_that_is_not_a_run_folder_is_refused(phantoms, tiny_toml, tmp_path):
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    result = _run(phantoms, tmp_path, tiny_toml)
    assert result.exit_code == 2 and "not a covidseg run folder" in result.output

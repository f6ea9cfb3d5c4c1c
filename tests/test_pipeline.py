"""`covidseg run` (settings files, skip on rerun, resume, --force) and the quick `covidseg demo`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from covidseg.cli import app
from covidseg.config import GanTrainConfig, PreprocessConfig, SegTrainConfig
from covidseg.errors import UsageError
from covidseg.stages.run import RunConfig, config_from_tables, load_config
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


# ---- settings files -------------------------------------------------------------------------------


def test_a_toml_file_sets_every_stage_and_the_rest_keeps_its_defaults(tiny_toml):
    config = load_config(tiny_toml)
    assert config.preprocess == PreprocessConfig(grid=(16, 64, 64))
    assert config.train_gan == GanTrainConfig(
        preset="tiny", steps=2, batch_size=1, crop=(8, 32, 32), checkpoint_every=1, sample_every=2
    )
    assert config.train_seg == SegTrainConfig(steps=2, batch_size=4, eval_every=1)
    assert config.seg_loss.w_dice == 0.5 and config.seg_loss.w_mse == 1.0
    # the saved config.json reads back as the same settings, also as a JSON settings file
    assert config_from_tables(config.to_json()) == config
    assert load_config(None) == RunConfig()


def test_train_gan_crop_defaults_to_the_presets_crop():
    from covidseg.models.gan3d import PRESET_CROPS

    tiny = config_from_tables({"train-gan": {"preset": "tiny"}})
    assert tiny.train_gan.crop == PRESET_CROPS["tiny"]
    assert config_from_tables({"train-gan": {"preset": "tiny", "crop": "none"}}).train_gan.crop is None
    assert config_from_tables({"train-gan": {"crop": None}}).train_gan.crop is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[train-gan]\nstepz = 3\n", "unknown key 'stepz' in [train-gan]"),
        ("[train-seg.loss]\nw_dise = 1.0\n", "unknown key 'w_dise' in [train-seg.loss]"),
        ("[preprocess.lungs]\nair = -300\n", "unknown key 'air' in [preprocess.lungs]"),
        ("[training]\nsteps = 3\n", "unknown table [training]"),
        ('[train-gan]\nsteps = "many"\n', '[train-gan] steps = "many": must be a whole number'),
        ("[preprocess]\ngrid = [32, 128]\n", "[preprocess] grid = [32, 128]: must be three whole numbers"),
        ("[train-seg]\naugment = 1\n", "[train-seg] augment = 1: must be true or false"),
        ('[train-seg]\narch = "vit"\n', '[train-seg] arch = "vit": must be one of transunet, unet'),
        ("[train-gan]\ncrop = [8, 32]\n", "[train-gan] crop = [8, 32]: must be [z, y, x]"),
        ("[preprocess]\nworkers = 0\n", "[preprocess] workers = 0: must be a whole number >= 1"),
        ("[train-gan\nsteps = 3\n", "unreadable settings"),
    ],
)
def test_settings_errors_are_usage_errors_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(path)


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


# ---- the quick demo and the regression check a CI job writes -----------------------------------------

QUICK_MIN_DICE = 0.10  # the quick demo reaches about 0.23 on its two test phantoms (β = 4)


def test_quick_demo_writes_a_self_contained_report_that_passes_a_dice_floor(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--quick", "-o", str(out), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output
    text = (out / "report.html").read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") >= 3  # loss curves and overlays embedded
    for external in ("http://", "https://", "<script", "<link"):
        assert external not in text
    numbers = json.loads((out / "report.json").read_text())
    assert set(numbers["methods"]) == {
        "TransUNet (label-free)",
        "GAN pseudo-masks",
        "baseline: HU > -600 in the lung",
    }
    check = ["evaluate", "--pred", str(out / "work" / "pred"), "--ref", str(out / "phantoms" / "test"),
             "-o", str(tmp_path / "ci")]  # fmt: skip
    passed = runner.invoke(app, [*check, "--min-dice", str(QUICK_MIN_DICE)])
    assert passed.exit_code == 0, passed.output
    failed = runner.invoke(app, [*check, "--min-dice", "0.9", "--overwrite"])
    assert failed.exit_code == 1 and "threshold not met" in failed.output


def test_report_pieces_escape_text_and_embed_images(tmp_path):
    from covidseg.reporting.html import image, page, section, table
    from covidseg.reporting.plots import loss_curves

    png = tmp_path / "curve.png"
    loss_curves([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}], ["loss"], png)
    text = page("a <b>", "lead & more", [section("s", table(["x<y"], [["<script>"]]), image(png, 'c"d'))])
    assert "<script>" not in text and "&lt;script&gt;" in text and "x&lt;y" in text
    assert text.count("data:image/png;base64,") == 1 and 'alt="c&quot;d"' in text
    assert image(tmp_path / "missing.png", "gone") == ""

"""covidseg.config: the settings dataclasses, their JSON, and the TOML/JSON settings-file loader."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from covidseg.cli import app
from covidseg.config import (
    CorruptionConfig,
    GanTrainConfig,
    PreprocessConfig,
    RunConfig,
    SegTrainConfig,
    config_from_tables,
    load_config,
)
from covidseg.errors import UsageError
from covidseg.settings import SettingError

SETTINGS = """
[preprocess]
grid = [16, 64, 64]

[train-gan]
preset = "tiny"
steps = 2
crop = [8, 32, 32]

[train-gan.lesions]
load_range = [0.01, 0.2]
ggo_hu = [-650, -350]
octaves = 2
texture_hu = 30

[train-seg]
steps = 2
batch_size = 4

[train-seg.loss]
w_dice = 0.5
"""


@pytest.fixture
def settings_toml(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text(SETTINGS, encoding="utf-8")
    return path


def test_a_toml_file_sets_every_stage_and_the_rest_keeps_its_defaults(settings_toml):
    config = load_config(settings_toml)
    assert config.preprocess == PreprocessConfig(grid=(16, 64, 64))
    lesions = CorruptionConfig(load_range=(0.01, 0.2), ggo_hu=(-650.0, -350.0), octaves=2, texture_hu=30.0)
    assert config.train_gan == GanTrainConfig(preset="tiny", steps=2, crop=(8, 32, 32), lesions=lesions)
    assert config.train_gan.lesions.consolidation_hu == CorruptionConfig().consolidation_hu
    assert config.train_seg == SegTrainConfig(steps=2, batch_size=4)
    assert config.seg_loss.w_dice == 0.5 and config.seg_loss.w_mse == 1.0
    # the saved config.json reads back as the same settings, also as a JSON settings file
    assert config.to_json()["train-gan"]["lesions"]["ggo_hu"] == [-650.0, -350.0]
    assert config_from_tables(config.to_json()) == config
    assert load_config(None) == RunConfig()


def test_make_masks_table_takes_the_hysteresis_percentile(tmp_path):
    from covidseg.method.pseudo_masks import PseudoMaskConfig

    path = tmp_path / "grow.toml"
    path.write_text("[make-masks]\ngrow_percentile = 95\n", encoding="utf-8")
    config = load_config(path)
    assert config.make_masks == PseudoMaskConfig(grow_percentile=95.0)
    assert config.to_json()["make-masks"]["grow_percentile"] == 95
    assert config_from_tables(config.to_json()) == config
    assert RunConfig().make_masks.grow_percentile == 98.0  # on by default (docs/results.md)
    assert config_from_tables({"make-masks": {"grow_percentile": None}}).make_masks.grow_percentile is None


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
        ("[train-gan.lesions]\nggo = [-700, -300]\n", "unknown key 'ggo' in [train-gan.lesions]"),
        ("[training]\nsteps = 3\n", "unknown table [training]"),
        ('[train-gan]\nsteps = "many"\n', '[train-gan] steps = "many": must be a whole number'),
        ("[preprocess]\ngrid = [32, 128]\n", "[preprocess] grid = [32, 128]: must be three whole numbers"),
        ("[train-seg]\naugment = 1\n", "[train-seg] augment = 1: must be true or false"),
        ('[train-seg]\narch = "vit"\n', '[train-seg] arch = "vit": must be one of transunet, unet'),
        ("[train-gan]\ncrop = [8, 32]\n", "[train-gan] crop = [8, 32]: must be [z, y, x]"),
        ("[train-gan]\nlesions = 3\n", "[train-gan] lesions = 3: must be a table"),
        ("[preprocess]\nworkers = 0\n", "[preprocess] workers = 0: must be a whole number >= 1"),
        ("[train-gan\nsteps = 3\n", "unreadable settings"),
    ],
)
def test_settings_errors_are_usage_errors_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match=re.escape(message)):
        load_config(path)


# ---- [train-gan.lesions]: the synthetic lesions ---------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("ggo_hu = [-300, -700]", "ggo_hu = [-300.0, -700.0]: must be two numbers [lo, hi] in [-2000, 4000]"),
        ("consolidation_hu = [-100, 5000]", "consolidation_hu = [-100.0, 5000.0]: must be two numbers"),
        ("load_range = [0, 0.3]", "load_range = [0.0, 0.3]: must be two numbers [lo, hi] in (0, 1]"),
        ("load_range = [0.3, 0.1]", "load_range = [0.3, 0.1]: must be two numbers [lo, hi] in (0, 1]"),
        ("core_fraction = [0.5, 0.1]", "core_fraction = [0.5, 0.1]: must be two numbers [lo, hi] in [0, 1]"),
        ("core_probability = 1.5", "core_probability = 1.5: must be a number in [0, 1]"),
        ("frequency = [2, 0, 4]", "frequency = [2.0, 0.0, 4.0]: must be three numbers > 0"),
        ("frequency = [2, 4]", "frequency = [2, 4]: must be three numbers > 0"),
        ("frequency = [2, 4, 64]\noctaves = 4", "frequency = [2.0, 4.0, 64.0]: with octaves = 4 the finest"),
        ("frequency = [2, 4, 64]\noctaves = 1", "frequency = [2.0, 4.0, 64.0]: with octaves = 1 the finest"),
        ("octaves = 0", "octaves = 0: must be a whole number in 1..8"),
        ("octaves = 2.5", "octaves = 2.5: must be a whole number in 1..8"),
        ("edge = 0", "edge = 0.0: must be a finite number > 0"),
        ("texture_hu = -1", "texture_hu = -1.0: must be a number in [0, 1000] HU"),
        ("border_bias = nan", "border_bias = nan: must be a finite number"),
        ("posterior_bias = inf", "posterior_bias = inf: must be a finite number"),
        ("fine_mix = 1.5", "fine_mix = 1.5: must be a number in [0, 1]"),
        ("reversed_halo_probability = -0.1", "reversed_halo_probability = -0.1: must be a number in [0, 1]"),
        (
            "crazy_paving_hu = [250, 80]",
            "crazy_paving_hu = [250.0, 80.0]: must be two numbers [lo, hi] in [0, 1000] HU",
        ),
        ("air_bronchogram_probability = 2", "air_bronchogram_probability = 2.0: must be a number in [0, 1]"),
    ],
)
def test_a_bad_lesion_setting_is_a_usage_error_naming_the_table_and_key(tmp_path, line, message):
    path = tmp_path / "bad.toml"
    path.write_text(f"[train-gan.lesions]\n{line}\n", encoding="utf-8")
    with pytest.raises(UsageError, match=re.escape(f"[train-gan.lesions] {message}")) as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_lesions_check_themselves_when_built_in_code():
    with pytest.raises(SettingError, match=r"ggo_hu = \[-300.0, -700.0\]"):
        CorruptionConfig(ggo_hu=(-300.0, -700.0))
    CorruptionConfig(load_range=(0.1, 0.1), frequency=(1.0, 32.0, 32.0), octaves=4)  # 256 cells: the limit


def test_a_train_config_from_before_lesions_were_a_setting_reads_as_the_defaults():
    lesions = CorruptionConfig(ggo_hu=(-600.0, -400.0))
    custom = GanTrainConfig(preset="tiny", crop=(8, 32, 32), lesions=lesions)
    saved = json.loads(json.dumps(custom.to_json()))  # as a checkpoint or config.json holds it
    assert saved["lesions"]["ggo_hu"] == [-600.0, -400.0]
    assert GanTrainConfig.from_json(saved) == custom
    del saved["lesions"]
    assert GanTrainConfig.from_json(saved) == GanTrainConfig(preset="tiny", crop=(8, 32, 32))
    assert CorruptionConfig.from_json(CorruptionConfig().to_json()) == CorruptionConfig()


def test_run_writes_the_lesions_table_to_config_json(settings_toml, tmp_path):
    (tmp_path / "healthy").mkdir()
    (tmp_path / "covid").mkdir()
    work = tmp_path / "work"
    args = ["run", "--healthy", str(tmp_path / "healthy"), "--covid", str(tmp_path / "covid"),
            "-o", str(work), "--config", str(settings_toml), "--device", "cpu", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "no CT found" in result.output  # preprocess: empty input folders
    saved = json.loads((work / "config.json").read_text(encoding="utf-8"))  # written before any stage
    lesions = saved["train-gan"]["lesions"]
    assert lesions["ggo_hu"] == [-650.0, -350.0] and lesions["octaves"] == 2 and lesions["edge"] == 0.04
    assert config_from_tables(saved) == load_config(settings_toml)


# ---- [train-seg]: the display-slice augmentations (#16) -------------------------------------------------

DISPLAY_SETTINGS = """
[train-seg]
display_p = 0.5
blur_p = 0.25
blur_sigma_px = 1.5
display_center_hu = [-700, -500]
display_width_hu = [1200, 1600]
display_gamma = 1.5
display_assumed_window_hu = [-1200, 200]
"""


def test_train_seg_reads_the_display_augmentations_from_a_settings_file(tmp_path):
    path = tmp_path / "display.toml"
    path.write_text(DISPLAY_SETTINGS, encoding="utf-8")
    seg = load_config(path).train_seg
    assert seg == SegTrainConfig(display_p=0.5, blur_p=0.25, blur_sigma_px=1.5,
                                 display_center_hu=(-700.0, -500.0), display_width_hu=(1200.0, 1600.0),
                                 display_gamma=1.5, display_assumed_window_hu=(-1200.0, 200.0))  # fmt: skip
    assert SegTrainConfig.from_json(json.loads(json.dumps(seg.to_json()))) == seg  # as config.json holds it
    defaults = SegTrainConfig()
    # the measured recipe (docs/results.md)
    assert (defaults.display_p, defaults.blur_p, defaults.synth_lesion_p) == (0.5, 0.3, 0.3)
    assert defaults.healthy_budget_percent is None


def test_a_train_seg_config_from_before_the_display_augmentations_resumes_with_them_off():
    from covidseg.learning.loop import resumed_config

    saved = SegTrainConfig(steps=10, lr=1e-3, seed=3).to_json()
    for key in [k for k in saved if k.startswith(("display_", "blur_"))]:
        del saved[key]  # an older checkpoint's train_config
    resumed = resumed_config(SegTrainConfig(steps=20, display_p=1.0), saved)
    assert resumed == SegTrainConfig(steps=20, lr=1e-3, seed=3, display_p=0.0, blur_p=0.0)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("display_p = 1.5", "display_p = 1.5: must be a number in [0, 1]"),
        ("blur_p = -0.1", "blur_p = -0.1: must be a number in [0, 1]"),
        ("blur_p = nan", "blur_p = nan: must be a number in [0, 1]"),
        ("blur_sigma_px = 0", "blur_sigma_px = 0.0: must be a number in (0, 10] px"),
        ("display_center_hu = [-450, -750]", "display_center_hu = [-450.0, -750.0]: must be two numbers"),
        (
            "display_width_hu = [0, 1500]",
            "display_width_hu = [0.0, 1500.0]: must be two numbers [lo, hi] in (0",
        ),
        ("display_width_hu = [1700, 1000]", "display_width_hu = [1700.0, 1000.0]: must be two numbers"),
        ("display_gamma = 0.8", "display_gamma = 0.8: must be a number in [1, 10]"),
        ("display_gamma = inf", "display_gamma = inf: must be a number in [1, 10]"),
        ("display_assumed_window_hu = [150, -1350]", "display_assumed_window_hu = [150.0, -1350.0]: must be"),
        ("display_assumed_window_hu = [150, 150]", "display_assumed_window_hu = [150.0, 150.0]: must be"),
    ],
)
def test_a_bad_display_augmentation_setting_is_refused(tmp_path, line, message):
    path = tmp_path / "bad.toml"
    path.write_text(f"[train-seg]\n{line}\n", encoding="utf-8")
    with pytest.raises(UsageError, match=re.escape(f"[train-seg] {message}")):
        load_config(path)
    key, value = (part.strip() for part in line.split("="))
    with pytest.raises(SettingError, match=re.escape(message)):  # code that builds the config directly
        parsed = json.loads(value) if value.startswith("[") else [float(value)]
        SegTrainConfig(**{key: tuple(map(float, parsed)) if value.startswith("[") else parsed[0]})


def test_train_seg_options_reach_the_config(tmp_path, monkeypatch):
    seen = []

    def fake_run_train_seg(masks, output, config, loss_config, *rest):
        seen.append(config)
        return {"best": {"step": 0, "val_dice_pseudo": -1.0}, "threshold": {"value": 0.5, "source": "fixed"}}

    monkeypatch.setattr("covidseg.stages.train_seg.run_train_seg", fake_run_train_seg)
    args = ["train-seg", str(tmp_path / "masks"), "-o", str(tmp_path / "seg"), "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--display-p", "0.5", "--blur-p", "0.25"])
    assert result.exit_code == 0, result.output
    assert (seen[0].display_p, seen[0].blur_p) == (0.5, 0.25)
    assert seen[0].display_assumed_window_hu == (-1350.0, 150.0)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and (seen[1].display_p, seen[1].blur_p) == (0.5, 0.3)  # the defaults
    result = CliRunner().invoke(app, [*args, "--display-p", "1.5"])
    assert result.exit_code == 2 and "--display-p 1.5: must be a number in [0, 1]" in result.output
    assert len(seen) == 2


def test_synthetic_lesions_come_from_the_option_or_a_settings_file_and_old_runs_resume_without(
    tmp_path, monkeypatch
):
    from covidseg.learning.loop import resumed_config

    seen = []
    monkeypatch.setattr(
        "covidseg.stages.train_seg.run_train_seg",
        lambda masks, output, config, *rest: (
            seen.append(config)
            or {"best": {"step": 0, "val_dice_pseudo": -1.0}, "threshold": {"value": 0.5, "source": "fixed"}}
        ),
    )
    args = ["train-seg", str(tmp_path / "masks"), "-o", str(tmp_path / "seg"), "--no-progress"]
    assert CliRunner().invoke(app, [*args, "--synth-lesion-p", "0.3", "--healthy-budget", "1"]).exit_code == 0
    assert seen[0].synth_lesion_p == 0.3 and seen[0].healthy_budget_percent == 1.0
    result = CliRunner().invoke(app, [*args, "--synth-lesion-p", "2"])
    assert result.exit_code == 2 and "--synth-lesion-p 2.0: must be a number in [0, 1]" in result.output
    path = tmp_path / "synth.toml"
    path.write_text("[train-seg]\nsynth_lesion_p = 0.4\nhealthy_budget_percent = 2\n", encoding="utf-8")
    assert load_config(path).train_seg.synth_lesion_p == 0.4
    assert load_config(path).train_seg.healthy_budget_percent == 2.0
    path.write_text("[train-seg]\nhealthy_budget_percent = 101\n", encoding="utf-8")
    with pytest.raises(
        UsageError, match=re.escape("healthy_budget_percent = 101: must be a number in [0, 100]")
    ):
        load_config(path)
    saved = SegTrainConfig(steps=10).to_json()
    del saved["synth_lesion_p"], saved["healthy_budget_percent"]  # a checkpoint from before them
    resumed = resumed_config(SegTrainConfig(synth_lesion_p=0.5, healthy_budget_percent=1.0), saved)
    assert resumed.synth_lesion_p == 0.0 and resumed.healthy_budget_percent is None

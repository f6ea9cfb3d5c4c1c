"""train-gan and make-masks as a user runs them: CLI, resume, checkpoints, native geometry."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from covidseg.cli import app
from covidseg.config import GanTrainConfig, PreprocessConfig
from covidseg.errors import InputError, UsageError
from covidseg.imaging.geometry import Geometry
from covidseg.learning.loop import load_checkpoint
from covidseg.stages._workdir import stored_path
from covidseg.stages.make_masks import run_make_masks
from covidseg.stages.preprocess import run_preprocess
from covidseg.stages.synth import run_synth
from covidseg.stages.train_gan import run_train_gan

runner = CliRunner()
GRID = (16, 64, 64)


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    root = tmp_path_factory.mktemp("gan")
    run_synth(root / "synth", 2, 2, seed=11, shape_zyx=(28, 96, 96), spacing_zyx=(10.0, 3.75, 3.75))
    s = root / "synth"
    run_preprocess(root / "pre", s / "healthy", s / "covid", s / "masks", PreprocessConfig(grid=GRID))
    return root / "pre"


def _config(**kw) -> GanTrainConfig:
    base = dict(steps=4, batch_size=1, crop=(8, 32, 32), checkpoint_every=2, sample_every=2, log_every=1)
    return GanTrainConfig(**{**base, **kw})


def test_two_step_cli_run(pre, tmp_path):
    out = tmp_path / "gan"
    result = runner.invoke(
        app, ["train-gan", str(pre), "-o", str(out), "--steps", "2", "--crop", "8,32,32", "--batch-size", "1",
              "--checkpoint-every", "1", "--no-progress", "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for name in ("checkpoint.pt", "generator.pt", "metrics.csv", "calibration.json", "manifest.json"):
        assert (out / name).exists(), name
    assert (out / "plots" / "loss.png").exists() and (out / "plots" / "sample_000002.png").exists()
    payload = torch.load(out / "checkpoint.pt", weights_only=True)  # plain data, no pickled code
    assert payload["step"] == 2 and "opt_g" in payload and "opt_d" in payload
    # a second run into the same folder without --resume is refused
    again = runner.invoke(app, ["train-gan", str(pre), "-o", str(out), "--steps", "2", "--no-progress"])
    assert again.exit_code == 2 and "--resume" in again.output


def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(pre, tmp_path):
    straight = tmp_path / "straight"
    run_train_gan(pre, straight, _config(steps=4), device="cpu")
    split = tmp_path / "split"
    run_train_gan(pre, split, _config(steps=2), device="cpu")
    run_train_gan(pre, split, _config(steps=4), device="cpu", resume=True)
    a = load_checkpoint(straight / "checkpoint.pt")
    b = load_checkpoint(split / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    for key in a["generator"]:
        torch.testing.assert_close(a["generator"][key], b["generator"][key], rtol=1e-4, atol=1e-5)
    with open(split / "metrics.csv") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh)]
    assert steps == [1, 2, 3, 4]


def test_ablation_switches(pre, tmp_path):
    manifest = run_train_gan(
        pre, tmp_path / "g", _config(steps=1, latent_noise="none", w_adv=0.0), device="cpu"
    )
    assert manifest["steps"] == 1
    with pytest.raises(ValueError, match='preset = "huge": must be one of tiny, small, base'):
        _config(preset="huge")  # refused when the settings are made (covidseg.settings)
    with pytest.raises(UsageError, match="multiple"):
        run_train_gan(pre, tmp_path / "i", _config(crop=(8, 30, 32)), device="cpu")


def test_corrupt_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(InputError, match="not a readable covidseg checkpoint"):
        load_checkpoint(bad)


def test_make_masks_outputs_lie_on_the_source_scan(pre, tmp_path):
    gan = tmp_path / "gan"
    run_train_gan(pre, gan, _config(steps=2), device="cpu")
    out = tmp_path / "masks"
    manifest = run_make_masks(pre, gan, out, device="cpu")
    assert manifest["failed"] == [] and len(manifest["cases"]) == 4
    pre_manifest = json.loads((pre / "manifest.json").read_text())
    for record in pre_manifest["cases"]:
        source = sitk.ReadImage(str(stored_path(pre, record["source"])))  # relative to pre/
        healthy = sitk.ReadImage(str(out / "pseudo_healthy" / f"{record['id']}.nii.gz"))
        mask = sitk.ReadImage(str(out / "pseudo_masks" / f"{record['id']}.nii.gz"))
        for image in (healthy, mask):
            assert Geometry.of(image).matches(Geometry.of(source), atol=1e-4)
        # outside the lung crop box nothing changes; inside, density is only removed
        src, hl = sitk.GetArrayFromImage(source), sitk.GetArrayFromImage(healthy)
        assert (hl <= src).all()
        z0, z1, y0, y1, x0, x1 = record["crop_box"]
        outside = np.ones(src.shape, bool)
        outside[z0:z1, y0:y1, x0:x1] = False
        assert np.array_equal(hl[outside], src[outside])
    n = manifest["slices"]["n"]
    assert np.load(out / "slices" / "images.npy").shape == (n, *GRID[1:])
    assert np.load(out / "slices" / "refs.npy").shape == (n, *GRID[1:])
    rows = list(csv.DictReader(open(out / "slices" / "index.csv")))
    assert len(rows) == n and {r["set"] for r in rows} <= {"high", "low", "mid"}
    with pytest.raises(UsageError, match="--overwrite"):
        run_make_masks(pre, gan, out, device="cpu")


@pytest.fixture(scope="module")
def masks(pre, tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    run_train_gan(pre, root / "gan", _config(steps=2), device="cpu")
    run_make_masks(pre, root / "gan", root / "masks", device="cpu", native=False)
    return root / "masks"


def test_train_seg_two_step_cli_run_and_resume(masks, tmp_path):
    from covidseg.config import SegTrainConfig
    from covidseg.stages.train_seg import run_train_seg

    out = tmp_path / "seg"
    result = runner.invoke(
        app, ["train-seg", str(masks), "-o", str(out), "--steps", "2", "--batch-size", "4",
              "--eval-every", "1", "--no-progress", "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for name in ("checkpoint.pt", "best.pt", "metrics.csv", "manifest.json", "plots/loss.png"):
        assert (out / name).exists(), name
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["format"] == "covidseg.seg.model" and best["model"]["arch"] == "transunet"
    # what predict needs: the grid's slice size and slab thickness (lung box height / 16 slices)
    spec = best["preprocessing"]
    assert spec["slice_size"] == list(GRID[1:]) and spec["hu_window"] == [-1000.0, 400.0]
    assert 8.0 < spec["slab_mm"] < 20.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["val_cases"] and manifest["n_train_slices"] > 0

    # resume: 2 + 2 steps equal 4 straight steps (same batches, augmentations and noise), with the
    # display-slice augmentations on (their draws come from the same stream)
    cfg = dict(arch="unet", batch_size=4, eval_every=2, log_every=1, display_p=0.5, blur_p=0.5)
    # constant rate: a cosine one is a function of the total steps, which this split changes
    run_train_seg(masks, tmp_path / "a", SegTrainConfig(steps=4, **cfg), device="cpu")
    run_train_seg(masks, tmp_path / "b", SegTrainConfig(steps=2, **cfg), device="cpu")
    run_train_seg(masks, tmp_path / "b", SegTrainConfig(steps=4, **cfg), device="cpu", resume=True)
    a, b = (
        load_checkpoint(tmp_path / "a" / "checkpoint.pt"),
        load_checkpoint(tmp_path / "b" / "checkpoint.pt"),
    )
    assert a["step"] == b["step"] == 4
    assert (b["train_config"]["display_p"], b["train_config"]["blur_p"]) == (0.5, 0.5)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5)
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "b" / "metrics.csv"))]
    assert steps == [1, 2, 3, 4]


def test_the_gan_paints_its_lesions_on_the_preprocess_hu_window(tmp_path, monkeypatch):
    """train-gan takes the HU window of the grids from the preprocess manifest for its synthetic
    lesions (it used the default window whatever --hu-window preprocess had)."""
    import covidseg.stages.train_gan as stage

    root = tmp_path
    run_synth(root / "synth", 1, 1, seed=11, shape_zyx=(28, 96, 96), spacing_zyx=(10.0, 3.75, 3.75))
    s = root / "synth"
    config = PreprocessConfig(grid=GRID, hu_window=(-1350.0, 150.0))
    run_preprocess(root / "pre", s / "healthy", s / "covid", s / "masks", config)
    windows, real = [], stage.perlin_lesions

    def recording(*args, scale, **kwargs):
        windows.append(scale.window)
        return real(*args, scale=scale, **kwargs)

    monkeypatch.setattr(stage, "perlin_lesions", recording)
    run_train_gan(root / "pre", root / "gan", _config(steps=1), device="cpu")
    assert windows and set(windows) == {(-1350.0, 150.0)}


def test_the_lesion_settings_reach_the_synthetic_lesions(pre, tmp_path, monkeypatch):
    from covidseg.config import CorruptionConfig
    from covidseg.stages import train_gan

    seen = []

    def recording(image, lung, generator, config=None, *, scale):
        seen.append(config)
        return original(image, lung, generator, config, scale=scale)

    original = train_gan.perlin_lesions
    monkeypatch.setattr(train_gan, "perlin_lesions", recording)
    lesions = CorruptionConfig(ggo_hu=(-650.0, -550.0), octaves=2)
    run_train_gan(pre, tmp_path / "g", _config(steps=1, w_adv=0.0, lesions=lesions), device="cpu")
    assert seen == [lesions]
    saved = load_checkpoint(tmp_path / "g" / "generator.pt")["train_config"]
    assert GanTrainConfig.from_json(saved).lesions == lesions

"""One HU scale (imaging.grid.HuScale): its arithmetic, the densities given in HU that land at the
same HU on any window, and the whole chain carrying a non-default ``--hu-window`` from preprocess to
predict, with make-masks refusing a generator trained on another window."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import one_torch_thread
from covidseg.cli import app
from covidseg.config import GanTrainConfig
from covidseg.errors import UsageError
from covidseg.imaging.grid import DEFAULT_HU_SCALE, HuScale
from covidseg.learning.augment import augment_batch
from covidseg.method.lesions import perlin_lesions
from covidseg.method.pseudo_masks import (
    PseudoMaskConfig,
    binarise,
    calibrate_threshold,
    soft_mask,
    threshold_baseline,
)
from covidseg.stages.train_gan import run_train_gan

runner = CliRunner()
WINDOWS = [DEFAULT_HU_SCALE, HuScale(-1100.0, 300.0), HuScale(-1200.0, 600.0)]  # shifted, then wider
SHIFTED = "-1100,300"


# ---- the value type -------------------------------------------------------------------------------


def test_closed_form_values_on_the_default_window():
    scale = HuScale()
    assert scale == DEFAULT_HU_SCALE and scale.window == (-1000.0, 400.0) and scale.width_hu == 1400.0
    assert scale.to_unit(-1000.0) == 0.0 and scale.to_unit(400.0) == 1.0 and scale.to_unit(-300.0) == 0.5
    assert scale.to_hu(0.25) == -650.0
    # the unit values the code used before the settings were HU, exactly (bit-identical runs)
    assert scale.unit_of_hu_difference(28.0) == 0.02 and scale.unit_of_hu_difference(350.0) == 0.25
    assert scale.unit_of_hu_difference(42.0) == 0.03 and scale.unit_of_hu_difference(70.0) == 0.05
    assert scale.hu_of_unit_difference(0.25) == 350.0
    assert str(scale) == "-1000..400" and str(HuScale(-1100.0, 300.5)) == "-1100..300.5"


@pytest.mark.parametrize("scale", WINDOWS, ids=str)
def test_round_trips(scale):
    hu = np.array([-2000.0, scale.low_hu, -850.0, 0.0, scale.high_hu, 3000.0])
    np.testing.assert_allclose(scale.to_hu(scale.to_unit(hu)), hu, atol=1e-9)
    assert scale.hu_of_unit_difference(scale.unit_of_hu_difference(28.0)) == pytest.approx(28.0)
    assert HuScale.from_json(json.loads(json.dumps(scale.to_json()))) == scale
    unit = scale.normalise(torch.tensor(hu, dtype=torch.float32))  # clipped to the window, float32
    assert unit.dtype == torch.float32 and unit.min() == 0.0 and unit.max() == 1.0
    torch.testing.assert_close(scale.to_hu(unit[1:5].double()), torch.tensor(hu[1:5]), rtol=0, atol=1e-4)


def test_older_files_and_bad_values():
    assert HuScale.from_json(None) == DEFAULT_HU_SCALE  # a file from before the window was recorded
    assert HuScale.from_json([-1100, 300]) == HuScale(-1100.0, 300.0)
    for bad in ([400, -1000], [-1000], "wide", [-1000, float("nan")]):
        with pytest.raises(ValueError, match="hu_window|HU window"):
            HuScale.from_json(bad)


# ---- densities in HU land at the same HU on every window ------------------------------------------


def _lung(shape=(1, 1, 16, 64, 64)) -> torch.Tensor:
    lung = torch.zeros(shape)
    lung[..., 2:14, 10:54, 6:30] = 1.0
    lung[..., 2:14, 10:54, 34:58] = 1.0
    return lung


def test_synthetic_lesions_land_at_the_same_hu_on_every_window():
    hu = torch.full((2, 1, 16, 64, 64), -850.0)
    hu[..., 8, 30:34, 16:20] = 40.0  # a vessel
    lung = _lung(hu.shape)
    painted = []
    for scale in WINDOWS:
        corrupted, lesion = perlin_lesions(
            scale.to_unit(hu), lung, torch.Generator().manual_seed(3), scale=scale
        )
        painted.append((scale.to_hu(corrupted.double()), lesion))
    reference, lesion = painted[0]
    assert lesion.sum() > 100
    inside = reference[lesion > 0]
    assert inside.min() > -760.0 and inside.max() < 300.0  # ground glass (-700..-300) to consolidation
    for other, other_lesion in painted[1:]:
        assert torch.equal(other_lesion, lesion)
        torch.testing.assert_close(other, reference, rtol=0, atol=0.01)  # HU


@pytest.mark.parametrize("scale", WINDOWS[1:], ids=str)
def test_min_threshold_soft_scale_and_baseline_cut_at_the_same_hu(scale):
    difference_hu = np.linspace(0.5, 500.5, 501).reshape(1, 1, 501)  # 1 HU steps, none on a cut
    lung = np.ones(difference_hu.shape, np.uint8)
    cuts = {}
    for s in (DEFAULT_HU_SCALE, scale):
        diff = s.unit_of_hu_difference(difference_hu).astype(np.float32)
        # a healthy percentile far below 28 HU: the calibrated threshold is the minimum, 28 HU
        threshold = calibrate_threshold([diff * 0.01], [lung], PseudoMaskConfig(), s)
        assert s.hu_of_unit_difference(threshold) == pytest.approx(28.0)
        flagged = binarise(diff, threshold, min_component=1)
        soft = soft_mask(diff, s)
        image = s.to_unit(np.linspace(-999.0, 1.0, 501).reshape(1, 1, 501)).astype(np.float32)
        cuts[s] = (flagged, soft, threshold_baseline(image, lung, s, hu=-600.0, min_component=1))
    (flag_a, soft_a, base_a), (flag_b, soft_b, base_b) = cuts.values()
    assert np.array_equal(flag_a, flag_b) and flag_a.sum() == 501 - 28  # 28.5 HU and up
    np.testing.assert_allclose(soft_a, np.clip(difference_hu / 350.0, 0.0, 1.0), atol=1e-6)
    np.testing.assert_allclose(soft_b, soft_a, atol=1e-6)
    assert np.array_equal(base_a, base_b) and base_a.sum() == 301  # -599 HU and up


@pytest.mark.parametrize("scale", WINDOWS[1:], ids=str)
def test_augmentation_offsets_and_noise_are_hu(scale):
    """Without geometric change, the same draws move a -850 HU image by the same HU on any window."""
    hu = torch.full((3, 1, 16, 16), -850.0)
    out = {}
    for s in (DEFAULT_HU_SCALE, scale):
        image, _ = augment_batch(s.to_unit(hu), [], torch.Generator().manual_seed(4), s, max_rotation_deg=0.0,
                                 scale_range=(1.0, 1.0))  # fmt: skip
        out[s] = s.to_hu(image.double())
    a, b = out.values()
    assert (a - hu).abs().max() > 20.0  # it did change the image
    torch.testing.assert_close(a, b, rtol=0, atol=0.01)  # HU


# ---- the chain through the CLI ----------------------------------------------------------------------


def _invoke(*args) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """synth -> preprocess --hu-window -1100,300 -> train-gan -> make-masks -> train-seg -> predict,
    each with the fewest steps, through the real command line (and a default-window preprocess)."""
    root = tmp_path_factory.mktemp("hu_chain")
    s = root / "synth"
    cpu = ("--device", "cpu", "--no-progress")
    steps = ("--steps", 2, "--batch-size")
    with one_torch_thread():
        _invoke("synth", "--healthy", 1, "--covid", 1, "--seed", 5, "--shape", "24,64,64",
                "--spacing", "12,5.5,5.5", "-o", s, "--no-progress")  # fmt: skip
        pre = ("preprocess", "--healthy", s / "healthy", "--covid", s / "covid", "--grid", "8,32,32")
        _invoke(*pre, "--hu-window", SHIFTED, "-o", root / "pre", "--no-progress")
        _invoke(*pre, "-o", root / "pre_default", "--no-progress")
        _invoke(
            "train-gan",
            root / "pre",
            "-o",
            root / "gan",
            "--preset",
            "tiny",
            *steps,
            1,
            "--crop",
            "none",
            *cpu,
        )
        _invoke("make-masks", root / "pre", "--gan", root / "gan", "-o", root / "masks", "--no-native", *cpu)
        _invoke("train-seg", root / "masks", "-o", root / "seg", *steps, 4, "--eval-every", 2, *cpu)
        _invoke("predict", s / "covid", "--model", root / "seg" / "best.pt", "-o", root / "pred", *cpu)
    return root


def test_a_non_default_window_is_carried_from_preprocess_to_predict(chain):
    shifted = [-1100.0, 300.0]

    def manifest(folder: str) -> dict:
        return json.loads((chain / folder / "manifest.json").read_text())

    def saved(path: str) -> dict:
        return torch.load(chain / path, weights_only=True)

    assert manifest("pre")["config"]["hu_window"] == shifted
    assert manifest("gan")["hu_window"] == shifted
    assert saved("gan/checkpoint.pt")["hu_window"] == shifted
    assert saved("gan/generator.pt")["preprocess"]["hu_window"] == shifted
    masks = manifest("masks")
    assert masks["hu_window"] == shifted and masks["soft_scale_hu"] == 350.0
    assert masks["config"]["min_threshold_hu"] == 28.0
    assert saved("seg/best.pt")["preprocessing"]["hu_window"] == shifted
    assert (chain / "pred" / "covid_000.nii.gz").exists()
    assert (
        json.loads((chain / "pred" / "covid_000.json").read_text())["preprocessing"]["hu_window"] == shifted
    )
    # the grids hold the shifted scale (air, -1000 HU, is 100/1400 there) and the same lung HU
    lungs = np.load(chain / "pre" / "lungs" / "healthy_000.npy") > 0
    image = HuScale(*shifted).to_hu(np.load(chain / "pre" / "images" / "healthy_000.npy").astype(np.float64))
    default = DEFAULT_HU_SCALE.to_hu(
        np.load(chain / "pre_default" / "images" / "healthy_000.npy").astype(np.float64)
    )
    assert abs(np.median(image[lungs]) - np.median(default[lungs])) < 0.01
    assert -900.0 < np.median(image[lungs]) < -700.0


def test_make_masks_refuses_a_generator_trained_on_another_window(chain, tmp_path):
    result = runner.invoke(app, ["make-masks", str(chain / "pre_default"), "--gan", str(chain / "gan"), "-o",
                                 str(tmp_path / "masks"), "--device", "cpu", "--no-progress"])  # fmt: skip
    assert result.exit_code == 2
    line = " ".join(result.output.split())  # the console may wrap the one line
    assert "generator.pt: trained on HU window -1100..300" in line and "use -1000..400" in line
    assert not (tmp_path / "masks").exists()


def test_train_gan_resumes_only_on_the_window_it_started_on(chain, tmp_path):
    shutil.copytree(chain / "gan", tmp_path / "gan")
    config = GanTrainConfig(preset="tiny", steps=3, batch_size=1, crop=None)
    with pytest.raises(UsageError, match="trained on HU window -1100..300, the grids in .* use -1000..400"):
        run_train_gan(chain / "pre_default", tmp_path / "gan", config, device="cpu", resume=True)

"""The display-slice lung mask (covidseg.imaging.display_lungs): lungs of 8-bit lung-windowed slices."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from covidseg.config import PredictOptions
from covidseg.imaging.display_lungs import otsu_threshold, segment_display_lungs, segment_input_lungs
from covidseg.imaging.intensity import parse_intensity
from covidseg.imaging.lungs import LungParams, segment_lungs
from covidseg.io import read_ct
from covidseg.stages.predict import predict_inputs

SHOWN = parse_intensity("window:-1350,150")  # what the user passes for a lung-windowed JPEG


def _display_slice(window=(-1200.0, 100.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A thorax cropped to its lungs, rendered through `window` to 8 bits: (image uint8 [y, x],
    true lungs [y, x] bool, a dense lesion inside the right lung [y, x] bool)."""
    y, x = np.mgrid[0:180, 0:220]
    hu = np.full(y.shape, 40.0)  # soft tissue fills the crop: no air around the patient
    right = ((y - 90) / 85.0) ** 2 + ((x - 40) / 55.0) ** 2 <= 1.0  # touches the image's left edge
    left = ((y - 90) / 80.0) ** 2 + ((x - 180) / 55.0) ** 2 <= 1.0  # ... and its right edge
    hu[right | left] = -860.0
    lesion = ((y - 90) ** 2 + (x - 45) ** 2) <= 15**2
    hu[lesion] = -50.0  # a consolidation, as bright as the chest wall
    vessels = right & ((y % 30 == 0) | (x % 37 == 0))
    hu[vessels] = 30.0
    hu += np.random.default_rng(0).normal(0.0, 20.0, hu.shape)
    lo, hi = window
    image = np.clip(np.round((hu - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    return image, right | left, lesion


def test_otsu_threshold_lies_between_two_modes():
    values = np.concatenate([np.full(500, -900.0), np.full(300, 40.0)])
    values += np.random.default_rng(1).normal(0.0, 30.0, values.size)
    assert -700.0 < otsu_threshold(values) < -150.0
    assert otsu_threshold(np.full(10, 3.0)) == 3.0


@pytest.mark.parametrize("window", [(-1200.0, 100.0), (-1000.0, 400.0), (-1400.0, -200.0)])
def test_display_slice_lungs_found_whatever_the_window(window):
    image, truth, lesion = _display_slice(window)
    hu = SHOWN.apply(image)[None]  # [1, y, x] as read with --intensity window:-1350,150
    labels = segment_display_lungs(hu).full()[0]
    lungs = labels > 0
    dice = 2 * (lungs & truth).sum() / (lungs.sum() + truth.sum())
    assert dice > 0.95
    assert lungs[lesion].all()  # the consolidation is filled in
    # two lungs, one label each: the right lung (small x) is 1
    assert (labels[truth & (np.arange(220) < 110)] == 1).mean() > 0.99
    assert (labels[truth & (np.arange(220) >= 110)] == 2).mean() > 0.99


def test_the_classical_mask_needs_the_air_around_the_patient():
    image, truth, _ = _display_slice()
    hu = SHOWN.apply(image)[None]
    classical = segment_lungs(hu, (1.0, 1.0, 1.0)).full()[0] > 0
    assert (classical & truth).sum() < 0.5 * truth.sum()  # why display slices need their own mask


def test_window_mappings_choose_the_display_mask_and_others_the_classical_one(phantom):
    image, _, _ = _display_slice()
    hu = SHOWN.apply(image)[None]
    display = segment_input_lungs(hu, (1.0, 1.0, 1.0), LungParams(), SHOWN)
    assert np.array_equal(display.labels, segment_display_lungs(hu).labels)
    for intensity in (None, parse_intensity("linear:1,-1024")):
        chosen = segment_input_lungs(phantom.hu, phantom.spacing_zyx, LungParams(), intensity)
        assert np.array_equal(chosen.labels, segment_lungs(phantom.hu, phantom.spacing_zyx).labels)


def test_predict_segments_display_slices_inside_their_lungs(model_onnx, tmp_path):
    image, truth, _ = _display_slice()
    inputs = tmp_path / "slices"
    inputs.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(image), str(inputs / "crop.png"))
    result = predict_inputs(
        [inputs], tmp_path / "pred", model=str(model_onnx), options=PredictOptions(intensity=SHOWN)
    )
    assert not result.failures
    record = json.loads((tmp_path / "pred" / "crop.json").read_text())
    assert record["status"] == "ok" and record["lung_mask"] == "display"
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred" / "crop.nii.gz")))
    assert lesion.any() and not (lesion.astype(bool).reshape(truth.shape) & ~truth).any()


def test_every_real_covid_semiseg_slice_gets_lungs_holding_most_lesion(shared_data):
    """The 50 real slices: none lost (the classical mask lost 23), 75 % of the experts' lesion
    pixels inside the lung mask (measured: 80 %)."""
    folder = shared_data / "covid_semiseg_infnet" / "train"
    inside = total = 0
    for path in sorted((folder / "Imgs").iterdir()):
        volume, _ = read_ct(path, intensity=SHOWN)
        lungs = volume.orientation.to_native(segment_display_lungs(volume.hu).full())[0] > 0
        assert lungs.mean() > 0.05, path.name
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "GT" / f"{path.stem}.png"))) > 127
        inside += (lungs & truth).sum()
        total += truth.sum()
    assert inside / total > 0.75

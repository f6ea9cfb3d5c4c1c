"""train-seg's label-free threshold: calibrated on the held-out healthy cases' slices."""

from __future__ import annotations

import numpy as np
import pytest

from covidseg.stages.make_masks import run_make_masks

# trained (a preprocess folder and a tiny GAN) is a fixture in conftest.py


def test_train_seg_calibrates_its_threshold_on_held_out_healthy_slices(trained, tmp_path):
    from _small_inputs import GRID
    from conftest import save_untrained_segmenter
    from covidseg.inference.model_files import open_seg_model
    from covidseg.inference.runners import predict_probabilities
    from covidseg.learning.loop import load_checkpoint
    from covidseg.stages.train_seg import SliceSet, calibrate_on_healthy

    run_make_masks(trained.pre, trained.gan, tmp_path / "masks", device="cpu", native=False)
    data = SliceSet(tmp_path / "masks")
    model = save_untrained_segmenter(tmp_path / "seg" / "best.pt", slice_size=GRID[1:])
    healthy = np.nonzero(data.groups == "healthy")[0]
    covid = np.nonzero(data.groups == "covid")[0]
    assert len(healthy) and len(covid)

    kept = calibrate_on_healthy(model, data, covid, 1.0, "cpu")  # no healthy case held out
    assert kept["value"] == 0.5 and kept["source"].startswith("fixed: no healthy case")
    prob = predict_probabilities(open_seg_model(model).torch_model(), data.images[healthy])
    lungs = data.lungs[healthy] > 0
    flagged = {t: 100.0 * ((prob >= t) & lungs).sum() / lungs.sum() for t in (0.5, 0.55, 0.6, 0.65, 0.7)}
    budget = (flagged[0.55] + flagged[0.6]) / 2  # between what 0.55 and 0.6 flag: 0.6 is the lowest within it
    assert flagged[0.55] > flagged[0.6]
    chosen = calibrate_on_healthy(model, data, np.concatenate([healthy, covid]), budget, "cpu")
    assert chosen["value"] == 0.6 and chosen["healthy_flagged_percent"] == pytest.approx(flagged[0.6])
    payload = load_checkpoint(model)
    assert payload["threshold"] == payload["preprocessing"]["threshold"] == 0.6
    assert open_seg_model(model).spec.threshold == 0.6  # what predict and export read

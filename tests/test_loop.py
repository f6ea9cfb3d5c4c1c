"""Training plumbing: the learning-rate schedule."""

from __future__ import annotations

import json

import pytest
import torch

from covidseg.config import GanTrainConfig
from covidseg.learning.loop import RunningMeans, lr_at, open_run_folder, resumed_config


def test_cosine_schedule_warms_up_then_decays_to_one_percent():
    lrs = [lr_at(step, 100, 1.0, "cosine", warmup=10) for step in range(1, 101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # never rises after warm-up
    assert lrs[-1] == pytest.approx(0.01)
    assert lr_at(55, 100, 1.0, "cosine", warmup=10) == pytest.approx(0.505)  # half-way: the mean


def test_constant_schedule_and_unknown_names():
    assert {lr_at(s, 50, 3e-4, "constant") for s in range(1, 51)} == {3e-4}
    with pytest.raises(ValueError, match="schedule"):
        lr_at(1, 10, 1.0, "step")


def test_running_means_average_the_steps_since_the_last_row():
    means = RunningMeans()
    for loss in (1.0, 2.0, 6.0):
        means.add({"loss": loss, "other": 2 * loss})
    assert means.pop(torch.device("cpu")) == {"loss": 3.0, "other": 6.0}
    means.add({"loss": 0.5, "other": 1.0})  # a row after one step (a resume off the log grid)
    assert means.pop(torch.device("cpu")) == {"loss": 0.5, "other": 1.0}


def test_a_resumed_run_keeps_its_settings_but_takes_steps_and_grad_accum_from_the_call():
    saved = GanTrainConfig(preset="tiny", steps=10, grad_accum=1, lr_g=1e-3, seed=7).to_json()
    call = GanTrainConfig(steps=30, grad_accum=4)  # other defaults: ignored on resume
    resumed = resumed_config(call, saved)
    assert (resumed.steps, resumed.grad_accum) == (30, 4)
    assert (resumed.preset, resumed.lr_g, resumed.seed) == ("tiny", 1e-3, 7)


def test_a_run_folder_is_made_ready_and_its_log_trimmed_on_resume(tmp_path):
    out = tmp_path / "run"
    log = open_run_folder(out, {"train": {"steps": 3}}, ["step", "loss"], resume_step=None)
    (out / "manifest.json").write_text("{}", encoding="utf-8")  # a finished earlier run
    (out / "plots").mkdir()
    for step in (1, 2, 3):
        log.write({"step": step, "loss": step / 10})
    log = open_run_folder(out, {"train": {"steps": 5}}, ["step", "loss"], resume_step=2)
    assert not (out / "manifest.json").exists()  # written again when the run is finished
    assert json.loads((out / "config.json").read_text(encoding="utf-8")) == {"train": {"steps": 5}}
    assert [row["step"] for row in log.read()] == ["1", "2"]  # rows after the checkpoint are gone

"""inference/model_home: models installed by name under $COVIDSEG_HOME, used by predict and listed
by doctor."""

from __future__ import annotations

import json

import numpy as np

from _small_inputs import SHAPE, SPACING, invoke, lps_geometry
from covidseg.io import write_array


def test_model_home_names(model_pt, phantom, tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDSEG_HOME", str(tmp_path / "home"))
    ct = tmp_path / "ct.nii.gz"
    write_array(ct, phantom.hu.astype(np.int16), lps_geometry(SHAPE, SPACING))
    result = invoke("predict", str(ct), "-o", str(tmp_path / "o1"), "--model", "mine", "--no-progress")
    assert result.exit_code == 2 and "installed: none" in result.output

    result = invoke("export", str(model_pt), "--name", "mine")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "home" / "models" / "mine.onnx").exists()
    result = invoke("predict", str(ct), "-o", str(tmp_path / "o2"), "--model", "mine", "--no-progress")
    assert result.exit_code == 0, result.output
    result = invoke("doctor", "--json")
    assert result.exit_code == 0
    found = json.loads(result.output)
    assert found["onnxruntime_providers"]["CPUExecutionProvider"] == "usable"
    assert [m["name"] for m in found["home"]["models"]] == ["mine"]
    assert found["home"]["models"][0]["status"] == "ok"

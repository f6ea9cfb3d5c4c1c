"""`covidseg make-masks` with an exported generator: ONNX Runtime against torch, the backend choice,
the fixed ONNX window, and the lock on its output folder."""

from __future__ import annotations

import json
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

"""`covidseg export` of a train-gan folder: the generator as ONNX + sidecar, parity, make-masks on ORT."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from covidseg.cli import app
from covidseg.config import GanTrainConfig, PreprocessConfig
from covidseg.errors import InputError, UsageError
from covidseg.inference.generator_files import read_generator_sidecar
from covidseg.inference.onnx import ParityError, onnx_session, sha256_of
from covidseg.learning.loop import load_checkpoint, save_checkpoint
from covidseg.stages import export
from covidseg.stages.make_masks import _onnx_grid_check, resolve_generator, run_make_masks
from covidseg.stages.preprocess import run_preprocess
from covidseg.stages.synth import run_synth
from covidseg.stages.train_gan import run_train_gan

runner = CliRunner()
GRID = (8, 48, 48)  # 2 x 2 windows of the crop: exercises the blending at little cost
CROP = (8, 32, 32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A preprocess folder, a 2-step tiny GAN trained on 8x32x32 crops, and its ONNX export."""
    root = tmp_path_factory.mktemp("export_gan")
    run_synth(root / "synth", 1, 1, seed=11, shape_zyx=(28, 96, 96), spacing_zyx=(10.0, 3.75, 3.75))
    s = root / "synth"
    run_preprocess(root / "pre", s / "healthy", s / "covid", s / "masks", PreprocessConfig(grid=GRID))
    config = GanTrainConfig(
        preset="tiny", steps=2, batch_size=1, crop=CROP, checkpoint_every=2, sample_every=2, log_every=1
    )
    run_train_gan(root / "pre", root / "gan", config, device="cpu")
    result = export.export_generator(root / "gan", root / "onnx" / "generator.onnx")
    return SimpleNamespace(root=root, pre=root / "pre", gan=root / "gan", export=result)


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


def test_export_writes_a_checked_model_and_its_sidecar(trained):
    result = trained.export
    onnx_path = trained.root / "onnx" / "generator.onnx"
    assert result["onnx"] == str(onnx_path) and result["sidecar"] == str(onnx_path.with_suffix(".json"))
    assert result["parity"]["max_abs_removal_diff"] <= 1e-4
    assert result["window"] == list(CROP) and result["latent_shape"] == [64, 1, 2, 2]
    sidecar = json.loads(onnx_path.with_suffix(".json").read_text())
    payload = load_checkpoint(trained.gan / "generator.pt")
    assert sidecar["format"] == "covidseg.onnx-generator" and sidecar["version"] == 1
    assert sidecar["sha256"] == sha256_of(onnx_path) == result["sha256"]
    assert sidecar["calibration"] == payload["calibration"]
    assert sidecar["preprocess"]["hu_window"] == list(payload["preprocess"]["hu_window"])
    assert [i["name"] for i in sidecar["inputs"]] == ["image", "lung", "noise"]
    session = onnx_session(onnx_path)
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["image"][1:] == [1, *CROP] and shapes["noise"][1:] == [64, 1, 2, 2]
    assert isinstance(shapes["image"][0], str)  # dynamic batch
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == ["generator.json", "generator.onnx"]
    with pytest.raises(UsageError, match="--overwrite"):
        export.export_generator(trained.gan, onnx_path)
    with pytest.raises(UsageError, match=".onnx"):
        export.export_generator(trained.gan, trained.root / "onnx" / "generator.pt")


def test_failed_parity_raises_and_leaves_nothing(trained, tmp_path, monkeypatch):
    # a generator.pt whose weights differ from the model the "exporter" writes
    payload = load_checkpoint(trained.gan / "generator.pt")
    key = next(k for k in payload["generator"] if k.endswith("weight"))
    payload["generator"][key] = payload["generator"][key] * 3.0
    save_checkpoint(tmp_path / "other.pt", payload)
    good = trained.root / "onnx" / "generator.onnx"
    monkeypatch.setattr(export, "export_onnx", lambda module, inputs, path, *a, **k: shutil.copy(good, path))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ParityError, match="differs from torch"):
        export.export_generator(tmp_path / "other.pt", out / "generator.onnx")
    assert list(out.iterdir()) == []


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


def test_a_changed_or_unaccompanied_model_is_refused(trained, tmp_path):
    onnx_path = tmp_path / "generator.onnx"
    shutil.copy(trained.root / "onnx" / "generator.onnx", onnx_path)
    shutil.copy(trained.root / "onnx" / "generator.json", tmp_path / "generator.json")
    with open(onnx_path, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(InputError, match="generator.onnx: sha256 .* does not match"):
        run_make_masks(trained.pre, onnx_path, tmp_path / "out", device="cpu", native=False)
    result = runner.invoke(
        app, ["make-masks", str(trained.pre), "--gan", str(onnx_path), "-o", str(tmp_path / "out"),
              "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 1 and "does not match" in result.output
    (tmp_path / "generator.json").unlink()
    with pytest.raises(InputError, match="generator.onnx: no sidecar generator.json"):
        run_make_masks(trained.pre, onnx_path, tmp_path / "out", device="cpu", native=False)
    assert not (tmp_path / "out").exists()


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


def test_export_command_on_a_train_gan_folder_writes_generator_onnx(trained, tmp_path):
    gan = tmp_path / "gan"
    shutil.copytree(trained.gan, gan)
    result = runner.invoke(app, ["export", str(gan)])
    assert result.exit_code == 0, result.output
    assert (gan / "generator.onnx").is_file() and (gan / "generator.json").is_file()
    # make-masks --backend onnx finds it in the folder
    assert read_generator_sidecar(gan / "generator.onnx")["sha256"]
    refused = runner.invoke(app, ["export", str(gan), "--fp16"])
    assert refused.exit_code == 2

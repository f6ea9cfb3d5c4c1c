"""`covidseg export` and inference/onnx: a segmenter's and a generator's ONNX file and sidecar, parity
with torch, and the sha256/sidecar checks that refuse a changed or broken model file."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from _small_inputs import CROP, SHAPE, SPACING, invoke, lps_geometry, runner
from covidseg.cli import app
from covidseg.errors import InputError, UsageError
from covidseg.inference.generator_files import read_generator_sidecar
from covidseg.inference.model_files import open_seg_model
from covidseg.inference.onnx import ParityError, onnx_session, sha256_of, sidecar_path
from covidseg.io import write_array
from covidseg.learning.loop import load_checkpoint, save_checkpoint
from covidseg.stages import export
from covidseg.stages.export import run_export
from covidseg.stages.make_masks import run_make_masks

# model_pt, model_onnx, phantom and trained (a tiny GAN and its export) are fixtures in conftest.py


# --- a segmenter: export and parity -------------------------------------------------------------------------


def test_export_writes_a_checked_model_and_sidecar(model_pt, model_onnx):
    sidecar = json.loads(sidecar_path(model_onnx).read_text())
    assert sidecar["format"] == "covidseg.onnx-segmenter" and sidecar["opset"] >= 18
    assert sidecar["precision"] == "fp32"
    assert sidecar["parity"]["max_abs_logit_diff"] <= 1e-4
    assert sidecar["parity"]["mask_dice"] >= 0.999
    assert sidecar["preprocessing"]["slice_size"] == [128, 128]
    assert not list(model_onnx.parent.glob(".*tmp*"))

    # the batch dimension is dynamic and ONNX Runtime agrees with torch on new inputs
    torch_model = open_seg_model(model_pt).torch_model()
    session = onnx_session(model_onnx)
    for batch in (1, 5):
        x = torch.rand(batch, 1, 128, 128, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            expected = torch_model(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == (batch, 1, 128, 128)
        assert np.abs(got - expected).max() <= 1e-4


def test_fp16_export_is_checked_at_mask_level(model_pt, tmp_path):
    result = run_export(model_pt, tmp_path / "half.onnx", fp16=True)
    assert result["precision"] == "fp16"
    assert result["parity"]["mask_dice"] >= 0.99


def test_export_refuses_to_overwrite_and_checks_its_arguments(model_pt, model_onnx):
    with pytest.raises(UsageError, match="--overwrite"):
        run_export(model_pt, model_onnx)
    with pytest.raises(UsageError, match=".onnx"):
        run_export(model_pt, model_onnx.with_suffix(".bin"))
    with pytest.raises(UsageError, match="exactly one"):
        run_export(model_pt)


# --- a generator: export and parity -------------------------------------------------------------------------


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


# --- a changed, unaccompanied or broken model file is refused -----------------------------------------------


def test_a_model_whose_sha256_does_not_match_its_sidecar_is_refused(model_onnx, tmp_path, phantom):
    tampered = tmp_path / "model.onnx"
    shutil.copy(model_onnx, tampered)
    shutil.copy(sidecar_path(model_onnx), sidecar_path(tampered))
    with open(tampered, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(InputError, match="sha256"):
        open_seg_model(tampered)
    ct = tmp_path / "ct.nii.gz"
    write_array(ct, phantom.hu.astype(np.int16), lps_geometry(SHAPE, SPACING))
    result = invoke(
        "predict", str(ct), "-o", str(tmp_path / "out"), "--model", str(tampered), "--no-progress"
    )
    assert result.exit_code == 1
    assert "sha256" in result.output and str(tampered) in result.output
    assert not (tmp_path / "out").exists()

    sidecar_path(tampered).unlink()
    with pytest.raises(InputError, match="no sidecar"):
        open_seg_model(tampered)


def test_a_corrupt_onnx_file_with_a_matching_sidecar_is_refused_in_one_line(model_onnx, phantom, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf" * 100)
    sidecar = json.loads(sidecar_path(model_onnx).read_text())
    sidecar["sha256"] = hashlib.sha256(broken.read_bytes()).hexdigest()
    sidecar_path(broken).write_text(json.dumps(sidecar))
    ct = tmp_path / "ct.nii.gz"
    write_array(ct, phantom.hu.astype(np.int16), lps_geometry(SHAPE, SPACING))
    result = invoke("predict", str(ct), "-o", str(tmp_path / "out"), "--model", str(broken), "--no-progress")
    assert result.exit_code == 1
    assert "ONNX Runtime cannot load this model" in result.output and str(broken) in result.output
    assert not (tmp_path / "out").exists()


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

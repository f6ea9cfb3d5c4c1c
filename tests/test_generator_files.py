"""Generator files: train-gan's generator.pt and exported generator sidecars, loaded and checked."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from covidseg.errors import InputError, UsageError
from covidseg.inference.generator_files import (
    GENERATOR_FORMAT,
    OnnxGenerator,
    generator_from_payload,
    generator_window,
    load_generator_payload,
    read_generator_sidecar,
)
from covidseg.inference.onnx import sha256_of
from covidseg.learning.loop import save_checkpoint
from covidseg.models.gan3d import GAN_PRESETS, Generator3D


def _payload(crop=(16, 64, 64), grid=(32, 128, 128)) -> dict:
    torch.manual_seed(0)
    model = Generator3D(GAN_PRESETS["tiny"].generator)
    return {
        "format": GENERATOR_FORMAT,
        "model": {"generator": asdict(model.config)},
        "generator": model.state_dict(),
        "train_config": {"crop": list(crop) if crop else None},
        "preprocess": {"grid": list(grid), "hu_window": [-1000.0, 400.0]},
        "calibration": {"threshold": 0.1},
    }


def test_a_generator_pt_loads_from_its_folder_or_the_file(tmp_path):
    save_checkpoint(tmp_path / "generator.pt", _payload())
    for source in (tmp_path, tmp_path / "generator.pt"):
        path, payload = load_generator_payload(source)
        assert path == tmp_path / "generator.pt" and payload["format"] == GENERATOR_FORMAT
    model = generator_from_payload(payload)
    assert not model.training
    expected = _payload()["generator"]
    assert all(torch.equal(t, expected[k]) for k, t in model.state_dict().items())


def test_a_file_that_is_not_a_generator_is_refused(tmp_path):
    save_checkpoint(tmp_path / "best.pt", {**_payload(), "format": "covidseg.seg.model"})
    with pytest.raises(UsageError, match="not a trained generator"):
        load_generator_payload(tmp_path / "best.pt")


@pytest.mark.parametrize(
    ("crop", "grid", "window"),
    [((16, 64, 64), (32, 128, 128), (16, 64, 64)), (None, (32, 128, 128), (32, 128, 128)),
     ((16, 64, 64), (8, 48, 48), (8, 48, 48))],
)  # fmt: skip
def test_the_window_is_the_training_crop_within_the_grid(crop, grid, window):
    assert generator_window(_payload(crop, grid)) == window


def _exported(tmp_path, **changes) -> tuple:
    """A stand-in .onnx file (any bytes: only its sha256 is read) and its sidecar."""
    onnx_path = tmp_path / "generator.onnx"
    onnx_path.write_bytes(b"not a real model")
    payload = _payload()
    sidecar = {
        "format": "covidseg.onnx-generator",
        "version": 1,
        "sha256": sha256_of(onnx_path),
        "window": [16, 64, 64],
        "generator": payload["model"]["generator"],
        "calibration": payload["calibration"],
        "preprocess": payload["preprocess"],
        **changes,
    }
    (tmp_path / "generator.json").write_text(json.dumps({k: v for k, v in sidecar.items() if v is not None}))
    return onnx_path, sidecar


def test_a_generator_sidecar_is_read_and_checked(tmp_path):
    onnx_path, sidecar = _exported(tmp_path)
    assert read_generator_sidecar(onnx_path) == json.loads(json.dumps(sidecar))
    _exported(tmp_path, window=None)
    with pytest.raises(InputError, match="sidecar without window"):
        read_generator_sidecar(onnx_path)
    _exported(tmp_path, format="covidseg.onnx-segmenter")
    with pytest.raises(InputError, match="not a covidseg.onnx-generator sidecar"):
        read_generator_sidecar(onnx_path)
    _exported(tmp_path, sha256="0" * 64)
    assert read_generator_sidecar(onnx_path, verify=False)["sha256"] == "0" * 64
    with pytest.raises(InputError, match="does not match its sidecar"):
        read_generator_sidecar(onnx_path)


def test_invalid_generator_settings_are_refused_before_the_model_is_opened(tmp_path):
    onnx_path, _ = _exported(tmp_path, generator={"channels": [8, 16]})
    with pytest.raises(InputError, match=r"generator.json: invalid generator settings"):
        OnnxGenerator(onnx_path)

"""Trained GAN generator files: train-gan's ``generator.pt`` and ONNX exports with a sidecar.

A generator is one of

* a train-gan output folder (its ``generator.pt``) or that file (format ``covidseg.gan.generator``,
  loaded with ``weights_only=True``): the generator's config and weights, the label-free calibration
  and the preprocess config (HU window, grid);
* an ``.onnx`` file with its sidecar ``<stem>.json`` (format ``covidseg.onnx-generator``, written by
  ``covidseg export``), whose sha256 must match the one the sidecar records.

The ONNX model computes the removal map only: inputs ``image``, ``lung`` ``[B, 1, D, H, W]`` (float32,
preprocess scale [0, 1] and 0/1) and ``noise`` ``[B, C_L, d, h, w]`` (the latent noise ``U_N``),
output ``removal`` ``[B, 1, D, H, W]`` (>= 0, unit scale). ``D, H, W`` are fixed to
:func:`generator_window`; the noise, the windows, the blending and the lung gate are computed on the
host (:func:`covidseg.inference.sliding_window.run_generator`) for both backends.

Segmenter files are in :mod:`covidseg.inference.model_files`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from covidseg.errors import InputError, UsageError
from covidseg.inference.onnx import onnx_session, read_sidecar, sidecar_path
from covidseg.learning.loop import load_checkpoint
from covidseg.models.gan3d import Generator3D, GeneratorConfig

GENERATOR_FORMAT = "covidseg.gan.generator"
SIDECAR_FORMAT = "covidseg.onnx-generator"
SIDECAR_VERSION = 1
INPUT_NAMES = ("image", "lung", "noise")
OUTPUT_NAMES = ("removal",)


def load_generator_payload(source: str | Path) -> tuple[Path, dict]:
    """(path, payload) of a train-gan generator.pt; `source` is the file or its train-gan folder."""
    source = Path(source)
    path = source / "generator.pt" if source.is_dir() else source
    payload = load_checkpoint(path)
    if payload.get("format") != GENERATOR_FORMAT:
        raise UsageError(path, "not a trained generator (expected train-gan's generator.pt)")
    return path, payload


def generator_from_payload(payload: dict) -> Generator3D:
    """Rebuild a generator (eval mode, CPU) from a train-gan generator.pt or checkpoint.pt payload."""
    model = Generator3D(GeneratorConfig.from_json(payload["model"]["generator"]))
    model.load_state_dict(payload["generator"])
    return model.eval()


def generator_window(payload: dict) -> tuple[int, int, int]:
    """Spatial size (z, y, x voxels) the generator runs at in make-masks: the training crop, or the
    whole training grid for a generator trained without crops."""
    grid = tuple(int(v) for v in payload["preprocess"]["grid"])
    crop = payload["train_config"].get("crop")
    if crop is None:
        return grid
    return tuple(min(int(c), g) for c, g in zip(crop, grid, strict=True))


def read_generator_sidecar(onnx_path: str | Path, verify: bool = True) -> dict:
    """The sidecar of an exported generator, checked; with `verify` also against the .onnx's sha256."""
    required = ("window", "generator", "calibration", "preprocess")
    return read_sidecar(onnx_path, SIDECAR_FORMAT, SIDECAR_VERSION, required, verify)


class OnnxGenerator:
    """An exported generator on ONNX Runtime, as a
    :data:`~covidseg.inference.sliding_window.GeneratorBackend`: ``(image, lung, noise)`` CPU float32
    tensors -> ``removal`` tensor (CPU)."""

    def __init__(self, path: str | Path, providers: list | tuple = ("CPUExecutionProvider",)) -> None:
        self.path = Path(path)
        self.sidecar = read_generator_sidecar(self.path)
        try:
            self.config = GeneratorConfig.from_json(self.sidecar["generator"])
            self.window: tuple[int, int, int] = tuple(int(v) for v in self.sidecar["window"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(sidecar_path(self.path), f"invalid generator settings ({exc})") from None
        self.session = onnx_session(self.path, providers)
        self.providers: list[str] = self.session.get_providers()

    def __call__(self, image: torch.Tensor, lung: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        feed = {
            name: np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)
            for name, t in zip(INPUT_NAMES, (image, lung, noise), strict=True)
        }
        return torch.from_numpy(self.session.run(None, feed)[0])  # [B, 1, D, H, W]

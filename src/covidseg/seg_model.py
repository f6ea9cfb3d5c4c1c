"""Trained 2D segmenter files: torch checkpoints from train-seg and ONNX exports with a sidecar.

A model is one of

* a train-seg output folder (its ``best.pt``),
* a ``.pt`` model checkpoint (format ``covidseg.seg.model``; loaded with ``weights_only=True``),
* an ``.onnx`` file with its sidecar ``<stem>.json`` (format ``covidseg.onnx-segmenter``), whose
  sha256 must match the one the sidecar records: an edited or swapped model is refused.

Each carries the :class:`~covidseg.slices.SlicePreprocessing` that turns a CT into its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from covidseg.errors import InputError
from covidseg.models.segmenters import segmenter_from_config
from covidseg.onnx_export import read_sidecar, sha256_of, sidecar_path
from covidseg.slices import SlicePreprocessing
from covidseg.training import load_checkpoint

MODEL_FORMAT = "covidseg.seg.model"
SIDECAR_FORMAT = "covidseg.onnx-segmenter"
SIDECAR_VERSION = 1


@dataclass
class SegModelFile:
    """A segmenter on disk, checked, with what is needed to run it."""

    kind: str  # "torch" | "onnx"
    path: Path  # the .pt or .onnx file
    spec: SlicePreprocessing
    info: dict  # arch, model config, step, validation, sha256, precision ...
    payload: dict | None = None  # the torch checkpoint (kind "torch")

    def torch_model(self) -> torch.nn.Module:
        """The segmenter as a torch module (eval mode, CPU)."""
        if self.payload is None:
            raise InputError(self.path, "an ONNX model has no torch weights; use --backend onnx")
        model = segmenter_from_config(self.payload["model"]["arch"], self.payload["model"]["config"])
        model.load_state_dict(self.payload["weights"])
        return model.eval()


def _torch_model_file(path: Path) -> SegModelFile:
    payload = load_checkpoint(path)
    if payload.get("format") != MODEL_FORMAT:
        raise InputError(
            path, f"not a segmenter model (format {payload.get('format')!r}, want {MODEL_FORMAT})"
        )
    if "preprocessing" not in payload:
        raise InputError(path, "segmenter checkpoint without preprocessing settings (retrain with train-seg)")
    try:
        spec = SlicePreprocessing.from_json(payload["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"invalid preprocessing settings in checkpoint ({exc})") from None
    info = {
        "arch": payload["model"]["arch"],
        "config": payload["model"]["config"],
        "step": payload.get("step"),
        "validation": payload.get("validation"),
        "precision": "fp32",
        "sha256": sha256_of(path),
    }
    return SegModelFile("torch", path, spec, info, payload)


def _onnx_model_file(path: Path) -> SegModelFile:
    sidecar = read_sidecar(path, SIDECAR_FORMAT, SIDECAR_VERSION, required=("preprocessing",))
    try:
        spec = SlicePreprocessing.from_json(sidecar["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(sidecar_path(path), f"invalid preprocessing settings ({exc})") from None
    info = {**sidecar.get("model", {}), "precision": sidecar.get("precision"), "sha256": sidecar["sha256"]}
    return SegModelFile("onnx", path, spec, info)


def open_seg_model(path: str | Path) -> SegModelFile:
    """Open a segmenter: a train-seg folder, a ``.pt`` model checkpoint or an ``.onnx`` file."""
    path = Path(path)
    if path.is_dir():
        best = path / "best.pt"
        if not best.is_file():
            raise InputError(path, "no best.pt: not a finished train-seg output")
        path = best
    if not path.is_file():
        raise InputError(path, "no such model file")
    if path.name.lower().endswith(".onnx"):
        return _onnx_model_file(path)
    return _torch_model_file(path)

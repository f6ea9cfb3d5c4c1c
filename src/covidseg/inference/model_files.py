"""Trained 2D segmenter files: torch checkpoints from train-seg and ONNX exports with a sidecar.

A model is one of

* a train-seg output folder (its ``best.pt``),
* a ``.pt`` model checkpoint (format ``covidseg.seg.model``; loaded with ``weights_only=True``),
* an ``.onnx`` file with its sidecar ``<stem>.json`` (format ``covidseg.onnx-segmenter``), whose
  sha256 must match the one the sidecar records: an edited or swapped model is refused.

Each carries the :class:`~covidseg.inference.ct_segment.SlicePreprocessing` that turns a CT into its inputs.

Everything in a model file is checked when it is opened, before any case runs, and a bad value is
refused in one line naming the file: the preprocessing values (types, finiteness, ranges; the same
function for a checkpoint and a sidecar), a checkpoint's architecture, the size its config asks for
(counted on the ``meta`` device, without allocating) and that its weights fit that config, and an
ONNX model's input and output (names, float32, static sizes) against its sidecar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from covidseg.errors import InputError, first_line
from covidseg.inference.ct_segment import SlicePreprocessing
from covidseg.inference.onnx import onnx_session, read_sidecar, sha256_of, sidecar_path
from covidseg.learning.loop import load_checkpoint
from covidseg.models.segmenters import SEGMENTERS, segmenter_from_config

MODEL_FORMAT = "covidseg.seg.model"
SIDECAR_FORMAT = "covidseg.onnx-segmenter"
SIDECAR_VERSION = 1
MAX_PARAMETERS = 1_000_000_000  # 4 GB of float32 weights: 8x the base TransUNet (125 M parameters)
MAX_CONFIG_INTEGER = 16384  # any width or size in a model config (the base preset's largest is 3072)
MAX_DEPTH = 256  # transformer blocks (ViT-Huge has 32); each takes time to build, even on `meta`


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
        return segmenter_from_payload(self.payload)


def segmenter_from_payload(payload: dict) -> torch.nn.Module:
    """The segmenter of a train-seg model file (best.pt) payload, weights loaded (eval mode, CPU)."""
    model = segmenter_from_config(payload["model"]["arch"], payload["model"]["config"])
    model.load_state_dict(payload["weights"])
    return model.eval()


def preprocessing_spec(path: Path, data) -> SlicePreprocessing:
    """A checkpoint's or sidecar's ``preprocessing``, every value checked (InputError naming `path`)."""
    try:
        return SlicePreprocessing.from_json(data)
    except (TypeError, ValueError) as exc:
        raise InputError(path, first_line(exc)) from None


def _check_config_values(path: Path, arch: str, config: dict) -> None:
    """Numbers in a model config finite and not absurd, before anything is built from it."""
    for key, value in config.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool) or not isinstance(item, int | float):
                raise InputError(path, f"{arch} config {key} {value!r} is not a number or a list of numbers")
            if not math.isfinite(item) or not 0 <= item <= MAX_CONFIG_INTEGER:
                raise InputError(path, f"{arch} config {key} {value!r} is outside 0..{MAX_CONFIG_INTEGER}")
    if config.get("depth", 0) > MAX_DEPTH:
        raise InputError(path, f"{arch} config depth {config['depth']} is more than {MAX_DEPTH} blocks")


def _meta_segmenter(path: Path, arch: str, config: dict) -> torch.nn.Module:
    """The module `config` describes, on the ``meta`` device (shapes only, no memory), refused when
    it is invalid or has more than MAX_PARAMETERS parameters."""
    _check_config_values(path, arch, config)
    try:
        with torch.device("meta"):
            model = segmenter_from_config(arch, config)
    except Exception as exc:  # any failure to build from the config (ZeroDivisionError for heads 0 ...)
        raise InputError(path, f"invalid {arch} config ({first_line(exc)})") from None
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:
        raise InputError(
            path,
            f"its {arch} config asks for {count / 1e9:.1f} billion parameters ({count * 4 / 1e9:.0f} GB); "
            f"at most {MAX_PARAMETERS / 1e9:g} billion are allowed",
        )
    return model


def _check_weights(path: Path, arch: str, model: torch.nn.Module, weights) -> None:
    """The checkpoint's weights have exactly the names and shapes of `model` (InputError if not)."""
    if not isinstance(weights, dict) or not all(isinstance(w, torch.Tensor) for w in weights.values()):
        raise InputError(path, "segmenter checkpoint whose 'weights' are not a dict of tensors")
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong = [n for n in expected if n in weights and tuple(weights[n].shape) != expected[n]]
    if wrong:
        name = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise InputError(
            path,
            f"weights do not fit its {arch} config: {name} is {list(weights[name].shape)}, "
            f"the config makes {list(expected[name])}{more}",
        )
    if missing or unexpected:
        names, what = (missing, "lack") if missing else (unexpected, "have extra")
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        raise InputError(path, f"weights {what} {names[0]}{more} for its {arch} config")


def _checked_model_section(path: Path, payload: dict) -> tuple[str, dict]:
    """A checkpoint's architecture and config, checked against its weights without building them."""
    section = payload.get("model")
    if not isinstance(section, dict) or "arch" not in section or "config" not in section:
        raise InputError(path, "segmenter checkpoint without its 'model' section (architecture and config)")
    arch, config = section["arch"], section["config"]
    if not isinstance(arch, str) or arch not in SEGMENTERS:
        raise InputError(
            path, f"unknown segmenter architecture {arch!r} (known: {', '.join(sorted(SEGMENTERS))})"
        )
    if not isinstance(config, dict):
        raise InputError(path, f"{arch} config is not a dict")
    if "weights" not in payload:
        raise InputError(path, "segmenter checkpoint without 'weights'")
    _check_weights(path, arch, _meta_segmenter(path, arch, config), payload["weights"])
    return arch, config


def _torch_model_file(path: Path) -> SegModelFile:
    payload = load_checkpoint(path)
    if payload.get("format") != MODEL_FORMAT:
        raise InputError(
            path, f"not a segmenter model (format {payload.get('format')!r}, want {MODEL_FORMAT})"
        )
    if "preprocessing" not in payload:
        raise InputError(path, "segmenter checkpoint without preprocessing settings (retrain with train-seg)")
    spec = preprocessing_spec(path, payload["preprocessing"])
    arch, config = _checked_model_section(path, payload)
    info = {
        "arch": arch,
        "config": config,
        "step": payload.get("step"),
        "validation": payload.get("validation"),
        "precision": "fp32",
        "sha256": sha256_of(path),
    }
    return SegModelFile("torch", path, spec, info, payload)


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def check_onnx_io(path: Path, sidecar: dict, spec: SlicePreprocessing) -> None:
    """The ONNX model takes and gives what its sidecar says: one float32 input and output with the
    recorded names, shaped ``[batch, 1, H, W]`` with (H, W) the sidecar's slice size (static sizes
    only; the batch is dynamic). Opens a CPU session once; InputError naming the sidecar if not."""
    side = sidecar_path(path)
    session = onnx_session(path)  # InputError when ONNX Runtime cannot load the file
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise InputError(
            side, f"{path.name} has {len(inputs)} inputs and {len(outputs)} outputs; a segmenter has 1 and 1"
        )
    expected = (1, *spec.slice_size)
    for role, arg in (("input", inputs[0]), ("output", outputs[0])):
        recorded = sidecar.get(role, {})
        name = recorded.get("name") if isinstance(recorded, dict) else None
        if name is not None and name != arg.name:
            raise InputError(side, f"{role} name {name!r} does not match {path.name}'s {arg.name!r}")
        if arg.type != "tensor(float)":
            raise InputError(side, f"{path.name}'s {role} is {arg.type}, not float32")
        shape = list(arg.shape)
        static = [d if isinstance(d, int) else None for d in shape[1:]]
        if len(shape) != 4 or any(d is not None and d != e for d, e in zip(static, expected, strict=True)):
            h, w = spec.slice_size
            raise InputError(
                side, f"slice_size {h}x{w} does not match {path.name}'s {role} {_shape_text(shape)}"
            )


def _onnx_model_file(path: Path) -> SegModelFile:
    sidecar = read_sidecar(path, SIDECAR_FORMAT, SIDECAR_VERSION, required=("preprocessing",))
    spec = preprocessing_spec(sidecar_path(path), sidecar["preprocessing"])
    check_onnx_io(path, sidecar, spec)
    model = sidecar.get("model") if isinstance(sidecar.get("model"), dict) else {}
    info = {**model, "precision": sidecar.get("precision"), "sha256": sidecar["sha256"]}
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

"""`covidseg export`: a trained segmenter -> one ONNX file + a sidecar JSON, checked for parity.

The sidecar (``<stem>.json``) holds what `predict` needs to reproduce the preprocessing (HU window,
lung-box margin and lung parameters, slice size, slab thickness, threshold), the model's
architecture and training step, the software versions, the sha256 of the .onnx, and the parity
figures measured at export time.

Parity is measured on slices of a synthetic chest CT with lesions (``covidseg.imaging.phantom``), cut
exactly as `predict` cuts a scan: ONNX Runtime on the CPU vs torch, logits max-abs-diff and the
Dice of the thresholded masks. fp32 exports must reach ``max_abs <= 1e-4`` and ``Dice >= 0.999``;
fp16 exports (for GPUs) are checked at mask level only (``Dice >= 0.99``). A failed check leaves
nothing on disk.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from covidseg import __version__
from covidseg.errors import UsageError
from covidseg.imaging.grid import lung_crop_box
from covidseg.imaging.lungs import segment_lungs
from covidseg.imaging.metrics import dice
from covidseg.imaging.phantom import make_phantom
from covidseg.inference.ct_segment import ct_to_slices
from covidseg.inference.model_files import SIDECAR_FORMAT, SIDECAR_VERSION, SegModelFile, open_seg_model
from covidseg.inference.model_home import models_dir
from covidseg.inference.onnx import (
    OPSET,
    ParityError,
    check_export_targets,
    export_onnx,
    onnx_session,
    provenance,
    sha256_of,
    sidecar_path,
)
from covidseg.io.atomic import atomic_path, write_json

FP32_MAX_ABS = 1e-4
FP32_MIN_DICE = 0.999
FP16_MIN_DICE = 0.99
PARITY_PHANTOM = {"shape_zyx": (64, 256, 256), "spacing_zyx": (5.0, 1.4, 1.4), "covid": True, "seed": 20260}


def parity_slices(seg: SegModelFile) -> np.ndarray:
    """Network input slices [n, 1, H, W] of a synthetic CT with lesions, cut as predict cuts."""
    phantom = make_phantom(**PARITY_PHANTOM)
    lungs = segment_lungs(phantom.hu, phantom.spacing_zyx, seg.spec.lungs)
    box = lung_crop_box(lungs, phantom.spacing_zyx, seg.spec.margin_mm)
    return ct_to_slices(phantom.hu, box, phantom.spacing_zyx, seg.spec)[:, None]


def _mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    return dice(int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()))


def check_parity(
    onnx_path: Path, model: torch.nn.Module, slices: np.ndarray, threshold: float, fp16: bool
) -> dict:
    """Compare ONNX Runtime (CPU) with torch on `slices`; raise ParityError when it fails."""
    with torch.inference_mode():
        expected = model(torch.from_numpy(slices)).numpy()
    session = onnx_session(onnx_path)
    got = session.run(None, {"image": slices})[0]
    logit = float(np.log(threshold / (1 - threshold)))
    figures = {
        "slices": int(len(slices)),
        "max_abs_logit_diff": float(np.abs(got - expected).max()),
        "mask_dice": round(_mask_dice(got >= logit, expected >= logit), 6),
        "lesion_pixels_torch": int((expected >= logit).sum()),
        "provider": session.get_providers()[0],
    }
    if fp16:
        ok = figures["mask_dice"] >= FP16_MIN_DICE
        rule = f"mask Dice >= {FP16_MIN_DICE}"
    else:
        ok = figures["max_abs_logit_diff"] <= FP32_MAX_ABS and figures["mask_dice"] >= FP32_MIN_DICE
        rule = f"max |logit diff| <= {FP32_MAX_ABS:g} and mask Dice >= {FP32_MIN_DICE}"
    if not ok:
        raise ParityError(
            onnx_path,
            f"ONNX Runtime differs from torch: max |logit diff| {figures['max_abs_logit_diff']:.3g}, "
            f"mask Dice {figures['mask_dice']:.4f} (need {rule})",
        )
    return figures


def output_path(out: Path | None, name: str | None) -> Path:
    """`-o FILE.onnx`, or ``<model home>/models/NAME.onnx`` for `--name`."""
    if (out is None) == (name is None):
        raise UsageError(None, "give exactly one of -o FILE.onnx and --name NAME")
    if name is not None:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise UsageError(None, f"--name {name!r}: use a plain name like 'covid-v1'")
        return models_dir() / f"{name}.onnx"
    if not out.name.lower().endswith(".onnx"):
        raise UsageError(out, "the output must be an .onnx file")
    return out


def run_export(
    source: Path,
    out: Path | None = None,
    name: str | None = None,
    fp16: bool = False,
    overwrite: bool = False,
) -> dict:
    """Export a train-seg output (folder or .pt) to ONNX + sidecar; return the sidecar."""
    out = output_path(out, name)
    side = sidecar_path(out)
    check_export_targets(out, overwrite)
    seg = open_seg_model(source)
    if seg.kind != "torch":
        raise UsageError(source, "is already an ONNX model; export takes a train-seg folder or .pt")
    model = seg.torch_model()
    slices = parity_slices(seg)
    started = time.perf_counter()
    with atomic_path(out) as tmp:
        export_onnx(model, [torch.from_numpy(slices[:2])], tmp, ["image"], ["logits"], fp16=fp16)
        parity = check_parity(tmp, model, slices, seg.spec.threshold, fp16)
        digest = sha256_of(tmp)
        side.unlink(missing_ok=True)  # an old sidecar must never describe the new model
    h, w = seg.spec.slice_size
    sidecar = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "covidseg_version": __version__,
        "onnx_file": out.name,
        "sha256": digest,
        "precision": "fp16" if fp16 else "fp32",
        "opset": OPSET,
        "input": {"name": "image", "shape": ["batch", 1, h, w], "dtype": "float32", "scale": "[0, 1]"},
        "output": {"name": "logits", "shape": ["batch", 1, h, w], "dtype": "float32"},
        "preprocessing": seg.spec.to_json(),
        "model": {k: seg.info[k] for k in ("arch", "config", "step", "validation")},
        "source_checkpoint": {"path": str(seg.path.resolve()), "sha256": seg.info["sha256"]},
        "parity": parity,
        "exported": provenance(started),
    }
    write_json(side, sidecar)
    return {**sidecar, "path": str(out), "sidecar": str(side)}

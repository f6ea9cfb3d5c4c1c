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

For a train-gan folder the generator is exported instead (:func:`export_generator`): the removal
map with the latent noise as an input (see :mod:`covidseg.inference.generator_files`); its sidecar
(format ``covidseg.onnx-generator``) holds everything make-masks otherwise reads from generator.pt
(the generator's config, the window, the label-free calibration, the preprocess config). Its parity:
ONNX Runtime vs torch on seeded random inputs and the same noise, at batch 2 (the traced batch) and
1; the removal maps must agree to ``max |diff| <= 1e-4`` (unit scale).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch

from covidseg import __version__
from covidseg.errors import UsageError
from covidseg.imaging.grid import lung_crop_box
from covidseg.imaging.lungs import segment_lungs
from covidseg.imaging.metrics import confusion, dice
from covidseg.imaging.phantom import make_phantom
from covidseg.inference import generator_files, model_files
from covidseg.inference.ct_segment import ct_to_slices
from covidseg.inference.generator_files import (
    generator_from_payload,
    generator_window,
    load_generator_payload,
)
from covidseg.inference.model_files import SegModelFile, open_seg_model
from covidseg.inference.model_home import models_dir
from covidseg.inference.onnx import (
    OPSET,
    check_export_targets,
    check_parity,
    export_onnx,
    provenance,
    sha256_of,
    sidecar_path,
)
from covidseg.io.atomic import atomic_path, write_json
from covidseg.models.gan3d import (
    GeneratorConfig,
    GeneratorRemoval,
    generator_latent_shape,
    sample_latent_noise,
)
from covidseg.stages._workdir import portable_path

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


def _logit_parity(
    pairs: list[tuple[np.ndarray, np.ndarray]], threshold: float, fp16: bool
) -> tuple[dict, str | None]:
    """A segmenter's parity figures (:data:`~covidseg.inference.onnx.ParityMeasure`): the logits'
    max-abs-diff and the Dice of the masks at `threshold` (a probability)."""
    ((got, expected),) = pairs  # logits [n, 1, H, W]: ONNX Runtime, torch
    logit = float(np.log(threshold / (1 - threshold)))
    figures = {
        "slices": int(len(expected)),
        "max_abs_logit_diff": float(np.abs(got - expected).max()),
        "mask_dice": round(dice(*confusion(got >= logit, expected >= logit)[:3]), 6),
        "lesion_pixels_torch": int((expected >= logit).sum()),
    }
    if fp16:
        ok = figures["mask_dice"] >= FP16_MIN_DICE
        rule = f"mask Dice >= {FP16_MIN_DICE}"
    else:
        ok = figures["max_abs_logit_diff"] <= FP32_MAX_ABS and figures["mask_dice"] >= FP32_MIN_DICE
        rule = f"max |logit diff| <= {FP32_MAX_ABS:g} and mask Dice >= {FP32_MIN_DICE}"
    measured = f"max |logit diff| {figures['max_abs_logit_diff']:.3g}, mask Dice {figures['mask_dice']:.4f}"
    return figures, None if ok else f"{measured} (need {rule})"


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


def _export_checked(
    out: Path,
    module: torch.nn.Module,
    example: Sequence[torch.Tensor],
    names: tuple[Sequence[str], Sequence[str]],
    parity: Callable[[Path], dict],
    sidecar_format: tuple[str, int],
    description: dict,
    precision: str | None = None,
) -> dict:
    """Export `module` to `out` (.onnx), check it with `parity`, then write its sidecar; return it.

    Args:
        example: the tracing inputs, batch >= 2; `names`: (input names, output names).
        parity: checks the written .onnx (ParityError, leaving nothing on disk) -> the figures.
        sidecar_format: (format, version) of the sidecar.
        description: what the sidecar says about the model, between ``opset`` and ``parity``.
        precision: "fp32" | "fp16" (a sidecar key only when given).
    """
    side = sidecar_path(out)
    started = time.perf_counter()
    with atomic_path(out) as tmp:
        export_onnx(module, example, tmp, *names, fp16=precision == "fp16")
        figures = parity(tmp)
        digest = sha256_of(tmp)
        side.unlink(missing_ok=True)  # an old sidecar must never describe the new model
    fmt, version = sidecar_format
    sidecar = {"format": fmt, "version": version, "covidseg_version": __version__, "onnx_file": out.name}
    sidecar["sha256"] = digest
    if precision is not None:
        sidecar["precision"] = precision
    sidecar |= {"opset": OPSET, **description, "parity": figures, "exported": provenance(started)}
    write_json(side, sidecar)  # last: a model without its sidecar is refused
    return sidecar


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
    slices = torch.from_numpy(parity_slices(seg))
    measure = partial(_logit_parity, threshold=seg.spec.threshold, fp16=fp16)
    h, w = seg.spec.slice_size
    description = {
        "input": {"name": "image", "shape": ["batch", 1, h, w], "dtype": "float32", "scale": "[0, 1]"},
        "output": {"name": "logits", "shape": ["batch", 1, h, w], "dtype": "float32"},
        "preprocessing": seg.spec.to_json(),
        "model": {k: seg.info[k] for k in ("arch", "config", "step", "validation")},
        "source_checkpoint": {"path": portable_path(seg.path, side.parent), "sha256": seg.info["sha256"]},
    }
    sidecar = _export_checked(
        out,
        module=model,
        example=[slices[:2]],
        names=(["image"], ["logits"]),
        parity=lambda tmp: check_parity(tmp, model, [slices], ["image"], [len(slices)], measure),
        sidecar_format=(model_files.SIDECAR_FORMAT, model_files.SIDECAR_VERSION),
        description=description,
        precision="fp16" if fp16 else "fp32",
    )
    return {**sidecar, "path": str(out), "sidecar": str(side)}


# --- the GAN's generator ------------------------------------------------------------------------

REMOVAL_MAX_ABS = 1e-4  # removal map, unit scale (1.0 = the whole HU window)
GENERATOR_PARITY_SEED = 0
GENERATOR_PARITY_BATCHES = (2, 1)  # the traced batch, and 1


def _generator_parity_inputs(config: GeneratorConfig, window: tuple[int, int, int]) -> list[torch.Tensor]:
    """Seeded example inputs, batch 2: image [2, 1, D, H, W] in [0, 1], a lung block, noise U_N."""
    gen = torch.Generator().manual_seed(GENERATOR_PARITY_SEED)
    image = torch.rand((2, 1, *window), generator=gen)
    lung = torch.zeros((2, 1, *window))
    d, h, w = window
    lung[..., d // 8 : d - d // 8, h // 8 : h - h // 8, w // 8 : w - w // 8] = 1.0
    noise = sample_latent_noise(config, generator_latent_shape(config, image.shape), gen)
    return [image, lung, noise]


def _removal_parity(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[dict, str | None]:
    """A generator's parity figures (:data:`~covidseg.inference.onnx.ParityMeasure`): the removal
    maps' max-abs-diff over the batches, at most REMOVAL_MAX_ABS (NaN fails)."""
    diffs = [float(np.abs(got - expected).max()) for got, expected in pairs]  # [b, 1, D, H, W] each
    figures = {
        "batches": list(GENERATOR_PARITY_BATCHES),
        "max_abs_removal_diff": max(diffs),
        "max_removal_torch": float(pairs[-1][1].max()),
        "tolerance": REMOVAL_MAX_ABS,
    }
    if figures["max_abs_removal_diff"] <= REMOVAL_MAX_ABS:  # also refuses NaN
        return figures, None
    return figures, f"max |removal diff| {figures['max_abs_removal_diff']:.3g} (need <= {REMOVAL_MAX_ABS:g})"


def _generator_description(
    generator_pt: Path, payload: dict, config: GeneratorConfig, window: tuple[int, int, int], side: Path
) -> dict:
    """What a generator sidecar says about the model: inputs and outputs, window, noise, config,
    calibration, preprocess config and the source checkpoint."""
    latent = generator_latent_shape(config, window)  # [C_L, d, h, w]
    return {
        "inputs": [
            {"name": "image", "shape": ["batch", 1, *window], "dtype": "float32", "scale": "[0, 1]"},
            {"name": "lung", "shape": ["batch", 1, *window], "dtype": "float32", "scale": "0/1"},
            {"name": "noise", "shape": ["batch", *latent], "dtype": "float32", "scale": "U_N"},
        ],
        "outputs": [{"name": "removal", "shape": ["batch", 1, *window], "dtype": "float32"}],
        "window": list(window),
        "crop": payload["train_config"].get("crop"),
        "latent_shape": list(latent),
        "noise": {
            "kind": config.latent_noise,
            "std": config.noise_std,
            "frequency": list(config.noise_frequency),
            "octaves": config.noise_octaves,
            "seed": 0,
            "drawn": "on the host, one U_N per window in z, y, x window order, from one seeded generator",
        },
        "generator": asdict(config),
        "calibration": payload["calibration"],
        "preprocess": payload["preprocess"],
        "source_checkpoint": {
            "path": portable_path(generator_pt, side.parent),
            "sha256": sha256_of(generator_pt),
            "step": payload.get("step"),
        },
    }


def export_generator(source: Path, out_path: Path, overwrite: bool = False) -> dict:
    """Export a train-gan generator to `out_path` (.onnx) + its sidecar, checked for parity.

    Args:
        source: a train-gan output folder or its generator.pt.
        out_path: the .onnx file to write; the sidecar ``<stem>.json`` goes beside it.
        overwrite: replace an existing model (and sidecar) at `out_path`.

    Returns:
        ``{"onnx", "sidecar", "sha256", "window", "latent_shape", "parity", "seconds"}``.
    """
    out_path = output_path(Path(out_path), None)
    side = sidecar_path(out_path)
    check_export_targets(out_path, overwrite)
    generator_pt, payload = load_generator_payload(source)
    model = generator_from_payload(payload)  # eval mode, CPU
    window = generator_window(payload)
    module = GeneratorRemoval(model).eval()
    inputs = _generator_parity_inputs(model.config, window)
    names = (generator_files.INPUT_NAMES, generator_files.OUTPUT_NAMES)
    sidecar = _export_checked(
        out_path,
        module=module,
        example=inputs,
        names=names,
        parity=lambda tmp: check_parity(
            tmp, module, inputs, names[0], GENERATOR_PARITY_BATCHES, _removal_parity
        ),
        sidecar_format=(generator_files.SIDECAR_FORMAT, generator_files.SIDECAR_VERSION),
        description=_generator_description(generator_pt, payload, model.config, window, side),
    )
    return {
        "onnx": str(out_path),
        "sidecar": str(side),
        "sha256": sidecar["sha256"],
        "window": sidecar["window"],
        "latent_shape": sidecar["latent_shape"],
        "parity": sidecar["parity"],
        "seconds": sidecar["exported"]["seconds"],
    }

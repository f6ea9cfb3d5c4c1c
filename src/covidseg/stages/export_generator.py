"""The GAN's generator as one ONNX file + a sidecar JSON, so `make-masks` can run on ONNX Runtime.

What is exported is the removal map only: inputs ``image``, ``lung`` ``[B, 1, D, H, W]`` (float32,
preprocess scale [0, 1] and 0/1) and ``noise`` ``[B, C_L, d, h, w]`` (the latent noise ``U_N``),
output ``removal`` ``[B, 1, D, H, W]`` (>= 0, unit scale). The batch is dynamic; ``D, H, W`` are fixed
to the window the generator runs at in make-masks (the training crop, or the whole training grid
when it trained without crops). The noise is drawn on the host
(:func:`covidseg.models.gan3d.sample_latent_noise`) and the windows, blending and lung gate are
computed there too (:func:`covidseg.models.gan3d.run_generator`), so torch and ONNX Runtime share
all of that code and a given seed gives the same pseudo-masks on both.

The sidecar (``<stem>.json``, format ``covidseg.onnx-generator``) holds everything make-masks
otherwise reads from generator.pt: the generator's config (latent noise, lung gate), the window,
the label-free calibration (threshold, smoothing, smallest component) and the preprocess config
(HU window, grid), plus the sha256 of the .onnx and the parity figures measured at export time.

Parity: ONNX Runtime on the CPU vs torch on the same random inputs and the same noise, at batch 2
(the traced batch) and 1; the removal maps must agree to ``max |diff| <= 1e-4``. A failed check
leaves nothing on disk.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from covidseg import __version__
from covidseg.errors import InputError, UsageError
from covidseg.inference.onnx import (
    OPSET,
    ParityError,
    check_export_targets,
    export_onnx,
    onnx_session,
    provenance,
    read_sidecar,
    sha256_of,
    sidecar_path,
)
from covidseg.io.atomic import atomic_path, write_json
from covidseg.learning.loop import load_checkpoint
from covidseg.models.gan3d import (
    GeneratorConfig,
    GeneratorRemoval,
    generator_from_payload,
    generator_latent_shape,
    sample_latent_noise,
)
from covidseg.stages.train_gan import GENERATOR_FORMAT

SIDECAR_FORMAT = "covidseg.onnx-generator"
SIDECAR_VERSION = 1
INPUT_NAMES = ("image", "lung", "noise")
OUTPUT_NAMES = ("removal",)
PARITY_MAX_ABS = 1e-4  # removal map, unit scale (1.0 = the whole HU window)
PARITY_SEED = 0


def load_generator_payload(source: str | Path) -> tuple[Path, dict]:
    """(path, payload) of a train-gan generator.pt; `source` is the file or its train-gan folder."""
    source = Path(source)
    path = source / "generator.pt" if source.is_dir() else source
    payload = load_checkpoint(path)
    if payload.get("format") != GENERATOR_FORMAT:
        raise UsageError(path, "not a trained generator (expected train-gan's generator.pt)")
    return path, payload


def generator_window(payload: dict) -> tuple[int, int, int]:
    """Spatial size (z, y, x voxels) the generator runs at in make-masks: the training crop, or the
    whole training grid for a generator trained without crops."""
    grid = tuple(int(v) for v in payload["preprocess"]["grid"])
    crop = payload["train_config"].get("crop")
    if crop is None:
        return grid
    return tuple(min(int(c), g) for c, g in zip(crop, grid, strict=True))


def _parity_inputs(config: GeneratorConfig, window: tuple[int, int, int]) -> list[torch.Tensor]:
    """Seeded example inputs, batch 2: image [2, 1, D, H, W] in [0, 1], a lung block, noise U_N."""
    gen = torch.Generator().manual_seed(PARITY_SEED)
    image = torch.rand((2, 1, *window), generator=gen)
    lung = torch.zeros((2, 1, *window))
    d, h, w = window
    lung[..., d // 8 : d - d // 8, h // 8 : h - h // 8, w // 8 : w - w // 8] = 1.0
    noise = sample_latent_noise(config, generator_latent_shape(config, image.shape), gen)
    return [image, lung, noise]


def check_parity(onnx_path: Path, module: GeneratorRemoval, inputs: list[torch.Tensor]) -> dict:
    """ONNX Runtime (CPU) vs torch on `inputs` at batch 2 and 1; ParityError beyond 1e-4."""
    session = onnx_session(onnx_path)
    diffs = []
    for batch in (2, 1):
        feed = [t[:batch] for t in inputs]
        with torch.inference_mode():
            expected = module(*feed).numpy()  # [b, 1, D, H, W]
        got = session.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, feed, strict=True)})[0]
        diffs.append(float(np.abs(got - expected).max()))
    figures = {
        "batches": [2, 1],
        "max_abs_removal_diff": max(diffs),
        "max_removal_torch": float(expected.max()),
        "tolerance": PARITY_MAX_ABS,
        "provider": session.get_providers()[0],
    }
    if not figures["max_abs_removal_diff"] <= PARITY_MAX_ABS:  # also refuses NaN
        raise ParityError(
            onnx_path,
            f"ONNX Runtime differs from torch: max |removal diff| {figures['max_abs_removal_diff']:.3g} "
            f"(need <= {PARITY_MAX_ABS:g})",
        )
    return figures


def export_generator(source: Path, out_path: Path, overwrite: bool = False) -> dict:
    """Export a train-gan generator to `out_path` (.onnx) + its sidecar, checked for parity.

    Args:
        source: a train-gan output folder or its generator.pt.
        out_path: the .onnx file to write; the sidecar ``<stem>.json`` goes beside it.
        overwrite: replace an existing model (and sidecar) at `out_path`.

    Returns:
        ``{"onnx", "sidecar", "sha256", "window", "latent_shape", "parity", "seconds"}``.
    """
    out_path = Path(out_path)
    if not out_path.name.lower().endswith(".onnx"):
        raise UsageError(out_path, "the output must be an .onnx file")
    side = sidecar_path(out_path)
    check_export_targets(out_path, overwrite)
    generator_pt, payload = load_generator_payload(source)
    model = generator_from_payload(payload)  # eval mode, CPU
    config = model.config
    window = generator_window(payload)
    latent = generator_latent_shape(config, window)  # [C_L, d, h, w]
    module = GeneratorRemoval(model).eval()
    inputs = _parity_inputs(config, window)
    started = time.perf_counter()
    with atomic_path(out_path) as tmp:
        export_onnx(module, inputs, tmp, INPUT_NAMES, OUTPUT_NAMES)
        parity = check_parity(tmp, module, inputs)
        digest = sha256_of(tmp)
        side.unlink(missing_ok=True)  # an old sidecar must never describe the new model
    sidecar = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "covidseg_version": __version__,
        "onnx_file": out_path.name,
        "sha256": digest,
        "opset": OPSET,
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
            "path": str(generator_pt.resolve()),
            "sha256": sha256_of(generator_pt),
            "step": payload.get("step"),
        },
        "parity": parity,
        "exported": provenance(started),
    }
    write_json(side, sidecar)  # last: a model without its sidecar is refused by make-masks
    return {
        "onnx": str(out_path),
        "sidecar": str(side),
        "sha256": digest,
        "window": list(window),
        "latent_shape": list(latent),
        "parity": parity,
        "seconds": sidecar["exported"]["seconds"],
    }


def read_generator_sidecar(onnx_path: str | Path, verify: bool = True) -> dict:
    """The sidecar of an exported generator, checked; with `verify` also against the .onnx's sha256."""
    required = ("window", "generator", "calibration", "preprocess")
    return read_sidecar(onnx_path, SIDECAR_FORMAT, SIDECAR_VERSION, required, verify)


class OnnxGenerator:
    """An exported generator on ONNX Runtime, as a :data:`~covidseg.models.gan3d.GeneratorBackend`:
    ``(image, lung, noise)`` CPU float32 tensors -> ``removal`` tensor (CPU)."""

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

"""The 2D segmenters by name, and their configs as plain dicts for checkpoints.

``SEGMENTERS`` maps an architecture name to its model class and presets. Configs are stored as
plain dicts (tuples become lists) so a checkpoint loads with ``torch.load(weights_only=True)``::

    model = make_segmenter("transunet", "small")
    ckpt = {"arch": segmenter_arch(model), "config": segmenter_config_dict(model),
            "state": model.state_dict()}
    again = segmenter_from_config(ckpt["arch"], ckpt["config"])
    again.load_state_dict(ckpt["state"])
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn as nn

from covidseg.models.transunet import TRANSUNET_PRESETS, TransUNet2D, TransUNetConfig
from covidseg.models.unet import UNET_PRESETS, UNet2D, UNetConfig

SEGMENTERS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "transunet": (TransUNet2D, TRANSUNET_PRESETS),
    "unet": (UNet2D, UNET_PRESETS),
}
_CONFIGS: dict[str, type] = {"transunet": TransUNetConfig, "unet": UNetConfig}


def _check_arch(arch: str) -> None:
    if arch not in SEGMENTERS:
        raise ValueError(f"unknown segmenter architecture {arch!r}; choose one of {sorted(SEGMENTERS)}")


def make_segmenter(arch: str, preset: str, in_channels: int = 1) -> nn.Module:
    """A freshly initialised segmenter ``arch`` ("transunet" | "unet") of size ``preset``."""
    _check_arch(arch)
    cls, presets = SEGMENTERS[arch]
    if preset not in presets:
        raise ValueError(f"unknown {arch} preset {preset!r}; choose one of {list(presets)}")
    return cls(dataclasses.replace(presets[preset], in_channels=in_channels))


def segmenter_arch(model: nn.Module) -> str:
    """The ``SEGMENTERS`` name of ``model``'s architecture."""
    for arch, (cls, _) in SEGMENTERS.items():
        if type(model) is cls:
            return arch
    raise ValueError(f"{type(model).__name__} is not one of the segmenters {sorted(SEGMENTERS)}")


def segmenter_config_dict(model: nn.Module) -> dict[str, Any]:
    """``model.config`` as a plain dict of ints, floats and lists (safe for ``weights_only`` loads)."""
    segmenter_arch(model)  # raises for a foreign model
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.config).items()}


def segmenter_from_config(arch: str, config: dict[str, Any]) -> nn.Module:
    """A freshly initialised ``arch`` model built from a dict written by ``segmenter_config_dict``.

    Lists become tuples again; keys missing from ``config`` take the dataclass defaults; unknown
    keys are an error (a checkpoint from a different architecture or a newer version).
    """
    _check_arch(arch)
    config_cls = _CONFIGS[arch]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(f"unknown {arch} config keys {unknown}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return SEGMENTERS[arch][0](config_cls(**values))

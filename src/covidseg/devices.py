"""Which torch device runs: `--device auto|cpu|cuda[:N]`, and the matching autocast."""

from __future__ import annotations

import torch

from covidseg.errors import UsageError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available else CPU; ``cpu``; ``cuda`` / ``cuda:N`` (checked)."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(None, f"--device {spec}: CUDA is not available on this machine")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(None, f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise UsageError(None, f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA (no loss scaling needed); a no-op context on the CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

"""Running a 2D segmenter on a batch of slices with torch or ONNX Runtime.

Both runners are callables ``[N, 1, H, W] float32 -> [N, 1, H, W] float32 logits`` with a
``description`` that says what really computes (torch device, or the ONNX Runtime provider that
the session got: ORT silently falls back to the CPU when CUDA libraries are missing, so the
runner reports the providers the session has, not the ones asked for).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from covidseg.devices import autocast, resolve_device
from covidseg.errors import UsageError
from covidseg.inference.onnx import onnx_session

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


class TorchRunner:
    """A torch segmenter in eval mode on a device (bfloat16 autocast on CUDA)."""

    def __init__(self, model: torch.nn.Module, device: str = "auto") -> None:
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.backend = "torch"
        self.description = f"torch {torch.__version__} on {self.device}"
        self.warning: str | None = None

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with autocast(self.device):
            logits = self.model(x)  # [N, 1, H, W]
        return logits.float().cpu().numpy()


def gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU (driver device nodes or a CUDA-enabled torch)."""
    return Path("/dev/nvidiactl").exists() or torch.cuda.is_available()


def requested_providers(device: str, tensorrt: bool = False) -> list:
    """ONNX Runtime providers for a ``--device`` value, best first, always ending on the CPU.

    ``auto`` asks for CUDA when this ONNX Runtime build has it and a GPU is visible; ``cuda:N``
    picks GPU N. TensorRT is only asked for with `tensorrt` (it builds an engine per input shape,
    minutes the first time).
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    spec = device.strip().lower()
    if spec == "cpu":
        return [CPU]
    if spec == "auto":
        if not gpu_visible():
            return [CPU]
        gpu_id = 0
    elif spec == "cuda" or spec.startswith("cuda:"):
        index = spec.partition(":")[2]
        if index and not index.isdigit():
            raise UsageError(None, f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
        gpu_id = int(index or 0)
        if CUDA not in available:
            raise UsageError(None, f"--device {device}: this ONNX Runtime build has no CUDA provider")
    else:
        raise UsageError(None, f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    providers: list = []
    if tensorrt and TENSORRT in available:
        providers.append((TENSORRT, {"device_id": gpu_id}))
    if CUDA in available:
        providers.append((CUDA, {"device_id": gpu_id}))
    return [*providers, CPU]


@dataclass
class OnnxRunner:
    """An ONNX Runtime session of an exported segmenter (input ``image``, output ``logits``)."""

    path: str
    device: str = "auto"
    tensorrt: bool = False
    threads: int = 0
    backend: str = field(default="onnx", init=False)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        asked = requested_providers(self.device, self.tensorrt)
        self.session = onnx_session(self.path, asked, self.threads)
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name
        names = [p if isinstance(p, str) else p[0] for p in asked]
        self.description = f"onnxruntime {ort.__version__} on {self.providers[0]}"
        self.warning = None
        if names[0] != CPU and self.providers[0] == CPU:
            wanted = "/".join(n.removesuffix("ExecutionProvider") for n in names[:-1])
            self.warning = (
                f"asked for {wanted} but ONNX Runtime runs on the CPU "
                "(CUDA/cuDNN libraries missing or no GPU; `covidseg doctor` shows what is available)"
            )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        return self.session.run(None, feed)[0].astype(np.float32, copy=False)


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module, images: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 32
) -> np.ndarray:
    """Lesion probabilities for a stack of slices.

    Args:
        images: [N, H, W] float32 slices on the preprocess [0, 1] scale.

    Returns:
        [N, H, W] float32 probabilities.
    """
    model.eval()
    device = torch.device(device)
    out = np.empty(images.shape, dtype=np.float32)
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32))
        logits = model(batch[:, None].to(device))  # [b, 1, H, W]
        out[start : start + batch_size] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
    return out

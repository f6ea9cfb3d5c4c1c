"""Running a trained 2D segmenter over slices."""

from __future__ import annotations

import numpy as np
import torch


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

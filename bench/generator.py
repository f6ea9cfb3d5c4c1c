"""Benchmark: the pseudo-healthy generator's windowed inference (what make-masks and train-gan's
calibration run for every case), batched windows vs one window per call, and the CPU memory layout
(channels-last-3d, what ``gan3d.to_device`` picks on the CPU, vs the default) for inference and for
a training step.

One 32x128x128 grid (the preprocess default) through an untrained generator of the given preset,
in training-crop windows of 16x64x64 with ~50 % overlap (27 windows), on the CPU: the median of a
few runs with ``WINDOW_BATCH`` windows per call (the default) and with one window per call (the
slow path of CPU conv3d). The results must agree (same windows, same latent noise). The training
step is the generator's forward and backward on a batch of 2 training crops (train-gan's demo batch).

    python bench/generator.py            # human-readable
    python bench/generator.py --json     # the figures as rows (for bench/run_all.py)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
import torch

from covidseg.inference import sliding_window
from covidseg.inference.sliding_window import run_generator
from covidseg.models.gan3d import GAN_PRESETS, Generator3D, to_device

GRID = (32, 128, 128)  # voxels (z, y, x)
WINDOW = (16, 64, 64)  # the CPU training crop


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(preset: str = "tiny", repeats: int = 3) -> list[dict]:
    """Seconds per grid batched and one window at a time, in the default and the channels-last
    layout, seconds per training step in both layouts, their ratios, and the largest differences."""
    torch.manual_seed(0)
    model = Generator3D(GAN_PRESETS[preset].generator).eval()
    channels_last = to_device(copy.deepcopy(model), "cpu")
    rng = np.random.default_rng(0)
    image = rng.random(GRID, dtype=np.float32)
    lung = np.zeros(GRID, np.uint8)
    lung[2:30, 16:112, 12:60] = 1
    lung[2:30, 16:112, 68:116] = 1

    def infer(net: Generator3D = model) -> np.ndarray:
        return run_generator(net, image, lung, seed=0, window=WINDOW)

    batched_s = _median_seconds(infer, repeats)
    batched = infer()
    layout_s = _median_seconds(lambda: infer(channels_last), repeats)
    layout_diff = float(np.abs(infer(channels_last) - batched).max())
    default = sliding_window.WINDOW_BATCH
    try:
        sliding_window.WINDOW_BATCH = 1
        single_s = _median_seconds(infer, repeats)
        single = infer()
    finally:
        sliding_window.WINDOW_BATCH = default
    diff = float(np.abs(batched - single).max())
    step_s = _median_seconds(lambda: _training_step(model), repeats)
    step_layout_s = _median_seconds(lambda: _training_step(channels_last), repeats)
    grid = "x".join(map(str, GRID))

    def row(name: str, value: float, unit: str, target: float | None = None, ok: bool | None = None) -> dict:
        return {"name": name, "value": value, "unit": unit, "target": target, "ratio": None, "ok": ok}

    return [
        row(
            f"generator {preset} on a {grid} grid, windows in batches of {default}", round(batched_s, 3), "s"
        ),
        row("  same, one window per call", round(single_s, 3), "s"),
        row("  speed-up of batching", round(single_s / batched_s, 2), "x"),
        row("  max |difference| batched vs one at a time", diff, "", 1e-5, diff <= 1e-5),
        row("  batched, channels-last-3d layout (make-masks on the CPU)", round(layout_s, 3), "s"),
        row("  speed-up of the layout", round(batched_s / layout_s, 2), "x"),
        # float rounding through ~20 layers in another summation order: 1e-4 of the [0, 1] scale is 0.14 HU
        row("  max |difference| between the layouts", layout_diff, "", 1e-4, layout_diff <= 1e-4),
        row(f"training step, batch of 2 crops of {'x'.join(map(str, WINDOW))}", round(step_s, 3), "s"),
        row("  same, channels-last-3d layout (train-gan on the CPU)", round(step_layout_s, 3), "s"),
        row("  speed-up of the layout", round(step_s / step_layout_s, 2), "x"),
    ]


def _training_step(model: Generator3D) -> None:
    """The generator's forward and backward on 2 random training crops (gradients left in place)."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand((2, 1, *WINDOW), generator=generator)
    model.train()
    healthy, _ = model(image, torch.ones_like(image), noise_generator=generator)
    healthy.square().mean().backward()
    model.eval()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(GAN_PRESETS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the figures as rows of JSON")
    arguments = parser.parse_args()
    rows = main(arguments.preset, arguments.repeats)
    if arguments.json:
        print(json.dumps(rows, indent=1))
    else:
        for row in rows:
            print(f"{row['name']}: {row['value']} {row['unit']}")

"""Sliding-window generator inference: windows, batching, blending and backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covidseg.inference import sliding_window
from covidseg.inference.sliding_window import _window_starts, _windows, run_generator
from covidseg.models.gan3d import GAN_PRESETS, Generator3D, GeneratorRemoval


def _tiny_generator() -> Generator3D:
    torch.manual_seed(0)
    return Generator3D(GAN_PRESETS["tiny"].generator).eval()


@pytest.mark.parametrize(
    ("size", "window", "starts"),
    [(64, 64, [0]), (48, 64, [0]), (72, 64, [0, 8]), (80, 32, [0, 16, 32, 48]), (20, 16, [0, 4])],
)
def test_window_starts_cover_the_axis_with_half_overlap(size, window, starts):
    assert _window_starts(size, window) == starts
    covered = np.zeros(size, bool)
    for start in starts:
        covered[start : start + window] = True
    assert covered.all()


def test_windows_run_in_z_y_x_order():
    windows = _windows((20, 72, 80), (16, 64, 64))
    assert len(windows) == 8
    firsts = [(w[1].start, w[2].start, w[3].start) for w in windows]
    assert firsts == sorted(firsts) and firsts[1] == (0, 0, 16)


def test_windowed_inference_in_batches_equals_one_window_at_a_time(monkeypatch):
    g = _tiny_generator()
    image = np.random.default_rng(0).random((20, 72, 80), dtype=np.float32)
    lung = np.zeros(image.shape, np.uint8)
    lung[2:18, 8:64, 8:72] = 1
    batched = run_generator(g, image, lung, seed=5, window=(16, 64, 64))  # 2x2x2 windows, batches of 4
    monkeypatch.setattr(sliding_window, "WINDOW_BATCH", 1)
    single = run_generator(g, image, lung, seed=5, window=(16, 64, 64))
    np.testing.assert_allclose(batched, single, atol=1e-5)  # same windows, same U_N per window
    assert not np.array_equal(batched, image)


def test_a_backend_callable_runs_the_same_windows_noise_and_blending_as_the_model():
    g = _tiny_generator()
    image = np.random.default_rng(1).random((8, 48, 48), dtype=np.float32)
    lung = np.ones(image.shape, np.uint8)
    a = run_generator(g, image, lung, seed=3, window=(8, 32, 32))
    b = run_generator(GeneratorRemoval(g), image, lung, seed=3, window=(8, 32, 32), config=g.config)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="needs the generator's config"):
        run_generator(GeneratorRemoval(g), image, lung, seed=3)


def test_a_window_as_large_as_the_grid_runs_the_grid_at_once():
    g = _tiny_generator()
    image = np.random.default_rng(2).random((8, 32, 32), dtype=np.float32)
    lung = np.zeros(image.shape, np.uint8)
    lung[:, 4:28, 4:28] = 1
    whole = run_generator(g, image, lung, seed=1)
    assert np.array_equal(run_generator(g, image, lung, seed=1, window=(16, 64, 64)), whole)
    assert np.array_equal(whole[:, :2], image[:, :2])  # outside the (dilated) lung gate: unchanged

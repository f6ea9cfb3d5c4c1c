"""Benchmark: vectorised fractal 3D Perlin noise (torch) vs a per-voxel Python loop over noise.pnoise3.

One 32x128x128 (z, y, x) volume, 4 octaves (persistence 0.5, lacunarity 2), 4 lattice cells per axis
in the first octave (32 in the last). Ours: torch on CPU, warm-up then the median of several runs
(and CUDA when available). Reference: ``noise.pnoise3`` called once per voxel from a Python loop with
the same octaves, timed on a few z-slices and extrapolated linearly to the whole volume (its cost per
voxel does not depend on position). Target: ours >= 50x faster than that loop on CPU.

    python bench/noise.py          # human-readable
    python bench/noise.py --json   # the figures as JSON

``main()`` returns the figures as a dict (see its docstring) for ``bench/run_all.py``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from covidseg.method.noise import fractal_perlin_3d

SHAPE = (32, 128, 128)  # voxels (z, y, x)
FREQUENCY = 4.0  # lattice cells per axis in the first octave
CUBIC_FREQUENCY = (2.0, 8.0, 8.0)  # secondary figure: cubic cells of 16 voxels on the same grid
OCTAVES = 4
PERSISTENCE = 0.5
LACUNARITY = 2.0
TARGET_RATIO = 50.0  # ours must be at least this many times faster than the per-voxel loop
REFERENCE_SLICES = 2  # z-slices timed with the reference; the rest is extrapolated


def _reference_module() -> ModuleType | None:
    """The C ``noise`` package; this file is also called noise.py, so keep its folder off the path."""
    here = Path(__file__).resolve().parent
    saved_path, saved_module = sys.path[:], sys.modules.get("noise")
    try:
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
        if saved_module is not None and not hasattr(saved_module, "pnoise3"):
            del sys.modules["noise"]
        module = importlib.import_module("noise")
    except ImportError:
        return None
    finally:
        sys.path[:] = saved_path
    return module if hasattr(module, "pnoise3") else None


def _median_seconds(fn, repeats: int, warmup: int, sync=None) -> float:
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_reference(ref: ModuleType, slices: int, repeats: int = 3) -> tuple[float, float]:
    """Seconds for ``slices`` z-slices: (nested per-voxel loop into an array, list comprehension)."""
    d, h, w = SHAPE
    zs = [i * FREQUENCY / d for i in range(slices)]  # lattice coordinates, as in covidseg.method.noise
    ys = [i * FREQUENCY / h for i in range(h)]
    xs = [i * FREQUENCY / w for i in range(w)]
    pnoise3 = ref.pnoise3

    def loop() -> np.ndarray:
        out = np.empty((slices, h, w), dtype=np.float32)
        for k, z in enumerate(zs):
            for j, y in enumerate(ys):
                for i, x in enumerate(xs):
                    out[k, j, i] = pnoise3(x, y, z, OCTAVES, PERSISTENCE, LACUNARITY)
        return out

    def comprehension() -> list[float]:
        return [pnoise3(x, y, z, OCTAVES, PERSISTENCE, LACUNARITY) for z in zs for y in ys for x in xs]

    return _median_seconds(loop, repeats, 1), _median_seconds(comprehension, repeats, 1)


def main(repeats: int = 20) -> dict:
    """Run the benchmark; return its figures.

    Keys: ``name``; ``value`` (our CPU seconds per volume) with ``unit`` "s"; ``reference`` (the
    per-voxel loop's seconds, extrapolated); ``ratio`` = reference / value with ``target`` the
    minimum ratio and ``meets_target``; ``voxels``, ``reference_voxels_timed``, ``extrapolated``;
    ``reference_comprehension`` / ``ratio_comprehension`` for the fastest pure-Python form (a list
    comprehension, no array writes); ``threads`` (torch intra-op threads for ``value``);
    ``value_1_thread`` and ``load_average_1min`` (other load on the machine makes multi-threaded
    timings unreliable); ``value_cubic_cells`` / ``ratio_cubic_cells`` for frequency (2, 8, 8), i.e.
    cubic 16-voxel cells and 4x the lattice corners (the reference's cost does not depend on
    frequency); ``cuda_s`` / ``cuda_cuda_generator_s`` and ``cuda_device`` (None without CUDA).
    Reference figures are None when the ``noise`` package is missing.
    """
    voxels = int(np.prod(SHAPE))
    generator = torch.Generator().manual_seed(0)

    def ours_cpu() -> torch.Tensor:
        return fractal_perlin_3d(SHAPE, FREQUENCY, OCTAVES, PERSISTENCE, LACUNARITY, generator)

    def ours_cpu_cubic() -> torch.Tensor:
        return fractal_perlin_3d(SHAPE, CUBIC_FREQUENCY, OCTAVES, PERSISTENCE, LACUNARITY, generator)

    ours_s = _median_seconds(ours_cpu, repeats, warmup=3)
    cubic_s = _median_seconds(ours_cpu_cubic, repeats, warmup=3)
    threads = torch.get_num_threads()
    try:  # one thread: immune to other processes on a busy machine (OpenMP waits for every thread)
        torch.set_num_threads(1)
        one_thread_s = _median_seconds(ours_cpu, repeats, warmup=3)
    finally:
        torch.set_num_threads(threads)

    figures: dict = {
        "name": f"fractal_perlin_3d {'x'.join(map(str, SHAPE))}, {OCTAVES} octaves, CPU vs per-voxel pnoise3",
        "value": ours_s,
        "unit": "s",
        "reference": None,
        "ratio": None,
        "target": TARGET_RATIO,
        "meets_target": None,
        "voxels": voxels,
        "reference_voxels_timed": None,
        "extrapolated": True,
        "reference_comprehension": None,
        "ratio_comprehension": None,
        "threads": threads,
        "value_1_thread": one_thread_s,
        "load_average_1min": os.getloadavg()[0],
        "value_cubic_cells": cubic_s,
        "ratio_cubic_cells": None,
        "cuda_s": None,
        "cuda_cuda_generator_s": None,
        "cuda_device": None,
    }

    ref = _reference_module()
    if ref is not None:
        timed = REFERENCE_SLICES * SHAPE[1] * SHAPE[2]
        loop_s, comprehension_s = (t * voxels / timed for t in _time_reference(ref, REFERENCE_SLICES))
        figures.update(
            reference=loop_s,
            ratio=loop_s / ours_s,
            meets_target=loop_s / ours_s >= TARGET_RATIO,
            reference_voxels_timed=timed,
            reference_comprehension=comprehension_s,
            ratio_comprehension=comprehension_s / ours_s,
            ratio_cubic_cells=loop_s / cubic_s,
        )

    if torch.cuda.is_available():
        cpu_generator = torch.Generator().manual_seed(0)
        cuda_generator = torch.Generator(device="cuda").manual_seed(0)
        sync = torch.cuda.synchronize
        figures["cuda_s"] = _median_seconds(
            lambda: fractal_perlin_3d(SHAPE, FREQUENCY, OCTAVES, generator=cpu_generator, device="cuda"),
            repeats * 5,
            warmup=5,
            sync=sync,
        )
        figures["cuda_cuda_generator_s"] = _median_seconds(
            lambda: fractal_perlin_3d(SHAPE, FREQUENCY, OCTAVES, generator=cuda_generator, device="cuda"),
            repeats * 5,
            warmup=5,
            sync=sync,
        )
        figures["cuda_device"] = torch.cuda.get_device_name()
    return figures


def _print(figures: dict) -> None:
    def line(label: str, text: str) -> None:
        print(f"  {label:<34} {text}")

    print(f"noise benchmark: {figures['name']}")
    line("load average (1 min)", f"{figures['load_average_1min']:.2f} on {os.cpu_count()} CPUs")
    line("voxels", f"{figures['voxels']:,} ({'x'.join(map(str, SHAPE))}), frequency {FREQUENCY}")
    line(f"ours, torch CPU, {figures['threads']} threads", f"{figures['value'] * 1e3:8.2f} ms (median)")
    line("ours, torch CPU, 1 thread", f"{figures['value_1_thread'] * 1e3:8.2f} ms")
    line(
        f"ours, frequency {CUBIC_FREQUENCY}",
        f"{figures['value_cubic_cells'] * 1e3:8.2f} ms (cubic 16-voxel cells)",
    )
    if figures["reference"] is None:
        line("reference", "noise package not installed: skipped")
    else:
        line(
            "reference, per-voxel loop",
            f"{figures['reference'] * 1e3:8.1f} ms (extrapolated from {figures['reference_voxels_timed']:,} "
            f"voxels = {REFERENCE_SLICES} z-slices)",
        )
        verdict = "met" if figures["meets_target"] else "NOT met"
        line("speed ratio", f"{figures['ratio']:8.1f} x  (target >= {figures['target']:.0f} x: {verdict})")
        line(
            "reference, list comprehension",
            f"{figures['reference_comprehension'] * 1e3:8.1f} ms -> {figures['ratio_comprehension']:.1f} x "
            "(fastest pure-Python form, also extrapolated)",
        )
        line(f"speed ratio, frequency {CUBIC_FREQUENCY}", f"{figures['ratio_cubic_cells']:8.1f} x")
    if figures["cuda_s"] is None:
        line("cuda", "not available")
    else:
        line(
            f"cuda ({figures['cuda_device']})",
            f"{figures['cuda_s'] * 1e3:8.3f} ms with a CPU generator, "
            f"{figures['cuda_cuda_generator_s'] * 1e3:.3f} ms with a CUDA generator",
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    result = main()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)

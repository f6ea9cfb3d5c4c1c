"""Data-parallel scaling of `covidseg train-seg` on the CPU: images/s with 1 and 2 gloo processes.

Builds one small synthetic work folder (synth -> preprocess -> train-gan tiny for a few steps ->
make-masks; 128x128 slices), then runs the unchanged command line on it:

- 1 process with all cores as torch threads, and with 1 thread;
- 2 processes x 1 thread under ``torchrun --standalone --nproc-per-node 2`` (gloo), with the same
  per-process batch (global batch doubles: weak scaling) and with half of it (same global batch as
  the 1-process run: strong scaling).

Throughput = images per second over the logged steps after warm-up (metrics.csv rows at steps
10 .. steps-10; the last row carries validation and is left out), global batch x steps / seconds.

    python bench/scaling.py [--steps 40] [--batch-size 16] [--arch transunet] [--preset tiny] [--json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from covidseg.config import GanTrainConfig, PreprocessConfig
from covidseg.stages.make_masks import run_make_masks
from covidseg.stages.preprocess import run_preprocess
from covidseg.stages.synth import run_synth
from covidseg.stages.train_gan import run_train_gan

ROOT = Path(__file__).resolve().parents[1]


def make_masks(work: Path) -> Path:
    """The make-masks folder the runs share (built once per --work folder)."""
    masks = work / "masks"
    if (masks / "manifest.json").exists():
        return masks
    run_synth(work / "synth", 2, 4, seed=3, shape_zyx=(40, 160, 160), spacing_zyx=(5.0, 2.2, 2.2))
    s = work / "synth"
    run_preprocess(
        work / "pre", s / "healthy", s / "covid", s / "masks", PreprocessConfig(grid=(32, 128, 128))
    )
    gan = GanTrainConfig(preset="tiny", steps=5, batch_size=1, crop=(16, 64, 64), checkpoint_every=5)
    run_train_gan(work / "pre", work / "gan", gan, device="cpu")
    run_make_masks(work / "pre", work / "gan", masks, "cpu", native=False)
    return masks


def throughput(out: Path, global_batch: int, steps: int) -> float:
    """Images/s between the first logged step (10) and the last one before the final validation."""
    with open(out / "metrics.csv", newline="", encoding="utf-8") as fh:
        seconds = {int(r["step"]): float(r["seconds"]) for r in csv.DictReader(fh)}
    first, last = 10, steps - 10
    return global_batch * (last - first) / (seconds[last] - seconds[first])


def run(masks: Path, out: Path, processes: int, threads: int, batch: int, args) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    command = [
        *launcher, "-m", "covidseg", "train-seg", str(masks), "-o", str(out), "--arch", args.arch,
        "--preset", args.preset, "--steps", str(args.steps), "--batch-size", str(batch),
        "--eval-every", str(args.steps), "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return throughput(out, batch * processes, args.steps)


def _load() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench-work" / "scaling")
    parser.add_argument("--steps", type=int, default=40, help="multiple of 10, >= 30")
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--arch", default="transunet")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--json", action="store_true", help="also print the figures as rows of JSON (last)")
    args = parser.parse_args()
    if args.steps % 10 or args.steps < 30:
        parser.error("--steps must be a multiple of 10 and >= 30 (rows are logged every 10 steps)")
    masks = make_masks(args.work)
    cores = os.cpu_count() or 1
    b = args.batch_size
    plans = [  # (label, processes, threads per process, batch per process)
        (f"1 process x {cores} threads", 1, cores, b),
        ("1 process x 1 thread", 1, 1, b),
        ("2 processes x 1 thread (gloo), weak", 2, 1, b),
        ("2 processes x 1 thread (gloo), strong", 2, 1, b // 2),
    ]
    print(f"train-seg {args.arch}/{args.preset}, 128x128 slices, {args.steps} steps, {cores} CPU cores")
    print(f"load average before: {_load():.2f} (other jobs on the machine skew the figures)\n")
    print("| run | global batch | images/s | load average after |")
    print("|---|---:|---:|---:|")
    figures = {}
    for label, processes, threads, batch in plans:
        figures[label] = run(masks, args.work / "runs" / label.split(" (")[0].replace(" ", "_"), processes,
                             threads, batch, args)  # fmt: skip
        print(f"| {label} | {batch * processes} | {figures[label]:.1f} | {_load():.1f} |", flush=True)
    best_single = max(v for k, v in figures.items() if k.startswith("1 process"))
    for label in plans[2:]:
        print(f"\n{label[0]}: {figures[label[0]] / best_single:.2f}x the best single process", end="")
    print()
    if args.json:
        rows = [_row(f"train-seg images/s, {label}", value, "1/s") for label, value in figures.items()]
        rows += [_row(f"  {label[0]} / best single process", figures[label[0]] / best_single, "x")
                 for label in plans[2:]]  # fmt: skip
        print(json.dumps(rows, indent=1))


def _row(name: str, value: float, unit: str) -> dict:
    """One figure for bench/run_all.py (no target: scaling is reported, not judged)."""
    return {"name": name, "value": round(value, 2), "unit": unit, "target": None, "ratio": None, "ok": None}


if __name__ == "__main__":
    main()

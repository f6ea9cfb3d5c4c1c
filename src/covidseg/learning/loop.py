"""Training plumbing shared by the GAN and the 2D segmenter: seeds, schedules, checkpoints, logs."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import numpy as np
import torch

from covidseg.errors import InputError, UsageError, first_line
from covidseg.io.atomic import atomic_path, remove_stale_temps, write_json
from covidseg.learning import distributed


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's (CPU and CUDA) global generators (covidseg draws NumPy randomness
    only from explicit generators)."""
    random.seed(seed)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one training step: the same (seed, step, stream) gives the same draws,
    so a resumed run samples exactly what an uninterrupted one would have."""
    state = np.random.SeedSequence([int(seed), int(step), int(stream)]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & (2**63 - 1))


def lr_at(step: int, total: int, base_lr: float, schedule: str = "cosine", warmup: int = 0) -> float:
    """Learning rate for optimizer step `step` (1-based) of `total`.

    ``constant``: `base_lr` throughout. ``cosine``: linear warm-up over `warmup` steps, then a
    half-cosine from `base_lr` down to 1 % of it at the last step (decaying the rate lets the
    weights settle instead of hopping between noisy-label minima).
    """
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use cosine or constant")
    if warmup > 0 and step <= warmup:
        return base_lr * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def resume_checkpoint_path(out_dir: Path, resume: bool) -> Path:
    """`out_dir/checkpoint.pt`, checked: it must exist with `resume` and must not without it
    (a finished or interrupted run is never overwritten by accident)."""
    path = Path(out_dir) / "checkpoint.pt"
    if resume and not path.exists():
        raise UsageError(out_dir, "--resume: no checkpoint.pt in this folder")
    if not resume and path.exists():
        raise UsageError(
            out_dir, "holds a training run; pass --resume to continue it or choose another folder"
        )
    return path


def resumed_config(config, saved: dict):
    """The settings a resumed run continues with: the checkpoint's `saved` ones (its
    ``train_config``), except ``steps`` and ``grad_accum``, which come from this call's `config` (a
    run may be extended, and resume on another number of processes)."""
    return type(config).from_json({**saved, "steps": config.steps, "grad_accum": config.grad_accum})


def parallel_summary(batch_size: int, grad_accum: int) -> dict:
    """How a training step is spread (the manifests' ``distributed``): processes, micro-batches per
    step, and the global batch (items per optimizer step)."""
    world = distributed.world_size()
    global_batch = batch_size * world * grad_accum
    return {"world_size": world, "grad_accum": grad_accum, "global_batch_size": global_batch}


def open_run_folder(out_dir: Path, settings: dict, columns: list[str], resume_step: int | None) -> CsvLog:
    """Rank 0's output folder for a training run, made ready: created, its manifest.json removed (it
    is written last, when the run is finished again), temporary files a killed run left in it and
    in plots/ removed, `settings` written to config.json; returns the metrics.csv log (trimmed to
    `resume_step` when resuming, new otherwise)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    for folder in (out_dir, out_dir / "plots"):
        remove_stale_temps(folder)
    write_json(out_dir / "config.json", settings)
    return CsvLog(out_dir / "metrics.csv", columns, keep_until_step=resume_step)


class RunningMeans:
    """Per-step losses summed since the last log row, read out as means over those steps and over
    the processes (every rank must call :meth:`pop` at the same steps: it is a collective)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, losses: dict[str, float]) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def pop(self, device: torch.device) -> dict[str, float]:
        """The means (rounded to 6 decimals, as the log keeps them), and start again."""
        means = distributed.mean_over_ranks({k: v / max(self.count, 1) for k, v in self.sums.items()}, device)
        self.sums, self.count = {}, 0
        return {k: round(v, 6) for k, v in means.items()}


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Save a checkpoint atomically. `payload` holds only tensors, numbers, strings, lists, dicts."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (no code runs from the file)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, unpickling refused
        reason = first_line(exc)
        raise InputError(path, f"not a readable covidseg checkpoint ({reason})") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise InputError(path, "not a covidseg checkpoint (no 'format' key)")
    return payload


def _complete(row: dict) -> bool:
    """A log row with every column and an integer step (not the torn last line of a killed run)."""
    return None not in row and None not in row.values() and row["step"].isdigit()


class CsvLog:
    """Append rows to a CSV file (header written once); flushed after each row.

    On resume, rows after `keep_until_step` (written after the last checkpoint) are dropped so the
    log matches the model state, and so is an incomplete last row.
    """

    def __init__(self, path: str | Path, columns: list[str], keep_until_step: int | None = None) -> None:
        self.path = Path(path)
        self.columns = columns
        if keep_until_step is not None and self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.DictReader(fh) if _complete(r) and int(r["step"]) <= keep_until_step]
            with atomic_path(self.path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
        elif not self.path.exists() or keep_until_step is None:
            with atomic_path(self.path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
                csv.DictWriter(fh, fieldnames=columns).writeheader()

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore").writerow(row)

    def read(self) -> list[dict]:
        with open(self.path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

"""Killed runs (SIGKILL, as an out-of-memory killer or a cluster's time limit does it) lose nothing.

`train-gan`, `train-seg` and a batch `predict` run as real `covidseg` processes; each is killed
mid-way, then continued with `--resume` / `--continue`. Training goes on from its last checkpoint
(step count and optimizer state) to the weights an uninterrupted run gets; predict does not redo
finished cases. While the process runs and after the kill, every output file that is visible under
its name loads completely, and after the rerun no temporary file is left.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from conftest import one_torch_thread, save_untrained_segmenter
from covidseg.cli import app
from covidseg.config import GanTrainConfig, PreprocessConfig
from covidseg.imaging.geometry import axis_aligned_geometry
from covidseg.imaging.phantom import make_phantom
from covidseg.io import write_array
from covidseg.learning.loop import load_checkpoint
from covidseg.stages.make_masks import run_make_masks
from covidseg.stages.preprocess import run_preprocess
from covidseg.stages.synth import centred_origin, run_synth
from covidseg.stages.train_gan import run_train_gan

runner = CliRunner()
SHAPE, SPACING = (28, 96, 96), (10.0, 3.75, 3.75)  # small phantoms: a second each
GRID = (8, 32, 32)  # tiny grids: a GAN step on a whole grid takes a fraction of a second
TIMEOUT_S = 120
# One thread per process: on a small shared machine torch's thread pools otherwise fight over the
# cores (several times slower); the killed, resumed and uninterrupted runs all use the same setting.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """synth -> preprocess -> a 2-step tiny GAN -> make-masks: the inputs of the three commands."""
    root = tmp_path_factory.mktemp("kill")
    with one_torch_thread():
        run_synth(root / "synth", 2, 2, seed=5, shape_zyx=SHAPE, spacing_zyx=SPACING)
        s = root / "synth"
        run_preprocess(root / "pre", s / "healthy", s / "covid", None, PreprocessConfig(grid=GRID))
        gan = GanTrainConfig(preset="tiny", steps=2, batch_size=1, crop=None, checkpoint_every=2)
        run_train_gan(root / "pre", root / "gan", gan, device="cpu")
        run_make_masks(root / "pre", root / "gan", root / "masks", device="cpu", native=False)
    return root


def _loads(path: Path) -> None:
    """Read `path` completely as what its name says it is (raises on a torn or corrupt file)."""
    name = path.name
    if name.endswith(".pt"):
        load_checkpoint(path)
    elif name.endswith(".json"):
        json.loads(path.read_text(encoding="utf-8"))
    elif name.endswith(".npy"):
        np.load(path, allow_pickle=False)
    elif name.endswith(".nii.gz"):
        sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    elif name.endswith(".png"):
        assert path.read_bytes()[-8:-4] == b"IEND", f"{path}: truncated PNG"


def _check_files(folder: Path) -> int:
    """Every visible output file under `folder` loads; return how many were checked."""
    n = 0
    for path in folder.rglob("*"):
        if path.name.startswith(".") or not path.is_file():
            continue  # a hidden .NAME.tmp-* file is a write in progress
        try:
            _loads(path)
        except FileNotFoundError:  # replaced or removed between listing and reading
            continue
        n += 1
    return n


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp-*")]


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:  # complete rows only
        assert None not in row and None not in row.values(), f"{path}: torn row {row}"
    return rows


def _kill_when(args: list[str], out: Path, ready, stale: str) -> None:
    """Run `covidseg ARGS` in a process, checking the files in `out` while it runs, and SIGKILL it
    as soon as `ready()`; fail if it ends on its own first. Then plant the temporary file a kill
    in the middle of writing `stale` would leave."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "covidseg", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ready():
            assert proc.poll() is None, f"ended before it could be killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "nothing to kill it at"
            if out.exists():
                _check_files(out)
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    _check_files(out)  # after the kill: whatever is there under its name is whole
    # a kill during a write leaves a hidden, half-written temporary file: the rerun must clear it
    (out / f".{stale}.tmp-killed{''.join(Path(stale).suffixes)}").write_bytes(b"PK\x03\x04 half a file")


def _covidseg(*args: str) -> subprocess.CompletedProcess:
    """Run `covidseg ARGS` to the end in a process like the killed one."""
    return subprocess.run(
        [sys.executable, "-m", "covidseg", *args], capture_output=True, text=True, env=ENV, timeout=TIMEOUT_S
    )


def _checkpoint_step(path: Path) -> int:
    try:
        return int(load_checkpoint(path)["step"])
    except Exception:  # not there yet
        return 0


def _adam_steps(optimizer_state: dict) -> set[int]:
    """The step count Adam keeps per parameter: only a restored optimizer has the full count."""
    return {int(s["step"]) for s in optimizer_state["state"].values()}


def _assert_same_weights(a: dict, b: dict) -> None:
    """Bit for bit: the same batches, noise and optimizer state on the same CPU thread count."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


STALE = "checkpoint.pt"


def test_killed_train_gan_resumes_from_its_checkpoint(work):
    out = work / "gan_killed"
    args = ["train-gan", str(work / "pre"), "--preset", "tiny", "--steps", "8", "--crop", "none",
            "--batch-size", "1", "--checkpoint-every", "2", "--device", "cpu", "--no-progress"]  # fmt: skip
    _kill_when([*args, "-o", str(out)], out, lambda: _checkpoint_step(out / "checkpoint.pt") >= 2, STALE)
    killed_at = _checkpoint_step(out / "checkpoint.pt")
    assert 2 <= killed_at < 8 and not (out / "manifest.json").exists()

    result = _covidseg(*args, "-o", str(out), "--resume")
    assert result.returncode == 0, result.stderr
    straight = work / "gan_straight"
    assert _covidseg(*args, "-o", str(straight)).returncode == 0

    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
    assert a["step"] == b["step"] == 8
    assert _adam_steps(b["opt_g"]) == _adam_steps(b["opt_d"]) == {8}  # optimizer state carried over
    _assert_same_weights(a["generator"], b["generator"])
    _assert_same_weights(a["discriminator"], b["discriminator"])
    assert [int(r["step"]) for r in _csv_rows(out / "metrics.csv")] == [8]  # log_every 10: the last step
    assert json.loads((out / "manifest.json").read_text())["steps"] == 8
    _check_files(out)
    assert _temps(out) == []


def test_killed_train_seg_resumes_from_its_checkpoint(work):
    out = work / "seg_killed"
    args = ["train-seg", str(work / "masks"), "--arch", "unet", "--steps", "6", "--batch-size", "4",
            "--eval-every", "2", "--lr-schedule", "constant", "--device", "cpu", "--no-progress"]  # fmt: skip
    _kill_when([*args, "-o", str(out)], out, lambda: _checkpoint_step(out / "checkpoint.pt") >= 2, STALE)
    killed_at = _checkpoint_step(out / "checkpoint.pt")
    assert 2 <= killed_at < 6 and not (out / "manifest.json").exists()
    assert {int(r["step"]) for r in _csv_rows(out / "metrics.csv")} <= set(range(1, 7))

    result = _covidseg(*args, "-o", str(out), "--resume")
    assert result.returncode == 0, result.stderr
    straight = work / "seg_straight"
    assert _covidseg(*args, "-o", str(straight)).returncode == 0

    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    assert _adam_steps(b["optimizer"]) == {6}  # AdamW moments and step count carried over
    _assert_same_weights(a["model"], b["model"])
    _assert_same_weights(a["loss"], b["loss"])  # the learnable temperature too
    assert a["best"]["step"] == b["best"]["step"]
    # the log has each step once, as the uninterrupted run's (rows after the checkpoint were dropped)
    steps = [int(r["step"]) for r in _csv_rows(out / "metrics.csv")]
    assert steps == [int(r["step"]) for r in _csv_rows(straight / "metrics.csv")] == [2, 4, 6]
    _check_files(out)
    assert _temps(out) == []


@pytest.fixture(scope="module")
def model_pt(work) -> Path:
    return save_untrained_segmenter(work / "model" / "best.pt")


def test_killed_predict_batch_continues_without_redoing_finished_cases(work, model_pt):
    inputs = work / "ct"
    for k in range(6):
        phantom = make_phantom(SHAPE, SPACING, covid=True, seed=20 + k)
        geometry = axis_aligned_geometry(SHAPE, SPACING, centred_origin(SHAPE, SPACING))
        write_array(inputs / f"case{k}.nii.gz", phantom.hu.astype(np.int16), geometry)
    out = work / "pred"
    args = ["predict", str(inputs), "-o", str(out), "--model", str(model_pt), "--probabilities",
            "--snapshots", "--device", "cpu", "--no-progress"]  # fmt: skip
    _kill_when(args, out, lambda: (out / "case0.json").exists(), "summary.csv")
    done = sorted(p.stem for p in out.glob("case*.json"))
    assert done and len(done) < 6 and not (out / "report.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for c in done for p in out.glob(f"{c}*.nii.gz")}
    assert len(stamps) == 2 * len(done)  # a finished case has its mask and probability map

    assert runner.invoke(app, args).exit_code == 2  # outputs there: --continue or --overwrite (in-process)
    result = _covidseg(*args, "--continue")
    assert result.returncode == 0, result.stderr
    assert f"{6 - len(done)} case(s)" in result.stdout and f"{len(done)} already done" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz") if p.name in stamps} == stamps
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_complete"] == done and report["predicted"] == 6 - len(done)
    assert len(list(out.glob("case*.json"))) == 6 and len(list(out.glob("case*.nii.gz"))) == 12
    assert _check_files(out) == 6 * 4 + 2  # masks, probabilities, PNGs, JSONs; summary.csv, report.json
    assert _temps(out) == []

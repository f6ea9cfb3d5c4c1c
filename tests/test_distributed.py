"""Data-parallel training: torchrun with 2 gloo processes on the CPU, against one process.

The sampling scheme makes 2 processes × batch B draw exactly the micro-batches that one process
with ``--grad-accum 2`` draws, and DDP averages what accumulation averages, so both runs must end
on the same parameters; a checkpoint written under DDP must resume in a single process.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from conftest import one_torch_thread
from covidseg.config import GanTrainConfig, PreprocessConfig, SegTrainConfig
from covidseg.errors import UsageError
from covidseg.learning import distributed
from covidseg.learning.loop import load_checkpoint
from covidseg.stages.make_masks import run_make_masks
from covidseg.stages.preprocess import run_preprocess
from covidseg.stages.synth import run_synth
from covidseg.stages.train_gan import run_train_gan
from covidseg.stages.train_seg import run_train_seg

GAN = dict(preset="tiny", batch_size=1, crop=(8, 32, 32), checkpoint_every=2, sample_every=2, log_every=1)
SEG = dict(arch="unet", batch_size=4, eval_every=2, log_every=1)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A preprocess folder and a make-masks folder with high- and low-infected slices."""
    root = tmp_path_factory.mktemp("ddp")
    run_synth(root / "synth", 2, 2, seed=11, shape_zyx=(28, 96, 96), spacing_zyx=(10.0, 3.75, 3.75))
    s = root / "synth"
    run_preprocess(root / "pre", s / "healthy", s / "covid", s / "masks", PreprocessConfig(grid=(16, 64, 64)))
    run_train_gan(root / "pre", root / "gan", GanTrainConfig(steps=2, **GAN), device="cpu")
    # a low threshold on this barely trained generator gives both slice sets: the contrastive
    # term (and so the learnable temperature) takes part in training
    manifest = run_make_masks(root / "pre", root / "gan", root / "masks", "cpu", threshold=0.55, native=False)
    assert manifest["slices"]["high"] >= 4 and manifest["slices"]["low"] >= 4, manifest["slices"]
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as each torchrun process has: float sums then add up in the same order
    (and on a busy 2-core machine OpenMP threads that wait for each other cost many times more)."""
    with one_torch_thread():
        yield


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m covidseg ARGS` with one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*cmd, "-m", "covidseg", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_train_seg_two_processes_equal_one_accumulating_and_resume_alone(work, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    result = _torchrun(
        ["train-seg", str(work / "masks"), "-o", str(two), "--arch", "unet", "--steps", "2",
         "--batch-size", "4", "--eval-every", "2", "--device", "cpu", "--no-progress"]
    )  # fmt: skip
    assert result.stdout.count("best step") == 1  # rank 0 reports, rank 1 stays quiet
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["distributed"] == {"world_size": 2, "grad_accum": 1, "global_batch_size": 8}
    run_train_seg(work / "masks", one, SegTrainConfig(steps=2, grad_accum=2, **SEG), device="cpu")

    a, b = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(two / "checkpoint.pt")
    assert b["world_size"] == 2 and not any(k.startswith("module.") for k in b["model"])
    _assert_same(a["model"], b["model"])
    _assert_same(a["loss"], b["loss"])  # contrastive head and log τ, averaged over ranks too
    assert b["loss"]["contrastive.log_tau"].item() != pytest.approx(math.log(0.1), abs=1e-6)
    assert (two / "best.pt").exists() and (two / "plots" / "loss.png").exists()

    # the 2-process checkpoint resumes in one process (2 micro-batches keep the global batch)
    for folder in (one, two):
        run_train_seg(
            work / "masks", folder, SegTrainConfig(steps=3, grad_accum=2, **SEG), "cpu", resume=True
        )
    _assert_same(
        load_checkpoint(one / "checkpoint.pt")["model"], load_checkpoint(two / "checkpoint.pt")["model"]
    )


def test_train_gan_two_processes_equal_one_accumulating_and_resume_alone(work, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    _torchrun(
        ["train-gan", str(work / "pre"), "-o", str(two), "--preset", "tiny", "--crop", "8,32,32",
         "--steps", "2", "--batch-size", "1", "--checkpoint-every", "2", "--device", "cpu", "--no-progress"]
    )  # fmt: skip
    for name in ("checkpoint.pt", "generator.pt", "calibration.json", "metrics.csv", "manifest.json"):
        assert (two / name).exists(), name
    assert json.loads((two / "manifest.json").read_text())["distributed"]["global_batch_size"] == 2
    run_train_gan(work / "pre", one, GanTrainConfig(steps=2, grad_accum=2, **GAN), device="cpu")

    a, b = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(two / "checkpoint.pt")
    _assert_same(a["generator"], b["generator"])
    _assert_same(a["discriminator"], b["discriminator"])

    # the 2-process checkpoint resumes in one process
    run_train_gan(work / "pre", two, GanTrainConfig(steps=3, grad_accum=2, **GAN), "cpu", resume=True)
    assert load_checkpoint(two / "checkpoint.pt")["step"] == 3
    assert [r.split(",")[0] for r in (two / "metrics.csv").read_text().splitlines()] == ["step", "2", "3"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _helpers_worker(rank: int, port: int, queue) -> None:
    """One of 2 gloo ranks: exercise the helpers, put what it saw on `queue`."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    with distributed.process_group("cpu") as device:
        torch.manual_seed(0)
        model = distributed.wrap(torch.nn.Linear(3, 2), device)
        seen = {
            "rank": distributed.rank(),
            "main": distributed.is_main(),
            "streams": distributed.batch_streams(3),
            "mean": distributed.mean_over_ranks({"loss": float(rank)}, device)["loss"],
            "object": distributed.broadcast_object({"from": rank}),
            "keys": list(distributed.unwrap(model).state_dict()),
        }
        distributed.barrier()
        distributed.check_in_sync(model, device)  # identical: passes
        if rank == 1:
            with torch.no_grad():
                distributed.unwrap(model).bias.add_(1e-3)
        try:
            distributed.check_in_sync(model, device)
        except RuntimeError as exc:
            seen["error"] = str(exc)
    queue.put(seen)


def test_helpers_on_two_gloo_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_helpers_worker, args=(_free_port(), queue), nprocs=2, start_method="spawn")
    seen = sorted((queue.get() for _ in range(2)), key=lambda s: s["rank"])
    assert [s["main"] for s in seen] == [True, False]
    assert [s["streams"] for s in seen] == [[0, 1, 2], [3, 4, 5]]  # disjoint, together 0..5
    assert [s["mean"] for s in seen] == [0.5, 0.5]
    assert [s["object"] for s in seen] == [{"from": 0}, {"from": 0}]
    assert seen[0]["keys"] == ["weight", "bias"]  # no DDP "module." prefix
    for s in seen:  # every rank raises, naming the diverged rank and parameter
        assert "rank(s) [1]" in s["error"] and "bias" in s["error"]


def test_single_process_is_untouched(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with distributed.process_group("cpu") as device:
        assert device == torch.device("cpu")
        model = torch.nn.Linear(2, 2)
        assert distributed.wrap(model, device) is model and distributed.unwrap(model) is model
        assert distributed.is_main() and distributed.world_size() == 1
        assert distributed.batch_streams(1) == [0]  # what a single process always drew
        assert distributed.batch_streams(2) == [0, 1]
        assert distributed.mean_over_ranks({"a": 1.5}, device) == {"a": 1.5}
        assert distributed.broadcast_object({"b": 1}) == {"b": 1}
        distributed.check_in_sync(model, device)
    with pytest.raises(UsageError, match="LOCAL_RANK"):
        distributed._device("cuda:1", 0)
    with pytest.raises(ValueError, match="grad_accum"):
        SegTrainConfig(grad_accum=0)

"""Same inputs and seed on the CPU -> bit-identical outputs (docs/robustness.md, "Reproducibility").

The pipeline runs twice, into two folders `a/` and `b/`: synth, preprocess, train-gan, make-masks
and predict. Every file one run writes, the other writes too, with equal voxels and geometry
(NIfTI), equal arrays (.npy), equal tensors (.pt) and equal JSON/CSV content once the timings and
the folder name itself are set aside.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import one_torch_thread, save_untrained_segmenter
from covidseg.config import GanTrainConfig, PreprocessConfig
from covidseg.learning.loop import load_checkpoint
from covidseg.stages.make_masks import run_make_masks
from covidseg.stages.predict import PredictOptions, collect_cases, run_predict
from covidseg.stages.preprocess import run_preprocess
from covidseg.stages.synth import run_synth
from covidseg.stages.train_gan import run_train_gan

SHAPE, SPACING = (28, 96, 96), (10.0, 3.75, 3.75)  # small phantoms: a second each
TIMINGS = ("seconds", "seconds_per_case")  # JSON keys and CSV columns that hold wall-clock times


def _pipeline(root: Path, model: Path) -> None:
    """synth -> preprocess -> train-gan (3 steps) -> make-masks; predict the COVID phantoms."""
    s = root / "synth"
    run_synth(s, 2, 2, seed=7, shape_zyx=SHAPE, spacing_zyx=SPACING, montage=True)
    run_preprocess(root / "pre", s / "healthy", s / "covid", s / "masks", PreprocessConfig(grid=(8, 32, 32)))
    gan = GanTrainConfig(preset="tiny", steps=3, batch_size=1, crop=None, checkpoint_every=2, seed=3)
    run_train_gan(root / "pre", root / "gan", gan, device="cpu")
    run_make_masks(root / "pre", root / "gan", root / "masks", device="cpu")
    options = PredictOptions(probabilities=True)
    run_predict(
        collect_cases([s / "covid"], root / "pred"), root / "pred", str(model), "auto", "cpu", options
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("repro")
    model = save_untrained_segmenter(root / "model" / "best.pt")
    with one_torch_thread():
        for name in ("a", "b"):
            _pipeline(root / name, model)
    return root / "a", root / "b"


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _same_payload(x, y, where: str) -> None:
    """Checkpoint payloads: equal tensors bit for bit, equal everything else."""
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for key in x:
            _same_payload(x[key], y[key], f"{where}/{key}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            _same_payload(u, v, f"{where}/{i}")
    else:
        assert x == y, where


def _compare(a: Path, b: Path, stage: str) -> int:
    """Assert the `stage` folders of runs `a` and `b` hold the same files with the same content;
    return how many files were compared."""
    files = sorted(p.relative_to(a / stage) for p in (a / stage).rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b / stage) for p in (b / stage).rglob("*") if p.is_file())
    for rel in files:
        pa, pb, name = a / stage / rel, b / stage / rel, rel.name
        if name.endswith(".nii.gz"):
            ia, ib = sitk.ReadImage(str(pa)), sitk.ReadImage(str(pb))
            assert np.array_equal(sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ib)), rel
            for get in ("GetSpacing", "GetOrigin", "GetDirection"):
                assert getattr(ia, get)() == getattr(ib, get)(), (rel, get)
        elif name.endswith(".npy"):
            xa, xb = np.load(pa), np.load(pb)
            assert xa.dtype == xb.dtype and np.array_equal(xa, xb), rel
        elif name.endswith((".json", ".csv")):
            text_a, text_b = pa.read_text(), pb.read_text().replace(str(b), str(a))  # paths name the run
            if name.endswith(".json"):
                assert _without_timings(json.loads(text_a)) == _without_timings(json.loads(text_b)), rel
            else:
                rows_a, rows_b = (
                    [
                        {k: v for k, v in row.items() if k not in TIMINGS}
                        for row in csv.DictReader(io.StringIO(t))
                    ]
                    for t in (text_a, text_b)
                )
                assert rows_a == rows_b, rel
        elif name.endswith(".pt"):
            _same_payload(load_checkpoint(pa), load_checkpoint(pb), str(rel))
        elif name.endswith(".lock"):
            assert pa.read_text().strip().isdigit(), rel  # the pid of the run that held the folder
        else:
            assert name.endswith(".png"), rel  # plots: pictures of the arrays compared above
    return len(files)


@pytest.mark.parametrize("stage", ["synth", "pre", "gan", "masks", "pred"])
def test_the_same_seed_gives_identical_outputs_on_the_cpu(runs, stage):
    assert _compare(*runs, stage) >= 4


def test_the_comparison_sees_a_difference(runs, tmp_path):
    """The check above is not vacuous: another synth seed differs."""
    run_synth(tmp_path / "synth", 2, 2, seed=8, shape_zyx=SHAPE, spacing_zyx=SPACING, montage=True)
    with pytest.raises(AssertionError):
        _compare(runs[0], tmp_path, "synth")

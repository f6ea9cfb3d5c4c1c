"""Movable work folders: manifests store paths relative to their own folder (absolute only for
inputs outside the work folder), each stage reads only its direct input, and a `covidseg run`
folder moved elsewhere continues, predicts and evaluates from its new place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_torch_thread
from covidseg.cli import app
from covidseg.config import config_from_tables
from covidseg.errors import InputError
from covidseg.stages import make_masks
from covidseg.stages._workdir import portable_path, read_manifest, stored_path
from covidseg.stages.run import RunInputs, run_pipeline
from covidseg.stages.synth import run_synth
from covidseg.stages.train_seg import run_train_seg, slice_preprocessing

runner = CliRunner()

TINY = {  # the last step of each trainer checkpoints, validates and plots once
    "preprocess": {"grid": [16, 64, 64]},
    "train-gan": {"preset": "tiny", "steps": 2, "batch_size": 1, "crop": [8, 32, 32]},
    "train-seg": {"steps": 2, "batch_size": 4},
}


class _Interrupted(Exception):
    """Stands for Ctrl-C or a lost cluster job between two stages."""


def _invoke(*args: str):
    with one_torch_thread():  # one thread: float sums in the same order, runs bit-identical
        result = runner.invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    return result


def _run(data: Path, work: Path, settings: Path):
    data_args = [
        "--healthy",
        str(data / "healthy"),
        "--covid",
        str(data / "covid"),
        "--masks",
        str(data / "masks"),
    ]
    return _invoke("run", *data_args, "-o", str(work), "--config", str(settings), "--device", "cpu")


def _statuses(work: Path) -> dict[str, str]:
    return {r["stage"]: r["status"] for r in json.loads((work / "run.json").read_text())["stages"]}


def _files_holding(folder: Path, text: str) -> list[str]:
    """Every file under `folder` (manifests, run.json, sidecars, reports, checkpoints) whose bytes
    contain `text`."""
    needle = text.encode("utf-8")
    return [
        str(p.relative_to(folder))
        for p in sorted(folder.rglob("*"))
        if p.is_file() and needle in p.read_bytes()
    ]


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """A tiny run interrupted before make-masks, moved to another folder, and finished there by
    `covidseg run`: (input data, old run folder, new run folder, settings file)."""
    root = tmp_path_factory.mktemp("movable")
    data = root / "data"
    run_synth(data, 2, 2, seed=21, shape_zyx=(28, 96, 96), spacing_zyx=(10.0, 3.75, 3.75), surroundings=False)
    settings = root / "tiny.json"
    settings.write_text(json.dumps(TINY), encoding="utf-8")
    old = root / "first" / "work"
    inputs = RunInputs(data / "healthy", data / "covid", data / "masks")

    def interrupt(*args, **kwargs):
        raise _Interrupted

    with pytest.MonkeyPatch.context() as patch, one_torch_thread(), pytest.raises(_Interrupted):
        patch.setattr(make_masks, "run_make_masks", interrupt)
        run_pipeline(old, inputs, config_from_tables(TINY), "cpu")
    assert (old / "gan" / "manifest.json").is_file() and not (old / "masks").exists()
    new = root / "elsewhere" / "renamed"
    new.parent.mkdir()
    shutil.move(old, new)
    _run(data, new, settings)  # continues from the new place
    return data, old, new, settings


def test_a_moved_run_continues_from_its_new_place(moved):
    data, old, new, settings = moved
    assert not old.exists()
    assert _statuses(new) == {
        "preprocess": "skipped",
        "train-gan": "skipped",
        "make-masks": "ran",
        "train-seg": "ran",
        "export": "ran",
        "predict": "ran",
        "evaluate": "ran",
    }
    # no file holds the old place (written there) or the new one (written here): relative paths
    assert _files_holding(new, str(old)) == [] and _files_holding(new, str(new)) == []
    # moved again once finished, it is recognised as finished
    again = new.parent / "again"
    shutil.move(new, again)
    try:
        _run(data, again, settings)
        assert set(_statuses(again).values()) == {"skipped"}
    finally:
        shutil.move(again, new)


def test_manifests_name_their_inputs_relative_to_their_folder(moved):
    data, old, new, settings = moved
    masks = read_manifest(new / "masks", "covidseg.masks")
    assert (masks["preprocess"], masks["generator"]) == ("../pre", "../gan/generator.pt")
    assert read_manifest(new / "gan", "covidseg.gan")["preprocess"] == "../pre"
    assert read_manifest(new / "seg", "covidseg.seg")["masks"] == "../masks"
    assert json.loads((new / "model.json").read_text())["source_checkpoint"]["path"] == "seg/best.pt"
    assert json.loads((new / "pred" / "report.json").read_text())["model"]["path"] == "../model.onnx"
    summary = json.loads((new / "eval" / "summary.json").read_text())
    assert summary["pred"] == "../pred" and summary["cases"][0]["pred"].startswith("../pred/")
    # the input CTs are outside the work folder and stay where they are: absolute
    case = read_manifest(new / "pre", "covidseg.preprocess")["cases"][0]
    assert case["source"] == (data / case["group"] / f"{case['id']}.nii.gz").as_posix()
    assert summary["ref"] == (data / "masks").as_posix()


def test_the_moved_model_predicts_and_the_moved_predictions_evaluate(moved, tmp_path):
    data, old, new, settings = moved
    out = tmp_path / "pred"
    _invoke(
        "predict",
        str(data / "covid" / "covid_000.nii.gz"),
        "-o",
        str(out),
        "--model",
        str(new / "seg"),
        "--device",
        "cpu",
    )
    assert (out / "covid_000.nii.gz").is_file()
    assert (
        json.loads((out / "report.json").read_text())["model"]["path"] == (new / "seg" / "best.pt").as_posix()
    )
    _invoke("evaluate", "--pred", str(new / "pred"), "--ref", str(new / "pre"), "-o", str(tmp_path / "eval"))
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["n_cases"] == 2


def test_train_seg_reads_only_the_masks_folder(moved, tmp_path):
    """make-masks records the preprocess settings and slab thickness train-seg needs: with no pre/
    beside the masks folder, train-seg trains the very same model as the run did."""
    data, old, new, settings = moved
    work = tmp_path / "work"
    shutil.copytree(new / "masks", work / "masks")
    config = config_from_tables(TINY)
    with one_torch_thread():
        run_train_seg(work / "masks", work / "seg", config.train_seg, config.seg_loss, device="cpu")
    mine = torch.load(work / "seg" / "best.pt", weights_only=True)
    run = torch.load(new / "seg" / "best.pt", weights_only=True)
    assert mine["preprocessing"] == run["preprocessing"]
    assert mine["weights"].keys() == run["weights"].keys()
    assert all(torch.equal(mine["weights"][k], v) for k, v in run["weights"].items())


def test_a_masks_manifest_of_an_older_version_still_gives_the_slicing(moved):
    """Older masks manifests name their preprocess folder by absolute path and lack
    preprocess_config / slab_mm: train-seg then reads them from that folder, as before."""
    data, old, new, settings = moved
    manifest = read_manifest(new / "masks", "covidseg.masks")
    legacy = {k: v for k, v in manifest.items() if k not in ("preprocess_config", "slab_mm")}
    legacy["preprocess"] = str((new / "pre").resolve())
    assert slice_preprocessing(Path("/nowhere"), legacy, 0.5) == slice_preprocessing(
        new / "masks", manifest, 0.5
    )


def test_inputs_inside_the_work_folder_are_relative_and_move_with_it(moved, tmp_path):
    """Data inside the work folder (as the demo keeps its phantoms) is stored relative: after a move,
    make-masks re-reads the source CTs and evaluate finds the reference masks at the new place."""
    data, old, new, settings = moved
    work = tmp_path / "a" / "work"
    shutil.copytree(data, work / "data")
    _invoke(
        "preprocess",
        "--covid",
        str(work / "data" / "covid"),
        "--masks",
        str(work / "data" / "masks"),
        "-o",
        str(work / "pre"),
        "--grid",
        "16,64,64",
    )
    case = read_manifest(work / "pre", "covidseg.preprocess")["cases"][0]
    assert (case["source"], case["mask_source"]) == (
        "../data/covid/covid_000.nii.gz",
        "../data/masks/covid_000.nii.gz",
    )
    moved_work = tmp_path / "b" / "work"
    shutil.move(work, moved_work)
    _invoke(
        "make-masks",
        str(moved_work / "pre"),
        "--gan",
        str(new / "gan"),
        "-o",
        str(moved_work / "masks"),
        "--device",
        "cpu",
    )
    assert (
        read_manifest(moved_work / "masks", "covidseg.masks")["generator"]
        == (new / "gan" / "generator.pt").as_posix()
    )
    assert (
        moved_work / "masks" / "pseudo_masks" / "covid_000.nii.gz"
    ).is_file()  # re-read the moved source CT
    _invoke(
        "evaluate",
        "--pred",
        str(moved_work / "data" / "masks"),
        "--ref",
        str(moved_work / "pre"),
        "-o",
        str(moved_work / "eval"),
    )
    summary = json.loads((moved_work / "eval" / "summary.json").read_text())
    assert summary["n_cases"] == 2 and summary["aggregate"]["metrics"]["dice"]["mean"] == 1.0
    assert summary["cases"][0]["ref"] == "../data/masks/covid_000.nii.gz"


def test_portable_and_stored_paths(tmp_path):
    work = tmp_path / "work"
    assert portable_path(work / "pre", work / "masks") == "../pre"
    assert portable_path(work / "masks" / "a" / "b.npy", work / "masks") == "a/b.npy"
    outside = tmp_path / "data" / "x.nii.gz"
    assert portable_path(outside, work / "pre") == outside.as_posix()
    assert portable_path(outside, work, work=work) == outside.as_posix()  # run.json: the work folder itself
    assert stored_path(work / "masks", "../pre") == work / "pre"
    assert stored_path(work / "masks", str(outside)) == outside  # absolute: as written (older manifests too)
    with pytest.raises(InputError, match="points outside"):
        stored_path(work / "masks", "../../etc/passwd")
    for bad in (None, "", 3, "a\0b"):
        with pytest.raises(InputError, match="not a path"):
            stored_path(work / "masks", bad)

"""`covidseg predict` and `merge-reports` lose nothing and never silently corrupt a batch.

Through the real command line: no output ever replaces an input, a full disk fails the case (not
the folder), a second batch (after or during the first) keeps the first one's rows, `--continue`
does not mix models, name clashes and long names are handled before anything runs, a failing case
and Ctrl-C leave no partial files. Inputs are 16x64x64 phantoms and a tiny untrained model.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import save_untrained_segmenter, write_dicom_series
from covidseg.imaging.geometry import axis_aligned_geometry
from covidseg.imaging.phantom import make_phantom
from covidseg.io import write_array
from test_bad_inputs import cli, error_line, temp_files

SHAPE, SPACING = (16, 64, 64), (16.0, 5.6, 5.6)  # a whole chest phantom in 65k voxels
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def hu() -> np.ndarray:
    return make_phantom(SHAPE, SPACING, covid=True, seed=3).hu.astype(np.int16)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_untrained_segmenter(tmp_path_factory.mktemp("model") / "a.pt", slice_size=(64, 64))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """Another model: the same network with another slab thickness (another sha256)."""
    return save_untrained_segmenter(
        tmp_path_factory.mktemp("model") / "b.pt", slice_size=(64, 64), slab_mm=20
    )


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory) -> Path:
    """A model file that fails to load (exit 1): a refusal with exit 2 came before loading it."""
    path = tmp_path_factory.mktemp("model") / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    return path


def _ct(path: Path, hu: np.ndarray, spacing=SPACING) -> Path:
    write_array(path, hu, axis_aligned_geometry(hu.shape, spacing, (-180.0, -180.0, -120.0)))
    return path


def _predict(*args, model: Path):
    return cli("predict", *args, "--model", model, "--device", "cpu", "--no-progress")


def _rows(path: Path) -> dict[str, dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["case_id"]: row for row in csv.DictReader(fh)}


def _case_files(out: Path, stem: str) -> list[str]:
    return sorted(
        p.name for p in out.glob(f"{stem}*") if p.name.split(".")[0] in (stem, f"{stem}_probability")
    )


# --- 1: an output never replaces an input -------------------------------------------------------------


def test_no_flag_lets_an_output_replace_an_input(hu, model, broken_model, tmp_path):
    work = tmp_path / "work"
    scan = _ct(work / "scan.nii.gz", hu)
    before = scan.read_bytes()
    for flags in ([], ["--continue"], ["--overwrite"]):
        result = _predict(scan, "-o", work, *flags, model=broken_model)
        assert result.exit_code == 2, result.output
        error_line(result.output, scan, "would replace the input .*scan.nii.gz; choose another output folder")
        assert "--continue" not in result.output
    assert scan.read_bytes() == before and sorted(p.name for p in work.iterdir()) == ["scan.nii.gz"]

    # the same file under another name in the output folder: a hard link, a symbolic link
    inputs, out = tmp_path / "in", tmp_path / "out"
    other = _ct(inputs / "other.nii.gz", hu)
    out.mkdir()
    os.link(other, out / "other.nii.gz")
    result = _predict(inputs, "-o", out, "--overwrite", model=broken_model)
    assert result.exit_code == 2 and "would replace the input" in result.output
    (out / "other.nii.gz").unlink()
    (out / "other.json").symlink_to(other)
    result = _predict(inputs, "-o", out, "--overwrite", model=broken_model)
    assert result.exit_code == 2 and "would replace the input" in result.output
    assert other.read_bytes() == before


# --- 2: a full disk ------------------------------------------------------------------------------------


def _limited(limit_bytes: int):
    """preexec_fn: files of the child may not grow past `limit_bytes` (writes fail with EFBIG)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))


def test_a_full_disk_fails_the_case_and_leaves_no_file(hu, model, tmp_path):
    """ITK's NIfTI writer only prints an error when a write fails: the truncated mask must fail
    its case (no file left, no JSON), and report.json's failed write is one line."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    _ct(inputs / "a.nii.gz", hu)
    command = [sys.executable, "-m", "covidseg", "predict", str(inputs), "-o", str(out),
               "--model", str(model), "--device", "cpu", "--no-progress"]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, env=ENV, timeout=TIMEOUT_S, preexec_fn=_limited(1500)
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    error_line(result.stderr, out / "a.nii.gz", r"^failed: .*not written completely .*disk full")
    error_line(result.stderr, out / "report.json", r"^error: .*cannot write \(File too large\)")
    assert _case_files(out, "a") == [] and temp_files(out) == []
    assert _rows(out / "summary.csv")["a"]["status"] == "failed"


def test_preprocess_leaves_no_file_of_a_case_whose_second_write_fails(hu, tmp_path, monkeypatch):
    """A case's arrays are written one by one: when a later one fails (disk full), the earlier ones
    of that case are removed too, and the other case finishes."""
    import covidseg.stages.preprocess as stage
    from covidseg.errors import InputError

    inputs, out = tmp_path / "in", tmp_path / "pre"
    _ct(inputs / "a.nii.gz", hu)
    _ct(inputs / "b.nii.gz", hu)
    real_save = stage.save_npy

    def full_disk_for_lungs_of_a(path, array):
        if Path(path).name == "a.npy" and Path(path).parent.name == "lungs":
            raise InputError(path, "cannot write (No space left on device)")
        real_save(path, array)

    monkeypatch.setattr(stage, "save_npy", full_disk_for_lungs_of_a)
    result = cli(
        "preprocess", "--covid", inputs, "-o", out, "--grid", "8,32,32", "--workers", "1", "--no-progress"
    )
    assert result.exit_code == 1, result.output
    error_line(result.output, out / "lungs" / "a.npy", r"^failed: .*No space left on device")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy")) == [
        "images/b.npy",
        "lungs/b.npy",
    ]


# --- 3: a second batch, after or during the first -----------------------------------------------------


def test_a_second_batch_keeps_the_first_ones_rows_and_a_concurrent_one_is_refused(
    hu, model, other_model, tmp_path
):
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    _ct(first / "a.nii.gz", hu)
    _ct(second / "b.nii.gz", hu)
    assert _predict(first, "-o", out, model=model).exit_code == 0
    result = _predict(second, "-o", out, model=model)
    assert result.exit_code == 0, result.output
    assert "1 of earlier batches kept" in result.output
    assert sorted(_rows(out / "summary.csv")) == ["a", "b"]
    report = json.loads((out / "report.json").read_text())
    assert [r["case_id"] for r in report["results"]] == ["a", "b"]
    assert report["predicted"] == 1 and report["kept_from_earlier_batches"] == ["a"]

    # a case of the earlier batch made by another model: refused, or left out with --overwrite
    result = _predict(second, "-o", out, "--overwrite", model=other_model)
    assert result.exit_code == 0, result.output
    assert sorted(_rows(out / "summary.csv")) == ["b"]
    _ct(second / "c.nii.gz", hu)
    result = _predict(second / "c.nii.gz", "-o", out, model=model)
    assert result.exit_code == 2
    assert "case 'b' was predicted with model" in result.output and "pass --overwrite" in result.output

    # another run holds the folder (its lock file, with its pid in it)
    fd = os.open(out / ".covidseg-predict.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        result = _predict(second / "c.nii.gz", "-o", out, "--overwrite", model=model)
    finally:
        os.close(fd)
    assert result.exit_code == 2
    assert f"error: another covidseg predict (pid {os.getpid()}) is writing to {out}" in result.output
    assert not (out / "c.json").exists()


def test_preprocess_into_a_folder_another_run_is_writing_is_refused(hu, tmp_path):
    from covidseg.io.atomic import folder_lock

    inputs, out = tmp_path / "in", tmp_path / "pre"
    _ct(inputs / "a.nii.gz", hu)
    out.mkdir()
    with folder_lock(out, ".covidseg.lock", "covidseg preprocess"):  # as a running preprocess holds it
        result = cli("preprocess", "--covid", inputs, "-o", out, "--grid", "8,32,32", "--no-progress")
    assert result.exit_code == 2, result.output
    assert f"error: another covidseg preprocess (pid {os.getpid()}) is writing to {out}" in result.output
    assert not (out / "images").exists() and not (out / "manifest.json").exists()
    assert cli("preprocess", "--covid", inputs, "-o", out, "--grid", "8,32,32").exit_code == 0  # released


# --- 4: --continue with another model -----------------------------------------------------------------


def test_continue_with_another_model_is_refused(hu, model, other_model, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    _ct(inputs / "a.nii.gz", hu)
    assert _predict(inputs, "-o", out, model=model).exit_code == 0
    mask = (out / "a.nii.gz").read_bytes()
    sha_a = json.loads((out / "a.json").read_text())["model_sha256"]
    result = _predict(inputs, "-o", out, "--continue", model=other_model)
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: case 'a' was predicted with model " + sha_a[:12]) and "--overwrite" in line
    assert (out / "a.nii.gz").read_bytes() == mask
    result = _predict(inputs, "-o", out, "--overwrite", model=other_model)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "a.json").read_text())["model_sha256"] != sha_a


# --- 5: name clashes ----------------------------------------------------------------------------------


def test_name_clashes_are_refused_before_anything_runs(hu, broken_model, tmp_path):
    out = tmp_path / "out"
    report = _ct(tmp_path / "r" / "report.nii.gz", hu)
    result = _predict(report, "-o", out, model=broken_model)
    assert result.exit_code == 2
    error_line(result.output, report, "case id 'report' is taken by the batch's summary and report")
    part = _ct(tmp_path / "r" / "summary.part-1-of-2.nii.gz", hu)
    assert _predict(part, "-o", out, model=broken_model).exit_code == 2

    a, a_prob = _ct(tmp_path / "p" / "a.nii.gz", hu), _ct(tmp_path / "p" / "a_probability.nii.gz", hu)
    result = _predict(tmp_path / "p", "-o", out, "--probabilities", model=broken_model)
    assert result.exit_code == 2
    assert "a_probability.nii.gz is also an output of" in result.output
    assert str(a) in result.output and str(a_prob) in result.output

    x1, x2 = _ct(tmp_path / "d1" / "x.nii.gz", hu), _ct(tmp_path / "d2" / "x.nii.gz", hu)
    result = _predict(tmp_path / "d1", tmp_path / "d2", "-o", out, model=broken_model)
    assert result.exit_code == 2 and str(x1) in result.output and str(x2) in result.output
    shutil.copy(x1, tmp_path / "d1" / "x.nii")  # the same case id twice in one folder
    result = _predict(tmp_path / "d1", "-o", out, model=broken_model)
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'd1' / 'x.nii'}:" in result.output and str(x1) in result.output
    assert not out.exists()


# --- 6: a failure after the first file is written -----------------------------------------------------


def test_a_case_failing_after_its_mask_is_written_leaves_no_file(hu, model, tmp_path, monkeypatch):
    import covidseg.stages.predict as predict

    inputs, out = tmp_path / "in", tmp_path / "out"
    _ct(inputs / "a.nii.gz", hu)
    _ct(inputs / "b.nii.gz", hu)
    real = predict.write_json

    def failing(path, obj):
        if Path(path).name == "a.json":
            assert (out / "a.nii.gz").exists()  # the failure comes after the mask
            raise ValueError("Out of range float values are not JSON compliant: inf")
        real(path, obj)

    monkeypatch.setattr(predict, "write_json", failing)
    result = _predict(inputs, "-o", out, "--probabilities", model=model)
    assert result.exit_code == 1
    assert "failed: " in result.output and "unexpected error: ValueError" in result.output
    assert _case_files(out, "a") == [] and temp_files(out) == []
    assert (out / "b.json").exists() and _rows(out / "summary.csv")["a"]["status"] == "failed"


# --- 18: long names -----------------------------------------------------------------------------------


def test_a_long_valid_file_name_gets_short_unique_output_names(hu, model, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    long_id, other_id = "x" * 245, "x" * 244 + "y"  # 252-byte file names; outputs would pass 255
    for case_id in (long_id, other_id):
        _ct(inputs / f"{case_id}.nii.gz", hu)
    args = [inputs, "-o", out, "--probabilities"]
    result = _predict(*args, model=model)
    assert result.exit_code == 0, result.output
    names = [p.name for p in out.iterdir()]
    assert max(len(n.encode()) for n in names) <= 255 and temp_files(out) == []
    records = [json.loads(p.read_text()) for p in out.glob("x*.json")]
    assert sorted(r["case_id"] for r in records) == sorted([long_id, other_id])
    stems = {r["outputs"]["json"].removesuffix(".json") for r in records}
    assert len(stems) == 2 and all(len(s) < len(long_id) and s.startswith("x" * 200) for s in stems)
    assert sorted(_rows(out / "summary.csv")) == sorted([long_id, other_id])
    again = _predict(*args, "--continue", model=model)
    assert again.exit_code == 0 and "2 already done" in again.output


# --- 19b, 20: notes; an output folder that cannot be one ---------------------------------------------


def test_reader_notes_are_printed(hu, model, tmp_path):
    folder = tmp_path / "in" / "two"
    write_dicom_series(folder, hu, spacing_zyx=SPACING, series_uid="1.2.3.4")
    for path in write_dicom_series(tmp_path / "b", hu[:8], spacing_zyx=SPACING, series_uid="1.2.3.5"):
        path.rename(folder / f"B{path.name}")
    result = _predict(tmp_path / "in", "-o", tmp_path / "out", model=model)
    assert result.exit_code == 0, result.output
    assert "note: two: 2 series found; using 1.2.3.4" in result.output


def test_an_output_path_that_cannot_be_a_folder_is_refused_before_the_model_loads(
    hu, broken_model, tmp_path, monkeypatch
):
    scan = _ct(tmp_path / "in" / "a.nii.gz", hu)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    for out in (notes, notes / "sub"):
        result = _predict(scan, "-o", out, model=broken_model)
        assert result.exit_code == 2
        error_line(result.output, out, f"cannot be an output folder: {notes} is a file")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path, mode, **kwargs) -> bool:  # as without write permission (the tests may run as root)
        return real_access(path, mode, **kwargs) and not (Path(path) == locked and mode & os.W_OK)

    monkeypatch.setattr(os, "access", access)
    result = _predict(scan, "-o", locked, model=broken_model)
    assert result.exit_code == 2
    error_line(result.output, locked, "cannot write the output: .* is not writable")
    assert notes.read_text() == "mine\n" and list(locked.iterdir()) == []


# --- 23: merge-reports with a part's summary missing --------------------------------------------------


def test_merge_reports_names_a_missing_part_summary(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    part = {"part": {"num_parts": 1, "part_id": 0}, "cases": 1, "predicted": 1, "skipped_complete": [],
            "failed": [], "results": []}  # fmt: skip
    (out / "report.part-1-of-1.json").write_text(json.dumps(part))
    result = cli("merge-reports", out)
    assert result.exit_code == 1
    error_line(result.output, out / "summary.part-1-of-1.csv", "missing .*--continue")
    assert not (out / "summary.csv").exists()


# --- 24: Ctrl-C ---------------------------------------------------------------------------------------


def test_ctrl_c_stops_the_batch_with_130_and_leaves_no_partial_files(hu, model, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    first = _ct(inputs / "c00.nii.gz", hu)
    for k in range(1, 8):  # enough cases that the batch cannot end before the signal comes
        os.link(first, inputs / f"c{k:02d}.nii.gz")
    command = [sys.executable, "-m", "covidseg", "predict", str(inputs), "-o", str(out), "--model",
               str(model), "--probabilities", "--device", "cpu", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not (out / "c00.json").exists():
            assert proc.poll() is None, f"ended before the interrupt: {proc.communicate()[1]}"
            assert time.monotonic() < deadline, "the first case never finished"
            time.sleep(0.005)
        assert proc.poll() is None, "the batch ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Exception ignored" not in stderr and "Traceback" not in stderr
    done = sorted(p.stem for p in out.glob("c*.json"))
    assert 0 < len(done) < 8 and temp_files(out) == [] and not (out / "summary.csv").exists()
    for k in range(8):
        files = _case_files(out, f"c{k:02d}")
        expected = [f"c{k:02d}{s}" for s in (".json", ".nii.gz", "_probability.nii.gz")]
        assert files == (expected if f"c{k:02d}" in done else []), files

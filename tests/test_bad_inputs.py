"""The bad-input corpus, run through the real command line (docs/robustness.md lists every case).

The rule: bad input gets ONE line naming the file and the cause, exit 1 (a case failed) or 2 (usage
error), no partial outputs, nothing of the user's lost or overwritten; in a batch one bad case
never stops the others. Inputs are tiny phantoms and arrays written here; refusals that are
library-level details (each reader's message) are in test_io.py, these check what a user sees.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from conftest import LAS, LPS, ct_like, oblique_direction, write_dicom_series
from covidseg.cli import app
from covidseg.config import PreprocessConfig
from covidseg.imaging.geometry import Geometry, axis_aligned_geometry
from covidseg.io import write_array
from covidseg.stages._workdir import stored_path
from covidseg.stages.preprocess import run_preprocess
from covidseg.stages.synth import run_synth

runner = CliRunner()
SHAPE, SPACING = (16, 64, 64), (16.0, 5.6, 5.6)  # a whole chest phantom in 65k voxels
GRID = "8,32,32"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def cli_subprocess(*args, cwd=None) -> subprocess.CompletedProcess:
    """The installed entry point in a fresh process (real stdout/stderr encoding, timeouts)."""
    command = [sys.executable, "-m", "covidseg", *map(str, args)]
    return subprocess.run(command, capture_output=True, encoding="utf-8", timeout=120, cwd=cwd)


def error_line(stderr: str, path: Path | str, cause: str) -> str:
    """The single stderr line that names `path`; it must start like an error and match `cause`."""
    lines = [line for line in stderr.splitlines() if str(path) in line]
    assert len(lines) == 1, f"expected one line naming {path}:\n{stderr}"
    assert lines[0].startswith(("error: ", "failed: ")), lines[0]
    assert re.search(cause, lines[0]), f"{cause!r} not in {lines[0]!r}"
    return lines[0]


def temp_files(folder: Path) -> list[Path]:
    """Leftovers of an interrupted atomic write (see covidseg.io.atomic)."""
    return list(folder.rglob(".*.tmp-*")) if folder.exists() else []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """One healthy chest phantom (NIfTI, int16 HU); lungs are found in it at GRID."""
    root = tmp_path_factory.mktemp("phantom")
    run_synth(root, n_healthy=1, n_covid=1, seed=11, shape_zyx=SHAPE, spacing_zyx=SPACING)
    return root


@pytest.fixture(scope="module")
def phantom_array(phantom) -> tuple[np.ndarray, Geometry]:
    image = sitk.ReadImage(str(phantom / "healthy" / "healthy_000.nii.gz"))
    return sitk.GetArrayFromImage(image), Geometry.of(image)


@pytest.fixture(scope="module")
def ph(phantom, phantom_array) -> SimpleNamespace:
    """What the bad-case makers start from: the phantom file, its array and geometry."""
    return SimpleNamespace(ct=phantom / "healthy" / "healthy_000.nii.gz", array=phantom_array)


@pytest.fixture(scope="module")
def pre(phantom, tmp_path_factory) -> Path:
    """A finished preprocess output with a healthy and a COVID case."""
    out = tmp_path_factory.mktemp("pre") / "pre"
    config = PreprocessConfig(grid=(8, 32, 32))
    run_preprocess(out, healthy=phantom / "healthy", covid=phantom / "covid", config=config)
    return out


# ---------------------------------------------------------------------------------------------
# preprocess: one bad case beside a good one -> exit 1, one line, no files for the bad case
# ---------------------------------------------------------------------------------------------


def _nifti(folder, array, geometry=None, name="bad.nii.gz", compress=True) -> Path:
    geometry = geometry or axis_aligned_geometry(array.shape, (2.0, 1.0, 1.0))
    write_array(folder / name, array, geometry, compress=compress)
    return folder / name


def _strip_dicom_element(path: Path, tag: bytes) -> None:
    """Remove one data element (implicit VR little endian, as GDCM writes here) from a file."""
    data = path.read_bytes()
    i = data.find(tag, 132)
    assert i > 0 and data.find(tag, i + 1) < 0
    length = int.from_bytes(data[i + 4 : i + 8], "little")
    path.write_bytes(data[:i] + data[i + 8 + length :])


def zero_byte(d, ph):
    (d / "bad.nii.gz").write_bytes(b"")
    return d / "bad.nii.gz"


def truncated_nii_gz(d, ph):
    data = ph.ct.read_bytes()
    (d / "bad.nii.gz").write_bytes(data[: len(data) // 2])
    return d / "bad.nii.gz"


def truncated_nii(d, ph):
    path = _nifti(d, ct_like((6, 20, 24)), name="bad.nii", compress=False)
    path.write_bytes(path.read_bytes()[:-500])
    return path


def nifti_named_mha(d, ph):
    shutil.copy(ph.ct, d / "bad.mha")
    return d / "bad.mha"


def text_named_nii_gz(d, ph):
    (d / "bad.nii.gz").write_text("patient notes, not an image\n")
    return d / "bad.nii.gz"


def random_bytes(d, ph):
    (d / "bad.nii").write_bytes(np.random.default_rng(0).bytes(4096))
    return d / "bad.nii"


def rgb_nifti(d, ph):
    rgb = np.repeat(ct_like((4, 16, 16))[..., None], 3, axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(d / "bad.nii.gz"))
    return d / "bad.nii.gz"


def four_d(d, ph):
    frame = sitk.GetImageFromArray(ct_like((4, 16, 16)))
    sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(d / "bad.nii.gz"))
    return d / "bad.nii.gz"


def nan_voxels(d, ph):  # ITK's NIfTI reader would silently turn NaN into 0
    values = ct_like((6, 20, 24)).astype(np.float32)
    values[3, 10, 12] = np.nan
    return _nifti(d, values)


def inf_voxels(d, ph):
    values = ct_like((6, 20, 24)).astype(np.float32)
    values[0, 0, 0] = -np.inf
    return _nifti(d, values, name="bad.mha")


def constant(d, ph):
    return _nifti(d, np.full((6, 20, 24), -1000, np.int16))


def raw_12bit(d, ph):  # a CT stored 0..4095 without its rescale intercept
    array, geometry = ph.array
    return _nifti(d, np.clip(array.astype(np.int32) + 1024, 0, 4095).astype(np.uint16), geometry)


def display_8bit(d, ph):  # a lung-windowed 0..255 export
    array, geometry = ph.array
    return _nifti(d, np.clip((array + 1350) / 1500 * 255, 0, 255).astype(np.uint8), geometry)


def abdomen_only(d, ph):
    block = np.full((8, 48, 48), -1000, np.int16)
    block[:, 8:40, 8:40] = 40  # soft tissue, no air inside the body
    return _nifti(d, block, axis_aligned_geometry(block.shape, (5.0, 2.0, 2.0)))


def tiny(d, ph):
    return _nifti(d, ct_like((4, 6, 6)))


def huge_header(d, ph):  # 32000^3 voxels announced: must be refused before allocating ~130 TB
    path = _nifti(d, ct_like((6, 20, 24)), name="bad.nii", compress=False)
    data = bytearray(path.read_bytes())
    for offset in (42, 44, 46):  # NIfTI-1 dim[1..3], int16
        data[offset : offset + 2] = np.int16(32000).tobytes()
    path.write_bytes(bytes(data))
    return path


def huge_metaimage(d, ph):  # 2e9 voxels announced, 12 bytes present: refused before ITK allocates 4 GB
    header = "ObjectType = Image\nNDims = 3\nDimSize = 1500 1500 900\nElementType = MET_SHORT\n"
    (d / "bad.mha").write_bytes((header + "ElementDataFile = LOCAL\n").encode() + bytes(12))
    return d / "bad.mha"


def no_voxels(d, ph):
    header = (
        "ObjectType = Image\nNDims = 3\nDimSize = 0 0 0\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    (d / "bad.mha").write_text(header)
    return d / "bad.mha"


def dicom_missing_slice(d, ph):
    files = write_dicom_series(d / "bad", ct_like((6, 16, 16)), shuffle_names=False)
    files[3].unlink()
    return d / "bad"


def dicom_duplicate_slice(d, ph):
    files = write_dicom_series(d / "bad", ct_like((6, 16, 16)), shuffle_names=False)
    shutil.copy(files[2], d / "bad" / "IM0002_copy.dcm")
    return d / "bad"


def dicom_corrupt_slice(d, ph):
    files = write_dicom_series(d / "bad", ct_like((6, 16, 16)), shuffle_names=False)
    files[2].write_bytes(files[2].read_bytes()[:400])
    return d / "bad"


def dicom_corrupt_length(d, ph):  # GDCM would allocate the announced 775 MB while scanning the folder
    files = write_dicom_series(d / "bad", ct_like((6, 16, 16)), shuffle_names=False)
    data = files[2].read_bytes()
    i = data.index(b"\x02\x00\x03\x00UI")  # (0002,0003) MediaStorageSOPInstanceUID, VR UI
    files[2].write_bytes(data[: i + 4] + b"}I" + data[i + 6 :])  # an unknown VR: a 4-byte length
    return d / "bad"


def dicom_without_rescale(d, ph):  # an anonymiser dropped (0028,1052/1053/1054): raw 0..1424 values
    for path in write_dicom_series(d / "bad", ct_like((6, 16, 16)), intercept=-1024.0):
        for element in (b"\x52\x10", b"\x53\x10", b"\x54\x10"):
            _strip_dicom_element(path, b"\x28\x00" + element)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    assert not reader.HasMetaDataKey("0028|1052")
    return d / "bad"


BAD_CTS = {
    zero_byte: r"empty file \(0 bytes\)",
    truncated_nii_gz: r"truncated",
    truncated_nii: r"truncated NIfTI: \d+ bytes of data, header announces \d+",
    nifti_named_mha: r"gzip-compressed NIfTI image but its name does not end in \.nii\.gz",
    text_named_nii_gz: r"the file is text, not an image",
    random_bytes: r"unreadable: not an image file",
    rgb_nifti: r"3-channel \(colour\) image, not a CT in HU; pass --intensity",
    four_d: r"4D image \(2 volumes\)",
    nan_voxels: r"NaN or infinite",
    inf_voxels: r"NaN or infinite",
    constant: r"all voxels have the same value \(-1000\)",
    raw_12bit: r"likely not in HU \(pass --intensity",
    display_8bit: r"likely not in HU \(pass --intensity",
    abdomen_only: r"no lungs found",
    tiny: r"6 x 6 x 4 voxels is too small for a CT",
    huge_header: r"header announces 32000 x 32000 x 32000 voxels: too large",
    huge_metaimage: r"truncated MetaImage: \d+ bytes, header announces 4050000\d+",
    no_voxels: r"header announces 0 x 0 x 0 voxels: no data",
    dicom_missing_slice: r"uneven slice spacing: 5 mm between IM0002\.dcm and IM0004\.dcm, 2\.5 mm elsewhere",
    dicom_duplicate_slice: r"duplicate slices: IM0002\.dcm and IM0002_copy\.dcm",
    dicom_corrupt_slice: r"missing slice\?\); 1 unreadable DICOM file\(s\): IM0002\.dcm",
    dicom_corrupt_length: r"IM0002\.dcm: corrupt DICOM file: element \(0002,0003\) announces 775040561 bytes",
    dicom_without_rescale: r"minimum value 24 .* likely not in HU \(pass --intensity",
}


@pytest.mark.parametrize("make", BAD_CTS, ids=lambda f: f.__name__)
def test_preprocess_bad_case_fails_alone(make, ph, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(ph.ct, inputs / "good.nii.gz")
    bad = make(inputs, ph)
    out = tmp_path / "pre"
    result = cli("preprocess", "--covid", inputs, "-o", out, "--grid", GRID, "--no-progress")
    assert_failed_alone(result, out, bad, BAD_CTS[make])


def assert_failed_alone(result, out: Path, named: Path | str, cause: str) -> None:
    """`preprocess` of a folder holding good.* and one bad case: exit 1, one line naming `named`
    with `cause`, the good case finished, nothing written for the bad one."""
    assert result.exit_code == 1, result.output
    line = error_line(result.stderr, named, cause)
    assert "Traceback" not in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["id"] for c in manifest["cases"]] == ["good"]  # the good case still finished
    (failure,) = manifest["failed"]
    assert failure["id"] == "bad" and line == f"failed: {failure['error']}"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["good.npy"]  # nothing for "bad"
    assert temp_files(out) == []
    assert sorted(p.name for p in (out / "lungs").iterdir()) == ["good.npy"]
    assert temp_files(out) == []


def test_rgb_png_needs_an_intensity_mapping(tmp_path):
    png = tmp_path / "slice.png"
    rgb = np.zeros((32, 32, 3), np.uint8) + np.arange(32, dtype=np.uint8)[:, None, None] * 8
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(png))
    result = cli("preprocess", "--covid", png, "-o", tmp_path / "pre", "--grid", "1,32,32", "--no-progress")
    assert result.exit_code == 1
    error_line(
        result.stderr, png, r"3-channel \(colour\) image, not a CT in HU; pass --intensity window:LO,HI"
    )
    assert json.loads((tmp_path / "pre" / "manifest.json").read_text())["cases"] == []
    # a folder of PNGs is not even searched for images without a mapping: a usage error
    result = cli("preprocess", "--covid", tmp_path, "-o", tmp_path / "pre2", "--no-progress")
    assert result.exit_code == 2
    error_line(result.stderr, tmp_path, r"no CT found")
    assert not (tmp_path / "pre2").exists()


# ---------------------------------------------------------------------------------------------
# inputs that must work
# ---------------------------------------------------------------------------------------------


def _preprocess_ok(inputs, out, *extra) -> dict:
    result = cli("preprocess", "--covid", inputs, "-o", out, "--grid", GRID, "--no-progress", *extra)
    assert result.exit_code == 0, result.output
    return json.loads((out / "manifest.json").read_text())


def test_one_slice_volume_works(phantom_array, tmp_path):
    array, geometry = phantom_array
    one = Geometry((*geometry.size[:2], 1), geometry.spacing, geometry.origin, geometry.direction)
    _nifti(tmp_path / "in", array[8:9], one, name="slice.nii.gz")
    (case,) = _preprocess_ok(tmp_path / "in", tmp_path / "pre")["cases"]
    assert case["canonical_shape"] == [1, 64, 64] and case["lung_ml"] > 0


@pytest.mark.parametrize("direction", [LAS, oblique_direction(12.0)], ids=["LAS", "oblique"])
def test_other_orientations_work_and_keep_their_geometry(direction, phantom_array, tmp_path):
    array, geometry = phantom_array
    tilted = Geometry(geometry.size, geometry.spacing, (10.0, -20.5, 300.0), direction)
    _nifti(tmp_path / "in", array, tilted, name="tilted.mha")  # MetaImage keeps the direction exactly
    (case,) = _preprocess_ok(tmp_path / "in", tmp_path / "pre")["cases"]
    assert Geometry.from_json(case["native_geometry"]).matches(tilted, atol=1e-9)
    assert case["lung_ml"] > 1000


def test_dicom_folder_with_two_series_takes_the_longest_with_a_note(phantom_array, tmp_path):
    array, geometry = phantom_array
    study = tmp_path / "in" / "study"
    write_dicom_series(study, array, spacing_zyx=SPACING, series_uid="1.2.826.0.1.3680043.2.1125.7")
    scout = tmp_path / "scout"
    write_dicom_series(scout, array[:3], spacing_zyx=SPACING, series_uid="1.2.826.0.1.3680043.2.1125.8")
    for f in scout.iterdir():
        f.rename(study / f"scout_{f.name}")
    result = cli("preprocess", "--covid", tmp_path / "in", "-o", tmp_path / "pre", "--grid", GRID)
    assert result.exit_code == 0, result.output
    (note,) = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert note == "note: study: 2 series found; using 1.2.826.0.1.3680043.2.1125.7 (16 slices)"
    (case,) = json.loads((tmp_path / "pre" / "manifest.json").read_text())["cases"]
    assert case["series_uid"] == "1.2.826.0.1.3680043.2.1125.7" and case["canonical_shape"] == list(SHAPE)


def test_paths_with_spaces_unicode_and_brackets(phantom, tmp_path):
    folder = tmp_path / "CT scans" / "patiënt 李 [final]"
    folder.mkdir(parents=True)
    shutil.copy(phantom / "healthy" / "healthy_000.nii.gz", folder / "scan 01 ü [v2].nii.gz")
    (folder / "leer [bold] ö.nii.gz").write_bytes(b"")
    out = tmp_path / "out dir ü [x]"
    result = cli_subprocess("preprocess", "--covid", folder, "-o", out, "--grid", GRID, "--no-progress")
    assert result.returncode == 1, result.stderr
    error_line(result.stderr, folder / "leer [bold] ö.nii.gz", r"empty file \(0 bytes\)")
    assert f"into {out};" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert [c["id"] for c in manifest["cases"]] == ["scan 01 ü [v2]"]
    assert (out / "images" / "scan 01 ü [v2].npy").is_file()


def test_a_file_name_with_a_newline_prints_as_one_line(tmp_path):
    """A name holding a newline cannot fake a second message: control characters are escaped."""
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "x\nfailed: fake.nii.gz").write_bytes(b"")
    result = cli("preprocess", "--covid", folder, "-o", tmp_path / "pre", "--no-progress")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if "fake" in line]
    assert lines == [f"failed: {folder}/x\\nfailed: fake.nii.gz: empty file (0 bytes)"]


def test_symlinked_inputs_work_and_symlink_loops_do_not_hang(phantom, tmp_path):
    real = tmp_path / "real"
    (real / "nested").mkdir(parents=True)
    shutil.copy(phantom / "healthy" / "healthy_000.nii.gz", real / "a.nii.gz")
    shutil.copy(phantom / "covid" / "covid_000.nii.gz", real / "nested" / "b.nii.gz")
    inputs = tmp_path / "in"
    (inputs / "loops").mkdir(parents=True)
    (inputs / "linked_a.nii.gz").symlink_to(real / "a.nii.gz")  # a linked file
    (inputs / "linked_dir").symlink_to(real / "nested")  # a linked folder
    (inputs / "loops" / "self").symlink_to(".")  # loops: os.walk(followlinks=True) would recurse forever
    (inputs / "loops" / "up").symlink_to("..")
    out = tmp_path / "pre"
    result = cli_subprocess("preprocess", "--covid", inputs, "-o", out, "--grid", GRID, "--no-progress")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["id"] for c in manifest["cases"]] == ["b", "linked_a"]
    assert stored_path(out, manifest["cases"][1]["source"]) == (real / "a.nii.gz").resolve()


# ---------------------------------------------------------------------------------------------
# usage errors: exit 2, nothing written, nothing of the user's touched
# ---------------------------------------------------------------------------------------------


def test_output_folder_equal_to_the_input_is_refused(phantom, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(phantom / "healthy", inputs)
    before = snapshot(inputs)
    result = cli("preprocess", "--covid", inputs, "-o", inputs, "--grid", GRID)
    assert result.exit_code == 2
    error_line(result.stderr, inputs, r"output folder contains the input .*; choose another")
    assert snapshot(inputs) == before

    masks = tmp_path / "masks"
    write_array(masks / "a.nii.gz", np.ones((4, 8, 8), np.uint8), axis_aligned_geometry((4, 8, 8), (1, 1, 1)))
    before = snapshot(masks)
    for args in (
        ["--pred", masks, "--ref", masks, "-o", masks],
        ["--pred", masks, "--ref", masks, "-o", tmp_path],
    ):
        result = cli("evaluate", *args)
        assert result.exit_code == 2
        error_line(result.stderr, args[-1], r"output folder contains the input --pred")
    assert snapshot(masks) == before and not (tmp_path / "summary.json").exists()


def test_existing_outputs_need_overwrite(phantom, tmp_path):
    out = tmp_path / "pre"
    _preprocess_ok(phantom / "healthy", out)
    before = snapshot(out)
    result = cli("preprocess", "--covid", phantom / "healthy", "-o", out, "--grid", GRID)
    assert result.exit_code == 2
    error_line(result.stderr, out, r"holds a previous preprocess output; pass --overwrite")
    assert snapshot(out) == before
    _preprocess_ok(phantom / "healthy", out, "--overwrite")

    ev = tmp_path / "eval"
    args = ("evaluate", "--pred", phantom / "masks", "--ref", phantom / "manifest.json", "-o", ev)
    assert cli(*args).exit_code == 0
    before = snapshot(ev)
    result = cli(*args)
    assert result.exit_code == 2
    error_line(result.stderr, ev, r"holds a previous evaluation report; pass --overwrite")
    assert snapshot(ev) == before
    assert cli(*args, "--overwrite").exit_code == 0


def test_output_that_is_a_file_is_refused(phantom, tmp_path):
    user_file = tmp_path / "notes.txt"
    user_file.write_text("keep me")
    for out in (user_file, user_file / "sub"):
        result = cli("preprocess", "--covid", phantom / "healthy", "-o", out, "--grid", GRID)
        assert result.exit_code == 2
        error_line(result.stderr, out, r"cannot be an output folder: .*notes\.txt is a file")
        result = cli("evaluate", "--pred", phantom / "masks", "--ref", phantom / "masks", "-o", out)
        assert result.exit_code == 2
        error_line(result.stderr, out, r"is a file")
    assert user_file.read_text() == "keep me"


def test_read_only_output_folder_is_refused(phantom, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root may write anyway: make the permission check see what a user would
        real_access = os.access

        def access(path, mode):
            return real_access(path, mode) and not (mode & os.W_OK and Path(path) == locked)

        monkeypatch.setattr(os, "access", access)
    try:
        for out in (locked, locked / "pre"):
            result = cli("preprocess", "--covid", phantom / "healthy", "-o", out, "--grid", GRID)
            assert result.exit_code == 2
            error_line(result.stderr, out, r"cannot write the output: .*locked is not writable")
        result = cli("evaluate", "--pred", phantom / "masks", "--ref", phantom / "masks", "-o", locked)
        assert result.exit_code == 2
        error_line(result.stderr, locked, r"is not writable")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# evaluate: one bad prediction beside a good one -> exit 1, one line, the report still written
# ---------------------------------------------------------------------------------------------

MASK_SHAPE = (6, 16, 16)


def _mask(seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).random(MASK_SHAPE) > 0.7).astype(np.uint8)


def _mask_geometry(spacing=(2.0, 1.0, 1.0), direction=LPS) -> Geometry:
    g = axis_aligned_geometry(MASK_SHAPE, spacing)
    return Geometry(g.size, g.spacing, g.origin, direction)


def pred_truncated(d):
    write_array(d / "b.nii.gz", _mask(1), _mask_geometry())
    data = (d / "b.nii.gz").read_bytes()
    (d / "b.nii.gz").write_bytes(data[: len(data) // 2])
    return d / "b.nii.gz"


def pred_zero_byte(d):
    (d / "b.nii.gz").write_bytes(b"")
    return d / "b.nii.gz"


def pred_text(d):
    (d / "b.nrrd").write_text("not a mask")
    return d / "b.nrrd"


def pred_four_d(d):
    frame = sitk.GetImageFromArray(_mask(1))
    sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(d / "b.nii.gz"))
    return d / "b.nii.gz"


def pred_multichannel(d):
    rgb = np.repeat(_mask(1)[..., None], 3, axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(d / "b.mha"))
    return d / "b.mha"


def pred_nan(d):
    values = _mask(1).astype(np.float32)
    values[0, 0, 0] = np.nan
    write_array(d / "b.nii.gz", values, _mask_geometry())
    return d / "b.nii.gz"


def pred_other_spacing(d):
    write_array(d / "b.nii.gz", _mask(1), _mask_geometry(spacing=(5.0, 1.0, 1.0)))
    return d / "b.nii.gz"


def pred_other_direction(d):
    write_array(d / "b.mha", _mask(1), _mask_geometry(direction=LAS))
    return d / "b.mha"


def pred_other_size(d):
    write_array(
        d / "b.nii.gz", np.zeros((6, 16, 17), np.uint8), axis_aligned_geometry((6, 16, 17), (2, 1, 1))
    )
    return d / "b.nii.gz"


def pred_huge_header(d):
    write_array(d / "b.nii", _mask(1), _mask_geometry(), compress=False)
    data = bytearray((d / "b.nii").read_bytes())
    data[42:48] = np.array([30000, 30000, 30000], np.int16).tobytes()
    (d / "b.nii").write_bytes(bytes(data))
    return d / "b.nii"


BAD_PREDICTIONS = {
    pred_zero_byte: r"empty file \(0 bytes\)",
    pred_truncated: r"truncated",
    pred_text: r"the file is text, not an image",
    pred_four_d: r"4D mask; expected 3D",
    pred_multichannel: r"multi-channel image; expected a label mask",
    pred_nan: r"NaN or infinite",
    pred_other_spacing: r"geometry differs from reference .*b\.nii\.gz: spacing \(1\.0, 1\.0, 5\.0\) != ",
    pred_other_direction: r"geometry differs from reference .*: direction",
    pred_other_size: r"geometry differs from reference .*: size \(17, 16, 6\) != \(16, 16, 6\)",
    pred_huge_header: r"30000 x 30000 x 30000 voxels: too large",
}


@pytest.mark.parametrize("make", BAD_PREDICTIONS, ids=lambda f: f.__name__)
def test_evaluate_bad_prediction_fails_alone(make, tmp_path):
    ref, pred, out = tmp_path / "ref", tmp_path / "pred", tmp_path / "eval"
    for name, seed in (("a", 0), ("b", 1)):
        write_array(ref / f"{name}.nii.gz", _mask(seed), _mask_geometry())
    write_array(pred / "a.nii.gz", _mask(0), _mask_geometry())
    bad = make(pred)
    result = cli("evaluate", "--pred", pred, "--ref", ref, "-o", out)

    assert result.exit_code == 1, result.output
    line = error_line(result.stderr, bad, BAD_PREDICTIONS[make])
    summary = json.loads((out / "summary.json").read_text())  # the report is still written, whole
    assert [c["case_id"] for c in summary["cases"]] == ["a"] and summary["cases"][0]["dice"] == 1.0
    (failure,) = summary["failed_cases"]
    assert failure["case_id"] == "b" and line == f"failed: {failure['error']}"
    assert (out / "metrics.csv").read_text().count("\n") == 2  # header + case a
    assert temp_files(out) == []


def test_evaluate_manifest_pointing_outside_its_folder_is_refused(tmp_path):
    outside = tmp_path / "elsewhere" / "a.nii.gz"
    write_array(outside, _mask(0), _mask_geometry())
    synth = tmp_path / "synth"
    synth.mkdir()
    manifest = {
        "format": "covidseg.synth",
        "version": 1,
        "cases": [{"id": "a", "mask": "../elsewhere/a.nii.gz"}],
    }
    (synth / "manifest.json").write_text(json.dumps(manifest))
    result = cli("evaluate", "--pred", outside.parent, "--ref", synth, "-o", tmp_path / "eval")
    assert result.exit_code == 2
    error_line(result.stderr, synth / "manifest.json", r"path '\.\./elsewhere/a\.nii\.gz' points outside")
    assert not (tmp_path / "eval").exists()


# ---------------------------------------------------------------------------------------------
# work folders: corrupt checkpoints, hand-edited manifests -> exit 1, nothing written or replaced
# ---------------------------------------------------------------------------------------------


class _RunsCode:
    """Pickles to a call of os.system: a checkpoint that would run code on a plain torch.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PK\x03\x04" + np.random.default_rng(3).bytes(2000))
    return path


def test_make_masks_refuses_a_garbage_or_code_running_generator(pre, tmp_path):
    out = tmp_path / "masks"
    garbage = _garbage(tmp_path / "garbage.pt")
    result = cli("make-masks", pre, "--gan", garbage, "-o", out, "--device", "cpu", "--no-progress")
    assert result.exit_code == 1, result.output
    error_line(result.stderr, garbage, r"not a readable covidseg checkpoint")

    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "covidseg.gan.generator", "calibration": _RunsCode(marker)}, evil)
    result = cli("make-masks", pre, "--gan", evil, "-o", out, "--device", "cpu", "--no-progress")
    assert result.exit_code == 1, result.output
    error_line(result.stderr, evil, r"not a readable covidseg checkpoint \(Weights only load failed")
    assert not marker.exists()
    assert not out.exists()


def test_train_gan_resume_refuses_a_corrupt_checkpoint(pre, tmp_path):
    out = tmp_path / "gan"
    checkpoint = _garbage(out / "checkpoint.pt")
    before = snapshot(out)
    args = ("train-gan", pre, "-o", out, "--resume", "--preset", "tiny", "--steps", "2", "--device", "cpu")
    result = cli(*args, "--no-progress")
    assert result.exit_code == 1, result.output
    error_line(result.stderr, checkpoint, r"not a readable covidseg checkpoint")
    assert snapshot(out) == before  # no config.json or metrics.csv, the checkpoint untouched


def _slice_set(folder: Path) -> Path:
    """The smallest make-masks output train-seg accepts (docs/formats.md)."""
    slices = folder / "slices"
    slices.mkdir(parents=True)
    rows = "n,case_id,group,z,set,lesion_fraction\n0,c1,covid,0,high,0.1\n1,c2,covid,0,low,0.0\n"
    (slices / "index.csv").write_text(rows)
    for name, dtype in (
        ("images", np.float32),
        ("lungs", np.uint8),
        ("soft", np.float32),
        ("binary", np.uint8),
    ):
        np.save(slices / f"{name}.npy", np.zeros((2, 32, 32), dtype))
    manifest = {"format": "covidseg.masks", "version": 1, "cases": [], "failed": []}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_train_seg_resume_refuses_a_corrupt_checkpoint(tmp_path):
    masks = _slice_set(tmp_path / "masks")
    out = tmp_path / "seg"
    checkpoint = _garbage(out / "checkpoint.pt")
    before = snapshot(out)
    result = cli(
        "train-seg", masks, "-o", out, "--resume", "--steps", "2", "--device", "cpu", "--no-progress"
    )
    assert result.exit_code == 1, result.output
    error_line(result.stderr, checkpoint, r"not a readable covidseg checkpoint")
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "edit, cause",
    [
        ({"image": "../../outside.npy"}, r"path '\.\./\.\./outside\.npy' points outside"),
        ({"lungs": "/etc/passwd"}, r"path '/etc/passwd' points outside"),
        ({"image": "images/missing.npy"}, r"missing: the work folder is incomplete"),
        ({"image": "config.json"}, r"not a readable \.npy array"),
        ({"image": None}, r"'image' is not a file name"),
    ],
)
def test_hand_edited_preprocess_manifest_is_refused(edit, cause, pre, tmp_path):
    edited = tmp_path / "pre"
    shutil.copytree(pre, edited)
    (tmp_path / "outside.npy").write_bytes((edited / "images" / "healthy_000.npy").read_bytes())
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["cases"][0].update(edit)
    (edited / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "gan"
    result = cli(
        "train-gan", edited, "-o", out, "--preset", "tiny", "--steps", "1", "--device", "cpu", "--no-progress"
    )
    assert result.exit_code == 1, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert re.search(cause, result.stderr) and str(edited) in result.stderr
    assert not out.exists()

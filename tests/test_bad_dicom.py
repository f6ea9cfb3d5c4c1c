"""Hostile and odd DICOM through the real command line: gantry tilt, mixed pixel spacing, multi-frame
files, a header announcing pixels the file does not hold, files named by UID, MONOCHROME1, and two
series of equal length. Series are tiny chest phantoms written slice by slice with SimpleITK (GDCM),
edited byte by byte where GDCM would not write the field asked for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import oblique_direction, save_untrained_segmenter, write_dicom_series
from covidseg.imaging.phantom import make_phantom
from test_bad_inputs import cli, error_line

SHAPE, SPACING = (16, 64, 64), (16.0, 5.6, 5.6)  # a whole chest phantom in 65k voxels
GRID = "8,32,32"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
UID = "1.2.826.0.1.3680043.2.1125.14"


@pytest.fixture(scope="module")
def chest() -> np.ndarray:
    """A chest phantom in HU, int16 [z, y, x]; its lungs are found at GRID."""
    return make_phantom(SHAPE, SPACING, seed=5).hu.astype(np.int16)


def write_series(
    folder: Path,
    hu: np.ndarray,
    positions: np.ndarray | None = None,
    direction: tuple[float, ...] = AXIAL,
    pixel_mm: list[float] | None = None,
    uid: str = UID,
    names: list[str] | None = None,
) -> list[Path]:
    """An axial (or `direction`) CT series, files IM0000.dcm... in slice order (or `names`), rescale
    intercept -1024; `positions` (mm, one row per slice) and `pixel_mm` (per slice) may be anything."""
    return write_dicom_series(
        folder, hu, SPACING, (-150.0, -160.0, -120.0), uid, shuffle_names=False, direction=direction,
        positions=positions, pixel_mm=pixel_mm, names=names,
    )  # fmt: skip


def set_us(path: Path, element: int, value: int) -> None:
    """Set one unsigned short of group 0028 (implicit VR little endian, as GDCM writes here)."""
    data = path.read_bytes()
    tag = b"\x28\x00" + element.to_bytes(2, "little") + b"\x02\x00\x00\x00"
    i = data.index(tag)
    path.write_bytes(data[: i + 8] + value.to_bytes(2, "little") + data[i + 10 :])


def set_text(path: Path, group: int, element: int, text: str) -> None:
    """Overwrite a text element (implicit VR little endian) with `text`, space-padded to its length."""
    data = path.read_bytes()
    i = data.index(group.to_bytes(2, "little") + element.to_bytes(2, "little"))
    length = int.from_bytes(data[i + 4 : i + 8], "little")
    assert len(text) <= length
    path.write_bytes(data[: i + 8] + text.encode().ljust(length) + data[i + 8 + length :])


def multi_frame_file(path: Path, hu: np.ndarray) -> Path:
    """One DICOM file holding all slices as frames (GDCM writes an Enhanced CT, NumberOfFrames)."""
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((SPACING[2], SPACING[1], SPACING[0]))
    for key, value in {"0008|0060": "CT", "0028|1052": "-1024", "0028|1053": "1"}.items():
        image.SetMetaData(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    assert b"\x28\x00\x08\x00" in path.read_bytes()  # NumberOfFrames
    return path


def huge_pixel_header(path: Path) -> Path:
    """A 3 KB DICOM file whose Rows and Columns announce 30000 x 30000 pixels (2048 bytes present)."""
    (written,) = write_series(path.parent / "tmp", np.full((1, 32, 32), -1000, np.int16))
    written.rename(path)
    (path.parent / "tmp").rmdir()
    set_us(path, 0x0010, 30000)
    set_us(path, 0x0011, 30000)
    return path


def to_monochrome1(paths: list[Path]) -> None:
    for path in paths:
        data = path.read_bytes()
        assert data.count(b"MONOCHROME2 ") == 1
        path.write_bytes(data.replace(b"MONOCHROME2 ", b"MONOCHROME1 "))


def tilted_positions(degrees: float) -> np.ndarray:
    """Slice positions of an axial series acquired with the gantry tilted by `degrees`: each slice
    steps SPACING[0] along z and SPACING[0] * tan(tilt) sideways in y."""
    k = np.arange(SHAPE[0])[:, None]
    step = np.array([0.0, SPACING[0] * np.tan(np.radians(degrees)), SPACING[0]])
    return np.array([-150.0, -160.0, -120.0]) + k * step


def preprocess(out: Path, *args) -> tuple[object, dict | None]:
    """`covidseg preprocess -o OUT ARGS` at GRID: the CLI result and the manifest (None if none)."""
    result = cli("preprocess", "-o", out, *args, "--grid", GRID, "--no-progress")
    manifest = out / "manifest.json"
    return result, json.loads(manifest.read_text()) if manifest.exists() else None


# ---------------------------------------------------------------------------------------------
# refused: one line naming the series folder or file, the others in the batch still finish
# ---------------------------------------------------------------------------------------------

BAD_SERIES = {
    "tilt": r"gantry tilt of 20\.0° \(slice positions are not along the slice normal: IM0015\.dcm lies "
    r"87\.4 mm off it\): not supported; resample the series to an orthogonal grid first",
    "spacing": r"slices of one series differ in pixel spacing: 5\.6 x 5\.6 mm in IM0000\.dcm, "
    r"5\.2 x 5\.2 mm in IM0008\.dcm",
    "frames": r"multi-frame DICOM \(16 frames\): per-frame slice positions are not read by covidseg; "
    r"convert the series \(e\.g\. dcm2niix\) first",
    "pixels": r"corrupt DICOM file: header announces 30000 x 30000 pixels \(1800000000 bytes\), "
    r"pixel data holds 2048",
    "mono1_signed12": r"MONOCHROME1 DICOM slice with signed 12-bit values in 16 bits: not supported",
    # GDCM reads a PixelSpacing of 0 as 1 mm and a NaN position as 0 mm: refused from the header text
    "pixel_zero": r"DICOM PixelSpacing '0\\0' is not 2 positive numbers \(mm\)",
    "position_nan": r"DICOM ImagePositionPatient 'nan\\nan\\nan' is not 3 finite numbers",
}


@pytest.fixture(scope="module")
def bad_batch(chest, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A folder with a good series and one bad series (or file) per BAD_SERIES key, in its own folder."""
    root = tmp_path_factory.mktemp("bad") / "scans"
    write_series(root / "good", chest)
    write_series(root / "tilt", chest, positions=tilted_positions(20.0))
    write_series(root / "spacing", chest, pixel_mm=[SPACING[1]] * 8 + [5.2] * 8)
    frames = multi_frame_file(root / "frames" / "volume.dcm", chest)  # the only file of its folder
    write_series(root / "pixels", chest)
    pixels = huge_pixel_header(root / "pixels" / "IM0005.dcm")  # one slice of the series
    signed12 = write_series(root / "mono1_signed12", chest)
    to_monochrome1(signed12)
    for path in signed12:  # signed 12-bit values in 16 bits: GDCM cannot invert them
        set_us(path, 0x0101, 12)
        set_us(path, 0x0102, 11)
    pixel_zero = write_series(root / "pixel_zero", chest)
    for path in pixel_zero:
        set_text(path, 0x0028, 0x0030, "0\\0")
    position_nan = write_series(root / "position_nan", chest)
    set_text(position_nan[3], 0x0020, 0x0032, "nan\\nan\\nan")
    named = {key: root / key for key in BAD_SERIES}
    named.update(frames=frames, pixels=pixels, mono1_signed12=signed12[0])
    named.update(pixel_zero=pixel_zero[0], position_nan=position_nan[3])
    return root, named


def test_preprocess_refuses_each_bad_series_alone(bad_batch, tmp_path):
    root, named = bad_batch
    out = tmp_path / "pre"
    result, manifest = preprocess(out, "--covid", root)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for key, cause in BAD_SERIES.items():
        error_line(result.stderr, named[key], cause)
    assert [c["id"] for c in manifest["cases"]] == ["good"]
    assert sorted(f["id"] for f in manifest["failed"]) == sorted(BAD_SERIES)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_untrained_segmenter(tmp_path_factory.mktemp("model") / "best.pt")


def test_predict_refuses_a_multi_frame_file_and_a_huge_pixel_header_given_as_files(chest, model, tmp_path):
    frames = multi_frame_file(tmp_path / "in" / "volume.dcm", chest)
    pixels = huge_pixel_header(tmp_path / "in2" / "huge.dcm")
    out = tmp_path / "out"
    result = cli("predict", frames, pixels, "-o", out, "--model", model, "--no-progress")
    assert result.exit_code == 1, result.output
    error_line(result.output, frames, BAD_SERIES["frames"])
    error_line(result.output, pixels, BAD_SERIES["pixels"])
    assert not list(out.glob("volume*")) and not list(out.glob("huge*"))


MEASURE = """
import resource, runpy, sys
sys.argv = ["covidseg", *sys.argv[1:]]
try:
    runpy.run_module("covidseg", run_name="__main__")
finally:
    print(f"maxrss_kb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""


def test_a_header_announcing_huge_pixels_is_refused_before_any_allocation(tmp_path):
    """ITK would allocate 1.8 GB of pixels and 7.2 GB of float32 (8.3 GB peak) before failing."""
    pixels = huge_pixel_header(tmp_path / "in" / "huge.dcm")
    command = [sys.executable, "-c", MEASURE, "preprocess", "--covid", pixels, "-o", tmp_path / "pre"]
    result = subprocess.run(command, capture_output=True, encoding="utf-8", timeout=120)
    assert result.returncode == 1, result.stderr
    error_line(result.stderr, pixels, BAD_SERIES["pixels"])
    peak_mb = int(result.stderr.rsplit("maxrss_kb=", 1)[1]) / 1024
    assert peak_mb < 1024  # importing covidseg (torch) is most of it


# ---------------------------------------------------------------------------------------------
# inputs that must work
# ---------------------------------------------------------------------------------------------


def test_files_named_by_uid_without_extension_are_found_in_a_parent_folder(chest, tmp_path):
    names = [f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{100225287222365663678666836860 + k}" for k in range(16)]
    write_series(tmp_path / "scans" / "LIDC-0001" / "1.3.6.1.4.1.14519.5.2.1.6279.6001.1", chest, names=names)
    (tmp_path / "scans" / "LIDC-0001" / "notes.txt").write_text("not an image")
    result, manifest = preprocess(tmp_path / "pre", "--covid", tmp_path / "scans")
    assert result.exit_code == 0, result.output
    (case,) = manifest["cases"]
    assert case["id"] == "1.3.6.1.4.1.14519.5.2.1.6279.6001.1" and case["canonical_shape"] == list(SHAPE)


def test_monochrome1_gives_the_same_hu_as_its_monochrome2_twin(chest, tmp_path):
    write_series(tmp_path / "scans" / "mono2", chest)
    to_monochrome1(write_series(tmp_path / "scans" / "mono1", chest))
    result, manifest = preprocess(tmp_path / "pre", "--covid", tmp_path / "scans")
    assert result.exit_code == 0, result.output
    mono1, mono2 = (np.load(tmp_path / "pre" / "images" / f"{name}.npy") for name in ("mono1", "mono2"))
    np.testing.assert_array_equal(mono1, mono2)
    lungs = {c["id"]: c["lung_ml"] for c in manifest["cases"]}
    assert lungs["mono1"] == lungs["mono2"] > 0


def test_an_oblique_series_with_rounded_positions_is_not_a_gantry_tilt(chest, tmp_path):
    """Slices stepping along an oblique normal work, also when their positions are rounded to 0.01 mm
    and drift sideways by 0.05 mm in all (far below the half pixel of 2.8 mm that is refused)."""
    direction = oblique_direction(12.0)
    normal = np.asarray(direction).reshape(3, 3)[:, 2]
    positions = np.array([-150.0, -160.0, -120.0]) + np.outer(np.arange(SHAPE[0]) * SPACING[0], normal)
    positions[:, 0] += np.linspace(0.0, 0.05, SHAPE[0])
    write_series(tmp_path / "scans" / "oblique", chest, positions=np.round(positions, 2), direction=direction)
    result, manifest = preprocess(tmp_path / "pre", "--covid", tmp_path / "scans")
    assert result.exit_code == 0, result.output
    (case,) = manifest["cases"]
    assert case["lung_ml"] > 1000


def test_two_series_of_equal_length_the_note_says_the_choice_is_arbitrary(chest, tmp_path):
    study = tmp_path / "scans" / "study"
    write_series(study, chest, uid="1.2.826.0.1.3680043.2.1125.7", names=[f"a{k}.dcm" for k in range(16)])
    write_series(study, chest, uid="1.2.826.0.1.3680043.2.1125.8", names=[f"b{k}.dcm" for k in range(16)])
    result, manifest = preprocess(tmp_path / "pre", "--covid", tmp_path / "scans")
    assert result.exit_code == 0, result.output
    (note,) = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert note == (
        "note: study: 2 series with 16 slices each; using 1.2.826.0.1.3680043.2.1125.7 (the first by UID); "
        "choose one with --series"
    )
    assert manifest["cases"][0]["series_uid"] == "1.2.826.0.1.3680043.2.1125.7"

"""Hostile or odd headers and files, through the real command line (issue 14).

Geometry a header gets wrong (a sheared or scaled direction, NIfTI qform/sform rules, implausible
voxel sizes) is either read right or refused with one line: volumes in mL are never silently wrong.
NRRD data shorter than its header is refused before ITK allocates it; named pipes never block
discovery; a DICOM folder given as "." gets its folder's name as case id.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ct_like, oblique_direction, write_dicom_series
from covidseg.imaging.geometry import Geometry, axis_aligned_geometry
from covidseg.io import write_array
from covidseg.stages.synth import run_synth
from test_bad_inputs import (
    GRID,
    SHAPE,
    SPACING,
    assert_failed_alone,
    cli,
    cli_subprocess,
    error_line,
)

#: NIfTI-1 header fields patched below: (byte offset, struct format).
PIXDIM, QFORM_CODE, SFORM_CODE, SROW = (76, "<8f"), (252, "<h"), (254, "<h"), (280, "<12f")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> tuple[Path, np.ndarray, Geometry]:
    """A healthy chest phantom (NIfTI, int16 HU) in which lungs are found at GRID: file, array, geometry."""
    root = tmp_path_factory.mktemp("phantom")
    run_synth(root, n_healthy=1, n_covid=0, seed=11, shape_zyx=SHAPE, spacing_zyx=SPACING)
    path = root / "healthy" / "healthy_000.nii.gz"
    image = sitk.ReadImage(str(path))
    return path, sitk.GetArrayFromImage(image), Geometry.of(image)


def _patch(path: Path, fields: dict) -> None:
    """Overwrite NIfTI-1 header fields ({PIXDIM: (...), QFORM_CODE: (1,)}) of an uncompressed .nii."""
    data = bytearray(path.read_bytes())
    for (offset, fmt), values in fields.items():
        data[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    path.write_bytes(bytes(data))


def _nii(path: Path, array: np.ndarray, geometry: Geometry | None = None, fields: dict | None = None) -> Path:
    """An uncompressed NIfTI (qform_code = sform_code = 1, as ITK writes it), header `fields` patched."""
    write_array(path, array, geometry or axis_aligned_geometry(array.shape, (2.0, 1.0, 1.0)), compress=False)
    _patch(path, fields or {})
    return path


def _header_floats(path: Path, field) -> tuple[float, ...]:
    offset, fmt = field
    return struct.unpack(fmt, path.read_bytes()[offset : offset + struct.calcsize(fmt)])


def _metaimage(path: Path, array: np.ndarray, transform: str, spacing: str = "1 1 2") -> Path:
    z, y, x = array.shape
    header = f"""\
        ObjectType = Image
        NDims = 3
        BinaryData = True
        BinaryDataByteOrderMSB = False
        TransformMatrix = {transform}
        Offset = 0 0 0
        ElementSpacing = {spacing}
        DimSize = {x} {y} {z}
        ElementType = MET_SHORT
        ElementDataFile = LOCAL
        """
    path.write_bytes(textwrap.dedent(header).encode() + array.astype("<i2").tobytes())
    return path


def _nrrd_header(sizes: str, directions: str, encoding: str = "raw", extra: str = "") -> str:
    return (
        f"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: {sizes}\n"
        f"space directions: {directions}\nendian: little\nencoding: {encoding}\n{extra}"
    )


# ---------------------------------------------------------------------------------------------
# preprocess: one bad case beside a good one -> exit 1, one line, no files for the bad case
# ---------------------------------------------------------------------------------------------


def mha_sheared(d):  # ITK keeps a sheared TransformMatrix as the direction: a wrong voxel volume
    return _metaimage(d / "bad.mha", ct_like(), "1 0.5 0 0 1 0 0 0 1")


def mha_scaled(d):
    return _metaimage(d / "bad.mha", ct_like(), "2 0 0 0 1 0 0 0 1")


def nrrd_sheared(d):  # ITK would make the first axis 1.118 mm along a non-perpendicular direction
    array = ct_like()
    header = _nrrd_header("24 20 6", "(1,0.5,0) (0,1,0) (0,0,2)")
    (d / "bad.nrrd").write_bytes((header + "\n").encode() + array.astype("<i2").tobytes())
    return d / "bad.nrrd"


def nifti_forms_disagree(d):  # ITK would take the qform's origin silently
    path = _nii(d / "bad.nii", ct_like())
    srow = list(_header_floats(path, SROW))
    srow[3] += 50.0  # the sform's x offset: 50 mm elsewhere
    _patch(path, {SROW: srow})
    return path


def nifti_sheared_sform(d):
    path = _nii(d / "bad.nii", ct_like(), fields={QFORM_CODE: (0,)})
    srow = list(_header_floats(path, SROW))
    srow[1] = 0.5  # x depends on j: a shear
    _patch(path, {SROW: srow})
    return path


def nifti_zero_pixdim(d):  # ITK would assume 1 mm voxels
    return _nii(
        d / "bad.nii",
        ct_like(),
        fields={PIXDIM: (1, 0, 0, 0, 1, 1, 1, 1), QFORM_CODE: (1,), SFORM_CODE: (0,)},
    )


def nifti_negative_pixdim(d):
    return _nii(d / "bad.nii", ct_like(), fields={PIXDIM: (1, -1, 1, 2, 1, 1, 1, 1), SFORM_CODE: (0,)})


def voxel_1e200(d):  # the voxel volume overflows to inf
    return _metaimage(d / "bad.mha", ct_like(), "1 0 0 0 1 0 0 0 1", spacing="1e200 1e200 1e200")


def voxel_1e_30(d):
    return _metaimage(d / "bad.mha", ct_like(), "1 0 0 0 1 0 0 0 1", spacing="1e-30 1 1")


HUGE = "1200 1200 1400"  # 4 GB of int16 announced


def nrrd_truncated(d):  # 1 kB of data: ITK would allocate 4 GB before noticing
    header = _nrrd_header(HUGE, "(0.7,0,0) (0,0.7,0) (0,0,1)")
    (d / "bad.nrrd").write_bytes((header + "\n").encode() + bytes(1024))
    return d / "bad.nrrd"


def nrrd_truncated_gzip(d):
    header = _nrrd_header(HUGE, "(0.7,0,0) (0,0.7,0) (0,0,1)", encoding="gzip")
    (d / "bad.nrrd").write_bytes((header + "\n").encode() + gzip.compress(bytes(1024)))
    return d / "bad.nrrd"


def nhdr_truncated(d):  # a detached header: the data file's size counts
    (d / "bad.raw").write_bytes(bytes(1024))
    (d / "bad.nhdr").write_text(
        _nrrd_header(HUGE, "(0.7,0,0) (0,0.7,0) (0,0,1)", extra="data file: bad.raw\n")
    )
    return d / "bad.nhdr"


def nhdr_reading_a_device(d):  # /dev/zero would never run short
    (d / "bad.nhdr").write_text(_nrrd_header(HUGE, "(1,0,0) (0,1,0) (0,0,1)", extra="data file: /dev/zero\n"))
    return d / "bad.nhdr"


def nrrd_truncated_ascii(d):
    header = _nrrd_header(HUGE, "(0.7,0,0) (0,0.7,0) (0,0,1)", encoding="ascii")
    (d / "bad.nrrd").write_bytes((header + "\n").encode() + b"-1000 12 40\n" * 50)
    return d / "bad.nrrd"


def nrrd_bzip2(d):  # ITK allocates the image, then finds it has no bzip2
    header = _nrrd_header("24 20 6", "(0.7,0,0) (0,0.7,0) (0,0,1)", encoding="bzip2")
    (d / "bad.nrrd").write_bytes((header + "\n").encode() + bz2.compress(ct_like().astype("<i2").tobytes()))
    return d / "bad.nrrd"


BAD_HEADERS = {
    mha_sheared: r"MetaImage TransformMatrix 1 0\.5 0 0 1 0 0 0 1 is not a rotation \(sheared or scaled",
    mha_scaled: r"MetaImage TransformMatrix 2 0 0 0 1 0 0 0 1 is not a rotation",
    nrrd_sheared: r"NRRD space directions \(1,0\.5,0\) \(0,1,0\) \(0,0,2\) are not perpendicular",
    nifti_forms_disagree: r"invalid NIfTI header: qform and sform disagree: qform origin .* mm, sform origin",
    nifti_sheared_sform: r"invalid NIfTI header: the sform is sheared",
    nifti_zero_pixdim: r"invalid NIfTI header: voxel size pixdim \(0, 0, 0\) mm is not positive, and no",
    nifti_negative_pixdim: r"voxel size pixdim \(-1, 1, 2\) mm is not positive",
    voxel_1e200: r"voxel size 1e\+200 x 1e\+200 x 1e\+200 mm is not plausible for a CT",
    voxel_1e_30: r"voxel size 1e-30 x 1 x 1 mm is not plausible for a CT",
    nrrd_truncated: r"truncated NRRD: 1024 bytes of data, header announces 4032000000$",
    nrrd_truncated_gzip: r"truncated NRRD: 1024 bytes of data, header announces 4032000000$",
    nhdr_truncated: r"truncated NRRD: 1024 bytes of data, header announces 4032000000$",
    nrrd_truncated_ascii: r"truncated NRRD: 600 bytes of ascii data, 2016000000 voxels need 4031999999 at",
    nrrd_bzip2: r"NRRD with bzip2 data: ITK cannot read it; save it as raw or gzip$",
    nhdr_reading_a_device: r"/dev/zero: not a regular file \(a device\)$",
}


@pytest.mark.parametrize("make", BAD_HEADERS, ids=lambda f: f.__name__)
def test_preprocess_refuses_a_bad_header_alone(make, phantom, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(phantom[0], inputs / "good.nii.gz")
    bad = make(inputs)
    out = tmp_path / "pre"
    result = cli("preprocess", "--covid", inputs, "-o", out, "--grid", GRID, "--no-progress")
    named = "/dev/zero" if make is nhdr_reading_a_device else bad
    assert_failed_alone(result, out, named, BAD_HEADERS[make])


def test_truncated_nrrd_is_refused_without_allocating(tmp_path):
    """The refusal costs what importing covidseg costs (~125 MB), not the 4 GB announced (~4 GB before)."""
    bad = nrrd_truncated(tmp_path)
    code = (
        "import resource, sys\nfrom covidseg.io import read_ct\nfrom covidseg.errors import InputError\n"
        f"try:\n    read_ct({str(bad)!r})\nexcept InputError as exc:\n    print(exc)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"  # KiB on Linux
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    message, peak_kib = result.stdout.splitlines()
    assert message.endswith("truncated NRRD: 1024 bytes of data, header announces 4032000000")
    assert int(peak_kib) < 1024 * 1024, f"peak memory {int(peak_kib) / 1024:.0f} MiB"


# ---------------------------------------------------------------------------------------------
# geometry read right where ITK alone would not, and odd but valid grids that must still work
# ---------------------------------------------------------------------------------------------


def _cases(out: Path) -> dict[str, dict]:
    return {c["id"]: c for c in json.loads((out / "manifest.json").read_text())["cases"]}


def test_nifti_voxel_size_follows_the_sform(phantom, tmp_path):
    """pixdim 0 beside a valid sform (ITK: 1 mm voxels), and an sform without qform whose voxel
    size pixdim contradicts (ITK: pixdim): both take the sform's, so lung volumes are right."""
    path, array, geometry = phantom
    inputs = tmp_path / "in"
    reference = _nii(inputs / "reference.nii", array, geometry)
    _nii(inputs / "zero_pixdim.nii", array, geometry, fields={PIXDIM: (1, 0, 0, 0, 1, 1, 1, 1)})
    _nii(
        inputs / "sform_only.nii",
        array,
        geometry,
        fields={PIXDIM: (1, 1, 1, 1, 1, 1, 1, 1), QFORM_CODE: (0,)},
    )
    out = tmp_path / "pre"
    result = cli("preprocess", "--covid", inputs, "-o", out, "--grid", GRID, "--no-progress")
    assert result.exit_code == 0, result.output
    cases = _cases(out)
    expected = Geometry.from_json(cases["reference"]["native_geometry"])
    assert expected.matches(geometry, atol=1e-9) and _header_floats(reference, SFORM_CODE) == (1,)
    for name in ("zero_pixdim", "sform_only"):
        assert Geometry.from_json(cases[name]["native_geometry"]).matches(geometry, atol=1e-4), name
        assert cases[name]["lung_ml"] == pytest.approx(cases["reference"]["lung_ml"], rel=1e-4), name
    assert cases["reference"]["lung_ml"] > 1000


def test_evaluate_reads_a_mask_geometry_from_its_sform(tmp_path):
    """A reference mask with pixdim 0 and a valid sform matches its prediction (before: 1 mm voxels,
    'geometry differs'), and its volume is counted with the sform's 2 mm slices."""
    mask = (np.random.default_rng(0).random((6, 16, 16)) > 0.7).astype(np.uint8)
    geometry = axis_aligned_geometry(mask.shape, (2.0, 1.0, 1.0))
    _nii(tmp_path / "ref" / "a.nii", mask, geometry, fields={PIXDIM: (1, 0, 0, 0, 1, 1, 1, 1)})
    write_array(tmp_path / "pred" / "a.nii.gz", mask, geometry)
    out = tmp_path / "eval"
    result = cli("evaluate", "--pred", tmp_path / "pred", "--ref", tmp_path / "ref", "-o", out)
    assert result.exit_code == 0, result.output
    (case,) = json.loads((out / "summary.json").read_text())["cases"]
    assert case["dice"] == 1.0 and case["ref_ml"] == pytest.approx(mask.sum() * 2.0 / 1000)


def test_oblique_metaimage_with_rounded_rotation_and_scaled_nrrd_directions_work(phantom, tmp_path):
    """A rotation written with four decimals is still a rotation; NRRD direction vectors carry the
    spacing (their length), so a rotated NRRD reads with the same geometry as the MetaImage."""
    _, array, geometry = phantom
    tilted = Geometry(geometry.size, geometry.spacing, (10.0, -20.5, 300.0), oblique_direction(12.0))
    inputs = tmp_path / "in"
    write_array(inputs / "tilted.mha", array, tilted)
    write_array(inputs / "tilted_nrrd.nrrd", array, tilted, compress=False)
    text = (inputs / "tilted.mha").read_bytes()
    line = re.search(rb"TransformMatrix = ([^\n]*)\n", text)
    rounded = " ".join(f"{float(v):.4f}" for v in line.group(1).split()).encode()
    (inputs / "rounded.mha").write_bytes(text.replace(line.group(1), rounded))
    assert b"space directions: (" in (inputs / "tilted_nrrd.nrrd").read_bytes()
    out = tmp_path / "pre"
    result = cli("preprocess", "--covid", inputs, "-o", out, "--grid", GRID, "--no-progress")
    assert result.exit_code == 0, result.output
    cases = _cases(out)
    for name, atol in (("tilted", 1e-9), ("tilted_nrrd", 1e-9), ("rounded", 1e-4)):
        assert Geometry.from_json(cases[name]["native_geometry"]).matches(tilted, atol=atol), name
        assert cases[name]["lung_ml"] == pytest.approx(cases["tilted"]["lung_ml"], rel=1e-6), name
    assert cases["tilted"]["lung_ml"] > 1000


# ---------------------------------------------------------------------------------------------
# named pipes (FIFOs) never block discovery or reading; "." as a DICOM folder
# ---------------------------------------------------------------------------------------------


def test_named_pipes_are_skipped_in_folders_and_refused_as_inputs(tmp_path):
    """In a folder, a named pipe is skipped without being opened (discovery opened a file without
    a suffix to look for DICOM magic, and hung); given as an input, or inside a DICOM series folder
    (GDCM stops listing the folder there, losing the slices after it), it is refused in one line."""
    inputs = tmp_path / "in"
    series = inputs / "series"
    write_dicom_series(series, ct_like((6, 16, 16)))
    os.mkfifo(series / "README")
    os.mkfifo(inputs / "README")
    os.mkfifo(inputs / "x.nii.gz")
    pipe = tmp_path / "pipe.nii.gz"
    os.mkfifo(pipe)
    out = tmp_path / "pre"
    result = cli_subprocess("preprocess", "--covid", inputs, "--healthy", pipe, "-o", out, "--no-progress")
    assert result.returncode == 1, result.stderr
    error_line(result.stderr, pipe, r"not a regular file \(a named pipe\)$")
    error_line(
        result.stderr, series, r"README is a named pipe: GDCM would stop listing the DICOM slices there"
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(c["id"] for c in manifest["failed"]) == ["pipe", "series"] and manifest["cases"] == []


def test_named_pipes_beside_masks_do_not_block_evaluate(tmp_path):
    mask = (np.random.default_rng(0).random((6, 16, 16)) > 0.7).astype(np.uint8)
    geometry = axis_aligned_geometry(mask.shape, (2.0, 1.0, 1.0))
    for folder in ("ref", "pred"):
        write_array(tmp_path / folder / "a.nii.gz", mask, geometry)
        os.mkfifo(tmp_path / folder / "README")
    os.mkfifo(tmp_path / "pred" / "b.nii.gz")
    write_array(tmp_path / "ref" / "b.nii.gz", mask, geometry)
    result = cli_subprocess(
        "evaluate", "--pred", tmp_path / "pred", "--ref", tmp_path / "ref", "-o", tmp_path / "e"
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert [c["case_id"] for c in summary["cases"]] == ["a"]

    pipe = tmp_path / "pred" / "b.nii.gz"  # given directly: one failed case
    result = cli_subprocess(
        "evaluate", "--pred", pipe, "--ref", tmp_path / "ref" / "b.nii.gz", "-o", tmp_path / "e2"
    )
    assert result.returncode == 1, result.stderr
    error_line(result.stderr, pipe, r"not a regular file \(a named pipe\)$")


def test_dicom_folder_given_as_dot_is_named_after_the_folder(phantom, tmp_path):
    _, array, _ = phantom
    series = tmp_path / "chest_ct"
    write_dicom_series(series, array, spacing_zyx=SPACING)
    result = cli_subprocess(
        "preprocess", "--covid", ".", "-o", "../out", "--grid", GRID, "--no-progress", cwd=series
    )
    assert result.returncode == 0, result.stderr
    assert list(_cases(tmp_path / "out")) == ["chest_ct"]
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["chest_ct.npy"]

"""Property-based tests: parsers and readers fed random or mutated input either succeed or raise one
of our one-line errors (CovidsegError; ValueError for the option parser), never a raw exception.

Examples are few and small so the file runs in seconds; every reader call works on files of at most
a few kB, so a bug that reads "to the end" cannot hang here.
"""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import LPS, ct_like, write_dicom_series
from covidseg.errors import CovidsegError
from covidseg.imaging.geometry import Geometry
from covidseg.imaging.intensity import IntensityMapping, parse_intensity
from covidseg.io import read_ct, read_mask, write_array
from covidseg.stages._workdir import load_grid_cases, read_manifest
from covidseg.stages.evaluate import _references

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GEOMETRY = Geometry(size=(12, 10, 4), spacing=(0.75, 0.8, 2.5), origin=(-5.0, 3.0, 10.0), direction=LPS)
SUFFIXES = [".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".dcm", ".png", ""]


@pytest.fixture(scope="module")
def scratch() -> Path:
    with tempfile.TemporaryDirectory(prefix="covidseg-fuzz-") as folder:
        yield Path(folder)


def one_line(exc: Exception) -> None:
    text = str(exc)
    assert text and "\n" not in text, repr(text)


def check_read(path: Path) -> None:
    """read_ct and read_mask either succeed with a sane result or raise CovidsegError."""
    try:
        volume, note = read_ct(path)
    except CovidsegError as exc:
        one_line(exc)
    else:
        assert volume.hu.ndim == 3 and volume.hu.dtype == np.float32 and np.isfinite(volume.hu).all()
        assert all(np.isfinite(s) and s > 0 for s in volume.spacing_zyx), volume.spacing_zyx
        assert np.isfinite(volume.geometry.origin).all() and np.isfinite(volume.geometry.direction).all()
    try:
        mask, geometry = read_mask(path)
    except CovidsegError as exc:
        one_line(exc)
    else:
        assert mask.dtype == bool and mask.shape == geometry.shape_zyx


# ---------------------------------------------------------------------------------------------
# --intensity
# ---------------------------------------------------------------------------------------------


def check_intensity(spec: str) -> IntensityMapping | None:
    try:
        mapping = parse_intensity(spec)
    except ValueError as exc:  # the CLI turns it into a usage error (exit 2)
        assert str(exc).startswith("intensity mapping ")
        one_line(exc)
        return None
    assert np.isfinite(mapping.slope) and mapping.slope != 0 and np.isfinite(mapping.intercept)
    assert np.isfinite(mapping.apply(np.array([0, 255], np.uint8))).all()
    return mapping


@FUZZ
@given(st.text(max_size=40))
def test_intensity_parser_on_random_text(spec):
    check_intensity(spec)


NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**40), 10**40).map(str),
    st.sampled_from(["", " ", "1e", "--1", "0x10", "1_000", "nan", "-inf", "1,2"]),
)


@FUZZ
@given(st.sampled_from(["window", "linear", "Window", " linear ", "win", ""]), NUMBER, NUMBER)
def test_intensity_parser_on_near_valid_specs(kind, a, b):
    mapping = check_intensity(f"{kind}:{a},{b}")
    if mapping is not None and kind.strip().lower() == "window":
        lo, hi = mapping.apply(np.array([0, 255], np.uint8))
        tolerance = 1e-6 * (abs(float(a)) + abs(float(b))) + 1e-3  # float32 arithmetic
        assert abs(lo - float(a)) <= tolerance and abs(hi - float(b)) <= tolerance


# ---------------------------------------------------------------------------------------------
# manifests
# ---------------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
PATHS = st.sampled_from(
    [
        "images/a.npy",
        "lungs/a.npy",
        "../x.npy",
        "/etc/passwd",
        "",
        ".",
        "images",
        "a\0b",
        "images/../lungs/a.npy",
    ]
)
RECORD_VALUES = st.one_of(JSON, PATHS)


@pytest.fixture(scope="module")
def grid_folder(scratch) -> tuple[Path, dict]:
    """A valid preprocess output with one case of [4, 8, 8] arrays."""
    folder = scratch / "pre"
    for sub, dtype in (("images", np.float32), ("lungs", np.uint8)):
        (folder / sub).mkdir(parents=True)
        np.save(folder / sub / "a.npy", np.zeros((4, 8, 8), dtype))
    record = {"id": "a", "group": "healthy", "image": "images/a.npy", "lungs": "lungs/a.npy", "ref": None}
    manifest = {
        "format": "covidseg.preprocess",
        "version": 1,
        "config": {},
        "cases": [record],
        "failed": [],
    }
    return folder, manifest


def _write_manifest(folder: Path, content) -> None:
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    (folder / "manifest.json").write_bytes(data)


@FUZZ
@given(st.one_of(st.binary(max_size=300), JSON.map(lambda v: json.dumps(v).encode())))
def test_read_manifest_on_random_content(grid_folder, content):
    folder, _ = grid_folder
    _write_manifest(folder, content)
    try:
        manifest = read_manifest(folder, "covidseg.preprocess")
    except CovidsegError as exc:
        one_line(exc)
    else:
        assert manifest["format"] == "covidseg.preprocess" and isinstance(manifest.get("cases", []), list)


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["format", "version", "cases"]), JSON, max_size=2),
    st.dictionaries(st.sampled_from(["id", "group", "image", "lungs", "ref"]), RECORD_VALUES, max_size=3),
    st.lists(st.sampled_from(["id", "group", "image", "lungs", "ref"]), max_size=2),
)
def test_load_grid_cases_on_mutated_manifests(grid_folder, top, record_changes, record_deletions):
    folder, valid = grid_folder
    record = {**valid["cases"][0], **record_changes}
    for key in record_deletions:
        record.pop(key, None)
    _write_manifest(folder, {**valid, "cases": [record], **top})
    try:
        cases = load_grid_cases(folder)
    except CovidsegError as exc:
        one_line(exc)
    else:
        for case in cases:
            assert case.image.shape == case.lungs.shape and case.image.ndim == 3
            assert (folder / case.record["image"]).resolve().is_relative_to(folder.resolve())


@FUZZ
@given(
    st.sampled_from([None, "covidseg.synth", "covidseg.preprocess", 7]),
    st.lists(
        st.one_of(
            JSON,
            st.fixed_dictionaries(
                {"id": st.one_of(st.text(max_size=4), st.integers(), JSON)},
                optional={"mask": RECORD_VALUES, "mask_source": RECORD_VALUES},
            ),
        ),
        max_size=4,
    ),
)
def test_evaluate_reference_manifest_on_random_cases(scratch, fmt, cases):
    folder = scratch / "synth"
    folder.mkdir(exist_ok=True)
    _write_manifest(folder, {"format": fmt, "cases": cases})
    for ref in (folder, folder / "manifest.json"):
        try:
            references = _references(ref)
        except CovidsegError as exc:
            one_line(exc)
        else:
            assert all(isinstance(i, str) and isinstance(p, Path) for i, p in references)
            if fmt != "covidseg.preprocess":  # synth manifests name masks inside their folder
                assert all(p.resolve().is_relative_to(folder.resolve()) for _, p in references)


@FUZZ
@given(st.binary(max_size=400))
def test_evaluate_reference_manifest_on_random_bytes(scratch, content):
    folder = scratch / "synth_bytes"
    folder.mkdir(exist_ok=True)
    _write_manifest(folder, content)
    try:
        _references(folder / "manifest.json")
    except CovidsegError as exc:
        one_line(exc)


def test_deeply_nested_manifest_is_refused(grid_folder, scratch):
    folder, _ = grid_folder
    _write_manifest(folder, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(CovidsegError, match="unreadable manifest"):
        read_manifest(folder, "covidseg.preprocess")
    with pytest.raises(CovidsegError, match="cannot read manifest"):
        _references(folder / "manifest.json")


# ---------------------------------------------------------------------------------------------
# image readers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_files(scratch) -> dict[str, bytes]:
    """Small valid CT files of every format, as bytes."""
    files = {}
    folder = scratch / "valid"
    for suffix in (".nii", ".nii.gz", ".mha", ".nrrd"):
        write_array(folder / f"ct{suffix}", ct_like((4, 10, 12)), GEOMETRY, compress=suffix == ".nii.gz")
        files[suffix] = (folder / f"ct{suffix}").read_bytes()
    (dicom,) = write_dicom_series(folder / "dicom", ct_like((1, 10, 12)))
    files[".dcm"] = dicom.read_bytes()
    return files


@FUZZ
@given(st.binary(max_size=2000), st.sampled_from(SUFFIXES))
def test_readers_on_random_bytes(scratch, data, suffix):
    path = scratch / f"random{suffix or '_noext'}"
    path.write_bytes(data)
    check_read(path)


MUTATION = st.one_of(
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
    ),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("insert"), st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=16))),
)


def mutate(data: bytes, mutation) -> bytes:
    kind, arg = mutation
    data = bytearray(data)
    if kind == "flip":
        for position, value in arg:
            data[position % len(data)] = value
    elif kind == "truncate":
        del data[arg % len(data) :]
    else:
        position, extra = arg
        data[position % len(data) : position % len(data)] = extra
    return bytes(data)


@FUZZ
@given(st.sampled_from([".nii", ".nii.gz", ".mha", ".nrrd", ".dcm"]), MUTATION, st.booleans())
def test_readers_on_mutated_files(scratch, valid_files, suffix, mutation, in_header):
    data = valid_files[suffix]
    if suffix == ".nii.gz":  # mutate the NIfTI inside (compressed bytes would only fail the CRC)
        data = gzip.compress(mutate(gzip.decompress(data), _in_header(mutation, 352, in_header)))
    else:
        header = {".nii": 352, ".mha": data.find(b"LOCAL") + 6, ".nrrd": data.find(b"\n\n") + 2}.get(
            suffix, 1024
        )
        data = mutate(data, _in_header(mutation, header, in_header))
    path = scratch / f"mutated{suffix}"
    path.write_bytes(data)
    check_read(path)


def _in_header(mutation, header_bytes: int, in_header: bool):
    """Keep flips and insertions inside the header when `in_header` (most findings are there)."""
    kind, arg = mutation
    if not in_header or kind == "truncate":
        return mutation
    if kind == "flip":
        return kind, [(p % header_bytes, v) for p, v in arg]
    return kind, (arg[0] % header_bytes, arg[1])


FLOAT32 = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1.0, 1e-30, 1e30])
)


@FUZZ
@given(
    dims=st.lists(st.integers(-3, 40), min_size=8, max_size=8),
    datatype=st.sampled_from([2, 4, 8, 16, 64, 128, 256, 512, 768, 2304, 0, 1, 7, 32767]),
    bitpix=st.sampled_from([8, 16, 32, 64, 0, -8, 24]),
    pixdim=st.lists(FLOAT32, min_size=8, max_size=8),
    vox_offset=st.one_of(st.sampled_from([352.0, 348.0, 0.0, 1e12]), FLOAT32),
    scaling=st.tuples(FLOAT32, FLOAT32),
    codes=st.tuples(st.integers(-1, 5), st.integers(-1, 5)),
    quatern=st.lists(FLOAT32, min_size=6, max_size=6),
    srow=st.lists(FLOAT32, min_size=12, max_size=12),
    body=st.binary(max_size=3000),
    compress=st.booleans(),
)
def test_readers_on_random_nifti_headers(
    scratch, dims, datatype, bitpix, pixdim, vox_offset, scaling, codes, quatern, srow, body, compress
):
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, *dims)
    struct.pack_into("<2h", header, 70, datatype, bitpix)
    struct.pack_into("<8f", header, 76, *pixdim)
    struct.pack_into("<f", header, 108, vox_offset)
    struct.pack_into("<2f", header, 112, *scaling)
    struct.pack_into("<2h", header, 252, *codes)
    struct.pack_into("<6f", header, 256, *quatern)
    struct.pack_into("<12f", header, 280, *srow)
    header[344:348] = b"n+1\0"
    data = bytes(header) + b"\0" * 4 + body
    path = scratch / ("header.nii.gz" if compress else "header.nii")
    path.write_bytes(gzip.compress(data) if compress else data)
    check_read(path)


@FUZZ
@given(
    ndims=st.integers(0, 5),
    dims=st.lists(st.integers(-2, 30), min_size=0, max_size=5),
    spacing=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(0.0)), max_size=5),
    matrix=st.one_of(st.none(), st.lists(st.floats(-2, 2) | st.just(float("nan")), min_size=9, max_size=9)),
    element=st.sampled_from(
        ["MET_SHORT", "MET_UCHAR", "MET_FLOAT", "MET_DOUBLE", "MET_LONG", "MET_NONE", "short"]
    ),
    channels=st.sampled_from([None, 0, 1, 3, -1]),
    compressed=st.booleans(),
    body=st.binary(max_size=3000),
)
def test_readers_on_random_metaimage_headers(
    scratch, ndims, dims, spacing, matrix, element, channels, compressed, body
):
    lines = ["ObjectType = Image", f"NDims = {ndims}", f"DimSize = {' '.join(map(str, dims))}"]
    if spacing:
        lines.append(f"ElementSpacing = {' '.join(map(repr, spacing))}")
    if matrix is not None:
        lines.append(f"TransformMatrix = {' '.join(map(repr, matrix))}")
    if channels is not None:
        lines.append(f"ElementNumberOfChannels = {channels}")
    lines += [f"CompressedData = {compressed}", f"ElementType = {element}", "ElementDataFile = LOCAL"]
    path = scratch / "header.mha"
    path.write_bytes(("\n".join(lines) + "\n").encode() + body)
    check_read(path)


@settings(FUZZ, max_examples=20)  # each example writes and reads a 4-file series
@given(MUTATION, st.integers(0, 3))
def test_dicom_folder_with_one_mutated_slice(scratch, mutation, which):
    folder = scratch / "series"
    if not folder.exists():
        write_dicom_series(folder, ct_like((4, 10, 12)), shuffle_names=False)
        for path in folder.iterdir():
            (scratch / f"clean_{path.name}").write_bytes(path.read_bytes())
    for index, path in enumerate(sorted(folder.iterdir())):
        clean = (scratch / f"clean_{path.name}").read_bytes()
        path.write_bytes(mutate(clean, _in_header(mutation, 1024, True)) if index == which else clean)
    try:
        volume, _ = read_ct(folder)
    except CovidsegError as exc:
        one_line(exc)
    else:
        assert volume.hu.shape[1:] == (10, 12) and np.isfinite(volume.hu).all()


def _nifti(srow_z_x: float = 0.0, datatype: int = 2, bitpix: int = 8, scaling=(0.0, 0.0)) -> bytes:
    """A 12 x 10 x 4 NIfTI-1 file with its data, valid unless the arguments say otherwise."""
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, 12, 10, 4, 1, 1, 1, 1)
    struct.pack_into("<2h", header, 70, datatype, bitpix)
    struct.pack_into("<8f", header, 76, 1.0, 1.0, 1.0, 2.5, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<3f", header, 108, 352.0, *scaling)  # vox_offset, scl_slope, scl_inter
    struct.pack_into("<2h", header, 252, 0, 1)  # sform only
    struct.pack_into("<12f", header, 280, 1, 0, 0, 0, 0, 1, 0, 0, srow_z_x, 0, 2.5, 0)
    header[344:348] = b"n+1\0"
    return bytes(header) + bytes(4) + bytes(12 * 10 * 4 * max(bitpix, 8) // 8)


def test_nifti_headers_that_hung_or_crashed_itk_are_refused_first(scratch):
    """Found by the fuzzing above: ITK's NIfTI reader loops forever on non-finite orientation fields
    and scales RGB(A) voxels past the end of its buffer (a segfault on larger images). Run in a
    subprocess with a timeout, so a regression fails instead of hanging or killing the test run."""
    files = {
        "inf_srow.nii": _nifti(srow_z_x=float("inf")),
        "rgba_scaled.nii": _nifti(datatype=2304, bitpix=32, scaling=(6.0, 9637.0)),
        "bitpix.nii": _nifti(bitpix=0),
        "valid.nii": _nifti(scaling=(1.0, -1024.0)),
    }
    for name, data in files.items():
        (scratch / name).write_bytes(data)
    script = (
        "import sys\n"
        "from covidseg.io import read_mask\n"
        "from covidseg.errors import CovidsegError\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        print('read', read_mask(name)[0].shape)\n"
        "    except CovidsegError as exc:\n"
        "        print('refused', exc.cause)\n"
    )
    names = [str(scratch / name) for name in files]
    result = subprocess.run(
        [sys.executable, "-c", script, *names], capture_output=True, encoding="utf-8", timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "refused invalid NIfTI header: NaN or infinite voxel size or orientation",
        "refused invalid NIfTI header: intensity scaling (scl_slope) on a colour image",
        "refused invalid NIfTI header: bitpix 0 does not match datatype 2",
        "read (4, 10, 12)",
    ]

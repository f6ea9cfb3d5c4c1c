"""DICOM series and files: header checks before GDCM reads (lengths, pixel data, geometry tags,
slice grid, gantry tilt, multi-frame), MONOCHROME1, series choice, the identifiers kept on request."""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from covidseg.errors import InputError
from covidseg.io.discover import is_dicom_file, special_kind
from covidseg.io.headers import MAX_VOXELS, check_header, unreadable_cause

#: DICOM slice gaps may differ from the median gap by this fraction (or SLICE_GAP_MIN_MM) at most.
SLICE_GAP_TOLERANCE = 0.01


#: DICOM slices closer than this (mm) are duplicates.
SLICE_GAP_MIN_MM = 0.01


#: The only DICOM header fields covidseg ever copies into an output (``predict --keep-metadata``).
DICOM_IDENTIFIERS = {
    "PatientName": "0010|0010",
    "PatientID": "0010|0020",
    "StudyInstanceUID": "0020|000d",
    "SeriesInstanceUID": "0020|000e",
    "StudyDate": "0008|0020",
    "AccessionNumber": "0008|0050",
}


def list_dicom_series(folder: str | Path) -> dict[str, list[str]]:
    """Series UID -> file names sorted by slice position (GDCM), for a DICOM folder.

    A folder holding a named pipe, socket or device is refused: GDCM stops listing a folder at
    the first one, so the slices after it (in directory order) would be lost without a word."""
    for name in sorted(os.listdir(folder)):
        kind = special_kind(Path(folder) / name)
        if kind is not None:
            cause = f"{name} is {kind}: GDCM would stop listing the DICOM slices there; move it out"
            raise InputError(folder, cause)
    folder = str(folder)
    series = {}
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)
        if files:
            series[uid] = list(files)
    return series


#: Explicit-VR value representations with a 4-byte length (DICOM PS3.5 7.1.2); GDCM reads one for
#: an unknown VR too.
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


_IMPLICIT_LE, _EXPLICIT_BE, _DEFLATED = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"


#: The top-level image pixel module elements (group 0028) that size the native Pixel Data.
_PIXEL_SIZE_ELEMENTS = {
    0x0002: "samples", 0x0008: "frames", 0x0010: "rows", 0x0011: "columns", 0x0100: "bits"
}  # fmt: skip


def _check_dicom_lengths(path: Path) -> None:
    """Refuse a DICOM file whose elements announce more bytes than the file holds, or whose
    native Pixel Data holds fewer bytes than its Rows x Columns x frames x samples x bits announce.

    GDCM allocates an element's announced length (up to 4 GB) before noticing the file is shorter,
    already while scanning a folder for series; a single corrupted length field (found by
    tests/test_fuzz.py) would cost gigabytes of memory. Likewise ITK allocates the image the header
    announces (30000 x 30000 pixels: 8 GB as float32) before finding that the pixels are missing.
    Encapsulated (compressed) pixel data, of undefined length, is not sized.
    """
    with open(path, "rb") as fh:
        try:
            data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            return
    with data:
        n = len(data)
        pos = 132 if data[128:132] == b"DICM" else 0
        order, explicit, in_meta = "little", True, data[pos : pos + 2] == b"\x02\x00"
        syntax, depth, pixel_size = "", 0, {}  # depth: inside how many undefined-length values
        while pos + 8 <= n:
            if in_meta and data[pos : pos + 2] != b"\x02\x00":  # the dataset starts: its transfer syntax
                in_meta = False
                if syntax == _DEFLATED:
                    return
                order = "big" if syntax == _EXPLICIT_BE else "little"
                explicit = syntax != _IMPLICIT_LE
            group = int.from_bytes(data[pos : pos + 2], order)
            element = int.from_bytes(data[pos + 2 : pos + 4], order)
            vr = data[pos + 4 : pos + 6]
            if group == 0xFFFE:  # item or delimiter: no VR, a 4-byte length
                length, header = int.from_bytes(data[pos + 4 : pos + 8], order), 8
            elif explicit and (vr in _LONG_VRS or not (vr.isalpha() and vr.isupper())):
                length, header = int.from_bytes(data[pos + 8 : pos + 12], order), 12
            elif explicit:
                length, header = int.from_bytes(data[pos + 6 : pos + 8], order), 8
            else:
                length, header = int.from_bytes(data[pos + 4 : pos + 8], order), 8
            if length != 0xFFFFFFFF and pos + header + length > n:
                raise InputError(
                    path,
                    f"corrupt DICOM file: element ({group:04X},{element:04X}) announces {length} bytes, "
                    f"the file has {max(n - pos - header, 0)} left",
                )
            if in_meta and (group, element) == (0x0002, 0x0010):
                syntax = data[pos + header : pos + header + length].rstrip(b"\0 ").decode("ascii", "replace")
            elif depth == 0 and group == 0x0028 and element in _PIXEL_SIZE_ELEMENTS and length < 16:
                value = data[pos + header : pos + header + length]
                pixel_size[_PIXEL_SIZE_ELEMENTS[element]] = _dicom_number(value, order, element == 0x0008)
            elif depth == 0 and (group, element) == (0x7FE0, 0x0010) and length != 0xFFFFFFFF:
                _check_pixel_data_length(path, pixel_size, length)
            if group == 0xFFFE and element in (0xE00D, 0xE0DD):  # item / sequence delimiter
                depth = max(depth - 1, 0)
            elif length == 0xFFFFFFFF:
                depth += 1
            # into undefined-length values (sequences, compressed pixel data), over all others, items
            # included (an item of compressed pixel data holds bytes, not elements)
            pos += header if length == 0xFFFFFFFF else header + length


def _dicom_number(value: bytes, order: str, is_string: bool) -> int | None:
    """An unsigned short (US) or integer string (IS) element value; None when it cannot be read."""
    if is_string:
        try:
            return int(value.rstrip(b"\0 ").strip() or b"1")
        except ValueError:
            return None
    return int.from_bytes(value, order) if len(value) == 2 else None


def _check_pixel_data_length(path: Path, size: dict[str, int | None], length: int) -> None:
    """Refuse native Pixel Data of `length` bytes shorter than the image pixel module announces."""
    rows, columns, bits = size.get("rows"), size.get("columns"), size.get("bits")
    if not (rows and columns and bits):
        return  # no image, or a header GDCM refuses itself
    frames, samples = max(size.get("frames") or 1, 1), max(size.get("samples") or 1, 1)
    expected = (rows * columns * frames * samples * bits + 7) // 8
    if length < expected:
        what = f"{frames} frames of {columns} x {rows}" if frames > 1 else f"{columns} x {rows}"
        announced = f"header announces {what} pixels ({expected} bytes)"
        raise InputError(path, f"corrupt DICOM file: {announced}, pixel data holds {length}")


def read_dicom_folder(folder: Path, series: str | None) -> tuple[sitk.Image, str, str | None, list[str]]:
    """Read one series of a DICOM folder: `series` or the one with most slices.

    Returns the image, the series UID, an optional note and the series' files in the image's slice
    order (file k is slice k of the image's array, [z, y, x])."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and is_dicom_file(path):
            _check_dicom_lengths(path)
    all_series = list_dicom_series(folder)
    if not all_series:
        raise InputError(folder, "no readable DICOM series in this folder")
    if series is not None:
        if series not in all_series:
            raise InputError(folder, f"series {series} not found (have: {', '.join(sorted(all_series))})")
        uid = series
        note = None
    else:
        uid = max(sorted(all_series), key=lambda u: len(all_series[u]))
        note = _series_choice_note(all_series, uid)
    try:
        reflections = _check_dicom_slices(folder, all_series[uid])
    except InputError as exc:
        listed = {os.path.realpath(f) for files in all_series.values() for f in files}
        skipped = sorted(
            p.name for p in folder.iterdir() if is_dicom_file(p) and os.path.realpath(p) not in listed
        )
        if not skipped:
            raise
        names = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        raise InputError(exc.path, f"{exc.cause}; {len(skipped)} unreadable DICOM file(s): {names}") from None
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(all_series[uid])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    reader.SetSpacingWarningRelThreshold(SLICE_GAP_TOLERANCE)  # checked above, with a clear message
    try:
        image = reader.Execute()
    except RuntimeError:
        raise InputError(folder, f"unreadable DICOM series {uid}: a slice is truncated or corrupt") from None
    return _undo_monochrome1(image, reflections), uid, note, list(all_series[uid])


def _series_choice_note(all_series: dict[str, list[str]], uid: str) -> str | None:
    """What the user is told when a folder holds several series and `uid`, one with most slices, is
    read; when several have that many slices the choice is arbitrary, and the note says so."""
    if len(all_series) < 2:
        return None
    n = len(all_series[uid])
    tied = sum(len(files) == n for files in all_series.values())
    if tied == 1:
        return f"{len(all_series)} series found; using {uid} ({n} slices)"
    found = f"{tied} series" if tied == len(all_series) else f"{len(all_series)} series found, {tied}"
    return f"{found} with {n} slices each; using {uid} (the first by UID); choose one with --series"


def dicom_identifiers(path: str | Path) -> dict[str, str]:
    """The :data:`DICOM_IDENTIFIERS` present in the header of the DICOM file `path` (values stripped)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(path, "unreadable DICOM file: truncated or corrupt") from None
    return {
        name: reader.GetMetaData(tag).strip(" \x00")
        for name, tag in DICOM_IDENTIFIERS.items()
        if reader.HasMetaDataKey(tag)
    }


#: Slices of one series whose pixel spacings differ by more than this fraction are refused (at 512
#: pixels the last one would be 0.05 pixel off); spacings written by one scanner are identical.
PIXEL_SPACING_TOLERANCE = 1e-4


#: A slice lying further than this many pixels sideways off the slice normal through the first slice
#: (gantry tilt) would be misplaced by that much in a grid of stacked slices: the series is refused.
#: Position rounding in real series (0.01 mm or less) stays far below it; a 20° tilt of 2.5 mm slices
#: is 0.9 mm off after one slice.
TILT_MAX_PIXELS = 0.5


MULTI_FRAME = "per-frame slice positions are not read by covidseg; convert the series (e.g. dcm2niix) first"


def _check_dicom_slices(folder: Path, files: list[str]) -> list[float | None]:
    """Refuse a series that would be read with a wrong geometry or is too large, reading headers only.

    Each file must be one frame (GDCM stacks the frames of a multi-frame file at a spacing it does
    not check). Slices must share one size, pixel spacing and orientation, and lie at distinct,
    evenly spaced positions along the slice normal (a missing slice would otherwise be averaged into
    the spacing silently, a gantry tilt read as an orthogonal grid). Returns, per file, the
    MONOCHROME1 reflection of :func:`_monochrome1_reflection` (None: MONOCHROME2).
    """
    reader = sitk.ImageFileReader()
    origins, directions, sizes, spacings, reflections = [], [], [], [], []
    for name in files:
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise InputError(name, "unreadable DICOM file: truncated or corrupt") from None
        if len(files) > 1 and not reader.HasMetaDataKey("0020|0032"):
            raise InputError(name, "DICOM slice without ImagePositionPatient: slices cannot be placed")
        size = tuple(reader.GetSize())
        if len(size) > 2 and size[2] > 1:
            raise InputError(name, f"multi-frame DICOM ({size[2]} frames): {MULTI_FRAME}")
        _check_geometry_tags(name, reader)
        origins.append(reader.GetOrigin())
        directions.append(reader.GetDirection())
        sizes.append(size)
        spacings.append(reader.GetSpacing()[:2])
        reflections.append(_monochrome1_reflection(name, reader))
    n_voxels = sum(float(np.prod(size, dtype=np.float64)) for size in sizes)
    if n_voxels > MAX_VOXELS:
        raise InputError(folder, f"DICOM series of {len(files)} files has {n_voxels:.3g} voxels: too large")
    if len(files) > 1:
        _check_slice_grid(folder, [Path(f).name for f in files], origins, directions, sizes, spacings)
    return reflections


#: DICOM geometry tags as GDCM needs them: (tag, name, number of values, values must be > 0).
#: GDCM reads a PixelSpacing of 0\\0 as 1 mm, NaN as an uninitialised number, a NaN position as
#: 0 mm: each would place or size the pixels silently wrong.
_GEOMETRY_TAGS = (
    ("0028|0030", "PixelSpacing", 2, True),
    ("0020|0032", "ImagePositionPatient", 3, False),
    ("0020|0037", "ImageOrientationPatient", 6, False),
)


def _check_geometry_tags(name: str, reader: sitk.ImageFileReader) -> None:
    """Refuse a DICOM slice (header in `reader`) whose geometry tags are not finite numbers (mm,
    direction cosines) or whose PixelSpacing is missing or not positive."""
    for tag, what, count, positive in _GEOMETRY_TAGS:
        if not reader.HasMetaDataKey(tag):
            if positive:
                raise InputError(name, f"DICOM slice without {what}: the pixel size is unknown")
            continue
        text = reader.GetMetaData(tag).strip(" \0")
        try:
            values = [float(v) for v in text.split("\\")]
        except ValueError:
            values = []
        if len(values) != count or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
            kind = "positive numbers (mm)" if positive else "finite numbers"
            raise InputError(name, f"DICOM {what} '{text}' is not {count} {kind}")


def _check_slice_grid(
    folder: Path,
    name: list[str],
    origins: list[tuple[float, ...]],
    directions: list[tuple[float, ...]],
    sizes: list[tuple[int, ...]],
    spacings: list[tuple[float, ...]],
) -> None:
    """Refuse slices (headers: origin and pixel spacing in mm, direction cosines) that do not form
    one evenly spaced grid along their slice normal."""
    if len(set(sizes)) > 1:
        raise InputError(folder, f"slices of one series differ in size: {sorted(set(sizes))}")
    spacing_error = np.abs(np.subtract(spacings, spacings[0])) / np.abs(spacings[0])  # fractions
    differ = np.flatnonzero(np.any(spacing_error > PIXEL_SPACING_TOLERANCE, axis=1))
    if differ.size:
        i = differ[0]
        first, other = (" x ".join(f"{v:g}" for v in spacings[k]) for k in (0, i))
        raise InputError(
            folder,
            f"slices of one series differ in pixel spacing: {first} mm in {name[0]}, {other} mm in {name[i]}",
        )
    if not np.allclose(directions, directions[0], atol=1e-3):
        raise InputError(folder, "slices of one series differ in orientation (ImageOrientationPatient)")
    d = np.asarray(directions[0], dtype=np.float64).reshape(3, 3)
    normal = np.cross(d[:, 0], d[:, 1])
    position = np.asarray(origins, dtype=np.float64) @ normal  # mm along the normal
    gaps = np.diff(position)
    duplicates = np.flatnonzero(np.abs(gaps) < SLICE_GAP_MIN_MM)
    if duplicates.size:
        i = duplicates[0]
        raise InputError(folder, f"duplicate slices: {name[i]} and {name[i + 1]} lie at {position[i]:g} mm")
    if not (np.all(gaps > 0) or np.all(gaps < 0)):
        raise InputError(folder, "slices are not ordered along the slice normal (ImagePositionPatient)")
    _check_gantry_tilt(folder, name, np.asarray(origins, dtype=np.float64), normal, min(spacings[0]))
    gaps = np.abs(gaps)
    typical = float(np.median(gaps))
    uneven = np.flatnonzero(np.abs(gaps - typical) > max(SLICE_GAP_MIN_MM, SLICE_GAP_TOLERANCE * typical))
    if uneven.size:
        i = uneven[0]
        raise InputError(
            folder,
            f"uneven slice spacing: {gaps[i]:.4g} mm between {name[i]} and {name[i + 1]}, "
            f"{typical:.4g} mm elsewhere (missing slice?)",
        )


def _check_gantry_tilt(
    folder: Path, name: list[str], origins: np.ndarray, normal: np.ndarray, pixel_mm: float
) -> None:
    """Refuse slices whose positions (`origins`, mm) step sideways off the slice `normal`: a gantry
    tilt, which ITK would read as an orthogonal grid, shifting each slice by its sideways offset.
    Refused once that offset exceeds TILT_MAX_PIXELS pixels of `pixel_mm`."""
    steps = origins - origins[0]
    along = steps @ normal  # mm
    sideways = np.linalg.norm(steps - along[:, None] * normal, axis=1)  # mm
    k = int(np.argmax(sideways))
    if sideways[k] > TILT_MAX_PIXELS * pixel_mm:
        angle = math.degrees(math.atan2(sideways[k], abs(along[k])))
        raise InputError(
            folder,
            f"gantry tilt of {angle:.1f}° (slice positions are not along the slice normal: {name[k]} lies "
            f"{sideways[k]:.3g} mm off it): not supported; resample the series to an orthogonal grid first",
        )


def _monochrome1_reflection(name: str, reader: sitk.ImageFileReader) -> float | None:
    """For a MONOCHROME1 slice (header in `reader`), the value c with HU = c - what ITK reads; None
    for any other photometric interpretation.

    GDCM turns MONOCHROME1 stored values s into MONOCHROME2 as lo + hi - s (lo, hi: the range of
    BitsStored bits, signed or not) before ITK applies the rescale, so ITK reads
    slope * (lo + hi - s) + intercept where the HU are slope * s + intercept (for CT the rescale
    gives HU whatever the photometric interpretation, which only says how to display them).
    """

    def number(tag: str, default: float) -> float:
        value = reader.GetMetaData(tag).strip(" \0") if reader.HasMetaDataKey(tag) else ""
        try:
            return float(value.split("\\")[0]) if value else default
        except ValueError:
            raise InputError(name, f"MONOCHROME1 DICOM slice with an unreadable ({tag}) {value!r}") from None

    photometric = reader.GetMetaData("0028|0004") if reader.HasMetaDataKey("0028|0004") else ""
    if photometric.strip(" \0") != "MONOCHROME1":
        return None
    allocated = int(number("0028|0100", 16))
    stored = int(number("0028|0101", allocated))
    signed = number("0028|0103", 0) == 1
    if not 1 <= stored <= allocated <= 32 or (signed and stored != allocated):  # GDCM fails on signed ones
        kind = "signed" if signed else "unsigned"
        values = f"{kind} {stored}-bit values in {allocated} bits"
        raise InputError(name, f"MONOCHROME1 DICOM slice with {values}: not supported")
    lo, hi = (-(2 ** (stored - 1)), 2 ** (stored - 1) - 1) if signed else (0, 2**stored - 1)
    return number("0028|1053", 1.0) * (lo + hi) + 2 * number("0028|1052", 0.0)


def _undo_monochrome1(image: sitk.Image, reflections: list[float | None]) -> sitk.Image:
    """`image` (one slice per entry of `reflections`, in order) with GDCM's MONOCHROME1 inversion
    undone: HU = c - read value on each slice with a reflection c. Unchanged without MONOCHROME1."""
    if all(c is None for c in reflections):
        return image
    read = sitk.GetArrayViewFromImage(image).reshape(len(reflections), -1)
    hu = read.astype(np.float32)
    for k, c in enumerate(reflections):
        if c is not None:  # in float64: exact for integer HU
            hu[k] = c - read[k].astype(np.float64)
    undone = sitk.GetImageFromArray(hu.reshape(sitk.GetArrayViewFromImage(image).shape))
    undone.CopyInformation(image)
    return undone


def read_dicom_file(path: Path) -> sitk.Image:
    """Read one DICOM file, checked as a one-slice series (one frame, MONOCHROME1 undone)."""
    _check_dicom_lengths(path)
    check_header(path)  # an unreadable header: the cause guessed from the file's first bytes
    reflections = _check_dicom_slices(path, [str(path)])
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(path, f"unreadable: {unreadable_cause(path)}") from None
    return _undo_monochrome1(image, reflections)

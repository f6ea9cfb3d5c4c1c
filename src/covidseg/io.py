"""CT input/output: the one module that knows file formats.

Reads NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd), NRRD (.nrrd, .nhdr), single DICOM files and
DICOM series folders into :class:`CTVolume` -- a float32 array in Hounsfield units (HU) in the
canonical orientation (see :mod:`covidseg.geometry`) that remembers the native geometry, so results
can be written back onto the original scan exactly.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import mmap
import os
import re
import stat
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from covidseg.atomic import atomic_path
from covidseg.errors import InputError
from covidseg.geometry import Geometry, Orientation, image_from_array
from covidseg.intensity import IntensityMapping

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

#: Refuse images with more voxels than this before reading their pixels (2^31 ≈ 8 GB as float32).
MAX_VOXELS = 2**31
#: A real CT in HU always has air (≈ -1000 HU) somewhere; a minimum above this is not HU.
MAX_PLAUSIBLE_MIN_HU = -500.0
NONFINITE = "contains NaN or infinite voxel values"
#: A CT needs at least this many voxels along two of its axes (one-slice volumes are fine).
MIN_SIDE = 8
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


@dataclass
class CTVolume:
    """A CT in HU, canonical orientation, with what is needed to go back to the native scan."""

    hu: np.ndarray  # [z, y, x] float32, HU, canonical (LPS) orientation
    spacing_zyx: tuple[float, float, float]  # mm, along the canonical axes
    geometry: Geometry  # native geometry of the file
    orientation: Orientation  # native <-> canonical
    source: str  # file or DICOM folder it came from
    series_uid: str | None = None
    dicom: dict[str, str] | None = None  # DICOM_IDENTIFIERS found, when read_ct was asked for them

    def to_native_image(self, canonical: np.ndarray) -> sitk.Image:
        """A SimpleITK image of a canonical array, with the source's exact native geometry."""
        native = self.orientation.to_native(canonical)
        return image_from_array(native, self.geometry)


def case_id_of(path: str | Path) -> str:
    """Case id: the file name without its image extension (the whole name when it has none known),
    or the folder name of a DICOM series."""
    path = Path(path)
    if path.is_dir():  # the folder's own name also for ".", ".." and "dir/."
        return Path(os.path.abspath(path)).name or path.resolve().name
    name = path.name
    for suffix in VOLUME_SUFFIXES + IMAGE_2D_SUFFIXES + DICOM_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name  # no known extension: a DICOM file named by its UID, whose dots are not a suffix


def _special_kind(path: Path) -> str | None:
    """What `path` is when it is neither a regular file nor a folder ("a named pipe", "a socket",
    "a device"; links followed), from its status only; None otherwise and for a broken link."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # a broken link: reported as missing when read
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    return "a socket" if stat.S_ISSOCK(mode) else "a device"


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    return path.name.lower().endswith(suffixes)


def _is_dicom_file(path: Path) -> bool:
    """DICOM by extension, or by the 'DICM' magic at byte 128 whatever the name (TCIA names files by
    their UID, ``1.3.6.1.4.1.14519....``, which has a "suffix"). Files named as another image format
    are not DICOM; only regular files are opened (a FIFO would block), and only 4 bytes are read."""
    if _has_suffix(path, DICOM_SUFFIXES):
        return True
    if _has_suffix(path, VOLUME_SUFFIXES + IMAGE_2D_SUFFIXES):
        return False
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def find_cases(
    root: str | Path, allow_2d: bool = False, exclude: str | Path | None = None
) -> list[tuple[str, Path]]:
    """All cases under `root`: (case id, path) sorted by id.

    A file is one case. A folder is searched recursively (symbolic links followed, each folder
    once): every volume file is a case, and every folder that directly holds DICOM files is one
    case (a DICOM series folder). With `allow_2d`, 2D image files (PNG, JPEG, ...) count too. The
    folder `exclude` is not searched (an output folder inside an input folder). Duplicate case ids
    raise InputError.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(root, "no such file or folder")
    if not root.is_dir():  # a file (a named pipe too: read_ct refuses it without opening it)
        return [(case_id_of(root), root)]
    suffixes = VOLUME_SUFFIXES + (IMAGE_2D_SUFFIXES if allow_2d else ())
    cases: dict[str, Path] = {}

    def add(case_id: str, path: Path) -> None:
        if case_id in cases:
            raise InputError(path, f"case id {case_id!r} also used by {cases[case_id]}")
        cases[case_id] = path

    visited: set[str] = {os.path.realpath(exclude)} if exclude is not None else set()
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # a symlink loop, or a second link to a folder already searched
            dirnames.clear()
            continue
        visited.add(real)
        dirnames.sort()
        folder_path = Path(folder)
        has_dicom = False
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = folder_path / name
            if _special_kind(path):  # never opened: a named pipe would block discovery forever
                continue
            if _has_suffix(path, suffixes):
                add(case_id_of(path), path)
            elif _is_dicom_file(path):
                has_dicom = True
        if has_dicom:
            add(case_id_of(folder_path), folder_path)
    return sorted(cases.items())


def list_dicom_series(folder: str | Path) -> dict[str, list[str]]:
    """Series UID -> file names sorted by slice position (GDCM), for a DICOM folder.

    A folder holding a named pipe, socket or device is refused: GDCM stops listing a folder at
    the first one, so the slices after it (in directory order) would be lost without a word."""
    for name in sorted(os.listdir(folder)):
        kind = _special_kind(Path(folder) / name)
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


def _read_dicom_folder(folder: Path, series: str | None) -> tuple[sitk.Image, str, str | None, str]:
    """Read one series of a DICOM folder: `series` or the one with most slices.

    Returns the image, the series UID, an optional note and the series' first file."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and _is_dicom_file(path):
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
            p.name for p in folder.iterdir() if _is_dicom_file(p) and os.path.realpath(p) not in listed
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
    return _undo_monochrome1(image, reflections), uid, note, all_series[uid][0]


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


def _read_dicom_file(path: Path) -> sitk.Image:
    """Read one DICOM file, checked as a one-slice series (one frame, MONOCHROME1 undone)."""
    _check_dicom_lengths(path)
    _check_header(path)  # an unreadable header: the cause guessed from the file's first bytes
    reflections = _check_dicom_slices(path, [str(path)])
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(path, f"unreadable: {_unreadable_cause(path)}") from None
    return _undo_monochrome1(image, reflections)


def _check_header(path: Path) -> None:
    """Refuse images whose header announces more than MAX_VOXELS, before reading pixels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(path, f"unreadable: {_unreadable_cause(path)}") from None
    size = reader.GetSize()
    n_voxels = int(np.prod(size, dtype=np.float64)) * reader.GetNumberOfComponents()
    if n_voxels > MAX_VOXELS:
        raise InputError(path, f"image header announces {' x '.join(map(str, size))} voxels: too large")
    if n_voxels == 0:
        raise InputError(path, f"image header announces {' x '.join(map(str, size))} voxels: no data")


#: (byte offset, magic bytes, what a file starting so is, the suffixes it may have; () = not an image)
_MAGIC = (
    (344, b"n+1\0", "NIfTI image", (".nii",)),
    (344, b"ni1\0", "NIfTI header (with a separate .img)", (".hdr",)),
    (4, b"n+2\0", "NIfTI-2 image", (".nii",)),
    (0, b"ObjectType", "MetaImage", (".mha", ".mhd")),
    (0, b"NDims", "MetaImage", (".mha", ".mhd")),
    (0, b"NRRD", "NRRD image", (".nrrd", ".nhdr")),
    (128, b"DICM", "DICOM file", DICOM_SUFFIXES + ("",)),
    (0, b"\x89PNG", "PNG image", (".png",)),
    (0, b"\xff\xd8\xff", "JPEG image", (".jpg", ".jpeg")),
    (0, b"PK\x03\x04", "zip archive (a PyTorch checkpoint?)", ()),
    (0, b"%PDF", "PDF document", ()),
)


def _unreadable_cause(path: Path) -> str:
    """Why ITK could not read `path`, guessed from its first bytes (wrong extension, text, ...)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as fh:
                head, compressed = fh.read(1024), True
        else:
            compressed = False
    except OSError as exc:
        return f"cannot read the file ({exc.strerror or type(exc).__name__})"
    except (EOFError, zlib.error):
        return "truncated or corrupt gzip data"
    for offset, magic, what, suffixes in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            if compressed:
                what, suffixes = f"gzip-compressed {what}", tuple(s + ".gz" for s in suffixes if s)
            if not suffixes:
                return f"the file is a {what}, not an image"
            if not (path.name.lower().endswith(suffixes) or "" in suffixes):  # "": any name (DICOM)
                return f"the file is a {what} but its name does not end in {suffixes[0]}: rename it"
            return f"the file is a {what} but it is truncated, corrupt or has an invalid header"
    if compressed:
        return "gzip-compressed data that is not a known image format"
    if head and b"\0" not in head:
        try:
            head.decode("utf-8")
            return "the file is text, not an image"
        except UnicodeDecodeError:
            pass
    return "not an image file, or the file is truncated or corrupt"


#: NIfTI datatype codes of floating-point voxels (ITK silently turns their NaN into 0).
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


@dataclass(frozen=True)
class _NiftiLayout:
    offset: int  # byte offset of the voxel data
    data_bytes: int  # bytes of voxel data the header announces
    float_dtype: np.dtype | None  # dtype of the voxels when they are floats

    @property
    def expected_bytes(self) -> int:
        return self.offset + self.data_bytes


def _nifti_layout(header: bytes) -> _NiftiLayout | None:
    """Where the voxels of a NIfTI-1/-2 file lie, or None if `header` is not a usable NIfTI header."""
    for order in ("<", ">"):
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            offset = struct.unpack(order + "f", header[108:112])[0]
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            dims = struct.unpack(order + "8q", header[16:80])
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    if not (math.isfinite(offset) and 0 <= offset < 2**40):
        return None
    n_dims = min(max(int(dims[0]), 0), 7)
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : 1 + n_dims]], dtype=np.float64))
    code = _NIFTI_FLOAT_TYPES.get(int(datatype))
    return _NiftiLayout(
        offset=int(offset),
        data_bytes=voxels * max(int(bitpix), 0) // 8,
        float_dtype=None if code is None else np.dtype(order + code),
    )


def _gzip_isize(path: Path) -> int:
    """The gzip trailer's uncompressed size (mod 2**32) of the last member."""
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        return struct.unpack("<I", fh.read(4))[0]


def _read_to_end(fh, head: bytes, layout: _NiftiLayout | None) -> tuple[int, bool]:
    """Read `fh`, whose first bytes `head` are already read, to its end in chunks.

    Returns the total number of bytes and whether every floating-point voxel is finite (True
    when the voxels are not floats).
    """
    dtype = None if layout is None else layout.float_dtype
    total, finite = len(head), True
    pending = b"" if dtype is None else head[layout.offset : layout.expected_bytes]  # unchecked voxels
    while True:
        if dtype is not None and len(pending) >= dtype.itemsize:
            n = len(pending) // dtype.itemsize
            finite = finite and bool(np.isfinite(np.frombuffer(pending, dtype, count=n)).all())
            pending = pending[n * dtype.itemsize :]
        chunk = fh.read(1 << 24)
        if not chunk:
            return total, finite
        if dtype is not None:  # the part of `chunk` (file bytes total..) inside the voxel data
            pending += chunk[max(layout.offset - total, 0) : max(layout.expected_bytes - total, 0)]
        total += len(chunk)


#: Bytes per MetaImage element type (MET_LONG and MET_ULONG are left out: their size varies).
_MET_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip


def _metaimage_expected_bytes(path: Path) -> int | None:
    """Bytes a .mha holding its uncompressed data must have, or None when the header does not tell."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    fields, position = {}, 0
    while "ElementDataFile" not in fields:
        end = head.find(b"\n", position)
        if end < 0:
            return None
        key, _, value = head[position:end].decode("latin-1").partition("=")
        fields[key.strip()] = value.strip()
        position = end + 1
    compressed = fields.get("CompressedData", "False").lower() in ("true", "1")
    if fields["ElementDataFile"] != "LOCAL" or compressed or "HeaderSize" in fields:
        return None
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        element = _MET_BYTES[fields["ElementType"]]
    except (KeyError, ValueError):
        return None
    return position + int(np.prod(dims, dtype=np.float64)) * channels * element


def _check_regular_file(path: Path) -> None:
    """Refuse what is not a regular file (named pipe, socket, device) without opening it: reading
    a named pipe waits for a writer forever, a device may never end."""
    kind = _special_kind(path)
    if kind is not None:
        raise InputError(path, f"not a regular file ({kind})")


def _gzip_length(path: Path, start: int, needed: int) -> int:
    """Uncompressed bytes of the gzip data from byte `start` of `path` on, counted up to `needed`.

    The gzip trailer (the size mod 2**32 of the last member) answers when it says `needed` and the
    compressed bytes can hold that much (deflate expands 1032 times at most, so a forged trailer
    cannot pass); otherwise the data is decompressed in chunks, stopping once `needed` bytes are
    found, so a short or corrupt stream costs no more memory than a chunk."""
    compressed = path.stat().st_size - start
    if compressed >= 18 and compressed * 1032 >= needed and _gzip_isize(path) == needed % 2**32:
        return needed
    total = 0
    try:
        with open(path, "rb") as raw:
            raw.seek(start)
            with gzip.GzipFile(fileobj=raw) as fh:
                while total < needed:
                    chunk = fh.read(min(1 << 24, needed - total))
                    if not chunk:
                        break
                    total += len(chunk)
    except (OSError, EOFError, zlib.error):
        raise InputError(path, "truncated or corrupt gzip data") from None
    return total


def _check_nrrd_data(path: Path) -> None:
    """Refuse an NRRD whose data is shorter than its header announces, before ITK allocates it.

    Checked for raw, gzip, ascii and hex data, attached or in one detached data file (``data
    file:``); data split over several files is left to ITK. A detached data file must be a regular
    file. bzip2 data is refused: ITK's NRRD reader allocates the image, then finds it cannot
    decompress bzip2.
    """
    header = _text_header(path)
    if header is None or not header[0]:
        return
    fields, header_bytes = header
    element = _NRRD_TYPE_BYTES.get(" ".join(fields.get("type", "").lower().split()))
    encoding = fields.get("encoding", "").lower()
    encoding = {"gz": "gzip", "bz2": "bzip2", "txt": "ascii", "text": "ascii"}.get(encoding, encoding)
    if encoding == "bzip2":
        raise InputError(path, "NRRD with bzip2 data: ITK cannot read it; save it as raw or gzip")
    data_file = fields.get("datafile", "")
    try:
        sizes = [int(v) for v in fields.get("sizes", "").split()]
        skip = max(int(fields.get("byteskip", "0")), 0)  # -1: the data ends the file
    except ValueError:
        return  # ITK reports it
    if element is None or not sizes or min(sizes) < 1 or encoding not in ("raw", "gzip", "ascii", "hex"):
        return
    if data_file.startswith("LIST") or len(data_file.split()) > 1:  # several data files
        return
    voxels = math.prod(sizes)
    expected = voxels * element  # bytes of voxels
    needed = {"ascii": 2 * voxels - 1, "hex": 2 * expected}.get(encoding, expected)  # bytes in the file
    data_path, start = (path.parent / data_file, 0) if data_file else (path, header_bytes)
    try:
        if not data_path.exists():
            return  # ITK reports it
        _check_regular_file(data_path)
        if encoding == "gzip":
            available = _gzip_length(data_path, start, expected + skip) - skip
        else:
            available = data_path.stat().st_size - start - skip
    except OSError:  # a data file name the system refuses (too long, ...): ITK reports it
        return
    available = max(available, 0)
    if encoding in ("ascii", "hex") and available < needed:
        cause = f"{available} bytes of {encoding} data, {voxels} voxels need {needed} at least"
        raise InputError(path, f"truncated NRRD: {cause}")
    if encoding in ("raw", "gzip") and available < expected:
        raise InputError(path, f"truncated NRRD: {available} bytes of data, header announces {expected}")


def _check_complete(path: Path) -> None:
    """Refuse what ITK would read without complaint (or only after allocating the whole image):
    truncated NIfTI, MetaImage, NRRD (:func:`_check_nrrd_data`) or gzip data, and NaN or infinite
    float NIfTI voxels (ITK's NIfTI reader silently turns them into 0).

    A NIfTI or .mha file must hold as many bytes as its header announces. For .nii.gz the gzip
    trailer's size is compared first (cheap); only when it disagrees, for other .gz files, or for
    float voxels, the stream is read to its end, where the gzip CRC catches truncation and corruption.
    """
    name = path.name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        _check_nrrd_data(path)
        return
    if name.endswith(".mha"):
        expected, size = _metaimage_expected_bytes(path), path.stat().st_size
        if expected is not None and size < expected:
            raise InputError(path, f"truncated MetaImage: {size} bytes, header announces {expected}")
        return
    with open(path, "rb") as fh:
        is_gzip = name.endswith(".gz") and fh.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rb") if is_gzip else open(path, "rb") as fh:
            header = fh.read(540)
            layout = _nifti_layout(header) if name.endswith((".nii", ".nii.gz")) else None
            scan = layout is not None and layout.float_dtype is not None
            if not (is_gzip or scan):
                total, finite = path.stat().st_size, True
            elif not scan and layout is not None and _gzip_isize(path) == layout.expected_bytes % 2**32:
                return
            else:
                total, finite = _read_to_end(fh, header, layout)
    except (OSError, EOFError, zlib.error):
        raise InputError(path, "truncated or corrupt gzip data") from None
    if layout is not None and total < layout.expected_bytes:
        expected = layout.expected_bytes
        raise InputError(path, f"truncated NIfTI: {total} bytes of data, header announces {expected}")
    if not finite:
        raise InputError(path, NONFINITE)


#: Bits per voxel of the NIfTI datatype codes ITK reads (integers, floats, RGB, RGBA, complex64).
_NIFTI_BITPIX = {2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32, 1024: 64,
                 1280: 64, 2304: 32}  # fmt: skip


#: A NIfTI qform and sform that differ by more than this (direction cosines; mm for spacing and
#: origin) disagree: which one is right cannot be told, so the file is refused.
NIFTI_FORM_DIRECTION_TOLERANCE = 1e-3
NIFTI_FORM_MM_TOLERANCE = 0.01
#: A direction matrix D is taken as a rotation when |DᵀD - I| <= this everywhere (a rotation written
#: with four decimals is off by ~1e-4; a shear or scale of 0.1 % or more is refused).
ORTHONORMAL_TOLERANCE = 1e-3
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class _Space:
    """Where the first three axes of an image lie (ITK conventions: LPS, mm)."""

    spacing: tuple[float, float, float]  # mm
    origin: tuple[float, float, float]  # mm
    direction: tuple[float, ...]  # 3x3 row-major; column i = direction of image axis i


def _is_orthonormal(direction: np.ndarray) -> bool:
    """Whether the square matrix `direction` is a rotation (or reflection) within ORTHONORMAL_TOLERANCE."""
    with np.errstate(over="ignore", invalid="ignore"):  # huge or NaN entries: not a rotation
        gram = direction.T @ direction
        return bool(np.all(np.abs(gram - np.eye(len(direction))) <= ORTHONORMAL_TOLERANCE))


def _quaternion_rotation(b: float, c: float, d: float) -> np.ndarray:
    """The 3x3 rotation of a NIfTI qform quaternion (a implied), computed as nifti1_io does."""
    a = 1.0 - (b * b + c * c + d * d)
    if a < 1e-7:  # a rotation by 180°: (b, c, d) is renormalised
        norm = math.sqrt(b * b + c * c + d * d)
        a, b, c, d = 0.0, b / norm, c / norm, d / norm
    else:
        a = math.sqrt(a)
    return np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ]
    )


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _sform_space(path: Path, srow: tuple[float, ...]) -> _Space:
    """The geometry an sform gives (spacing: the lengths of its columns); refuse a sheared one."""
    affine = _RAS_TO_LPS @ np.asarray(srow, dtype=np.float64).reshape(3, 4)
    with np.errstate(over="ignore"):  # NIfTI-2 doubles: an overflowing length is refused below
        spacing = np.linalg.norm(affine[:, :3], axis=0)
    if not (np.all(spacing > 0) and np.isfinite(spacing).all()):
        raise InputError(path, f"invalid NIfTI header: the sform gives a voxel size of {_fmt(spacing)} mm")
    direction = affine[:, :3] / spacing
    if not _is_orthonormal(direction):
        raise InputError(path, "invalid NIfTI header: the sform is sheared (its axes are not perpendicular)")
    return _Space(tuple(spacing), tuple(affine[:, 3]), tuple(direction.ravel()))


def _qform_space(quatern: tuple[float, ...], qoffset: tuple[float, ...], pixdim: tuple[float, ...]) -> _Space:
    """The geometry a qform gives: rotation from the quaternion, spacing from pixdim, qfac = pixdim[0]."""
    rotation = _quaternion_rotation(*quatern)
    if pixdim[0] < 0:  # qfac: a left-handed grid flips the slice axis
        rotation[:, 2] = -rotation[:, 2]
    direction = _RAS_TO_LPS @ rotation
    origin = _RAS_TO_LPS @ np.asarray(qoffset, dtype=np.float64)
    return _Space(tuple(float(v) for v in pixdim[1:4]), tuple(origin), tuple(direction.ravel()))


def _form_disagreement(qform: _Space, sform: _Space, compare_spacing: bool) -> str:
    """How a qform and an sform differ beyond the NIfTI tolerances ('' when they agree)."""
    checks = [("direction", NIFTI_FORM_DIRECTION_TOLERANCE, ""), ("origin", NIFTI_FORM_MM_TOLERANCE, " mm")]
    if compare_spacing:
        checks.insert(0, ("spacing", NIFTI_FORM_MM_TOLERANCE, " mm"))
    for name, tolerance, unit in checks:
        q, s = getattr(qform, name), getattr(sform, name)
        if not np.all(np.abs(np.subtract(q, s)) <= tolerance):  # NaN (an overflowing quaternion) too
            return f"qform {name} {_fmt(q)}{unit}, sform {name} {_fmt(s)}{unit}"
    return ""


def _nifti_space(
    path: Path,
    n_dims: int,
    pixdim: tuple[float, ...],
    qform_code: int,
    sform_code: int,
    orientation: tuple[float, ...],
) -> _Space | None:
    """The geometry of a NIfTI file's first three axes by the NIfTI-1 rules (None: ITK's is right).

    The sform (sform_code > 0) gives direction, origin and spacing (its column lengths); without
    it the qform (qform_code > 0) gives direction and origin, and pixdim the spacing. ITK instead
    takes the spacing from pixdim always (1 mm where pixdim is 0, even beside a valid sform) and
    picks the qform over a disagreeing sform silently, so volumes in mL could be silently wrong.
    Refused: a qform and an sform that disagree, a sheared sform, a voxel size (pixdim) that is
    not positive where no sform gives it.
    """
    n = min(n_dims, 3)
    voxel = pixdim[1 : 1 + n]
    pixdim_positive = all(v > 0 for v in voxel)
    if n_dims < 3 or sform_code <= 0:
        if not pixdim_positive:
            given = "" if n_dims < 3 else ", and no sform gives it"
            cause = f"invalid NIfTI header: voxel size pixdim {_fmt(voxel)} mm is not positive{given}"
            raise InputError(path, cause)
        return None
    quatern, qoffset, srow = orientation[:3], orientation[3:6], orientation[6:]
    sform = _sform_space(path, srow)
    if qform_code > 0:
        disagreement = _form_disagreement(_qform_space(quatern, qoffset, pixdim), sform, pixdim_positive)
        if disagreement:
            raise InputError(path, f"invalid NIfTI header: qform and sform disagree: {disagreement}")
    return sform


@contextlib.contextmanager
def _itk_warnings(shown: bool) -> Iterator[None]:
    """ITK's warnings (printed to stderr) shown or not inside the block. ITK's switch is global:
    reads in other threads at the same time may lose their warnings (never their errors)."""
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(shown and before)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


def _follow_space(image: sitk.Image, space: _Space) -> sitk.Image:
    """`image` with the geometry `space` on its first three axes, where ITK read another one.

    Geometries within rounding (1e-4 mm or cosine) of ITK's are left as ITK read them, so files
    whose header fields agree keep bit-identical geometry."""
    dim = image.GetDimension()
    if dim < 3:
        return image
    spacing, origin = np.array(image.GetSpacing()), np.array(image.GetOrigin())
    direction = np.array(image.GetDirection()).reshape(dim, dim)
    wanted = np.asarray(space.direction).reshape(3, 3)
    if (
        np.allclose(spacing[:3], space.spacing, rtol=0, atol=1e-4)
        and np.allclose(origin[:3], space.origin, rtol=0, atol=1e-4)
        and np.allclose(direction[:3, :3], wanted, rtol=0, atol=1e-4)
    ):
        return image
    spacing[:3], origin[:3], direction[:3, :3] = space.spacing, space.origin, wanted
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    image.SetDirection([float(v) for v in direction.ravel()])
    return image


def _check_nifti_header(path: Path) -> _Space | None:
    """Refuse NIfTI headers ITK cannot handle sanely, before ITK parses them; return the geometry
    of the first three axes as the NIfTI rules give it (None: not NIfTI, or ITK's is right).

    ITK's NIfTI reader loops forever on some headers with NaN or infinite orientation fields
    and reads past its buffer when it scales colour voxels (both found by tests/test_fuzz.py), and
    prints library errors of its own for bad dimensions. See :func:`_nifti_space` for the geometry.
    """
    try:
        with open(path, "rb") as fh:
            is_gzip = fh.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if is_gzip else open(path, "rb") as fh:
            header = fh.read(540)
    except (OSError, EOFError, zlib.error):
        return  # reported by the checks that follow
    for order in ("<", ">"):
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            pixdim = struct.unpack(order + "8f", header[76:108])
            scaling = struct.unpack(order + "2f", header[112:120])
            form_codes = struct.unpack(order + "2h", header[252:256])  # qform_code, sform_code
            orientation = struct.unpack(order + "18f", header[256:328])  # quatern, qoffset, srow
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            dims = struct.unpack(order + "8q", header[16:80])
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            pixdim = struct.unpack(order + "8d", header[104:168])
            scaling = struct.unpack(order + "2d", header[176:192])
            form_codes = struct.unpack(order + "2i", header[344:352])
            orientation = struct.unpack(order + "18d", header[352:496])
            break
    else:
        return None  # not NIfTI: ITK decides
    n_dims = dims[0]
    if not 1 <= n_dims <= 7 or any(d < 1 for d in dims[1 : 1 + n_dims]):
        raise InputError(path, f"invalid NIfTI header: dim = {list(dims)}")
    if datatype not in _NIFTI_BITPIX:
        raise InputError(path, f"invalid NIfTI header: unsupported datatype {datatype}")
    if bitpix != _NIFTI_BITPIX[datatype]:  # ITK sizes the data by datatype, the file check by bitpix
        raise InputError(path, f"invalid NIfTI header: bitpix {bitpix} does not match datatype {datatype}")
    if not (np.isfinite(pixdim[: 1 + n_dims]).all() and np.isfinite(orientation).all()):
        raise InputError(path, "invalid NIfTI header: NaN or infinite voxel size or orientation")
    slope, intercept = scaling  # ITK scales RGB(A) voxels past the end of its buffer
    if datatype in (128, 2304) and slope != 0.0 and (slope != 1.0 or intercept != 0.0):
        raise InputError(path, "invalid NIfTI header: intensity scaling (scl_slope) on a colour image")
    return _nifti_space(path, n_dims, pixdim, *form_codes, orientation)


#: Bytes per voxel of the NRRD scalar types (all spellings of the NRRD format specification).
_NRRD_TYPE_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                     "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int",
                     "int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int",
                     "uint64", "uint64_t", "double"), 8),
}  # fmt: skip
#: How much of a MetaImage or NRRD file is searched for the end of its text header.
_TEXT_HEADER_MAX = 1 << 20


def _text_header(path: Path) -> tuple[dict[str, str], int] | None:
    """The fields of a MetaImage (``Key = value``) or NRRD (``field: value``) text header and its
    length in bytes, or None when `path` does not start with one that ends within _TEXT_HEADER_MAX.

    MetaImage keys are kept as written; NRRD field names are lower-cased without spaces
    ("data file" -> "datafile"). A MetaImage header ends with its ElementDataFile line, an NRRD
    header at its first empty line (or at the end of a detached .nhdr).
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(_TEXT_HEADER_MAX)
    except OSError:
        return None  # reported when ITK cannot read it either
    whole_file = len(head) < _TEXT_HEADER_MAX
    nrrd = head.startswith(b"NRRD")
    lines = head.split(b"\n")
    fields: dict[str, str] = {}
    position = 0  # bytes up to the end of the current line
    for index, raw in enumerate(lines):
        if index == len(lines) - 1 and not whole_file:
            return None  # cut off: no end of header within _TEXT_HEADER_MAX
        position = min(position + len(raw) + 1, len(head))
        line = raw.decode("latin-1").rstrip("\r")
        if not nrrd:
            key, _, value = line.partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                return fields, position
        elif not line:  # the empty line after an NRRD header, or the end of a detached one
            return fields, position
        elif index > 0 and not line.startswith("#") and ":=" not in line:  # not magic, comment, key/value
            key, _, value = line.partition(":")
            fields[key.replace(" ", "").lower()] = value.strip()
    return None


def _check_direction_text(path: Path) -> None:
    """Refuse a MetaImage or NRRD whose header gives a sheared or scaled grid, before ITK reads it.

    MetaImage: ITK keeps a TransformMatrix as it is, so a sheared or scaled one would be taken for
    a direction (and the voxel volume, spacing alone, would be wrong); it must be a rotation.
    NRRD: each of the ``space directions`` vectors is one axis, its length the spacing (ITK
    splits them so), so scaled vectors are fine but they must be perpendicular.
    """
    header = _text_header(path)
    if header is None:
        return
    fields, _ = header
    if "spacedirections" in fields:
        vectors = []
        for text in re.findall(r"\(([^)]*)\)", fields["spacedirections"]):
            try:
                vectors.append([float(v) for v in text.split(",")])
            except ValueError:
                return  # ITK reports it
        if not vectors or len({len(v) for v in vectors}) > 1:
            return
        columns = np.asarray(vectors, dtype=np.float64).T
        with np.errstate(over="ignore", invalid="ignore"):  # huge or NaN vectors: ITK decides
            lengths = np.linalg.norm(columns, axis=0)
        if not (np.all(lengths > 0) and np.isfinite(lengths).all()):
            return  # zero or infinite spacing: ITK or the voxel size check reports it
        cosines = (columns / lengths).T @ (columns / lengths)  # between the axes
        if np.any(np.abs(cosines - np.eye(len(cosines))) > ORTHONORMAL_TOLERANCE):
            given = fields["spacedirections"]
            raise InputError(path, f"NRRD space directions {given} are not perpendicular (a sheared grid)")
        return
    for key in ("TransformMatrix", "Rotation", "Orientation"):
        if key in fields:
            try:
                values = [float(v) for v in fields[key].split()]
            except ValueError:
                return  # ITK reports it
            n = math.isqrt(len(values))
            if n * n == len(values) and n > 0 and not _is_orthonormal(np.reshape(values, (n, n))):
                raise InputError(
                    path, f"MetaImage {key} {fields[key]} is not a rotation (sheared or scaled axes)"
                )
            return


def _read_file(path: Path) -> sitk.Image:
    space = None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        space = _check_nifti_header(path)
    elif _is_dicom_file(path):
        return _read_dicom_file(path)
    elif path.name.lower().endswith((".mha", ".mhd", ".nrrd", ".nhdr")):
        _check_direction_text(path)
    with _itk_warnings(space is None):  # ITK's sform warnings: covidseg checks the sform itself
        _check_header(path)
        _check_complete(path)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError:
            raise InputError(path, f"unreadable: {_unreadable_cause(path)}") from None
    return image if space is None else _follow_space(image, space)


def _to_scalar_3d(image: sitk.Image, path: Path, intensity: IntensityMapping | None) -> sitk.Image:
    """Make a 3D single-channel image; refuse RGB (without mapping), 4D and higher."""
    if image.GetNumberOfComponentsPerPixel() > 1:
        if intensity is None:
            raise InputError(
                path,
                f"{image.GetNumberOfComponentsPerPixel()}-channel (colour) image, not a CT in HU; "
                "pass --intensity window:LO,HI to map a display image to HU",
            )
        channels = [sitk.VectorIndexSelectionCast(image, i, sitk.sitkFloat32) for i in range(3)]
        image = 0.299 * channels[0] + 0.587 * channels[1] + 0.114 * channels[2]
    dim = image.GetDimension()
    if dim == 2:
        image = sitk.JoinSeries(image)
    elif dim == 4:
        if image.GetSize()[3] != 1:
            raise InputError(path, f"4D image ({image.GetSize()[3]} volumes); a CT is one 3D volume")
        image = image[:, :, :, 0]
    elif dim != 3:
        raise InputError(path, f"{dim}D image; expected a 2D slice or a 3D volume")
    return image


#: Voxel sizes (mm) a CT can have. Clinical CT has 0.2..10 mm voxels, micro-CT down to ~1 µm, and
#: 2D images get 1 mm (or their DPI, e.g. 0.35 mm at 72 dpi); no voxel is a metre wide. Within
#: these bounds a voxel's volume (mm³) is a normal, finite float, so volumes in mL stay right.
VOXEL_MM_RANGE = (1e-3, 1e3)


def _check_plausible_grid(image: sitk.Image, path: Path) -> None:
    """Refuse a voxel size outside VOXEL_MM_RANGE, or a direction that is not a rotation (a sheared
    or scaled grid whose voxel volume is not the product of its spacing), whatever the format."""
    spacing = image.GetSpacing()
    lo, hi = VOXEL_MM_RANGE
    if not all(math.isfinite(v) and lo <= v <= hi for v in spacing):
        size = " x ".join(f"{v:g}" for v in spacing)
        raise InputError(path, f"voxel size {size} mm is not plausible for a CT (allowed: {lo:g} to {hi:g})")
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    if not _is_orthonormal(direction):
        cause = f"direction {_fmt(direction.ravel())} is not a rotation (sheared or scaled axes)"
        raise InputError(path, cause)


def _validate_hu(hu: np.ndarray, path: Path, mapped: bool) -> None:
    if not np.isfinite(hu).all():
        raise InputError(path, NONFINITE)
    lo, hi = float(hu.min()), float(hu.max())
    if lo == hi:
        raise InputError(path, f"all voxels have the same value ({lo:g}); not a CT")
    if not mapped and lo > MAX_PLAUSIBLE_MIN_HU:
        raise InputError(
            path,
            f"minimum value {lo:g} is never below {MAX_PLAUSIBLE_MIN_HU:g}: likely not in HU "
            "(pass --intensity window:LO,HI or linear:SLOPE,INTERCEPT to map it)",
        )


def read_ct(
    path: str | Path,
    series: str | None = None,
    intensity: IntensityMapping | None = None,
    identifiers: bool = False,
) -> tuple[CTVolume, str | None]:
    """Read a CT (file or DICOM folder) into HU, canonical orientation.

    Returns the volume and an optional note for the user (e.g. which of several DICOM series was
    taken). Raises :class:`InputError` naming the file for anything that is not a CT in HU.
    DICOM rescale slope/intercept are applied by the reader; `intensity` maps other stored values.
    No header field is kept, except with `identifiers`: then ``volume.dicom`` holds the
    :data:`DICOM_IDENTIFIERS` of a DICOM input's first slice (None for other formats).
    """
    path = Path(path)
    note = None
    uid = None
    first_dicom = None
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        image, uid, note, first_dicom = _read_dicom_folder(path, series)
    else:
        _check_regular_file(path)
        if path.stat().st_size == 0:
            raise InputError(path, "empty file (0 bytes)")
        image = _read_file(path)
    image = _to_scalar_3d(image, path, intensity)
    _check_plausible_grid(image, path)
    if sorted(image.GetSize())[1] < MIN_SIDE:
        raise InputError(
            path,
            f"image of {' x '.join(map(str, image.GetSize()))} voxels is too small for a CT "
            f"(needs {MIN_SIDE} or more along two axes)",
        )
    geometry = Geometry.of(image)
    native = sitk.GetArrayViewFromImage(image)
    hu = intensity.apply(native) if intensity is not None else native.astype(np.float32)
    _validate_hu(hu, path, mapped=intensity is not None)
    orientation = Orientation.of(geometry)
    canonical = np.ascontiguousarray(orientation.to_canonical(hu))
    volume = CTVolume(
        hu=canonical,
        spacing_zyx=orientation.canonical_spacing_zyx(geometry),
        geometry=geometry,
        orientation=orientation,
        source=str(path),
        series_uid=uid,
    )
    if identifiers:
        if first_dicom is None and _is_dicom_file(path):
            first_dicom = path
        volume.dicom = dicom_identifiers(first_dicom) if first_dicom is not None else None
    return volume, note


def read_labels(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a label image (file or DICOM folder): its native ``[z, y, x]`` values, as stored, and
    its geometry. Refuses multi-channel, 4D and non-finite images."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if not path.is_dir():
        _check_regular_file(path)
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    image = _read_dicom_folder(path, None)[0] if path.is_dir() else _read_file(path)
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(path, "multi-channel image; expected a label mask")
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise InputError(path, f"{image.GetDimension()}D mask; expected 3D")
    _check_plausible_grid(image, path)
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(path, "mask contains NaN or infinite values")
    return array, Geometry.of(image)


def read_mask(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a label image as a boolean native ``[z, y, x]`` array (voxel > 0) and its geometry."""
    labels, geometry = read_labels(path)
    return labels > 0, geometry


def write_image(path: str | Path, image: sitk.Image, compress: bool = True) -> None:
    """Write a SimpleITK image atomically; the format follows the extension (.nii.gz, .mha, ...).

    The written file is checked before it takes its name (see :func:`_check_written`): ITK's NIfTI
    writer only prints an error when the disk is full. A failed write raises InputError naming
    `path` and leaves nothing.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
        except RuntimeError as exc:  # ITK's multi-line report: keep its reason line
            reasons = [line for line in str(exc).splitlines() if line.startswith("Reason:")]
            reason = reasons[0].removeprefix("Reason:").strip() if reasons else "ITK writer failed"
            raise InputError(path, f"cannot write ({reason})") from None
        _check_written(tmp, path, image)


def _check_written(tmp: Path, path: Path, image: sitk.Image) -> None:
    """Refuse a file ITK wrote incompletely (disk full, file size limit) in O(1) reads: the header
    reads back with `image`'s size and pixel type, and the voxel bytes are all there -- for NIfTI
    the gzip trailer's size (.nii.gz) or the file size (.nii), for an uncompressed .mha its file
    size. Other formats are read back whole."""
    size = tmp.stat().st_size

    def incomplete(detail: str) -> InputError:
        return InputError(path, f"not written completely ({detail}): disk full or file size limit?")

    if size == 0:
        raise incomplete("0 bytes")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise incomplete(f"{size} bytes whose header does not read back") from None
    if reader.GetSize() != image.GetSize() or reader.GetPixelID() != image.GetPixelID():
        kind = reader.GetPixelIDTypeAsString()
        raise incomplete(f"the header read back says {reader.GetSize()} voxels of {kind}")
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        is_gzip = name.endswith(".gz")
        try:
            with gzip.open(tmp, "rb") if is_gzip else open(tmp, "rb") as fh:
                layout = _nifti_layout(fh.read(540))
        except (OSError, EOFError, zlib.error):
            layout = None
        if layout is None:
            raise incomplete(f"{size} bytes without a readable NIfTI header")
        if is_gzip and _gzip_isize(tmp) != layout.expected_bytes % 2**32:
            raise incomplete(f"{size} bytes, a gzip stream without its end")
        if not is_gzip and size < layout.expected_bytes:
            raise incomplete(f"{size} of {layout.expected_bytes} bytes")
        return
    expected = _metaimage_expected_bytes(tmp) if name.endswith(".mha") else None
    if expected is not None:
        if size < expected:
            raise incomplete(f"{size} of {expected} bytes")
        return
    try:
        sitk.ReadImage(str(tmp))
    except RuntimeError:
        raise incomplete(f"{size} bytes that do not read back") from None


def write_array(
    path: str | Path,
    array_zyx: np.ndarray,
    geometry: Geometry,
    compress: bool = True,
) -> None:
    """Write a native-order ``[z, y, x]`` array with `geometry` exactly, atomically."""
    write_image(path, image_from_array(array_zyx, geometry), compress=compress)

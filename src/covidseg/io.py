"""CT input/output: the one module that knows file formats.

Reads NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd), NRRD (.nrrd, .nhdr), single DICOM files and
DICOM series folders into :class:`CTVolume` -- a float32 array in Hounsfield units (HU) in the
canonical orientation (see :mod:`covidseg.geometry`) that remembers the native geometry, so results
can be written back onto the original scan exactly.
"""

from __future__ import annotations

import gzip
import math
import mmap
import os
import struct
import zlib
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
    """Case id: the file name without its extensions, or the folder name of a DICOM series."""
    path = Path(path)
    if path.is_dir():
        return path.name
    name = path.name
    for suffix in VOLUME_SUFFIXES + IMAGE_2D_SUFFIXES + DICOM_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    return path.name.lower().endswith(suffixes)


def _is_dicom_file(path: Path) -> bool:
    """DICOM by extension, or by the 'DICM' magic at byte 128 (files without extension)."""
    if _has_suffix(path, DICOM_SUFFIXES):
        return True
    if path.suffix:
        return False
    try:
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
    if root.is_file():
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
            if _has_suffix(path, suffixes):
                add(case_id_of(path), path)
            elif _is_dicom_file(path):
                has_dicom = True
        if has_dicom:
            add(folder_path.name if folder_path != root else root.name, folder_path)
    return sorted(cases.items())


def list_dicom_series(folder: str | Path) -> dict[str, list[str]]:
    """Series UID -> file names sorted by slice position (GDCM), for a DICOM folder."""
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


def _check_dicom_lengths(path: Path) -> None:
    """Refuse a DICOM file whose elements announce more bytes than the file holds.

    GDCM allocates an element's announced length (up to 4 GB) before noticing the file is shorter,
    already while scanning a folder for series; a single corrupted length field (found by
    tests/test_fuzz.py) would cost gigabytes of memory.
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
        syntax = ""
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
            # into undefined-length values (sequences, compressed pixel data), over all others, items
            # included (an item of compressed pixel data holds bytes, not elements)
            pos += header if length == 0xFFFFFFFF else header + length


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
        note = (
            f"{len(all_series)} series found; using {uid} ({len(all_series[uid])} slices)"
            if len(all_series) > 1
            else None
        )
    try:
        _check_dicom_slices(folder, all_series[uid])
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
        return reader.Execute(), uid, note, all_series[uid][0]
    except RuntimeError:
        raise InputError(folder, f"unreadable DICOM series {uid}: a slice is truncated or corrupt") from None


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


def _check_dicom_slices(folder: Path, files: list[str]) -> None:
    """Refuse a series that would be read with a wrong geometry or is too large, reading headers only.

    Slices must share one orientation and size, and lie at distinct, evenly spaced positions along
    the slice normal (a missing slice would otherwise be averaged into the spacing silently).
    """
    reader = sitk.ImageFileReader()
    origins, directions, sizes = [], [], []
    for name in files:
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise InputError(name, "unreadable DICOM file: truncated or corrupt") from None
        if len(files) > 1 and not reader.HasMetaDataKey("0020|0032"):
            raise InputError(name, "DICOM slice without ImagePositionPatient: slices cannot be placed")
        origins.append(reader.GetOrigin())
        directions.append(reader.GetDirection())
        sizes.append(tuple(reader.GetSize()))
    n_voxels = sum(float(np.prod(size, dtype=np.float64)) for size in sizes)
    if n_voxels > MAX_VOXELS:
        raise InputError(folder, f"DICOM series of {len(files)} files has {n_voxels:.3g} voxels: too large")
    if len(files) < 2:
        return
    if len(set(sizes)) > 1:
        raise InputError(folder, f"slices of one series differ in size: {sorted(set(sizes))}")
    if not np.allclose(directions, directions[0], atol=1e-3):
        raise InputError(folder, "slices of one series differ in orientation (ImageOrientationPatient)")
    d = np.asarray(directions[0], dtype=np.float64).reshape(3, 3)
    position = np.asarray(origins, dtype=np.float64) @ np.cross(d[:, 0], d[:, 1])  # mm along the normal
    gaps = np.diff(position)
    name = [Path(f).name for f in files]
    duplicates = np.flatnonzero(np.abs(gaps) < SLICE_GAP_MIN_MM)
    if duplicates.size:
        i = duplicates[0]
        raise InputError(folder, f"duplicate slices: {name[i]} and {name[i + 1]} lie at {position[i]:g} mm")
    if not (np.all(gaps > 0) or np.all(gaps < 0)):
        raise InputError(folder, "slices are not ordered along the slice normal (ImagePositionPatient)")
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
            if not (path.name.lower().endswith(suffixes) or ("" in suffixes and not path.suffix)):
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


def _check_complete(path: Path) -> None:
    """Refuse what ITK would read without complaint (or only after allocating the whole image):
    truncated NIfTI, MetaImage or gzip data, and NaN or infinite float NIfTI voxels (ITK's NIfTI
    reader silently turns them into 0).

    A NIfTI or .mha file must hold as many bytes as its header announces. For .nii.gz the gzip
    trailer's size is compared first (cheap); only when it disagrees, for other .gz files, or for
    float voxels, the stream is read to its end, where the gzip CRC catches truncation and corruption.
    """
    name = path.name.lower()
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


def _check_nifti_header(path: Path) -> None:
    """Refuse NIfTI headers ITK cannot handle sanely, before ITK parses them.

    ITK's NIfTI reader loops forever on some headers with NaN or infinite orientation fields
    and reads past its buffer when it scales colour voxels (both found by tests/test_fuzz.py), and
    prints library errors of its own for bad dimensions.
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
            orientation = struct.unpack(order + "18f", header[256:328])  # quatern, qoffset, srow
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            dims = struct.unpack(order + "8q", header[16:80])
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            pixdim = struct.unpack(order + "8d", header[104:168])
            scaling = struct.unpack(order + "2d", header[176:192])
            orientation = struct.unpack(order + "18d", header[352:496])
            break
    else:
        return  # not NIfTI: ITK decides
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


def _read_file(path: Path) -> sitk.Image:
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_header(path)
    elif _is_dicom_file(path):
        _check_dicom_lengths(path)
    _check_header(path)
    _check_complete(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(path, f"unreadable: {_unreadable_cause(path)}") from None


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
        if path.stat().st_size == 0:
            raise InputError(path, "empty file (0 bytes)")
        image = _read_file(path)
    image = _to_scalar_3d(image, path, intensity)
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


def read_mask(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a label image as a boolean native ``[z, y, x]`` array (voxel > 0) and its geometry."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    image = _read_dicom_folder(path, None)[0] if path.is_dir() else _read_file(path)
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(path, "multi-channel image; expected a label mask")
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise InputError(path, f"{image.GetDimension()}D mask; expected 3D")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(path, "mask contains NaN or infinite values")
    return np.asarray(array > 0), Geometry.of(image)


def write_image(path: str | Path, image: sitk.Image, compress: bool = True) -> None:
    """Write a SimpleITK image atomically; the format follows the extension (.nii.gz, .mha, ...)."""
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)


def write_array(
    path: str | Path,
    array_zyx: np.ndarray,
    geometry: Geometry,
    compress: bool = True,
) -> None:
    """Write a native-order ``[z, y, x]`` array with `geometry` exactly, atomically."""
    write_image(path, image_from_array(array_zyx, geometry), compress=compress)

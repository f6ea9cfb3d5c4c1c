"""Header checks for every format before ITK allocates pixels: announced sizes against the
bytes present (NIfTI, MetaImage, NRRD, gzip), direction matrices, plausible voxel sizes, and what
an unreadable file really is."""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from covidseg.errors import InputError
from covidseg.imaging.geometry import ORTHONORMAL_TOLERANCE, is_orthonormal
from covidseg.io.discover import DICOM_SUFFIXES, check_regular_file
from covidseg.io.nifti import NiftiLayout, nifti_layout, numbers_text

#: Refuse images with more voxels than this before reading their pixels (2^31 ≈ 8 GB as float32).
MAX_VOXELS = 2**31


NONFINITE = "contains NaN or infinite voxel values"


def check_header(path: Path) -> None:
    """Refuse images whose header announces more than MAX_VOXELS, before reading pixels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(path, f"unreadable: {unreadable_cause(path)}") from None
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


def unreadable_cause(path: Path) -> str:
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


def gzip_isize(path: Path) -> int:
    """The gzip trailer's uncompressed size (mod 2**32) of the last member."""
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        return struct.unpack("<I", fh.read(4))[0]


def _read_to_end(fh, head: bytes, layout: NiftiLayout | None) -> tuple[int, bool]:
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


def metaimage_expected_bytes(path: Path) -> int | None:
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


def _gzip_length(path: Path, start: int, needed: int) -> int:
    """Uncompressed bytes of the gzip data from byte `start` of `path` on, counted up to `needed`.

    The gzip trailer (the size mod 2**32 of the last member) answers when it says `needed` and the
    compressed bytes can hold that much (deflate expands 1032 times at most, so a forged trailer
    cannot pass); otherwise the data is decompressed in chunks, stopping once `needed` bytes are
    found, so a short or corrupt stream costs no more memory than a chunk."""
    compressed = path.stat().st_size - start
    if compressed >= 18 and compressed * 1032 >= needed and gzip_isize(path) == needed % 2**32:
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
        check_regular_file(data_path)
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


def check_complete(path: Path) -> None:
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
        expected, size = metaimage_expected_bytes(path), path.stat().st_size
        if expected is not None and size < expected:
            raise InputError(path, f"truncated MetaImage: {size} bytes, header announces {expected}")
        return
    with open(path, "rb") as fh:
        is_gzip = name.endswith(".gz") and fh.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rb") if is_gzip else open(path, "rb") as fh:
            header = fh.read(540)
            layout = nifti_layout(header) if name.endswith((".nii", ".nii.gz")) else None
            scan = layout is not None and layout.float_dtype is not None
            if not (is_gzip or scan):
                total, finite = path.stat().st_size, True
            elif not scan and layout is not None and gzip_isize(path) == layout.expected_bytes % 2**32:
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


def check_direction_text(path: Path) -> None:
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
            if n * n == len(values) and n > 0 and not is_orthonormal(np.reshape(values, (n, n))):
                raise InputError(
                    path, f"MetaImage {key} {fields[key]} is not a rotation (sheared or scaled axes)"
                )
            return


#: Voxel sizes (mm) a CT can have. Clinical CT has 0.2..10 mm voxels, micro-CT down to ~1 µm, and
#: 2D images get 1 mm (or their DPI, e.g. 0.35 mm at 72 dpi); no voxel is a metre wide. Within
#: these bounds a voxel's volume (mm³) is a normal, finite float, so volumes in mL stay right.
VOXEL_MM_RANGE = (1e-3, 1e3)


def check_plausible_grid(image: sitk.Image, path: Path) -> None:
    """Refuse a voxel size outside VOXEL_MM_RANGE, or a direction that is not a rotation (a sheared
    or scaled grid whose voxel volume is not the product of its spacing), whatever the format."""
    spacing = image.GetSpacing()
    lo, hi = VOXEL_MM_RANGE
    if not all(math.isfinite(v) and lo <= v <= hi for v in spacing):
        size = " x ".join(f"{v:g}" for v in spacing)
        raise InputError(path, f"voxel size {size} mm is not plausible for a CT (allowed: {lo:g} to {hi:g})")
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    if not is_orthonormal(direction):
        cause = f"direction {numbers_text(direction.ravel())} is not a rotation (sheared or scaled axes)"
        raise InputError(path, cause)

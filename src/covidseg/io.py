"""CT input/output: the one module that knows file formats.

Reads NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd), NRRD (.nrrd, .nhdr), single DICOM files and
DICOM series folders into :class:`CTVolume` -- a float32 array in Hounsfield units (HU) in the
canonical orientation (see :mod:`covidseg.geometry`) that remembers the native geometry, so results
can be written back onto the original scan exactly.
"""

from __future__ import annotations

import gzip
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


@dataclass
class CTVolume:
    """A CT in HU, canonical orientation, with what is needed to go back to the native scan."""

    hu: np.ndarray  # [z, y, x] float32, HU, canonical (LPS) orientation
    spacing_zyx: tuple[float, float, float]  # mm, along the canonical axes
    geometry: Geometry  # native geometry of the file
    orientation: Orientation  # native <-> canonical
    source: str  # file or DICOM folder it came from
    series_uid: str | None = None

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


def find_cases(root: str | Path, allow_2d: bool = False) -> list[tuple[str, Path]]:
    """All cases under `root`: (case id, path) sorted by id.

    A file is one case. A folder is searched recursively: every volume file is a case, and every
    folder that directly holds DICOM files is one case (a DICOM series folder). With `allow_2d`,
    2D image files (PNG, JPEG, ...) count too. Duplicate case ids raise InputError.
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

    for folder, dirnames, filenames in os.walk(root, followlinks=True):
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


def _read_dicom_folder(folder: Path, series: str | None) -> tuple[sitk.Image, str, str | None]:
    """Read one series of a DICOM folder: `series` or the one with most slices."""
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
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(all_series[uid])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    return reader.Execute(), uid, note


def _check_header(path: Path) -> None:
    """Refuse images whose header announces more than MAX_VOXELS, before reading pixels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(path, "unreadable: not an image file, or the file is truncated or corrupt") from None
    size = reader.GetSize()
    n_voxels = int(np.prod(size, dtype=np.float64)) * reader.GetNumberOfComponents()
    if n_voxels > MAX_VOXELS:
        raise InputError(path, f"image header announces {' x '.join(map(str, size))} voxels: too large")


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Bytes a NIfTI-1/-2 file must hold (header + voxels), or None if `header` is not NIfTI."""
    for order in ("<", ">"):
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = struct.unpack(order + "f", header[108:112])[0]
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            dims = struct.unpack(order + "8q", header[16:80])
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    n_dims = min(max(int(dims[0]), 0), 7)
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : 1 + n_dims]], dtype=np.float64))
    return int(offset) + voxels * max(int(bitpix), 0) // 8


def _gzip_isize(path: Path) -> int:
    """The gzip trailer's uncompressed size (mod 2**32) of the last member."""
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        return struct.unpack("<I", fh.read(4))[0]


def _check_complete(path: Path) -> None:
    """Refuse truncated files that ITK would read without complaint (NIfTI, gzip streams).

    A NIfTI file must hold as many bytes as its header announces. For .nii.gz the gzip trailer's
    size is compared first (cheap); only when it disagrees, or for other .gz files, the stream is
    decompressed to its end, where the gzip CRC catches truncation and corruption.
    """
    is_gzip = path.name.lower().endswith(".gz")
    is_nifti = path.name.lower().endswith((".nii", ".nii.gz"))
    try:
        with gzip.open(path, "rb") if is_gzip else open(path, "rb") as fh:
            header = fh.read(540)
            expected = _nifti_expected_bytes(header) if is_nifti else None
            if not is_gzip:
                total = path.stat().st_size
            elif expected is not None and _gzip_isize(path) == expected % 2**32:
                return
            else:
                total = len(header)
                while chunk := fh.read(1 << 24):
                    total += len(chunk)
    except (OSError, EOFError, zlib.error):
        raise InputError(path, "truncated or corrupt gzip data") from None
    if expected is not None and total < expected:
        raise InputError(path, f"truncated NIfTI: {total} bytes of data, header announces {expected}")


def _read_file(path: Path) -> sitk.Image:
    _check_header(path)
    _check_complete(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(path, "unreadable: the file is truncated or corrupt") from None


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
        raise InputError(path, "contains NaN or infinite voxel values")
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
) -> tuple[CTVolume, str | None]:
    """Read a CT (file or DICOM folder) into HU, canonical orientation.

    Returns the volume and an optional note for the user (e.g. which of several DICOM series was
    taken). Raises :class:`InputError` naming the file for anything that is not a CT in HU.
    DICOM rescale slope/intercept are applied by the reader; `intensity` maps other stored values.
    """
    path = Path(path)
    note = None
    uid = None
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        image, uid, note = _read_dicom_folder(path, series)
    else:
        if path.stat().st_size == 0:
            raise InputError(path, "empty file (0 bytes)")
        image = _read_file(path)
    image = _to_scalar_3d(image, path, intensity)
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

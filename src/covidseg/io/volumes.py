"""Reading a CT or a label image into arrays with their exact geometry, and writing masks back
(checked writes)."""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from covidseg.errors import InputError
from covidseg.imaging.geometry import Geometry, Orientation, image_from_array
from covidseg.imaging.intensity import IntensityMapping
from covidseg.io.atomic import atomic_path
from covidseg.io.dicom import dicom_identifiers, read_dicom_file, read_dicom_folder
from covidseg.io.discover import check_regular_file, is_dicom_file
from covidseg.io.headers import (
    NONFINITE,
    check_complete,
    check_direction_text,
    check_header,
    check_plausible_grid,
    gzip_isize,
    metaimage_expected_bytes,
    unreadable_cause,
)
from covidseg.io.nifti import check_nifti_header, follow_space, itk_warnings, nifti_layout

#: A real CT in HU always has air (≈ -1000 HU) somewhere; a minimum above this is not HU.
MAX_PLAUSIBLE_MIN_HU = -500.0


#: A CT needs at least this many voxels along two of its axes (one-slice volumes are fine).
MIN_SIDE = 8


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
    dicom_files: tuple[str, ...] | None = None  # a DICOM series' files, file k = native slice k

    def to_native_image(self, canonical: np.ndarray) -> sitk.Image:
        """A SimpleITK image of a canonical array, with the source's exact native geometry."""
        native = self.orientation.to_native(canonical)
        return image_from_array(native, self.geometry)


def _read_file(path: Path) -> sitk.Image:
    """One image file, every header check first (a pipe or an empty file is refused unopened)."""
    check_regular_file(path)
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    space = None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        space = check_nifti_header(path)
    elif is_dicom_file(path):
        return read_dicom_file(path)
    elif path.name.lower().endswith((".mha", ".mhd", ".nrrd", ".nhdr")):
        check_direction_text(path)
    with itk_warnings(space is None):  # ITK's sform warnings: covidseg checks the sform itself
        check_header(path)
        check_complete(path)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError:
            raise InputError(path, f"unreadable: {unreadable_cause(path)}") from None
    return image if space is None else follow_space(image, space)


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
    files = None
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        image, uid, note, files = read_dicom_folder(path, series)
    else:
        image = _read_file(path)
    image = _to_scalar_3d(image, path, intensity)
    check_plausible_grid(image, path)
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
        dicom_files=tuple(files) if files else None,
    )
    if identifiers:
        first_dicom = files[0] if files else path if is_dicom_file(path) else None
        volume.dicom = dicom_identifiers(first_dicom) if first_dicom is not None else None
    return volume, note


def read_labels(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a label image (file or DICOM folder): its native ``[z, y, x]`` values, as stored, and
    its geometry. Refuses multi-channel, 4D and non-finite images."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    image = read_dicom_folder(path, None)[0] if path.is_dir() else _read_file(path)
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(path, "multi-channel image; expected a label mask")
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise InputError(path, f"{image.GetDimension()}D mask; expected 3D")
    check_plausible_grid(image, path)
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
                layout = nifti_layout(fh.read(540))
        except (OSError, EOFError, zlib.error):
            layout = None
        if layout is None:
            raise incomplete(f"{size} bytes without a readable NIfTI header")
        if is_gzip and gzip_isize(tmp) != layout.expected_bytes % 2**32:
            raise incomplete(f"{size} bytes, a gzip stream without its end")
        if not is_gzip and size < layout.expected_bytes:
            raise incomplete(f"{size} of {layout.expected_bytes} bytes")
        return
    expected = metaimage_expected_bytes(tmp) if name.endswith(".mha") else None
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

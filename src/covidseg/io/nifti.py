"""NIfTI headers: the checks ITK lacks (dimensions, datatype, non-finite fields) and the
NIfTI rules for qform and sform, applied where ITK reads another geometry."""

from __future__ import annotations

import contextlib
import gzip
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from covidseg.errors import InputError
from covidseg.imaging.geometry import is_orthonormal

#: NIfTI datatype codes of floating-point voxels (ITK silently turns their NaN into 0).
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


@dataclass(frozen=True)
class NiftiLayout:
    offset: int  # byte offset of the voxel data
    data_bytes: int  # bytes of voxel data the header announces
    float_dtype: np.dtype | None  # dtype of the voxels when they are floats

    @property
    def expected_bytes(self) -> int:
        return self.offset + self.data_bytes


def nifti_layout(header: bytes) -> NiftiLayout | None:
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
    return NiftiLayout(
        offset=int(offset),
        data_bytes=voxels * max(int(bitpix), 0) // 8,
        float_dtype=None if code is None else np.dtype(order + code),
    )


#: Bits per voxel of the NIfTI datatype codes ITK reads (integers, floats, RGB, RGBA, complex64).
_NIFTI_BITPIX = {2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32, 1024: 64,
                 1280: 64, 2304: 32}  # fmt: skip


#: A NIfTI qform and sform that differ by more than this (direction cosines; mm for spacing and
#: origin) disagree: which one is right cannot be told, so the file is refused.
NIFTI_FORM_DIRECTION_TOLERANCE = 1e-3


NIFTI_FORM_MM_TOLERANCE = 0.01


_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class _Space:
    """Where the first three axes of an image lie (ITK conventions: LPS, mm)."""

    spacing: tuple[float, float, float]  # mm
    origin: tuple[float, float, float]  # mm
    direction: tuple[float, ...]  # 3x3 row-major; column i = direction of image axis i


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


def numbers_text(values) -> str:
    """'(1, 0.5, 2)': numbers as a message shows them."""
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def _sform_space(path: Path, srow: tuple[float, ...]) -> _Space:
    """The geometry an sform gives (spacing: the lengths of its columns); refuse a sheared one."""
    affine = _RAS_TO_LPS @ np.asarray(srow, dtype=np.float64).reshape(3, 4)
    with np.errstate(over="ignore"):  # NIfTI-2 doubles: an overflowing length is refused below
        spacing = np.linalg.norm(affine[:, :3], axis=0)
    if not (np.all(spacing > 0) and np.isfinite(spacing).all()):
        cause = f"invalid NIfTI header: the sform gives a voxel size of {numbers_text(spacing)} mm"
        raise InputError(path, cause)
    direction = affine[:, :3] / spacing
    if not is_orthonormal(direction):
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
            return f"qform {name} {numbers_text(q)}{unit}, sform {name} {numbers_text(s)}{unit}"
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
            cause = f"invalid NIfTI header: voxel size pixdim {numbers_text(voxel)} mm is not positive{given}"
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
def itk_warnings(shown: bool) -> Iterator[None]:
    """ITK's warnings (printed to stderr) shown or not inside the block. ITK's switch is global:
    reads in other threads at the same time may lose their warnings (never their errors)."""
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(shown and before)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


def follow_space(image: sitk.Image, space: _Space) -> sitk.Image:
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


def check_nifti_header(path: Path) -> _Space | None:
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

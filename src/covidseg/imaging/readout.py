"""The clinical read-out of a lesion mask: volumes (mL), % of lung involved, CT severity.

The CT-0..CT-4 scale is the one of the MosMedData study (Morozov et al., 2020), by the share of
lung parenchyma involved: CT-0 none, CT-1 < 25 %, CT-2 25-50 %, CT-3 50-75 %, CT-4 >= 75 %.
It is a volume share only: CT-0 in the study also requires no other signs of COVID-19 pneumonia,
which a mask cannot judge.

A grade is only as good as the lung mask it divides by, so the read-out checks the total lung
volume first. Adult lungs on a chest CT hold about 2-8 L (larger at full inspiration and in
emphysema, smaller in expiration); outside :data:`MIN_LUNG_ML`..:data:`MAX_LUNG_ML` the lung mask
itself is implausible (e.g. it took in the outside air, the table or the bowel, or lost most of
the lungs), and the case gets a ``warnings`` entry and ``severity`` None ("not graded") instead of
a CT grade. The lower bound only applies when the scan shows the whole lungs, i.e. the lung mask
touches no face of the scan (neither its first or last slice nor the edge of the field of view):
a partial scan (lungs cut by the field of view, a single slice, a crop) holds only part of the
lungs and is graded on the part it shows. The upper bound applies to every scan, since cutting the
lungs can only make them smaller.
"""

from __future__ import annotations

import numpy as np

#: (upper bound of % of lung involved, category), first match wins
SEVERITY_BANDS = ((0.0, "CT-0"), (25.0, "CT-1"), (50.0, "CT-2"), (75.0, "CT-3"))
LUNG_LABELS = {"right": 1, "left": 2}
#: total lung volume (mL, both lungs) below which whole lungs in view are implausible
MIN_LUNG_ML = 1500.0
#: total lung volume (mL, both lungs) above which any lung mask is implausible
MAX_LUNG_ML = 9000.0
#: how a case that is not graded shows in summary.csv (its JSON has ``"severity": null``)
NOT_GRADED = "not graded"


def severity(involvement_pct: float) -> str:
    """CT-0 (0 %), CT-1 (< 25 %), CT-2 (25-50 %), CT-3 (50-75 %), CT-4 (>= 75 %)."""
    if involvement_pct <= 0.0:
        return "CT-0"
    for upper, name in SEVERITY_BANDS[1:]:
        if involvement_pct < upper:
            return name
    return "CT-4"


def _pct(part_ml: float, whole_ml: float) -> float:
    return 100.0 * part_ml / whole_ml if whole_ml > 0 else 0.0


def whole_lungs_in_view(
    lungs: np.ndarray,
    offset_zyx: tuple[int, int, int] = (0, 0, 0),
    scan_shape: tuple[int, int, int] | None = None,
) -> bool:
    """Whether the scan shows the whole lungs: the lung mask touches none of the scan's faces.

    `lungs` is a ``[z, y, x]`` lung mask that covers the scan's voxels from `offset_zyx` on (a crop
    box), in a scan of `scan_shape` voxels (default: `lungs` is the whole scan). A mask that is not
    3D, holds no lung, or touches the first or last slice or the edge of the field of view is not
    whole.
    """
    if lungs.ndim != 3:
        return False
    scan_shape = tuple(lungs.shape) if scan_shape is None else tuple(scan_shape)
    in_slice = np.any(lungs.reshape(lungs.shape[0], -1), axis=1)  # two passes over the volume
    in_plane = np.any(lungs, axis=0)
    for axis, present in enumerate((in_slice, np.any(in_plane, axis=1), np.any(in_plane, axis=0))):
        index = np.flatnonzero(present)
        if index.size == 0:
            return False
        first, last = offset_zyx[axis] + int(index[0]), offset_zyx[axis] + int(index[-1])
        if first <= 0 or last >= scan_shape[axis] - 1:
            return False
    return True


def lung_volume_warning(lung_ml: float, whole_lungs: bool) -> str | None:
    """The warning for an implausible total lung volume (mL), or None when it is plausible."""
    too_large = lung_ml > MAX_LUNG_ML
    too_small = whole_lungs and lung_ml < MIN_LUNG_ML
    if not (too_large or too_small):
        return None
    return (
        f"lung volume {lung_ml / 1000:.1f} L is outside {MIN_LUNG_ML / 1000:g}-{MAX_LUNG_ML / 1000:g} L"
        f"{'' if whole_lungs else ' (lungs cut by the scan)'}: lung mask implausible, not graded"
    )


def read_out(
    lesion: np.ndarray,
    lungs: np.ndarray,
    voxel_ml: float,
    offset_zyx: tuple[int, int, int] = (0, 0, 0),
    scan_shape: tuple[int, int, int] | None = None,
) -> dict:
    """Volumes and involvement of one CT.

    Args:
        lesion: bool lesion mask (any shape, the same as `lungs`).
        lungs: uint8 lung labels, 1 right and 2 left lung.
        voxel_ml: volume of one voxel in mL.
        offset_zyx, scan_shape: where `lungs` lies in the scan when it is a crop of it (see
            :func:`whole_lungs_in_view`); by default `lungs` is the whole scan.

    Returns:
        ``lesion_ml``, ``lung_ml``, ``involvement_pct``, ``severity`` (CT-0..CT-4, or None when
        not graded) and ``warnings`` (a list of one-line reasons, empty for a plausible lung
        mask) for both lungs together, and the first three per lung under ``right`` / ``left``.
        Volumes rounded to 0.01 mL.
    """
    out: dict = {}
    total_lesion = total_lung = 0.0
    for name, label in LUNG_LABELS.items():
        in_lung = lungs == label
        lung_ml = float(np.count_nonzero(in_lung)) * voxel_ml
        lesion_ml = float(np.count_nonzero(lesion & in_lung)) * voxel_ml
        total_lesion, total_lung = total_lesion + lesion_ml, total_lung + lung_ml
        out[name] = {
            "lesion_ml": round(lesion_ml, 2),
            "lung_ml": round(lung_ml, 2),
            "involvement_pct": round(_pct(lesion_ml, lung_ml), 3),
        }
    involvement = _pct(total_lesion, total_lung)
    warning = lung_volume_warning(total_lung, whole_lungs_in_view(lungs, offset_zyx, scan_shape))
    return {
        "lesion_ml": round(total_lesion, 2),
        "lung_ml": round(total_lung, 2),
        "involvement_pct": round(involvement, 3),
        "severity": None if warning else severity(involvement),
        "warnings": [warning] if warning else [],
        **out,
    }

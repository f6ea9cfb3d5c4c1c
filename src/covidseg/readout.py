"""The clinical read-out of a lesion mask: volumes (mL), % of lung involved, CT severity.

The CT-0..CT-4 scale is the one of the MosMedData study (Morozov et al., 2020), by the share of
lung parenchyma involved: CT-0 none, CT-1 < 25 %, CT-2 25-50 %, CT-3 50-75 %, CT-4 >= 75 %.
It is a volume share only: CT-0 in the study also requires no other signs of COVID-19 pneumonia,
which a mask cannot judge.
"""

from __future__ import annotations

import numpy as np

#: (upper bound of % of lung involved, category), first match wins
SEVERITY_BANDS = ((0.0, "CT-0"), (25.0, "CT-1"), (50.0, "CT-2"), (75.0, "CT-3"))
LUNG_LABELS = {"right": 1, "left": 2}


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


def read_out(lesion: np.ndarray, lungs: np.ndarray, voxel_ml: float) -> dict:
    """Volumes and involvement of one CT.

    Args:
        lesion: bool lesion mask (any shape, the same as `lungs`).
        lungs: uint8 lung labels, 1 right and 2 left lung.
        voxel_ml: volume of one voxel in mL.

    Returns:
        ``lesion_ml``, ``lung_ml``, ``involvement_pct`` and ``severity`` for both lungs together,
        and the same per lung under ``right`` / ``left``. Volumes rounded to 0.01 mL.
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
    return {
        "lesion_ml": round(total_lesion, 2),
        "lung_ml": round(total_lung, 2),
        "involvement_pct": round(involvement, 3),
        "severity": severity(involvement),
        **out,
    }

"""DICOM Segmentation objects (SEG) over a source CT series, written and read with highdicom.

A SEG written here is one binary Segmentation instance (``<id>.seg.dcm``) that a PACS viewer, OHIF
or 3D Slicer shows on top of the series it was made from:

* it references the source: the same Study Instance UID and patient/study modules (copied by
  highdicom from the source headers: that is what links it to the study), the Frame of Reference
  UID, and per frame the source SOP Instance UID it lies on;
* segment 1 "COVID-19 lesion": category Morphologically Abnormal Structure (SCT 49755003), type
  Lesion (SCT 52988006), anatomic region Lung (SCT 39607008); optionally segment 2 "Lungs":
  Anatomical Structure (SCT 91723000) / Lung (SCT 39607008);
* algorithm type AUTOMATIC, algorithm name "covidseg", version "<covidseg version> model
  <first 12 hex digits of the model's sha256>", family Artificial Intelligence (DCM 123110);
* frames only where a segment is present (a series without lesions gets every frame, empty: a
  valid SEG that says "nothing found").

Masks are given in the *native* slice order of the series: ``mask[k]`` lies on ``files[k]``, the
order :func:`covidseg.io.dicom.read_dicom_folder` read them in ([slice, row, column], as SimpleITK's
array of the series).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidseg.errors import InputError
from covidseg.io.atomic import atomic_path

#: What a SEG's file name ends with.
SEG_SUFFIX = ".seg.dcm"
#: Series Number of the SEG series (a fixed high number: viewers list it after the CT's series).
SEG_SERIES_NUMBER = 9901
LESION_LABEL = "COVID-19 lesion"
#: Type 2 attributes of the patient and study modules a SEG copies from its source: a source
#: without one (de-identified collections drop them) gets it empty in the SEG, as DICOM allows.
EMPTY_IF_ABSENT = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip
#: The UIDs of each source slice a SEG refers to; a series without one of them (some de-identified
#: collections empty them) or with one that is not a valid UID cannot carry a SEG.
LINKING_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
LUNGS_LABEL = "Lungs"


@dataclass(frozen=True)
class SegSegment:
    """One segment of a SEG: its label and a binary mask in the series' native slice order."""

    label: str  # LESION_LABEL or LUNGS_LABEL
    mask: np.ndarray  # [slices, rows, columns] bool/0-1, mask[k] on the series' file k


def _description(number: int, segment: SegSegment, algorithm_version: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if segment.label == LESION_LABEL:
        category, kind = codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion
    elif segment.label == LUNGS_LABEL:
        category, kind = codes.SCT.AnatomicalStructure, codes.SCT.Lung
    else:
        raise ValueError(f"unknown segment {segment.label!r}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="covidseg", family=codes.cid7162.ArtificialIntelligence, version=algorithm_version
    )
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=segment.label,
        segmented_property_category=category,
        segmented_property_type=kind,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[codes.SCT.Lung] if segment.label == LESION_LABEL else None,
    )


def read_source_headers(files: Sequence[str | Path]) -> list:
    """The pydicom headers (no pixel data) of a series' files, checked for what a SEG needs to be
    linked to them (Study, Series, SOP Instance and Frame of Reference UIDs)."""
    import pydicom

    with warnings.catch_warnings():  # pydicom warns per bad value (on reading and on access)
        warnings.simplefilter("ignore")  # the checks below name the first one once
        return [_checked_header(pydicom, path) for path in files]


def _checked_header(pydicom, path: str | Path):
    """One source header for a SEG, or InputError naming `path` and what it lacks."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(path, f"unreadable DICOM header for the SEG ({exc})") from None
    for keyword in LINKING_UIDS:
        value = str(header.get(keyword, "")).strip()
        if not value:
            raise InputError(path, f"no {keyword}: a DICOM SEG cannot be linked to this series")
        if not pydicom.uid.UID(value).is_valid:
            cause = f"{keyword} {value[:64]!r} is not a valid DICOM UID: a DICOM SEG cannot reference it"
            raise InputError(path, cause)
    for keyword in EMPTY_IF_ABSENT:  # Type 2: present, may be empty (de-identified series drop them)
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def write_dicom_seg(
    path: Path,
    headers: Sequence,
    segments: Sequence[SegSegment],
    series_description: str,
    algorithm_version: str,
) -> None:
    """Write one binary SEG over the source series to `path`, atomically.

    `headers`: the series' headers in native slice order, from :func:`read_source_headers` (read
    before the case is computed, so a series a SEG cannot reference fails at once).
    `series_description` is cut to the 64 characters DICOM allows; `algorithm_version` names the
    covidseg version and the model (its sha256). Raises ValueError for masks that do not match the
    series.
    """
    import highdicom as hd

    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    stacked = np.stack([np.asarray(s.mask, dtype=bool) for s in segments], axis=-1)  # [k, r, c, seg]
    if stacked.shape[:3] != (len(headers), rows, columns):
        raise ValueError(
            f"masks {stacked.shape[:3]} do not match the series ({len(headers)}, {rows}, {columns})"
        )
    seg = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=stacked.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_description(i, s, algorithm_version) for i, s in enumerate(segments, 1)],
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="covidseg",
        manufacturer_model_name="covidseg",
        software_versions=algorithm_version[:64],
        device_serial_number="none",
        series_description=series_description[:64],
        content_label="COVIDSEG",
        omit_empty_frames=bool(stacked.any()),  # all empty: every frame, a SEG that found nothing
    )
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)


def read_dicom_seg(path: Path, files: Sequence[str | Path]) -> dict[str, np.ndarray]:
    """The segments of a SEG written over the series `files`, as bool masks [slices, rows, columns]
    in the order of `files` (label -> mask); a slice the SEG has no frame for is empty."""
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(path)
    with warnings.catch_warnings():  # the sources passed read_source_headers' checks
        warnings.simplefilter("ignore")
        uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    out = {}
    for number in seg.segment_numbers:
        label = seg.get_segment_description(number).segment_label
        pixels = seg.get_pixels_by_source_instance(
            uids, segment_numbers=[number], ignore_spatial_locations=True
        )  # [slices, rows, columns, 1]; zeros where the SEG has no frame
        out[label] = pixels[..., 0] > 0
    return out

"""DICOM SEG outputs (`predict --format dicom-seg|both`, covidseg.io.dicom_seg): a SEG read back
with highdicom holds the NIfTI mask voxel for voxel in the source's slice order and references the
source series; bad requests are refused before anything runs."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from _small_inputs import SHAPE, SPACING, invoke
from conftest import write_dicom_series
from covidseg.errors import InputError
from covidseg.imaging.phantom import make_phantom
from covidseg.io.dicom_seg import (
    LESION_LABEL,
    LUNGS_LABEL,
    SegSegment,
    read_dicom_seg,
    read_source_headers,
    write_dicom_seg,
)

SERIES_UID = "1.2.826.0.1.3680043.2.1125.61"
STUDY_UID = "1.2.826.0.1.3680043.2.1125.99"  # what write_dicom_series writes
FRAME_OF_REFERENCE = "1.2.826.0.1.3680043.2.1125.62"
PATIENT = {"0010|0010": "Quartermaine^Zebedee", "0010|0020": "PID-77812345", "0020|0052": FRAME_OF_REFERENCE}
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: Type 1 attributes of the Segmentation IOD's modules a viewer needs to place and name the SEG.
REQUIRED = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
    "Modality", "SeriesNumber", "InstanceNumber", "ImageType", "SamplesPerPixel", "Rows", "Columns",
    "NumberOfFrames", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "PhotometricInterpretation", "SegmentationType", "SegmentSequence", "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence", "DimensionOrganizationSequence", "ReferencedSeriesSequence",
    "ContentLabel", "PixelData",
)  # fmt: skip


def _series_files(folder) -> list[str]:
    """The series' files in the order covidseg reads them (native slice k = file k)."""
    from covidseg.io.dicom import read_dicom_folder

    return read_dicom_folder(folder, None)[3]


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A COVID phantom as a DICOM series (file names shuffled) whose headers name a patient."""
    folder = tmp_path_factory.mktemp("seg") / "in" / "scan"
    hu = make_phantom(SHAPE, SPACING, covid=True, seed=3).hu
    write_dicom_series(folder, hu, SPACING, series_uid=SERIES_UID, extra_tags=PATIENT)
    return folder


@pytest.fixture(scope="module")
def predicted(series, model_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_out")
    result = invoke("predict", str(series), "-o", str(out), "--model", str(model_onnx), "--format", "both",
                    "--seg-lungs", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_the_seg_holds_the_nifti_mask_in_the_source_slice_order(series, predicted):
    files = _series_files(series)
    segments = read_dicom_seg(predicted / "scan.seg.dcm", files)
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(predicted / "scan.nii.gz"))) > 0  # native [z, y, x]
    assert 0 < nifti.sum() < nifti.size  # the check below sees lesions and background
    np.testing.assert_array_equal(segments[LESION_LABEL], nifti)
    lungs = segments[LUNGS_LABEL]
    assert lungs.sum() > nifti.sum() and not (nifti & ~lungs).any()  # lesions lie in the lungs


def test_the_seg_references_the_source_series_and_carries_the_required_attributes(series, predicted):
    seg = pydicom.dcmread(predicted / "scan.seg.dcm")
    missing = [name for name in REQUIRED if name not in seg or seg.data_element(name).value in (None, "")]
    assert missing == []
    assert seg.SOPClassUID == SEG_STORAGE and seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (STUDY_UID, FRAME_OF_REFERENCE)
    assert seg.SeriesInstanceUID != SERIES_UID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == SERIES_UID
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in _series_files(series)}
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedInstanceSequence} == sources
    for frame in seg.PerFrameFunctionalGroupsSequence:  # every frame lies on a source slice
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert str(uid) in sources
    lesion, lungs = seg.SegmentSequence
    assert (lesion.SegmentLabel, lesion.SegmentAlgorithmType, lungs.SegmentLabel) == (
        LESION_LABEL, "AUTOMATIC", LUNGS_LABEL,
    )  # fmt: skip
    assert lesion.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # SCT Lesion
    assert lungs.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"  # SCT Lung
    algorithm = lesion.SegmentationAlgorithmIdentificationSequence[0]
    record = json.loads((predicted / "scan.json").read_text(encoding="utf-8"))
    assert algorithm.AlgorithmName == "covidseg" and record["model_sha256"][:12] in algorithm.AlgorithmVersion
    assert f"{record['lesion_ml']:.1f} mL" in seg.SeriesDescription and len(seg.SeriesDescription) <= 64
    assert record["outputs"]["seg"] == "scan.seg.dcm"


def test_only_the_seg_carries_the_patient_and_the_other_outputs_stay_free_of_it(predicted):
    seg = pydicom.dcmread(predicted / "scan.seg.dcm")
    assert str(seg.PatientName) == "Quartermaine^Zebedee"  # the patient module links it to the study
    for path in predicted.iterdir():
        if path.suffix in (".json", ".csv"):
            assert b"quartermaine" not in path.read_bytes().lower(), path.name


def test_dicom_seg_alone_writes_no_nifti_and_continue_skips_the_finished_case(series, model_onnx, tmp_path):
    args = ["predict", str(series), "-o", str(tmp_path), "--model", str(model_onnx), "--format", "dicom-seg",
            "--no-progress"]  # fmt: skip
    assert invoke(*args).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("scan")) == [
        "scan.json",
        "scan.seg.dcm",
    ]
    again = invoke(*args, "--continue")
    assert again.exit_code == 0 and "1 already done" in again.output


def test_a_non_dicom_input_or_a_lone_seg_lungs_is_a_usage_error(model_onnx, tmp_path):
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 16, 16), -800, np.int16)), str(ct))
    out = tmp_path / "out"
    result = invoke("predict", str(ct), "-o", str(out), "--model", str(model_onnx), "--format", "dicom-seg")
    assert result.exit_code == 2 and "ct.nii.gz" in result.output and "not a DICOM series" in result.output
    assert not out.exists()
    lone = invoke("predict", str(ct), "-o", str(out), "--model", str(model_onnx), "--seg-lungs")
    assert lone.exit_code == 2 and "--seg-lungs" in lone.output
    bad = invoke("predict", str(ct), "-o", str(out), "--model", str(model_onnx), "--format", "dicom")
    assert bad.exit_code == 2 and '--format "dicom": must be one of nifti, dicom-seg, both' in bad.output


def test_a_series_without_lesions_gets_a_valid_seg_with_an_empty_segment(series, tmp_path):
    files = _series_files(series)
    empty = np.zeros((len(files), *SHAPE[1:]), dtype=bool)
    segments = [SegSegment(LESION_LABEL, empty)]
    write_dicom_seg(tmp_path / "empty.seg.dcm", read_source_headers(files), segments, "none", "0 model x")
    seg = pydicom.dcmread(tmp_path / "empty.seg.dcm")
    assert int(seg.NumberOfFrames) == len(files)  # every frame, empty: "nothing found", not "not run"
    assert not read_dicom_seg(tmp_path / "empty.seg.dcm", files)[LESION_LABEL].any()


def test_a_series_without_a_frame_of_reference_is_refused_naming_the_file(tmp_path, model_onnx):
    folder = tmp_path / "noref"
    write_dicom_series(folder, make_phantom(SHAPE, SPACING, covid=True, seed=3).hu, SPACING)
    files = _series_files(folder)
    with pytest.raises(InputError, match="no FrameOfReferenceUID: a DICOM SEG cannot be linked"):
        read_source_headers(files)
    out = tmp_path / "out"  # predict fails the case before computing it, and writes none of its files
    result = invoke("predict", str(folder), "-o", str(out), "--model", str(model_onnx), "--format", "both")
    assert result.exit_code == 1
    assert "no FrameOfReferenceUID" in (out / "summary.csv").read_text(encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == [".covidseg-predict.lock", "report.json", "summary.csv"]


def test_a_series_with_an_invalid_uid_is_refused_naming_the_file_and_the_uid(tmp_path):
    folder = tmp_path / "uuid"
    tags = {"0020|0052": FRAME_OF_REFERENCE, "0020|000d": "896911bf-1143-4c8d-8f04-f3cd1a7f6204"}
    write_dicom_series(folder, np.full((4, 16, 16), -800, np.int16), extra_tags=tags)
    files = _series_files(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the one clear line, not pydicom's warning per bad value
        with pytest.raises(InputError, match="StudyInstanceUID '896911bf-1143.*' is not a valid DICOM UID"):
            read_source_headers(files)

"""Untrusted environments and patient data: no network at run time; no patient data in outputs.

The whole pipeline runs with Python's sockets blocked; a DICOM series whose headers carry a patient
name, ID, birth date and accession number is preprocessed and predicted, and no output file holds
any of them (read as bytes and, for gzip files, decompressed) unless `predict --keep-metadata`
asks for the documented identifiers in the case JSON.
"""

from __future__ import annotations

import gzip
import json
import socket
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import one_torch_thread, write_dicom_series
from covidseg.cli import app
from covidseg.imaging.geometry import axis_aligned_geometry
from covidseg.imaging.phantom import make_phantom
from covidseg.io import DICOM_IDENTIFIERS, read_ct, write_array
from covidseg.stages.synth import centred_origin

runner = CliRunner()
SHAPE, SPACING = (28, 96, 96), (10.0, 3.75, 3.75)  # small phantoms: a second each

PATIENT = {  # DICOM tag -> value; none of these may leave the input unless asked
    "0010|0010": "Quartermaine^Zebedee",  # PatientName
    "0010|0020": "PID-77812345",  # PatientID
    "0010|0030": "19480229",  # PatientBirthDate
    "0008|0050": "ACC99887766",  # AccessionNumber
    "0008|0020": "20200315",  # StudyDate
}
SECRETS = [b"quartermaine", b"zebedee", b"pid-77812345", b"19480229", b"acc99887766"]
SERIES_UID = "1.2.826.0.1.3680043.2.1125.42"
STUDY_UID = "1.2.826.0.1.3680043.2.1125.99"  # what write_dicom_series writes


def _invoke(*args: str):
    result = runner.invoke(app, [*args, "--no-progress"] if args[0] != "export" else list(args))
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def no_network(monkeypatch) -> list[str]:
    """Block every way Python opens a connection or resolves a name; record each attempt (so an
    attempt swallowed by an `except` still fails the test)."""
    attempts: list[str] = []

    def refuse(what: str):
        def blocked(*args, **kwargs):
            attempts.append(f"{what}{args!r}")
            raise OSError(f"network access blocked by the test: {what}")

        return blocked

    monkeypatch.setattr(socket, "socket", refuse("socket.socket"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    monkeypatch.setattr(socket, "socketpair", refuse("socket.socketpair"))
    return attempts


def test_the_whole_pipeline_runs_without_network(no_network, tmp_path):
    with pytest.raises(OSError, match="blocked"):  # the guard is in place
        socket.create_connection(("example.org", 443))
    no_network.clear()
    s, pre, gan, masks, seg = (tmp_path / n for n in ("synth", "pre", "gan", "masks", "seg"))
    with one_torch_thread():
        _invoke("synth", "-o", str(s), "--healthy", "2", "--covid", "2", "--seed", "1",
                "--shape", "28,96,96", "--spacing", "10,3.75,3.75")  # fmt: skip
        _invoke("preprocess", "-o", str(pre), "--healthy", str(s / "healthy"), "--covid", str(s / "covid"),
                "--grid", "8,32,32")  # fmt: skip
        _invoke("train-gan", str(pre), "-o", str(gan), "--preset", "tiny", "--steps", "2", "--crop", "none",
                "--batch-size", "1", "--checkpoint-every", "2", "--device", "cpu")  # fmt: skip
        _invoke("make-masks", str(pre), "--gan", str(gan), "-o", str(masks), "--device", "cpu")
        _invoke("train-seg", str(masks), "-o", str(seg), "--steps", "2", "--batch-size", "4",
                "--eval-every", "2", "--device", "cpu")  # fmt: skip
        _invoke("export", str(seg), "-o", str(tmp_path / "model.onnx"))
        model = str(tmp_path / "model.onnx")
        _invoke(
            "predict", str(s / "covid"), "-o", str(tmp_path / "pred"), "--model", model, "--device", "cpu"
        )
        _invoke("evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(s / "manifest.json"),
                "-o", str(tmp_path / "eval"))  # fmt: skip
    assert no_network == []
    assert json.loads((tmp_path / "pred" / "report.json").read_text())["predicted"] == 2


def _leaks(folder: Path) -> list[str]:
    """(file, secret) for every patient detail found in any file under `folder`."""
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data += gzip.decompress(data)
        data = data.lower()
        found += [f"{path.name}: {secret.decode()}" for secret in SECRETS if secret in data]
    return found


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory) -> Path:
    """A DICOM series of a COVID phantom whose headers name a patient (the folder name does not)."""
    root = tmp_path_factory.mktemp("privacy")
    hu = make_phantom(SHAPE, SPACING, covid=True, seed=3).hu
    write_dicom_series(root / "in" / "series", hu, SPACING, series_uid=SERIES_UID, extra_tags=PATIENT)
    return root / "in" / "series"


def test_the_test_series_carries_the_patient_details(dicom_case):
    assert _leaks(dicom_case)  # the scan below would catch a leak
    volume, _ = read_ct(dicom_case)
    assert volume.dicom is None  # read_ct keeps no header field unless asked


def test_preprocess_and_predict_outputs_hold_no_patient_details(dicom_case, model_pt, tmp_path):
    with one_torch_thread():
        _invoke("preprocess", "-o", str(tmp_path / "pre"), "--covid", str(dicom_case.parent))
        _invoke("predict", str(dicom_case.parent), "-o", str(tmp_path / "pred"), "--model", str(model_pt),
                "--probabilities", "--snapshots", "--device", "cpu")  # fmt: skip
    assert len(list((tmp_path / "pre").rglob("*.npy"))) == 2
    assert {p.name for p in (tmp_path / "pred").iterdir()} == {
        "series.nii.gz", "series_probability.nii.gz", "series.png", "series.json",
        "summary.csv", "report.json", ".covidseg-predict.lock",
    }  # fmt: skip
    assert _leaks(tmp_path / "pre") == [] and _leaks(tmp_path / "pred") == []
    assert "dicom" not in json.loads((tmp_path / "pred" / "series.json").read_text())


def test_keep_metadata_copies_the_documented_identifiers_into_the_case_json(dicom_case, model_pt, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "series").symlink_to(dicom_case, target_is_directory=True)
    hu = make_phantom(SHAPE, SPACING, covid=True, seed=4).hu.astype(np.int16)
    write_array(
        inputs / "plain.nii.gz", hu, axis_aligned_geometry(SHAPE, SPACING, centred_origin(SHAPE, SPACING))
    )
    out = tmp_path / "pred"
    with one_torch_thread():
        _invoke("predict", str(inputs), "-o", str(out), "--model", str(model_pt), "--keep-metadata",
                "--device", "cpu")  # fmt: skip
    record = json.loads((out / "series.json").read_text())
    assert record["dicom"] == {
        "PatientName": "Quartermaine^Zebedee",
        "PatientID": "PID-77812345",
        "StudyInstanceUID": STUDY_UID,
        "SeriesInstanceUID": SERIES_UID,
        "StudyDate": "20200315",
        "AccessionNumber": "ACC99887766",
    }
    assert set(record["dicom"]) == set(DICOM_IDENTIFIERS)  # the birth date is not among them
    assert json.loads((out / "plain.json").read_text())["dicom"] is None  # not a DICOM input
    # only the case JSON holds them: not the mask, the summary or the batch report
    leaks = _leaks(out)
    assert leaks and all(line.startswith("series.json: ") for line in leaks)
    assert "19480229" not in (out / "series.json").read_text()

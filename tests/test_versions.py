"""covidseg.versions: one lookup of the software versions that predict, doctor and demo report."""

from __future__ import annotations

import platform
import subprocess
import sys

import numpy as np
import pytest

from covidseg import __version__
from covidseg.versions import SOFTWARE, software_versions


def test_every_version_is_the_installed_one():
    import onnxruntime
    import SimpleITK
    import torch

    assert software_versions() == {
        "covidseg": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "SimpleITK": SimpleITK.Version_VersionString(),
        "numpy": np.__version__,
    }
    assert tuple(software_versions()) == SOFTWARE


def test_names_are_listed_in_the_order_asked_and_unknown_ones_refused():
    assert list(software_versions(("SimpleITK", "python"))) == ["SimpleITK", "python"]
    assert software_versions(()) == {}
    with pytest.raises(KeyError):
        software_versions(("tensorflow",))


def test_only_the_modules_asked_for_are_imported():
    code = (
        "import sys; from covidseg.versions import software_versions; "
        "software_versions(('covidseg', 'python', 'platform')); "
        "print(*(m in sys.modules for m in ('torch', 'onnxruntime', 'SimpleITK')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False", "False"]


def test_doctor_keeps_its_keys(tmp_path, monkeypatch):
    from covidseg.stages.doctor import run_doctor

    monkeypatch.setenv("COVIDSEG_HOME", str(tmp_path / "home"))
    found = run_doctor()
    assert set(found) == {
        "covidseg", "python", "platform", "torch", "torch_cuda_build", "cuda_available", "cuda_devices",
        "onnxruntime", "onnxruntime_providers", "SimpleITK", "home",
    }  # fmt: skip
    assert {k: found[k] for k in ("covidseg", "torch", "SimpleITK")} == software_versions(
        ("covidseg", "torch", "SimpleITK")
    )

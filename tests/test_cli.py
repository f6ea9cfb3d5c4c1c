"""The command line as a user runs it: synth -> preprocess -> evaluate, exit codes, help."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from covidseg.cli import app

runner = CliRunner()


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "covidseg", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "synth"
    result = _run(
        "synth", "-o", str(out), "--healthy", "1", "--covid", "2", "--seed", "5",
        "--shape", "28,96,96", "--spacing", "10,3.75,3.75", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = ("synth", "preprocess", "evaluate", "train-gan", "make-masks", "train-seg", "export")
    for command in (*commands, "predict", "merge-reports", "doctor", "run", "demo"):
        assert command in result.output


def test_synth_preprocess_evaluate_chain(synth_dir, tmp_path):
    pre = tmp_path / "pre"
    result = _run(
        "preprocess", "--healthy", str(synth_dir / "healthy"), "--covid", str(synth_dir / "covid"),
        "--masks", str(synth_dir / "masks"), "-o", str(pre), "--grid", "16,64,64", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(json.loads((pre / "manifest.json").read_text())["cases"]) == 3

    # ground truth against itself: Dice 1.0
    ev = tmp_path / "eval"
    result = _run(
        "evaluate",
        "--pred",
        str(synth_dir / "masks"),
        "--ref",
        str(synth_dir / "manifest.json"),
        "-o",
        str(ev),
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["n_cases"] == 2
    assert summary["aggregate"]["metrics"]["dice"]["mean"] == 1.0
    assert summary["aggregate"]["pooled"]["dice"] == 1.0

    # an impossible threshold fails the job (exit 1) but still writes the report
    ev2 = tmp_path / "eval2"
    result = _run(
        "evaluate", "--pred", str(synth_dir / "masks"), "--ref", str(synth_dir / "masks"), "-o", str(ev2),
        "--min-dice", "1.1",
    )  # fmt: skip
    assert result.returncode == 1
    assert (ev2 / "summary.json").exists() and (ev2 / "metrics.csv").exists()


def test_a_broken_case_fails_alone_with_one_line(synth_dir, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(synth_dir / "covid", inputs)
    (inputs / "zz_broken.nii.gz").write_bytes(b"")
    result = runner.invoke(
        app,
        [
            "preprocess",
            "--covid",
            str(inputs),
            "-o",
            str(tmp_path / "pre"),
            "--grid",
            "8,32,32",
            "--no-progress",
        ],
    )
    assert result.exit_code == 1
    assert "zz_broken.nii.gz: empty file (0 bytes)" in result.output
    manifest = json.loads((tmp_path / "pre" / "manifest.json").read_text())
    assert [c["id"] for c in manifest["cases"]] == ["covid_000", "covid_001"]


@pytest.mark.parametrize(
    "args",
    [
        ["preprocess", "-o", "x"],  # neither --healthy nor --covid
        ["preprocess", "--covid", "/nonexistent/folder", "-o", "x"],
        ["preprocess", "--covid", ".", "-o", "x", "--grid", "32,128"],
        ["preprocess", "--covid", ".", "-o", "x", "--intensity", "window:5,1"],
        ["synth", "-o", "x", "--shape", "4,4"],
        ["evaluate", "--pred", "a"],  # missing options
    ],
)
def test_usage_errors_exit_2(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("covidseg ")


def test_evaluate_against_a_preprocess_manifest(synth_dir, tmp_path):
    pre = tmp_path / "pre"
    assert runner.invoke(
        app, ["preprocess", "--covid", str(synth_dir / "covid"), "--masks", str(synth_dir / "masks"),
              "-o", str(pre), "--grid", "8,32,32", "--no-progress"],
    ).exit_code == 0  # fmt: skip
    result = runner.invoke(
        app, ["evaluate", "--pred", str(synth_dir / "masks"), "--ref", str(pre), "-o", str(tmp_path / "ev")]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["n_cases"] == 2

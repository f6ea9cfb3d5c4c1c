"""The command line as a user runs it: synth -> preprocess -> evaluate, exit codes, help."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import typer
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


COMMANDS = [
    "synth", "preprocess", "evaluate", "train-gan", "make-masks", "train-seg", "export", "predict",
    "merge-reports", "run", "demo", "doctor",
]  # fmt: skip


def _listed_commands(cli: typer.Typer) -> list[str]:
    """The command names in the Commands panel of `cli --help` (the first word of each row that
    starts one; a wrapped description continues with a blank first column)."""
    result = CliRunner().invoke(cli, ["--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    panel = result.output.split("Commands")[1].split("╰")[0]
    rows = [line.strip("│ ").split() for line in panel.splitlines()[1:]]
    return [row[0] for row in rows if row and not row[0].startswith(("-", "("))]


def test_help_lists_every_command():
    assert [c.name for c in typer.main.get_command(app).commands.values()] == COMMANDS
    assert _listed_commands(app) == COMMANDS


def test_the_command_check_fails_when_a_command_disappears():
    """`run`'s help names six other commands: a substring check would not notice them missing."""
    for gone in COMMANDS:
        smaller = typer.Typer(cls=type(typer.main.get_command(app)))
        smaller.registered_callback = app.registered_callback
        smaller.registered_commands = [c for c in app.registered_commands if _name(c) != gone]
        assert _listed_commands(smaller) == [c for c in COMMANDS if c != gone]


def _name(info) -> str:
    return info.name or info.callback.__name__.replace("_", "-")


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_help_shows_no_type_beside_flags(command):
    """Flags take no value: no `<bool>` beside them in --help; options with a value keep their type."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "<bool>" not in result.output
    if command == ["demo"]:
        assert "<path>" in result.output and "<int>" in result.output


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


def test_evaluate_shows_progress_unless_no_progress(synth_dir, tmp_path):
    args = ["evaluate", "--pred", str(synth_dir / "masks"), "--ref", str(synth_dir / "masks")]
    shown = runner.invoke(app, [*args, "-o", str(tmp_path / "a")])
    quiet = runner.invoke(app, [*args, "-o", str(tmp_path / "b"), "--no-progress"])
    assert shown.exit_code == quiet.exit_code == 0, shown.output + quiet.output
    assert "evaluate" in shown.stderr and "2/2" in shown.stderr and "covid_001: dice 1.000" in shown.stderr
    assert quiet.stderr == ""

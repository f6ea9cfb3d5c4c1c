"""The quick `covidseg demo`: a self-contained HTML report and the Dice floor a CI job checks."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from covidseg.cli import app

runner = CliRunner()

QUICK_MIN_DICE = 0.10  # the quick demo reaches about 0.23 on its two test phantoms (β = 4)


def test_quick_demo_writes_a_self_contained_report_that_passes_a_dice_floor(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--quick", "-o", str(out), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output
    text = (out / "report.html").read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") >= 3  # loss curves and overlays embedded
    for external in ("http://", "https://", "<script", "<link"):
        assert external not in text
    numbers = json.loads((out / "report.json").read_text())
    assert set(numbers["methods"]) == {
        "TransUNet (label-free)",
        "GAN pseudo-masks",
        "baseline: HU > -600 in the lung",
    }
    check = ["evaluate", "--pred", str(out / "work" / "pred"), "--ref", str(out / "phantoms" / "test"),
             "-o", str(tmp_path / "ci")]  # fmt: skip
    passed = runner.invoke(app, [*check, "--min-dice", str(QUICK_MIN_DICE)])
    assert passed.exit_code == 0, passed.output
    failed = runner.invoke(app, [*check, "--min-dice", "0.9", "--overwrite"])
    assert failed.exit_code == 1 and "threshold not met" in failed.output

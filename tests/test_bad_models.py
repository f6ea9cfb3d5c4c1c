"""Malformed model files and sidecars, through the real command line (docs/robustness.md).

A model is checked once, when it is opened and before any case runs: every preprocessing value of a
sidecar or checkpoint (types, finiteness, ranges), an ONNX model's input and output against its
sidecar, a checkpoint's architecture, the size its config asks for and that its weights fit it.
Each defect is one line naming the file and the cause, exit 1, and nothing written; `doctor` lists a
broken model of the model home, goes on with the others and exits 1.

The sha256 in a sidecar covers the .onnx only, so every sidecar edit here keeps it matching.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import ct_like
from covidseg.imaging.geometry import axis_aligned_geometry
from covidseg.inference.onnx import sha256_of, sidecar_path
from covidseg.io import write_array
from covidseg.models.segmenters import make_segmenter
from test_bad_inputs import cli, error_line, snapshot

# model_pt, model_onnx: tests/conftest.py (session fixtures; the tests below edit copies)


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    """Any CT file: the model is refused before it is read."""
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    write_array(path, ct_like((6, 20, 24)), axis_aligned_geometry((6, 20, 24), (2.0, 1.0, 1.0)))
    return path


def _predict(ct: Path, model: Path, out: Path):
    return cli("predict", ct, "-o", out, "--model", model, "--no-progress")


def _copy_onnx(model_onnx: Path, folder: Path, edit=None, name: str = "m") -> Path:
    """model.onnx copied to FOLDER/NAME.onnx with its sidecar, `edit(sidecar)` applied to the copy."""
    onnx = folder / f"{name}.onnx"
    shutil.copy(model_onnx, onnx)
    sidecar = json.loads(sidecar_path(model_onnx).read_text())
    if edit:
        edit(sidecar)
    sidecar_path(onnx).write_text(json.dumps(sidecar))  # NaN and Infinity as JSON allows them
    return onnx


def _set(*keys_and_value):
    """An edit that sets sidecar[k1][k2]... = value."""
    *keys, last, value = keys_and_value

    def edit(data: dict) -> None:
        for key in keys:
            data = data[key]
        data[last] = value

    return edit


# (edit of the sidecar, the cause the one error line must carry)
SIDECAR_EDITS = {
    "slab_mm 0.01": (
        _set("preprocessing", "slab_mm", 0.01),
        r"slab_mm = 0\.01: must be a number in \[0\.5, 500\] mm",
    ),
    "slab_mm NaN": (
        _set("preprocessing", "slab_mm", float("nan")),
        r"slab_mm = nan: must be a number in \[0\.5, 500\] mm",
    ),
    "slice_size 8192": (
        _set("preprocessing", "slice_size", [8192, 8192]),
        r"slice_size = \[8192, 8192\]: must be two whole numbers in 16\.\.1024, multiples of 16",
    ),
    "slice_size not a multiple of 16": (
        _set("preprocessing", "slice_size", [120, 128]),
        r"slice_size = \[120, 128\]: must be two whole numbers in 16\.\.1024, multiples of 16",
    ),
    "HU window -Inf": (
        _set("preprocessing", "hu_window", [float("-inf"), 400]),
        r"hu_window = \[-inf, 400\]: must be two numbers \[lo, hi\] in \[-2000, 4000\] HU",
    ),
    "HU window NaN": (
        _set("preprocessing", "hu_window", [-1000, float("nan")]),
        r"hu_window = \[-1000, nan\]: must be two numbers",
    ),
    "HU window reversed": (
        _set("preprocessing", "hu_window", [400, -1000]),
        r"hu_window = \[400, -1000\]: must be two numbers \[lo, hi\] .* with lo < hi",
    ),
    "margin Inf": (
        _set("preprocessing", "margin_mm", float("inf")),
        r"margin_mm = inf: must be a number in \[0, 100\] mm",
    ),
    "threshold 1": (
        _set("preprocessing", "threshold", 1.0),
        r"threshold = 1\.0: must be a number in \(0, 1\)",
    ),
    "threshold as text": (
        _set("preprocessing", "threshold", "0.5"),
        r'threshold = "0\.5": must be a number in \(0, 1\)',
    ),
    "huge closing radius": (
        _set("preprocessing", "lungs", "closing_mm", 1e6),
        r"lungs\.closing_mm = 1000000\.0: must be a number in \[0, 50\] mm",
    ),
    "slice_size not the model's": (
        _set("preprocessing", "slice_size", [64, 64]),
        r"slice_size 64x64 does not match m\.onnx's input \[batch, 1, 128, 128\]",
    ),
    "input name not the model's": (
        _set("input", "name", "x"),
        r"input name 'x' does not match m\.onnx's 'image'",
    ),
}


@pytest.mark.parametrize("case", list(SIDECAR_EDITS))
def test_an_edited_sidecar_is_refused_in_one_line_before_any_case_runs(model_onnx, ct, tmp_path, case):
    edit, cause = SIDECAR_EDITS[case]
    model = _copy_onnx(model_onnx, tmp_path, edit)
    result = _predict(ct, model, tmp_path / "out")
    assert result.exit_code == 1, result.output
    error_line(result.stderr, sidecar_path(model), cause)
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def _other_onnx(path: Path, size: int, input_name: str = "image") -> None:
    """Another model's ONNX file: one Identity node [N, 1, size, size] -> same."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 1, size, size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, size, size])
    graph = helper.make_graph([helper.make_node("Identity", [input_name], ["logits"])], "other", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save_model(model, str(path))


@pytest.mark.parametrize(
    ("size", "input_name", "cause"),
    [
        (64, "image", r"slice_size 128x128 does not match m\.onnx's input \[N, 1, 64, 64\]"),
        (128, "input.1", r"input name 'image' does not match m\.onnx's 'input\.1'"),
    ],
)
def test_another_models_onnx_beside_this_sidecar_is_refused(
    model_onnx, ct, tmp_path, size, input_name, cause
):
    """The .onnx replaced and the sidecar's sha256 updated to it: the graph still must fit."""
    model = _copy_onnx(model_onnx, tmp_path)
    _other_onnx(model, size, input_name)
    sidecar = json.loads(sidecar_path(model).read_text())
    sidecar["sha256"] = sha256_of(model)
    sidecar_path(model).write_text(json.dumps(sidecar))
    result = _predict(ct, model, tmp_path / "out")
    assert result.exit_code == 1, result.output
    error_line(result.stderr, sidecar_path(model), cause)
    assert not (tmp_path / "out").exists()


@contextlib.contextmanager
def _address_space_limit(extra_gb: float = 4.0):
    """On Linux, at most `extra_gb` GB more address space for this process while inside: a
    regression that builds the model a config describes fails with a MemoryError instead of taking
    the machine down (the old code was OOM-killed building the 51 GB model)."""
    status = Path("/proc/self/status")
    if not sys.platform.startswith("linux") or not status.exists():
        yield
        return
    used_kb = next(
        int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmSize:")
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = used_kb * 1024 + int(extra_gb * 2**30)
    resource.setrlimit(
        resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard)
    )
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _edit_checkpoint(model_pt: Path, path: Path, edit) -> Path:
    payload = torch.load(model_pt, weights_only=True)
    edit(payload)
    torch.save(payload, path)
    return path


def _weights_of_another_size(payload: dict) -> None:
    payload["weights"] = make_segmenter("transunet", "small").state_dict()


def _config_of_51_gb(payload: dict) -> None:
    payload["model"]["config"].update(embed_dim=16384, heads=16, mlp_dim=16384, depth=8)


# (edit of the checkpoint payload, the cause the one error line must carry)
CHECKPOINT_EDITS = {
    "no model key": (lambda p: p.pop("model"), r"segmenter checkpoint without its 'model' section"),
    "unknown architecture": (
        lambda p: p["model"].update(arch="vit"),
        r"unknown segmenter architecture 'vit' \(known: transunet, unet\)",
    ),
    "weights of another size": (
        _weights_of_another_size,
        r"weights do not fit its transunet config: pos_embed is \[1, 64, 256\], the config makes "
        r"\[1, 64, 96\] \(and 96 more\)",
    ),
    "weights missing": (
        lambda p: p["weights"].pop("norm.weight"),
        r"weights lack norm\.weight for its transunet",
    ),
    "config of 51 GB": (_config_of_51_gb, r"asks for 12\.9 billion parameters \(52 GB\); at most 1 billion"),
    "depth of a million": (
        lambda p: p["model"]["config"].update(depth=1_000_000),
        r"config depth 1000000 is outside 0\.\.16384",
    ),
    "unknown config key": (
        lambda p: p["model"]["config"].update(wings=2),
        r"invalid transunet config \(unknown transunet config keys \['wings'\]\)",
    ),
    "slab_mm 0.01": (
        lambda p: p["preprocessing"].update(slab_mm=0.01),
        r"slab_mm = 0\.01: must be a number in \[0\.5, 500\] mm",
    ),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_EDITS))
def test_a_malformed_checkpoint_is_refused_in_one_line(model_pt, ct, tmp_path, case):
    edit, cause = CHECKPOINT_EDITS[case]
    model = _edit_checkpoint(model_pt, tmp_path / "bad.pt", edit)
    with _address_space_limit():
        result = _predict(ct, model, tmp_path / "out")
    assert result.exit_code == 1, result.output
    error_line(result.stderr, model, cause)
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_malformed_checkpoint_and_writes_nothing(model_pt, tmp_path):
    model = _edit_checkpoint(model_pt, tmp_path / "bad.pt", _weights_of_another_size)
    result = cli("export", model, "-o", tmp_path / "out" / "m.onnx")
    assert result.exit_code == 1, result.output
    error_line(result.stderr, model, r"weights do not fit its transunet config")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("folder_name", ["dir.onnx", "m.json"])
def test_export_onto_a_folder_is_a_usage_error_even_with_overwrite(model_pt, tmp_path, folder_name):
    """`-o dir.onnx --overwrite` where dir.onnx (or the sidecar name m.json) is a folder."""
    folder = tmp_path / folder_name
    folder.mkdir()
    (folder / "keep.txt").write_text("the user's file")
    before = snapshot(tmp_path)
    target = folder if folder_name.endswith(".onnx") else tmp_path / "m.onnx"
    result = cli("export", model_pt, "-o", target, "--overwrite")
    assert result.exit_code == 2, result.output
    error_line(result.stderr, folder, r"is a folder, not a model file")
    assert snapshot(tmp_path) == before


def test_export_overwrite_replaces_only_an_earlier_export(model_pt, tmp_path):
    """`-o run/config.onnx --overwrite` must not replace the training's config.json (a sidecar name
    holding a file that is not a covidseg sidecar), for the segmenter and the generator export."""
    config = tmp_path / "config.json"
    config.write_text('{"lr": 0.001}')
    before = snapshot(tmp_path)
    result = cli("export", model_pt, "-o", tmp_path / "config.onnx", "--overwrite")
    assert result.exit_code == 2, result.output
    error_line(result.stderr, config, r"exists and is not a covidseg model sidecar")
    assert snapshot(tmp_path) == before


def test_doctor_lists_a_broken_model_and_goes_on(model_pt, model_onnx, tmp_path, monkeypatch):
    models = tmp_path / "home" / "models"
    models.mkdir(parents=True)
    monkeypatch.setenv("COVIDSEG_HOME", str(tmp_path / "home"))
    _copy_onnx(model_onnx, models, name="good")
    _copy_onnx(model_onnx, models, _set("preprocessing", "slab_mm", 0.01), name="edited")
    broken = _edit_checkpoint(model_pt, models / "nomodel.pt", lambda p: p.pop("model"))
    result = cli("doctor", "--json")
    assert result.exit_code == 1, result.output
    found = json.loads(result.stdout)
    status = {m["name"]: m["status"] for m in found["home"]["models"]}
    assert status["good"] == "ok"
    assert status["edited"].startswith(f"broken: {models / 'edited.json'}: slab_mm = 0.01: must be")
    assert status["nomodel"].startswith(f"broken: {broken}: segmenter checkpoint without")
    error_line(
        result.stderr, models / "edited.json", r"slab_mm = 0\.01: must be a number in \[0\.5, 500\] mm"
    )
    error_line(result.stderr, broken, r"without its 'model' section")
    table = cli("doctor")
    assert table.exit_code == 1 and "broken:" in table.stdout and "Traceback" not in table.output

"""Preprocessing: grid arrays, manifest, mapping back to the native scan, batch behaviour."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import write_dicom_series
from covidseg.config import PreprocessConfig
from covidseg.errors import UsageError
from covidseg.imaging.geometry import Geometry, Orientation
from covidseg.imaging.grid import CropBox, grid_to_canonical, mask_to_grid, resize
from covidseg.imaging.intensity import parse_intensity
from covidseg.io import write_array
from covidseg.stages.preprocess import run_preprocess
from covidseg.stages.synth import run_synth

SHAPE = (28, 96, 96)
SPACING = (10.0, 3.75, 3.75)
GRID = (16, 64, 64)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    run_synth(root, n_healthy=1, n_covid=2, seed=3, shape_zyx=SHAPE, spacing_zyx=SPACING)
    return root


def _config():
    return PreprocessConfig(grid=GRID)


def test_outputs_manifest_and_value_ranges(phantoms, tmp_path):
    out = tmp_path / "pre"
    result = run_preprocess(
        out, phantoms / "healthy", phantoms / "covid", phantoms / "masks", _config(), workers=1
    )
    assert result.failures == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "covidseg.preprocess" and manifest["version"] == 1
    assert [c["id"] for c in manifest["cases"]] == ["healthy_000", "covid_000", "covid_001"]
    for case in manifest["cases"]:
        image = np.load(out / case["image"])
        lungs = np.load(out / case["lungs"])
        assert image.shape == GRID and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert lungs.dtype == np.uint8 and set(np.unique(lungs)) == {0, 1, 2}
        assert case["canonical_shape"] == list(SHAPE)
        assert CropBox.from_json(case["crop_box"]).is_within(SHAPE)
        assert 1000 < case["lung_ml"] < 8000
        if case["group"] == "covid":
            ref = np.load(out / case["ref"])
            assert ref.shape == GRID and ref.any()
            # the grid reference lies inside the phantom's true lungs brought to the same grid
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(phantoms / "lungs" / f"{case['id']}.nii.gz")))
            truth_grid = mask_to_grid(truth, CropBox.from_json(case["crop_box"]), GRID)
            assert (truth_grid[ref > 0] > 0).mean() > 0.95
        else:
            assert case["ref"] is None
    assert PreprocessConfig.from_json(json.loads((out / "config.json").read_text())) == _config()


def test_grid_maps_back_onto_the_native_scan(phantoms, tmp_path):
    out = tmp_path / "pre"
    run_preprocess(out, covid=phantoms / "covid", masks=phantoms / "masks", config=_config())
    case = json.loads((out / "manifest.json").read_text())["cases"][0]
    ref_grid = np.load(out / case["ref"])
    box = CropBox.from_json(case["crop_box"])
    canonical = grid_to_canonical(ref_grid, box, tuple(case["canonical_shape"])) >= 0.5
    native = Orientation.from_json(case["orientation"]).to_native(canonical)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(phantoms / "masks" / f"{case['id']}.nii.gz"))) > 0
    dice = 2 * (native & truth).sum() / (native.sum() + truth.sum())
    assert dice > 0.8, dice  # grid resolution is coarser than the native scan


def test_resize_and_mask_to_grid_round_trip():
    mask = np.zeros((20, 40, 40), dtype=np.uint8)
    mask[5:15, 10:30, 8:20] = 1
    mask[5:15, 10:30, 24:36] = 2
    box = CropBox(0, 20, 0, 40, 0, 40)
    grid = mask_to_grid(mask, box, (10, 20, 20))
    assert set(np.unique(grid)) == {0, 1, 2}
    back = grid_to_canonical(grid == 1, box, mask.shape) >= 0.5
    assert 2 * (back & (mask == 1)).sum() / (back.sum() + (mask == 1).sum()) > 0.9
    assert resize(np.ones((3, 5, 7)), (6, 10, 14)).shape == (6, 10, 14)


def test_dicom_series_and_broken_case_in_one_batch(phantoms, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = sitk.ReadImage(str(phantoms / "covid" / "covid_000.nii.gz"))
    write_dicom_series(inputs / "patient_dicom", sitk.GetArrayFromImage(image), spacing_zyx=SPACING)
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    out = tmp_path / "pre"
    result = run_preprocess(out, covid=inputs, config=_config())
    assert [c["id"] for c in result.manifest["cases"]] == ["patient_dicom"]
    assert len(result.failures) == 1 and "broken.nii.gz" in result.failures[0]["error"]
    assert not (out / "images" / "broken.npy").exists()
    assert result.manifest["failed"][0]["id"] == "broken"


def test_no_lung_case_fails_alone(tmp_path):
    inputs = tmp_path / "in"
    block = np.full((8, 48, 48), -1000, np.int16)
    block[:, 8:40, 8:40] = 40
    geometry = Geometry((48, 48, 8), (2.0, 2.0, 5.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_array(inputs / "abdomen.nii.gz", block, geometry)
    result = run_preprocess(tmp_path / "pre", covid=inputs, config=_config())
    assert "no lungs found" in result.failures[0]["error"]


def test_refuses_to_overwrite_or_write_into_its_input(phantoms, tmp_path):
    out = tmp_path / "pre"
    run_preprocess(out, healthy=phantoms / "healthy", config=_config())
    with pytest.raises(UsageError, match="--overwrite"):
        run_preprocess(out, healthy=phantoms / "healthy", config=_config())
    run_preprocess(out, healthy=phantoms / "healthy", config=_config(), overwrite=True)
    inside = tmp_path / "data"
    shutil.copytree(phantoms / "healthy", inside)
    with pytest.raises(UsageError, match="contains the input"):
        run_preprocess(inside, healthy=inside, config=_config())


def test_parallel_workers_give_identical_outputs(phantoms, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_preprocess(a, covid=phantoms / "covid", config=_config(), workers=1)
    run_preprocess(b, covid=phantoms / "covid", config=_config(), workers=2)
    for name in ("covid_000", "covid_001"):
        assert np.array_equal(np.load(a / "images" / f"{name}.npy"), np.load(b / "images" / f"{name}.npy"))


def test_real_8bit_slices_need_and_accept_an_intensity_mapping(shared_data, tmp_path):
    images = shared_data / "covid_semiseg_infnet" / "train" / "Imgs"
    picked = tmp_path / "imgs"
    picked.mkdir()
    for name in sorted(p.name for p in images.iterdir())[:3]:
        (picked / name).symlink_to(images / name)
    # without a mapping: JPEGs are not even considered CTs
    with pytest.raises(UsageError, match="no CT found"):
        run_preprocess(tmp_path / "none", covid=picked, config=_config())
    mapping = parse_intensity("window:-1350,150")
    result = run_preprocess(
        tmp_path / "pre", covid=picked, config=PreprocessConfig(grid=(1, 128, 128)), intensity=mapping
    )
    assert len(result.manifest["cases"]) == 3
    for case in result.manifest["cases"]:
        assert case["intensity"] == "window:-1350,150"
        assert np.load(tmp_path / "pre" / case["lungs"]).any()
    assert not result.failures  # the display-slice lung mask finds lungs in every slice

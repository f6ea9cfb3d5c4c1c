"""The synth stage (phantom files + manifest) and the overlay montage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from covidseg.errors import UsageError
from covidseg.imaging.phantom import make_phantom
from covidseg.io import read_ct, read_mask
from covidseg.reporting.plots import montage_slices, overlay_montage
from covidseg.stages.synth import case_seed, run_synth

SHAPE = (16, 64, 64)
SPACING = (18.0, 5.25, 5.25)  # a real chest field of view (288 x 336 x 336 mm) on a tiny grid
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    calls: list[tuple[int, int, str]] = []
    manifest = run_synth(
        out, 1, 2, 7, SHAPE, SPACING, montage=True, progress=lambda *call: calls.append(call)
    )
    return out, manifest, calls


def test_writes_every_file_and_a_complete_manifest(synth_run):
    out, manifest, calls = synth_run
    assert calls == [(1, 3, "healthy_000"), (2, 3, "covid_000"), (3, 3, "covid_001")]
    on_disk = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert on_disk == manifest
    assert manifest["format"] == "covidseg.synth" and manifest["version"] == 1
    assert manifest["covidseg_version"]
    params = manifest["parameters"]
    assert (params["n_healthy"], params["n_covid"], params["seed"]) == (1, 2, 7)
    assert params["shape_zyx"] == list(SHAPE) and params["spacing_zyx"] == list(SPACING)
    ids = [c["id"] for c in manifest["cases"]]
    assert ids == ["healthy_000", "covid_000", "covid_001"]
    keys = {"id", "kind", "seed", "image", "lungs", "mask", "n_lesions", "lesion_ml", "lung_ml"}
    keys |= {"lesion_percent_of_lung", "lesions"}
    for case in manifest["cases"]:
        assert keys <= set(case)
        assert (out / case["image"]).is_file() and (out / case["lungs"]).is_file()
        assert case["image"] == f"{case['kind']}/{case['id']}.nii.gz"
        assert case["lung_ml"] > 1000.0
        if case["kind"] == "covid":
            assert case["mask"] == f"masks/{case['id']}.nii.gz" and (out / case["mask"]).is_file()
            assert 1 <= case["n_lesions"] == len(case["lesions"]) <= 10
            assert case["lesion_ml"] > 0
            expected = 100 * case["lesion_ml"] / case["lung_ml"]
            assert case["lesion_percent_of_lung"] == pytest.approx(expected, abs=1e-2)
        else:
            assert case["mask"] is None and case["n_lesions"] == 0 and case["lesion_ml"] == 0
    assert not (out / "masks" / "healthy_000.nii.gz").exists()
    assert not list(out.rglob(".*.tmp-*"))  # atomic writes left nothing behind


def test_images_read_back_in_hu_with_centred_geometry(synth_run):
    out, manifest, _ = synth_run
    case = manifest["cases"][1]
    volume, _ = read_ct(out / case["image"])
    assert volume.hu.shape == SHAPE
    assert volume.orientation.is_identity  # written in the canonical LPS orientation
    assert np.allclose(volume.spacing_zyx, SPACING)
    expected_origin = [-(n - 1) / 2 * s for n, s in zip(SHAPE[::-1], SPACING[::-1], strict=True)]
    assert np.allclose(volume.geometry.origin, expected_origin)
    assert -1024.0 <= volume.hu.min() < -950.0
    # the same phantom as the library gives, rounded to int16 HU
    phantom = make_phantom(SHAPE, SPACING, covid=True, seed=case["seed"])
    assert np.array_equal(volume.hu, np.rint(phantom.hu))


def test_masks_and_lungs_align_with_the_image(synth_run):
    out, manifest, _ = synth_run
    case = manifest["cases"][1]
    volume, _ = read_ct(out / case["image"])
    lesion, lesion_geometry = read_mask(out / case["mask"])
    lungs, lungs_geometry = read_mask(out / case["lungs"])
    assert lesion_geometry.matches(volume.geometry) and lungs_geometry.matches(volume.geometry)
    assert lesion.any() and not (lesion & ~lungs).any()  # lesions inside the lungs
    voxel_ml = np.prod(SPACING) / 1000.0
    assert lesion.sum() * voxel_ml == pytest.approx(case["lesion_ml"], abs=1e-3)
    assert lungs.sum() * voxel_ml == pytest.approx(case["lung_ml"], abs=1e-3)
    healthy_lung = lungs & ~lesion
    assert np.median(volume.hu[lesion]) > np.median(volume.hu[healthy_lung]) + 150.0  # lesions are denser
    assert -900.0 <= np.median(volume.hu[healthy_lung]) <= -780.0


def test_lung_labels_are_written(synth_run):
    out, manifest, _ = synth_run
    image = sitk.ReadImage(str(out / manifest["cases"][0]["lungs"]))
    assert image.GetPixelID() == sitk.sitkUInt8
    labels = sitk.GetArrayFromImage(image)
    assert set(np.unique(labels)) == {0, 1, 2}
    x = np.nonzero(labels)[2]
    assert (
        x[labels[labels > 0] == 1].mean() < SHAPE[2] / 2 < x[labels[labels > 0] == 2].mean()
    )  # right at small x


def test_montage_pngs_written_when_asked(synth_run, tmp_path):
    out, manifest, _ = synth_run
    for case in manifest["cases"]:
        png = out / case["montage"]
        assert png.read_bytes()[:8] == PNG_MAGIC
    small = run_synth(tmp_path / "plain", 1, 0, 7, SHAPE, SPACING)
    assert small["cases"][0]["montage"] is None
    assert not (tmp_path / "plain" / "montage").exists()


def test_a_case_does_not_depend_on_how_many_are_made(synth_run, tmp_path):
    _, manifest, _ = synth_run
    alone = run_synth(tmp_path / "one", 0, 1, 7, SHAPE, SPACING)
    assert alone["cases"][0]["seed"] == manifest["cases"][1]["seed"]
    assert alone["cases"][0]["lesions"] == manifest["cases"][1]["lesions"]


def test_case_seeds_are_distinct_streams():
    seeds = {case_seed(s, kind, i) for s in (0, 1) for kind in ("healthy", "covid") for i in range(20)}
    assert len(seeds) == 80  # healthy/covid and different --seed never collide
    assert case_seed(0, "covid", 3) == case_seed(0, "covid", 3)


@pytest.mark.parametrize(
    ("n_healthy", "n_covid", "shape", "spacing"),
    [
        (-1, 1, SHAPE, SPACING),
        (1, -2, SHAPE, SPACING),
        (1, 1, (7, 64, 64), SPACING),
        (1, 1, (16, 64), SPACING),
        (1, 1, SHAPE, (0.0, 1.0, 1.0)),
        (1, 1, SHAPE, (5.0, -1.0, 1.0)),
        (1, 1, SHAPE, (5.0, float("nan"), 1.0)),
    ],
)
def test_refuses_nonsense_parameters(tmp_path, n_healthy, n_covid, shape, spacing):
    out = tmp_path / "never"
    with pytest.raises(UsageError):
        run_synth(out, n_healthy, n_covid, 0, shape, spacing)
    assert not out.exists()


def test_refuses_an_output_that_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UsageError):
        run_synth(target, 1, 0, 0, SHAPE, SPACING)


def test_stage_does_not_print(tmp_path, capsys):
    run_synth(tmp_path / "quiet", 1, 1, 0, SHAPE, SPACING)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_montage_shows_the_slices_with_most_lesion(tmp_path):
    hu = np.full((10, 32, 32), -850.0, dtype=np.float32)
    lesion = np.zeros(hu.shape, dtype=np.uint8)
    lesion[2, 5:15, 5:15] = 1
    lesion[7, 5:8, 5:8] = 1
    lungs = np.zeros_like(lesion)
    lungs[1:9, 2:30, 2:30] = 1
    assert montage_slices(lesion, lungs, 2, 10) == [2, 7]
    shown = montage_slices(lesion, lungs, 4, 10)
    assert len(shown) == 4 and {2, 7} <= set(shown) and all(1 <= k <= 8 for k in shown)
    even = montage_slices(None, lungs, 3, 10)  # no lesion: spread through the lungs
    assert len(set(even)) == 3 and all(1 < k < 8 for k in even)
    path = tmp_path / "m" / "montage.png"
    assert overlay_montage(hu, lesion, lungs, path=path, n_slices=2, title="t") == [2, 7]
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError):
        overlay_montage(hu, lesion[:5], None, path=path)


def test_surroundings_flag_is_passed_and_recorded(synth_run, tmp_path):
    _, manifest, _ = synth_run
    assert manifest["parameters"]["surroundings"] is True
    scene = manifest["cases"][0]["scene"]
    assert scene["surroundings"] is True and scene["arms"] in ("down", "up", "none")
    plain = run_synth(tmp_path / "plain", 0, 1, 7, SHAPE, SPACING, surroundings=False)
    assert plain["parameters"]["surroundings"] is False
    case = plain["cases"][0]
    assert case["scene"]["surroundings"] is False
    assert case["lesions"] == manifest["cases"][1]["lesions"]  # same ground truth
    volume, _ = read_ct(tmp_path / "plain" / case["image"])
    phantom = make_phantom(SHAPE, SPACING, covid=True, seed=case["seed"], surroundings=False)
    assert np.array_equal(volume.hu, np.rint(phantom.hu))


def test_cli_no_surroundings(tmp_path):
    from typer.testing import CliRunner

    from covidseg.cli import app

    out = tmp_path / "cli"
    args = ["synth", "-o", str(out), "--healthy", "1", "--covid", "0", "--shape", "16,64,64"]
    args += ["--spacing", "18,5.25,5.25", "--no-surroundings", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["parameters"]["surroundings"] is False
    assert manifest["cases"][0]["scene"]["surroundings"] is False


def test_cli_lesion_variety_is_passed_and_recorded(synth_run, tmp_path):
    from typer.testing import CliRunner

    from covidseg.cli import app

    _, manifest, _ = synth_run
    assert manifest["parameters"]["lesion_variety"] is False
    assert all("shape" not in lesion for case in manifest["cases"] for lesion in case["lesions"])
    out = tmp_path / "varied"
    args = ["synth", "-o", str(out), "--healthy", "0", "--covid", "1", "--seed", "7", "--shape", "16,64,64"]
    args += ["--spacing", "18,5.25,5.25", "--lesion-variety", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    varied = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert varied["parameters"]["lesion_variety"] is True
    lesions = varied["cases"][0]["lesions"]
    assert lesions and all(lesion["shape"] in ("blob", "band", "lobular") for lesion in lesions)

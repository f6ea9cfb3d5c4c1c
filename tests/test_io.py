"""CT reading/writing: formats, geometry round trips, DICOM series, refusals."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import LAS, LPS, ct_like, oblique_direction, write_dicom_series
from covidseg.errors import InputError
from covidseg.imaging.geometry import Geometry, Orientation
from covidseg.imaging.intensity import parse_intensity
from covidseg.io import case_id_of, find_cases, read_ct, read_mask, write_array

DIRECTIONS = {"LPS": LPS, "LAS": LAS, "oblique": oblique_direction()}


def _geometry(direction, size=(24, 20, 6)) -> Geometry:
    return Geometry(size=size, spacing=(0.75, 0.8, 2.5), origin=(-12.5, 40.25, -300.0), direction=direction)


@pytest.mark.parametrize("name", DIRECTIONS)
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_round_trip_keeps_values_and_exact_geometry(tmp_path, name, suffix):
    array = ct_like()
    geometry = _geometry(DIRECTIONS[name])
    path = tmp_path / f"case{suffix}"
    write_array(path, array, geometry)

    volume, note = read_ct(path)
    assert note is None
    assert volume.hu.dtype == np.float32
    # canonical: x toward the patient's left, y posterior, z superior
    back = volume.to_native_image(volume.hu.astype(np.int16))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    assert Geometry.of(back).matches(volume.geometry, atol=0)
    # NIfTI stores float32 geometry; everything else keeps it exactly
    assert volume.geometry.matches(geometry, atol=1e-4)


def test_canonical_orientation_puts_patient_left_on_high_x(tmp_path):
    # A bright marker at the patient's left: in LAS the x axis runs toward the patient's right,
    # so the marker lies at a LOW native x index.
    array = np.full((4, 10, 12), -1000, dtype=np.int16)
    array[:, 5, 1] = 500
    write_array(tmp_path / "las.nii.gz", array, _geometry(LAS, size=(12, 10, 4)))
    volume, _ = read_ct(tmp_path / "las.nii.gz")
    assert volume.orientation == Orientation(axes=(0, 1, 2), flips=(False, False, True))
    zs, ys, xs = np.nonzero(volume.hu > 0)
    assert set(xs) == {10}  # 12 - 1 - 1


def test_orientation_of_permuted_axes_is_inverted_exactly():
    # image x axis along physical z, y along x, z along -y (a sagittal-like acquisition)
    direction = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0)
    geometry = Geometry(size=(5, 6, 7), spacing=(1.0, 2.0, 3.0), origin=(0, 0, 0), direction=direction)
    orientation = Orientation.of(geometry)
    native = np.arange(7 * 6 * 5).reshape(7, 6, 5)
    canonical = orientation.to_canonical(native)
    assert canonical.shape == (5, 7, 6)
    assert orientation.canonical_spacing_zyx(geometry) == (1.0, 3.0, 2.0)
    np.testing.assert_array_equal(orientation.to_native(canonical), native)


def test_dicom_series_sorted_by_position_with_rescale(tmp_path):
    hu = ct_like((5, 16, 18)).astype(np.int16)
    hu[:, 0, 0] = np.arange(5) * 100 - 1000  # slice index marker in HU
    write_dicom_series(tmp_path / "series", hu, intercept=-1024.0, slope=1.0)
    volume, note = read_ct(tmp_path / "series")
    assert note is None
    assert volume.hu.shape == (5, 16, 18)
    np.testing.assert_allclose(volume.hu[:, 0, 0], np.arange(5) * 100 - 1000)
    np.testing.assert_allclose(volume.hu, hu)
    assert volume.spacing_zyx == pytest.approx((2.5, 0.8, 0.8), abs=1e-4)
    assert volume.series_uid == "1.2.826.0.1.3680043.2.1125.1"


def test_dicom_folder_with_two_series_takes_the_longest_and_says_so(tmp_path):
    folder = tmp_path / "study"
    write_dicom_series(folder / "a", ct_like((3, 12, 12)), series_uid="1.2.3.4.1")
    write_dicom_series(folder / "b", ct_like((6, 12, 12)), series_uid="1.2.3.4.2")
    for sub in ("a", "b"):  # put both series in one folder
        for f in (folder / sub).iterdir():
            f.rename(folder / f"{sub}_{f.name}")
    volume, note = read_ct(folder)
    assert volume.hu.shape[0] == 6 and "1.2.3.4.2" in note and "2 series" in note
    volume, note = read_ct(folder, series="1.2.3.4.1")
    assert volume.hu.shape[0] == 3
    with pytest.raises(InputError, match="series 9.9 not found"):
        read_ct(folder, series="9.9")


def test_single_dicom_file_and_single_slice_volume(tmp_path):
    paths = write_dicom_series(tmp_path / "s", ct_like((2, 12, 14)), shuffle_names=False)
    volume, _ = read_ct(paths[0])
    assert volume.hu.shape == (1, 12, 14)
    write_array(tmp_path / "one.nii.gz", ct_like((1, 12, 14)), _geometry(LPS, size=(14, 12, 1)))
    assert read_ct(tmp_path / "one.nii.gz")[0].hu.shape == (1, 12, 14)


def _refused(path, match, **kwargs):
    with pytest.raises(InputError, match=match) as info:
        read_ct(path, **kwargs)
    assert str(path) in str(info.value)  # the one-line message names the file
    assert "\n" not in str(info.value)


def test_refuses_what_is_not_a_ct_in_hu(tmp_path):
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    _refused(empty, "empty file")

    good = tmp_path / "good.nii.gz"
    write_array(good, ct_like(), _geometry(LPS))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _refused(truncated, "truncated|corrupt|unreadable")

    for suffix in (".nii", ".mha", ".nrrd"):
        whole = tmp_path / f"whole{suffix}"
        write_array(whole, ct_like(), _geometry(LPS), compress=False)
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(whole.read_bytes()[:-200])
        _refused(cut, "truncated|corrupt|unreadable")

    text = tmp_path / "notes.nii"
    text.write_text("not an image")
    _refused(text, "unreadable")

    rgb = tmp_path / "rgb.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 3), np.uint8) + 40, isVector=True), str(rgb))
    _refused(rgb, "colour")

    four_d = tmp_path / "4d.nii.gz"
    frame = sitk.GetImageFromArray(ct_like((3, 8, 8)))
    sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(four_d))
    _refused(four_d, "4D image")

    const = tmp_path / "const.nii.gz"
    write_array(const, np.full((4, 8, 8), -1000, np.int16), _geometry(LPS, size=(8, 8, 4)))
    _refused(const, "same value")

    not_hu = tmp_path / "mr.nii.gz"
    write_array(not_hu, (ct_like() + 1000).astype(np.int16), _geometry(LPS))
    _refused(not_hu, "likely not in HU")

    nan = tmp_path / "nan.mha"  # ITK NIfTI I/O turns NaN into 0; MetaImage keeps it
    values = ct_like().astype(np.float32)
    values[0, 0, 0] = np.nan
    write_array(nan, values, _geometry(LPS))
    _refused(nan, "NaN")

    _refused(tmp_path / "missing.nii.gz", "no such file")


def test_huge_header_is_refused_before_allocating(tmp_path):
    good = tmp_path / "good.nii"
    write_array(good, ct_like(), _geometry(LPS), compress=False)
    data = bytearray(good.read_bytes())
    # NIfTI-1 header: dim[1..3] are int16 at byte offsets 42, 44, 46
    for offset in (42, 44, 46):
        data[offset : offset + 2] = np.int16(32000).tobytes()
    huge = tmp_path / "huge.nii"
    huge.write_bytes(bytes(data))
    _refused(huge, "too large")


def test_intensity_mapping_makes_8bit_images_usable(tmp_path):
    png = tmp_path / "slice.png"
    values = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    sitk.WriteImage(sitk.GetImageFromArray(values), str(png))
    _refused(png, "likely not in HU")
    volume, _ = read_ct(png, intensity=parse_intensity("window:-1350,150"))
    assert volume.hu.shape == (1, 16, 16)
    assert volume.hu.min() == pytest.approx(-1350) and volume.hu.max() == pytest.approx(
        -1350 + 1500 * 240 / 255
    )


@pytest.mark.parametrize(
    "spec", ["window", "window:1", "window:5,1", "linear:0,1", "gamma:1,2", "window:a,b", "window:nan,1"]
)
def test_bad_intensity_specs(spec):
    with pytest.raises(ValueError, match="intensity mapping"):
        parse_intensity(spec)


def test_find_cases_files_and_dicom_folders(tmp_path):
    write_array(tmp_path / "a" / "case_001.nii.gz", ct_like(), _geometry(LPS))
    write_array(tmp_path / "b" / "case_002.mha", ct_like(), _geometry(LPS))
    write_dicom_series(tmp_path / "b" / "patient_7", ct_like((3, 12, 12)))
    (tmp_path / "README.txt").write_text("ignore me")
    cases = find_cases(tmp_path)
    assert [c for c, _ in cases] == ["case_001", "case_002", "patient_7"]
    assert case_id_of("x/case_001.nii.gz") == "case_001"
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
    assert case_id_of(f"x/{uid}") == uid  # a DICOM file named by its UID: the dots are no extension


def test_find_cases_refuses_duplicate_ids(tmp_path):
    write_array(tmp_path / "a" / "case.nii.gz", ct_like(), _geometry(LPS))
    write_array(tmp_path / "b" / "case.mha", ct_like(), _geometry(LPS))
    with pytest.raises(InputError, match="also used by"):
        find_cases(tmp_path)


def test_read_mask_and_gzip_integrity(tmp_path):
    mask = np.zeros((4, 8, 8), np.uint8)
    mask[1:3, 2:5, 2:6] = 1
    path = tmp_path / "m.nii.gz"
    write_array(path, mask, _geometry(LAS, size=(8, 8, 4)))
    array, geometry = read_mask(path)
    assert array.dtype == bool and array.sum() == mask.sum()
    assert geometry.matches(_geometry(LAS, size=(8, 8, 4)), atol=1e-4)
    gzip.decompress(path.read_bytes())  # a valid gzip stream: written whole, atomically
    assert not list(tmp_path.glob(".*tmp*"))


def test_written_files_get_normal_permissions(tmp_path):
    import os

    path = tmp_path / "m.nii.gz"
    write_array(path, np.zeros((2, 4, 4), np.uint8), _geometry(LPS, size=(4, 4, 2)))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

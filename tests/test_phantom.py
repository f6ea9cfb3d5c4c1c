"""Synthetic chest-CT phantoms: determinism, anatomy, HU values and lesion ground truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from covidseg.imaging.phantom import LEFT_LUNG, RIGHT_LUNG, Phantom, make_phantom

# A coarse grid whose field of view is a real chest (288 x 336 x 336 mm): fast, and the anatomy
# (sized in mm) is the same as at full resolution.
SHAPE = (24, 96, 96)
SPACING = (12.0, 3.5, 3.5)


def _phantom(seed: int = 0, covid: bool = False, **kwargs) -> Phantom:
    return make_phantom(SHAPE, SPACING, covid=covid, seed=seed, **kwargs)


@pytest.fixture(scope="module")
def healthy() -> Phantom:
    return _phantom(0)


@pytest.fixture(scope="module")
def covid() -> Phantom:
    return _phantom(0, covid=True)


@pytest.fixture(scope="module")
def covid_cases() -> list[Phantom]:
    return [_phantom(seed, covid=True) for seed in range(1, 7)]


def _x_mm(n: int, spacing: float) -> np.ndarray:
    return (np.arange(n) - (n - 1) / 2) * spacing


def _single_lesion(kind: str, min_ml: float = 10.0, **kwargs) -> tuple[Phantom, Phantom]:
    """(covid, healthy) phantoms of the first seed whose only lesion is of `kind` and >= min_ml."""
    for seed in range(200):
        case = _phantom(seed, covid=True, n_lesions=(1, 1), **kwargs)
        info = case.lesion_info[0]
        if info["kind"] == kind and info["volume_ml"] >= min_ml:
            return case, _phantom(seed, **kwargs)
    raise AssertionError(f"no single {kind} lesion >= {min_ml} mL in 200 seeds")


def test_same_seed_gives_bit_identical_arrays(covid):
    again = _phantom(0, covid=True)
    assert np.array_equal(again.hu, covid.hu)
    assert np.array_equal(again.lungs, covid.lungs)
    assert np.array_equal(again.lesions, covid.lesions)
    assert again.lesion_info == covid.lesion_info


def test_different_seed_gives_a_different_case(healthy):
    other = _phantom(1)
    assert not np.array_equal(other.lungs, healthy.lungs)
    assert np.abs(other.hu - healthy.hu).mean() > 5.0


def test_arrays_dtypes_and_hu_range(healthy):
    assert healthy.hu.shape == healthy.lungs.shape == healthy.lesions.shape == SHAPE
    assert healthy.hu.dtype == np.float32
    assert healthy.lungs.dtype == np.uint8 and healthy.lesions.dtype == np.uint8
    assert healthy.spacing_zyx == SPACING
    assert set(np.unique(healthy.lungs)) == {0, RIGHT_LUNG, LEFT_LUNG}
    assert -1024.0 <= healthy.hu.min() and healthy.hu.max() <= 3071.0
    corner = healthy.hu[:, :6, :6]  # outside the body
    assert -1024.0 <= np.median(corner) < -970.0
    assert healthy.hu.max() > 500.0  # bone


def test_lung_hu_is_aerated_parenchyma(healthy):
    lung = healthy.lungs > 0
    interior = ndimage.binary_erosion(lung)  # away from partial volume with the chest wall
    assert -900.0 <= np.median(healthy.hu[lung]) <= -780.0
    assert -900.0 <= healthy.hu[interior].mean() <= -780.0
    vessels = healthy.hu[interior] > -500.0
    assert 0.005 < vessels.mean() < 0.2  # vessels are there, but the lungs are mostly air


def test_two_lungs_right_at_small_x_and_larger(healthy):
    lung = healthy.lungs > 0
    labels, _ = ndimage.label(lung)
    sizes = np.sort(np.bincount(labels.ravel())[1:])[::-1]
    assert sizes[:2].sum() >= 0.99 * lung.sum()  # two lungs (a few partial-volume crumbs allowed)
    x = _x_mm(SHAPE[2], SPACING[2])
    right_x = x[np.nonzero(healthy.lungs == RIGHT_LUNG)[2]]
    left_x = x[np.nonzero(healthy.lungs == LEFT_LUNG)[2]]
    assert right_x.max() < 0.0 < left_x.min()  # patient's right lung at small x (LPS)
    assert len(right_x) > len(left_x)  # the right lung is the larger


def test_lungs_taper_to_apex_and_diaphragm(healthy):
    area = np.count_nonzero(healthy.lungs.reshape(SHAPE[0], -1), axis=1)
    peak = area.max()
    assert area[-1] < 0.3 * peak  # apex at large z (superior)
    assert area[0] < 0.3 * peak  # below the domes
    mid = area[SHAPE[0] // 3 : 2 * SHAPE[0] // 3]
    assert mid.min() > 0.5 * peak


def test_spine_posterior_heart_and_ribs(healthy):
    k = SHAPE[0] // 2
    column = healthy.hu[k, :, SHAPE[2] // 2]  # along y at x = 0
    y = _x_mm(SHAPE[1], SPACING[1])
    bone = y[column > 250.0]
    assert bone.size and np.median(bone) > 20.0  # spine at large y (posterior)
    lateral = healthy.hu[:, :, :12]  # right chest wall and beyond
    assert (lateral > 300.0).sum() > 20  # ribs


def test_trachea_is_air_and_not_lung(healthy):
    x = _x_mm(SHAPE[2], SPACING[2])
    central = np.abs(x) < 10.0
    upper = slice(int(0.75 * SHAPE[0]), int(0.95 * SHAPE[0]))
    band = healthy.hu[upper][:, :, central]
    assert (band.min(axis=(1, 2)) < -850.0).all()  # an air lumen in the midline on every upper slice
    assert not healthy.lungs[:, :, central].any()


def test_healthy_has_no_lesion(healthy):
    assert not healthy.lesions.any()
    assert healthy.lesion_info == []


def test_covid_lesions_inside_lungs_and_counted(covid, covid_cases):
    bilateral = 0
    for case in [covid, *covid_cases]:
        assert case.lesions.any()
        assert not (case.lesions.astype(bool) & (case.lungs == 0)).any()
        assert 1 <= len(case.lesion_info) <= 10
        total = case.lesions.sum() * case.voxel_ml
        assert sum(i["volume_ml"] for i in case.lesion_info) >= total - 1e-6  # lesions may overlap
        for info in case.lesion_info:
            assert info["kind"] in ("ggo", "consolidation", "mixed")
            assert info["side"] in ("right", "left")
            assert info["volume_ml"] > 0 and len(info["centre_mm"]) == 3
        bilateral += len({i["side"] for i in case.lesion_info}) == 2
    assert bilateral >= 4  # most of 7 cases


def test_covid_is_the_healthy_case_plus_lesions(covid, healthy):
    assert np.array_equal(covid.lungs, healthy.lungs)
    changed = covid.hu != healthy.hu
    # lesion partial-volume rims (< 1 voxel) spread by the scanner blur (2 voxels)
    near = ndimage.binary_dilation(covid.lesions > 0, structure=np.ones((3, 3, 3)), iterations=4)
    assert changed.any()
    assert (changed & ~near).sum() <= 0.005 * changed.sum()


def test_ground_glass_keeps_vessels_and_hu_range():
    # the plain scanner: a sharp kernel's edge enhancement dips next to anything brighter
    case, healthy = _single_lesion("ggo", surroundings=False)
    lesion = case.lesions > 0
    assert -750.0 <= np.median(case.hu[lesion]) <= -250.0
    # ground glass only raises HU (a max blend): vessels inside it stay as bright as before
    assert (case.hu >= healthy.hu - 1e-3).all()
    vessels = lesion & (healthy.hu > -300.0)
    assert (case.hu[vessels] > -300.0).all()


def test_consolidation_hu_range():
    case, _ = _single_lesion("consolidation")
    assert -150.0 <= np.median(case.hu[case.lesions > 0]) <= 100.0


def test_mixed_lesion_has_dense_core_in_ground_glass():
    case, _ = _single_lesion("mixed", min_ml=30.0)
    hu = case.hu[case.lesions > 0]
    assert (hu > -200.0).mean() > 0.05  # consolidated core
    assert ((hu < -250.0) & (hu > -800.0)).mean() > 0.1  # ground-glass rim


def test_lesions_mostly_peripheral_posterior_and_basal(covid_cases):
    lesion_depth, lung_depth, lesion_y, lung_y, lesion_z, lung_z = [], [], [], [], [], []
    y = _x_mm(SHAPE[1], SPACING[1])
    z = _x_mm(SHAPE[0], SPACING[0])
    for case in covid_cases:
        depth = ndimage.distance_transform_edt(case.lungs > 0, sampling=SPACING)  # mm to the pleura
        lesion, lung = case.lesions > 0, case.lungs > 0
        lesion_depth.append(depth[lesion])
        lung_depth.append(depth[lung])
        lesion_y.append(y[np.nonzero(lesion)[1]])
        lung_y.append(y[np.nonzero(lung)[1]])
        lesion_z.append(z[np.nonzero(lesion)[0]])
        lung_z.append(z[np.nonzero(lung)[0]])
    assert np.median(np.concatenate(lesion_depth)) < np.median(np.concatenate(lung_depth))
    assert np.mean(np.concatenate(lesion_y)) > np.mean(np.concatenate(lung_y))  # posterior
    assert np.mean(np.concatenate(lesion_z)) < np.mean(np.concatenate(lung_z))  # lower


def test_lesion_sizes_span_a_wide_range(covid, covid_cases):
    volumes = [i["volume_ml"] for case in [covid, *covid_cases] for i in case.lesion_info]
    assert min(volumes) < 5.0
    assert max(volumes) > 100.0


def test_anatomy_does_not_depend_on_resolution():
    fine = make_phantom((48, 192, 192), (6.0, 1.75, 1.75), covid=True, seed=3)
    coarse = _phantom(3, covid=True)
    for label in (RIGHT_LUNG, LEFT_LUNG):
        v_fine = (fine.lungs == label).sum() * fine.voxel_ml
        v_coarse = (coarse.lungs == label).sum() * coarse.voxel_ml
        assert v_coarse == pytest.approx(v_fine, rel=0.04)
    assert [(i["kind"], i["side"]) for i in fine.lesion_info] == [
        (i["kind"], i["side"]) for i in coarse.lesion_info
    ]
    for a, b in zip(fine.lesion_info, coarse.lesion_info, strict=True):
        if a["volume_ml"] > 20.0:
            assert np.allclose(a["centre_mm"], b["centre_mm"], atol=6.0)
            assert b["volume_ml"] == pytest.approx(a["volume_ml"], rel=0.2)


@pytest.mark.parametrize("surroundings", [False, True])
def test_noise_std_in_homogeneous_tissue(surroundings):
    kernels = set()
    for seed in range(4):
        case = _phantom(seed, surroundings=surroundings)
        scanner = case.scene_info["scanner"]
        kernels.add(scanner["kernel"])
        liver = case.hu[0, 40:52, 25:36]  # right upper abdomen, below the dome
        assert 20.0 < liver.mean() < 90.0
        assert 0.7 * scanner["noise_std_hu"] < liver.std() < 1.3 * scanner["noise_std_hu"]
        low, high = (10.0, 60.0) if surroundings else (15.0, 25.0)
        assert low <= scanner["noise_std_hu"] <= high
    assert kernels == ({"soft", "sharp"} if surroundings else {"standard"})


def test_n_lesions_range_is_respected():
    for seed in range(5):
        assert len(_phantom(seed, covid=True, n_lesions=(2, 3)).lesion_info) in (2, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape_zyx": (0, 10, 10)},
        {"shape_zyx": (10, 10)},
        {"spacing_zyx": (1.0, 0.0, 1.0)},
        {"spacing_zyx": (1.0, float("nan"), 1.0)},
        {"n_lesions": (0, 3)},
        {"n_lesions": (4, 2)},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        make_phantom(**{"shape_zyx": SHAPE, "spacing_zyx": SPACING, **kwargs})


# Lesion variety (issue 16): each COVID case draws its own lesion style.


@pytest.fixture(scope="module")
def varied_cases() -> list[Phantom]:
    return [_phantom(seed, covid=True, lesion_variety=True) for seed in range(1, 7)]


def test_variety_changes_the_lesions_not_the_anatomy(covid_cases, varied_cases):
    for plain, varied in zip(covid_cases, varied_cases, strict=True):
        assert np.array_equal(plain.lungs, varied.lungs)
        assert varied.lesions.any() and not np.array_equal(plain.hu, varied.hu)
        assert (varied.lungs[varied.lesions > 0] > 0).all()
        assert all("shape" not in info for info in plain.lesion_info)


def test_variety_draws_every_look_and_ground_glass_level(varied_cases):
    infos = [info for case in varied_cases for info in case.lesion_info]
    assert {info["shape"] for info in infos} == {"blob", "band", "lobular"}
    assert any(info.get("crazy_paving") for info in infos)
    assert any(info.get("reversed_halo") for info in infos)
    levels = [np.median([i["hu"] for i in case.lesion_info if i["kind"] != "consolidation"] or [np.nan])
              for case in varied_cases]  # fmt: skip
    assert np.nanmax(levels) - np.nanmin(levels) > 100.0  # faint and dense ground-glass cases


def test_crazy_paving_is_a_network_of_thin_lines():
    from covidseg.imaging.phantom import PLAIN_STYLE, _Grid, _Look

    look = _Look(PLAIN_STYLE, reticulation_hu=150.0, rng=np.random.default_rng(0))
    grid = _Grid((40, 100, 100), (1.0, 1.0, 1.0))
    box = (slice(0, 40), slice(0, 100), slice(0, 100))
    lines = look.reticulation(grid, box, np.ones((40, 100, 100), dtype=bool))
    assert lines.shape == (40, 100, 100) and 0.0 <= lines.min() and lines.max() <= 150.0
    on = lines[20] > 75.0
    assert 0.05 < on.mean() < 0.4
    labels, n = ndimage.label(on)
    assert np.bincount(labels.ravel())[1:].max() > 0.3 * on.sum()  # connected: a network, not dots
    assert ndimage.binary_erosion(on, np.ones((3, 3))).sum() < 0.2 * on.sum()  # thin
    assert _Look(PLAIN_STYLE).reticulation(grid, box, np.ones((40, 100, 100), dtype=bool)) == 0.0


def test_reversed_halo_puts_the_dense_part_at_the_rim():
    def dense_depth(case: Phantom) -> float:
        """Mean depth (mm from the lesion's edge) of its dense voxels over that of all its voxels."""
        lesion = case.lesions > 0
        depth = ndimage.distance_transform_edt(lesion, sampling=SPACING)
        return float(depth[lesion & (case.hu > -200.0)].mean() / depth[lesion].mean())

    # seeds found by drawing single mixed lesions of >= 30 mL with lesion variety (seed 29: the
    # first with a reversed halo)
    found = {}
    for seed in (15, 29):
        case = _phantom(seed, covid=True, n_lesions=(1, 1), lesion_variety=True)
        info = case.lesion_info[0]
        assert info["kind"] == "mixed" and info["volume_ml"] >= 30.0
        found[info["reversed_halo"]] = case
    assert set(found) == {True, False}
    assert dense_depth(found[True]) < 0.8 < 1.2 < dense_depth(found[False])

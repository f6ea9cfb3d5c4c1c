"""Phantoms that look like hospital scans: table, arms, clothing, bowel gas, scanner variety."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

import covidseg.imaging.phantom as phantom_module
from covidseg.imaging import phantom_surroundings as surround
from covidseg.imaging.phantom import Phantom, make_phantom

SHAPE, SPACING = (24, 96, 96), (12.0, 3.5, 3.5)  # a real chest field of view on a coarse grid
FINE_SHAPE, FINE_SPACING = (4, 192, 192), (72.0, 1.75, 1.75)  # thin table walls resolved, few slices
WIDE_SHAPE, WIDE_SPACING = (8, 96, 96), (36.0, 5.0, 5.0)  # 480 mm across: arms fully in view


@pytest.fixture
def raw(monkeypatch):
    """make_phantom without the scanner (no noise, kernel or streaks): exact HU to compare."""
    monkeypatch.setattr(phantom_module, "_apply_scanner", lambda rng, grid, hu, kernel=None: (hu, 0.0))
    monkeypatch.setattr(surround, "add_streaks", lambda *args, **kwargs: None)
    return make_phantom


def _body(plain: Phantom) -> np.ndarray:
    """[z, y, x] bool: the body (largest component of each slice, holes filled) of a phantom made
    without surroundings."""
    body = np.zeros(plain.hu.shape, dtype=bool)
    for k, plane in enumerate(plain.hu):
        labels, _ = ndimage.label(ndimage.binary_fill_holes(plane > -500.0))
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        body[k] = labels == sizes.argmax()
    return body


def _mm(n: int, spacing: float) -> np.ndarray:
    return (np.arange(n) - (n - 1) / 2) * spacing


def test_lung_and_lesion_truth_do_not_depend_on_surroundings():
    for seed in range(3):
        on = make_phantom(SHAPE, SPACING, covid=True, seed=seed)
        off = make_phantom(SHAPE, SPACING, covid=True, seed=seed, surroundings=False)
        assert np.array_equal(on.lungs, off.lungs)
        assert np.array_equal(on.lesions, off.lesions)
        assert on.lesion_info == off.lesion_info
        assert on.scene_info["surroundings"] and not off.scene_info["surroundings"]
        assert np.abs(on.hu - off.hu).mean() > 5.0  # but the images differ


def test_same_arguments_give_the_same_scene_bit_for_bit():
    first = make_phantom(WIDE_SHAPE, WIDE_SPACING, covid=True, seed=4)
    again = make_phantom(WIDE_SHAPE, WIDE_SPACING, covid=True, seed=4)
    assert np.array_equal(first.hu, again.hu)
    assert first.scene_info == again.scene_info
    scenes = [make_phantom(WIDE_SHAPE, WIDE_SPACING, seed=seed).scene_info for seed in range(5, 8)]
    assert all(scene != first.scene_info for scene in scenes)


def test_surroundings_paint_nothing_in_the_body_but_bowel_gas(raw):
    for seed in range(3):
        on = raw(SHAPE, SPACING, seed=seed)
        off = raw(SHAPE, SPACING, seed=seed, surroundings=False)
        body = _body(off)
        changed = on.hu != off.hu
        inside = changed & body
        assert (changed & ~body).sum() > 100  # table, clothing, arms
        assert (on.hu[inside] < off.hu[inside]).all()  # only gas, which darkens
        assert not (inside & (on.lungs > 0)).any()  # never in the lungs
        lung_at_or_below = np.cumsum(on.lungs > 0, axis=0) > 0
        assert not (inside & lung_at_or_below).any()  # under the diaphragm
        depth = ndimage.distance_transform_edt(body, sampling=SPACING)  # mm inside the skin
        assert depth[inside].min() > 25.0  # in the abdomen, not in the body wall
        gas_ml = (inside & (on.hu < -500.0)).sum() * on.voxel_ml
        assert gas_ml > 5.0
        pockets = on.scene_info["bowel_gas"]
        assert len(pockets) >= 2 and {p["kind"] for p in pockets} <= {"colon", "small_bowel"}
        assert all(5.0 - 0.05 <= p["volume_ml"] <= 150.0 + 0.05 for p in pockets)


def test_bowel_gas_stays_where_the_room_allows():
    pocket = surround.GasPocket(kind="colon", path=((-40.0, 0.0, 0.0), (40.0, 0.0, 0.0)), radius=15.0,
                                haustra_mm=15.0, level=0.5, volume_ml=40.0)  # fmt: skip
    axis = _mm(64, 2.0).astype(np.float32)
    hu = np.full((64, 64, 64), 40.0, dtype=np.float32)

    def room(box):  # only at x < 0
        return np.broadcast_to(axis[box[2]][None, None, :] < 0.0, hu[box].shape)

    surround.paint_gas(hu, axis, axis, axis, (pocket,), room, 2.0)
    gas = hu < -500.0
    assert gas[:, :, axis < 0].sum() * 0.008 > 10.0  # mL
    assert (hu[:, :, axis > 0] == 40.0).all()
    rows = np.nonzero(gas)[1]
    assert axis[rows].max() < 15.0 * 0.5 + 2.0  # gas above the air-fluid level (anterior, small y)
    assert axis[rows].min() < -10.0


def test_table_shell_encloses_air_below_the_body():
    x, y = _mm(FINE_SHAPE[2], FINE_SPACING[2]), _mm(FINE_SHAPE[1], FINE_SPACING[1])
    pixel_mm2 = FINE_SPACING[1] * FINE_SPACING[2]
    for seed in range(3):  # back touching the table, on a pad, 5 mm above the table
        case = make_phantom(FINE_SHAPE, FINE_SPACING, seed=seed)
        table = case.scene_info["table"]
        assert table is not None
        plain = make_phantom(FINE_SHAPE, FINE_SPACING, seed=seed, surroundings=False)
        back_row = np.nonzero(_body(plain)[0])[0].max()
        for k in range(FINE_SHAPE[0]):
            labels, n = ndimage.label(case.hu[k] < -700.0, structure=np.ones((3, 3)))  # air, 8-connected
            border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
            enclosed = [label for label in range(1, n + 1) if label not in border]
            sizes = {label: (labels == label).sum() for label in enclosed}
            centre = labels[:, FINE_SHAPE[2] // 2]  # the column at x = 0
            below = [label for label in enclosed if (centre == label).any()]
            below = [label for label in below if np.nonzero(centre == label)[0].min() > back_row]
            assert below, f"seed {seed} slice {k}: no enclosed air under the back"
            core = labels == max(below, key=sizes.get)
            rows, cols = np.nonzero(core)
            assert sizes[max(below, key=sizes.get)] * pixel_mm2 > 1500.0  # the table's core, not a crease
            assert not case.lungs[k][core].any()
            assert np.abs(x[cols]).max() < table["half_width_mm"]
            assert y[rows].max() < table["top_y_mm"] + table["thickness_mm"]


def _arm_tissue(case: Phantom, body: np.ndarray) -> np.ndarray:
    """[z, y, x] bool: thick soft tissue (muscle) away from the body: thin table walls and fabric
    vanish in the erosion."""
    away = ~ndimage.binary_dilation(body, structure=np.ones((1, 3, 3)), iterations=2)
    muscle = (case.hu > -50.0) & away
    return ndimage.binary_erosion(muscle, structure=np.ones((1, 3, 3)), iterations=1)


def test_arms_are_where_the_scene_says(raw):
    x = _mm(WIDE_SHAPE[2], WIDE_SPACING[2])
    seen = set()
    for seed in range(30):
        case = raw(WIDE_SHAPE, WIDE_SPACING, seed=seed)
        mode = case.scene_info["arms"]
        if mode in seen:
            continue
        seen.add(mode)
        arms = _arm_tissue(case, _body(raw(WIDE_SHAPE, WIDE_SPACING, seed=seed, surroundings=False)))
        right = arms[:, :, x < 0].any(axis=(1, 2))  # per slice
        left = arms[:, :, x > 0].any(axis=(1, 2))
        if mode == "down":
            assert right.all() and left.all()
            assert len(case.scene_info["arm_gaps_mm"]) == 2
            bone = ndimage.binary_dilation(arms, structure=np.ones((1, 3, 3)), iterations=3)
            assert case.hu[bone].max() > 500.0  # a humerus
        elif mode == "up":
            assert right[-1] and left[-1]  # beside the shoulders in the top slice
            half = WIDE_SHAPE[0] // 2
            assert not right[:half].any() and not left[:half].any()
        else:
            assert not arms.any() and case.scene_info["arm_gaps_mm"] == []
        if len(seen) == 3:
            break
    assert seen == {"down", "up", "none"}


def _plain_scene(**changes) -> surround.Scene:
    """A scene with nothing but what `changes` sets, around an adult body in 1 mm pixels."""
    body = surround.Body(a=160.0, b=115.0, cy=0.0, scale=1.0, z_lo=-100.0, z_len=200.0,
                         x_max=199.5, y_max=199.5, pixel_mm=1.0)  # fmt: skip
    kernel = surround.Kernel("standard", 0.6, 0.0, 20.0)
    scene = surround.Scene(body, None, "none", (), None, (), (), kernel)
    return surround.Scene(**{**scene.__dict__, **changes})


def test_a_fabric_fold_traps_air_outside_the_body():
    fold = surround.Fold(centre=0.0, drift=0.0, z0=0.0, half_len=50.0, height=6.0, half_width=12.0)
    clothing = surround.Clothing(
        fabric_hu=-50.0, thickness_mm=2.0, cover_half=math.pi, body_folds=(fold,), sheet_folds=(),
        sheet_half_width=0.0,
    )  # fmt: skip
    scene = _plain_scene(clothing=clothing)
    axis = _mm(400, 1.0).astype(np.float32)
    x, y = axis[None, :], axis[:, None]
    outside = ~((x / 160.0) ** 2 + (y / 115.0) ** 2 < 1.0)
    hu = np.full((2, 400, 400), 40.0, dtype=np.float32)
    surround.paint_outside(hu, x, y, np.array([0.0, 80.0], dtype=np.float32), scene, outside, 1.0)
    for k, expect_pocket in ((0, True), (1, False)):  # the fold ends 50 mm above its centre
        air = (hu[k] < -700.0) & outside
        labels, n = ndimage.label(air)
        border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
        pockets = [label for label in range(1, n + 1) if label not in border]
        assert bool(pockets) == expect_pocket
        fabric = outside & (hu[k] > -700.0)
        assert fabric.sum() > 300  # fabric all around the body
        assert hu[k][outside].max() <= -50.0 + 1e-3  # fabric HU, never denser


def test_streaks_are_thin_lines_in_the_upper_slices():
    streak = surround.Streak(x=0.0, y=0.0, angle=0.05, drift=0.0, half_len=150.0, width=1.0, hu=-120.0,
                             z_from=40.0, z_to=100.0)  # fmt: skip
    z = np.array([0.0, 50.0, 100.0], dtype=np.float32)
    axis = _mm(200, 2.0).astype(np.float32)
    hu = np.zeros((3, 200, 200), dtype=np.float32)
    surround.add_streaks(hu, axis, axis, z, (streak,), pixel=2.0)
    assert not hu[0].any()  # below z_from
    assert hu[2].min() < -40.0 and hu[2].max() <= 0.0
    assert hu[1].min() > hu[2].min()  # grows toward the top
    assert (hu[2] < -10.0).mean() < 0.05  # a thin line, not a band


@pytest.mark.parametrize("name", ["soft", "standard", "sharp"])
def test_kernel_noise_has_the_requested_std(name):
    kernel = surround.Kernel(name, {"soft": 0.8, "standard": 0.6, "sharp": 0.5}[name],
                             1.0 if name == "sharp" else 0.0, 30.0)  # fmt: skip
    noise = np.random.default_rng(0).standard_normal((24, 96, 96)).astype(np.float32)
    noise *= kernel.noise_std_hu / surround.kernel_gain(kernel, 0.4247)
    filtered = surround.apply_kernel(noise, kernel, 0.4247)
    assert filtered[2:-2, 4:-4, 4:-4].std() == pytest.approx(30.0, rel=0.05)


def test_sharp_kernel_enhances_edges_soft_blurs_them():
    step = np.zeros((5, 40, 40), dtype=np.float32)
    step[:, :, 20:] = 1000.0
    soft = surround.apply_kernel(step, surround.Kernel("soft", 0.8, 0.0, 10.0), 0.4247)
    sharp = surround.apply_kernel(step, surround.Kernel("sharp", 0.5, 1.0, 10.0), 0.4247)
    assert sharp.max() > 1050.0 and sharp.min() < -50.0  # overshoot on both sides of the edge
    assert 0.0 <= soft.min() and soft.max() <= 1000.0 + 1e-3
    assert soft[2, 20, 19] > sharp[2, 20, 19]  # wider blur

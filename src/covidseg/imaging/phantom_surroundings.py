"""What a hospital chest CT shows besides the chest: table, arms, clothing, bowel gas, scanner.

Used by :func:`covidseg.imaging.phantom.make_phantom` (``surroundings=True``). Everything is drawn in mm
in the phantom's frame (LPS, volume centred on 0: x toward the patient's left, y toward posterior,
z toward superior; arrays ``[z, y, x]``) and only sampled on the voxel grid, so one seed gives the
same scene at any resolution. Thin structures (table walls, fabric, streaks) get their partial
volume from the overlap of a slab with a pixel: on a coarse grid they are as faint as they would
be on a scanner, never dropped or thickened.

What is drawn (HU; sizes in mm are multiplied by the phantom's in-plane scale):

* a patient **table** under the back: a curved cradle (top surface an arc of radius 450-1050 mm,
  18-34 mm thick, rounded ends, 80-94 % of the field of view wide, at most 480 mm) whose shell has
  walls of 2-4 mm (+150..+500 HU: carbon fibre or plastic) closed all around, with air or foam
  inside (-1000..-900 HU): enclosed air in every axial slice, as on real scans. In half the cases a
  5-15 mm pad (foam, -900..-600 HU) lies on it. The back touches the pad (60 %, sinking up to 6 mm
  into it) or the bare table (40 %), else there is a 2-12 mm gap. Gap, pad and table shrink
  together to fit the field of view below the body; no table when less than 8 mm would fit.
* **arms**, down (40 %), raised (40 %) or out of view (20 %), each of radius 38-50 mm: skin and
  fat (-100 HU, 5-12 mm), muscle (+40 HU) and a humerus (radius 10-13 mm; cortex 2.5-4.5 mm,
  +700..+1000 HU; marrow -50..+150 HU). Down: along the whole z range, resting beside the back,
  touching the body (50 %, pressed up to 6 mm into it) or 3-25 mm away. Raised: from the shoulder,
  4-14 % of the field of view below its top, up and slightly inward, so only the upper slices show
  them beside the shoulders, mostly merged with them (70 %) or 3-15 mm away. A 350 mm field of
  view often cuts the arms, as on real scans.
* **clothing** (85 % of cases): a gown all around the body (50 %) or a blanket over its front
  (60-110 degrees either side of anterior): 1-3 mm of fabric (-200..+50 HU) on the skin with 3-8
  folds lifting it 1.5-10 mm off it over 80-400 mm of z, the air under a fold enclosed outside the
  body; with a table, a sheet on it (or on the pad) with 2-6 wrinkles 1.5-8 mm high.
* **bowel gas** (-1000 HU) at least 6 mm under the diaphragm, in the abdominal cavity, never in the
  lungs: 1-3 colon segments (radius 10-18 mm, haustral folds every 12-20 mm narrowing it by 30 %)
  and 1-4 small-bowel loops (radius 7-12 mm), 5-150 mL of gas each (as drawn: the field of view
  may cut them), gas above an air-fluid level (anterior), the rest keeping the organ's HU.
* the **scanner**: a reconstruction kernel per case, soft (35 %: in-plane PSF sigma 0.8 voxel,
  noise 10-35 HU), standard (30 %: 0.6 voxel, 12-45 HU) or sharp (35 %: 0.5 voxel then a 3 x 3
  unsharp mask of amount 0.6-1.2, noise 20-60 HU); noise std after filtering, log-uniform. And,
  in 75 % of cases with arms in view (40 % without), 2-7 beam-hardening / photon-starvation
  streaks across the shoulders: thin lines (sigma 0.6-1.5 mm), 65 % dark and 35 % bright, 50-150
  HU at the top slice, fading in over the upper 12-30 % of the field of view.

Pure functions over numpy arrays; random numbers only from the generator passed to
:func:`draw_scene`, split into one stream per part, each drawing a fixed number of values: the
draws of no part depend on the grid or on another part.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

AIR_HU = -1000.0
FAT_HU = -100.0
MUSCLE_HU = 40.0
SHARPEN_SIGMA_VOX = 0.8  # in-plane Gaussian of the unsharp mask (truncated at one voxel)


# --------------------------------------------------------------------------------------------
# The patient, as far as the surroundings care


@dataclass(frozen=True)
class Body:
    """The body outline (an elliptic cylinder along z) and the field of view (mm)."""

    a: float  # semi-axis along x
    b: float  # semi-axis along y
    cy: float  # centre y
    scale: float  # in-plane size factor of the phantom (1 for an adult in a 350 mm field of view)
    z_lo: float  # bottom of the field of view
    z_len: float  # height of the field of view
    x_max: float  # largest voxel-centre |x|
    y_max: float  # largest voxel-centre y
    pixel_mm: float  # in-plane voxel size (geometric mean of y and x)

    @property
    def back_y(self) -> float:
        """y of the back at x = 0 (mm)."""
        return self.cy + self.b

    def edge_x(self, y: float) -> float:
        """Half-width (mm) of the outline at height y (0 outside it)."""
        v = (y - self.cy) / self.b
        return self.a * math.sqrt(max(0.0, 1.0 - v * v))

    def distance(self, x, y) -> np.ndarray:
        """Approximate distance (mm) outside the outline (negative inside); good within ~30 mm."""
        u, v = x / self.a, (y - self.cy) / self.b
        gradient = 2.0 * np.hypot(u / self.a, v / self.b)
        return (u * u + v * v - 1.0) / np.maximum(gradient, 1e-6)


@dataclass(frozen=True)
class Abdomen:
    """Where bowel gas may go: the abdominal cavity (ellipse, mm) under `ceiling(x, y)` (z, mm)."""

    a: float
    b: float
    cy: float
    ceiling: Callable[[np.ndarray, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------------
# Scene description


@dataclass(frozen=True)
class Table:
    """A curved cradle with a closed shell, and an optional pad on it (mm, HU)."""

    top_y: float  # y of the top surface at x = 0
    radius: float  # radius of curvature of the top surface (the edges rise toward anterior)
    thickness: float
    half_width: float
    wall_mm: float
    wall_hu: float
    core_hu: float
    pad_mm: float  # 0: no pad
    pad_hu: float
    gap_mm: float  # between the back and the pad or table (0: touching)

    def top(self, x) -> np.ndarray:
        """y (mm) of the table's top surface at x."""
        x = np.minimum(np.abs(x), 0.99 * self.radius)
        return self.top_y - (self.radius - np.sqrt(self.radius**2 - x * x))


@dataclass(frozen=True)
class Arm:
    """A tapered limb around the axis p0 -> p1 (x, y, z mm) with a humerus inside."""

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    radius: float  # outer radius at p0 (mm)
    taper: float  # radius at p1 / radius at p0
    fat_mm: float
    bone_offset: tuple[float, float]  # humerus axis minus arm axis (x, y mm)
    bone_radius: float
    cortex_mm: float
    cortex_hu: float
    marrow_hu: float
    gap_mm: float  # to the body outline where the arm is closest (<= 0: touching)


@dataclass(frozen=True)
class Fold:
    """A ridge of lifted fabric: height (mm) at its crest, centred at `centre` (arc mm around the
    body, or x mm on the table) + `drift` per mm of z, over z0 +- half_len (mm)."""

    centre: float
    drift: float
    z0: float
    half_len: float
    height: float
    half_width: float


@dataclass(frozen=True)
class Clothing:
    """Fabric on the body (gown or blanket) and a sheet on the table."""

    fabric_hu: float
    thickness_mm: float
    cover_half: float  # angle (rad) either side of anterior covered by fabric; >= pi: all around
    body_folds: tuple[Fold, ...]
    sheet_folds: tuple[Fold, ...]  # empty without a table
    sheet_half_width: float


@dataclass(frozen=True)
class GasPocket:
    """Gas in a bowel segment: a tube along `path` (x, y, z mm) with an air-fluid level."""

    kind: str  # colon | small_bowel
    path: tuple[tuple[float, float, float], ...]
    radius: float
    haustra_mm: float  # period of the haustral folds (0: none)
    level: float  # gas where (y - axis y) < level * radius: 1 full of gas, 0 half
    volume_ml: float  # drawn gas volume, before the field of view cuts it


@dataclass(frozen=True)
class Streak:
    """A thin straight artefact line through (x, y) at `angle` (rad from the x axis, plus
    `drift` rad per mm of z), `half_len` mm either side, growing from z_from to z_to."""

    x: float
    y: float
    angle: float
    drift: float
    half_len: float
    width: float  # Gaussian sigma across the line (mm)
    hu: float  # amplitude at z_to: negative dark, positive bright
    z_from: float
    z_to: float


@dataclass(frozen=True)
class Kernel:
    """Reconstruction kernel: in-plane Gaussian PSF, unsharp-mask amount, noise std after both."""

    name: str  # soft | standard | sharp
    sigma_inplane_vox: float
    sharpen: float
    noise_std_hu: float


@dataclass(frozen=True)
class Scene:
    """Everything drawn around one phantom."""

    body: Body
    table: Table | None
    arm_mode: str  # down | up | none
    arms: tuple[Arm, ...]
    clothing: Clothing | None
    gas: tuple[GasPocket, ...]
    streaks: tuple[Streak, ...]
    kernel: Kernel


def draw_scene(rng: np.random.Generator, body: Body, abdomen: Abdomen) -> Scene:
    """Draw the surroundings of one phantom (one independent stream per part)."""
    table_rng, arm_rng, cloth_rng, gas_rng, streak_rng, kernel_rng = rng.spawn(6)
    table = draw_table(table_rng, body)
    arm_mode, arms = draw_arms(arm_rng, body)
    clothing = draw_clothing(cloth_rng, body, table)
    gas = draw_gas(gas_rng, body, abdomen)
    streaks = draw_streaks(streak_rng, body, arms)
    return Scene(body, table, arm_mode, arms, clothing, gas, streaks, draw_kernel(kernel_rng))


def describe(scene: Scene) -> dict:
    """JSON-ready summary of a scene (mm, HU, mL), for the phantom's ``scene_info``."""

    def r(v: float, nd: int = 1) -> float:
        return round(float(v), nd)

    table = None
    if scene.table is not None:
        t = scene.table
        table = {
            "gap_mm": r(t.gap_mm),
            "pad_mm": r(t.pad_mm),
            "pad_hu": r(t.pad_hu) if t.pad_mm > 0 else None,
            "top_y_mm": r(t.top_y),
            "thickness_mm": r(t.thickness),
            "half_width_mm": r(t.half_width),
            "wall_mm": r(t.wall_mm, 2),
            "wall_hu": r(t.wall_hu),
            "core_hu": r(t.core_hu),
        }
    clothing = None
    if scene.clothing is not None:
        c = scene.clothing
        clothing = {
            "cover": "all around" if c.cover_half >= math.pi else "front",
            "fabric_hu": r(c.fabric_hu),
            "thickness_mm": r(c.thickness_mm, 2),
            "body_folds": len(c.body_folds),
            "sheet_folds": len(c.sheet_folds),
        }
    k = scene.kernel
    return {
        "surroundings": True,
        "table": table,
        "arms": scene.arm_mode,
        "arm_gaps_mm": [r(a.gap_mm) for a in scene.arms],
        "clothing": clothing,
        "bowel_gas": [{"kind": g.kind, "volume_ml": r(g.volume_ml)} for g in scene.gas],
        "scanner": {"kernel": k.name, "noise_std_hu": r(k.noise_std_hu), "streaks": len(scene.streaks)},
    }


# --------------------------------------------------------------------------------------------
# Partial volume


def _ramp(inside_mm, pixel_mm: float) -> np.ndarray:
    """Fraction of a pixel inside a boundary `inside_mm` mm away (positive: centre inside)."""
    return np.clip(inside_mm / pixel_mm + 0.5, 0.0, 1.0)


def _slab(offset_mm, thickness_mm: float, pixel_mm: float) -> np.ndarray:
    """Fraction of a pixel, `offset_mm` from a slab's mid-plane, inside the slab (box overlap)."""
    half, hp = 0.5 * thickness_mm, 0.5 * pixel_mm
    return np.clip(np.minimum(offset_mm + hp, half) - np.maximum(offset_mm - hp, -half), 0.0, None) / pixel_mm


def _index_range(coords: np.ndarray, lo: float, hi: float) -> slice:
    """The indices of the (increasing) `coords` within [lo, hi] mm."""
    return slice(int(np.searchsorted(coords, lo, "left")), int(np.searchsorted(coords, hi, "right")))


# --------------------------------------------------------------------------------------------
# Table and pad


def draw_table(rng: np.random.Generator, body: Body) -> Table | None:
    """A cradle (and pad) under the back, fitted into the field of view; None if under 8 mm fit."""
    u = rng.uniform(size=12)
    s = body.scale
    pad = (5.0 + 10.0 * u[0]) * s if u[1] < 0.5 else 0.0
    touching = u[2] < (0.6 if pad else 0.4)
    gap = 0.0 if touching else (2.0 + 10.0 * u[3]) * s
    sink = min(6.0 * s * u[4], max(pad - 2.0 * s, 0.0)) if pad and touching else 0.0
    thickness = (18.0 + 16.0 * u[5]) * s
    room = body.y_max - max(3.0, 1.5 * body.pixel_mm) - body.back_y  # the bottom wall stays in view
    need = gap + pad - sink + thickness
    if need > room:
        factor = max(room, 0.0) / need
        gap, pad, sink, thickness = gap * factor, pad * factor, sink * factor, thickness * factor
    if thickness < 8.0:
        return None
    return Table(
        top_y=body.back_y + gap + pad - sink,
        radius=(450.0 + 600.0 * u[6]) * s,
        thickness=thickness,
        half_width=min((0.80 + 0.14 * u[7]) * body.x_max, 240.0 * s),
        wall_mm=min((2.0 + 2.0 * u[8]) * s, 0.3 * thickness),
        wall_hu=150.0 + 350.0 * u[9],
        core_hu=-1000.0 + 100.0 * u[10],
        pad_mm=pad,
        pad_hu=-900.0 + 300.0 * u[11],
        gap_mm=gap,
    )


def _inside_rounded_box(u, v, half_u: float, half_v: float) -> np.ndarray:
    """Distance (mm) inside a rectangle of half-sizes (half_u, half_v) centred on 0 whose corners
    are rounded with a radius of 0.6 * half_v (negative outside)."""
    r = 0.6 * half_v
    qu, qv = np.abs(u) - (half_u - r), np.abs(v) - (half_v - r)
    outside = np.hypot(np.maximum(qu, 0.0), np.maximum(qv, 0.0)) + np.minimum(np.maximum(qu, qv), 0.0)
    return r - outside


def table_plane(table: Table, x: np.ndarray, y: np.ndarray, pixel: float):
    """(HU [y, x] float32, solid fraction [y, x]) of the table and pad in any axial slice.

    The cradle is a rectangle with rounded ends (x, depth below the curved top surface); the shell
    is its solid minus its core grown in by the wall thickness, so the core is closed on all sides.
    The pad lies on the top surface, 3 mm short of the table's edges.
    """
    top = table.top(x)  # [1, nx]
    depth = y - top  # mm below the top surface
    edge = table.half_width - np.abs(x)
    inside = _inside_rounded_box(
        np.abs(x), depth - table.thickness / 2, table.half_width, table.thickness / 2
    )
    solid = _ramp(inside, pixel)
    core = _ramp(inside - table.wall_mm, pixel)
    hu = AIR_HU + solid * (table.wall_hu - AIR_HU) + core * (table.core_hu - table.wall_hu)
    if table.pad_mm > 0:
        pad_inside = np.minimum(np.minimum(-depth, table.pad_mm + depth), edge - 3.0)
        pad = _ramp(pad_inside, pixel) * (1.0 - solid)
        hu += pad * (table.pad_hu - AIR_HU)
        solid = solid + pad
    return hu.astype(np.float32), solid.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Arms


def draw_arms(rng: np.random.Generator, body: Body) -> tuple[str, tuple[Arm, ...]]:
    """Arms down beside the chest (40 %), raised (40 %) or out of view (20 %): (mode, arms)."""
    u = rng.uniform(size=(2, 12))
    mode_u = rng.uniform()
    mode = "down" if mode_u < 0.4 else ("up" if mode_u < 0.8 else "none")
    if mode == "none":
        return mode, ()
    s = body.scale
    z_top = body.z_lo + body.z_len
    arms = []
    for side, v in zip((-1.0, 1.0), u, strict=True):
        radius = (38.0 + 12.0 * v[0]) * s
        if mode == "down":  # touching (pressed up to 6 mm into the side) or not
            gap = -6.0 * s * v[2] if v[1] < 0.5 else (3.0 + 22.0 * v[2]) * s
            yc = body.back_y - radius * (1.0 + 0.3 * v[3])  # resting on the table beside the back
            xc = side * (body.edge_x(yc) + gap + radius)
            drift = side * 12.0 * s * (v[4] - 0.5)
            p0, p1 = (xc, yc, z_top + 40.0), (xc + drift, yc, body.z_lo - 40.0)
            taper = 0.85 + 0.1 * v[5]
        else:  # raised: from the shoulder up and inward, toward the head; mostly merged with it
            gap = -0.5 * radius * v[2] if v[1] < 0.7 else (3.0 + 12.0 * v[2]) * s
            yc = body.cy + (0.4 * v[3] - 0.1) * body.b
            xc = side * (body.edge_x(yc) + gap + radius)
            z0 = z_top - (0.04 + 0.10 * v[4]) * body.z_len
            direction = np.array([-side * (0.05 + 0.3 * v[5]), -0.15 * v[6], 1.0])
            direction /= np.linalg.norm(direction)
            p0 = (xc, yc, z0)
            p1 = tuple(float(c) for c in np.array(p0) + 400.0 * direction)
            taper = 0.95
        bone_radius = (10.0 + 3.0 * v[7]) * s
        arms.append(
            Arm(
                p0=tuple(float(c) for c in p0),
                p1=tuple(float(c) for c in p1),
                radius=radius,
                taper=taper,
                fat_mm=(5.0 + 7.0 * v[8]) * s,
                bone_offset=(side * 0.15 * radius * v[9], 0.1 * radius * (v[9] - 0.3)),
                bone_radius=bone_radius,
                cortex_mm=(2.5 + 2.0 * v[10]) * s,
                cortex_hu=700.0 + 300.0 * v[11],
                marrow_hu=-50.0 + 200.0 * v[10],
                gap_mm=gap,
            )
        )
    return mode, tuple(arms)


def _segment_distance(p0, p1, x, y, z: float):
    """(distance mm, axis parameter t in [0, 1]) of points (x, y) on slice z to the segment p0-p1."""
    d = np.subtract(p1, p0, dtype=np.float64)
    rx, ry, rz = x - p0[0], y - p0[1], z - p0[2]
    t = np.clip((rx * d[0] + ry * d[1] + rz * d[2]) / max(float(d @ d), 1e-9), 0.0, 1.0)
    dist = np.sqrt((rx - t * d[0]) ** 2 + (ry - t * d[1]) ** 2 + (rz - t * d[2]) ** 2)
    return dist, t


def _arm_box(arm: Arm, x: np.ndarray, y: np.ndarray, z: float) -> tuple[slice, slice] | None:
    """The [y, x] index box that holds the arm's section at height z, or None if it misses z."""
    p0, p1 = np.asarray(arm.p0), np.asarray(arm.p1)
    lo_z, hi_z = min(p0[2], p1[2]) - arm.radius, max(p0[2], p1[2]) + arm.radius
    if not lo_z <= z <= hi_z:
        return None
    d = p1 - p0
    t = float(np.clip((z - p0[2]) / d[2], 0.0, 1.0)) if abs(d[2]) > 1e-9 else 0.0
    centre = p0 + t * d
    reach = (arm.radius + 2.0) / max(abs(d[2]) / float(np.linalg.norm(d)), 0.5)
    rows = _index_range(y.ravel(), centre[1] - reach, centre[1] + reach)
    cols = _index_range(x.ravel(), centre[0] - reach, centre[0] + reach)
    return None if rows.stop <= rows.start or cols.stop <= cols.start else (rows, cols)


def paint_arm(arm: Arm, plane: np.ndarray, free: np.ndarray, x, y, z: float, pixel: float) -> None:
    """Blend the arm's section at height z into `plane` [y, x] (HU, in place), where `free`
    (fraction 0..1 not taken by the table) allows; `free` loses what the arm takes."""
    box = _arm_box(arm, x, y, z)
    if box is None:
        return
    xs, ys = x[:, box[1]], y[box[0]]
    dist, t = _segment_distance(arm.p0, arm.p1, xs, ys, z)
    radius = arm.radius * (1.0 + (arm.taper - 1.0) * t)
    bone_p0 = (arm.p0[0] + arm.bone_offset[0], arm.p0[1] + arm.bone_offset[1], arm.p0[2])
    bone_p1 = (arm.p1[0] + arm.bone_offset[0], arm.p1[1] + arm.bone_offset[1], arm.p1[2])
    bone_dist, _ = _segment_distance(bone_p0, bone_p1, xs, ys, z)
    outer = _ramp(radius - dist, pixel) * free[box]
    muscle = _ramp(radius - arm.fat_mm - dist, pixel)
    cortex = _ramp(arm.bone_radius - bone_dist, pixel)
    marrow = _ramp(arm.bone_radius - arm.cortex_mm - bone_dist, pixel)
    tissue = FAT_HU + muscle * (MUSCLE_HU - FAT_HU)
    tissue += cortex * (arm.cortex_hu - tissue) + marrow * (arm.marrow_hu - arm.cortex_hu)
    region = plane[box]
    region += outer * (tissue - region)
    free[box] -= outer


# --------------------------------------------------------------------------------------------
# Clothing


def _folds(u: np.ndarray, n: int, centre_range, height_range, width_range, body: Body) -> tuple[Fold, ...]:
    """`n` folds from the rows of `u` (uniform draws, 6 per fold)."""
    z_top = body.z_lo + body.z_len
    folds = []
    for v in u[:n]:
        folds.append(
            Fold(
                centre=centre_range[0] + (centre_range[1] - centre_range[0]) * v[0],
                drift=0.6 * (v[1] - 0.5),
                z0=body.z_lo + (z_top - body.z_lo) * v[2],
                half_len=40.0 + 160.0 * v[3],
                height=(height_range[0] + (height_range[1] - height_range[0]) * v[4]) * body.scale,
                half_width=(width_range[0] + (width_range[1] - width_range[0]) * v[5]) * body.scale,
            )
        )
    return tuple(folds)


def draw_clothing(rng: np.random.Generator, body: Body, table: Table | None) -> Clothing | None:
    """A gown or blanket with folds, and a wrinkled sheet on the table; None in 15 % of cases."""
    u = rng.uniform(size=8)
    body_u = rng.uniform(size=(8, 6))
    sheet_u = rng.uniform(size=(6, 6))
    if u[0] < 0.15:
        return None
    perimeter = math.pi * (body.a + body.b)  # arc length, roughly
    n_body = 3 + int(6 * u[1] * 0.999)
    body_folds = _folds(body_u, n_body, (-perimeter / 2, perimeter / 2), (1.5, 10.0), (5.0, 20.0), body)
    sheet_folds: tuple[Fold, ...] = ()
    sheet_half = 0.0
    if table is not None:
        sheet_half = table.half_width * (0.8 + 0.15 * u[2])
        n_sheet = 2 + int(5 * u[3] * 0.999)
        sheet_folds = _folds(sheet_u, n_sheet, (-sheet_half, sheet_half), (1.5, 8.0), (4.0, 15.0), body)
    return Clothing(
        fabric_hu=-200.0 + 250.0 * u[4],
        thickness_mm=1.0 + 2.0 * u[5],
        cover_half=math.pi if u[6] < 0.5 else math.radians(60.0 + 50.0 * u[7]),
        body_folds=body_folds,
        sheet_folds=sheet_folds,
        sheet_half_width=sheet_half,
    )


def _lift(folds: tuple[Fold, ...], u: np.ndarray, z: float, period: float = 0.0) -> np.ndarray:
    """Height (mm) of the fabric above its support at coordinate `u` (mm) and height z: the sum of
    the folds' smooth bumps; `period` > 0 wraps `u` (around the body)."""
    height = np.zeros(u.shape, dtype=np.float32)
    for fold in folds:
        along = (z - fold.z0) / fold.half_len
        if abs(along) >= 1.0:
            continue
        offset = u - (fold.centre + fold.drift * (z - fold.z0))
        if period:
            offset = (offset + period / 2) % period - period / 2
        bump = np.clip(1.0 - (offset / fold.half_width) ** 2, 0.0, None) ** 2
        height += (fold.height * math.sqrt(1.0 - along * along)) * bump
    return height


@dataclass(frozen=True)
class _FabricBands:
    """Pixels near the skin and near the table top where fabric can lie, with their coordinates."""

    body_idx: np.ndarray  # flat [y, x] indices
    body_d: np.ndarray  # distance outside the skin (mm)
    body_arc: np.ndarray  # arc coordinate around the body (mm, 0 anterior... wraps)
    body_cover: np.ndarray  # 0..1: fabric there at all
    sheet_idx: np.ndarray
    sheet_h: np.ndarray  # height above the sheet's support (pad or table top, mm)
    sheet_x: np.ndarray


def fabric_bands(clothing: Clothing, table: Table | None, body: Body, x, y, pixel: float) -> _FabricBands:
    """Precompute the band pixels (z-invariant) for :func:`paint_fabric`."""
    reach = 12.0 * body.scale + clothing.thickness_mm + 2.0 * pixel
    d = np.broadcast_to(body.distance(x, y), (y.shape[0], x.shape[1]))
    near = (d > -pixel) & (d < reach)
    idx = np.flatnonzero(near)
    xx = np.broadcast_to(x, near.shape).ravel()[idx]
    yy = np.broadcast_to(y, near.shape).ravel()[idx]
    theta = np.arctan2((yy - body.cy) / body.b, xx / body.a)  # -pi/2 anterior, +pi/2 the back
    mean_r = 0.5 * (body.a + body.b)
    from_front = np.abs((theta + math.pi / 2 + math.pi) % (2 * math.pi) - math.pi)  # 0..pi
    cover = np.clip((clothing.cover_half - from_front) * mean_r / pixel + 0.5, 0.0, 1.0)
    sheet_idx = np.zeros(0, dtype=np.intp)
    sheet_h = sheet_x = np.zeros(0, dtype=np.float32)
    if table is not None and clothing.sheet_folds:
        support = table.top(x) - table.pad_mm  # [1, nx]
        height = np.broadcast_to(support - y, near.shape)
        band = (height > -pixel) & (height < reach) & (np.abs(x) < clothing.sheet_half_width)
        sheet_idx = np.flatnonzero(band)
        sheet_h = height.ravel()[sheet_idx].astype(np.float32)
        sheet_x = np.broadcast_to(x, near.shape).ravel()[sheet_idx].astype(np.float32)
    return _FabricBands(
        body_idx=idx,
        body_d=d.ravel()[idx].astype(np.float32),
        body_arc=(theta * mean_r).astype(np.float32),
        body_cover=cover.astype(np.float32),
        sheet_idx=sheet_idx,
        sheet_h=sheet_h,
        sheet_x=sheet_x,
    )


def paint_fabric(
    clothing: Clothing,
    bands: _FabricBands,
    plane: np.ndarray,
    free: np.ndarray,
    z: float,
    pixel: float,
    period: float,
) -> None:
    """Blend the fabric at height z into `plane` [y, x] (in place) where `free` allows: a layer on
    the skin and one on the table's support, each lifted by its folds."""
    t = clothing.thickness_mm
    flat, free_flat = plane.ravel(), free.ravel()
    lift = _lift(clothing.body_folds, bands.body_arc, z, period)
    occupancy = _slab(bands.body_d - lift - t / 2, t, pixel) * bands.body_cover
    occupancy *= free_flat[bands.body_idx]
    flat[bands.body_idx] += occupancy * (clothing.fabric_hu - flat[bands.body_idx])
    free_flat[bands.body_idx] -= occupancy
    if bands.sheet_idx.size:
        lift = _lift(clothing.sheet_folds, bands.sheet_x, z)
        occupancy = _slab(bands.sheet_h - lift - t / 2, t, pixel) * free_flat[bands.sheet_idx]
        flat[bands.sheet_idx] += occupancy * (clothing.fabric_hu - flat[bands.sheet_idx])
        free_flat[bands.sheet_idx] -= occupancy


# --------------------------------------------------------------------------------------------
# Everything outside the body, slice by slice


def paint_outside(
    hu: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    scene: Scene,
    outside: np.ndarray,
    pixel: float,
) -> None:
    """Paint table, pad, arms and clothing into `hu` [z, y, x] (in place), only where `outside`
    [y, x] (the air around the body) is True. x [1, nx], y [ny, 1], z [nz] in mm."""
    shape = (y.shape[0], x.shape[1])
    if scene.table is not None:
        base, taken = table_plane(scene.table, x, y, pixel)
    else:
        base, taken = np.full(shape, AIR_HU, dtype=np.float32), np.zeros(shape, dtype=np.float32)
    base_free = 1.0 - taken
    bands = None
    period = math.pi * (scene.body.a + scene.body.b)  # arc length around the body (mm), roughly
    if scene.clothing is not None:
        bands = fabric_bands(scene.clothing, scene.table, scene.body, x, y, pixel)
    for k, zk in enumerate(z.tolist()):
        plane, free = base.copy(), base_free.copy()
        for arm in scene.arms:
            paint_arm(arm, plane, free, x, y, zk, pixel)
        if bands is not None:
            paint_fabric(scene.clothing, bands, plane, free, zk, pixel, period)
        hu[k][outside] = plane[outside]


# --------------------------------------------------------------------------------------------
# Bowel gas


def _fraction_above(level: float) -> float:
    """Share of a circle's area on the gas side of a chord `level` radii from its centre (-1..1)."""
    return (math.acos(-level) + level * math.sqrt(max(0.0, 1.0 - level * level))) / math.pi


def _best_start(v: np.ndarray, abdomen: Abdomen, x_range, y_range) -> tuple[float, float]:
    """Of four candidate (x, y) points (8 draws in `v`), the one under the highest ceiling."""
    xs = abdomen.a * (x_range[0] + (x_range[1] - x_range[0]) * v[0:8:2])
    ys = abdomen.cy + abdomen.b * (y_range[0] + (y_range[1] - y_range[0]) * v[1:8:2])
    best = int(np.argmax(abdomen.ceiling(xs, ys)))
    return float(xs[best]), float(ys[best])


def _inside_cavity(abdomen: Abdomen, x: float, y: float, margin: float) -> tuple[float, float]:
    """(x, y) pulled toward the cavity's centre until `margin` mm inside its ellipse."""
    a, b = max(abdomen.a - margin, 1.0), max(abdomen.b - margin, 1.0)
    rho = math.hypot(x / a, (y - abdomen.cy) / b)
    if rho <= 1.0:
        return x, y
    return x / rho, abdomen.cy + (y - abdomen.cy) / rho


def _pocket(kind: str, v: np.ndarray, body: Body, abdomen: Abdomen, first: bool) -> GasPocket:
    """One colon segment or small-bowel loop from 16 uniform draws `v`."""
    s = body.scale
    colon = kind == "colon"
    radius = ((10.0 + 8.0 * v[8]) if colon else (7.0 + 5.0 * v[8])) * s
    level = v[9] if colon else 0.3 + 0.7 * v[9]
    lo_ml, hi_ml = (10.0, 150.0) if colon else (5.0, 40.0)
    target_ml = lo_ml * (hi_ml / lo_ml) ** v[10]
    area = math.pi * radius**2 * _fraction_above(level)  # mm^2 of gas in a section
    length = float(np.clip(target_ml * 1000.0 / area, 30.0 * s, 160.0 * s))
    length = float(np.clip(length, 5000.0 / area, 150000.0 / area))  # 5..150 mL of gas
    if colon and first:  # splenic flexure: high under the left dome, heading forward and inward
        x0, y0 = _best_start(v, abdomen, (0.35, 0.75), (-0.4, 0.3))
        heading = math.atan2(-1.0, -0.7) + 0.8 * (v[11] - 0.5)
    elif colon:
        x0, y0 = _best_start(v, abdomen, (-0.1, 0.8), (-0.8, 0.4))
        heading = 2.0 * math.pi * v[11]
    else:
        x0, y0 = _best_start(v, abdomen, (-0.15, 0.6), (-0.8, 0.2))
        heading = 2.0 * math.pi * v[11]
    if colon:  # total change of heading along the path (rad)
        turn = 1.5 * (v[13] - 0.5)
    else:  # a loop
        turn = (2.0 + 2.5 * v[12]) * (1.0 if v[13] < 0.5 else -1.0)
    n = 3 if colon else 8  # path points
    points, x, y = [], x0, y0
    step = length / (n - 1)
    for i in range(n):
        x, y = _inside_cavity(abdomen, x, y, radius + 5.0 * s)
        depth = radius + 2.0 + (10.0 if colon else 30.0) * v[14]  # below the ceiling, mm
        points.append((x, y, float(abdomen.ceiling(np.float64(x), np.float64(y))) - depth))
        angle = heading + turn * i / max(n - 2, 1)
        x, y = x + step * math.cos(angle), y + step * math.sin(angle)
    return GasPocket(
        kind=kind,
        path=tuple(points),
        radius=radius,
        haustra_mm=(12.0 + 8.0 * v[15]) * s if colon else 0.0,
        level=level,
        volume_ml=area * length / 1000.0,
    )


def draw_gas(rng: np.random.Generator, body: Body, abdomen: Abdomen) -> tuple[GasPocket, ...]:
    """1-3 colon segments and 1-4 small-bowel loops under the diaphragm."""
    u = rng.uniform(size=2)
    colon_u = rng.uniform(size=(3, 16))
    bowel_u = rng.uniform(size=(4, 16))
    n_colon, n_small = 1 + int(3 * u[0] * 0.999), 1 + int(4 * u[1] * 0.999)
    pockets = [_pocket("colon", v, body, abdomen, first=i == 0) for i, v in enumerate(colon_u[:n_colon])]
    pockets += [_pocket("small_bowel", v, body, abdomen, first=False) for v in bowel_u[:n_small]]
    return tuple(pockets)


def paint_gas(
    hu: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    pockets: tuple[GasPocket, ...],
    room: Callable[[tuple[slice, slice, slice]], np.ndarray],
    pixel: float,
) -> None:
    """Blend the gas of `pockets` into `hu` [z, y, x] (in place) where `room(box)` allows.

    x, y, z are the 1-D voxel-centre coordinates (mm). Each pocket is a tube along its path whose
    radius dips by 30 % at every haustral fold (colon); gas fills it above (anterior of) its
    air-fluid level, the rest keeps the organ HU already there.
    """
    for pocket in pockets:
        along = 0.0
        for p0, p1 in zip(pocket.path[:-1], pocket.path[1:], strict=True):
            length = math.dist(p0, p1)
            lo = np.minimum(p0, p1) - pocket.radius - pixel
            hi = np.maximum(p0, p1) + pocket.radius + pixel
            box = tuple(_index_range(c, lo[i], hi[i]) for c, i in ((z, 2), (y, 1), (x, 0)))
            if all(b.stop > b.start for b in box):
                zz, yy, xx = z[box[0]][:, None, None], y[box[1]][None, :, None], x[box[2]][None, None, :]
                dist, t = _segment_distance(p0, p1, xx, yy, zz)
                radius = np.full(t.shape, pocket.radius, dtype=np.float32)
                if pocket.haustra_mm:
                    phase = 2.0 * math.pi * (along + t * length) / pocket.haustra_mm
                    radius *= 1.0 - 0.3 * np.clip(np.cos(phase), 0.0, None) ** 8
                axis_y = p0[1] + t * (p1[1] - p0[1])
                gas = _ramp(radius - dist, pixel) * _ramp(pocket.level * radius - (yy - axis_y), pixel)
                gas *= room(box)
                region = hu[box]
                region += (gas * (AIR_HU - region)).astype(np.float32)
            along += length


# --------------------------------------------------------------------------------------------
# Scanner: streaks and kernel


def draw_streaks(rng: np.random.Generator, body: Body, arms: tuple[Arm, ...]) -> tuple[Streak, ...]:
    """Beam-hardening / photon-starvation streaks across the shoulders (between the humeri when
    the arms are in view): 75 % of cases with arms, 40 % without."""
    u = rng.uniform(size=3)
    lines_u = rng.uniform(size=(7, 8))
    if u[0] >= (0.75 if arms else 0.4):
        return ()
    s = body.scale
    n = 2 + int(6 * u[1] * 0.999)
    z_to = body.z_lo + body.z_len
    z_from = z_to - (0.12 + 0.18 * u[2]) * body.z_len
    if arms:
        half = float(np.mean([abs(arm.p0[0] + arm.bone_offset[0]) for arm in arms]))
        yc = float(np.mean([arm.p0[1] + arm.bone_offset[1] for arm in arms]))
    else:
        half, yc = 0.8 * body.a, body.cy + 0.2 * body.b
    streaks = []
    for v in lines_u[:n]:
        sign = -1.0 if v[0] < 0.65 else 1.0  # mostly dark
        streaks.append(
            Streak(
                x=0.15 * half * (2.0 * v[2] - 1.0),
                y=yc + 25.0 * s * (2.0 * v[3] - 1.0),
                angle=math.radians(10.0) * (2.0 * v[4] - 1.0),
                drift=0.002 * (2.0 * v[5] - 1.0),
                half_len=half + (20.0 + 40.0 * v[6]) * s,
                width=0.6 + 0.9 * v[7],
                hu=sign * (50.0 + 100.0 * v[1]),
                z_from=z_from,
                z_to=z_to,
            )
        )
    return tuple(streaks)


def add_streaks(hu: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray, streaks, pixel: float) -> None:
    """Add `streaks` to `hu` [z, y, x] (in place); x, y, z 1-D voxel-centre coordinates (mm).

    Across a line the profile is a Gaussian widened by the pixel (same area at any resolution);
    along it, it fades over the last 30 % of its half-length; in z it grows linearly from z_from.
    """
    for k, zk in enumerate(z.tolist()):
        for st in streaks:
            if not st.z_from < zk:
                continue
            grow = min(1.0, (zk - st.z_from) / (st.z_to - st.z_from))
            angle = st.angle + st.drift * (zk - st.z_to)
            c, sn = math.cos(angle), math.sin(angle)
            width = math.sqrt(st.width**2 + pixel**2 / 12.0)
            reach = st.half_len * abs(sn) + 4.0 * width + pixel
            rows = _index_range(y, st.y - reach, st.y + reach)
            if rows.stop <= rows.start:
                continue
            dx, dy = x[None, :] - st.x, y[rows, None] - st.y
            along, across = dx * c + dy * sn, dy * c - dx * sn
            fade = np.clip((st.half_len - np.abs(along)) / (0.3 * st.half_len), 0.0, 1.0)
            amplitude = st.hu * grow * st.width / width
            hu[k, rows] += (amplitude * np.exp(-0.5 * (across / width) ** 2) * fade).astype(np.float32)


def draw_kernel(rng: np.random.Generator) -> Kernel:
    """Soft (35 %), standard (30 %) or sharp (35 %), with a log-uniform noise std (HU)."""
    u = rng.uniform(size=3)
    if u[0] < 0.35:
        name, sigma, sharpen, lo, hi = "soft", 0.8, 0.0, 10.0, 35.0
    elif u[0] < 0.65:
        name, sigma, sharpen, lo, hi = "standard", 0.6, 0.0, 12.0, 45.0
    else:
        name, sigma, sharpen, lo, hi = "sharp", 0.5, 0.6 + 0.6 * u[1], 20.0, 60.0
    return Kernel(name, sigma, float(sharpen), float(lo * (hi / lo) ** u[2]))


def apply_kernel(hu: np.ndarray, kernel: Kernel, sigma_z_vox: float) -> np.ndarray:
    """`hu` filtered by the kernel: a Gaussian PSF (voxels: slice profile `sigma_z_vox`, in-plane
    ``kernel.sigma_inplane_vox``), then for a sharp kernel an in-plane unsharp mask (3 x 3)."""
    sigma = kernel.sigma_inplane_vox
    out = ndimage.gaussian_filter(hu, (sigma_z_vox, sigma, sigma), mode="nearest")
    if kernel.sharpen > 0:
        unsharp = (0.0, SHARPEN_SIGMA_VOX, SHARPEN_SIGMA_VOX)
        smooth = ndimage.gaussian_filter(out, unsharp, mode="nearest", truncate=1.5)
        smooth *= np.float32(-kernel.sharpen)
        out *= np.float32(1.0 + kernel.sharpen)
        out += smooth
    return out


def kernel_gain(kernel: Kernel, sigma_z_vox: float) -> float:
    """Std of white noise of unit std after :func:`apply_kernel` (the root energy of its
    impulse response)."""
    delta = np.zeros((9, 15, 15), dtype=np.float64)
    delta[4, 7, 7] = 1.0
    return float(np.sqrt((apply_kernel(delta, kernel, sigma_z_vox) ** 2).sum()))

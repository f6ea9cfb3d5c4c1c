"""Synthetic chest CT phantoms (HU) with lung and lesion ground truth.

A phantom is built in physical millimetres and only *sampled* on the voxel grid, so one seed gives
the same anatomy at any resolution. Coordinates are LPS and centred on the volume: voxel
``[k, j, i]`` has its centre at ``x = (i - (nx - 1) / 2) * sx`` (mm, toward the patient's left),
``y = (j - (ny - 1) / 2) * sy`` (toward posterior) and ``z = (k - (nz - 1) / 2) * sz`` (toward
superior). Arrays are ``[z, y, x]`` in the canonical orientation of :mod:`covidseg.imaging.geometry`: the
patient's right lung is at small x, the spine at large y, the lung apex at large z.

In-plane sizes are those of an adult (body ~330 x 240 mm), shrunk only when the field of view is
narrower than 350 mm. Along z the lungs fill the field of view (a chest CT is framed on the lungs):
the apex tapers in the top ~10 % and the diaphragm domes up into the bottom ~20 %.

What is drawn (HU): air outside the body (-1000); subcutaneous fat (-100) and
chest-wall muscle (+40); ribs sloping down toward the front (cortex ~+850, marrow ~+250), costal
cartilage and sternum; the spine (vertebral bodies ~+300 with a ~+700 cortex, discs, canal and
posterior arch); mediastinal fat (-80); the heart (+40); aorta (+40..+200: with or without
contrast), superior vena cava and pulmonary arteries; oesophagus; trachea and main bronchi (air in
a soft-tissue wall); liver and spleen under the diaphragm, with a gastric air bubble; two lungs
(~-850) with a low-frequency texture and a gravity-dependent gradient, and vessel (+40, radius
~5 -> 1 mm) and bronchial trees grown at random from each hilum. COVID-19 lesions are ground glass
(-700..-300, blended so vessels stay brighter), consolidation (-100..+50) or both (a consolidated
core in ground glass), mostly subpleural, posterior and basal. With ``lesion_variety`` each COVID case
draws its own lesion style: ground-glass level, texture, margins, and per lesion a shape (blob,
subpleural band, lobular foci), crazy paving (a Voronoi septal network) and a reversed halo.

Around the patient (``surroundings=True``, the default; :mod:`covidseg.imaging.phantom_surroundings`): a
curved table whose shell encloses air, sometimes a pad, arms down or raised or out of view,
clothing folds trapping air, and bowel gas under the diaphragm. Without them, a flat table slab
under the back (+250 HU) as in earlier versions.

The scanner comes last: white noise filtered together with the anatomy by the reconstruction
kernel, so the noise has a CT-like grain and the requested std after filtering. Slice profile: a
Gaussian with a FWHM of one slice. In plane, with surroundings a soft, standard or sharp kernel
(Gaussian sigma 0.8, 0.6 or 0.5 voxel, the sharp one then edge-enhanced), 10-60 HU of noise and
sometimes streaks across the shoulders; without, the standard kernel and 15-25 HU.

Ground truth: ``lungs`` holds the parenchyma with its vessels and intrapulmonary bronchi (the
trachea and main bronchi are not lung); ``lesions`` the lesion voxels inside ``lungs``.

Randomness: only ``np.random.default_rng(seed)``, split into independent streams (anatomy, trees,
lesions, noise, surroundings). A COVID phantom is therefore the healthy phantom of the same seed
plus lesions: more than a few voxels from the lesions (partial-volume rim plus the kernel's reach:
2 voxels, 3 for the soft one, 2 + 1 for the sharp one) the two are bit-identical, and ``lungs`` is
the same. The surroundings never change ``lungs``, ``lesions`` or ``lesion_info``: a phantom with
and without them has the same ground truth, and without them it is bit-identical to the phantom of
earlier versions (whose four streams come first).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from covidseg.imaging import phantom_surroundings as surround

RIGHT_LUNG = 1
LEFT_LUNG = 2
SIDE_NAMES = {RIGHT_LUNG: "right", LEFT_LUNG: "left"}
LESION_KINDS = ("ggo", "consolidation", "mixed")

# Tissue values (HU).
AIR_HU = -1000.0
FAT_HU = -100.0
MEDIASTINAL_FAT_HU = -80.0
MUSCLE_HU = 40.0
BLOOD_HU = 40.0
LIVER_HU = 55.0
SPLEEN_HU = 45.0
CORD_HU = 30.0
CARTILAGE_HU = 130.0
RIB_CORTEX_HU = 850.0
RIB_MARROW_HU = 250.0
VERTEBRA_CORTEX_HU = 700.0
DISC_HU = 90.0
TABLE_HU = 250.0
LUNG_HU = -862.0  # mean parenchyma
LUNG_GRADIENT_HU = 22.0  # posterior (dependent) minus mean
LUNG_TEXTURE_HU = 12.0  # std of the low-frequency texture
AIRWAY_WALL_HU = 30.0
GGO_HU = (-700.0, -300.0)
CONSOLIDATION_HU = (-100.0, 50.0)
HU_RANGE = (-1024.0, 3071.0)  # what a 12-bit CT stores

GAS_MARGIN_MM = 6.0  # bowel gas stays this far below the diaphragm
REFERENCE_FOV_MM = 350.0  # in-plane field of view below which the anatomy is shrunk
NOISE_STD_HU = (15.0, 25.0)
PSF_SIGMA_INPLANE_VOX = 0.6
CAGE_NARROWING = (0.24, 0.10)  # relative narrowing of the rib cage (x, y) at the top of the chest
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass
class Phantom:
    """A synthetic chest CT and its ground truth, canonical LPS ``[z, y, x]`` arrays.

    ``lesion_info`` has one dict per lesion: ``kind`` (ggo, consolidation, mixed), ``side``
    (right, left), ``centre_mm`` (x, y, z centroid of its voxels, LPS mm, volume centred on 0),
    ``volume_ml`` (its voxels inside the lungs, mL; lesions may overlap), ``hu`` (target HU of its
    ground glass, or of a consolidation), ``core_hu`` (mixed only: its consolidated core) and
    ``envelope_mm`` (semi-axes of its ellipsoidal envelope, the first across the pleura).

    ``scene_info`` (JSON-ready) says what surrounds the patient: ``surroundings`` (bool),
    ``scanner`` (``kernel``: soft, standard or sharp; ``noise_std_hu`` after filtering; ``streaks``:
    how many) and, with surroundings, ``table`` (null, or ``gap_mm``, ``pad_mm``, ``pad_hu``,
    ``top_y_mm``, ``thickness_mm``, ``half_width_mm``, ``wall_mm``, ``wall_hu``, ``core_hu``),
    ``arms`` (down, up or none), ``arm_gaps_mm`` (right, left; <= 0 touching), ``clothing`` (null,
    or ``cover``, ``fabric_hu``, ``thickness_mm``, ``body_folds``, ``sheet_folds``) and
    ``bowel_gas`` (``kind``, ``volume_ml`` per pocket).
    """

    hu: np.ndarray  # [z, y, x] float32, HU in [-1024, 3071]
    lungs: np.ndarray  # [z, y, x] uint8: 0 background, 1 right lung, 2 left lung
    lesions: np.ndarray  # [z, y, x] uint8: 1 lesion (always inside `lungs`), 0 elsewhere
    spacing_zyx: tuple[float, float, float]  # mm
    lesion_info: list[dict] = field(default_factory=list)
    scene_info: dict = field(default_factory=dict)  # what surrounds the patient, and the scanner

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel (mL)."""
        return float(np.prod(self.spacing_zyx)) / 1000.0


def make_phantom(
    shape_zyx: tuple[int, int, int] = (64, 256, 256),
    spacing_zyx: tuple[float, float, float] = (5.0, 1.4, 1.4),
    covid: bool = False,
    seed: int = 0,
    n_lesions: tuple[int, int] = (1, 10),
    surroundings: bool = True,
    lesion_variety: bool = False,
) -> Phantom:
    """A synthetic chest CT of `shape_zyx` voxels of `spacing_zyx` mm, in HU.

    With `covid`, adds between ``n_lesions[0]`` and ``n_lesions[1]`` lesions (inclusive); a lesion
    that lands no voxel in the lungs is redrawn (20 tries), so only grids too small to hold lungs
    get fewer. With `surroundings` (the default) the patient lies on a scanner table, with arms,
    clothing and bowel gas, and the scanner gets a random kernel, noise level and streaks (see
    :mod:`covidseg.imaging.phantom_surroundings`; ``scene_info`` says what was drawn); without, the plain
    phantom of earlier versions (a flat table slab, 15-25 HU of noise), bit for bit. `lungs`,
    `lesions` and `lesion_info` are the same either way.

    With `lesion_variety`, each case draws its own lesion style (:func:`_draw_style`): ground-glass
    level, texture, margin width, and per lesion a shape (blob, subpleural band, lobular foci),
    crazy-paving reticulation and a reversed halo; the same number and kinds of lesions as the same
    seed without it, sizes and places drawn from the same distributions. Off (the default), the
    lesions of earlier versions, bit for bit.

    The same arguments always give bit-identical arrays. A default phantom takes about a second, a
    512 x 512 x 300 one at 1 mm under 10 s (peak memory ~0.9 GB).
    """
    shape, spacing = _check_args(shape_zyx, spacing_zyx, n_lesions)
    streams = np.random.default_rng(seed).spawn(6)  # the first five are those of earlier versions
    anatomy_rng, tree_rng, lesion_rng, noise_rng, scene_rng, look_rng = streams
    grid = _Grid(shape, spacing)
    anatomy = _draw_anatomy(anatomy_rng, grid)
    scene = _draw_scene(scene_rng, grid, anatomy) if surroundings else None
    exclusion = _rasterise_mask(grid, _mediastinal_tubes(anatomy), margin_mm=3.0)  # [z, y, x] bool
    hu, lungs = _paint_static(anatomy_rng, grid, anatomy, exclusion, flat_table=scene is None)
    del exclusion
    if scene is not None:
        _paint_scene(grid, anatomy, scene, hu, lungs)
    _paint_mediastinum(grid, anatomy, hu, lungs)
    airways = _paint_trees(tree_rng, grid, anatomy, hu, lungs)  # [z, y, x] bool, airway lumen
    lesions = np.zeros(shape, dtype=np.uint8)
    info: list[dict] = []
    if covid:
        looks = _Looks(look_rng, _draw_style(look_rng) if lesion_variety else PLAIN_STYLE)
        info = _add_lesions(lesion_rng, looks, grid, anatomy, hu, lungs, airways, lesions, n_lesions)
    del airways
    if scene is not None:
        surround.add_streaks(hu, grid.x, grid.y, grid.z, scene.streaks, _pixel_mm(grid))
    hu, noise_std = _apply_scanner(noise_rng, grid, hu, None if scene is None else scene.kernel)
    np.clip(hu, *HU_RANGE, out=hu)
    if scene is None:
        scene_info = {
            "surroundings": False,
            "scanner": {"kernel": "standard", "noise_std_hu": round(noise_std, 1)},
        }
    else:
        scene_info = surround.describe(scene)
    return Phantom(
        hu=hu, lungs=lungs, lesions=lesions, spacing_zyx=spacing, lesion_info=info, scene_info=scene_info
    )


def _check_args(shape_zyx, spacing_zyx, n_lesions) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shape = tuple(int(v) for v in shape_zyx)
    spacing = tuple(float(v) for v in spacing_zyx)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape_zyx must be three positive sizes, got {shape_zyx}")
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_zyx must be three positive sizes in mm, got {spacing_zyx}")
    lo, hi = (int(v) for v in n_lesions)
    if not 1 <= lo <= hi <= 255:
        raise ValueError(f"n_lesions must be (min, max) with 1 <= min <= max <= 255, got {n_lesions}")
    return shape, spacing


# --------------------------------------------------------------------------------------------
# Grid: voxel centres in mm


class _Grid:
    """Voxel-centre coordinates (mm, float32) of a ``[z, y, x]`` grid centred on the origin."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
        self.shape = shape
        self.spacing = spacing
        self.z, self.y, self.x = (_axis_mm(n, s) for n, s in zip(shape, spacing, strict=True))
        self.fov = tuple(n * s for n, s in zip(shape, spacing, strict=True))  # mm, z y x
        # half-width (mm) of the partial-volume ramp at the edge of painted tubes
        self.soft_mm = 0.5 * float(np.prod(spacing)) ** (1.0 / 3.0)

    def index_range(self, axis: int, lo_mm: float, hi_mm: float) -> slice:
        """The voxels along `axis` whose centres lie in [lo_mm, hi_mm] (possibly empty)."""
        n, s = self.shape[axis], self.spacing[axis]
        start = max(0, math.ceil(lo_mm / s + (n - 1) / 2.0))
        stop = min(n, math.floor(hi_mm / s + (n - 1) / 2.0) + 1)
        return slice(start, max(start, stop))

    def box(self, lo_xyz, hi_xyz) -> tuple[slice, slice, slice] | None:
        """``[z, y, x]`` slices of the voxels inside an axis-aligned box (mm, x y z), None if empty."""
        box = tuple(self.index_range(axis, lo_xyz[2 - axis], hi_xyz[2 - axis]) for axis in range(3))
        return None if any(b.stop <= b.start for b in box) else box

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable x [1,1,nx], y [1,ny,1], z [nz,1,1] coordinates (mm) of a box."""
        return (
            self.x[box[2]][None, None, :],
            self.y[box[1]][None, :, None],
            self.z[box[0]][:, None, None],
        )


def _axis_mm(n: int, spacing: float) -> np.ndarray:
    """Centres (mm, float32) of `n` voxels of `spacing` mm, symmetric about 0."""
    return ((np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * spacing).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Anatomy: every size in mm, drawn once per seed


@dataclass(frozen=True)
class _Anatomy:
    """Shapes and landmarks of one phantom (mm; x toward left, y posterior, z superior)."""

    scale: float  # in-plane size factor (1 unless the field of view is narrower than 350 mm)
    z_lo: float  # bottom of the field of view
    z_len: float  # height of the field of view
    body: tuple[float, float, float]  # semi-axes a (x), b (y) and centre y of the body outline
    fat_mm: float  # subcutaneous fat thickness
    cavity: tuple[float, float, float]  # semi-axes a, b and centre y of the pleural cavity
    lung_cx: tuple[float, float]  # signed x centre of the right and left lung ellipses
    lung_a: tuple[float, float]  # x semi-axes of the right and left lung ellipses
    lung_cy: float
    lung_b: float
    medial_mm: float  # half-width of the mediastinum between the lungs
    z_recess: float  # lowest lung point (costophrenic recesses)
    z_dome: tuple[float, float]  # top of the right and left diaphragm domes
    dome_cy: float
    z_taper: float  # the lungs start narrowing toward the apex here
    z_apex: float
    heart_c: tuple[float, float, float]
    heart_r: tuple[float, float, float]
    spine: tuple[float, float, float, float]  # vertebral body centre y, radius; canal centre y, radius
    vertebra_hu: float  # cancellous bone
    rib_z_top: float  # posterior end of the first rib
    rib_period: float  # z distance between ribs (and vertebrae)
    rib_drop: float  # how much lower a rib's front is than its back
    trachea: tuple[float, float, float]  # centre y, lumen radius, wall thickness
    z_carina: float
    z_hilum: tuple[float, float]
    aorta_hu: float
    vessel_hu: float

    def z_at(self, t: float) -> float:
        """Height (mm) at fraction `t` of the field of view from its bottom."""
        return self.z_lo + t * self.z_len

    def side_x(self, label: int) -> float:
        """-1 for the right lung (small x), +1 for the left."""
        return -1.0 if label == RIGHT_LUNG else 1.0


def _draw_anatomy(rng: np.random.Generator, grid: _Grid) -> _Anatomy:
    """Adult chest dimensions with a few per-seed variations (mm)."""

    def jitter(rel: float) -> float:
        return 1.0 + rel * float(np.clip(rng.standard_normal(), -2.0, 2.0))

    s = min(1.0, min(grid.fov[1], grid.fov[2]) / REFERENCE_FOV_MM)  # in-plane scale
    z_len = grid.fov[0]
    z_lo = -z_len / 2.0

    def z_at(t: float) -> float:
        return z_lo + t * z_len

    body_a, body_b = 165.0 * s * jitter(0.04), 120.0 * s * jitter(0.04)
    cav_a, cav_b, cav_cy = body_a - 40.0 * s, body_b - 34.0 * s, 8.0 * s
    vb_r = 19.0 * s
    vb_y = cav_cy + cav_b - 38.0 * s
    dome_r = 0.22 + 0.015 * float(np.clip(rng.standard_normal(), -2, 2))
    rib_period = (0.975 - 0.02) * z_len / 11.5
    trachea_r = 9.0 * s * jitter(0.08)
    return _Anatomy(
        scale=s,
        z_lo=z_lo,
        z_len=z_len,
        body=(body_a, body_b, 5.0 * s),
        fat_mm=12.0 * s * jitter(0.25),
        cavity=(cav_a, cav_b, cav_cy),
        lung_cx=(-0.55 * cav_a, 0.55 * cav_a),
        lung_a=(0.53 * cav_a * jitter(0.03), 0.48 * cav_a * jitter(0.03)),
        lung_cy=cav_cy + 4.0 * s,
        lung_b=cav_b * jitter(0.03),
        medial_mm=18.0 * s,
        z_recess=z_at(0.02),
        z_dome=(z_at(dome_r), z_at(dome_r - 0.03)),
        dome_cy=cav_cy - 12.0 * s,
        z_taper=z_at(0.83),
        z_apex=z_at(0.975),
        heart_c=(
            18.0 * s * jitter(0.25),
            -20.0 * s * jitter(0.15),
            z_at(0.33 + 0.02 * rng.standard_normal()),
        ),
        heart_r=(60.0 * s * jitter(0.06), 50.0 * s * jitter(0.06), 0.17 * z_len),
        spine=(vb_y, vb_r, vb_y + vb_r + 10.0 * s, 8.0 * s),
        vertebra_hu=float(rng.uniform(250.0, 350.0)),
        rib_z_top=z_at(0.975) + 0.3 * rib_period,
        rib_period=rib_period,
        rib_drop=3.5 * rib_period,
        trachea=(vb_y - vb_r - 16.0 * s - trachea_r, trachea_r, 2.0 * s),
        z_carina=z_at(0.65),
        z_hilum=(z_at(0.55), z_at(0.57)),
        aorta_hu=float(rng.uniform(40.0, 200.0)),
        vessel_hu=BLOOD_HU + float(rng.uniform(-10.0, 10.0)),
    )


def _in_ellipse(x, y, cx: float, cy: float, a, b) -> np.ndarray:
    """Inside the ellipse of centre (cx, cy) and semi-axes a, b (mm); a or b may be 0 or arrays."""
    return ((x - cx) * b) ** 2 + ((y - cy) * a) ** 2 < (a * b) ** 2


def _diaphragm_z(an: _Anatomy, x, y) -> np.ndarray:
    """Height (mm) of the diaphragm at (x, y): a dome under each lung, deep recesses at the edges."""
    height = None
    for side, label in enumerate((RIGHT_LUNG, LEFT_LUNG)):
        cx = an.lung_cx[side] * 0.85
        rho2 = ((x - cx) / an.lung_a[side]) ** 2 + ((y - an.dome_cy) / an.lung_b) ** 2
        dome = an.z_recess + (an.z_dome[side] - an.z_recess) * np.exp(-rho2 / (2 * 0.6**2))
        height = dome if label == RIGHT_LUNG else np.maximum(height, dome)
    return height


def _cage_scale(an: _Anatomy, z):
    """Width (x) and depth (y) factors of the rib cage at height z (mm): 1 up to mid-chest, then
    narrowing toward the apex (to 0.76 and 0.9 at the top)."""
    t = np.clip((np.asarray(z, dtype=np.float32) - an.z_lo) / an.z_len, 0.0, 1.0)
    u = np.clip((t - 0.45) / 0.55, 0.0, 1.0) ** 2
    return 1.0 - CAGE_NARROWING[0] * u, 1.0 - CAGE_NARROWING[1] * u


def _apex_taper(an: _Anatomy, z) -> np.ndarray:
    """Factor (0..1) by which the lung cross-section shrinks toward the apex at height z (mm)."""
    u = np.clip((np.asarray(z, dtype=np.float32) - an.z_taper) / (an.z_apex - an.z_taper), 0.0, 1.0)
    return np.sqrt(np.maximum(1.0 - u * u, 0.0))


def _heart_section(an: _Anatomy, x, y, z, margin_mm: float = 0.0) -> np.ndarray:
    """Inside the heart ellipsoid grown by `margin_mm`."""
    (hx, hy, hz), (ha, hb, hc) = an.heart_c, an.heart_r
    q = (
        ((x - hx) / (ha + margin_mm)) ** 2
        + ((y - hy) / (hb + margin_mm)) ** 2
        + ((z - hz) / (hc + margin_mm)) ** 2
    )
    return q < 1.0


def _near_spine(an: _Anatomy, x, y) -> np.ndarray:
    """The vertebral body, canal and arch region (plus a pleural margin): never lung."""
    vb_y, vb_r, _, _ = an.spine
    return (x**2 + (y - vb_y) ** 2 < (vb_r + 5.0) ** 2) | ((np.abs(x) < vb_r + 2.0) & (y > vb_y))


def _lung_labels(an: _Anatomy, x, y, z) -> np.ndarray:
    """Analytic lungs at points (x, y, z) mm (broadcastable): 0, RIGHT_LUNG or LEFT_LUNG (uint8).

    Ignores the mediastinal vessels and airways, which :func:`_paint_static` carves out afterward.
    """
    cav_a, cav_b, cav_cy = an.cavity
    taper = _apex_taper(an, z)
    fa, fb = _cage_scale(an, z)
    common = (
        _in_ellipse(x, y, 0.0, cav_cy, cav_a * fa, cav_b * fb)
        & (z > _diaphragm_z(an, x, y))
        & ~_heart_section(an, x, y, z, margin_mm=4.0)
        & ~_near_spine(an, x, y)
    )
    labels = np.zeros(np.broadcast(x, y, z).shape, dtype=np.uint8)
    for side, label in enumerate((RIGHT_LUNG, LEFT_LUNG)):
        sign = an.side_x(label)
        a, b = an.lung_a[side] * fa * taper, an.lung_b * fb * taper
        cx, cy = an.lung_cx[side] * fa, cav_cy + (an.lung_cy - cav_cy) * fb
        inside = common & (sign * x > an.medial_mm) & _in_ellipse(x, y, cx, cy, a, b)
        labels[inside] = label
    return labels


# --------------------------------------------------------------------------------------------
# Tubes: vessels, airways, mediastinal structures


@dataclass(frozen=True)
class _Tube:
    """A tapered cylinder from p0 to p1 (x, y, z mm), radius r0 -> r1 (mm), filled with `hu`."""

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    r0: float
    r1: float
    hu: float = BLOOD_HU


def _tube_occupancy(grid: _Grid, tube: _Tube, grow_mm: float = 0.0):
    """(box, occupancy [z, y, x] float32 0..1) of `tube` grown by `grow_mm`, or None if off-grid.

    The occupancy ramps linearly over ``2 * grid.soft_mm`` across the wall (partial volume).
    """
    soft = grid.soft_mm
    p0, p1 = np.asarray(tube.p0, dtype=np.float64), np.asarray(tube.p1, dtype=np.float64)
    reach = max(tube.r0, tube.r1) + grow_mm + soft
    box = grid.box(np.minimum(p0, p1) - reach, np.maximum(p0, p1) + reach)
    if box is None:
        return None
    x, y, z = grid.coords(box)
    d = p1 - p0
    length2 = max(float(d @ d), 1e-6)
    rx, ry, rz = x - float(p0[0]), y - float(p0[1]), z - float(p0[2])
    t = np.clip((rx * float(d[0]) + ry * float(d[1]) + rz * float(d[2])) / length2, 0.0, 1.0)
    dist2 = (rx - t * float(d[0])) ** 2 + (ry - t * float(d[1])) ** 2 + (rz - t * float(d[2])) ** 2
    radius = tube.r0 + grow_mm + t * (tube.r1 - tube.r0)
    occupancy = np.clip((radius + soft - np.sqrt(dist2)) / (2.0 * soft), 0.0, 1.0)
    occupancy *= _ramp_area_correction(radius, soft)
    return box, occupancy.astype(np.float32, copy=False)


def _ramp_area_correction(radius, soft: float):
    """Factor making a linear edge ramp of half-width `soft` keep the tube's cross-section area.

    The ramp ``clip((r + h - d) / 2h, 0, 1)`` integrates to pi (r^2 + h^2 / 3) over the section
    when r >= h, and to pi (r + h)^3 / (6 h) when r < h; thin tubes would otherwise look too thick
    (and the lungs too dense) on coarse grids.
    """
    r = np.maximum(radius, 1e-3)
    thick = r * r / (r * r + soft * soft / 3.0)
    thin = 6.0 * soft * r * r / (r + soft) ** 3
    return np.where(r >= soft, thick, thin)


def _paint_tube(grid: _Grid, hu: np.ndarray, tube: _Tube, grow_mm: float = 0.0, where=None) -> None:
    """Blend `tube.hu` into `hu` by partial-volume occupancy; `where(box)` restricts the voxels."""
    found = _tube_occupancy(grid, tube, grow_mm)
    if found is None:
        return
    box, occupancy = found
    if where is not None:
        occupancy *= where(box)
    region = hu[box]
    region += occupancy * (tube.hu - region)


def _rasterise_mask(grid: _Grid, tubes: list[_Tube], margin_mm: float) -> np.ndarray:
    """[z, y, x] bool: voxels within `margin_mm` of any tube."""
    mask = np.zeros(grid.shape, dtype=bool)
    for tube in tubes:
        found = _tube_occupancy(grid, tube, margin_mm)
        if found is not None:
            box, occupancy = found
            mask[box] |= occupancy > 0.0
    return mask


def _polyline_tubes(points, radius: float, hu: float) -> list[_Tube]:
    """Consecutive tubes of constant `radius` along a list of (x, y, z) points."""
    return [
        _Tube(tuple(a), tuple(b), radius, radius, hu) for a, b in zip(points[:-1], points[1:], strict=True)
    ]


def _aorta(an: _Anatomy) -> list[_Tube]:
    """Ascending aorta from the heart, arch over the left main bronchus, descending aorta."""
    s = an.scale
    z_root, z_arch = an.z_at(0.40), an.z_at(0.76)
    asc, desc = np.array([4.0 * s, -30.0 * s]), np.array([28.0 * s, 38.0 * s])
    theta = np.linspace(0.0, math.pi, 9)
    arch = [
        (
            *(asc + (desc - asc) * (1 - math.cos(t)) / 2 + np.array([12.0 * s * math.sin(t), 0.0])),
            z_arch + 22.0 * s * math.sin(t),
        )
        for t in theta
    ]
    tubes = [_Tube((*asc, z_root), (*asc, z_arch), 15.0 * s, 15.0 * s, an.aorta_hu)]
    tubes += _polyline_tubes(arch, 13.0 * s, an.aorta_hu)
    tubes.append(_Tube((*desc, z_arch), (*desc, an.z_lo - 10.0), 12.0 * s, 12.0 * s, an.aorta_hu))
    return tubes


def _hilum(an: _Anatomy, label: int, airway: bool) -> tuple[float, float, float]:
    """Where the pulmonary artery (or the main bronchus, if `airway`) enters a lung (mm)."""
    s = an.scale
    side = 0 if label == RIGHT_LUNG else 1
    if airway:  # the right main bronchus is short and steep, the left longer and flatter
        x = an.side_x(label) * (40.0, 48.0)[side] * s
        return (x, an.trachea[0] + 2.0 * s, an.z_carina - (0.10, 0.11)[side] * an.z_len)
    return (an.side_x(label) * 50.0 * s, -8.0 * s, an.z_hilum[side])


def _main_airways(an: _Anatomy) -> list[tuple[_Tube, float]]:
    """(lumen tube, wall thickness) for the trachea and the two main bronchi (not lung)."""
    y, r, wall = an.trachea
    carina = (0.0, y, an.z_carina)
    top = an.z_lo + an.z_len + 10.0
    airways = [(_Tube((0.0, y, top), carina, r, r, AIR_HU), wall)]
    for label, radius in ((RIGHT_LUNG, 0.72 * r), (LEFT_LUNG, 0.62 * r)):
        airways.append((_Tube(carina, _hilum(an, label, airway=True), radius, radius * 0.9, AIR_HU), wall))
    return airways


def _oesophagus(an: _Anatomy) -> _Tube:
    """The oesophagus (muscle), between the trachea and the spine, slightly left."""
    s = an.scale
    vb_y, vb_r, _, _ = an.spine
    top = an.z_lo + an.z_len + 10.0
    return _Tube(
        (5.0 * s, vb_y - vb_r - 8.0 * s, top), (8.0 * s, vb_y - vb_r - 6.0 * s, an.z_lo), 7.0 * s, 7.0 * s
    )


def _mediastinal_tubes(an: _Anatomy) -> list[_Tube]:
    """Every soft-tissue tube of the mediastinum (outer walls), to be kept out of the lungs."""
    s = an.scale
    top = an.z_lo + an.z_len + 10.0
    heart_top = an.heart_c[2] + 0.8 * an.heart_r[2]
    trunk_top = (24.0 * s, -14.0 * s, an.z_at(0.585))
    tubes = _aorta(an)
    tubes += [
        _Tube((-24.0 * s, -8.0 * s, top), (-24.0 * s, -8.0 * s, heart_top), 10.0 * s, 10.0 * s),  # SVC
        _Tube((22.0 * s, -42.0 * s, an.z_at(0.44)), trunk_top, 13.0 * s, 13.0 * s),  # pulmonary trunk
        _Tube(trunk_top, _hilum(an, LEFT_LUNG, airway=False), 10.0 * s, 9.0 * s),
        _Tube((16.0 * s, -14.0 * s, trunk_top[2]), _hilum(an, RIGHT_LUNG, airway=False), 10.0 * s, 9.0 * s),
        _oesophagus(an),
    ]
    tubes += [_Tube(t.p0, t.p1, t.r0 + wall, t.r1 + wall, MUSCLE_HU) for t, wall in _main_airways(an)]
    return tubes


# --------------------------------------------------------------------------------------------
# Body, bones, organs and lungs, slice by slice


@dataclass(frozen=True)
class _Wall:
    """In-plane maps [y, x] of the body wall for one width of the rib cage."""

    base: np.ndarray  # float32 HU: air, fat, muscle, mediastinal fat, spine, table
    cavity: np.ndarray  # bool: inside the pleural cavity
    ring: np.ndarray  # flat indices of the pixels where ribs / cartilage / sternum may be
    ring_d: np.ndarray  # their distance outside the cavity (mm)
    ring_sin: np.ndarray  # sin of their angle about the cavity centre (+1 posterior, -1 anterior)
    ring_x: np.ndarray  # their x (mm)
    vertebral_body: np.ndarray  # bool


def _wall_maps(grid: _Grid, an: _Anatomy, fa: float, fb: float, flat_table: bool) -> _Wall:
    """The body wall in an axial plane where the rib cage is scaled by (fa, fb): layers, spine, and
    where ribs can be; with `flat_table`, the plain phantom's table slab under the back."""
    x, y = grid.x[None, :], grid.y[:, None]
    body_a, body_b, body_cy = an.body
    cav_a, cav_b, cav_cy = an.cavity
    cav_a, cav_b = cav_a * fa, cav_b * fb
    vb_y, vb_r, canal_y, canal_r = an.spine
    s = an.scale
    base = np.full(grid.shape[1:], AIR_HU, dtype=np.float32)
    if flat_table:
        table_y = body_cy + body_b + 14.0 * s
        base[(y > table_y) & (y < table_y + 8.0 * s) & (np.abs(x) < 0.9 * grid.fov[2] / 2)] = TABLE_HU
    base[_in_ellipse(x, y, 0.0, body_cy, body_a, body_b)] = FAT_HU
    muscle = _in_ellipse(x, y, 0.0, body_cy, body_a - an.fat_mm, body_b - an.fat_mm)
    base[muscle] = MUSCLE_HU
    cavity = _in_ellipse(x, y, 0.0, cav_cy, cav_a, cav_b)
    base[cavity] = MEDIASTINAL_FAT_HU
    base[~cavity & muscle & _in_ellipse(np.abs(x), y, 32.0 * s, vb_y + 42.0 * s, 24.0 * s, 15.0 * s)] = 45.0
    vertebral_body = x**2 + (y - vb_y) ** 2 < vb_r**2
    base[vertebral_body] = an.vertebra_hu
    base[vertebral_body & (x**2 + (y - vb_y) ** 2 > (vb_r - 2.5 * s) ** 2)] = VERTEBRA_CORTEX_HU
    arch = (x**2 + (y - canal_y) ** 2 < (canal_r + 5.0 * s) ** 2) & (y > vb_y)
    processes = ((np.abs(x) < vb_r + 16.0 * s) & (np.abs(y - canal_y + 2.0 * s) < 4.0 * s)) | (
        (np.abs(x) < 4.0 * s) & (y > canal_y) & (y < canal_y + 26.0 * s)
    )
    base[arch | processes] = 600.0
    base[x**2 + (y - canal_y) ** 2 < canal_r**2] = CORD_HU
    # ribs lie just outside the cavity: polar coordinates about the cavity centre
    r = np.hypot(x, y - cav_cy) + 1e-6
    cos, sin = x / r, (y - cav_cy) / r
    d = r - cav_a * cav_b / np.sqrt((cav_b * cos) ** 2 + (cav_a * sin) ** 2)
    ring = (d > 0.0) & (d < 13.0 * s) & muscle & ~((np.abs(x) < vb_r + 10.0 * s) & (sin > 0))
    flat = np.flatnonzero(ring)
    return _Wall(
        base=base,
        cavity=cavity,
        ring=flat,
        ring_d=d.ravel()[flat].astype(np.float32),
        ring_sin=np.broadcast_to(sin, ring.shape).ravel()[flat].astype(np.float32),
        ring_x=np.broadcast_to(x, ring.shape).ravel()[flat].astype(np.float32),
        vertebral_body=vertebral_body,
    )


def _rib_values(an: _Anatomy, wall: _Wall, z: float) -> np.ndarray:
    """HU of the ring pixels at height z (mm): ribs, cartilage, sternum; NaN where none."""
    s = an.scale
    half_r, half_z = 4.0 * s, min(5.5, 0.25 * an.rib_period)
    centre_d = 1.0 + half_r
    values = np.full(wall.ring.shape, np.nan, dtype=np.float32)
    drop = an.rib_drop * (1.0 - wall.ring_sin) / 2.0  # front of a rib is lower than its back
    n_ribs = int((an.rib_z_top - an.z_lo + an.rib_drop) / an.rib_period) + 2
    for k in range(n_ribs):
        z_back = an.rib_z_top - k * an.rib_period
        if z > z_back + half_z or z < z_back - an.rib_drop - half_z:
            continue
        q = ((wall.ring_d - centre_d) / half_r) ** 2 + ((z - (z_back - drop)) / half_z) ** 2
        inside = (q < 1.0) & (wall.ring_sin > -0.9)
        bone = np.where(q < 0.45, RIB_MARROW_HU, RIB_CORTEX_HU).astype(np.float32)
        bone = np.where(wall.ring_sin < -0.55, CARTILAGE_HU, bone)
        values = np.where(inside & np.isnan(values), bone, values)
    if an.z_at(0.25) < z < an.z_at(0.92):  # sternum
        plate = (np.abs(wall.ring_x) < 16.0 * s) & (wall.ring_d > 1.0) & (wall.ring_d < 11.0 * s)
        plate &= wall.ring_sin < -0.9
        inner = plate & (wall.ring_d > 3.0) & (wall.ring_d < 9.0 * s) & (np.abs(wall.ring_x) < 13.0 * s)
        values = np.where(plate, np.where(inner, RIB_MARROW_HU, VERTEBRA_CORTEX_HU), values)
    return values


class _SliceField:
    """A smooth random field (unit std) defined on a coarse mm grid, read one z slice at a time.

    Generated at `cell_mm` over the field of view (resolution independent), smoothed by
    `sigma_mm`, and interpolated (separable, linear) onto the voxel centres.
    """

    def __init__(self, rng: np.random.Generator, grid: _Grid, cell_mm: float, sigma_mm: float) -> None:
        n = tuple(int(math.ceil(f / cell_mm)) + 2 for f in grid.fov)
        coarse = ndimage.gaussian_filter(rng.standard_normal(n), sigma_mm / cell_mm, mode="wrap")
        coarse = (coarse / max(float(coarse.std()), 1e-9)).astype(np.float32)
        origins = [-(k - 1) * cell_mm / 2.0 for k in n]
        (self._z0, self._z1, self._wz), ry, rx = (
            _lerp_indices(grid.z, origins[0], cell_mm, n[0]),
            _lerp_indices(grid.y, origins[1], cell_mm, n[1]),
            _lerp_indices(grid.x, origins[2], cell_mm, n[2]),
        )
        along_x = coarse[:, :, rx[0]] * (1 - rx[2]) + coarse[:, :, rx[1]] * rx[2]  # [cz, cy, nx]
        self._planes = along_x[:, ry[0], :] * (1 - ry[2])[:, None] + along_x[:, ry[1], :] * ry[2][:, None]

    def slice(self, k: int) -> np.ndarray:
        """The field on z slice `k`, [y, x] float32."""
        w = self._wz[k]
        return self._planes[self._z0[k]] * (1 - w) + self._planes[self._z1[k]] * w


def _lerp_indices(coords: np.ndarray, origin: float, cell: float, n: int):
    """Lower/upper coarse indices and weights for linear interpolation at `coords` (mm)."""
    u = np.clip((coords.astype(np.float64) - origin) / cell, 0.0, n - 1.0)
    lo = np.minimum(np.floor(u).astype(np.intp), n - 2) if n > 1 else np.zeros(u.shape, np.intp)
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, (u - lo).astype(np.float32)


def _paint_static(
    rng: np.random.Generator, grid: _Grid, an: _Anatomy, exclusion: np.ndarray, flat_table: bool
):
    """HU volume of wall, bones, heart, abdomen and lungs (and the flat table), and the lung labels.

    Returns ``hu`` [z, y, x] float32 and ``lungs`` [z, y, x] uint8 (before vessels and lesions).
    """
    walls: dict[int, _Wall] = {}  # by rib-cage narrowing level (steps of 1 % of the width)
    diaphragm = _diaphragm_z(an, grid.x[None, :], grid.y[:, None]).astype(np.float32)  # [y, x] mm
    texture = _SliceField(rng, grid, cell_mm=6.0, sigma_mm=14.0)
    grain = _SliceField(rng, grid, cell_mm=3.0, sigma_mm=4.0)
    hu = np.empty(grid.shape, dtype=np.float32)
    lungs = np.zeros(grid.shape, dtype=np.uint8)
    x, y = grid.x[None, :], grid.y[:, None]
    cav_a, cav_b, cav_cy = an.cavity
    ys, xs = grid.index_range(1, cav_cy - cav_b, cav_cy + cav_b), grid.index_range(2, -cav_a, cav_a)
    gradient = (LUNG_GRADIENT_HU * np.clip((y - cav_cy) / cav_b, -1.0, 1.0)).astype(np.float32)
    organs = np.broadcast_to(np.where(x < 20.0 * an.scale, LIVER_HU, SPLEEN_HU), grid.shape[1:])  # [y, x]
    for k, z in enumerate(grid.z.tolist()):
        level = round(float(1.0 - _cage_scale(an, z)[0]) * 100.0)
        if level not in walls:
            fa = 1.0 - level / 100.0
            fb = 1.0 - (1.0 - fa) * CAGE_NARROWING[1] / CAGE_NARROWING[0]
            walls[level] = _wall_maps(grid, an, fa, fb, flat_table)
        wall = walls[level]
        plane = wall.base.copy()
        _paint_vertebral_disc(an, wall, plane, z)
        ribs = _rib_values(an, wall, z)
        has_rib = ~np.isnan(ribs)
        plane.ravel()[wall.ring[has_rib]] = ribs[has_rib]
        abdomen = wall.cavity & (z < diaphragm)
        plane[abdomen] = organs[abdomen]
        plane[_stomach_bubble(an, x, y, z) & abdomen] = AIR_HU
        plane[_heart_section(an, x, y, z)] = BLOOD_HU
        labels = np.zeros(plane.shape, dtype=np.uint8)
        labels[ys, xs] = _lung_labels(an, x[:, xs], y[ys], z)
        labels[exclusion[k]] = 0
        lung = labels > 0
        parenchyma = LUNG_HU + gradient + LUNG_TEXTURE_HU * texture.slice(k) + 4.0 * grain.slice(k)
        plane[lung] = parenchyma[lung]
        hu[k] = plane
        lungs[k] = labels
    return hu, lungs


def _paint_vertebral_disc(an: _Anatomy, wall: _Wall, plane: np.ndarray, z: float) -> None:
    """Intervertebral discs: the vertebral body is a disc every `rib_period` for a fifth of it."""
    phase = ((an.rib_z_top - z) / an.rib_period) % 1.0
    if phase > 0.82:
        plane[wall.vertebral_body] = DISC_HU


def _stomach_bubble(an: _Anatomy, x, y, z) -> np.ndarray:
    """Gas in the gastric fundus under the left dome."""
    s = an.scale
    dx, dy, dz = (
        (x - 60.0 * s) / (28.0 * s),
        (y + 25.0 * s) / (22.0 * s),
        (z - an.z_dome[1] + 30.0 * s) / (14.0 * s),
    )
    return dx**2 + dy**2 + dz**2 < 1.0


def _paint_mediastinum(grid: _Grid, an: _Anatomy, hu: np.ndarray, lungs: np.ndarray) -> None:
    """Great vessels, oesophagus, trachea and main bronchi (outside the lung mask)."""

    def outside_lungs(box):
        return lungs[box] == 0

    for tube in _mediastinal_tubes(an):
        _paint_tube(grid, hu, tube, where=outside_lungs)
    wall = _oesophagus(an)
    _paint_tube(grid, hu, _Tube(wall.p0, wall.p1, 1.5, 1.5, AIR_HU), where=outside_lungs)  # a little air
    for lumen, _ in _main_airways(an):
        _paint_tube(grid, hu, lumen, where=outside_lungs)


# --------------------------------------------------------------------------------------------
# Vessel and bronchial trees


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _rotate(v: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation of `v` about the unit `axis` by `angle` radians."""
    c, s = math.cos(angle), math.sin(angle)
    return v * c + np.cross(axis, v) * s + axis * float(axis @ v) * (1 - c)


def _grow_tree(
    rng: np.random.Generator,
    inside: Callable[[np.ndarray], bool],
    inward: Callable[[np.ndarray], np.ndarray],
    root: np.ndarray,
    direction: np.ndarray,
    radius: float,
    min_radius: float,
    length_per_radius: float,
    max_segments: int = 4000,
) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """A random branching tree (segments p0, p1, r0, r1 in mm) grown while `inside(point)`.

    Each segment is ~`length_per_radius` radii long and tapers slightly; it then splits in two
    (Murray's law, r^3 = r1^3 + r2^3): a main child that keeps most of the radius and turns a
    little, and a thinner side branch at a wider angle, both in a random plane and leaning away
    from the root so the tree fans out. A branch about to leave the lung bends toward
    `inward(point)` (a unit vector); it stops if it cannot, or below `min_radius`.
    """
    segments = []
    stack = [(root, _unit(direction), radius)]
    while stack and len(segments) < max_segments:
        p, d, r = stack.pop()
        draws = rng.uniform(size=4)  # fixed draws per node: the tree does not depend on the grid
        turn = rng.standard_normal(3)
        length = max(r * length_per_radius * (0.6 + 0.8 * draws[0]), 2.5)
        q = _next_point(p, d, length, inside, inward(p))
        if q is None:
            continue
        d = _unit(q - p)
        r_end = r * 0.95
        segments.append((p, q, r, r_end))
        f1 = 0.78 + 0.17 * draws[1]
        r1, r2 = r_end * f1, r_end * (1.0 - f1**3) ** (1.0 / 3.0)
        normal = _unit(np.cross(d, _unit(turn)))
        outward = _unit(q - root)
        d1 = _unit(_rotate(d, normal, 0.1 + 0.3 * draws[2]) + 0.2 * outward)
        d2 = _unit(_rotate(d, normal, -(0.6 + 0.5 * draws[3])) + 0.2 * outward)
        for child_d, child_r in ((d2, r2), (d1, r1)):
            if child_r >= min_radius:
                stack.append((q, child_d, child_r))
    return segments


def _next_point(p, d, length, inside, inward) -> np.ndarray | None:
    """The end of the next segment from `p`: straight on if inside, else bent inward or shorter."""
    for bend in (0.0, 0.7, 2.0):
        direction = _unit(d + bend * inward)
        for fraction in (1.0, 0.5):
            q = p + direction * (length * fraction)
            if inside(q):
                return q
    return None


def _tree_roots(an: _Anatomy, label: int, airway: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """Hilum point and initial directions toward the lobes of one lung."""
    s = an.scale
    sign = an.side_x(label)
    hilum = np.asarray(_hilum(an, label, airway), dtype=np.float64)
    targets = [
        (sign * 65.0 * s, 5.0 * s, an.z_at(0.85)),  # upper lobe, apical
        (sign * 85.0 * s, -45.0 * s, an.z_at(0.68)),  # upper lobe, anterior
        (sign * 75.0 * s, -50.0 * s, an.z_at(0.40)),  # middle lobe / lingula
        (sign * 60.0 * s, 65.0 * s, an.z_at(0.52)),  # lower lobe, superior segment
        (sign * 95.0 * s, 15.0 * s, an.z_at(0.25)),  # lower lobe, lateral basal
        (sign * 60.0 * s, 60.0 * s, an.z_at(0.15)),  # lower lobe, posterior basal
    ]
    return hilum, [_unit(np.asarray(t) - hilum) for t in targets]


def _paint_trees(rng: np.random.Generator, grid: _Grid, an: _Anatomy, hu: np.ndarray, lungs: np.ndarray):
    """Pulmonary vessels and intrapulmonary bronchi in both lungs; returns the airway lumen (bool)."""
    s = an.scale
    airways = np.zeros(grid.shape, dtype=bool)
    for label in (RIGHT_LUNG, LEFT_LUNG):

        def inside(p: np.ndarray, label: int = label) -> bool:
            return bool(_lung_labels(an, p[0], p[1], p[2]) == label)

        def in_this_lung(box, label: int = label):
            return lungs[box] == label

        def inward(p: np.ndarray, side: int = label - 1) -> np.ndarray:
            core_z = float(np.clip(p[2], an.z_dome[side] + 20.0, an.z_taper - 10.0))
            core = np.array([an.lung_cx[side] * float(_cage_scale(an, p[2])[0]), an.lung_cy, core_z])
            return _unit(core - p)

        hilum, directions = _tree_roots(an, label, airway=False)
        for d in directions:
            jittered = _unit(d + 0.15 * rng.standard_normal(3))
            for p0, p1, r0, r1 in _grow_tree(rng, inside, inward, hilum, jittered, 5.0 * s, 0.8, 8.0):
                _paint_tube(grid, hu, _Tube(tuple(p0), tuple(p1), r0, r1, an.vessel_hu), where=in_this_lung)
        hilum, directions = _tree_roots(an, label, airway=True)
        for d in directions:
            jittered = _unit(d + 0.15 * rng.standard_normal(3))
            for p0, p1, r0, r1 in _grow_tree(rng, inside, inward, hilum, jittered, 4.0 * s, 1.6, 8.0):
                wall = 0.5 + 0.2 * r0
                outer = _Tube(tuple(p0), tuple(p1), r0 + wall, r1 + wall, AIRWAY_WALL_HU)
                _paint_tube(grid, hu, outer, where=in_this_lung)
                lumen = _Tube(tuple(p0), tuple(p1), r0, r1, AIR_HU)
                found = _tube_occupancy(grid, lumen)
                if found is not None:
                    box, occupancy = found
                    occupancy *= in_this_lung(box)
                    region = hu[box]
                    region += occupancy * (AIR_HU - region)
                    airways[box] |= occupancy > 0.5
    return airways


# --------------------------------------------------------------------------------------------
# Lesions


@dataclass(frozen=True)
class _Candidates:
    """Random lung points (mm) with their lung label, depth below the pleura (mm) and the
    direction (unit x y z) in which the pleura is nearest."""

    points: np.ndarray  # [n, 3] x y z
    labels: np.ndarray  # [n] uint8
    depth: np.ndarray  # [n] float
    normal: np.ndarray  # [n, 3]


def _pleural_candidates(rng: np.random.Generator, an: _Anatomy, n: int = 1500) -> _Candidates:
    """Uniform points in the analytic lungs, and their depth by ray marching in 14 directions."""
    cav_a, cav_b, cav_cy = an.cavity
    lo = np.array([-cav_a, cav_cy - cav_b, an.z_lo])
    hi = np.array([cav_a, cav_cy + cav_b, an.z_lo + an.z_len])
    points = lo + (hi - lo) * rng.uniform(size=(n, 3))
    labels = _lung_labels(an, points[:, 0], points[:, 1], points[:, 2])
    points, labels = points[labels > 0], labels[labels > 0]
    directions = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    directions += [(a, b, c) for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)]
    dirs = np.array([_unit(np.asarray(d, dtype=np.float64)) for d in directions])  # [14, 3]
    steps = np.arange(1, 31) * 2.5  # mm
    probe = points[:, None, None, :] + dirs[None, :, None, :] * steps[None, None, :, None]  # [n, 14, 30, 3]
    same = _lung_labels(an, probe[..., 0], probe[..., 1], probe[..., 2]) == labels[:, None, None]
    first_out = np.where(same.all(axis=2), len(steps), np.argmin(same, axis=2))  # [n, 14]
    nearest = np.argmin(first_out, axis=1)
    depth = np.concatenate([[0.0], steps])[first_out[np.arange(len(points)), nearest]]
    return _Candidates(points=points, labels=labels, depth=depth, normal=dirs[nearest])


def _lesion_plan(rng: np.random.Generator, n: int) -> list[tuple[int, str]]:
    """(lung label, kind) of `n` lesions: bilateral in most cases, mostly ground glass."""
    first = RIGHT_LUNG if rng.uniform() < 0.5 else LEFT_LUNG
    bilateral = rng.uniform() < 0.85
    plan = []
    for i in range(n):
        u_side, u_kind = rng.uniform(size=2)
        if not bilateral:
            label = first
        elif i == 1:
            label = LEFT_LUNG if first == RIGHT_LUNG else RIGHT_LUNG
        else:
            label = first if i == 0 or u_side < 0.5 else (LEFT_LUNG if first == RIGHT_LUNG else RIGHT_LUNG)
        kind = "ggo" if u_kind < 0.55 else ("mixed" if u_kind < 0.8 else "consolidation")
        plan.append((label, kind))
    return plan


def _pick_candidate(
    rng: np.random.Generator, an: _Anatomy, cands: _Candidates, label: int, thickness_mm: float
) -> int | None:
    """Index of a lesion centre among `cands`: mostly 0.1..0.7 `thickness_mm` below the pleura
    (85 %, else deeper), preferably posterior, basal and lateral; None if the lung has no point."""
    on_side = cands.labels == label
    if not on_side.any():
        return None
    u_depth, u_choice = rng.uniform(size=2)
    if u_depth < 0.85:  # subpleural: the envelope crosses the pleura and is cut flat by it
        target = thickness_mm * (0.1 + 0.6 * u_depth / 0.85)
    else:
        target = thickness_mm * (1.0 + (u_depth - 0.85) / 0.15)
    cav_a, cav_b, cav_cy = an.cavity
    p = cands.points
    posterior = np.clip((p[:, 1] - cav_cy) / cav_b, -1, 1)
    height = (p[:, 2] - an.z_lo) / an.z_len
    lateral = np.abs(p[:, 0]) / cav_a
    sigma = max(5.0, 0.3 * thickness_mm)
    log_w = 1.5 * posterior - 1.5 * height + 1.0 * lateral - 0.5 * ((cands.depth - target) / sigma) ** 2
    log_w = np.where(on_side, log_w, -np.inf)
    w = np.exp(log_w - log_w.max())
    return min(int(np.searchsorted(np.cumsum(w) / w.sum(), u_choice)), len(p) - 1)


def _frame_along(normal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix whose first column is `normal` and the others random around it."""
    tangent = _unit(np.cross(normal, _unit(rng.standard_normal(3))))
    return np.stack([normal, tangent, np.cross(normal, tangent)], axis=1)


def _lesion_field(rng: np.random.Generator, half_mm: float, cell_mm: float, sigma_mm: float):
    """A smooth Gaussian random field (unit std) on a cube of +-`half_mm` around 0, cell `cell_mm`.

    Returns (field [z, y, x] float32, origin mm of its first cell). Not Perlin noise on purpose.
    """
    n = int(math.ceil(2 * half_mm / cell_mm)) + 2
    noise = rng.standard_normal((n, n, n))
    smooth = ndimage.gaussian_filter(noise, sigma_mm / cell_mm, mode="wrap")
    smooth /= max(float(smooth.std()), 1e-9)
    return smooth.astype(np.float32), -(n - 1) * cell_mm / 2.0


def _sample_field(field_zyx: np.ndarray, origin: float, cell: float, x, y, z) -> np.ndarray:
    """Separable linear interpolation of a cubic `field_zyx` at offsets x [1,1,nx], y, z (mm)."""
    n = field_zyx.shape[0]
    (x0, x1, wx), (y0, y1, wy), (z0, z1, wz) = (_lerp_indices(c.ravel(), origin, cell, n) for c in (x, y, z))
    a = field_zyx[:, :, x0] * (1 - wx) + field_zyx[:, :, x1] * wx
    a = a[:, y0, :] * (1 - wy)[:, None] + a[:, y1, :] * wy[:, None]
    return a[z0] * (1 - wz)[:, None, None] + a[z1] * wz[:, None, None]


def _envelope_semi_axes(rng: np.random.Generator, radius_mm: float) -> np.ndarray:
    """Semi-axes (mm) of a lesion envelope: thin across the pleura (first), wide along it."""
    aspect = np.exp(0.2 * np.clip(rng.standard_normal(3), -2, 2))
    return radius_mm * np.array([0.8, 1.6, 1.6]) * aspect / np.prod(aspect) ** (1 / 3)


def _lesion_shape(
    rng: np.random.Generator,
    grid: _Grid,
    centre: np.ndarray,
    rotation: np.ndarray,
    semi: np.ndarray,
    radius_mm: float,
    fine_weight: float = 0.6,
):
    """Irregular blob around `centre`: (box, score [z,y,x], texture [z,y,x]) or None off-grid.

    score = (1 - rho^2) + 0.45 * field, where rho is the normalised radius of the ellipsoid
    envelope (semi-axes `semi` mm along the columns of `rotation`) and field a smoothed Gaussian
    random field (not Perlin noise) whose grain scales with `radius_mm`, its fine part weighted by
    `fine_weight` (larger: patchier, lobular foci); the lesion is where score > 0.3, always inside
    rho < 1.
    """
    half = float(semi.max())
    cell = max(1.0, radius_mm / 8.0)
    shape_field, origin = _lesion_field(rng, half, cell, sigma_mm=radius_mm * (0.2 + 0.15 * rng.uniform()))
    fine_field, _ = _lesion_field(rng, half, cell, sigma_mm=max(1.5, 0.08 * radius_mm))
    texture_field, _ = _lesion_field(rng, half, cell, sigma_mm=max(2.0, 0.1 * radius_mm))
    box = grid.box(centre - half, centre + half)
    if box is None:
        return None
    x, y, z = grid.coords(box)
    dx, dy, dz = x - float(centre[0]), y - float(centre[1]), z - float(centre[2])
    rho2 = np.zeros(np.broadcast(dx, dy, dz).shape, dtype=np.float32)
    for axis in range(3):
        u = dx * float(rotation[0, axis]) + dy * float(rotation[1, axis]) + dz * float(rotation[2, axis])
        rho2 += (u / float(semi[axis])) ** 2
    field = 0.8 * _sample_field(shape_field, origin, cell, dx, dy, dz)
    field += fine_weight * _sample_field(fine_field, origin, cell, dx, dy, dz)
    score = np.where(rho2 < 1.0, (1.0 - rho2) + 0.45 * field, -1.0).astype(np.float32)
    texture = _sample_field(texture_field, origin, cell, dx, dy, dz)
    return box, score, texture


def _blend_weight(score: np.ndarray, threshold: float, edge: float = 0.12) -> np.ndarray:
    """Partial-volume weight 0..1 of a lesion region: 0.5 exactly at `threshold`."""
    return np.clip((score - threshold) / edge + 0.5, 0.0, 1.0)


@dataclass(frozen=True)
class _LesionStyle:
    """How one case's lesions look: :data:`PLAIN_STYLE` (earlier versions) or :func:`_draw_style`."""

    ggo_hu: tuple[float, float] = GGO_HU  # this case's ground-glass range, HU
    texture_hu: float = 35.0  # amplitude of the lesions' texture field, HU
    edge: float = 0.12  # margin width in score units: 0.06 sharp .. 0.3 soft
    shapes: tuple[float, float, float] = (1.0, 0.0, 0.0)  # probabilities of SHAPES
    crazy_paving: float = 0.0  # share of ground-glass lesions with reticulation
    reversed_halo: float = 0.0  # share of mixed lesions whose dense part is a rim


PLAIN_STYLE = _LesionStyle()
SHAPES = ("blob", "band", "lobular")
BAND_SCALE = np.array([0.55, 1.9, 0.95])  # envelope: thin across the pleura, long along it (volume kept)
FINE_WEIGHT = {"blob": 0.6, "band": 0.6, "lobular": 1.6}  # weight of the fine field: patchy foci
RETICULATION_HU = (80.0, 220.0)  # thickened septa above the ground glass
LOBULE_MM = 12.0  # spacing of the septal network's cells (secondary lobules: 10-25 mm)
SEPTA_HALF_WIDTH_MM = 1.2  # thickened septa: full on the line, half 0.6 mm from it


def _draw_style(rng: np.random.Generator) -> _LesionStyle:
    """A case's lesion style: a ground-glass level from faint to dense, texture, sharp to soft
    margins, a mix of shapes, and how often crazy paving and reversed halos appear."""
    centre, half = rng.uniform(-640.0, -400.0), rng.uniform(40.0, 120.0)
    return _LesionStyle(
        ggo_hu=(float(centre - half), float(centre + half)),
        texture_hu=float(rng.uniform(15.0, 70.0)),
        edge=float(np.exp(rng.uniform(math.log(0.06), math.log(0.3)))),
        shapes=tuple(float(v) for v in rng.dirichlet((1.0, 1.0, 1.0))),
        crazy_paving=float(rng.choice([0.0, 0.3, 0.7])),
        reversed_halo=float(rng.choice([0.0, 0.5])),
    )


@dataclass(frozen=True)
class _Look:
    """One lesion's look under a case's style; ``rng`` draws its septal network."""

    style: _LesionStyle
    shape: str = "blob"
    reticulation_hu: float = 0.0  # 0: no crazy paving
    reversed_halo: bool = False
    rng: np.random.Generator | None = None

    @property
    def semi_scale(self) -> np.ndarray | float:
        return BAND_SCALE if self.shape == "band" else 1.0

    @property
    def fine_weight(self) -> float:
        return FINE_WEIGHT[self.shape]

    @property
    def texture_hu(self) -> float:
        return self.style.texture_hu

    @property
    def edge(self) -> float:
        return self.style.edge

    def ggo_hu(self, hu: float) -> float:
        """A ground-glass HU drawn in :data:`GGO_HU`, mapped linearly into the style's range."""
        if self.style.ggo_hu == GGO_HU:
            return hu
        lo, hi = self.style.ggo_hu
        return lo + (hu - GGO_HU[0]) / (GGO_HU[1] - GGO_HU[0]) * (hi - lo)

    def reticulation(self, grid: _Grid, box, where: np.ndarray) -> np.ndarray | float:
        """HU added to the ground glass in `box` [z, y, x] where `where` (crazy paving), or 0.0:
        thickened septa drawn as the faces of Voronoi cells around jittered lattice points
        :data:`LOBULE_MM` apart (secondary lobules), so every slice shows a connected polygonal
        network."""
        if self.reticulation_hu == 0.0 or self.rng is None:
            return 0.0
        x, y, z = grid.coords(box)
        lo = np.array([x.min(), y.min(), z.min()]) - LOBULE_MM
        counts = np.ceil((np.array([x.max(), y.max(), z.max()]) + LOBULE_MM - lo) / LOBULE_MM).astype(int) + 1
        lattice = np.stack(np.meshgrid(*(np.arange(n) for n in counts), indexing="ij"), -1).reshape(-1, 3)
        seeds = lo + (lattice + self.rng.uniform(-0.4, 0.4, size=lattice.shape)) * LOBULE_MM  # mm, x y z
        k, j, i = np.nonzero(where)
        points = np.stack([x[0, 0, i], y[0, j, 0], z[k, 0, 0]], -1)  # [n, 3] mm, x y z
        nearest, _ = cKDTree(seeds).query(points, k=2)  # [n, 2] mm to the two nearest lobule centres
        distance = 0.5 * (nearest[:, 1] - nearest[:, 0])  # mm to the face between them
        lines = np.zeros(where.shape, dtype=np.float32)
        lines[k, j, i] = np.clip(1.0 - distance / SEPTA_HALF_WIDTH_MM, 0.0, 1.0)
        return self.reticulation_hu * lines

    def describe(self, kind: str) -> dict:
        """The look's entries of a lesion's record (none for the plain style)."""
        if self.style == PLAIN_STYLE:
            return {}
        record: dict = {"shape": self.shape}
        if kind != "consolidation":
            record["crazy_paving"] = self.reticulation_hu > 0.0
        if kind == "mixed":
            record["reversed_halo"] = self.reversed_halo
        return record


class _Looks:
    """Draws each lesion's look from a case's style; the plain style draws nothing."""

    def __init__(self, rng: np.random.Generator, style: _LesionStyle) -> None:
        self.rng, self.style = rng, style

    def draw(self) -> _Look:
        if self.style == PLAIN_STYLE:
            return _Look(PLAIN_STYLE)
        u_shape, u_paving, u_halo, u_hu = self.rng.uniform(size=4)
        shape = SHAPES[min(int(np.searchsorted(np.cumsum(self.style.shapes), u_shape)), len(SHAPES) - 1)]
        paving = u_paving < self.style.crazy_paving
        reticulation_hu = (
            float(RETICULATION_HU[0] + u_hu * (RETICULATION_HU[1] - RETICULATION_HU[0])) if paving else 0.0
        )
        return _Look(self.style, shape, reticulation_hu, bool(u_halo < self.style.reversed_halo), self.rng)


def _add_lesions(
    rng: np.random.Generator,
    looks: _Looks,
    grid: _Grid,
    an: _Anatomy,
    hu: np.ndarray,
    lungs: np.ndarray,
    airways: np.ndarray,
    lesions: np.ndarray,
    n_lesions: tuple[int, int],
) -> list[dict]:
    """Paint COVID-19 lesions into `hu` and `lesions` (in place); returns their descriptions."""
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    lung_ml = {label: float(np.count_nonzero(lungs == label)) * voxel_ml for label in (RIGHT_LUNG, LEFT_LUNG)}
    candidates = _pleural_candidates(rng, an)
    n = int(rng.integers(n_lesions[0], n_lesions[1] + 1))
    info = []
    for label, kind in _lesion_plan(rng, n):
        for _attempt in range(20):
            record = _add_one_lesion(
                rng, looks.draw(), grid, an, hu, lungs, airways, lesions, candidates, label, kind, lung_ml
            )
            if record is not None:
                info.append(record)
                break
    return info


def _add_one_lesion(
    rng: np.random.Generator,
    look: _Look,
    grid: _Grid,
    an: _Anatomy,
    hu: np.ndarray,
    lungs: np.ndarray,
    airways: np.ndarray,
    lesions: np.ndarray,
    candidates: _Candidates,
    label: int,
    kind: str,
    lung_ml: dict[int, float],
) -> dict | None:
    """One lesion of `kind` in lung `label` (painted in place); None, painting nothing, if it
    misses the lung."""
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    # Log-uniform from 1 mL up to 30 % of the lung for ground glass (alone or around a core); pure
    # consolidations are smaller (up to 8 %): in COVID-19 large dense areas mostly sit inside GGO.
    max_fraction = 0.08 if kind == "consolidation" else 0.3
    max_ml = max(max_fraction * lung_ml[label], 2.0)
    volume_ml = math.exp(rng.uniform(0.0, math.log(max_ml)))
    radius = (3.0 * volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)  # mm
    ggo_hu, cons_hu = look.ggo_hu(rng.uniform(*GGO_HU)), rng.uniform(*CONSOLIDATION_HU)
    semi = _envelope_semi_axes(rng, radius) * look.semi_scale
    index = _pick_candidate(rng, an, candidates, label, thickness_mm=float(semi[0]))
    if index is None:
        return None
    centre = candidates.points[index]
    rotation = _frame_along(candidates.normal[index], rng)
    shape = _lesion_shape(rng, grid, centre, rotation, semi, radius, look.fine_weight)
    if shape is None:
        return None
    box, score, texture = shape
    in_lung = lungs[box] == label
    threshold = 0.3
    weight = _blend_weight(score, threshold, look.edge) * in_lung
    truth = weight >= 0.5
    if not truth.any():
        return None
    region = hu[box]
    if kind in ("ggo", "mixed"):
        target = ggo_hu + look.texture_hu * texture + look.reticulation(grid, box, weight > 0)
        np.maximum(region, region + weight * (target - region), out=region)  # vessels stay brighter
    if kind in ("consolidation", "mixed"):
        core = threshold + (0.35 if kind == "mixed" else 0.0)  # a mixed lesion's core: its densest part
        dense = _blend_weight(score, core, look.edge)
        if kind == "mixed" and look.reversed_halo:  # the dense part a rim around ground glass
            dense = _blend_weight(score, threshold, look.edge) * (1.0 - dense)
        dense *= in_lung * ~airways[box]  # air bronchograms stay dark
        region += dense * (cons_hu + 15.0 * texture - region)
    lesions[box] |= truth.astype(np.uint8)
    zz, yy, xx = np.nonzero(truth)
    centroid = [
        float(grid.x[box[2]][xx].mean()),
        float(grid.y[box[1]][yy].mean()),
        float(grid.z[box[0]][zz].mean()),
    ]
    record = {
        "kind": kind,
        "side": SIDE_NAMES[label],
        "centre_mm": [round(v, 2) for v in centroid],
        "volume_ml": round(float(truth.sum()) * voxel_ml, 3),
        "hu": round(float(cons_hu if kind == "consolidation" else ggo_hu), 1),
        "envelope_mm": [round(float(v), 2) for v in semi],
    }
    if kind == "mixed":
        record["core_hu"] = round(float(cons_hu), 1)
    return record | look.describe(kind)


# --------------------------------------------------------------------------------------------
# Scanner


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The normalised 1D kernel scipy.ndimage.gaussian_filter uses for `sigma` (voxels)."""
    if sigma <= 0:
        return np.ones(1)
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _apply_scanner(
    rng: np.random.Generator, grid: _Grid, hu: np.ndarray, kernel: surround.Kernel | None = None
) -> tuple[np.ndarray, float]:
    """Add white noise to `hu` (in place), then filter image and noise with the kernel; returns the
    filtered volume and the noise std after filtering (HU).

    Without `kernel`: the plain phantom's Gaussian point spread function (in-plane sigma 0.6 voxel)
    and a noise std of 15..25 HU drawn here. The noise std before filtering is chosen so that it is
    the requested one after. Slice profile: a Gaussian with a FWHM of one slice (contiguous slices).
    """
    if kernel is None:
        sigma = (FWHM_TO_SIGMA, PSF_SIGMA_INPLANE_VOX, PSF_SIGMA_INPLANE_VOX)  # voxels, z y x
        gain = math.sqrt(math.prod(float((_gaussian_kernel(s) ** 2).sum()) for s in sigma))
        target = float(rng.uniform(*NOISE_STD_HU))
    else:
        gain, target = surround.kernel_gain(kernel, FWHM_TO_SIGMA), kernel.noise_std_hu
    std = target / gain
    chunk = max(1, 4_000_000 // max(1, grid.shape[1] * grid.shape[2]))
    for k in range(0, grid.shape[0], chunk):
        block = hu[k : k + chunk]
        block += rng.standard_normal(block.shape, dtype=np.float32) * np.float32(std)
    if kernel is None:
        return ndimage.gaussian_filter(hu, sigma, mode="nearest"), target
    return surround.apply_kernel(hu, kernel, FWHM_TO_SIGMA), target


# --------------------------------------------------------------------------------------------
# Surroundings: table, arms, clothing, bowel gas (drawn by covidseg.imaging.phantom_surroundings)


def _pixel_mm(grid: _Grid) -> float:
    """In-plane voxel size (mm): geometric mean of the y and x spacings."""
    return math.sqrt(grid.spacing[1] * grid.spacing[2])


def _draw_scene(rng: np.random.Generator, grid: _Grid, an: _Anatomy) -> surround.Scene:
    """The surroundings of this patient, from their own random stream."""
    body_a, body_b, body_cy = an.body
    body = surround.Body(
        a=body_a,
        b=body_b,
        cy=body_cy,
        scale=an.scale,
        z_lo=an.z_lo,
        z_len=an.z_len,
        x_max=float(grid.x[-1]),
        y_max=float(grid.y[-1]),
        pixel_mm=_pixel_mm(grid),
    )
    cav_a, cav_b, cav_cy = an.cavity

    def ceiling(x, y):
        return _diaphragm_z(an, x, y) - GAS_MARGIN_MM

    return surround.draw_scene(rng, body, surround.Abdomen(a=cav_a, b=cav_b, cy=cav_cy, ceiling=ceiling))


def _paint_scene(grid: _Grid, an: _Anatomy, scene: surround.Scene, hu: np.ndarray, lungs: np.ndarray) -> None:
    """Table, pad, arms and clothing around the body, bowel gas under the diaphragm (in place).

    Nothing lands inside the body outline but the gas, and the gas only in the abdominal cavity
    below the diaphragm, away from the heart and spine and outside `lungs`.
    """
    body_a, body_b, body_cy = an.body
    x, y = grid.x[None, :], grid.y[:, None]
    outside = ~_in_ellipse(x, y, 0.0, body_cy, body_a, body_b)  # exactly where _wall_maps left air
    surround.paint_outside(hu, x, y, grid.z, scene, outside, _pixel_mm(grid))
    cav_a, cav_b, cav_cy = an.cavity

    def room(box):
        bx, by, bz = grid.coords(box)
        ok = bz < _diaphragm_z(an, bx, by) - GAS_MARGIN_MM
        ok = ok & _in_ellipse(bx, by, 0.0, cav_cy, cav_a - 3.0 * an.scale, cav_b - 3.0 * an.scale)
        ok &= ~_heart_section(an, bx, by, bz, margin_mm=4.0) & ~_near_spine(an, bx, by)
        return ok & (lungs[box] == 0)

    surround.paint_gas(hu, grid.x, grid.y, grid.z, scene.gas, room, _pixel_mm(grid))

"""One rule for every setting of the stage configurations, and the function that checks them.

Every field of the settings dataclasses (:class:`~covidseg.config.PreprocessConfig` with
:class:`~covidseg.imaging.lungs.LungParams` and :class:`~covidseg.imaging.airways.AirwayParams`, a segmenter's
:class:`~covidseg.inference.ct_segment.SlicePreprocessing` (checked again when a model file is opened),
:class:`~covidseg.config.GanTrainConfig` with :class:`~covidseg.config.CorruptionConfig`,
:class:`~covidseg.method.pseudo_masks.PseudoMaskConfig`, :class:`~covidseg.config.SegTrainConfig`,
:class:`~covidseg.config.SegLossConfig`, :class:`~covidseg.config.ExportConfig` and
``RunConfig.workers``) has one :class:`Rule` in :data:`RULES`, keyed by class name
and field name; of :class:`~covidseg.config.PredictOptions` only the fields a settings file may set
(the others are command-line flags) have one. :func:`check_values` applies them to the values of one settings
table before a config is built (settings files of `covidseg run`), :func:`check_config` to a
config already built (the single commands' options; the config classes of ``config.py`` call it in
``__post_init__``). The first broken rule raises a :class:`SettingError` naming the key, the value
and the cause, e.g. ``lr_g = nan: must be a finite number > 0``; callers add the file or option.

Rules check values, not only types: NaN and infinities, negative step counts, unknown presets, an
HU window with lo >= hi, and a network grid too large to allocate are refused before any stage runs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields, is_dataclass

#: The largest network grid `preprocess` accepts: at most MAX_GRID_SIDE voxels along any axis and
#: MAX_GRID_VOXELS in all. A grid array is float32 (4 bytes a voxel) plus uint8 lung and reference
#: masks, and resizing onto the grid holds float32 copies: preprocessing one case peaked at 26 bytes
#: per grid voxel (measured at 128 x 256 x 256 with a reference mask), so 2^27 voxels (a 512 MiB
#: image) need ~3.5 GB per preprocess worker. train-gan on whole grids needs far more (activations of
#: 8-32 channels per voxel, forward and backward, per volume of the batch): grids that large are for
#: training on crops. A lung crop of a 512 x 512 CT with 0.6 mm slices holds fewer voxels than 2^27,
#: so a larger grid would only interpolate. The default grid, 32 x 128 x 128, is 2^19 voxels.
MAX_GRID_SIDE = 1024
MAX_GRID_VOXELS = 2**27
MAX_SEED = 2**63 - 1  # seeds reach torch.manual_seed and numpy's SeedSequence


class SettingError(ValueError):
    """A setting breaks its rule: ``KEY = VALUE: CAUSE`` (KEY dotted for nested tables)."""

    def __init__(self, key: str, value: object, cause: str) -> None:
        self.key, self.value, self.cause = key, value, cause
        super().__init__(f"{key} = {show(value)}: {cause}")


def show(value: object) -> str:
    """A value as a settings file writes it: nan, inf, true, "text", [1, 2]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return repr(value)


@dataclass(frozen=True)
class Rule:
    """`ok(value)` is True for a valid value; `text` says what a valid value is ("must be ..."),
    `detail(value)` (optional) what is wrong with this one."""

    ok: Callable[[object], bool]
    text: str
    detail: Callable[[object], str] | None = None

    def cause(self, value: object) -> str:
        """Why `value` breaks this rule."""
        extra = self.detail(value) if self.detail is not None else ""
        return f"{self.text}{extra}"


def _is_number(value: object) -> bool:
    """A finite real number (numpy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_whole(value: object) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def number(
    lo: float | None = None,
    hi: float | None = None,
    open_lo: bool = False,
    open_hi: bool = False,
    unit: str = "",
) -> Rule:
    """A finite number within [lo, hi] (an open end with `open_lo` / `open_hi`; None: unbounded),
    in `unit` (named in the rule's text)."""

    def ok(v: object) -> bool:
        if not _is_number(v):
            return False
        above = lo is None or (v > lo if open_lo else v >= lo)
        below = hi is None or (v < hi if open_hi else v <= hi)
        return above and below

    if lo is not None and hi is not None:
        text = f"must be a number in {'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
    elif lo is not None:
        text = f"must be a finite number {'>' if open_lo else '>='} {lo:g}"
    else:
        text = "must be a finite number"
    return Rule(ok, f"{text} {unit}".rstrip())


def whole(lo: int, hi: int | None = None) -> Rule:
    """A whole number >= lo (and <= hi)."""
    text = f"must be a whole number >= {lo}" if hi is None else f"must be a whole number in {lo}..{hi}"
    return Rule(lambda v: _is_whole(v) and v >= lo and (hi is None or v <= hi), text)


def one_of(*names: str) -> Rule:
    """One of `names`."""
    return Rule(lambda v: isinstance(v, str) and v in names, f"must be one of {', '.join(names)}")


def _sequence(n: int, item: Rule, valid: Callable[[tuple], bool], text: str) -> Rule:
    """A list of `n` items each passing `item`, together passing `valid`."""

    def ok(v: object) -> bool:
        return isinstance(v, list | tuple) and len(v) == n and all(map(item.ok, v)) and valid(tuple(v))

    return Rule(ok, text)


def _fits(grid: tuple) -> bool:
    return max(grid) <= MAX_GRID_SIDE and math.prod(grid) <= MAX_GRID_VOXELS


def _grid_size(value: object) -> str:
    """How large a too-large grid is (voxels, GiB of one float32 array)."""
    if not (isinstance(value, list | tuple) and all(map(_is_whole, value)) and min(value, default=0) >= 1):
        return ""
    voxels = math.prod(value)
    return f"; this one has {voxels} voxels, {voxels * 4 / 2**30:.3g} GiB per float32 array"


FLAG = Rule(lambda v: isinstance(v, bool), "must be true or false")
FINITE = number()
POSITIVE = number(0, open_lo=True)
NON_NEGATIVE = number(0)
FRACTION = number(0, 1)
AT_LEAST_1 = whole(1)
SEED = whole(0, MAX_SEED)
GRID = Rule(
    _sequence(3, whole(1), _fits, "").ok,
    f"must be three whole numbers (z, y, x) from 1 to {MAX_GRID_SIDE}, "
    f"{MAX_GRID_VOXELS} (2^27) voxels in all",
    _grid_size,
)
ZYX = _sequence(3, whole(1), lambda t: True, "must be three whole numbers >= 1 (z, y, x)")
CROP = Rule(lambda v: v is None or ZYX.ok(v), "must be [z, y, x] or none")
# Ranges a value in HU, mm, mL or cm² can take in a chest CT; beyond them a value is a typing or
# editing mistake, and some would exhaust memory (a 1e6 mm closing radius, an 8192 px slice).
HU = number(-2000, 4000, unit="HU")  # air is -1000 HU, dense bone and contrast ~+3000 HU
HU_WINDOW = _sequence(
    2, HU, lambda w: w[0] < w[1], "must be two numbers [lo, hi] in [-2000, 4000] HU with lo < hi"
)
CHEST_MM = number(0, 300, unit="mm")  # a distance inside one chest
RADIUS_MM = number(0, 50, unit="mm")  # a structuring element's radius (its disk is (2r/voxel)^2)
SECTION_CM2 = number(0, 2000, unit="cm²")  # an axial section of a chest is ~1200 cm²
MARGIN_MM = number(0, 100, unit="mm")  # 100 mm beyond the lungs is outside the chest
#: a 2D network's slice: a CT slice has 512 x 512 pixels; the encoders downsample by 16
SLICE_SIZE = _sequence(
    2,
    whole(16, 1024),
    lambda s: all(v % 16 == 0 for v in s),
    "must be two whole numbers in 16..1024, multiples of 16",
)
BETAS = _sequence(2, number(0, 1, open_hi=True), lambda b: True, "must be two numbers in [0, 1)")
SCALE_RANGE = _sequence(2, POSITIVE, lambda s: s[0] <= s[1], "must be two numbers [lo, hi] with 0 < lo <= hi")


def _lo_hi(item: Rule, where: str) -> Rule:
    """Two numbers [lo, hi], each passing `item` (`where` says how), with lo <= hi."""
    return _sequence(2, item, lambda r: r[0] <= r[1], f"must be two numbers [lo, hi] {where} with lo <= hi")


HU_RANGE = _lo_hi(HU, "in [-2000, 4000] HU")
FRACTION_RANGE = _lo_hi(FRACTION, "in [0, 1]")
HU_RISE_RANGE = _lo_hi(number(0, 1000, unit="HU"), "in [0, 1000] HU")  # density added, lo..hi
LOAD_RANGE = _lo_hi(number(0, 1, open_lo=True), "in (0, 1]")  # drawn log-uniformly, so lo > 0
PERLIN_FREQUENCY = _sequence(3, POSITIVE, lambda f: True, "must be three numbers > 0 (Perlin cells, z, y, x)")
#: Perlin cells along one axis of the finest octave of the lesion field (frequency × 2^(octaves - 1)):
#: its random gradients are 3 float32 per lattice corner and volume (256³ cells: 200 MB), and finer
#: cells than one per 4 voxels of the largest grid (MAX_GRID_SIDE) are noise, not lesion shapes.
MAX_PERLIN_CELLS = 256


GROW_PERCENTILE = Rule(
    lambda v: v is None or number(50, 100, open_lo=True, open_hi=True).ok(v),
    "must be a number in (50, 100) or none (hysteresis off)",
)
TABLE = Rule(lambda v: is_dataclass(v) and not isinstance(v, type), "must be a table")
NAME = Rule(lambda v: isinstance(v, str), "must be a name (a string)")
#: class name -> field -> rule. A nested settings dataclass (LungParams in PreprocessConfig) is
#: checked by its own rules; every field of every class has a rule (tests/test_bad_settings.py).
RULES: dict[str, dict[str, Rule]] = {
    "PreprocessConfig": {
        "grid": GRID,
        "hu_window": HU_WINDOW,
        "margin_mm": MARGIN_MM,
        "lungs": TABLE,
    },
    "LungParams": {
        "air_hu": HU,
        "outside_hu": HU,
        "work_mm": number(0.1, 20, unit="mm"),  # the working voxel size
        "closing_mm": RADIUS_MM,
        "z_gap_mm": CHEST_MM,
        "min_lung_ml": number(0, 10000, unit="mL"),  # both lungs hold about 6 L
        "min_fraction": FRACTION,
        "max_hole_cm2": SECTION_CM2,
        "vessel_cm2": SECTION_CM2,
        "open_mm": RADIUS_MM,
        "gas_hu": HU,
        "airway_fraction": FRACTION,
        "airway_rim_mm": RADIUS_MM,
        "airway": TABLE,
    },
    "AirwayParams": {
        "lumen_hu": HU,
        "seed_min_cm2": SECTION_CM2,
        "seed_max_cm2": SECTION_CM2,
        "central_fraction": FRACTION,
        "max_section_cm2": SECTION_CM2,
        "max_length_mm": number(0, 500, unit="mm"),  # trachea + bronchi: ~220 mm
    },
    "SlicePreprocessing": {  # a segmenter's preprocessing, as a checkpoint or sidecar records it
        "hu_window": HU_WINDOW,
        "slice_size": SLICE_SIZE,
        "slab_mm": number(0.5, 500, unit="mm"),  # thinner than any CT slice; taller than a chest scan
        "margin_mm": MARGIN_MM,
        "threshold": number(0, 1, open_lo=True, open_hi=True),
        "lungs": TABLE,
    },
    "GanTrainConfig": {
        "preset": one_of("tiny", "small", "base"),
        "steps": AT_LEAST_1,
        "batch_size": AT_LEAST_1,
        "grad_accum": AT_LEAST_1,
        "crop": CROP,
        "lr_g": POSITIVE,
        "lr_d": POSITIVE,
        "betas": BETAS,
        "adversarial": one_of("bce", "lsgan"),
        "w_adv": NON_NEGATIVE,
        "w_rec": NON_NEGATIVE,
        "w_identity": NON_NEGATIVE,
        "latent_noise": one_of("perlin", "uniform", "none"),
        "seed": SEED,
        "checkpoint_every": AT_LEAST_1,
        "sample_every": AT_LEAST_1,
        "log_every": AT_LEAST_1,
        "lesions": TABLE,
    },
    "CorruptionConfig": {  # train-gan's synthetic lesions (method/lesions.py)
        "load_range": LOAD_RANGE,
        "ggo_hu": HU_RANGE,
        "consolidation_hu": HU_RANGE,
        "core_probability": FRACTION,
        "core_fraction": FRACTION_RANGE,
        "frequency": PERLIN_FREQUENCY,
        "octaves": whole(1, 8),
        "border_bias": FINITE,
        "posterior_bias": FINITE,
        "edge": POSITIVE,
        "texture_hu": number(0, 1000, unit="HU"),
        "fine_mix": FRACTION,
        "reversed_halo_probability": FRACTION,
        "crazy_paving_probability": FRACTION,
        "crazy_paving_hu": HU_RISE_RANGE,
        "air_bronchogram_probability": FRACTION,
    },
    "PseudoMaskConfig": {
        "smooth_sigma": NON_NEGATIVE,
        "healthy_percentile": number(0, 100),
        "min_threshold_hu": number(0, 1000, unit="HU"),
        "min_component": whole(0),
        "high_infected": FRACTION,
        "low_infected": FRACTION,
        "min_lung_fraction": FRACTION,
        "grow_percentile": GROW_PERCENTILE,
    },
    "SegTrainConfig": {
        "arch": one_of("transunet", "unet"),
        "preset": NAME,  # checked with arch, below
        "steps": AT_LEAST_1,
        "batch_size": whole(2),
        "grad_accum": AT_LEAST_1,
        "lr": POSITIVE,
        "lr_schedule": one_of("constant", "cosine"),
        "warmup_steps": whole(0),
        "weight_decay": NON_NEGATIVE,
        "val_fraction": number(0, 1, open_hi=True),
        "augment": FLAG,
        "max_rotation_deg": number(0, 180),
        "scale_range": SCALE_RANGE,
        "gain_jitter": number(0, 1, open_hi=True),
        "offset_jitter_hu": number(0, 1000, unit="HU"),
        "noise_std_hu": number(0, 1000, unit="HU"),
        "blur_p": FRACTION,
        "blur_sigma_px": number(0, 10, open_lo=True, unit="px"),  # 10 px: a 61-tap kernel
        "display_p": FRACTION,
        "display_center_hu": HU_RANGE,
        "display_width_hu": _lo_hi(number(0, 6000, open_lo=True), "in (0, 6000] HU"),
        "display_gamma": number(1, 10),
        "display_assumed_window_hu": HU_WINDOW,
        "synth_lesion_p": FRACTION,
        "healthy_budget_percent": Rule(
            lambda v: v is None or number(0, 100).ok(v),
            "must be a number in [0, 100] % or none (fixed threshold)",
        ),
        "threshold": number(0, 1, open_lo=True, open_hi=True),
        "seed": SEED,
        "eval_every": AT_LEAST_1,
        "log_every": AT_LEAST_1,
    },
    "SegLossConfig": {
        "w_sensitivity": NON_NEGATIVE,
        "beta": NON_NEGATIVE,
        "w_mse": NON_NEGATIVE,
        "w_contrastive": NON_NEGATIVE,
        "w_dice": NON_NEGATIVE,
        "contrastive_proj_dim": AT_LEAST_1,
        "init_temperature": POSITIVE,
    },
    "ExportConfig": {"fp16": FLAG},
    "PredictOptions": {"batch_size": AT_LEAST_1, "snapshots": FLAG, "probabilities": FLAG},
    "RunConfig": {"workers": AT_LEAST_1},  # its other fields are the tables above
}


def _segmenter_preset(values: Mapping) -> tuple[str, str] | None:
    """train-seg's preset must exist for its arch: (field, cause) when it does not."""
    from covidseg.models.segmenters import SEGMENTERS

    presets = SEGMENTERS[values["arch"]][1]
    if values["preset"] in presets:
        return None
    return "preset", f"must be one of {', '.join(presets)} for arch {show(values['arch'])}"


def _infected_order(values: Mapping) -> tuple[str, str] | None:
    """make-masks' low-infected share must not exceed the high-infected one (the sets would overlap)."""
    if values["low_infected"] <= values["high_infected"]:
        return None
    return "low_infected", f"must be <= high_infected ({show(values['high_infected'])})"


def _grow_below_healthy(values: Mapping) -> tuple[str, str] | None:
    """The hysteresis percentile (its lower threshold) must not be above the main one."""
    grow = values["grow_percentile"]
    if grow is None or grow <= values["healthy_percentile"]:
        return None
    return "grow_percentile", f"must be <= healthy_percentile ({show(values['healthy_percentile'])})"


def _airway_seed_range(values: Mapping) -> tuple[str, str] | None:
    if values["seed_min_cm2"] <= values["seed_max_cm2"]:
        return None
    return "seed_min_cm2", f"must be <= seed_max_cm2 ({show(values['seed_max_cm2'])})"


def _perlin_lattice(values: Mapping) -> tuple[str, str] | None:
    """The lesion fields' finest octave must have at most MAX_PERLIN_CELLS cells per axis: the shape
    field's (frequency × 2^(octaves - 1)) and the texture's (4 × frequency, 2 octaves: 8 × frequency)."""
    finest = max(values["frequency"]) * max(2 ** (values["octaves"] - 1), 8)
    if finest <= MAX_PERLIN_CELLS:
        return None
    cause = f"with octaves = {values['octaves']} the finest Perlin octave has {finest:g} cells along an axis"
    return "frequency", f"{cause} (frequency × max(2^(octaves - 1), 8)); at most {MAX_PERLIN_CELLS}"


#: Rules between fields of one class, checked once every field passed its own rule.
CROSS_RULES: dict[str, tuple[Callable[[Mapping], tuple[str, str] | None], ...]] = {
    "SegTrainConfig": (_segmenter_preset,),
    "PseudoMaskConfig": (_infected_order, _grow_below_healthy),
    "AirwayParams": (_airway_seed_range,),
    "CorruptionConfig": (_perlin_lattice,),
}


def default_of(f) -> object:
    """The default of the dataclass field `f` (its factory called), or None when it has none."""
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def check_values(cls: type, values: Mapping[str, object], prefix: str = "") -> None:
    """Check the settings `values` (field -> value; missing fields take their defaults) of the
    settings dataclass `cls`; raise :class:`SettingError` for the first value that breaks its rule.

    Nested settings dataclasses are checked by their own rules (keys ``lungs.air_hu``).
    """
    rules = RULES[cls.__name__]  # RunConfig's stage tables have none here: they are checked as tables
    merged = {
        f.name: values[f.name] if f.name in values else default_of(f) for f in fields(cls) if f.name in rules
    }
    for name, value in merged.items():
        if rules[name] is TABLE and TABLE.ok(value):
            check_config(value, f"{prefix}{name}.")
        elif not rules[name].ok(value):
            raise SettingError(prefix + name, value, rules[name].cause(value))
    for cross in CROSS_RULES.get(cls.__name__, ()):
        broken = cross(merged)
        if broken is not None:
            raise SettingError(prefix + broken[0], merged[broken[0]], broken[1])


def check_config(config: object, prefix: str = "") -> None:
    """Check every field of a built settings dataclass (see :func:`check_values`)."""
    check_values(type(config), {f.name: getattr(config, f.name) for f in fields(config)}, prefix)

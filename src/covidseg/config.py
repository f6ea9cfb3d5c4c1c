"""Every user-settable configuration, and the settings-file loader of `covidseg run`.

Frozen dataclasses, saved as JSON beside every output; each checks its fields in ``__post_init__``
with the rules of :mod:`covidseg.settings` (a :class:`~covidseg.settings.SettingError` naming the
field). Defined here: :class:`PreprocessConfig`, :class:`GanTrainConfig` with its synthetic lesions
:class:`CorruptionConfig`, :class:`SegTrainConfig`, :class:`SegLossConfig`, :class:`ExportConfig`,
:class:`PredictOptions` and :class:`RunConfig`, which holds one of each for `covidseg run`.
Three are parameters of one library function and live beside it (this module composes them):
:class:`~covidseg.imaging.lungs.LungParams` with its
:class:`~covidseg.imaging.airways.AirwayParams` (lung and airway segmentation, HU and mm) and
:class:`~covidseg.method.pseudo_masks.PseudoMaskConfig` (thresholds of the pseudo-masks); they
import nothing of this module, so the library can use them without it. The configs of the
learning and method code (the loss weights, the lesions) live here instead: they are settings of
a stage first, and the library modules that use them (learning/losses, method/lesions) import them.

Settings file (TOML or JSON; :func:`load_config`): one table per stage whose keys are the fields of
the stage's config dataclass: ``[preprocess]`` :class:`PreprocessConfig` (+ ``workers``;
``[preprocess.lungs]`` :class:`LungParams`, ``[preprocess.lungs.airway]`` :class:`AirwayParams`),
``[train-gan]`` :class:`GanTrainConfig` (``crop`` also ``"auto"`` = the preset's crop, the default,
or ``"none"``; ``[train-gan.lesions]`` :class:`CorruptionConfig`), ``[make-masks]``
:class:`PseudoMaskConfig` (also used for train-gan's threshold calibration), ``[train-seg]``
:class:`SegTrainConfig` (``[train-seg.loss]`` :class:`SegLossConfig`), ``[export]``
:class:`ExportConfig`, ``[predict]`` :class:`PredictOptions` (the fields with a rule: batch_size,
snapshots, probabilities). Unknown tables or keys, and values that break their rule
(:mod:`covidseg.settings`: the type, NaN or infinite numbers, ranges, presets, a grid too large or
not a multiple of the GAN's strides) are usage errors naming the file, the table, the key and the
cause, raised before any stage runs.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from covidseg.errors import UsageError
from covidseg.imaging.grid import DEFAULT_HU_SCALE, HuScale
from covidseg.imaging.intensity import IntensityMapping
from covidseg.imaging.lungs import LungParams
from covidseg.method.pseudo_masks import PseudoMaskConfig
from covidseg.settings import CROP, RULES, SettingError, check_config, check_values, default_of, show


@dataclass(frozen=True)
class PreprocessConfig:
    """How CTs become network inputs (HU, mm, voxels)."""

    grid: tuple[int, int, int] = (32, 128, 128)  # z, y, x voxels of the network grid
    hu_window: tuple[float, float] = DEFAULT_HU_SCALE.window  # HU clipped to this, then scaled to [0, 1]
    margin_mm: float = 5.0  # added around the lung bounding box before cropping
    lungs: LungParams = field(default_factory=LungParams)

    def __post_init__(self) -> None:
        check_config(self)  # SettingError (a ValueError) naming the field; rules in covidseg.settings

    @property
    def hu_scale(self) -> HuScale:
        """The [0, 1] scale of the grids this preprocessing makes (`hu_window`, HU)."""
        return HuScale(*self.hu_window)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> PreprocessConfig:
        return cls(
            grid=tuple(int(v) for v in data["grid"]),
            hu_window=tuple(float(v) for v in data["hu_window"]),
            margin_mm=float(data["margin_mm"]),
            lungs=LungParams.from_json(data["lungs"]),
        )


@dataclass(frozen=True)
class CorruptionConfig:
    """The synthetic lesions train-gan paints into healthy lungs for the generator to remove
    (:func:`covidseg.method.lesions.perlin_lesions`): loads, Perlin-field shapes and HU levels.
    "Field units": the Perlin field is scaled to unit standard deviation per volume."""

    load_range: tuple[float, float] = (0.005, 0.3)  # lesion volume / lung volume, log-uniform
    ggo_hu: tuple[float, float] = (-700.0, -300.0)  # ground-glass level drawn in this range (HU)
    consolidation_hu: tuple[float, float] = (-100.0, 50.0)  # consolidated cores' level (HU)
    core_probability: float = 0.6  # share of volumes whose densest lesion parts consolidate
    core_fraction: tuple[float, float] = (0.1, 0.5)  # share of the lesion volume that is core
    frequency: tuple[float, float, float] = (2.0, 4.0, 4.0)  # Perlin cells over the grid (z, y, x)
    octaves: int = 3  # Perlin octaves, each twice the frequency of the one before
    border_bias: float = 0.8  # preference for subpleural positions (field units)
    posterior_bias: float = 0.5  # preference for posterior positions (field units)
    edge: float = 0.04  # softness of lesion borders (field units)
    texture_hu: float = 42.0  # amplitude (HU) of the lesion intensity texture
    # more looks (issue 16; each 0 = off, nothing drawn, the lesions of before bit for bit):
    fine_mix: float = 0.0  # largest share of a fine field (3x the frequency) in the shape: lobular foci
    reversed_halo_probability: float = 0.0  # share of consolidating volumes whose dense part is the rim
    crazy_paving_probability: float = 0.0  # share of volumes with reticular lines over the ground glass
    crazy_paving_hu: tuple[float, float] = (80.0, 250.0)  # how much denser the lines are (HU)
    air_bronchogram_probability: float = 0.0  # share of consolidating volumes crossed by air tubes

    def __post_init__(self) -> None:
        check_config(self)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CorruptionConfig:
        ranges = ("load_range", "ggo_hu", "consolidation_hu", "core_fraction", "frequency", "crazy_paving_hu")
        return cls(**{k: tuple(float(x) for x in v) if k in ranges else v for k, v in data.items()})


@dataclass(frozen=True)
class GanTrainConfig:
    """How `train-gan` trains (steps, batch, losses and their weights, the synthetic lesions)."""

    preset: str = "small"  # tiny (2 CPU cores) | small (default, GPU) | base (GPU); see GAN_PRESETS
    steps: int = 900
    batch_size: int = 2  # volumes per micro-batch per process; global = batch_size × processes × grad_accum
    grad_accum: int = 1  # micro-batches whose gradients are summed before each optimizer step
    crop: tuple[int, int, int] | None = None  # training crops (z, y, x); None = whole grid
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    adversarial: str = "bce"  # bce (as in the method) | lsgan
    w_adv: float = 0.05  # adversarial term for G (0 = no adversarial training, D is not trained)
    w_rec: float = 100.0  # MSE restoring Perlin-corrupted healthy lungs
    w_identity: float = 0.0  # MSE of G(healthy) vs healthy
    latent_noise: str = "perlin"  # perlin | uniform | none (U_N in the generator's latent)
    seed: int = 0
    checkpoint_every: int = 100
    sample_every: int = 100
    log_every: int = 10
    lesions: CorruptionConfig = field(default_factory=CorruptionConfig)  # w_rec's synthetic lesions

    def __post_init__(self) -> None:
        check_config(self)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> GanTrainConfig:
        """Also a train_config written before ``lesions`` was a setting: the default lesions."""
        data = dict(data)
        data["crop"] = None if data.get("crop") is None else tuple(int(v) for v in data["crop"])
        data["betas"] = tuple(float(v) for v in data["betas"])
        data["lesions"] = CorruptionConfig.from_json(data.get("lesions", {}))
        return cls(**data)


@dataclass(frozen=True)
class SegTrainConfig:
    """How `train-seg` trains the 2D segmenter on pseudo-masks."""

    arch: str = "transunet"  # transunet | unet
    preset: str = "tiny"  # tiny | small (CPU) | base (GPU, close to R50-ViT-B/16)
    steps: int = 1000
    batch_size: int = 16  # slices per micro-batch per process (half high-infected); see grad_accum
    grad_accum: int = 1  # micro-batches per optimizer step; global = batch_size × processes × grad_accum
    lr: float = 5e-4
    lr_schedule: str = "constant"  # constant (the measured recipe) | cosine (warm-up, then to 1 % of lr)
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    val_fraction: float = 0.2  # share of cases held out (their pseudo-labels) for validation
    augment: bool = True
    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    gain_jitter: float = 0.05  # intensity gain in 1 ± this (about -1000 HU)
    offset_jitter_hu: float = 70.0  # intensity offset in ± this (HU)
    noise_std_hu: float = 14.0  # Gaussian noise (HU)
    # 8-bit display slices (JPEG/PNG read with --intensity window:LO,HI): learning/augment.py
    blur_p: float = 0.3  # share of images blurred (0: off, nothing drawn)
    blur_sigma_px: float = 1.0  # blur sigma uniform in (0, this] (pixels)
    display_p: float = 0.5  # share of images rendered as display slices (0: off, nothing drawn)
    display_center_hu: tuple[float, float] = (-750.0, -450.0)  # display window centre drawn in (HU)
    display_width_hu: tuple[float, float] = (1000.0, 1700.0)  # display window width drawn in (HU)
    display_gamma: float = 1.3  # curve v ** g, g log-uniform in [1 / this, this]
    display_assumed_window_hu: tuple[float, float] = (-1350.0, 150.0)  # grey 0..255 read back as lo..hi HU
    synth_lesion_p: float = 0.3  # share of slices given a synthetic lesion (method/slice_lesions.py); 0: off
    threshold: float = 0.5  # probability -> mask (unless healthy_budget_percent calibrates it)
    healthy_budget_percent: float | None = None  # threshold: the lowest of 0.50..0.95 flagging at most
    # this % of the held-out healthy slices' lung (train_seg.calibrate_on_healthy); None: `threshold`
    seed: int = 0
    eval_every: int = 50  # validation, best-checkpoint selection, overlay PNG, checkpoint
    log_every: int = 10

    def __post_init__(self) -> None:
        check_config(self)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SegTrainConfig:
        """Also a train_config written before a setting existed (an older checkpoint): its default,
        except the display-slice augmentations, the synthetic lesions and the threshold calibration,
        which such a run trained without (off)."""
        data = {**SEG_SETTINGS_ABSENT_MEANS_OFF, **data}
        for key in ("scale_range", "display_center_hu", "display_width_hu", "display_assumed_window_hu"):
            if key in data:
                data[key] = tuple(float(v) for v in data[key])
        width_hu = DEFAULT_HU_SCALE.width_hu  # a checkpoint from before the jitter was HU: unit values of
        if "intensity_jitter" in data:  # the default window (1.0 = 1400 HU), the one those runs assumed
            jitter = float(data.pop("intensity_jitter"))
            data.update(gain_jitter=jitter, offset_jitter_hu=jitter * width_hu)
        if "noise_std" in data:
            data["noise_std_hu"] = float(data.pop("noise_std")) * width_hu
        return cls(**data)


#: train-seg settings added after runs were made with their behaviour off: a saved train_config or a
#: run's config.json without them ran without them (SegTrainConfig.from_json, run's folder check).
SEG_SETTINGS_ABSENT_MEANS_OFF = {
    "display_p": 0.0,
    "blur_p": 0.0,
    "synth_lesion_p": 0.0,
    "healthy_budget_percent": None,
}


@dataclass(frozen=True)
class SegLossConfig:
    """Weights of the segmentation losses and the contrastive head's settings
    (:class:`covidseg.learning.losses.SegmentationLoss`)."""

    w_sensitivity: float = 1.0  # sensitivity-enhanced BCE against the binary pseudo-mask
    beta: float = 4.0  # false-negative weight inside that BCE (4 vs 1: see docs/results.md)
    w_mse: float = 1.0  # MSE against the continuous pseudo-mask
    w_contrastive: float = 0.1  # high- vs low-infected InfoNCE on encoder features
    w_dice: float = 0.0  # soft Dice against the binary pseudo-mask
    contrastive_proj_dim: int = 64
    init_temperature: float = 0.1

    def __post_init__(self) -> None:
        check_config(self)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SegLossConfig:
        return cls(**data)


#: What `predict --format` writes per case: NIfTI masks, a DICOM SEG over the source series, or both.
OUTPUT_FORMATS = ("nifti", "dicom-seg", "both")


@dataclass(frozen=True)
class PredictOptions:
    """How `predict` reads its inputs and what it writes per case.

    The fields with a rule in :data:`covidseg.settings.RULES` (batch_size, snapshots,
    probabilities) are the ``[predict]`` table of `covidseg run`'s settings file; the others are
    set on the `predict` command line only.
    """

    probabilities: bool = False  # also write <id>_probability.nii.gz
    snapshots: bool = False  # also write <id>.png
    resume: bool = False  # --continue: skip complete cases
    overwrite: bool = False  # replace existing outputs
    series: str | None = None  # DICOM series UID to read from series folders
    intensity: IntensityMapping | None = None  # for inputs not in HU
    batch_size: int = 16  # slices per network call
    tensorrt: bool = False  # ask ONNX Runtime for TensorRT first
    num_parts: int = 1  # split the batch over this many jobs ...
    part_id: int = 0  # ... and run this one (0-based)
    keep_metadata: bool = False  # copy the DICOM identifiers (io.DICOM_IDENTIFIERS) into <id>.json
    output_format: str = "nifti"  # nifti | dicom-seg | both (see OUTPUT_FORMATS)
    seg_lungs: bool = False  # a "Lungs" segment in the DICOM SEG too

    def __post_init__(self) -> None:
        check_config(self)
        if self.output_format not in OUTPUT_FORMATS:
            raise SettingError(
                "output_format", self.output_format, f"must be one of {', '.join(OUTPUT_FORMATS)}"
            )

    @property
    def writes_nifti(self) -> bool:
        """Whether each case gets its NIfTI mask (and probability map)."""
        return self.output_format in ("nifti", "both")

    @property
    def writes_seg(self) -> bool:
        """Whether each case gets a DICOM SEG (DICOM series inputs only)."""
        return self.output_format in ("dicom-seg", "both")

    @property
    def part_suffix(self) -> str:
        """'' for a whole batch, '.part-2-of-4' (1-based in file names) for a part."""
        return "" if self.num_parts == 1 else f".part-{self.part_id + 1}-of-{self.num_parts}"

    def settings(self) -> dict:
        """The settings-file fields (those with a rule), as `run` writes them to config.json."""
        return {name: getattr(self, name) for name in RULES[type(self).__name__]}


def gan_crop(value: object, preset: str) -> tuple[int, int, int] | None:
    """train-gan's training crop (z, y, x voxels) from a setting or option value: ``"auto"`` the
    preset's crop (:data:`covidseg.models.gan3d.PRESET_CROPS`; tiny: 16, 64, 64), ``"none"`` or None
    whole grids (None), or three whole numbers. Anything else raises SettingError("crop", ...)."""
    if value == "auto":
        from covidseg.models.gan3d import PRESET_CROPS  # torch: only when asked

        return PRESET_CROPS.get(preset)
    if value is None or value == "none":
        return None
    if not CROP.ok(value):
        raise SettingError("crop", value, 'must be [z, y, x], "auto" or "none"')
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class ExportConfig:
    """How `run` exports the segmenter."""

    fp16: bool = False  # half-precision weights (for GPUs)


@dataclass(frozen=True)
class RunConfig:
    """Every stage's settings for one pipeline run."""

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    workers: int = 1  # cases preprocessed in parallel
    train_gan: GanTrainConfig = field(default_factory=GanTrainConfig)
    make_masks: PseudoMaskConfig = field(default_factory=PseudoMaskConfig)
    train_seg: SegTrainConfig = field(default_factory=SegTrainConfig)
    seg_loss: SegLossConfig = field(default_factory=SegLossConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    predict: PredictOptions = field(default_factory=PredictOptions)  # only its settings (see to_json)

    def to_json(self) -> dict:
        """The settings as config-file tables (JSON-ready: tuples become lists)."""
        tables = {
            "preprocess": {**self.preprocess.to_json(), "workers": self.workers},
            "train-gan": self.train_gan.to_json(),
            "make-masks": asdict(self.make_masks),
            "train-seg": {**self.train_seg.to_json(), "loss": self.seg_loss.to_json()},
            "export": asdict(self.export),
            "predict": self.predict.settings(),
        }
        return json.loads(json.dumps(tables))


# ---- settings files ---------------------------------------------------------------------------


def _convert(value: object, default: object) -> object:
    """`value` from a settings file in the Python type of the field's `default` where that is exact
    (a whole number for a float field, a list for a tuple); anything else is left as it is for the
    field's rule (:mod:`covidseg.settings`) to refuse."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, tuple) and isinstance(value, list | tuple):
        if len(value) == len(default):
            return tuple(_convert(v, d) for v, d in zip(value, default, strict=True))
        return tuple(value)
    return value


def _build(cls: type, data: dict, name: str, source: Path | None, extra: tuple[str, ...] = ()):
    """An instance of the settings dataclass `cls` from the table `[name]`: unknown keys and values
    that break their rule are usage errors naming the file, the table, the key and the cause. The
    table's keys are the fields with a rule (PredictOptions' command-line flags have none)."""
    known = {f.name: f for f in fields(cls) if f.name in RULES[cls.__name__]}
    values = {}
    for key, value in data.items():
        if key in extra:
            continue
        if key not in known:
            raise UsageError(
                source, f"unknown key {key!r} in [{name}] (known: {', '.join([*known, *extra])})"
            )
        default = default_of(known[key])
        if is_dataclass(default) and isinstance(value, dict):
            values[key] = _build(type(default), value, f"{name}.{key}", source)
        else:
            values[key] = _convert(value, default)
    _check(cls, values, name, source)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise UsageError(source, f"[{name}]: {exc}") from None


def _check(cls: type, values: dict, name: str, source: Path | None) -> None:
    """The rules of :mod:`covidseg.settings` on one table's values, as a usage error."""
    try:
        check_values(cls, values)
    except SettingError as exc:
        raise UsageError(source, f"[{name}] {exc}") from None


def _check_gan_grid(config: RunConfig, source: Path | None) -> None:
    """train-gan needs a grid and a crop that are multiples of its generator's strides, the crop
    within the grid: checked here so a run does not stop there after preprocessing."""
    from covidseg.models.gan3d import GAN_PRESETS

    preset = config.train_gan.preset
    divisor = GAN_PRESETS[preset].generator.divisor
    grid, crop = config.preprocess.grid, config.train_gan.crop
    for where, size in (("[preprocess] grid", grid), ("[train-gan] crop", crop)):
        if size is not None and any(s % d for s, d in zip(size, divisor, strict=True)):
            raise UsageError(
                source,
                f"{where} = {show(size)}: must be a multiple of {show(divisor)} (z, y, x) "
                f"for the train-gan preset {show(preset)}",
            )
    if crop is not None and any(c > g for c, g in zip(crop, grid, strict=True)):
        raise UsageError(source, f"[train-gan] crop = {show(crop)}: must fit in the grid {show(grid)}")


def _table(tables: dict, name: str, source: Path | None) -> dict:
    table = tables.get(name, {})
    if not isinstance(table, dict):
        raise UsageError(source, f"[{name}] must be a table, got {table!r}")
    return table


TABLES = ("preprocess", "train-gan", "make-masks", "train-seg", "export", "predict")


def config_from_tables(tables: dict, source: Path | None = None) -> RunConfig:
    """A RunConfig from settings tables (a parsed TOML/JSON file); missing keys take the defaults."""
    if not isinstance(tables, dict):
        raise UsageError(source, "the settings must be a table of tables")
    unknown = [name for name in tables if name not in TABLES]
    if unknown:
        raise UsageError(source, f"unknown table [{unknown[0]}] (known: {', '.join(TABLES)})")
    pre = _table(tables, "preprocess", source)
    workers = pre.get("workers", 1)
    _check(RunConfig, {"workers": workers}, "preprocess", source)
    gan = dict(_table(tables, "train-gan", source))
    crop = gan.pop("crop", "auto")
    gan_config = _build(GanTrainConfig, gan, "train-gan", source)
    seg = dict(_table(tables, "train-seg", source))
    loss = seg.pop("loss", {})
    if not isinstance(loss, dict):
        raise UsageError(source, f"[train-seg.loss] must be a table, got {loss!r}")
    preprocess = _build(PreprocessConfig, pre, "preprocess", source, extra=("workers",))
    try:
        crop = gan_crop(crop, gan_config.preset)
    except SettingError as exc:
        raise UsageError(source, f"[train-gan] {exc}") from None
    config = RunConfig(
        preprocess=preprocess,
        workers=workers,
        train_gan=replace(gan_config, crop=crop),
        make_masks=_build(PseudoMaskConfig, _table(tables, "make-masks", source), "make-masks", source),
        train_seg=_build(SegTrainConfig, seg, "train-seg", source),
        seg_loss=_build(SegLossConfig, loss, "train-seg.loss", source),
        export=_build(ExportConfig, _table(tables, "export", source), "export", source),
        predict=_build(PredictOptions, _table(tables, "predict", source), "predict", source),
    )
    _check_gan_grid(config, source)
    return config


def load_config(path: Path | None) -> RunConfig:
    """The settings of a TOML (``.toml``) or JSON (``.json``) file; defaults without a file."""
    if path is None:
        return RunConfig()
    path = Path(path)
    if not path.is_file():
        raise UsageError(path, "--config: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise UsageError(path, "--config must be a .toml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
        tables = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(path, f"unreadable settings ({str(exc)[:200]})") from None
    return config_from_tables(tables, path)

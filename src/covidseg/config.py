"""Frozen configuration dataclasses, one per stage; saved as JSON beside every output."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from covidseg.imaging.grid import DEFAULT_HU_SCALE, HuScale
from covidseg.imaging.intensity import IntensityMapping
from covidseg.imaging.lungs import LungParams
from covidseg.settings import CROP, RULES, SettingError, check_config


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
class GanTrainConfig:
    """How `train-gan` trains (steps, batch, losses and their weights)."""

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

    def __post_init__(self) -> None:
        check_config(self)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> GanTrainConfig:
        data = dict(data)
        data["crop"] = None if data.get("crop") is None else tuple(int(v) for v in data["crop"])
        data["betas"] = tuple(float(v) for v in data["betas"])
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
    threshold: float = 0.5  # probability -> mask
    seed: int = 0
    eval_every: int = 50  # validation, best-checkpoint selection, overlay PNG, checkpoint
    log_every: int = 10

    def __post_init__(self) -> None:
        check_config(self)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SegTrainConfig:
        data = dict(data)
        data["scale_range"] = tuple(float(v) for v in data["scale_range"])
        width_hu = DEFAULT_HU_SCALE.width_hu  # a checkpoint from before the jitter was HU: unit values of
        if "intensity_jitter" in data:  # the default window (1.0 = 1400 HU), the one those runs assumed
            jitter = float(data.pop("intensity_jitter"))
            data.update(gain_jitter=jitter, offset_jitter_hu=jitter * width_hu)
        if "noise_std" in data:
            data["noise_std_hu"] = float(data.pop("noise_std")) * width_hu
        return cls(**data)


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

    def __post_init__(self) -> None:
        check_config(self)

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

"""Frozen configuration dataclasses, one per stage; saved as JSON beside every output."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from covidseg.imaging.lungs import LungParams
from covidseg.settings import check_config


@dataclass(frozen=True)
class PreprocessConfig:
    """How CTs become network inputs (HU, mm, voxels)."""

    grid: tuple[int, int, int] = (32, 128, 128)  # z, y, x voxels of the network grid
    hu_window: tuple[float, float] = (-1000.0, 400.0)  # HU clipped to this, then scaled to [0, 1]
    margin_mm: float = 5.0  # added around the lung bounding box before cropping
    lungs: LungParams = field(default_factory=LungParams)

    def __post_init__(self) -> None:
        check_config(self)  # SettingError (a ValueError) naming the field; rules in covidseg.settings

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
    intensity_jitter: float = 0.05  # scale and offset jitter (unit scale; 0.05 = 70 HU)
    noise_std: float = 0.01
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
        return cls(**data)

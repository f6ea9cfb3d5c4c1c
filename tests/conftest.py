"""Shared test helpers: tiny CT-like volumes and a DICOM series writer."""

from __future__ import annotations

import contextlib
import locale
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
LAS = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # NIfTI "RAS+" stored as ITK direction


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch intra-op thread inside the block: on a small shared machine torch's thread pool would
    fight over the cores, and one thread adds float sums up in the same order every time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def oblique_direction(degrees: float = 12.0) -> tuple[float, ...]:
    """A direction rotated about z then x (gantry tilt), with a flipped y axis."""
    a, b = np.radians(degrees), np.radians(degrees / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    d = rz @ rx @ np.diag([1.0, -1.0, 1.0])
    return tuple(float(v) for v in d.ravel())


def ct_like(shape_zyx=(6, 20, 24), seed: int = 0) -> np.ndarray:
    """A small int16 array with air (-1000 HU) around a soft-tissue block and random values."""
    rng = np.random.default_rng(seed)
    a = np.full(shape_zyx, -1000, dtype=np.int16)
    z, y, x = shape_zyx
    inner = (slice(None), slice(y // 4, 3 * y // 4), slice(x // 4, 3 * x // 4))
    a[inner] = rng.integers(-900, 400, a[inner].shape)
    return a


@contextlib.contextmanager
def _locale_kept() -> Iterator[None]:
    """Restore the process locale after the block (a later subprocess(text=True) decodes with it)."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture(autouse=True)
def _restore_locale() -> Iterator[None]:
    """Every test leaves the process locale as it found it (GDCM's DICOM writer does not)."""
    with _locale_kept():
        yield


def write_dicom_series(
    folder: Path,
    hu_zyx: np.ndarray,
    spacing_zyx=(2.5, 0.8, 0.8),
    origin=(-10.0, -20.0, 30.0),
    series_uid: str = "1.2.826.0.1.3680043.2.1125.1",
    intercept: float = -1024.0,
    slope: float = 1.0,
    shuffle_names: bool = True,
    patient_name: str = "Doe^Jane",
    extra_tags: dict[str, str] | None = None,
    direction: tuple[float, ...] = LPS,
    positions: np.ndarray | None = None,
    pixel_mm: list[float] | None = None,
    names: list[str] | None = None,
) -> list[Path]:
    """Write a CT series (one file per slice) with rescale tags; names in shuffled order.

    Slices lie `spacing_zyx[0]` apart along the slice normal of `direction` (axial by default), from
    `origin`; `positions` (mm, one row per slice) and `pixel_mm` (one pixel size per slice) may
    instead be anything, and `names` renames the files (GDCM writes only .dcm names).
    `extra_tags` ("gggg|eeee" -> value) are written into every slice (e.g. PatientID)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = hu_zyx.shape[0]
    order = np.random.default_rng(1).permutation(n) if shuffle_names else np.arange(n)
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if positions is None:
        positions = np.asarray(origin) + np.outer(np.arange(n) * spacing_zyx[0], d[:, 2])
    pixel_mm = pixel_mm or [None] * n
    # GDCM's writer stores (value - intercept) / slope and writes the rescale tags given, so we pass HU
    hu = np.asarray(hu_zyx, dtype=np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    with _locale_kept():  # GDCM's writer sets the process locale to "C" and leaves it so
        for k in range(n):
            image = sitk.GetImageFromArray(hu[k])
            row_mm, column_mm = (pixel_mm[k], pixel_mm[k]) if pixel_mm[k] else spacing_zyx[1:]
            image.SetSpacing((column_mm, row_mm))
            tags = {
                "0008|0060": "CT",
                "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0008|0018": f"{series_uid}.{k + 1}",
                "0010|0010": patient_name,
                "0020|000d": "1.2.826.0.1.3680043.2.1125.99",
                "0020|000e": series_uid,
                "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{v:.4f}" for v in positions[k]),
                "0020|0037": "\\".join(f"{v:.6g}" for v in (*d[:, 0], *d[:, 1])),
                "0018|0050": str(spacing_zyx[0]),
                "0028|1052": f"{intercept:g}",
                "0028|1053": f"{slope:g}",
                "0028|0030": f"{row_mm}\\{column_mm}",
                **(extra_tags or {}),
            }
            for key, value in tags.items():
                image.SetMetaData(key, value)
            path = folder / f"IM{int(order[k]):04d}.dcm"
            writer.SetFileName(str(path))
            writer.Execute(image)
            paths.append(path.rename(folder / names[k]) if names else path)
    return paths


def save_untrained_segmenter(path: Path, slice_size=(128, 128), slab_mm: float = 9.0) -> Path:
    """An untrained tiny TransUNet saved as train-seg saves its best.pt (seeded: the same file
    every time); its masks are arbitrary but neither empty nor full."""
    from covidseg.inference.ct_segment import SlicePreprocessing
    from covidseg.inference.model_files import MODEL_FORMAT
    from covidseg.learning.loop import save_checkpoint
    from covidseg.models.segmenters import make_segmenter, segmenter_config_dict

    torch.manual_seed(0)
    model = make_segmenter("transunet", "tiny")
    spec = SlicePreprocessing(hu_window=(-1000.0, 400.0), slice_size=slice_size, slab_mm=slab_mm)
    save_checkpoint(
        path,
        {
            "format": MODEL_FORMAT,
            "covidseg_version": "test",
            "step": 0,
            "model": {"arch": "transunet", "config": segmenter_config_dict(model)},
            "weights": model.state_dict(),
            "threshold": spec.threshold,
            "validation": {},
            "preprocessing": spec.to_json(),
        },
    )
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"real test data expected at {SHARED_DATA}")
    return SHARED_DATA


# --- models and a phantom the export, predict, make-masks and model-home tests share (read only) ---


@pytest.fixture(scope="session")
def model_pt(tmp_path_factory) -> Path:
    """An untrained tiny TransUNet saved as train-seg saves its best.pt: its masks are arbitrary
    but neither empty nor full, which is all geometry and parity checks need."""
    return save_untrained_segmenter(tmp_path_factory.mktemp("model") / "best.pt")


@pytest.fixture(scope="session")
def model_onnx(model_pt, tmp_path_factory) -> Path:
    from covidseg.stages.export import run_export

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    run_export(model_pt, out)
    return out


@pytest.fixture(scope="session")
def phantom():
    from _small_inputs import SHAPE, SPACING
    from covidseg.imaging.phantom import make_phantom

    return make_phantom(SHAPE, SPACING, covid=True, seed=3)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A preprocess folder, a 2-step tiny GAN trained on 8x32x32 crops, and its ONNX export."""
    from types import SimpleNamespace

    from _small_inputs import CROP, GRID
    from covidseg.config import GanTrainConfig, PreprocessConfig
    from covidseg.method.pseudo_masks import PseudoMaskConfig
    from covidseg.stages import export
    from covidseg.stages.preprocess import run_preprocess
    from covidseg.stages.synth import run_synth
    from covidseg.stages.train_gan import run_train_gan

    root = tmp_path_factory.mktemp("export_gan")
    run_synth(root / "synth", 1, 1, seed=11, shape_zyx=(28, 96, 96), spacing_zyx=(10.0, 3.75, 3.75))
    s = root / "synth"
    run_preprocess(root / "pre", s / "healthy", s / "covid", s / "masks", PreprocessConfig(grid=GRID))
    config = GanTrainConfig(
        preset="tiny", steps=2, batch_size=1, crop=CROP, checkpoint_every=2, sample_every=2, log_every=1
    )
    # calibrated as before issue 16 (99th percentile, no hysteresis): a 2-step GAN's masks are then not
    # empty, which the plumbing tests need; the hysteresis tests turn it on themselves
    off = PseudoMaskConfig(healthy_percentile=99.0, grow_percentile=None)
    run_train_gan(root / "pre", root / "gan", config, device="cpu", mask_config=off)
    result = export.export_generator(root / "gan", root / "onnx" / "generator.onnx")
    return SimpleNamespace(root=root, pre=root / "pre", gan=root / "gan", export=result)

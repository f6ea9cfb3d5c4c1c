"""`covidseg make-masks`: pseudo-healthy volumes and pseudo-masks from a trained generator.

For every case of a preprocess output: ``Î_H = G(I_C)``, ``M = max(I_C - Î_H, 0)`` inside the lung
(smoothed), a continuous pseudo-mask (for the MSE term of the 2D stage) and a binary one (label-free
threshold from train-gan's calibration, small components removed; with ``grow_percentile`` grown by
hysteresis into connected lung above a lower threshold calibrated on the same healthy training
lungs), and the high-/low-infected slice sets for the contrastive loss. The generator runs on torch
(generator.pt) or on ONNX Runtime (an exported generator .onnx, see
``covidseg.inference.generator_files``); both share the host-side noise, windows and blending of
:func:`covidseg.inference.sliding_window.run_generator`.

Self-training (``--teacher``): a segmenter trained by train-seg on earlier pseudo-masks of these
grids runs on every grid slice, and its confident voxels join the pseudo-masks
(:func:`~covidseg.method.pseudo_masks.with_teacher`). How confident is chosen without labels, like
the thresholds: the lowest probability at which the healthy cases' refreshed masks flag at most
``teacher_budget_percent`` % of their lung
(:func:`~covidseg.method.pseudo_masks.healthy_probability_threshold`).

Output folder::

    pseudo_healthy/<id>.nii.gz   pseudo-healthy CT in HU, native geometry of the source CT
    pseudo_masks/<id>.nii.gz     binary pseudo-mask (uint8), native geometry
    grid/pseudo_healthy/<id>.npy, grid/soft/<id>.npy, grid/binary/<id>.npy   [z, y, x] on the grid
    slices/images.npy, lungs.npy, soft.npy, binary.npy (+ refs.npy)   [N, H, W] 2D training set
    slices/index.csv             n, case_id, group, z, set (high/low/mid), lesion_fraction
    manifest.json                written last
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from covidseg import __version__
from covidseg.devices import resolve_device
from covidseg.errors import CovidsegError, InputError, UsageError
from covidseg.imaging.geometry import Geometry, Orientation
from covidseg.imaging.grid import CropBox, HuScale, grid_to_canonical
from covidseg.imaging.intensity import parse_intensity
from covidseg.inference.generator_files import OnnxGenerator, generator_from_payload, load_generator_payload
from covidseg.inference.model_files import open_seg_model
from covidseg.inference.runners import OnnxRunner, TorchRunner, requested_providers
from covidseg.inference.sliding_window import run_generator
from covidseg.io import read_ct, write_array
from covidseg.io.atomic import folder_lock, save_npy, write_csv, write_json
from covidseg.method.pseudo_masks import (
    SOFT_SCALE_HU,
    PseudoMaskConfig,
    calibrate_threshold,
    difference_map,
    healthy_probability_threshold,
    refined_mask,
    soft_mask,
    split_slices,
    with_teacher,
)
from covidseg.models.gan3d import to_device
from covidseg.progress import Progress
from covidseg.settings import check_config
from covidseg.stages._workdir import (
    STAGE_LOCK,
    GridCase,
    load_grid_cases,
    median_slab_mm,
    portable_path,
    read_manifest,
    refuse_other_hu_scale,
    stored_path,
)

BACKENDS = ("auto", "torch", "onnx")


def resolve_generator(gan: Path, backend: str = "auto") -> tuple[str, Path]:
    """(``"torch"`` | ``"onnx"``, the generator file) for `--gan` and `--backend`.

    `gan` is a train-gan folder (its generator.pt, or generator.onnx with ``--backend onnx``), a
    generator.pt or an exported ``.onnx``; ``auto`` picks ONNX Runtime for an ``.onnx`` file.
    """
    if backend not in BACKENDS:
        raise UsageError(None, f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    gan = Path(gan)
    if gan.is_dir():
        kind = "onnx" if backend == "onnx" else "torch"
        return kind, gan / ("generator.onnx" if kind == "onnx" else "generator.pt")
    is_onnx = gan.name.lower().endswith(".onnx")
    kind = backend if backend != "auto" else ("onnx" if is_onnx else "torch")
    if (kind == "onnx") != is_onnx:
        wanted = "an exported generator .onnx" if kind == "onnx" else "a generator.pt (or a train-gan folder)"
        raise UsageError(gan, f"--backend {kind} needs {wanted}")
    return kind, gan


def _onnx_grid_check(onnx: OnnxGenerator, cases: list[GridCase], pre_dir: Path) -> None:
    """The ONNX generator runs at one fixed window: grids must hold it (or equal it, for a
    generator trained on whole grids) so that it runs exactly as the torch one would."""
    whole = onnx.sidecar.get("crop") is None
    for case in cases:
        grid = tuple(case.image.shape)
        fits = grid == onnx.window if whole else all(g >= w for g, w in zip(grid, onnx.window, strict=True))
        if not fits:
            need = "equal to" if whole else "at least"
            raise UsageError(
                pre_dir,
                f"grid {grid} of case {case.case_id}: this ONNX generator runs at a fixed {onnx.window} "
                f"(grids must be {need} that); use its generator.pt or preprocess with a matching --grid",
            )


def grids_hu_scale(pre_dir: Path, generator_path: Path, info: Mapping) -> HuScale:
    """The HU scale of the grids in `pre_dir` (its preprocess manifest records it); a generator
    trained on another HU window (`info`: its generator.pt payload or sidecar) is refused."""
    try:
        grids = HuScale.from_json(read_manifest(pre_dir, "covidseg.preprocess")["config"]["hu_window"])
    except (KeyError, ValueError) as exc:
        raise InputError(pre_dir / "manifest.json", f"no HU window ({exc})") from None
    refuse_other_hu_scale(generator_path, info["preprocess"].get("hu_window"), grids, pre_dir)
    return grids


def _native_outputs(case: GridCase, pseudo: np.ndarray, binary: np.ndarray, scale: HuScale) -> tuple:
    """(pseudo-healthy HU, binary mask) as native-geometry arrays, via the case's crop box; `scale`
    is the grids' HU scale."""
    record = case.record
    intensity = parse_intensity(record["intensity"]) if record.get("intensity") else None
    volume, _ = read_ct(case.source, series=record.get("series_uid"), intensity=intensity)
    box = CropBox.from_json(record["crop_box"])
    shape = tuple(record["canonical_shape"])
    if tuple(volume.hu.shape) != shape:
        raise InputError(case.source, "source CT changed since preprocessing (shape differs)")
    removal_hu = grid_to_canonical(scale.hu_of_unit_difference(case.image - pseudo), box, shape)
    healthy_hu = volume.hu - np.clip(removal_hu, 0.0, None)
    mask = grid_to_canonical(binary.astype(np.float32), box, shape) >= 0.5
    orientation = Orientation.from_json(record["orientation"])
    native_geometry = Geometry.from_json(record["native_geometry"])
    return (
        orientation.to_native(np.round(healthy_hu).astype(np.int16)),
        orientation.to_native(mask.astype(np.uint8)),
        native_geometry,
    )


def _write_case(
    out_dir: Path, case: GridCase, pseudo: np.ndarray, binary: np.ndarray, soft: np.ndarray, scale
) -> dict[str, str]:
    """Write one case's grids (and, with the grids' HU `scale`, its native NIfTI outputs); return the
    files (relative paths). A write that fails (disk full) or Ctrl-C leaves no file of the case."""
    files = {
        "pseudo_healthy_grid": f"grid/pseudo_healthy/{case.case_id}.npy",
        "soft_grid": f"grid/soft/{case.case_id}.npy",
        "binary_grid": f"grid/binary/{case.case_id}.npy",
    }
    if scale is not None:
        files["pseudo_healthy"] = f"pseudo_healthy/{case.case_id}.nii.gz"
        files["pseudo_mask"] = f"pseudo_masks/{case.case_id}.nii.gz"
    try:
        if scale is not None:
            healthy_native, mask_native, geometry = _native_outputs(case, pseudo, binary, scale)
            write_array(out_dir / files["pseudo_healthy"], healthy_native, geometry)
            write_array(out_dir / files["pseudo_mask"], mask_native, geometry)
        save_npy(out_dir / files["pseudo_healthy_grid"], pseudo.astype(np.float32))
        save_npy(out_dir / files["soft_grid"], soft)
        save_npy(out_dir / files["binary_grid"], binary.astype(np.uint8))
    except BaseException:
        for relative in files.values():
            (out_dir / relative).unlink(missing_ok=True)
        raise
    return files


def run_make_masks(
    pre_dir: Path,
    gan: Path,
    out_dir: Path,
    device: str = "auto",
    config: PseudoMaskConfig | None = None,
    threshold: float | None = None,
    native: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
    backend: str = "auto",
    overrides: Mapping[str, object] | None = None,
    grow_threshold: float | None = None,
    teacher: Path | None = None,
    teacher_budget_percent: float = 1.0,
) -> dict:
    """Run the generator over every case and write pseudo-masks; return the manifest.

    `gan` is a train-gan output folder, its generator.pt or an exported generator .onnx (with its
    sidecar, checked by sha256); `backend` (auto, torch, onnx) as in :func:`resolve_generator`.
    `config` None: train-gan's calibrated smoothing, percentile and smallest component (voxels) with
    `overrides` (PseudoMaskConfig fields, e.g. the command's options) on top; the result is checked
    (:class:`~covidseg.settings.SettingError`). The binary threshold is `threshold` (unit scale) if
    given, else the calibration's when it was made at ``config.healthy_percentile``, else calibrated
    here on the healthy training grids named by the train-gan manifest beside the generator; with
    ``config.grow_percentile`` the lower hysteresis threshold likewise (`grow_threshold`)
    (:func:`_thresholds`).
    With `teacher` (a train-seg folder, model .pt or exported .onnx trained on grids like these), the
    masks are refreshed by it (self-training, see the module docstring; the healthy cases'
    pseudo-healthy volumes, made first to choose the teacher's threshold, are kept for their masks).
    With `native`, NIfTI outputs in the source geometry are written too (this re-reads each source
    CT). `progress` gets (cases done, cases, "<case id>: N % of lung" or ": failed") per case.
    """
    pre_dir, out_dir, gan = Path(pre_dir), Path(out_dir), Path(gan)
    kind, generator_path = resolve_generator(gan, backend)
    if kind == "torch":
        generator_path, payload = load_generator_payload(generator_path)
        info = payload
    else:
        onnx = OnnxGenerator(generator_path, requested_providers(device))  # checks the sha256
        info = onnx.sidecar
    calibration = info["calibration"]
    if config is None:
        calibrated = ("smooth_sigma", "healthy_percentile", "min_component", "grow_percentile")
        from_calibration = {"grow_percentile": None}  # a calibration from before hysteresis: off
        from_calibration.update({key: calibration[key] for key in calibrated if key in calibration})
        config = PseudoMaskConfig(**{**from_calibration, **(overrides or {})})
        check_config(config)
    _refuse_previous_output(out_dir, overwrite)
    cases = load_grid_cases(pre_dir)
    if not cases:
        raise UsageError(pre_dir, "no cases")
    scale = grids_hu_scale(pre_dir, generator_path, info)  # the [0, 1] scale of the grids
    if kind == "torch":
        torch_device = resolve_device(device)
        model = to_device(generator_from_payload(payload), torch_device)
        crop = payload["train_config"].get("crop")
        inference_window = None if crop is None else tuple(int(v) for v in crop)
        backend_info = {"kind": "torch", "device": str(torch_device)}

        def generate(case: GridCase) -> np.ndarray:
            return run_generator(
                model, case.image, case.lungs > 0, torch_device, seed=0, window=inference_window
            )
    else:
        _onnx_grid_check(onnx, cases, pre_dir)
        backend_info = {"kind": "onnx", "providers": onnx.providers, "sha256": onnx.sidecar["sha256"]}

        def generate(case: GridCase) -> np.ndarray:  # inputs and noise on the host, ORT copies them
            return run_generator(
                onnx, case.image, case.lungs > 0, "cpu", seed=0, window=onnx.window, config=onnx.config
            )

    given = (threshold, grow_threshold)
    chosen = _thresholds(config, calibration, given, generator_path, generate, scale, out_dir)
    threshold = chosen["threshold"]
    thresholds = (threshold, chosen["grow_threshold"])
    refresher = None
    if teacher is not None:
        refresher = _Teacher.open(Path(teacher), cases, scale, device, teacher_budget_percent)
        healthy = [c for c in cases if c.group == "healthy"]
        generate = _kept_for_a_second_call(generate, {c.case_id for c in healthy})
        refresher.calibrate(healthy, generate, config, thresholds, pre_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(out_dir, STAGE_LOCK, "covidseg make-masks"):
        _refuse_previous_output(out_dir, overwrite)  # again: another run may have finished meanwhile
        (out_dir / "manifest.json").unlink(missing_ok=True)
        outcome = _mask_cases(
            out_dir, cases, generate, config, thresholds, scale, native, progress, refresher
        )
        _write_slices(out_dir, outcome)
        manifest = _manifest(
            out_dir, pre_dir, generator_path, backend_info, threshold, config, cases, scale, outcome
        )
        manifest.update(chosen)
        manifest["teacher"] = refresher.record(outcome.records, out_dir) if refresher else None
        write_json(out_dir / "manifest.json", manifest)
    return manifest


def _kept_for_a_second_call(generate, case_ids: set[str]):
    """`generate` that keeps its output for the cases `case_ids` after the first call and hands it
    out on the second (then forgets it): the teacher's calibration and the masks share one
    generator pass over the healthy cases (the generator is deterministic, so nothing changes). The
    kept volumes are float32 grids: 2 MB per case at the default 32x128x128."""
    kept: dict[str, np.ndarray] = {}

    def generate_once(case: GridCase) -> np.ndarray:
        if case.case_id in kept:
            return kept.pop(case.case_id)
        pseudo = generate(case)
        if case.case_id in case_ids:
            kept[case.case_id] = pseudo
        return pseudo

    return generate_once


@dataclass
class _Teacher:
    """A trained segmenter that refreshes the pseudo-masks (self-training) and the threshold chosen
    for it (:func:`~covidseg.method.pseudo_masks.healthy_probability_threshold`)."""

    path: Path  # the model file
    sha256: str
    run: object  # TorchRunner | OnnxRunner: [N, 1, H, W] slices -> logits
    budget_percent: float  # the healthy lung (%) the refreshed masks may flag
    threshold: float | None = None
    healthy_flagged: tuple[float, float] | None = None  # % of healthy lung, before and after

    @classmethod
    def open(cls, path: Path, cases: list[GridCase], scale: HuScale, device: str, budget: float) -> _Teacher:
        """Open `path` (train-seg folder, .pt or .onnx); a model made for other grids (HU window or
        slice size) is refused."""
        model = open_seg_model(path)
        grid_slices = {tuple(c.image.shape[1:]) for c in cases}
        if tuple(model.spec.hu_window) != scale.window or grid_slices != {tuple(model.spec.slice_size)}:
            raise UsageError(
                model.path,
                f"a teacher must be trained on grids like these: it takes {_sizes([model.spec.slice_size])} "
                f"slices of window {list(model.spec.hu_window)} HU, the grids have {_sizes(grid_slices)} "
                f"slices of {list(scale.window)} HU",
            )
        if model.kind == "torch":
            run = TorchRunner(model.torch_model(), device)
        else:
            run = OnnxRunner(str(model.path), device)
        return cls(model.path, model.info["sha256"], run, budget)

    def probabilities(self, case: GridCase, batch: int = 32) -> np.ndarray:
        """The teacher's lesion probabilities on every slice of the case's grid ([z, y, x] float32)."""
        image = case.image
        logits = np.concatenate(
            [self.run(image[i : i + batch, None])[:, 0] for i in range(0, len(image), batch)]
        )
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)

    def calibrate(self, healthy: list[GridCase], generate, config, thresholds: tuple, pre_dir: Path) -> None:
        """Choose the threshold on the healthy cases' pseudo-masks and the teacher's probabilities."""
        if not healthy:
            raise UsageError(pre_dir, "--teacher needs healthy cases here to choose the teacher's threshold")
        masks = []
        for case in healthy:
            diff = difference_map(case.image, generate(case), case.lungs, config.smooth_sigma)
            masks.append(refined_mask(diff, case.lungs, thresholds[0], config.min_component, thresholds[1]))
        lungs = [case.lungs for case in healthy]
        chosen = healthy_probability_threshold(
            masks, [self.probabilities(c) for c in healthy], lungs, self.budget_percent
        )
        if chosen is None:
            raise UsageError(
                self.path,
                f"even its most confident voxels (p >= 0.95) flag more than {self.budget_percent:g} % of the "
                "healthy cases' lung: not used as a teacher",
            )
        before = (
            100.0 * sum(int(m.sum()) for m in masks) / max(sum(int((lung > 0).sum()) for lung in lungs), 1)
        )
        self.threshold, self.healthy_flagged = chosen[0], (before, chosen[1])

    def record(self, case_records: list[dict], out_dir: Path) -> dict:
        """The manifest's ``teacher`` entry: the model, its threshold, the healthy lung flagged before
        and after, and the share of the COVID cases' pseudo-mask voxels the teacher added."""
        covid = [r for r in case_records if r["group"] == "covid"]
        added = sum(r["teacher_added_voxels"] for r in covid)
        before = sum(r["pseudo_voxels"] - r["teacher_added_voxels"] for r in covid)
        return {
            "model": portable_path(self.path, out_dir),
            "sha256": self.sha256,
            "threshold": self.threshold,
            "budget_percent": self.budget_percent,
            "healthy_flagged_percent": list(self.healthy_flagged),
            "added_percent_of_masks": 100.0 * added / max(before, 1),
        }


def _thresholds(
    config: PseudoMaskConfig, calibration: Mapping, given: tuple[float | None, float | None],
    generator_path: Path, generate, scale: HuScale, out_dir: Path,
) -> dict:  # fmt: skip
    """The binary threshold and the lower hysteresis one (unit scale; None when
    ``config.grow_percentile`` is None; never above the main one) with where each came from, as the
    manifest records them (``threshold_source``, ``grow_threshold_source``): ``given`` (`given`, the
    command's values), ``calibration`` (train-gan calibrated it at the configured percentile) or
    ``calibrated on N healthy grids of PATH``: calibrated here on the healthy training grids, as
    train-gan would have (PATH: the preprocess folder named by the train-gan manifest.json beside
    `generator_path`, stored as :func:`portable_path` writes it for `out_dir`; its difference maps are
    made once, and only when a threshold is calibrated here)."""

    @functools.cache
    def healthy_maps(train_pre: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Difference maps and lungs of the healthy grids of `train_pre` (made on the first call)."""
        healthy = load_grid_cases(train_pre, groups=("healthy",))
        if not healthy:
            raise UsageError(train_pre, "no healthy cases to calibrate a threshold on")
        diffs = [difference_map(c.image, generate(c), c.lungs, config.smooth_sigma) for c in healthy]
        return diffs, [c.lungs for c in healthy]

    def recalibrated(percentile: float) -> tuple[float, str]:
        train_pre = _training_grids(generator_path, percentile)
        diffs, lungs = healthy_maps(train_pre)
        value = calibrate_threshold(diffs, lungs, config, scale, percentile=percentile)
        return value, f"calibrated on {len(diffs)} healthy grids of {portable_path(train_pre, out_dir)}"

    def resolve(value: float | None, percentile: float, key: str, percentile_key: str) -> tuple[float, str]:
        if value is not None:
            return float(value), "given"
        if calibration.get(percentile_key) == percentile and key in calibration:
            return float(calibration[key]), "calibration"
        return recalibrated(percentile)

    threshold, source = resolve(given[0], config.healthy_percentile, "threshold", "healthy_percentile")
    out = {
        "threshold": threshold,
        "threshold_source": source,
        "grow_threshold": None,
        "grow_threshold_source": None,
    }
    if config.grow_percentile is not None:
        low, low_source = resolve(given[1], config.grow_percentile, "grow_threshold", "grow_percentile")
        out.update(grow_threshold=min(low, threshold), grow_threshold_source=low_source)
    return out


def _training_grids(generator_path: Path, percentile: float) -> Path:  # percentile: for the message
    """The preprocess folder the generator was trained on, from the train-gan manifest beside it."""
    manifest_path = generator_path.parent / "manifest.json"
    try:
        stored = read_manifest(generator_path.parent, "covidseg.gan")["preprocess"]
        return stored_path(generator_path.parent, stored)
    except (CovidsegError, KeyError, TypeError):
        raise UsageError(
            manifest_path,
            f"the generator's calibration has no threshold for percentile {percentile:g} and no "
            "train-gan manifest beside it names its training grids to calibrate one on",
        ) from None


def _refuse_previous_output(out_dir: Path, overwrite: bool) -> None:
    if (out_dir / "manifest.json").exists() and not overwrite:
        raise UsageError(out_dir, "holds a previous make-masks output; pass --overwrite to replace it")


@dataclass
class _Outcome:
    """What make-masks made of the cases: per-slice stacks (images, lungs, soft, binary, refs),
    the slice index rows, the case records and failures."""

    has_refs: bool  # every COVID case has a reference (phantoms); healthy ones are empty by definition
    stacks: dict[str, list[np.ndarray]] = field(
        default_factory=lambda: {"images": [], "lungs": [], "soft": [], "binary": [], "refs": []}
    )
    index_rows: list[list] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)


def _sizes(sizes) -> str:
    """'128x128' (several: comma-separated, sorted) for slice sizes (H, W)."""
    return ", ".join(f"{h}x{w}" for h, w in sorted(tuple(size) for size in sizes))


def _mask_cases(
    out_dir: Path, cases, generate, config, thresholds: tuple, scale: HuScale, native: bool, progress,
    teacher: _Teacher | None = None,
) -> _Outcome:  # fmt: skip
    """Pseudo-healthy volume, difference map and pseudo-mask of every case (grids on the HU `scale`;
    `thresholds`: the main one and the hysteresis one or None, unit scale; refreshed by `teacher`
    when given), written per case (with native NIfTI outputs when `native`); a case that fails is
    recorded and the others go on."""
    outcome = _Outcome(has_refs=all(c.ref is not None for c in cases if c.group == "covid"))
    for case in cases:
        start = time.perf_counter()
        try:
            pseudo = generate(case)
            diff = difference_map(case.image, pseudo, case.lungs, config.smooth_sigma)
            binary = refined_mask(diff, case.lungs, thresholds[0], config.min_component, thresholds[1])
            soft = soft_mask(diff, scale)
            before = int(binary.sum())
            if teacher is not None:
                probability = teacher.probabilities(case)
                binary, soft = with_teacher(binary, soft, probability, case.lungs, teacher.threshold)
            files = _write_case(out_dir, case, pseudo, binary, soft, scale if native else None)
        except CovidsegError as exc:
            outcome.failures.append({"id": case.case_id, "error": str(exc)})
            if progress:
                progress(len(outcome.records) + len(outcome.failures), len(cases), f"{case.case_id}: failed")
            continue
        _add_slices(outcome, case, binary, soft, config)
        lung_voxels = int((case.lungs > 0).sum())
        outcome.records.append(
            {
                "id": case.case_id,
                "group": case.group,
                "pseudo_lesion_percent_of_lung": round(100.0 * float(binary.sum()) / max(lung_voxels, 1), 3),
                "pseudo_voxels": int(binary.sum()),
                **({"teacher_added_voxels": int(binary.sum()) - before} if teacher is not None else {}),
                "files": files,
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
        if progress:
            percent = outcome.records[-1]["pseudo_lesion_percent_of_lung"]
            done = len(outcome.records) + len(outcome.failures)
            progress(done, len(cases), f"{case.case_id}: {percent:.1f} % of lung")
    return outcome


def _add_slices(outcome: _Outcome, case: GridCase, binary: np.ndarray, soft: np.ndarray, config) -> None:
    """The high/low/mid-infected slices of one case into the slice stacks and the index."""
    stacks, rows = outcome.stacks, outcome.index_rows
    for z, kind, fraction in split_slices(binary, case.lungs, config):
        rows.append([len(rows), case.case_id, case.group, z, kind, round(fraction, 5)])
        stacks["images"].append(case.image[z])
        stacks["lungs"].append(case.lungs[z])
        stacks["soft"].append(soft[z])
        stacks["binary"].append(binary[z].astype(np.uint8))
        if outcome.has_refs:
            stacks["refs"].append(case.ref[z] if case.ref is not None else np.zeros_like(case.lungs[z]))


def _write_slices(out_dir: Path, outcome: _Outcome) -> None:
    """slices/<name>.npy stacks and slices/index.csv."""
    for name, arrays in outcome.stacks.items():
        if arrays:
            save_npy(out_dir / "slices" / f"{name}.npy", np.stack(arrays))
    columns = ["n", "case_id", "group", "z", "set", "lesion_fraction"]
    write_csv(out_dir / "slices" / "index.csv", columns, outcome.index_rows)


def _manifest(
    out_dir: Path, pre_dir: Path, generator_path: Path, backend_info: dict, threshold: float, config, cases,
    scale: HuScale, outcome: _Outcome,
) -> dict:  # fmt: skip
    """make-masks' manifest.json. Paths are relative to `out_dir` (absolute outside the work folder);
    `preprocess_config` and `slab_mm` are what train-seg needs of the preprocess folder, so that it
    reads only this folder."""
    index_rows = outcome.index_rows
    sets = [row[4] for row in index_rows]
    return {
        "format": "covidseg.masks",
        "version": 1,
        "covidseg_version": __version__,
        "preprocess": portable_path(pre_dir, out_dir),
        "generator": portable_path(generator_path, out_dir),
        "backend": backend_info,
        "threshold": threshold,
        "soft_scale": scale.unit_of_hu_difference(SOFT_SCALE_HU),  # [0, 1] scale
        "soft_scale_hu": SOFT_SCALE_HU,
        "config": asdict(replace(config)),
        "grid": list(cases[0].image.shape),
        "hu_window": scale.to_json(),
        "preprocess_config": read_manifest(pre_dir, "covidseg.preprocess")["config"],
        "slab_mm": median_slab_mm([case.record for case in cases], pre_dir / "manifest.json"),
        "slices": {
            "n": len(index_rows),
            "high": sets.count("high"),
            "low": sets.count("low"),
            "mid": sets.count("mid"),
            "has_refs": outcome.has_refs and bool(index_rows),
        },
        "cases": outcome.records,
        "failed": outcome.failures,
    }

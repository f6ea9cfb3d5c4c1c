"""`covidseg predict`: lesion masks and a clinical read-out for every CT in files and folders.

Per case, in the output folder::

    <id>.nii.gz               lesion mask (uint8 0/1), the input's exact size, spacing, origin, direction
    <id>_probability.nii.gz   lesion probability (float32), with --probabilities
    <id>.png                  overlay montage, with --snapshots: the axial slices with the largest
                              lesion area inside the lungs (not neighbours), filled up with slices
                              spread over the lungs, and a coronal view; lesions red, lungs outlined
    <id>.json                 read-out: lesion/lung mL, % of lung involved (per lung too), CT-0..CT-4;
                              written last: a case whose JSON exists is complete; no patient data
                              from DICOM headers unless asked (--keep-metadata: "dicom")

and for the batch ``summary.csv`` (one row per case) and ``report.json`` (versions, model,
backend and the provider that really ran, per-case timings, outputs, severity and warnings,
failures).

``<id>.json`` of a finished case::

    case_id, status ("ok"), source, series_uid, note
    lesion_ml, lung_ml, involvement_pct   both lungs (mL, mL, % of lung)
    severity                              "CT-0".."CT-4", or null: not graded (see warnings)
    warnings                              list of one-line reasons, [] for most cases; today only
                                          an implausible lung volume (see covidseg.imaging.readout:
                                          under MIN_LUNG_ML for whole lungs in view, over
                                          MAX_LUNG_ML for any scan), which leaves the case
                                          not graded; the case still counts as done (exit 0)
    right, left                           {lesion_ml, lung_ml, involvement_pct} per lung
    geometry, lung_box_zyx, network_slices, threshold, outputs, seconds (read_wait, compute,
    write, total), covidseg_version, model_sha256, [dicom with --keep-metadata]

``summary.csv`` has the columns of :data:`SUMMARY_COLUMNS`; ``severity`` is "not graded" where the
JSON has null, ``warnings`` joins the case's warnings with "; " (empty for none), and a failed case
fills only ``case_id, status, source, error``.

The model is loaded once; the next case is read in a background thread while the current one is
computed (SimpleITK releases the GIL while reading). A failing case is reported and the batch goes
on, leaving no file of its own; the exit code is 1 when any case failed. A case with warnings is
not a failure. Ctrl-C stops the batch (exit 130) and removes the current case's files.

Safety rules, all checked before the model is loaded: no output may be an input file (same path,
symbolic or hard link), no two outputs may share a name (``report`` and ``summary`` are reserved
case ids), and only one run at a time writes a folder (or one part of a sharded batch: the lock
``.covidseg-predict[.part-K-of-N].lock``). Case ids whose file names would pass 255 bytes are
shortened to a start and a hash of the whole id (:func:`output_stem`). ``summary.csv`` and
``report.json`` keep the finished cases of earlier batches in the folder (found in the previous
summary); a folder holds the results of one model: ``--continue`` refuses a case predicted with
another model (or other preprocessing) and asks for ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidseg import __version__
from covidseg.config import PredictOptions
from covidseg.errors import CovidsegError, InputError, UsageError
from covidseg.imaging.display_lungs import segment_input_lungs
from covidseg.imaging.readout import NOT_GRADED, read_out
from covidseg.inference.ct_segment import MIN_LESION_HU, segment_ct
from covidseg.inference.model_files import SegModelFile, open_seg_model
from covidseg.inference.model_home import resolve_model
from covidseg.inference.runners import OnnxRunner, TorchRunner
from covidseg.io import CTVolume, find_cases, read_ct, write_array
from covidseg.io.atomic import NAME_MAX, folder_lock, remove_stale_temps, shortened, write_csv, write_json
from covidseg.io.dicom_seg import (
    LESION_LABEL,
    LUNGS_LABEL,
    SEG_SUFFIX,
    SegSegment,
    read_source_headers,
    write_dicom_seg,
)
from covidseg.progress import Progress
from covidseg.stages._workdir import check_output_dir, portable_path
from covidseg.versions import software_versions

SUMMARY_COLUMNS = [
    "case_id", "status", "lesion_ml", "lung_ml", "involvement_pct", "right_involvement_pct",
    "left_involvement_pct", "severity", "warnings", "seconds", "source", "error",
]  # fmt: skip
#: The longest suffix a case's file name gets; case ids are shortened to fit NAME_MAX with it.
LONGEST_OUTPUT_SUFFIX = "_probability.nii.gz"
#: Case ids that would take the batch's own file names (or those of a sharded batch's parts).
RESERVED_CASE_IDS = re.compile(r"(report|summary)(\.part-\d+-of-\d+)?", re.IGNORECASE)


@dataclass
class PredictResult:
    report: dict
    failures: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # "<case id>: <warning>", in case order
    notes: list[str] = field(default_factory=list)  # "<case id>: <note of the reader>", in case order
    kept: list[str] = field(default_factory=list)  # finished cases of earlier batches, in the summary


def output_stem(case_id: str) -> str:
    """The start of a case's file names: the case id, or, when a file name would pass NAME_MAX
    bytes, its start + '~' + 10 hex digits of the sha256 of the whole id (deterministic, unique)."""
    return shortened(case_id, NAME_MAX - len(LONGEST_OUTPUT_SUFFIX.encode()), digits=10)


def case_outputs(out_dir: Path, case_id: str, options: PredictOptions) -> dict[str, Path]:
    """The files one case writes (the JSON last)."""
    stem = output_stem(case_id)
    files = {}
    if options.writes_nifti:
        files["mask"] = out_dir / f"{stem}.nii.gz"
    if options.probabilities:
        files["probability"] = out_dir / f"{stem}_probability.nii.gz"
    if options.writes_seg:
        files["seg"] = out_dir / f"{stem}{SEG_SUFFIX}"
    if options.snapshots:
        files["snapshot"] = out_dir / f"{stem}.png"
    files["json"] = out_dir / f"{stem}.json"
    return files


def batch_files(options: PredictOptions) -> list[str]:
    """The names of the files the batch itself writes (the last one is its lock)."""
    suffix = options.part_suffix
    return [f"summary{suffix}.csv", f"report{suffix}.json", f".covidseg-predict{suffix}.lock"]


def _ok_record(path: Path) -> dict | None:
    """The JSON record in `path` when it is readable and says ``status: ok``, else None."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("status") == "ok" else None


def completed_record(out_dir: Path, case_id: str, options: PredictOptions) -> dict | None:
    """The JSON record of a case whose outputs are all there, else None."""
    files = case_outputs(out_dir, case_id, options)
    record = _ok_record(files["json"])
    return record if record is not None and all(path.is_file() for path in files.values()) else None


def finished_record(out_dir: Path, case_id: str) -> dict | None:
    """The JSON record of a case of any earlier batch (whatever its options) whose files, as its
    JSON lists them, are all there; else None."""
    record = _ok_record(out_dir / f"{output_stem(case_id)}.json")
    if record is None or record.get("case_id") != case_id:
        return None
    outputs = record.get("outputs")
    if not isinstance(outputs, dict) or not all(
        isinstance(name, str) and (out_dir / name).is_file() for name in outputs.values()
    ):
        return None
    return record


def collect_cases(inputs: list[Path], out_dir: Path, allow_2d: bool = False) -> list[tuple[str, Path]]:
    """(case id, path) of every CT under `inputs`, skipping anything inside `out_dir`."""
    if not inputs:
        raise UsageError(None, "give at least one input file or folder")
    out_resolved = out_dir.resolve()
    cases: dict[str, Path] = {}
    for root in inputs:
        if not root.exists():
            raise UsageError(root, "input does not exist")
        if root.resolve() == out_resolved:
            raise UsageError(out_dir, "the output folder is an input folder; choose another")
        try:
            found = find_cases(root, allow_2d=allow_2d, exclude=out_dir)
        except InputError as exc:  # two inputs of one folder with one case id
            raise UsageError(exc.path, f"{exc.cause}: rename one of them") from None
        for case_id, path in found:
            resolved = path.resolve()
            if case_id in cases and cases[case_id].resolve() != resolved:
                raise UsageError(
                    path, f"case id {case_id!r} is also used by {cases[case_id]}: rename one of them"
                )
            cases[case_id] = path
    if not cases:
        raise UsageError(inputs[0] if len(inputs) == 1 else None, "no CT found in the inputs")
    return sorted(cases.items())


def make_runner(seg: SegModelFile, backend: str, device: str, threads: int = 0, tensorrt: bool = False):
    """The torch or ONNX Runtime runner for `seg` (`backend` auto: as the file is); `tensorrt`
    asks ONNX Runtime for TensorRT before CUDA."""
    if backend not in ("auto", "onnx", "torch"):
        raise UsageError(None, f"--backend must be auto, onnx or torch, got {backend!r}")
    kind = seg.kind if backend == "auto" else backend
    if kind == "onnx":
        if seg.kind != "onnx":
            raise UsageError(seg.path, "--backend onnx needs an .onnx model (make one with covidseg export)")
        return OnnxRunner(str(seg.path), device, tensorrt=tensorrt, threads=threads)
    return TorchRunner(seg.torch_model(), device)


def _input_files(cases: list[tuple[str, Path]]) -> dict[tuple[int, int], Path]:
    """(device, inode) -> path of every input file: the case files and the files of the DICOM
    series folders (symbolic links followed, so links and hard links of an input are found)."""
    files: dict[tuple[int, int], Path] = {}
    for _, path in cases:
        paths = [p for p in path.iterdir()] if path.is_dir() else [path]
        for item in paths:
            with contextlib.suppress(OSError):
                stat = item.stat()
                files[(stat.st_dev, stat.st_ino)] = item
    return files


def check_outputs_spare_inputs(cases: list[tuple[str, Path]], out_dir: Path, options: PredictOptions) -> None:
    """Refuse (UsageError) when any output of the batch is an input file under any name."""
    if not out_dir.is_dir():
        return
    inputs = _input_files(cases)
    outputs = [p for case_id, _ in cases for p in case_outputs(out_dir, case_id, options).values()]
    for output in [*outputs, *(out_dir / name for name in batch_files(options))]:
        try:
            stat = output.stat()
        except OSError:
            continue
        source = inputs.get((stat.st_dev, stat.st_ino))
        if source is not None:
            raise UsageError(
                output, f"this output would replace the input {source}; choose another output folder"
            )


def check_name_clashes(cases: list[tuple[str, Path]], options: PredictOptions) -> None:
    """Refuse (UsageError) case ids that would write one file twice: a reserved id (``report``,
    ``summary``, with or without a part suffix), or two cases with one output name (``a`` and
    ``a_probability`` with --probabilities)."""
    owners: dict[str, Path] = {}
    for case_id, path in cases:
        if RESERVED_CASE_IDS.fullmatch(case_id):
            raise UsageError(
                path, f"case id {case_id!r} is taken by the batch's summary and report; rename it"
            )
        for output in case_outputs(Path(), case_id, options).values():
            other = owners.setdefault(output.name, path)
            if other != path:
                raise UsageError(
                    path, f"its output {output.name} is also an output of {other}; rename one of them"
                )


def check_seg_inputs(cases: list[tuple[str, Path]], options: PredictOptions) -> None:
    """With --format dicom-seg or both every case must be a DICOM series (a folder): a SEG refers
    to the source's instances. A file input is a UsageError naming it."""
    if not options.writes_seg:
        return
    for _, path in cases:
        if not Path(path).is_dir():
            cause = "not a DICOM series: --format dicom-seg needs DICOM series folders (use --format nifti)"
            raise UsageError(path, cause)


def _model_identity(record: dict) -> dict:
    """What makes two predictions of one case comparable: model file, threshold, preprocessing."""
    keys = ("model_sha256", "threshold", "preprocessing")
    return {k: record[k] for k in keys if k in record}


def _identity_of(seg: SegModelFile) -> dict:
    return {
        "model_sha256": seg.info["sha256"],
        "threshold": seg.spec.threshold,
        "preprocessing": seg.spec.to_json(),
    }


def _same_model(record: dict, seg: SegModelFile) -> bool:
    """Whether `seg` made `record` (as far as the record tells: old records lack preprocessing)."""
    mine = _identity_of(seg)
    return all(mine[k] == v for k, v in _model_identity(record).items())


def _check_same_model(record: dict, seg: SegModelFile, advice: str) -> None:
    """Refuse (UsageError) a finished case predicted with another model or other settings."""
    if _same_model(record, seg):
        return
    mine, theirs = _identity_of(seg), _model_identity(record)
    old, new = str(theirs.get("model_sha256"))[:12], str(mine["model_sha256"])[:12]
    what = f"model {old}…, this run uses {new}…" if old != new else f"model {old}… with other settings"
    raise UsageError(None, f"case {record['case_id']!r} was predicted with {what}: {advice}")


def _reader(cases: list[tuple[str, Path]], options: PredictOptions) -> Iterator[tuple[str, Path, Future]]:
    """Yield (id, path, future of read_ct) with the next case already being read. When the
    consumer stops early (an interrupt), reads not yet started are cancelled."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="covidseg-read")

    def submit(i: int) -> Future:
        _, path = cases[i]
        return pool.submit(read_ct, path, options.series, options.intensity, options.keep_metadata)

    try:
        pending = submit(0) if cases else None
        for i, (case_id, path) in enumerate(cases):
            current = pending
            pending = submit(i + 1) if i + 1 < len(cases) else None
            yield case_id, path, current
            current = None  # let the volume go before the next one is read
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_images(
    files: dict[str, Path], result, volume: CTVolume, case_id: str, readout: dict, options: PredictOptions,
    seg_source: tuple,
) -> None:  # fmt: skip
    """The mask (NIfTI and/or DICOM SEG; and probability map, snapshot) of one case, native
    geometry, each file atomic; `seg_source`: (the series' headers for the SEG, the model's sha256)."""
    lesion = volume.orientation.to_native(result.full(result.lesion.astype(np.uint8)))
    if "mask" in files:
        write_array(files["mask"], lesion, volume.geometry)
    if "seg" in files:
        _write_seg(files["seg"], lesion, result, volume, readout, options.seg_lungs, seg_source)
    del lesion
    if options.probabilities:
        probability = result.full(result.probability, dtype=np.float32)
        write_array(files["probability"], volume.orientation.to_native(probability), volume.geometry)
        del probability
    if options.snapshots:
        from covidseg.reporting.plots import overlay_montage

        box = result.box.slices
        grade = readout["severity"] or NOT_GRADED
        headline = f"{case_id}: {readout['involvement_pct']:.1f} % of lung, {grade}"
        title = "\n".join([headline, *readout["warnings"]])
        overlay_montage(
            volume.hu[box], result.lesion, result.lungs, files["snapshot"], title=title,
            spacing_zyx=volume.spacing_zyx,
        )  # fmt: skip


def _write_seg(
    path: Path, lesion: np.ndarray, result, volume: CTVolume, readout: dict, lungs: bool, source: tuple
) -> None:
    """The case's DICOM SEG over its source series: the lesion segment (native slice order, as
    `lesion`), the lungs with --seg-lungs; the read-out in the series description."""
    segments = [SegSegment(LESION_LABEL, lesion)]
    if lungs:
        lung_mask = volume.orientation.to_native(result.full(result.lungs.astype(np.uint8)))
        segments.append(SegSegment(LUNGS_LABEL, lung_mask))
    grade = readout["severity"] or NOT_GRADED
    description = f"covidseg {readout['lesion_ml']:.1f} mL {readout['involvement_pct']:.1f}% {grade}"
    headers, model_sha256 = source
    version = f"{__version__} model {model_sha256[:12]}"
    write_dicom_seg(path, headers, segments, description, version)


def predict_volume(
    case_id: str,
    volume: CTVolume,
    note: str | None,
    runner,
    seg: SegModelFile,
    out_dir: Path,
    options: PredictOptions,
) -> dict:
    """Segment one CT and write its outputs (the JSON last); return its record."""
    started = time.perf_counter()
    seg_headers = read_source_headers(volume.dicom_files) if options.writes_seg else None
    lungs = segment_input_lungs(volume.hu, volume.spacing_zyx, seg.spec.lungs, options.intensity)
    min_hu = None if options.intensity is not None else MIN_LESION_HU  # mapped values are not HU
    result = segment_ct(
        volume.hu, volume.spacing_zyx, runner, seg.spec, options.batch_size, options.probabilities, lungs,
        min_hu,
    )  # fmt: skip
    if result is None:
        raise InputError(volume.source, "no lungs found (is this a chest CT, and in HU?)")
    box = result.box
    readout = read_out(
        result.lesion, result.lungs, volume.geometry.voxel_volume_ml,
        offset_zyx=(box.z0, box.y0, box.x0), scan_shape=result.canonical_shape,
    )  # fmt: skip
    compute_s = time.perf_counter() - started

    started = time.perf_counter()
    files = case_outputs(out_dir, case_id, options)
    files["json"].unlink(missing_ok=True)  # the completion marker goes first and comes back last
    try:  # whatever fails from the first file on (Ctrl-C too) leaves no file of the case
        _write_images(files, result, volume, case_id, readout, options, (seg_headers, seg.info["sha256"]))
        record = {
            "case_id": case_id,
            "status": "ok",
            "source": volume.source,
            "series_uid": volume.series_uid,
            "note": note,
            **readout,
            "geometry": volume.geometry.to_json(),
            "lung_box_zyx": result.box.to_json(),
            "network_slices": result.n_slices,
            "threshold": seg.spec.threshold,
            "lung_mask": "display" if options.intensity and options.intensity.is_display else "ct",
            "preprocessing": seg.spec.to_json(),
            "outputs": {k: p.name for k, p in files.items()},
            "seconds": {"compute": round(compute_s, 3), "write": round(time.perf_counter() - started, 3)},
            "covidseg_version": __version__,
            "model_sha256": seg.info["sha256"],
        }
        if options.keep_metadata:  # asked for: patient identifiers (None for a non-DICOM input)
            record["dicom"] = volume.dicom
        write_json(files["json"], record)
    except BaseException:
        for path in files.values():
            path.unlink(missing_ok=True)
        raise
    return record


def _summary_row(record: dict) -> dict:
    if record.get("status") != "ok":
        return {k: record.get(k, "") for k in ("case_id", "status", "source", "error")}
    return {
        "case_id": record["case_id"],
        "status": "ok",
        "lesion_ml": record["lesion_ml"],
        "lung_ml": record["lung_ml"],
        "involvement_pct": record["involvement_pct"],
        "right_involvement_pct": record["right"]["involvement_pct"],
        "left_involvement_pct": record["left"]["involvement_pct"],
        "severity": record["severity"] or NOT_GRADED,
        "warnings": "; ".join(record.get("warnings") or []),
        "seconds": record.get("seconds", {}).get("total", ""),
        "source": record["source"],
        "error": "",
    }


def select_part(cases: list[tuple[str, Path]], num_parts: int, part_id: int) -> list[tuple[str, Path]]:
    """Every `num_parts`-th case starting at `part_id`, in the sorted case order: the parts of
    one batch are disjoint and together hold every case, whatever machine computes them."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise UsageError(None, f"--part-id must be in 0..{num_parts - 1} and --num-parts >= 1")
    return cases[part_id::num_parts]


def write_summary(out_dir: Path, records: list[dict], name: str = "summary.csv") -> None:
    """summary.csv: one row per case, in case order."""
    write_csv(out_dir / name, SUMMARY_COLUMNS, (_summary_row(r) for r in records))


def _check_existing(out_dir: Path, cases: list[tuple[str, Path]], options: PredictOptions) -> None:
    if options.resume or options.overwrite or not out_dir.is_dir():
        return
    taken = [cid for cid, _ in cases if any(p.exists() for p in case_outputs(out_dir, cid, options).values())]
    if taken:
        raise UsageError(
            out_dir,
            f"already holds outputs for {len(taken)} case(s) (e.g. {taken[0]}); "
            "pass --continue to skip finished cases or --overwrite to redo them",
        )


def _earlier_cases(out_dir: Path, cases: list[tuple[str, Path]], options: PredictOptions, seg) -> list[dict]:
    """The finished cases of earlier batches that this one keeps in its summary and report: those
    the previous summary lists, not in this batch, whose files are all still there and that the
    same model made. A case of another model is refused (UsageError) unless --overwrite, which
    leaves it out (its files stay)."""
    path = out_dir / f"summary{options.part_suffix}.csv"
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            listed = [row.get("case_id") for row in csv.DictReader(fh)]
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        if options.overwrite:
            return []
        raise UsageError(
            path, f"unreadable previous summary ({exc}); pass --overwrite to replace it"
        ) from None
    ours = {case_id for case_id, _ in cases}
    kept = []
    for case_id in dict.fromkeys(c for c in listed if isinstance(c, str) and c not in ours):
        record = finished_record(out_dir, case_id)
        if record is None:
            continue
        if not options.overwrite:
            advice = "pass --overwrite to leave it out of this summary, or choose another output folder"
            _check_same_model(record, seg, f"{advice} (it is in {path.name} of an earlier batch)")
        elif not _same_model(record, seg):
            continue
        kept.append(record)
    return kept


class _Interrupts:
    """Ctrl-C for the batch: KeyboardInterrupt as usual, and a flag the batch loop checks between
    cases, so an interrupt that lands in a finalizer (where Python only prints "Exception ignored")
    still stops the batch."""

    def __init__(self) -> None:
        self.seen = False

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def watch(self) -> Iterator[_Interrupts]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame) -> None:
            self.seen = True
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def predict_inputs(
    inputs: list[Path],
    out_dir: Path,
    model: str | None = None,
    backend: str = "auto",
    device: str = "auto",
    options: PredictOptions | None = None,
    progress: Progress | None = None,
    on_runner: Callable[[object], None] | None = None,
) -> PredictResult:
    """`covidseg predict`: :func:`run_predict` on the CTs under the files and folders `inputs`
    (this job's part of them with ``options.num_parts``)."""
    options = options or PredictOptions()
    cases = collect_cases(list(inputs), Path(out_dir), allow_2d=options.intensity is not None)
    cases = select_part(cases, options.num_parts, options.part_id)
    return run_predict(cases, out_dir, model, backend, device, options, progress, on_runner)


def run_predict(
    cases: list[tuple[str, Path]],
    out_dir: Path,
    model: str | None = None,
    backend: str = "auto",
    device: str = "auto",
    options: PredictOptions | None = None,
    progress: Progress | None = None,
    on_runner: Callable[[object], None] | None = None,
) -> PredictResult:
    """Predict every case of `cases` (from :func:`collect_cases`); failing cases are recorded and
    the others go on. `progress` gets (cases done, cases, "<case id>: done|failed|already done")
    per case, `on_runner` the runner once loaded.

    Before the model is loaded: the output folder must be usable, no output may be an input, no
    two outputs may share a name, and a DICOM SEG is asked only of DICOM series. The folder is
    locked for the run (UsageError if another run holds it)."""
    options = options or PredictOptions()
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    check_name_clashes(cases, options)
    check_seg_inputs(cases, options)
    check_outputs_spare_inputs(cases, out_dir, options)
    lock_name = batch_files(options)[-1]
    with contextlib.ExitStack() as stack:
        if out_dir.is_dir():  # lock before reading its state; a new folder is locked once made
            stack.enter_context(folder_lock(out_dir, lock_name, "covidseg predict"))
        _check_existing(out_dir, cases, options)
        seg = open_seg_model(resolve_model(model))
        runner = make_runner(seg, backend, device, tensorrt=options.tensorrt)
        if not out_dir.is_dir():
            out_dir.mkdir(parents=True, exist_ok=True)
            stack.enter_context(folder_lock(out_dir, lock_name, "covidseg predict"))
            _check_existing(out_dir, cases, options)  # another run may have made it meanwhile
        with _Interrupts().watch() as interrupts:
            return _run_batch(cases, out_dir, seg, runner, options, progress, on_runner, interrupts)


def _run_batch(cases, out_dir: Path, seg, runner, options: PredictOptions, progress, on_runner, interrupts):
    """The batch of :func:`run_predict` once the folder is locked and the model loaded."""
    records: list[dict] = []
    skipped: list[str] = []
    todo = []
    for case_id, path in cases:
        done = completed_record(out_dir, case_id, options) if options.resume else None
        if done is not None:
            _check_same_model(done, seg, "pass --overwrite to redo it")
            records.append(done)
            skipped.append(case_id)
        else:
            todo.append((case_id, path))
    kept = _earlier_cases(out_dir, cases, options, seg)
    if on_runner:
        on_runner(runner)
    if progress:
        for done, case_id in enumerate(skipped, start=1):
            progress(done, len(cases), f"{case_id}: already done")
    # a killed run may have left temporary files of the outputs this job now writes
    names = [p.name for case_id, _ in todo for p in case_outputs(out_dir, case_id, options).values()]
    remove_stale_temps(out_dir, [*names, *batch_files(options)[:2]])

    failures: list[dict] = []
    notes: list[str] = []
    batch_started = time.perf_counter()
    for case_id, path, future in _reader(todo, options):
        started = time.perf_counter()
        try:
            volume, note = future.result()
            read_s = time.perf_counter() - started
            record = predict_volume(case_id, volume, note, runner, seg, out_dir, options)
            del volume
            record["seconds"]["read_wait"] = round(read_s, 3)
            record["seconds"]["total"] = round(time.perf_counter() - started, 3)
            records.append(record)
            if note:
                notes.append(f"{case_id}: {note}")
        except CovidsegError as exc:
            failures.append({"case_id": case_id, "status": "failed", "source": str(path), "error": str(exc)})
        except Exception as exc:  # an unexpected bug in one case must not stop the batch (Ctrl-C does)
            error = f"{path}: unexpected error: {type(exc).__name__}: {exc}"
            failures.append({"case_id": case_id, "status": "failed", "source": str(path), "error": error})
        interrupts.check()
        if progress:
            failed = failures and failures[-1]["case_id"] == case_id
            progress(len(records) + len(failures), len(cases), f"{case_id}: {'failed' if failed else 'done'}")

    interrupts.check()
    all_records = sorted(records + failures + kept, key=lambda r: r["case_id"])
    suffix = options.part_suffix
    kept_ids = [r["case_id"] for r in kept]
    seconds = time.perf_counter() - batch_started
    try:
        write_summary(out_dir, all_records, f"summary{suffix}.csv")
        report = _report(seg, runner, cases, all_records, skipped, kept_ids, seconds)
        report["part"] = {"num_parts": options.num_parts, "part_id": options.part_id}
        report["model"]["path"] = portable_path(seg.path, out_dir)
        write_json(out_dir / f"report{suffix}.json", report)
    except CovidsegError as exc:  # a full disk: the caller still tells which cases failed
        exc.failures = failures
        raise
    ours = sorted(records + failures, key=lambda r: r["case_id"])
    warnings = [f"{r['case_id']}: {w}" for r in ours for w in r.get("warnings") or []]
    return PredictResult(
        report=report, failures=failures, skipped=skipped, warnings=warnings, notes=notes, kept=kept_ids
    )


def _report(
    seg: SegModelFile, runner, cases, records: list[dict], skipped: list[str], kept: list[str], seconds: float
) -> dict:
    done = [r for r in records if r.get("status") == "ok" and r["case_id"] not in {*skipped, *kept}]
    return {
        "format": "covidseg.predict-report",
        "version": 1,
        "covidseg_version": __version__,
        "versions": software_versions(("python", "torch", "onnxruntime", "SimpleITK")),
        "model": {"path": str(seg.path.resolve()), "kind": seg.kind, **seg.info},
        "preprocessing": seg.spec.to_json(),
        "backend": runner.backend,
        "runs_on": runner.description,
        "providers": getattr(runner, "providers", None),
        "warning": runner.warning,
        "cases": len(cases),
        "predicted": len(done),
        "skipped_complete": skipped,
        "kept_from_earlier_batches": kept,
        "failed": [r for r in records if r.get("status") != "ok"],
        "not_graded": [r["case_id"] for r in records if r.get("status") == "ok" and not r.get("severity")],
        "seconds": round(seconds, 3),
        "seconds_per_case": round(seconds / len(done), 3) if done else None,
        "results": [
            {
                "case_id": r["case_id"],
                "status": r["status"],
                "outputs": r.get("outputs"),
                "seconds": r.get("seconds"),
                "severity": r.get("severity"),
                "warnings": r.get("warnings", []),
            }
            for r in records
        ],
    }


def merge_reports(out_dir: Path) -> dict:
    """Join the per-part summaries and reports of a sharded batch into summary.csv + report.json.

    Every part of the batch must be there (the same ``--num-parts``); the merged summary lists the
    cases in case order, and the report sums the case counts and keeps each part's timing. The
    folder is locked as a whole batch's predict locks it.
    """
    out_dir = Path(out_dir)
    paths = sorted(out_dir.glob("report.part-*-of-*.json"))
    if not paths:
        raise UsageError(out_dir, "no report.part-*-of-*.json here (run predict with --num-parts)")
    with folder_lock(out_dir, batch_files(PredictOptions())[-1], "covidseg predict"):
        return _merge_parts(out_dir, paths)


def _merge_parts(out_dir: Path, paths: list[Path]) -> dict:
    """:func:`merge_reports` once the folder is locked."""
    parts = []
    for path in paths:
        try:
            parts.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(path, f"unreadable report ({exc})") from None
    totals = {p.get("part", {}).get("num_parts") for p in parts}
    if len(totals) != 1:
        raise InputError(out_dir, f"reports of different splits ({sorted(map(str, totals))}) in one folder")
    total = totals.pop()
    found = {p["part"]["part_id"] for p in parts}
    missing = sorted(set(range(total)) - found)
    if missing:
        names = ", ".join(f"part {i + 1} of {total}" for i in missing)
        raise InputError(out_dir, f"missing {names}: run those jobs (with --continue) first")
    rows = []
    for i in range(total):
        path = out_dir / f"summary.part-{i + 1}-of-{total}.csv"
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows += list(csv.DictReader(fh))
        except FileNotFoundError:
            raise InputError(
                path, "missing (its report is there): run that part again with --continue"
            ) from None
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise InputError(path, f"unreadable summary ({exc})") from None
    if any(None in row or None in row.values() for row in rows):
        raise InputError(out_dir, "a part's summary has torn rows: run that part again with --continue")
    rows.sort(key=lambda r: r["case_id"])
    write_csv(out_dir / "summary.csv", SUMMARY_COLUMNS, rows)
    parts.sort(key=lambda p: p["part"]["part_id"])
    report = {
        **{
            k: parts[0][k]
            for k in ("format", "version", "covidseg_version", "versions", "model", "preprocessing")
        },
        "merged_from": [p.name for p in paths],
        "cases": sum(p["cases"] for p in parts),
        "predicted": sum(p["predicted"] for p in parts),
        "skipped_complete": [c for p in parts for c in p["skipped_complete"]],
        "failed": [f for p in parts for f in p["failed"]],
        "not_graded": sorted(c for p in parts for c in p.get("not_graded", [])),
        "parts": [
            {k: p.get(k) for k in ("part", "runs_on", "warning", "cases", "predicted", "seconds")}
            for p in parts
        ],
        "results": sorted((r for p in parts for r in p["results"]), key=lambda r: r["case_id"]),
    }
    write_json(out_dir / "report.json", report)
    return report

"""`covidseg run`: the whole label-free pipeline in one work folder, resumable.

preprocess -> train-gan -> make-masks -> train-seg -> export -> predict (-> evaluate with reference
masks), each by calling its stage function. Work folder::

    config.json        the resolved settings, one table per stage (usable again as --config)
    run.json           inputs and, per stage, status (ran / resumed / skipped), seconds, key figures
    pre/               preprocess            (manifest.json is written last)
    gan/               train-gan             (manifest.json last; checkpoint.pt to resume)
    masks/             make-masks            (manifest.json last)
    seg/               train-seg             (manifest.json last; checkpoint.pt to resume)
    model.onnx         export, with its sidecar model.json (written last)
    pred/              predict               (report.json last)
    eval/              evaluate              (summary.json last), only with reference masks

A stage whose last-written file exists is skipped on a rerun (unless `force`), so an interrupted
run resumes where it stopped: an interrupted train-gan / train-seg continues from its checkpoint and
an interrupted predict skips the cases it finished. Once a stage runs, every later stage runs too
(their outputs would be stale).

Settings file (TOML or JSON): one table per stage whose keys are the fields of the stage's config
dataclass: ``[preprocess]`` :class:`PreprocessConfig` (+ ``workers``; ``[preprocess.lungs]``
:class:`LungParams`), ``[train-gan]`` :class:`GanTrainConfig` (``crop`` also ``"auto"`` = the
preset's crop, the default, or ``"none"``), ``[make-masks]`` :class:`PseudoMaskConfig` (also used
for train-gan's threshold calibration), ``[train-seg]`` :class:`SegTrainConfig` (``[train-seg.loss]``
:class:`SegLossConfig`), ``[export]`` :class:`ExportConfig`, ``[predict]`` :class:`PredictOptions`
(the fields with a rule: batch_size, snapshots, probabilities).
Unknown tables or keys, and values that break their rule (:mod:`covidseg.settings`: the type, NaN
or infinite numbers, ranges, presets, a grid too large or not a multiple of the GAN's strides) are
usage errors naming the file, the table, the key and the cause, raised before any stage runs.
"""

from __future__ import annotations

import json
import shutil
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from covidseg import __version__
from covidseg.config import GanTrainConfig, PredictOptions, PreprocessConfig, SegTrainConfig, gan_crop
from covidseg.errors import UsageError
from covidseg.io.atomic import write_json
from covidseg.learning.losses import SegLossConfig
from covidseg.method.pseudo_masks import PseudoMaskConfig
from covidseg.progress import ProgressFor, silent_for
from covidseg.settings import RULES, SettingError, check_values, default_of, show

CONFIG_JSON = "config.json"
RUN_JSON = "run.json"


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


# ---- the work folder --------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInputs:
    """What `run` reads: training CTs, optional reference masks, and what to predict."""

    healthy: Path
    covid: Path
    masks: Path | None = None  # reference lesion masks of the COVID inputs (evaluation only)
    predict: tuple[Path, ...] = ()  # CTs to predict; empty: the COVID inputs
    reference: Path | None = None  # references for `predict` (folder or synth manifest); default: masks

    @property
    def to_predict(self) -> tuple[Path, ...]:
        return self.predict or (self.covid,)

    @property
    def evaluation_reference(self) -> Path | None:
        return self.reference if self.reference is not None or self.predict else self.masks

    def to_json(self) -> dict:
        def text(p: Path | None) -> str | None:
            return None if p is None else str(Path(p).resolve())

        return {
            "healthy": text(self.healthy),
            "covid": text(self.covid),
            "masks": text(self.masks),
            "predict": [text(p) for p in self.to_predict],
            "reference": text(self.evaluation_reference),
        }


def _first_difference(old: object, new: object, where: str = "") -> str | None:
    """'table.key: old -> new' for the first difference of two JSON values; None if they are equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            found = _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    return None if old == new else f"{where}: {old!r} -> {new!r}"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def check_work_dir(work: Path, inputs: RunInputs, config: RunConfig, force: bool) -> dict | None:
    """Refuse a work folder that is not a run folder, or one made with other settings or inputs
    (unless `force`); return the previous run.json (None for a new folder)."""
    for path in (inputs.healthy, inputs.covid, inputs.masks, *inputs.predict, inputs.reference):
        if path is None:
            continue
        if not Path(path).exists():
            raise UsageError(path, "input does not exist")
        resolved, root = Path(path).resolve(), work.resolve()
        if root == resolved or root in resolved.parents or resolved in root.parents:
            raise UsageError(work, f"the work folder and the input {path} contain one another")
    if work.exists() and not work.is_dir():
        raise UsageError(work, "exists and is not a folder")
    if not work.exists() or not any(work.iterdir()):
        return None
    old_config = _read_json(work / CONFIG_JSON)
    if old_config is None:
        raise UsageError(work, f"is not empty and holds no {CONFIG_JSON}: not a covidseg run folder")
    previous = _read_json(work / RUN_JSON) or {}
    if force:
        return previous
    for what, old, new in (
        ("settings", old_config, config.to_json()),
        ("inputs", previous.get("inputs", inputs.to_json()), inputs.to_json()),
    ):
        difference = _first_difference(old, new)
        if difference:
            raise UsageError(
                work,
                f"was made with other {what} ({difference}); "
                "pass --force to redo it or choose another folder",
            )
    return previous


# ---- the stages -------------------------------------------------------------------------------


@dataclass
class _Context:
    work: Path
    inputs: RunInputs
    config: RunConfig
    device: str
    progress: ProgressFor  # the Progress of a stage, by its name


def _run_preprocess(ctx: _Context, resume: bool) -> dict:
    from covidseg.stages.preprocess import run_preprocess

    i = ctx.inputs
    result = run_preprocess(
        ctx.work / "pre", i.healthy, i.covid, i.masks, ctx.config.preprocess, workers=ctx.config.workers,
        overwrite=True, progress=ctx.progress("preprocess"),
    )  # fmt: skip
    return {
        "cases": len(result.manifest["cases"]),
        "failed": [f["error"] for f in result.failures],
        "notes": result.notes,
    }


def _run_train_gan(ctx: _Context, resume: bool) -> dict:
    from covidseg.stages.train_gan import run_train_gan

    manifest = run_train_gan(
        ctx.work / "pre", ctx.work / "gan", ctx.config.train_gan, ctx.device, resume,
        ctx.config.make_masks, ctx.progress("train-gan"),
    )  # fmt: skip
    return {
        "steps": manifest["steps"],
        "device": manifest["device"],
        "threshold": manifest["calibration"]["threshold"],
    }


def _run_make_masks(ctx: _Context, resume: bool) -> dict:
    from covidseg.stages.make_masks import run_make_masks

    manifest = run_make_masks(
        ctx.work / "pre", ctx.work / "gan", ctx.work / "masks", ctx.device, ctx.config.make_masks,
        overwrite=True, progress=ctx.progress("make-masks"),
    )  # fmt: skip
    return {
        "cases": len(manifest["cases"]),
        "failed": [f["error"] for f in manifest["failed"]],
        "threshold": manifest["threshold"],
        "slices": manifest["slices"],
    }


def _run_train_seg(ctx: _Context, resume: bool) -> dict:
    from covidseg.stages.train_seg import run_train_seg

    manifest = run_train_seg(
        ctx.work / "masks", ctx.work / "seg", ctx.config.train_seg, ctx.config.seg_loss, ctx.device,
        resume, ctx.progress("train-seg"),
    )  # fmt: skip
    return {"steps": manifest["steps"], "device": manifest["device"], "best": manifest["best"]}


def _run_export(ctx: _Context, resume: bool) -> dict:
    from covidseg.stages.export import run_export

    progress = ctx.progress("export")
    progress(0, 1, "exporting and checking parity")
    sidecar = run_export(
        ctx.work / "seg", ctx.work / "model.onnx", fp16=ctx.config.export.fp16, overwrite=True
    )
    progress(1, 1, "done")
    return {"precision": sidecar["precision"], "parity": sidecar["parity"]}


def _run_predict(ctx: _Context, resume: bool) -> dict:
    from covidseg.stages.predict import predict_inputs

    options = replace(ctx.config.predict, resume=resume, overwrite=not resume)
    result = predict_inputs(
        list(ctx.inputs.to_predict), ctx.work / "pred", str(ctx.work / "model.onnx"), "auto", ctx.device,
        options, ctx.progress("predict"),
    )  # fmt: skip
    report = result.report
    return {
        "cases": report["cases"],
        "predicted": report["predicted"],
        "skipped": len(result.skipped),
        "failed": [f["error"] for f in result.failures],
        "not_graded": report["not_graded"],
        "warnings": result.warnings,
        "runs_on": report["runs_on"],
        "seconds_per_case": report["seconds_per_case"],
    }


def _run_evaluate(ctx: _Context, resume: bool) -> dict:
    from covidseg.stages.evaluate import run_evaluate

    result = run_evaluate(
        ctx.work / "pred", ctx.inputs.evaluation_reference, ctx.work / "eval",
        progress=ctx.progress("evaluate"), overwrite=True,
    )  # fmt: skip
    agg = result.summary["aggregate"]
    return {
        "cases": result.summary["n_cases"],
        "failed": [f["error"] for f in result.failed_cases],
        "dice": agg["metrics"]["dice"],
        "pooled_dice": agg["pooled"].get("dice"),
        "sensitivity": agg["metrics"]["sensitivity"],
        "specificity": agg["metrics"]["specificity"],
    }


def _predict_complete(work: Path) -> bool:
    report = _read_json(work / "pred" / "report.json")
    return report is not None and not report.get("failed")


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline and the files that tell whether it finished."""

    name: str
    outputs: tuple[str, ...]  # paths in the work folder this stage owns (removed before a fresh run)
    done: Callable[[Path], bool]  # its last-written file exists (the stage finished)
    run: Callable[[_Context, bool], dict]  # (context, resume) -> key figures
    can_resume: Callable[[Path], bool] = lambda work: False  # an unfinished output to continue


def _marker(relative: str) -> Callable[[Path], bool]:
    return lambda work: (work / relative).is_file()


def _checkpoint(folder: str) -> Callable[[Path], bool]:
    return lambda work: (work / folder / "checkpoint.pt").is_file()


STAGES = (
    Stage("preprocess", ("pre",), _marker("pre/manifest.json"), _run_preprocess),
    Stage("train-gan", ("gan",), _marker("gan/manifest.json"), _run_train_gan, _checkpoint("gan")),
    Stage("make-masks", ("masks",), _marker("masks/manifest.json"), _run_make_masks),
    Stage("train-seg", ("seg",), _marker("seg/manifest.json"), _run_train_seg, _checkpoint("seg")),
    Stage("export", ("model.onnx", "model.json"), _marker("model.json"), _run_export),
    Stage("predict", ("pred",), _predict_complete, _run_predict, lambda work: (work / "pred").is_dir()),
    Stage("evaluate", ("eval",), _marker("eval/summary.json"), _run_evaluate),
)


def _clear(work: Path, outputs: tuple[str, ...]) -> None:
    """Remove a stage's previous outputs (only paths inside the run folder that the stage owns)."""
    for relative in outputs:
        path = work / relative
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


@dataclass
class RunResult:
    """What one `run` did: a record per stage (name, status, seconds, figures) and the failures."""

    work: Path
    stages: list[dict]
    failures: list[str]

    @property
    def seconds(self) -> float:
        return sum(float(r.get("seconds") or 0.0) for r in self.stages)


def _write_run_json(work: Path, inputs: RunInputs, records: list[dict], device: str) -> None:
    write_json(
        work / RUN_JSON,
        {
            "format": "covidseg.run",
            "version": 1,
            "covidseg_version": __version__,
            "inputs": inputs.to_json(),
            "device": device,
            "stages": records,
        },
    )


def run_pipeline(
    work: Path,
    inputs: RunInputs,
    config: RunConfig | None = None,
    device: str = "auto",
    force: bool = False,
    progress: ProgressFor | None = None,
) -> RunResult:
    """Run every stage into `work` (skipping finished ones unless `force`); return what was done.

    ``progress(stage name)`` gives the :data:`~covidseg.progress.Progress` of each stage. Stage
    errors (a :class:`~covidseg.errors.CovidsegError`) stop the run; cases that fail inside a stage
    are recorded in the result's ``failures`` and the run goes on with the others.
    """
    work = Path(work)
    config = config or RunConfig()
    previous = check_work_dir(work, inputs, config, force) or {}
    old_records = {r.get("stage"): r for r in previous.get("stages", []) if isinstance(r, dict)}
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / CONFIG_JSON, config.to_json())
    ctx = _Context(work, inputs, config, device, progress or silent_for)
    stages = [s for s in STAGES if s.name != "evaluate" or inputs.evaluation_reference is not None]
    records: list[dict] = []
    stale = force  # once a stage runs, the outputs of every later stage are stale
    for stage in stages:
        if not stale and stage.done(work):
            old = old_records.get(stage.name, {})
            records.append({**old, "stage": stage.name, "status": "skipped"})
            ctx.progress(stage.name)(1, 1, "already done")
            continue
        resume = not stale and stage.can_resume(work)
        if not resume:
            _clear(work, stage.outputs)
        stale = True
        started = time.perf_counter()
        figures = stage.run(ctx, resume)
        records.append(
            {
                "stage": stage.name,
                "status": "resumed" if resume else "ran",
                "seconds": round(time.perf_counter() - started, 2),
                "output": stage.outputs[0],
                "figures": figures,
            }
        )
        _write_run_json(work, inputs, records, device)
    _write_run_json(work, inputs, records, device)
    failures = [f"{r['stage']}: {error}" for r in records for error in r.get("figures", {}).get("failed", [])]
    return RunResult(work=work, stages=records, failures=failures)

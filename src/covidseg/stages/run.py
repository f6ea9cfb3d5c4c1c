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

Settings: a :class:`~covidseg.config.RunConfig`, one table per stage, read from a TOML or JSON
settings file by :func:`covidseg.config.load_config` (the tables: :mod:`covidseg.config`) and
saved as config.json.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from covidseg import __version__
from covidseg.config import SEG_SETTINGS_ABSENT_MEANS_OFF, RunConfig, config_from_tables
from covidseg.errors import UsageError
from covidseg.io.atomic import write_json
from covidseg.progress import ProgressFor, silent_for

CONFIG_JSON = "config.json"
RUN_JSON = "run.json"


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


def _with_defaults(old_config: dict) -> dict:
    """An earlier run's config.json with the settings it lacks at their defaults (a config.json
    written before ``[train-gan.lesions]`` was a setting), except train-seg settings whose behaviour
    such a run did not have, which are off (:data:`SEG_SETTINGS_ABSENT_MEANS_OFF`: a folder trained
    before synthetic lesions is not taken for one trained with them); as it is when it no longer reads."""
    tables = dict(old_config)
    seg = tables.get("train-seg")
    if isinstance(seg, dict):
        absent = {k: v for k, v in SEG_SETTINGS_ABSENT_MEANS_OFF.items() if k not in seg and v is not None}
        tables["train-seg"] = {**absent, **seg}
    try:
        return config_from_tables(tables).to_json()
    except UsageError:
        return old_config


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
        ("settings", _with_defaults(old_config), config.to_json()),
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
    figures = {"steps": manifest["steps"], "device": manifest["device"], "best": manifest["best"]}
    return {**figures, "threshold": manifest["threshold"]["value"]}


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

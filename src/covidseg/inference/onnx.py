"""Exporting torch models to ONNX, and checking that ONNX Runtime computes what torch computes.

One self-contained ``.onnx`` file (no external-data files), opset >= 18, the batch dimension
dynamic, every other dimension fixed. The dynamo exporter (``torch.onnx.export(dynamo=True)``)
traces with a batch of 2 or more so that the batch dimension is not specialised to 1.

``--fp16`` models keep float32 inputs and outputs (casts are inserted at the borders) so callers
never deal with half precision; they are meant for GPUs and are checked at mask level only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from covidseg.errors import CovidsegError, InputError, UsageError, first_line
from covidseg.io.atomic import atomic_path
from covidseg.versions import software_versions

OPSET = 18
MAX_BATCH = 4096


class ParityError(CovidsegError):
    """ONNX Runtime does not reproduce the torch model closely enough."""

    exit_code = 1


def sidecar_path(onnx_path: str | Path) -> Path:
    """The sidecar JSON of an exported model: ``model.onnx`` -> ``model.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name.removesuffix(".onnx") + ".json")


def check_export_targets(onnx_path: Path, overwrite: bool) -> None:
    """Refuse (UsageError) to write an export at `onnx_path` (+ its sidecar) over what is not an
    earlier export: a folder, any existing file without `overwrite`, and, even with it, a sidecar
    name that holds a file other than a covidseg sidecar (``-o run/config.onnx`` would replace the
    training's config.json)."""
    side = sidecar_path(onnx_path)
    for target in (onnx_path, side):
        if target.is_dir():
            raise UsageError(target, "is a folder, not a model file; choose another output path")
    if not overwrite and (onnx_path.exists() or side.exists()):
        raise UsageError(onnx_path, "exists; pass --overwrite to replace it")
    if side.exists() and not _is_covidseg_sidecar(side):
        raise UsageError(
            side, "exists and is not a covidseg model sidecar: --overwrite replaces only an earlier "
            "export; choose another output name",
        )  # fmt: skip


def _is_covidseg_sidecar(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith("covidseg.onnx-")


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress lines and warns about optional packages; keep the
    user's terminal for our own messages (errors still raise)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    fp16: bool = False,
) -> None:
    """Export `module` (eval mode, on the CPU) to one ONNX file at `path`, atomically.

    Args:
        example_inputs: one tensor per input, batch (dim 0) >= 2; dim 0 becomes dynamic.
        fp16: convert weights and compute to float16, keeping float32 inputs/outputs.
    """
    if any(t.shape[0] < 2 for t in example_inputs):
        raise ValueError("export with a batch of at least 2 so the batch dimension stays dynamic")
    import onnx  # only needed here: `export` and the tests

    module = module.eval().cpu()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dynamic = tuple({0: batch} for _ in example_inputs)
    with _quiet_exporter():
        program = torch.onnx.export(
            module,
            tuple(example_inputs),
            dynamo=True,
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            external_data=False,
            optimize=True,
        )
    model = program.model_proto
    if fp16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=True)
        _sort_nodes(model.graph)  # the converter appends its input casts at the end of the graph
    onnx.checker.check_model(model)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))


#: ``[(ONNX Runtime output, torch output), ...]`` (one pair per batch size) ->
#: ``(figures, None)`` when they agree closely enough, else ``(figures, what differs)``.
ParityMeasure = Callable[[list[tuple[np.ndarray, np.ndarray]]], tuple[dict, str | None]]


def check_parity(
    onnx_path: str | Path,
    module: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    batches: Sequence[int],
    measure: ParityMeasure,
) -> dict:
    """ONNX Runtime (CPU) vs torch on the same inputs; ParityError when they differ.

    Args:
        module: the torch module that was exported (eval mode, CPU); its first output is compared.
        inputs: one CPU float32 tensor per ONNX input (named `input_names`), batch first.
        batches: each batch size checked, on the first `b` items of every input.
        measure: the figures and the rule (see :data:`ParityMeasure`).

    Returns:
        the figures of `measure`, with ``provider`` (the ONNX Runtime provider that ran) added.
    """
    session = onnx_session(onnx_path)
    pairs = []
    for batch in batches:
        feed = [t[:batch] for t in inputs]
        with torch.inference_mode():
            expected = module(*feed).numpy()
        got = session.run(None, {n: t.numpy() for n, t in zip(input_names, feed, strict=True)})[0]
        pairs.append((got, expected))
    figures, problem = measure(pairs)
    figures["provider"] = session.get_providers()[0]
    if problem is not None:
        raise ParityError(onnx_path, f"ONNX Runtime differs from torch: {problem}")
    return figures


def read_sidecar(
    onnx_path: str | Path,
    expected_format: str,
    max_version: int,
    required: tuple[str, ...] = (),
    verify: bool = True,
) -> dict:
    """The sidecar JSON of an exported model, checked: its format and version, the keys in
    `required`, and (with `verify`) that it records the .onnx file's sha256, so an edited or swapped
    model is refused."""
    onnx_path = Path(onnx_path)
    side = sidecar_path(onnx_path)
    if not onnx_path.is_file():
        raise InputError(onnx_path, "no such model file")
    if not side.is_file():
        raise InputError(
            onnx_path, f"no sidecar {side.name} beside the model (export it with covidseg export)"
        )
    try:
        sidecar = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(side, f"unreadable sidecar ({exc})") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != expected_format:
        raise InputError(side, f"not a {expected_format} sidecar")
    version = sidecar.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > max_version:
        raise InputError(side, f"sidecar version {version!r} is newer than this covidseg")
    missing = [k for k in ("sha256", *required) if k not in sidecar]
    if missing:
        raise InputError(side, f"sidecar without {', '.join(missing)}")
    if verify:
        actual = sha256_of(onnx_path)
        if actual != sidecar["sha256"]:
            recorded = str(sidecar["sha256"])[:12]
            raise InputError(
                onnx_path, f"sha256 {actual[:12]}… does not match its sidecar {side.name} ({recorded}…)"
            )
    return sidecar


def provenance(started: float) -> dict:
    """When, how long (since `started`, a perf_counter value) and with which versions a model was
    exported: the sidecars' ``exported`` record."""
    return {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 2),
        **software_versions(("torch", "onnxruntime", "python")),
    }


def _sort_nodes(graph) -> None:
    """Put a graph's nodes in topological order (the ONNX checker requires it)."""
    known = {t.name for t in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in known for name in n.input)]
        if not ready:
            raise ValueError("ONNX graph has a cycle or an undefined input")
        for node in ready:
            known.update(node.output)
        ordered += ready
        pending = [n for n in pending if not any(n is r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def onnx_session(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0):
    """An ONNX Runtime session on `providers` (`threads` 0 = ORT's default intra-op threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # our own messages say which provider runs
    ort.set_default_logger_severity(4)  # a provider that fails to load logs an error, then falls back
    try:
        # ORT prints (not logs) "EP Error ... Falling back" when a provider's libraries are missing
        with contextlib.redirect_stdout(io.StringIO()):
            return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # ORT raises its own exception types for unreadable/invalid models
        reason = first_line(exc)
        raise InputError(path, f"ONNX Runtime cannot load this model ({reason})") from None

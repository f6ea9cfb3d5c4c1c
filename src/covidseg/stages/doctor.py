"""`covidseg doctor`: what this installation can do, checked rather than assumed.

ONNX Runtime lists providers its build *has* (``get_available_providers``), not the ones that
work: the CUDA provider needs CUDA and cuDNN libraries at run time and ORT silently falls back to
the CPU without them. So each provider is tried on a one-node model, and only those that a
session really gets count as usable.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from covidseg.errors import CovidsegError, first_line
from covidseg.inference.model_home import ENV, home_dir, installed_models, models_dir
from covidseg.versions import software_versions


def _tiny_onnx(path: Path) -> None:
    """A one-node model (y = x + x) to try providers on."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save_model(model, str(path))


def usable_providers() -> dict[str, str]:
    """Provider -> "usable" or why not, for every provider this ONNX Runtime build has."""
    import numpy as np
    import onnxruntime as ort

    from covidseg.inference.onnx import onnx_session

    result: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.onnx"
        _tiny_onnx(probe)
        for provider in ort.get_available_providers():
            try:
                session = onnx_session(probe, list(dict.fromkeys([provider, "CPUExecutionProvider"])))
                session.run(None, {"x": np.ones((1, 4), np.float32)})
            except CovidsegError as exc:
                result[provider] = f"fails: {str(exc).split(': ', 1)[-1]}"
                continue
            got = session.get_providers()
            result[provider] = "usable" if got[0] == provider else "not usable (libraries or GPU missing)"
    return result


def _model_entry(name: str, path: Path) -> dict:
    """One model of the home: ``status`` "ok" with its kind, or "broken: PATH: CAUSE" (one line).

    Every model is opened (and so fully checked) as predict opens it; a broken one is listed and the
    others are still examined."""
    from covidseg.inference.model_files import open_seg_model

    try:
        seg = open_seg_model(path)
    except CovidsegError as exc:
        return {"name": name, "path": str(path), "status": f"broken: {exc}", "error": str(exc)}
    except Exception as exc:  # a defect the checks do not know yet must not hide the other models
        error = f"{path}: unexpected error: {type(exc).__name__}: {first_line(exc)}"
        return {"name": name, "path": str(path), "status": f"broken: {error}", "error": error}
    return {
        "name": name,
        "path": str(path),
        "status": "ok",
        "kind": seg.kind,
        "arch": seg.info.get("arch"),
        "precision": seg.info.get("precision"),
    }


def run_doctor() -> dict:
    """Versions, devices, usable ONNX Runtime providers and the model home."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        **software_versions(("covidseg", "python", "platform", "torch", "onnxruntime", "SimpleITK")),
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "onnxruntime_providers": usable_providers(),
        "home": {
            "path": str(home_dir()),
            "from": f"${ENV}" if os.environ.get(ENV) else "platform default",
            "models_dir": str(models_dir()),
            "models": [_model_entry(name, path) for name, path in installed_models().items()],
        },
    }

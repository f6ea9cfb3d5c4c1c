"""The offline model home: where named models live, so ``--model NAME`` works.

``$COVIDSEG_HOME`` if set, else the platform's user data folder (``~/.local/share/covidseg`` on
Linux). Models are in its ``models/`` folder: ``NAME.onnx`` with ``NAME.json``, ``NAME.pt``, or a
train-seg output folder ``NAME/``. Nothing is ever downloaded: models get there with
``covidseg export ... --name NAME`` or by copying them in.
"""

from __future__ import annotations

import os
from pathlib import Path

from covidseg.errors import UsageError

ENV = "COVIDSEG_HOME"
DEFAULT_NAME = "default"


def home_dir() -> Path:
    """The covidseg home folder (it may not exist yet)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("covidseg", appauthor=False))


def models_dir() -> Path:
    return home_dir() / "models"


def _candidates(name: str) -> list[Path]:
    folder = models_dir()
    return [folder / f"{name}.onnx", folder / f"{name}.pt", folder / name]


def installed_models() -> dict[str, Path]:
    """Name -> path of every model in the home (ONNX preferred over torch under one name)."""
    folder = models_dir()
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and (entry / "best.pt").is_file():
            found.setdefault(entry.name, entry)
        elif entry.suffix in (".onnx", ".pt") and entry.is_file():
            name = entry.name.removesuffix(entry.suffix)
            if entry.suffix == ".onnx" or name not in found:
                found[name] = entry
    return found


def resolve_model(spec: str | None) -> Path:
    """``--model``: an existing path, or a name in the model home (None = ``default``)."""
    if spec is not None:
        path = Path(spec).expanduser()
        if path.exists():
            return path
        if os.sep in spec or "/" in spec or path.suffix in (".onnx", ".pt"):
            raise UsageError(path, "--model: no such file or folder")
    name = spec or DEFAULT_NAME
    for candidate in _candidates(name):
        if candidate.exists():
            return candidate
    names = sorted(installed_models())
    listing = ", ".join(names) if names else "none"
    raise UsageError(
        models_dir(),
        f"--model {name!r}: not a path and no such model in the model home (installed: {listing}; "
        "add one with `covidseg export WORK/seg --name NAME`, or set COVIDSEG_HOME)",
    )

"""Versions of covidseg and of the software its results depend on, for reports and `covidseg doctor`.

One place for what `predict`'s report.json (``"versions"``), `covidseg doctor` and the demo's
report.html list. A version is looked up only when asked for, so a caller naming a few imports only
those modules (importing torch takes about a second).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable

from covidseg import __version__


def _torch() -> str:
    import torch

    return torch.__version__


def _onnxruntime() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _simpleitk() -> str:
    import SimpleITK

    return SimpleITK.Version_VersionString()


def _numpy() -> str:
    import numpy

    return numpy.__version__


_LOOKUPS: dict[str, Callable[[], str]] = {
    "covidseg": lambda: __version__,
    "python": platform.python_version,  # e.g. "3.12.3"
    "platform": platform.platform,  # the operating system, e.g. "Linux-6.8.0-x86_64-with-glibc2.39"
    "torch": _torch,
    "onnxruntime": _onnxruntime,
    "SimpleITK": _simpleitk,
    "numpy": _numpy,
}

#: Every name :func:`software_versions` knows, in the order it lists them by default.
SOFTWARE = tuple(_LOOKUPS)


def software_versions(names: Iterable[str] = SOFTWARE) -> dict[str, str]:
    """``{name: version}`` for each of `names` (of :data:`SOFTWARE`), in the order given.

    ``"platform"`` is the operating system and machine rather than a version. An unknown name raises
    KeyError.
    """
    return {name: _LOOKUPS[name]() for name in names}

"""The layers only import downward (docs/architecture.md): cli -> stages -> library.

* library packages never import a stage or the CLI, and a stage never imports the CLI;
* a stage imports another stage only in ``stages/run.py`` and ``stages/demo.py`` (the pipelines);
  ``stages/_workdir.py`` is shared stage setup, not a stage;
* ``models/`` imports only ``models/`` and ``method/noise`` (a model file is the model + its config);
* ``io/`` imports no torch and nothing above geometry.

Each rule is a function over a package folder that returns one line per offending import; the
``..._sees_a_violation`` tests run it on a small package with a violation, so a rule that stopped
looking would fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "covidseg"
PIPELINE_STAGES = ("run", "demo")  # the stages that run other stages
SHARED_STAGE_MODULES = ("_workdir",)  # stage setup used by every stage, not a stage itself
MODELS_MAY_IMPORT = ("covidseg.models", "covidseg.method.noise")
IO_MAY_IMPORT = (
    "covidseg.io",
    "covidseg.errors",
    "covidseg.imaging.geometry",
    "covidseg.imaging.intensity",
)


def _module_name(path: Path, root: Path) -> str:
    """`root`/stages/export.py -> covidseg.stages.export (root is the covidseg package folder)."""
    module = "covidseg." + ".".join(path.relative_to(root).with_suffix("").parts)
    return module.removesuffix(".__init__")


def _imports(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, name) of everything imported anywhere in `path` (also inside functions): ``M`` for
    ``import M``, ``M.a`` for ``from M import a``; relative imports resolved against `path`'s package."""
    package = _module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _layer(module: str) -> str:
    if module in ("covidseg.cli", "covidseg.__main__"):
        return "cli"
    if _within(module, ("covidseg.stages",)):
        return "stages"
    return "library"


def _sources(root: Path, folder: str = "") -> list[Path]:
    return sorted((root / folder).rglob("*.py"))


def layer_violations(root: Path) -> list[str]:
    """Library modules importing a stage or the CLI; stages importing the CLI."""
    offenders = []
    for path in _sources(root):
        module = _module_name(path, root)
        layer = _layer(module)
        for line, imported in _imports(path, root):
            if not imported.startswith("covidseg"):
                continue
            target = _layer(imported)
            if (layer == "library" and target != "library") or (layer == "stages" and target == "cli"):
                offenders.append(f"{module}:{line} ({layer}) imports {imported} ({target})")
    return offenders


def stage_violations(root: Path) -> list[str]:
    """Stages importing another stage, outside the pipelines (run, demo)."""
    offenders = []
    for path in _sources(root, "stages"):
        module = _module_name(path, root)
        own = module.split(".")[2] if module.count(".") >= 2 else ""
        if own in PIPELINE_STAGES:
            continue
        for line, imported in _imports(path, root):
            parts = imported.split(".")
            if len(parts) < 3 or parts[:2] != ["covidseg", "stages"]:
                continue
            if parts[2] not in (own, *SHARED_STAGE_MODULES):
                offenders.append(f"{module}:{line} imports the stage {'.'.join(parts[:3])}")
    return list(dict.fromkeys(offenders))  # once per import statement


def models_violations(root: Path) -> list[str]:
    """models/ importing covidseg code other than models/ and method/noise."""
    offenders = []
    for path in _sources(root, "models"):
        for line, imported in _imports(path, root):
            if _within(imported, ("covidseg",)) and not _within(imported, MODELS_MAY_IMPORT):
                offenders.append(f"{_module_name(path, root)}:{line} imports {imported}")
    return offenders


def io_violations(root: Path) -> list[str]:
    """io/ importing torch, or covidseg code above geometry (models, methods, inference ...)."""
    offenders = []
    for path in _sources(root, "io"):
        for line, imported in _imports(path, root):
            torch = imported.split(".")[0] == "torch"
            if torch or (_within(imported, ("covidseg",)) and not _within(imported, IO_MAY_IMPORT)):
                offenders.append(f"{_module_name(path, root)}:{line} imports {imported}")
    return offenders


RULES = (layer_violations, stage_violations, models_violations, io_violations)


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_the_package_keeps_the_rule(rule):
    offenders = rule(PACKAGE)
    assert not offenders, "\n".join(offenders)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "covidseg"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


IN_A_FUNCTION = "def f():\n    {}\n"


@pytest.mark.parametrize(
    ("rule", "file", "text", "named"),
    [
        (layer_violations, "imaging/x.py", "from covidseg.stages.preprocess import run",
         "covidseg.stages.preprocess"),
        (layer_violations, "inference/y.py", "import covidseg.cli", "covidseg.cli"),
        (layer_violations, "stages/z.py", "from covidseg import cli", "covidseg.cli"),
        (stage_violations, "stages/make_masks.py", "from covidseg.stages.train_gan import F",
         "covidseg.stages.train_gan"),
        (stage_violations, "stages/export.py", "from covidseg.stages import predict",
         "covidseg.stages.predict"),
        (stage_violations, "stages/predict.py", "from .evaluate import run_evaluate",
         "covidseg.stages.evaluate"),
        (models_violations, "models/gan3d.py", "from covidseg.learning.loop import load",
         "covidseg.learning.loop"),
        (models_violations, "models/unet.py", "from covidseg import __version__", "covidseg.__version__"),
        (io_violations, "io/volumes.py", "import torch.nn", "torch.nn"),
        (io_violations, "io/dicom.py", "from covidseg.method.noise import perlin", "covidseg.method.noise"),
    ],
)  # fmt: skip
def test_each_rule_sees_a_violation_and_names_the_import(tmp_path, rule, file, text, named):
    root = _package(tmp_path, {file: IN_A_FUNCTION.format(text)})
    offenders = rule(root)
    assert len(offenders) == 1 and named in offenders[0] and file.split("/")[-1][:-3] in offenders[0]


def test_the_allowed_imports_are_not_violations(tmp_path):
    root = _package(
        tmp_path,
        {
            "stages/run.py": "from covidseg.stages.export import run_export\n",
            "stages/demo.py": "from covidseg.stages.run import run_pipeline\n",
            "stages/predict.py": "from covidseg.stages._workdir import a\nimport covidseg.stages.predict\n",
            "models/gan3d.py": "from covidseg.method.noise import p\nfrom .blocks import Up\nimport torch\n",
            "io/volumes.py": "from covidseg.imaging.geometry import Geometry\nimport numpy\n",
            "inference/x.py": "from covidseg.models.gan3d import Generator3D\n",
        },
    )
    assert [rule(root) for rule in RULES] == [[], [], [], []]


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; from covidseg.cli import app; print('torch' in sys.modules, 'SimpleITK' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_the_rules_read_the_real_package():
    assert len(_sources(PACKAGE, "models")) >= 5 and len(_sources(PACKAGE, "stages")) >= 10
    assert "covidseg.stages.export.run_export" in {m for _, m in _imports(PACKAGE / "stages" / "run.py")}

"""The three layers (cli -> stages -> library) only import downward."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "covidseg"


def _imports(path: Path) -> set[str]:
    """Every `covidseg...` module imported anywhere in `path` (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("covidseg")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("covidseg"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _layer(module: str) -> str:
    if module in ("covidseg.cli", "covidseg.__main__"):
        return "cli"
    if module.startswith("covidseg.stages"):
        return "stages"
    return "library"


def test_library_modules_import_neither_stages_nor_cli():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        module = "covidseg." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        layer = _layer(module)
        for imported in _imports(path):
            target = _layer(imported)
            if (layer == "library" and target != "library") or (layer == "stages" and target == "cli"):
                offenders.append(f"{module} ({layer}) imports {imported} ({target})")
    assert not offenders, "\n".join(offenders)


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from covidseg.stages.preprocess import run_preprocess\n")
    assert "covidseg.stages.preprocess" in _imports(bad)
    assert _layer("covidseg.stages.preprocess") == "stages"


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; from covidseg.cli import app; print('torch' in sys.modules, 'SimpleITK' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_io_imports_no_torch_and_nothing_above_geometry():
    """covidseg.io reads and writes files (docs/architecture): no torch, no model or method code."""
    allowed = (
        "covidseg.io",
        "covidseg.io.atomic",
        "covidseg.errors",
        "covidseg.imaging.geometry",
        "covidseg.imaging.intensity",
    )
    offenders = []
    for path in sorted((PACKAGE / "io").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                if module.split(".")[0] == "torch" or (
                    module.startswith("covidseg") and not module.startswith(allowed)
                ):
                    offenders.append(f"{path.name} imports {module}")
    assert not offenders, "\n".join(offenders)

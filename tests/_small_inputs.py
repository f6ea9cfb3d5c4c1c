"""Sizes and helpers the export, predict, make-masks and model-home tests share: a small phantom CT
(a second to segment) with an exact LPS geometry, a tiny GAN's grid and crop, and one CLI runner."""

from __future__ import annotations

from typer.testing import CliRunner

from conftest import LPS
from covidseg.cli import app
from covidseg.imaging.geometry import Geometry

SHAPE, SPACING = (28, 96, 96), (10.0, 3.75, 3.75)  # small phantoms (z, y, x voxels; mm): a second each
GRID = (8, 48, 48)  # 2 x 2 windows of the crop: exercises the blending at little cost
CROP = (8, 32, 32)

runner = CliRunner()


def invoke(*args: str):
    """`covidseg ARGS...` run in-process; the result has .exit_code and .output."""
    return runner.invoke(app, list(args))


def lps_geometry(shape_zyx, spacing_zyx, direction=LPS) -> Geometry:
    """A geometry for an array of shape (z, y, x) with spacing (z, y, x) in mm, origin fixed."""
    size = tuple(int(v) for v in reversed(shape_zyx))
    spacing = tuple(float(v) for v in reversed(spacing_zyx))
    return Geometry(size=size, spacing=spacing, origin=(-180.0, -170.0, -140.0), direction=direction)

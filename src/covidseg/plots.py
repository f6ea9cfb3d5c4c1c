"""Figures (PNG): overlay montages of axial CT slices with lesion and lung outlines.

matplotlib is imported inside the functions (Agg backend, no display needed), so importing this
module is cheap.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from covidseg.atomic import atomic_path


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, dpi: int) -> None:
    """Write `fig` as PNG to `path` atomically and free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    _pyplot().close(fig)


LUNG_WINDOW_HU = (-1350.0, 150.0)  # width 1500, level -600


def montage_slices(
    lesion_zyx: np.ndarray | None, lung_zyx: np.ndarray | None, n_slices: int, depth: int
) -> list[int]:
    """Axial slice indices to show, ascending: most lesion first, else evenly through the lungs.

    Slices with lesion are ranked by lesion voxel count; if there are fewer than `n_slices`, the
    rest are spread evenly over the slices holding lung (or over the whole volume).
    """
    n_slices = max(1, min(int(n_slices), depth))
    chosen: list[int] = []
    if lesion_zyx is not None:
        counts = np.count_nonzero(lesion_zyx.reshape(depth, -1), axis=1)
        ranked = [int(k) for k in np.argsort(-counts, kind="stable") if counts[k] > 0]
        chosen = sorted(ranked[:n_slices])
    if len(chosen) < n_slices:
        if lung_zyx is not None and np.any(lung_zyx):
            has_lung = np.flatnonzero(np.any(lung_zyx.reshape(depth, -1), axis=1))
            lo, hi = int(has_lung[0]), int(has_lung[-1])
        else:
            lo, hi = 0, depth - 1
        for k in np.linspace(lo, hi, n_slices + 2)[1:-1].round().astype(int):
            if len(chosen) < n_slices and int(k) not in chosen:
                chosen.append(int(k))
        chosen = sorted(chosen)
    return chosen


def overlay_montage(
    hu_zyx: np.ndarray,
    lesion_zyx: np.ndarray | None,
    lung_zyx: np.ndarray | None = None,
    path: str | Path | None = None,
    n_slices: int = 6,
    title: str | None = None,
    spacing_zyx: tuple[float, float, float] | None = None,
) -> list[int]:
    """Write a PNG montage of axial slices in a lung window (-1350..150 HU), atomically.

    `hu_zyx` is a canonical ``[z, y, x]`` CT in HU (anterior at the top of each panel, the
    patient's left on the right); `lesion_zyx` (filled in semi-transparent red, outlined) and
    `lung_zyx` (thin yellow contour) are masks of the same shape, either may be None.
    `spacing_zyx` (mm) sets the pixel aspect ratio. `path` (required) is the PNG to write.
    Returns the slice indices shown.
    """
    if path is None:
        raise ValueError("overlay_montage needs the path of the PNG to write")
    plt = _pyplot()

    hu = np.asarray(hu_zyx)
    if hu.ndim != 3:
        raise ValueError(f"expected a [z, y, x] volume, got shape {hu.shape}")
    for name, mask in (("lesion", lesion_zyx), ("lung", lung_zyx)):
        if mask is not None and np.shape(mask) != hu.shape:
            raise ValueError(f"{name} mask shape {np.shape(mask)} differs from the image {hu.shape}")
    slices = montage_slices(lesion_zyx, lung_zyx, n_slices, hu.shape[0])
    ncols = min(len(slices), 3)
    nrows = math.ceil(len(slices) / ncols)
    aspect = 1.0 if spacing_zyx is None else float(spacing_zyx[1]) / float(spacing_zyx[2])
    panel = 4.0
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(panel * ncols, panel * nrows * aspect * hu.shape[1] / hu.shape[2] + 0.4),
        squeeze=False,
    )
    red = np.zeros((*hu.shape[1:], 4), dtype=np.float32)
    for ax, k in zip(axes.ravel(), slices, strict=False):
        ax.imshow(
            hu[k],
            cmap="gray",
            vmin=LUNG_WINDOW_HU[0],
            vmax=LUNG_WINDOW_HU[1],
            aspect=aspect,
            interpolation="nearest",
        )
        if lung_zyx is not None and np.any(lung_zyx[k]):
            ax.contour(np.asarray(lung_zyx[k]) > 0, levels=[0.5], colors="yellow", linewidths=0.5)
        if lesion_zyx is not None and np.any(lesion_zyx[k]):
            lesion = np.asarray(lesion_zyx[k]) > 0
            red[:] = 0.0
            red[lesion] = (1.0, 0.0, 0.0, 0.35)
            ax.imshow(red, aspect=aspect, interpolation="nearest")
            ax.contour(lesion, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"z = {k}", fontsize=8)
    for ax in axes.ravel():
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path, dpi=100)
    return slices


def loss_curves(rows: list[dict], columns: list[str], path: str | Path, title: str | None = None) -> None:
    """Plot loss columns of a metrics log against ``step`` (log-scaled y when all positive)."""
    plt = _pyplot()

    steps = np.array([float(r["step"]) for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    positive = True
    for name in columns:
        values = np.array([float(r[name]) if r.get(name) not in (None, "") else np.nan for r in rows])
        if np.isfinite(values).any():
            ax.plot(steps, values, label=name, linewidth=1.0)
            positive &= bool(np.nanmin(values) > 0)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path, dpi=90)


def panels(
    images: list[np.ndarray],
    titles: list[str],
    path: str | Path,
    ranges: list[tuple[float, float]] | None = None,
    cmaps: list[str] | None = None,
    contours: list[np.ndarray | None] | None = None,
    suptitle: str | None = None,
) -> None:
    """A row of 2D panels (e.g. COVID input | pseudo-healthy | difference), written atomically."""
    plt = _pyplot()

    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for i, (ax, image) in enumerate(zip(axes[0], images, strict=True)):
        lo, hi = ranges[i] if ranges else (float(image.min()), float(image.max()))
        ax.imshow(image, cmap=cmaps[i] if cmaps else "gray", vmin=lo, vmax=hi, interpolation="nearest")
        if contours and contours[i] is not None and np.any(contours[i]):
            ax.contour(contours[i], levels=[0.5], colors="red", linewidths=0.7)
        ax.set_title(titles[i], fontsize=9)
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    _save(fig, path, dpi=90)


def mask_comparison(
    images: list[np.ndarray],
    references: list[np.ndarray],
    predictions: list[list[np.ndarray]],
    row_titles: list[str],
    method_titles: list[str],
    path: str | Path,
    aspect: float = 1.0,
) -> None:
    """One row per case: the CT slice (lung window, HU) with the reference lesion filled in red,
    then one panel per method with its prediction filled in cyan and the reference outlined in red.

    `images[i]` is a 2D ``[y, x]`` slice in HU; `references[i]` and `predictions[i][j]` are bool
    masks of its shape (method `j`); `aspect` is the pixel height / width (y / x spacing in mm).
    """
    plt = _pyplot()
    n_rows, n_cols = len(images), 1 + len(method_titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols, 2.7 * n_rows), squeeze=False)
    for i, (image, ref) in enumerate(zip(images, references, strict=True)):
        masks = [(ref, (1.0, 0.0, 0.0, 0.4), None)]
        masks += [(pred, (0.0, 0.9, 1.0, 0.45), ref) for pred in predictions[i]]
        titles = [f"{row_titles[i]}: ground truth", *method_titles]
        for ax, (mask, colour, outline), title in zip(axes[i], masks, titles, strict=True):
            ax.imshow(image, cmap="gray", vmin=LUNG_WINDOW_HU[0], vmax=LUNG_WINDOW_HU[1], aspect=aspect)
            overlay = np.zeros((*image.shape, 4), dtype=np.float32)
            overlay[np.asarray(mask, dtype=bool)] = colour
            ax.imshow(overlay, aspect=aspect, interpolation="nearest")
            if outline is not None and np.any(outline):
                ax.contour(np.asarray(outline, dtype=bool), levels=[0.5], colors="red", linewidths=0.7)
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    fig.tight_layout()
    _save(fig, path, dpi=80)

"""Figures (PNG): overlay montages of CT slices with lesion and lung outlines, loss curves, panels.

matplotlib is imported inside the functions (Agg backend, no display needed), so importing this
module is cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidseg.io.atomic import atomic_path


def _pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, dpi: int) -> None:
    """Lay `fig` out tightly, write it as PNG to `path` atomically and free it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    _pyplot().close(fig)


LUNG_WINDOW_HU = (-1350.0, 150.0)  # width 1500, level -600
LESION_RGBA = (255, 0, 0, 0.35)  # lesion fill: red, 35 % opaque; outlined in opaque red
LUNG_RGB = (255, 255, 0)  # lung outline
MARK_RGB = (0, 200, 255)  # ticks on the coronal view at the axial slices shown
PANEL_PX = 400  # width of an axial panel in the montage (pixels)


def _per_slice(mask: np.ndarray, within: np.ndarray | None = None, index=None) -> np.ndarray:
    """Non-zero voxels of the axial slices `index` (default all) of `mask`, inside the non-zero
    voxels of `within` if given; slice by slice, so no temporary as large as the volume."""
    index = range(len(mask)) if index is None else index
    if within is None:
        return np.array([np.count_nonzero(mask[k]) for k in index], dtype=np.int64)
    return np.array([np.count_nonzero(np.logical_and(mask[k], within[k])) for k in index], dtype=np.int64)


def _spread(
    chosen: list[int], candidates: np.ndarray, area: np.ndarray, n: int, gap: int, ends: tuple[int, int]
) -> None:
    """Add candidates to `chosen` (in place) up to `n`, each the one farthest from those chosen and
    from the ends of the range ``ends[0]..ends[1]`` (ties: more `area`), at least `gap` apart."""
    if candidates.size == 0:
        return
    tie_break = 0.5 * area[candidates] / (float(area[candidates].max()) + 1.0)
    while len(chosen) < n:
        points = np.array([*chosen, ends[0] - 1, ends[1] + 1])
        distance = np.abs(candidates[:, None] - points[None, :]).min(axis=1)
        score = np.where(distance >= gap, distance + tie_break, -1.0)
        best = int(np.argmax(score))
        if score[best] < 0:
            return
        chosen.append(int(candidates[best]))


def montage_slices(
    lesion_zyx: np.ndarray | None, lung_zyx: np.ndarray | None, n_slices: int, depth: int
) -> list[int]:
    """Axial slice indices to show, ascending: the largest lesions inside the lungs, then the lungs.

    Slices are ranked by lesion area inside the lung mask and taken best first, each at least
    ``gap`` slices from those already taken (``gap`` = the lungs' height / (2 `n_slices`), at
    least 2: no neighbours). Free places go to slices spread evenly over the part of the lungs
    where a slice holds at least half the largest lung area, then over all slices with lung, and
    only then are neighbours allowed. With a lung mask no slice without lung is shown; without one
    (or an empty one) lesion area anywhere ranks and the whole volume is the lungs' extent.
    """
    n_slices = max(1, min(int(n_slices), depth))
    lung = None if lung_zyx is None else np.asarray(lung_zyx)
    area = None if lung is None else _per_slice(lung)
    if area is None or not area.any():
        lung, area = None, np.ones(depth, np.int64)
    with_lung = np.flatnonzero(area > 0)
    lo, hi = int(with_lung[0]), int(with_lung[-1])
    gap = max(2, int(round((hi - lo + 1) / (2 * n_slices))))

    chosen: list[int] = []
    if lesion_zyx is not None:
        lesion = np.asarray(lesion_zyx)
        counts = _per_slice(lesion)
        if lung is not None:
            has = np.flatnonzero(counts)
            counts[has] = _per_slice(lesion, lung, has)
        for k in np.argsort(-counts, kind="stable"):
            if len(chosen) == n_slices or counts[k] == 0:
                break
            if all(abs(int(k) - c) >= gap for c in chosen):
                chosen.append(int(k))
    large = with_lung[area[with_lung] >= 0.5 * area.max()]
    _spread(chosen, large, area, n_slices, gap, (int(large[0]), int(large[-1])))
    _spread(chosen, with_lung, area, n_slices, gap, (lo, hi))
    _spread(chosen, with_lung, area, n_slices, 1, (lo, hi))
    return sorted(chosen)


def coronal_slice(lesion_zyx: np.ndarray | None, lung_zyx: np.ndarray | None) -> int | None:
    """The coronal (``y``) index to show: among the coronal slices holding at least half the largest
    lung area, the one with the most lesion inside the lungs (the most lung when there is none).
    None without lungs. Counted on about 64 axial slices and 256 columns (a view, not a measure)."""
    if lung_zyx is None:
        return None
    depth, _, width = np.shape(lung_zyx)
    sample = (slice(None, None, max(1, depth // 64)), slice(None), slice(None, None, max(1, width // 256)))
    lung = np.asarray(lung_zyx)[sample] != 0
    area = np.count_nonzero(lung, axis=(0, 2))
    if not area.any():
        return None
    score = area / area.max()  # in (0, 1]: decides only where there is no lesion
    if lesion_zyx is not None:
        score += 2.0 * np.count_nonzero(np.logical_and(np.asarray(lesion_zyx)[sample], lung), axis=(0, 2))
    score[area < 0.5 * area.max()] = -1.0
    return int(np.argmax(score))


def _outline(labels: np.ndarray) -> np.ndarray:
    """Pixels of a label image that are > 0 with a 4-neighbour of another label (or the border)."""
    padded = np.pad(labels, 1)
    centre = padded[1:-1, 1:-1]
    edge = (padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre)
    edge |= (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre)
    return edge & (centre != 0)


def _render(
    hu: np.ndarray, lesion: np.ndarray | None, lung: np.ndarray | None, size: tuple[int, int]
) -> np.ndarray:
    """One 2D panel as uint8 RGB of `size` (h, w) pixels: nearest-neighbour resampled, lung window,
    lesion filled and outlined, lungs outlined (outlines 1 pixel at the output size)."""
    rows = ((np.arange(size[0]) + 0.5) * hu.shape[0] / size[0]).astype(np.intp)
    cols = ((np.arange(size[1]) + 0.5) * hu.shape[1] / size[1]).astype(np.intp)
    grid = np.ix_(rows, cols)
    lo, hi = LUNG_WINDOW_HU
    gray = np.clip((np.asarray(hu[grid], dtype=np.float32) - lo) * (255.0 / (hi - lo)), 0.0, 255.0)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    if lung is not None:
        rgb[_outline(np.asarray(lung[grid]))] = LUNG_RGB
    if lesion is not None:
        shown = np.asarray(lesion[grid]) != 0
        alpha = LESION_RGBA[3]
        rgb[shown] = rgb[shown] * (1.0 - alpha) + np.array(LESION_RGBA[:3], np.float32) * alpha
        rgb[_outline(shown)] = LESION_RGBA[:3]
    return rgb.astype(np.uint8)


PAD, LABEL_H, LINE_H = 8, 18, 20  # montage margins and gaps, panel label height, title line height (px)


@dataclass(frozen=True)
class _AxialGrid:
    """Where the axial panels of a montage go (pixels): `ncols` columns of `panel_w` x `panel_h`
    panels, each under a label line, starting `top` pixels down (below the title)."""

    top: int
    panel_w: int
    panel_h: int
    ncols: int
    nrows: int

    @property
    def cell_h(self) -> int:
        return LABEL_H + self.panel_h

    @property
    def width(self) -> int:
        return self.ncols * self.panel_w + (self.ncols - 1) * PAD

    @property
    def height(self) -> int:
        return self.nrows * self.cell_h + (self.nrows - 1) * PAD

    def origin(self, i: int) -> tuple[int, int]:
        """(x, y) of the top left corner of the `i`-th cell (label above panel)."""
        row, col = divmod(i, self.ncols)
        return PAD + col * (self.panel_w + PAD), self.top + row * (self.cell_h + PAD)


@dataclass(frozen=True)
class _CoronalView:
    """The coronal panel: slice `y` of the axial slices `z0`..`z1 - 1`, drawn `height` x `width` px."""

    y: int
    z0: int
    z1: int
    height: int
    width: int


def _axial_grid(
    shape_zyx: tuple[int, int, int], spacing: tuple[float, float, float], n_panels: int, n_title_lines: int
) -> _AxialGrid:
    """Up to 3 panels a row, PANEL_PX wide, as high as the slice's aspect ratio (`spacing`, mm)
    says (between a quarter and twice the width)."""
    _, height, width = shape_zyx
    _, sy, sx = spacing
    panel_h = int(round(np.clip(PANEL_PX * height * sy / (width * sx), PANEL_PX / 4, 2 * PANEL_PX)))
    ncols = min(n_panels, 3)
    return _AxialGrid(
        top=PAD + LINE_H * n_title_lines,
        panel_w=PANEL_PX,
        panel_h=panel_h,
        ncols=ncols,
        nrows=math.ceil(n_panels / ncols),
    )


def _coronal_view(
    lesion: np.ndarray | None,
    lung: np.ndarray | None,
    shape_zyx: tuple[int, int, int],
    spacing: tuple[float, float, float],
    grid: _AxialGrid,
) -> _CoronalView | None:
    """The coronal slice of :func:`coronal_slice` cropped to the lungs' height (5 % margin), as high
    as the axial grid and at most 1.25 axial panels wide; None without lungs over >= 4 slices."""
    y_index = coronal_slice(lesion, lung)
    if y_index is None:
        return None
    depth, _, width = shape_zyx
    sz, _, sx = spacing
    with_lung = np.flatnonzero(_per_slice(lung))
    z_lo, z_hi = int(with_lung[0]), int(with_lung[-1])
    if z_hi - z_lo + 1 < 4:
        return None
    margin = max(1, int(round(0.05 * (z_hi - z_lo + 1))))
    z0, z1 = max(0, z_lo - margin), min(depth, z_hi + margin + 1)
    ratio = (width * sx) / ((z1 - z0) * sz)  # width / height of the coronal view
    c_h = grid.height - LABEL_H
    c_w = max(16, min(int(round(c_h * ratio)), int(1.25 * grid.panel_w)))
    c_h = max(1, min(c_h, int(round(c_w / ratio))))
    return _CoronalView(y_index, z0, z1, c_h, c_w)


def _draw_axial(
    canvas, hu, lesion, lung, slices: list[int], grid: _AxialGrid
) -> list[tuple[float, float, str]]:
    """Lay the axial panels of `slices` into `canvas`; return their labels ((x, y) centre, text)."""
    labels = []
    for i, k in enumerate(slices):
        x0, y0 = grid.origin(i)
        canvas[y0 + LABEL_H : y0 + grid.cell_h, x0 : x0 + grid.panel_w] = _render(
            hu[k],
            None if lesion is None else lesion[k],
            None if lung is None else lung[k],
            (grid.panel_h, grid.panel_w),
        )
        labels.append((x0 + grid.panel_w / 2, y0 + LABEL_H / 2, f"z = {k}"))
    return labels


def _draw_coronal(
    canvas, hu, lesion, lung, slices: list[int], grid: _AxialGrid, view: _CoronalView
) -> tuple[float, float, str]:
    """Lay the coronal panel right of the axial grid (head at the top) with cyan ticks at the axial
    `slices` shown; return its label."""
    x0, y0 = PAD + grid.width + 2 * PAD, grid.top + LABEL_H
    flip = slice(view.z1 - 1, None if view.z0 == 0 else view.z0 - 1, -1)  # the head at the top
    canvas[y0 : y0 + view.height, x0 : x0 + view.width] = _render(
        hu[flip, view.y],
        None if lesion is None else lesion[flip, view.y],
        lung[flip, view.y],
        (view.height, view.width),
    )
    for k in slices:
        if view.z0 <= k < view.z1:
            row = y0 + min(view.height - 1, int((view.z1 - 1 - k + 0.5) * view.height / (view.z1 - view.z0)))
            canvas[max(row - 1, y0) : row + 1, x0 - PAD : x0] = MARK_RGB
            canvas[max(row - 1, y0) : row + 1, x0 + view.width : x0 + view.width + PAD] = MARK_RGB
    return x0 + view.width / 2, grid.top + LABEL_H / 2, f"coronal, y = {view.y}"


def _checked_masks(hu_zyx, lesion_zyx, lung_zyx) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The CT and masks as arrays; ValueError unless the CT is 3D and each mask has its shape."""
    hu = np.asarray(hu_zyx)
    if hu.ndim != 3:
        raise ValueError(f"expected a [z, y, x] volume, got shape {hu.shape}")
    for name, mask in (("lesion", lesion_zyx), ("lung", lung_zyx)):
        if mask is not None and np.shape(mask) != hu.shape:
            raise ValueError(f"{name} mask shape {np.shape(mask)} differs from the image {hu.shape}")
    lesion = None if lesion_zyx is None else np.asarray(lesion_zyx)
    lung = None if lung_zyx is None else np.asarray(lung_zyx)
    return hu, lesion, lung


def overlay_montage(
    hu_zyx: np.ndarray,
    lesion_zyx: np.ndarray | None,
    lung_zyx: np.ndarray | None = None,
    path: str | Path | None = None,
    n_slices: int = 6,
    title: str | None = None,
    spacing_zyx: tuple[float, float, float] | None = None,
    coronal: bool = True,
) -> list[int]:
    """Write a PNG montage of axial slices (and a coronal one) in a lung window, atomically.

    `hu_zyx` is a canonical ``[z, y, x]`` CT in HU (anterior at the top of each axial panel, the
    patient's left on the right; the coronal panel has the head at the top); `lesion_zyx` (filled
    in semi-transparent red, outlined) and `lung_zyx` (thin yellow outline of each lung label) are
    masks of the same shape, either may be None. The axial slices are those of
    :func:`montage_slices`; with `coronal` and lungs over at least 4 slices, the coronal slice of
    :func:`coronal_slice` (cropped to the lungs' height) is drawn on the right, with cyan ticks
    at the axial slices shown. `spacing_zyx` (mm) sets the pixel aspect ratio. `path` (required)
    is the PNG to write. Returns the axial slice indices shown.

    The panels are composed in numpy at their output size and matplotlib only adds the text, so a
    512 x 512 x 300 CT costs a few tenths of a second.
    """
    if path is None:
        raise ValueError("overlay_montage needs the path of the PNG to write")
    hu, lesion, lung = _checked_masks(hu_zyx, lesion_zyx, lung_zyx)
    spacing = (1.0, 1.0, 1.0) if spacing_zyx is None else tuple(float(v) for v in spacing_zyx)
    slices = montage_slices(lesion, lung, n_slices, hu.shape[0])
    title_lines = title.splitlines() if title else []
    grid = _axial_grid(hu.shape, spacing, len(slices), len(title_lines))
    view = _coronal_view(lesion, lung, hu.shape, spacing, grid) if coronal else None

    canvas_w = PAD + grid.width + PAD + (view.width + 2 * PAD if view else 0)
    canvas_h = grid.top + max(grid.height, LABEL_H + view.height if view else 0) + PAD
    canvas = np.full((canvas_h, canvas_w, 3), 255, dtype=np.uint8)
    labels = _draw_axial(canvas, hu, lesion, lung, slices, grid)
    if view:
        labels.append(_draw_coronal(canvas, hu, lesion, lung, slices, grid, view))
    _write_png(canvas, labels, title_lines, PAD, LINE_H, path)
    return slices


def _write_png(
    canvas: np.ndarray,
    labels: list[tuple[float, float, str]],
    title_lines: list[str],
    pad: int,
    line_h: int,
    path: str | Path,
) -> None:
    """`canvas` (uint8 RGB on white) with the texts drawn by matplotlib, as PNG, atomically.

    matplotlib only draws the text on a white figure of the canvas's size; the panels are laid in
    with a minimum (white on one is the other's content), and PIL writes the PNG with light zlib
    compression: drawing and deflating big images is what made a montage slow."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    h, w = canvas.shape[:2]
    dpi = 100
    fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi, facecolor="white")
    agg = FigureCanvasAgg(fig)
    for x, y, text in labels:
        fig.text(x / w, 1.0 - y / h, text, ha="center", va="center", fontsize=8)
    for j, line in enumerate(title_lines):
        fig.text(0.5, 1.0 - (pad / 2 + line_h * (j + 0.5)) / h, line, ha="center", va="center", fontsize=10)
    agg.draw()
    text = np.asarray(agg.buffer_rgba())[:h, :w, :3]
    image = canvas.copy()
    np.minimum(image[: text.shape[0], : text.shape[1]], text, out=image[: text.shape[0], : text.shape[1]])
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", compress_level=3)


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
    _save(fig, path, dpi=80)

"""Matplotlib figures of a run: learning curves, adaptation curves, episode gallery, regression
fits and the comparison bar chart of ``report``.

Pure functions from plain numbers (numpy arrays, lists) to a ``matplotlib.figure.Figure``; no
pyplot, so no global figure state and no GUI backend (the Agg canvas renders PNGs anywhere).
Callers save with :func:`save_figure` or turn a figure into pixels with :func:`figure_array`
(for ``wandb.Image``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from lightmeta.report import TableRow

GALLERY_CLASSES = 5  # rows of the episode gallery
GALLERY_SUPPORT = 2  # support images shown per class
GALLERY_QUERY = 4  # query images shown per class
_RIGHT, _WRONG = "#1a7f37", "#cf222e"


@dataclass
class Curve:
    """A metric over training steps; ``ci95`` (same length) for evaluation metrics."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    ci95: list[float] = field(default_factory=list)


@dataclass
class AdaptationCurve:
    """Query metrics after ``0..K`` inner steps at one evaluation: ``metrics[name] = (means, cis)``."""

    global_step: int
    metrics: dict[str, tuple[list[float], list[float]]]


def _figure(width: float, height: float) -> Figure:
    # no layout engine: constrained/tight layout costs more than drawing these figures
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _grid(fig: Figure, rows: int, cols: int, *, left: float = 0.6, right: float = 0.15, bottom: float = 0.5,
          top: float = 0.35, wspace: float = 0.28, hspace: float = 0.4) -> np.ndarray:
    """``rows x cols`` axes with margins given in inches (fixed room for tick labels and titles)."""
    w, h = fig.get_size_inches()
    return fig.subplots(rows, cols, squeeze=False, gridspec_kw={
        "left": left / w, "right": 1 - right / w, "bottom": bottom / h, "top": 1 - top / h,
        "wspace": wspace, "hspace": hspace})


def save_figure(fig: Figure, path: Path) -> Path:
    """Write a PNG (via a temporary file, so a reader never sees half an image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", pil_kwargs={"compress_level": 1})  # fast: these are small plots
    tmp.replace(path)
    return path


def figure_array(fig: Figure) -> np.ndarray:
    """The rendered figure as ``[H, W, 3]`` uint8 pixels."""
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _smooth(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    w = max(1, len(v) // 50)
    if w == 1:
        return v
    kernel = np.ones(w) / w
    head = np.cumsum(v[: w - 1]) / np.arange(1, w)  # running mean while the window fills
    return np.concatenate([head, np.convolve(v, kernel, mode="valid")])


def _metric_title(name: str, regression: bool) -> str:
    return {"acc": "accuracy", "loss": "MSE" if regression else "loss"}.get(name, name)


def learning_curves(train: dict[str, Curve], val: dict[str, Curve], gap: dict[str, Curve], regression: bool) -> Figure:
    """Loss (and accuracy) over meta-training: train after adaptation, train before adaptation
    (``<m>_step0``), validation with its 95% CI; a last panel with the train/val gap."""
    names = [n for n in ("loss", "acc") if n in train or n in val]
    panels = names + (["gap"] if gap else [])
    fig = _figure(4.2 * max(1, len(panels)), 3.4)
    axes = _grid(fig, 1, max(1, len(panels)))[0]
    for ax, name in zip(axes, panels):
        if name == "gap":
            for key, c in gap.items():
                ax.plot(c.steps, c.values, marker="o", label=f"{key}: train - val" if key == "acc" else f"{key}: val - train")
            ax.axhline(0.0, color="0.6", lw=0.8)
            ax.set_title("meta-overfitting gap")
        else:
            if name in train and train[name].steps:
                ax.plot(train[name].steps, _smooth(train[name].values), label="train (after adaptation)")
            pre = f"{name}_step0"
            if pre in train and train[pre].steps:
                ax.plot(train[pre].steps, _smooth(train[pre].values), label="train (before adaptation)", alpha=0.7)
            if name in val and val[name].steps:
                c = val[name]
                ax.errorbar(c.steps, c.values, yerr=c.ci95 or None, marker="o", capsize=3, label="validation ± 95% CI")
            ax.set_title(_metric_title(name, regression))
        ax.set_xlabel("meta-training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def adaptation_curves(curves: Sequence[AdaptationCurve], split: str, regression: bool) -> Figure:
    """Query metric vs inner steps; one line per evaluation (darker = later), the latest with its CI."""
    names = [n for n in ("acc", "loss") if curves and n in curves[-1].metrics]
    fig = _figure(4.2 * max(1, len(names)), 3.4)
    axes = _grid(fig, 1, max(1, len(names)))[0]
    for ax, name in zip(axes, names):
        shown = [c for c in curves if name in c.metrics]
        for i, c in enumerate(shown):
            means, cis = c.metrics[name]
            x = np.arange(len(means))
            last = i == len(shown) - 1
            color = colormaps["Blues"](0.35 + 0.65 * (i + 1) / len(shown))  # later = darker
            ax.plot(x, means, color=color, lw=2.2 if last else 1.0, alpha=1.0 if last else 0.6,
                    label=f"step {c.global_step}" if last or i == 0 else None, marker="o" if last else None)
            if last and cis:
                lo, hi = np.asarray(means) - np.asarray(cis), np.asarray(means) + np.asarray(cis)
                ax.fill_between(x, lo, hi, color=color, alpha=0.2)
        ax.set_xlabel("inner steps")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{split} query {_metric_title(name, regression)} vs inner steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def _tile(x: np.ndarray, border: tuple[float, float, float], pad: int) -> np.ndarray:
    """A ``[C, H, W]`` image scaled to its own range, as RGB ``[H, W, 3]`` framed by ``pad`` pixels of ``border``."""
    img = np.moveaxis(np.asarray(x, dtype=float), 0, -1) if x.ndim == 3 else np.asarray(x, dtype=float)[..., None]
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    if img.shape[-1] != 3:
        img = np.repeat(img[..., :1], 3, axis=-1)
    out = np.empty((img.shape[0] + 2 * pad, img.shape[1] + 2 * pad, 3))
    out[:] = border
    out[pad:-pad, pad:-pad] = img
    return out


def episode_gallery(support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray, query_y: np.ndarray,
                    predicted: np.ndarray, title: str = "") -> Figure:
    """One episode: a row per class (at most :data:`GALLERY_CLASSES`) with a few support images
    and query images labelled ``pred p / true t`` (framed green when right, red when wrong).

    Drawn as one mosaic image in a single axes, which renders far faster than a grid of axes.
    """
    classes = sorted(set(support_y.tolist()))[:GALLERY_CLASSES]
    k = min(GALLERY_SUPPORT, max(int((support_y == c).sum()) for c in classes))
    q = min(GALLERY_QUERY, max(int((query_y == c).sum()) for c in classes))
    h, w = support_x.shape[-2:]
    pad = max(1, min(h, w) // 12)
    cell_h, cell_w = h + 2 * pad, w + 2 * pad
    gap_x, gap_y = cell_w // 6, cell_h // 3  # room between cells for the labels
    sep = cell_w // 2  # between the support and query columns
    height = len(classes) * (cell_h + gap_y) + gap_y
    width = (k + q) * (cell_w + gap_x) + sep + gap_x
    canvas = np.ones((height, width, 3))
    labels: list[tuple[float, float, str, str]] = []
    for r, c in enumerate(classes):
        top = gap_y + r * (cell_h + gap_y)
        cells = [(i, None) for i in np.flatnonzero(support_y == c)[:k]]
        cells += [(None, i) for i in np.flatnonzero(query_y == c)[:q]]
        for j, (s_i, q_i) in enumerate(cells):
            left = gap_x + j * (cell_w + gap_x) + (sep if j >= k else 0)
            if s_i is not None:
                tile, text, color = _tile(support_x[s_i], (0.55, 0.55, 0.55), pad), f"support {int(c)}", "black"
            else:
                right = int(predicted[q_i]) == int(query_y[q_i])
                color = _RIGHT if right else _WRONG
                rgb = tuple(int(color[i:i + 2], 16) / 255 for i in (1, 3, 5))
                tile, text = _tile(query_x[q_i], rgb, pad), f"pred {int(predicted[q_i])} / true {int(query_y[q_i])}"  # type: ignore[arg-type]
            canvas[top:top + cell_h, left:left + cell_w] = tile
            labels.append((left + cell_w / 2, top - 1, text, color))
    scale = 1.15 / cell_w  # inches per pixel: about 1.15 inch per image
    fig = _figure(width * scale, height * scale + (0.3 if title else 0.0))
    ax = fig.add_axes((0.0, 0.0, 1.0, height * scale / (height * scale + (0.3 if title else 0.0))))
    ax.imshow(canvas, interpolation="nearest")
    ax.axis("off")
    for x, y, text, color in labels:
        ax.text(x, y, text, ha="center", va="bottom", fontsize=7, color=color)
    if title:
        fig.suptitle(title, fontsize=9, y=0.995, va="top")
    return fig


@dataclass
class RegressionFit:
    """One 1-D regression task: its points and the predictions on a grid before/after adaptation."""

    support_x: np.ndarray
    support_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray
    grid: np.ndarray
    before: np.ndarray | None
    after: np.ndarray


def regression_fits(fits: Sequence[RegressionFit], title: str = "") -> Figure:
    """A panel per task: support and query points, the fit before and after adaptation."""
    cols = min(len(fits), 2)
    rows = math.ceil(len(fits) / cols)
    fig = _figure(4.2 * cols, 3.0 * rows)
    axes = _grid(fig, rows, cols, top=0.55 if title else 0.35).ravel()
    for ax, f in zip(axes, fits):
        order = np.argsort(f.grid)
        if f.before is not None:
            ax.plot(f.grid[order], f.before[order], "--", color="0.5", label="before adaptation")
        ax.plot(f.grid[order], f.after[order], color="#0969da", label="after adaptation")
        ax.scatter(f.query_x, f.query_y, s=14, color="0.3", marker="x", label="query")
        ax.scatter(f.support_x, f.support_y, s=22, color="#cf222e", label="support")
        ax.grid(alpha=0.3)
    for ax in axes[len(fits):]:
        ax.axis("off")
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def comparison_chart(rows: Sequence["TableRow"]) -> Figure:
    """Bars of one metric for several runs with 95% CI error bars; the paper's figure as a marker."""
    pct = rows[0].metric.startswith("acc") if rows else False
    scale = 100.0 if pct else 1.0
    fig = _figure(max(4.0, 1.3 * len(rows) + 1.5), 4.0)
    ax = _grid(fig, 1, 1, left=0.8, bottom=0.95, top=0.75)[0, 0]
    x = np.arange(len(rows))
    ax.bar(x, [r.mean * scale for r in rows], yerr=[r.ci95 * scale for r in rows], capsize=5,
           color="#54aeff", edgecolor="#0969da", label="mean ± 95% CI")
    papers = [(i, r) for i, r in enumerate(rows) if r.paper is not None]
    if papers:
        ax.errorbar([i for i, _ in papers], [(r.paper or 0.0) * scale for _, r in papers],
                    yerr=[(r.paper_ci95 or 0.0) * scale for _, r in papers], fmt="D", color="black",
                    capsize=4, label="paper")
    ax.set_xticks(x, [f"{r.algorithm}\n{r.data} {r.setting}\n{r.run}" for r in rows], fontsize=7)
    ax.set_ylabel(f"{rows[0].label} (%)" if pct and rows else (rows[0].label if rows else ""))
    if pct:
        lows = [r.mean - r.ci95 for r in rows] + [r.paper for r in rows if r.paper is not None]
        ax.set_ylim(max(0.0, min(lows) * scale - 10.0), 102.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False, fontsize="small")
    fig.suptitle(f"meta-test {rows[0].label if rows else ''}: {len(rows)} runs", fontsize=10, y=0.99, va="top")
    return fig

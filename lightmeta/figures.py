"""Figure and table callbacks: W&B media each validation/test, the same figures as PNG files.

* :class:`EvaluationFigures`: at the end of every validation (and of the test) the adaptation
  curves (query accuracy/loss vs inner steps, ``<split>/adaptation_<metric>`` as a W&B line
  plot over a ``wandb.Table``), the episode gallery of the first evaluation task
  (``<split>/episode_gallery``, images with predicted vs true labels) or, for 1-D regression,
  the fits before/after adaptation (``<split>/regression_fits``), and the learning curves;
  PNGs under ``RUN_DIR/plots``.
* :class:`ResultsTable`: at the end of the test, ``test/results_table`` (a ``wandb.Table``: the
  setting, mean ± 95% CI, number of tasks and the paper's figure) and ``RUN_DIR/paper.json``.

Only the global-zero process draws; plotting happens at evaluation ends, never per step.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from matplotlib.figure import Figure

from lightmeta.callbacks import RunHistory
from lightmeta.dashboard import DashboardConfig
from lightmeta.episodes import TaskBatch
from lightmeta.meta_learner import MetaLearner
from lightmeta.paper import PaperFigure
from lightmeta.plots import (
    AdaptationCurve,
    RegressionFit,
    adaptation_curves,
    episode_gallery,
    figure_array,
    learning_curves,
    regression_fits,
    save_figure,
)
from lightmeta.report import COLUMNS, save_paper_figures, table_rows

FIT_TASKS = 4  # regression tasks drawn per evaluation
FIT_GRID = 200  # points of the regression fit curves


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def log_media(trainer: L.Trainer, media: dict[str, Any]) -> None:
    """Log W&B objects (charts, images, tables) at the current step, W&B loggers only."""
    if media and trainer.is_global_zero:
        for logger in wandb_loggers(trainer):
            logger.log_metrics(media, step=trainer.global_step)


def adaptation_curve(step: int, results: dict[str, dict[str, float]]) -> AdaptationCurve | None:
    """The ``<m>_step0..K`` metrics of an evaluation as curves; ``None`` without inner steps."""
    metrics: dict[str, tuple[list[float], list[float]]] = {}
    for name in ("acc", "loss"):
        steps = sorted(int(m[1]) for k in results if (m := re.fullmatch(rf"{name}_step(\d+)", k)))
        if len(steps) >= 2:
            metrics[name] = ([results[f"{name}_step{s}"]["mean"] for s in steps],
                             [results[f"{name}_step{s}"]["ci95"] for s in steps])
    return AdaptationCurve(step, metrics) if metrics else None


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _labels(t: torch.Tensor) -> np.ndarray:
    return t.detach().long().cpu().numpy()


class EvaluationFigures(L.Callback):
    """Adaptation curves, episode gallery / regression fits and learning curves (see module docstring)."""

    def __init__(self, config: DashboardConfig, history: RunHistory, run_dir: Path) -> None:
        self.config = config
        self.history = history
        self.plot_dir = run_dir / "plots"
        self.curves: dict[str, list[AdaptationCurve]] = {"val": [], "test": []}
        self._episode: dict[str, Any] = {}
        self._points_drawn = 0  # learning-curve points in the last drawing (skip redrawing the same)

    # ------------------------------------------------------------------ what to show
    def _wants_figures(self, trainer: L.Trainer) -> bool:
        return trainer.is_global_zero and (self.config.plots or bool(wandb_loggers(trainer)))

    def _capture(self, trainer: L.Trainer, pl_module: MetaLearner, batch: TaskBatch, split: str) -> None:
        """Adapt to the first task(s) of the first evaluation batch and keep what the gallery shows."""
        if not self.config.gallery or not self._wants_figures(trainer):
            return
        info = pl_module.task_info
        if info.problem == "classification" and len(info.in_shape) == 3:
            task = batch.task(0)
            state = pl_module.adapt(task.support_x, task.support_y, task.spec)
            with torch.no_grad():
                predicted = pl_module.predict(state, task.query_x).argmax(-1)
            self._episode[split] = ("gallery", [_numpy(task.support_x), _labels(task.support_y), _numpy(task.query_x),
                                               _labels(task.query_y), _labels(predicted)])
        elif info.problem == "regression" and tuple(info.in_shape) == (1,) and info.out_dim == 1:
            fits = []
            for i in range(min(FIT_TASKS, len(batch))):
                task = batch.task(i)
                xs = torch.cat([task.support_x, task.query_x]).flatten()
                grid = torch.linspace(float(xs.min()), float(xs.max()), FIT_GRID, device=xs.device, dtype=xs.dtype).unsqueeze(1)
                state = pl_module.adapt(task.support_x, task.support_y, task.spec)
                before = pl_module.predict_unadapted(grid)
                with torch.no_grad():
                    after = pl_module.predict(state, grid)
                fits.append(RegressionFit(_numpy(task.support_x).ravel(), _numpy(task.support_y).ravel(),
                                          _numpy(task.query_x).ravel(), _numpy(task.query_y).ravel(),
                                          _numpy(grid).ravel(), None if before is None else _numpy(before).ravel(),
                                          _numpy(after).ravel()))
            self._episode[split] = ("fits", fits)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            assert isinstance(pl_module, MetaLearner)
            self._capture(trainer, pl_module, batch, "val")

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0:
            assert isinstance(pl_module, MetaLearner)
            self._capture(trainer, pl_module, batch, "test")

    # ------------------------------------------------------------------ drawing
    def _emit(self, trainer: L.Trainer, fig: Figure, name: str, key: str | None, caption: str) -> None:
        """Save ``fig`` as ``plots/<name>.png`` and/or log it as a ``wandb.Image`` under ``key``."""
        try:
            if self.config.plots:
                save_figure(fig, self.plot_dir / f"{name}.png")
            if key is not None and wandb_loggers(trainer):
                import wandb

                log_media(trainer, {key: wandb.Image(figure_array(fig), caption=caption)})
        finally:
            fig.clear()

    def _draw_evaluation(self, trainer: L.Trainer, pl_module: MetaLearner, split: str) -> None:
        regression = not pl_module.is_classification
        curve = adaptation_curve(trainer.global_step, pl_module.last_results.get(split, {}))
        media: dict[str, Any] = {}
        if curve is not None:
            self.curves[split].append(curve)
            if self.config.plots:
                save_figure(adaptation_curves(self.curves[split], split, regression), self.plot_dir / f"adaptation_{split}.png")
            if wandb_loggers(trainer):
                import wandb

                for name, (means, cis) in curve.metrics.items():
                    table = wandb.Table(columns=["inner_step", name, f"{name}_ci95"],
                                        data=[[k, m, c] for k, (m, c) in enumerate(zip(means, cis))])
                    title = f"{split} query {name} vs inner steps (step {trainer.global_step})"
                    media[f"{split}/adaptation_{name}"] = wandb.plot.line(table, "inner_step", name, title=title)
        log_media(trainer, media)
        kind, episode = self._episode.pop(split, (None, None))
        where = f"{split}, step {trainer.global_step}"
        if kind == "gallery":
            fig = episode_gallery(*episode, title=f"first {split} task ({where})")
            self._emit(trainer, fig, f"gallery_{split}", f"{split}/episode_gallery", f"first {split} task, {where}")
        elif kind == "fits":
            fig = regression_fits(episode, title=f"first {split} tasks ({where})")
            self._emit(trainer, fig, f"fits_{split}", f"{split}/regression_fits", f"fits before/after adaptation, {where}")

    def _draw_learning_curves(self, pl_module: MetaLearner) -> None:
        h = self.history
        points = sum(len(c.steps) for c in (*h.train.values(), *h.val.values()))
        if self.config.plots and points and points != self._points_drawn:
            save_figure(learning_curves(h.train, h.val, h.gap, not pl_module.is_classification),
                        self.plot_dir / "learning_curves.png")
            self._points_drawn = points

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._wants_figures(trainer):
            return
        assert isinstance(pl_module, MetaLearner)
        self._draw_evaluation(trainer, pl_module, "val")
        self._draw_learning_curves(pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._wants_figures(trainer):
            assert isinstance(pl_module, MetaLearner)
            self._draw_evaluation(trainer, pl_module, "test")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            assert isinstance(pl_module, MetaLearner)
            self._draw_learning_curves(pl_module)


class ResultsTable(L.Callback):
    """The meta-test results next to the paper's figures: a ``wandb.Table`` and ``RUN_DIR/paper.json``."""

    def __init__(self, config: dict[str, Any], figures: list[PaperFigure], run_dir: Path) -> None:
        self.config = config
        self.figures = figures
        self.run_dir = run_dir

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        assert isinstance(pl_module, MetaLearner)
        save_paper_figures(self.run_dir, self.figures)
        if not wandb_loggers(trainer):
            return
        import wandb

        run = f"{self.config.get('experiment', 'run')}/{self.run_dir.name}"
        rows = table_rows(pl_module.last_results.get("test", {}), self.config, self.figures, run)
        table = wandb.Table(columns=COLUMNS, data=[r.values() for r in rows])
        log_media(trainer, {"test/results_table": table})

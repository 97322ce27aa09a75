"""The ``dashboard`` section of a run config: what a run shows beyond its losses.

Scalars (pre-adaptation training metrics, learning rates, gradient norm, throughput, GPU
memory, the train/val gap), figures (adaptation curves, the episode gallery or regression fits,
learning curves) as W&B media and PNG files under ``RUN_DIR/plots``, the final results table,
and an optional meta-overfitting alarm. The callbacks live in :mod:`lightmeta.callbacks` and
:mod:`lightmeta.figures`; this module holds their validated settings and the builder, which
imports them lazily, so the run config can import this module without Lightning or matplotlib.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from lightning.pytorch import Callback

    from lightmeta.config import RunConfig


class OverfittingConfig(BaseModel):
    """Meta-overfitting alarm: meta-validation stopped improving while meta-training still improves."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="watch for meta-overfitting at every validation")
    patience: int = Field(default=3, ge=1, description="validations without improvement of the monitored val metric")
    min_delta: float = Field(default=0.0, ge=0, description="smallest change that counts as an improvement")
    action: Literal["alarm", "stop"] = Field(
        default="alarm", description="alarm: log overfit/alarm=1 and warn; stop: also end training (early stopping)")


class DashboardConfig(BaseModel):
    """What the run reports to its loggers and writes to ``RUN_DIR/plots`` (README: Watching runs)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="all dashboard callbacks; false leaves the plain Lightning logs")
    pre_adaptation: bool = Field(
        default=True, description="log train/loss_step0 (acc_step0): query metrics before adaptation, one "
        "extra forward per task without gradients (learners with a head only)")
    plots: bool = Field(default=True, description="write PNG figures to RUN_DIR/plots (matplotlib)")
    gallery: bool = Field(default=True, description="episode gallery (images) or fits (1-D regression) each validation")
    overfitting: OverfittingConfig = Field(default_factory=OverfittingConfig)


def dashboard_callbacks(cfg: "RunConfig", run_dir: Path) -> list["Callback"]:
    """The callbacks ``cfg.dashboard`` asks for, in the order their hooks depend on each other
    (the monitor records the history before the gap and the figures read it).

    Reads the paper's figures from the header of the config file (:mod:`lightmeta.paper`), so
    a malformed ``# paper:`` line fails before training starts.
    """
    from lightmeta.callbacks import OverfittingMonitor, RunHistory, TrainingMonitor
    from lightmeta.figures import EvaluationFigures, ResultsTable
    from lightmeta.paper import read_paper_figures

    d = cfg.dashboard
    if not d.enabled:
        return []
    history = RunHistory()
    return [
        TrainingMonitor(d, history),
        OverfittingMonitor(d.overfitting, history),
        EvaluationFigures(d, history, run_dir),
        ResultsTable(cfg.to_dict(), read_paper_figures(cfg.source), run_dir),
    ]

"""Scalar dashboard callbacks: what meta-training is doing, step by step and per validation.

* :class:`TrainingMonitor` logs, with stable names, ``train/loss_step0`` / ``train/acc_step0``
  (query metrics of the meta-parameters before adaptation; ``train/loss``/``train/acc`` are
  after adaptation), ``lr/outer`` and the learned inner rates ``lr/inner/<parameter>``,
  ``train/grad_norm`` (outer gradient, before clipping), ``perf/episodes_per_sec`` and
  ``perf/peak_gpu_mem_gib``; it also keeps the :class:`RunHistory` the figures are drawn from.
* :class:`OverfittingMonitor` logs the train/val gap at every validation (``gap/acc``: train
  minus val accuracy; ``gap/loss``: val minus train loss; positive = meta-overfitting) and,
  when enabled, raises the alarm or stops training once validation has stopped improving for
  ``patience`` validations while training still improves.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightmeta.dashboard import DashboardConfig, OverfittingConfig
from lightmeta.episodes import TaskBatch
from lightmeta.meta_learner import MetaLearner
from lightmeta.plots import Curve

THROUGHPUT_WINDOW = 20  # training steps averaged by perf/episodes_per_sec


def log_scalars(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Send scalars to every logger at the current step (for hooks where ``self.log`` is not allowed)."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


PENDING_LIMIT = 500  # training steps kept on the device before one transfer to the host


@dataclass
class RunHistory:
    """Metrics of the run so far, for the learning-curve figure and the train/val gap.

    Training metrics stay device tensors for up to :data:`PENDING_LIMIT` steps (no device sync
    per step) and then move to ``train`` in one transfer; ``window`` holds their means over the
    steps between the last two validations.
    """

    train: dict[str, Curve] = field(default_factory=dict)
    val: dict[str, Curve] = field(default_factory=dict)
    gap: dict[str, Curve] = field(default_factory=dict)
    window: dict[str, float] = field(default_factory=dict)
    _pending: list[tuple[int, dict[str, Tensor]]] = field(default_factory=list)
    _since_val: dict[str, list[float]] = field(default_factory=dict)

    def add_train(self, step: int, metrics: dict[str, Tensor]) -> None:
        self._pending.append((step, {k: v.detach().float().reshape(()) for k, v in metrics.items()}))
        if len(self._pending) >= PENDING_LIMIT:
            self.collect()

    def collect(self) -> None:
        """Move pending training metrics to ``train`` (one device-to-host transfer per metric)."""
        for name in sorted({k for _, m in self._pending for k in m}):
            rows = [(s, m[name]) for s, m in self._pending if name in m]
            values = torch.stack([v for _, v in rows]).cpu().tolist()
            curve = self.train.setdefault(name, Curve())
            curve.steps.extend(s for s, _ in rows)
            curve.values.extend(values)
            self._since_val.setdefault(name, []).extend(values)
        self._pending.clear()

    def end_window(self) -> None:
        """At a validation: ``window`` becomes the mean training metrics since the previous one."""
        self.collect()
        self.window = {k: sum(v) / len(v) for k, v in self._since_val.items() if v}
        self._since_val = {}

    def add_eval(self, step: int, results: dict[str, dict[str, float]]) -> None:
        for name, r in results.items():
            if "_step" in name:
                continue
            curve = self.val.setdefault(name, Curve())
            curve.steps.append(step)
            curve.values.append(float(r["mean"]))
            curve.ci95.append(float(r["ci95"]))


def pre_adaptation_metrics(learner: MetaLearner, batch: TaskBatch) -> dict[str, Tensor]:
    """Mean query metrics of the meta-parameters before adaptation; ``{}`` where undefined."""
    per_task: dict[str, list[Tensor]] = {}
    for task in batch.tasks():
        preds = learner.predict_unadapted(task.query_x)
        if preds is None:
            return {}
        for k, v in learner.task_metrics(preds, task.query_y).items():
            per_task.setdefault(k, []).append(v.detach())
    return {k: torch.stack(v).mean() for k, v in per_task.items()}


def learned_inner_rates(learner: MetaLearner) -> dict[str, Tensor]:
    """Mean learned inner learning rate per adapted parameter tensor (``lr/inner/<name>``).

    Convention of Meta-SGD and MAML++: learned rates live in ``learner.inner_lrs``, an
    ``nn.ParameterDict`` keyed by ``param_key(name)`` (dots as ``__``). Learners with other
    state report it through :meth:`MetaLearner.extra_train_metrics`.
    """
    rates = getattr(learner, "inner_lrs", None)
    if not isinstance(rates, nn.ParameterDict):
        return {}
    return {f"lr/inner/{key.replace('__', '.')}": p.detach().mean() for key, p in rates.items()}


def grad_norm(module: nn.Module) -> Tensor | None:
    """Global 2-norm of the gradients of ``module``'s parameters (``None`` without gradients)."""
    norms = [p.grad.detach().norm(2) for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms).float()) if norms else None


class TrainingMonitor(L.Callback):
    """Per-step training scalars (see the module docstring) and the run's metric history."""

    def __init__(self, config: DashboardConfig, history: RunHistory) -> None:
        self.config = config
        self.history = history
        self._last_end: float | None = None
        self._window: deque[tuple[int, float]] = deque(maxlen=THROUGHPUT_WINDOW)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.optimizers:
            pl_module.log("lr/outer", float(trainer.optimizers[0].param_groups[0]["lr"]), on_step=True,
                          on_epoch=False, batch_size=len(batch))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        norm = grad_norm(pl_module)
        if norm is not None:
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        assert isinstance(pl_module, MetaLearner)
        bs = len(batch)
        metrics = dict(pl_module.last_train_metrics)
        if self.config.pre_adaptation and isinstance(batch, TaskBatch):  # not for flat pre-training batches
            for k, v in pre_adaptation_metrics(pl_module, batch).items():
                pl_module.log(f"train/{k}_step0", v, on_step=True, on_epoch=False, batch_size=bs)
                metrics[f"{k}_step0"] = v
        self.history.add_train(trainer.global_step, metrics)
        for name, value in {**learned_inner_rates(pl_module), **pl_module.extra_train_metrics()}.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=bs)
        now = time.perf_counter()
        if self._last_end is not None and now > self._last_end:
            self._window.append((bs, now - self._last_end))
            tasks, seconds = sum(t for t, _ in self._window), sum(s for _, s in self._window)
            pl_module.log("perf/episodes_per_sec", tasks * trainer.world_size / seconds, on_step=True,
                          on_epoch=False, batch_size=bs)
        self._last_end = now
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            pl_module.log("perf/peak_gpu_mem_gib", peak, on_step=True, on_epoch=False, batch_size=bs)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None  # the validation's duration is not training throughput

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        assert isinstance(pl_module, MetaLearner)
        self.history.end_window()
        self.history.add_eval(trainer.global_step, pl_module.last_results.get("val", {}))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.history.collect()


class OverfittingMonitor(L.Callback):
    """The train/val gap at every validation, and the optional meta-overfitting alarm/stop."""

    def __init__(self, config: OverfittingConfig, history: RunHistory) -> None:
        self.config = config
        self.history = history
        self.best: float | None = None
        self.train_at_best: float | None = None
        self.wait = 0
        self.fired = False

    def _gap(self, trainer: L.Trainer) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, sign in (("acc", 1.0), ("loss", -1.0)):
            train, val = self.history.window.get(name), self.history.val.get(name)
            if train is None or val is None or not val.values:
                continue
            out[f"gap/{name}"] = sign * (train - val.values[-1])
            curve = self.history.gap.setdefault(name, Curve())
            curve.steps.append(trainer.global_step)
            curve.values.append(out[f"gap/{name}"])
        return out

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        assert isinstance(pl_module, MetaLearner)
        scalars = self._gap(trainer)
        if self.config.enabled:
            scalars.update(self._check(trainer, pl_module))
        if scalars:
            log_scalars(trainer, scalars)

    def _check(self, trainer: L.Trainer, pl_module: MetaLearner) -> dict[str, float]:
        monitored, mode = pl_module.monitor
        name = monitored.split("/", 1)[1]
        val_curve = self.history.val.get(name)
        if val_curve is None or not val_curve.values:
            return {}
        val, train = val_curve.values[-1], self.history.window.get(name)
        sign = 1.0 if mode == "max" else -1.0
        if self.best is None or sign * (val - self.best) > self.config.min_delta:
            self.best, self.train_at_best, self.wait = val, train, 0
        else:
            self.wait += 1
        train_improving = (train is not None and self.train_at_best is not None
                           and sign * (train - self.train_at_best) > self.config.min_delta)
        fire = self.wait >= self.config.patience and train_improving
        if fire and not self.fired:
            rank_zero_warn(
                f"meta-overfitting: {monitored} has not improved for {self.wait} validations (best "
                f"{self.best:.4f}) while train/{name} kept improving ({self.train_at_best:.4f} -> {train:.4f})"
                + ("; stopping (dashboard.overfitting.action=stop)" if self.config.action == "stop" else ""))
        self.fired = self.fired or fire
        if self.config.action == "stop":
            stop = trainer.strategy.reduce_boolean_decision(fire, all=False)
            if stop:
                trainer.should_stop = True
                rank_zero_info(f"training stopped at step {trainer.global_step} by the meta-overfitting monitor")
        return {"overfit/alarm": float(fire), "overfit/validations_without_improvement": float(self.wait)}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "train_at_best": self.train_at_best, "wait": self.wait, "fired": self.fired}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict["best"]
        self.train_at_best = state_dict["train_at_best"]
        self.wait = state_dict["wait"]
        self.fired = state_dict["fired"]

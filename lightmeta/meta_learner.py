"""The base LightningModule that every meta-learner subclasses.

A subclass implements :meth:`MetaLearner.adapt` (the inner loop on one task's support set) and
:meth:`MetaLearner.predict` (query predictions from the adapted state). The base owns the outer
loop: ``training_step`` returns the mean query loss over the meta-batch, evaluation adapts each
task without keeping an outer graph and reports per-task metrics as mean ± 95% CI.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightmeta.acceleration import check_compile_backend, use_channels_last
from lightmeta.episodes import EpisodeSpec, Task, TaskBatch
from lightmeta.errors import ConfigError
from lightmeta.faults import NonFiniteLossError, nonfinite_message
from lightmeta.metrics import MeanCI
from lightmeta.models import build_model
from lightmeta.plugin import PluginConfig
from lightmeta.task_backward import TaskTerms
from lightmeta.task_info import TaskInfo

Split = Literal["val", "test"]


class AlgorithmConfig(PluginConfig):
    """Outer-loop (meta) optimisation settings shared by every algorithm."""

    lr: float = Field(default=1e-3, gt=0, description="outer (meta) learning rate")
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum")
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="cosine anneals over trainer.max_steps"
    )
    # speed-ups that leave results unchanged (parity-tested; lightmeta/acceleration.py)
    compile: bool = Field(
        default=False, description="torch.compile the hot path: the backbone of metric learners, the inner "
        "step (support gradient + update, batched or per task) of gradient learners")
    compile_backend: str = Field(
        default="inductor", description="torch.compile backend: inductor (needs a C++ compiler on CPU), "
        "aot_eager or eager (no code generation; for checking and debugging)")
    channels_last: bool = Field(
        default=False, description="backbone weights and 4-D image inputs in torch.channels_last memory "
        "format (faster convolutions on tensor-core GPUs); needs image inputs (C, H, W)")


class MetaLearner(L.LightningModule, ABC):
    """Template for meta-learners: subclasses implement ``adapt`` and ``predict``.

    Class-level declarations tell the run builder what the trainer must know:
    ``needs_grad_at_eval`` (the inner loop takes gradients during validation/test, so the
    trainer runs with ``inference_mode=False``), ``uses_head`` (the backbone gets a
    linear head with one output per way; metric learners use raw features) and ``problems``.
    """

    Config: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    registered_name: ClassVar[str]
    needs_grad_at_eval: ClassVar[bool] = False
    uses_head: ClassVar[bool] = True
    #: Problem types the algorithm supports; the run builder refuses other datamodules.
    problems: ClassVar[tuple[str, ...]] = ("classification", "regression")
    #: What training batches are: "episodes" (a TaskBatch meta-batch, the default) or "flat"
    #: (ordinary labelled mini-batches of the meta-training classes, a FlatBatch, for
    #: non-episodic pre-training such as Baseline); "flat" learners also define ``flat_batch_size``.
    training_data: ClassVar[Literal["episodes", "flat"]] = "episodes"
    #: A small backbone the conformance harness (lightmeta.testing) trains this algorithm with.
    example_model: ClassVar[dict[str, Any]] = {"name": "mlp", "hidden": [32, 32]}

    def __init__(
        self,
        algorithm: dict[str, Any] | AlgorithmConfig | None = None,
        *,
        model: dict[str, Any],
        task: dict[str, Any] | TaskInfo,
    ) -> None:
        super().__init__()
        if isinstance(algorithm, AlgorithmConfig):
            algorithm = algorithm.model_dump()
        algorithm = {k: v for k, v in (algorithm or {}).items() if k != "name"}
        self.config = self.Config.model_validate(algorithm)
        self.task_info = task if isinstance(task, TaskInfo) else TaskInfo.model_validate(task)
        out = self.task_info.head_features if self.uses_head else None
        self.model: nn.Module = build_model(model, self.task_info.in_shape, out)
        self._apply_acceleration()
        self.save_hyperparameters(
            {
                # with its registered name, so the logged hparams match the run config's section
                "algorithm": {"name": getattr(type(self), "registered_name", type(self).__qualname__),
                              **self.config.model_dump(mode="json")},
                "model": dict(model),
                "task": self.task_info.model_dump(mode="json"),
            }
        )
        self.run_config: dict[str, Any] | None = None
        self.eval_metrics = nn.ModuleDict(
            {split: nn.ModuleDict({k: MeanCI() for k in self.eval_metric_names()}) for split in ("val", "test")}
        )
        self.last_results: dict[str, dict[str, float]] = {}
        #: detached metrics of the latest training step (``meta_loss``'s logs), for callbacks
        self.last_train_metrics: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ speed-ups
    def _apply_acceleration(self) -> None:
        """Apply ``channels_last`` and ``compile`` (refusing impossible settings in one line)."""
        c = self.config
        if c.channels_last:
            if len(self.task_info.in_shape) != 3:
                raise ConfigError(f"algorithm.channels_last needs image inputs (C, H, W), but the data's inputs "
                                  f"are {tuple(self.task_info.in_shape)}; set algorithm.channels_last=false")
            use_channels_last(self.model)
        if c.compile:
            check_compile_backend(c.compile_backend)
            self.compile_hot_path()

    def compile_hot_path(self) -> None:
        """What ``compile: true`` compiles; default: the backbone, in place (``nn.Module.compile``,
        so parameter names and checkpoints are unchanged). Gradient learners compile their
        inner step instead (a compiled backbone would need double backward, which it lacks)."""
        self.model.compile(backend=self.config.compile_backend)

    # ------------------------------------------------------------------ the contract
    @abstractmethod
    def adapt(self, support_x: Tensor, support_y: Tensor, spec: EpisodeSpec) -> Any:
        """Inner loop on one task's support set; returns whatever ``predict`` needs."""

    @abstractmethod
    def predict(self, state: Any, query_x: Tensor) -> Tensor:
        """Logits (classification) or predictions (regression) for the query set."""

    # ------------------------------------------------------------------ losses and metrics
    @property
    def is_classification(self) -> bool:
        return self.task_info.problem == "classification"

    def loss_fn(self, preds: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy for classification, mean squared error for regression."""
        if self.is_classification:
            return F.cross_entropy(preds, targets)
        return F.mse_loss(preds, targets)

    def task_metrics(self, preds: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Per-task ``loss`` (and ``acc`` for classification) of query predictions."""
        metrics = {"loss": self.loss_fn(preds, targets)}
        if self.is_classification:
            metrics["acc"] = (preds.argmax(-1) == targets).float().mean()
        return metrics

    def eval_metric_names(self) -> list[str]:
        """Names of the per-task metrics reported by validation and test."""
        return ["loss", "acc"] if self.is_classification else ["loss"]

    @property
    def monitor(self) -> tuple[str, Literal["min", "max"]]:
        """Validation metric for model selection and checkpointing."""
        return ("val/acc", "max") if self.is_classification else ("val/loss", "min")

    # ------------------------------------------------------------------ outer loop
    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean query loss over the meta-batch (the outer objective) and metrics to log.

        Override for a batched implementation or an outer step that is not a query-loss
        gradient (e.g. Reptile's surrogate).
        """
        losses, accs = self.task_terms(len(batch)), []
        for task in batch.tasks():
            state = self.adapt(task.support_x, task.support_y, task.spec)
            metrics = self.task_metrics(self.predict(state, task.query_x), task.query_y)
            losses.add(metrics["loss"])
            if "acc" in metrics:
                accs.append(metrics["acc"])
        loss = losses.mean()
        logs = {"loss": loss.detach()}
        if accs:
            logs["acc"] = torch.stack(accs).mean().detach()
        return loss, logs

    def task_terms(self, tasks: int) -> TaskTerms:
        """How ``meta_loss`` collects the per-task terms of the meta-loss (of ``tasks`` tasks):
        kept for one backward pass; gradient learners may back-propagate them one by one
        (``task_backward``, :mod:`lightmeta.task_backward`)."""
        return TaskTerms(tasks)

    def evaluate_task(self, task: Task) -> dict[str, Tensor]:
        """Adapt to one task and score its query set; no outer graph is kept."""
        state = self.adapt(task.support_x, task.support_y, task.spec)
        with torch.no_grad():
            return {k: v.detach() for k, v in self.task_metrics(self.predict(state, task.query_x), task.query_y).items()}

    #: What a non-finite meta-loss does: "stop" (raise, naming step, task and loss) or "skip" the
    #: meta-batch (no update, counted in ``train/skipped_nonfinite``). Set by the run builder.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    skipped_nonfinite = 0

    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor | None:
        loss, logs = self.meta_loss(batch)
        bad = ~torch.isfinite(loss.detach())
        if self.trainer is not None and self.trainer.world_size > 1:  # every rank must decide alike
            bad = self.trainer.strategy.reduce(bad.float(), reduce_op="sum") > 0
        if bad:
            if self.on_nonfinite == "stop":
                raise NonFiniteLossError(nonfinite_message(self, batch, loss))
            self.skipped_nonfinite += 1
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), batch_size=len(batch))
            return None  # Lightning skips backward and the optimizer step
        self.last_train_metrics = logs
        bs = len(batch)
        for k, v in logs.items():
            self.log(f"train/{k}", v, prog_bar=(k == "loss"), batch_size=bs)
        return loss

    def find_nonfinite(self, task: Task) -> str | None:
        """Which loss of ``task`` is non-finite (``None`` if all are); used to diagnose faults."""
        with torch.enable_grad():
            preds = self.predict(self.adapt(task.support_x, task.support_y, task.spec), task.query_x)
            loss = self.loss_fn(preds, task.query_y)
        return None if torch.isfinite(loss) else f"query (outer) loss = {loss.item()}"

    def evaluate_batch(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Per-task metrics ``[T]`` (keys: ``eval_metric_names()``) of a batch of evaluation tasks.

        Default: ``evaluate_task`` on each task. Override for a batched evaluation (metric
        learners embed the whole batch in one backbone call).
        """
        per_task: dict[str, list[Tensor]] = {k: [] for k in self.eval_metric_names()}
        for task in batch.tasks():
            for k, v in self.evaluate_task(task).items():
                per_task[k].append(v)
        return {k: torch.stack(values) for k, values in per_task.items()}

    def _eval_step(self, batch: TaskBatch, split: Split) -> None:
        for k, values in self.evaluate_batch(batch).items():
            self.eval_metrics[split][k].update(values)

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, split: Split) -> None:
        results: dict[str, dict[str, float]] = {}
        for k, metric in self.eval_metrics[split].items():
            out = metric.compute()
            metric.reset()
            if out["n"] == 0:
                continue
            results[k] = {name: float(v) for name, v in out.items()}
            self.log(f"{split}/{k}", out["mean"].float(), prog_bar=(split == "val" and k == self.monitor[0].split("/")[1]))
            self.log(f"{split}/{k}_ci95", out["ci95"].float())
        self.last_results[split] = results  # type: ignore[assignment]

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ------------------------------------------------------------------ dashboard hooks
    def predict_unadapted(self, x: Tensor) -> Tensor | None:
        """Predictions of the meta-parameters before any adaptation (step 0 of the adaptation
        curve; ``train/loss_step0`` on the dashboard), without gradients or side effects.

        Default: the forward of a learner with a head (for :class:`GradientMetaLearner` the
        network with its meta-parameters); ``None`` (nothing to report) for learners without a
        head or a forward, e.g. metric learners. BatchNorm normalises as in the module's mode
        but its running statistics are left untouched.
        """
        if not self.uses_head or type(self).forward is L.LightningModule.forward:
            return None
        norms = [m for m in self.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        for m in norms:
            m.track_running_stats = False
        try:
            with torch.no_grad():
                return self(x)
        finally:
            for m in norms:
                m.track_running_stats = True

    def extra_train_metrics(self) -> dict[str, Tensor]:
        """Extra scalars logged at every training step under their own names (e.g.
        ``lr/inner/<layer>/step<k>``); default none. Learned rates kept in an ``inner_lrs``
        ``nn.ParameterDict`` are logged without this hook (:mod:`lightmeta.callbacks`)."""
        return {}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        c = self.config
        params = [p for p in self.parameters() if p.requires_grad]
        if c.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        elif c.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        if c.lr_schedule == "constant":
            return opt
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        if total is None:
            raise ValueError("algorithm.lr_schedule=cosine needs trainer.max_steps > 0; set it or use 'constant'")
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from lightmeta import __version__

        checkpoint["lightmeta"] = {
            "algorithm": getattr(type(self), "registered_name", type(self).__qualname__),
            "version": __version__,
            "run_config": self.run_config,
        }

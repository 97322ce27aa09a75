"""Baseline and Baseline++: Chen, Liu, Kira, Wang & Huang (2019), "A Closer Look at Few-shot
Classification", ICLR. https://arxiv.org/abs/1904.04232

Training is **not episodic**: the backbone and a classifier over all meta-training classes
are trained with ordinary labelled mini-batches (``training_data = "flat"``: the datamodule
serves :class:`~lightmeta.datamodule.FlatBatch` es from its ``flat_train_dataset()``, and the run
builder tells the learner the number of classes through ``TaskInfo.train_classes``). At
evaluation the backbone is frozen and a **new** head is fine-tuned on each task's support set
(``finetune_steps`` of SGD with momentum and weight decay), then scores the query set.

``head: linear`` is Baseline (a linear layer); ``head: cosine`` is Baseline++ (the classifier
is ``scale * cos(z, w_k)`` with L2-normalised weight vectors, both in pre-training and in
fine-tuning; Chen et al. fix the scale, 10 for more than 200 classes, 2 otherwise).

Deviations from the reference code, for determinism and batching: the fine-tuning runs
full-batch on the support set (the reference uses mini-batches of 4 for 100 epochs) for all
tasks of an evaluation batch at once (the tasks' losses are summed, so each head receives only
its own task's gradient), and the new head starts from zero (linear) or from the support
class means (cosine, "weight imprinting") instead of a random initialisation.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lightmeta.algorithms.protonet import class_means
from lightmeta.datamodule import FlatBatch
from lightmeta.episodes import EpisodeSpec, TaskBatch
from lightmeta.errors import ConfigError
from lightmeta.meta_learner import AlgorithmConfig
from lightmeta.metric import MetricMetaLearner
from lightmeta.registry import register_algorithm


class BaselineConfig(AlgorithmConfig):
    """Baseline/Baseline++ hyperparameters (Chen et al.: Adam 1e-3, batch 16, fine-tune 100 steps at 0.01)."""

    head: Literal["linear", "cosine"] = Field(default="linear", description="linear: Baseline; cosine: Baseline++")
    batch_size: int = Field(default=16, ge=1, description="examples per pre-training batch (all ranks together)")
    cosine_scale: float = Field(default=10.0, gt=0, description="fixed scale of cosine logits (Baseline++)")
    finetune_steps: int = Field(default=100, ge=1, description="SGD steps fitting the new head on a task's support set")
    finetune_lr: float = Field(default=0.01, gt=0, description="learning rate of the head fine-tuning")
    finetune_momentum: float = Field(default=0.9, ge=0, lt=1, description="momentum of the head fine-tuning")
    finetune_weight_decay: float = Field(default=0.001, ge=0, description="weight decay of the head fine-tuning")


def cosine_logits(z: Tensor, weight: Tensor, scale: float) -> Tensor:
    """``scale * cos(z, w_k)`` for features ``[..., D]`` and weights ``[..., D, C]``."""
    return scale * F.normalize(z, dim=-1) @ F.normalize(weight, dim=-2)


@register_algorithm("baseline")
class Baseline(MetricMetaLearner):
    """Supervised pre-training on all training classes; a new head fine-tuned per test task."""

    Config = BaselineConfig
    config: BaselineConfig
    training_data = "flat"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        classes = self.task_info.train_classes
        if classes is None:
            raise ConfigError(
                "algorithm 'baseline' needs the number of meta-training classes (task.train_classes); build it "
                "through the run builder (lightmeta.runner.build_learner), which reads it from the datamodule"
            )
        dim = self.model.feature_dim
        self.classifier = nn.Linear(dim, classes, bias=self.config.head == "linear")

    @property
    def flat_batch_size(self) -> int:
        return self.config.batch_size

    # ------------------------------------------------------------------ pre-training
    def classify(self, x: Tensor) -> Tensor:
        """Logits over all meta-training classes of a flat batch of images."""
        z = self.model(x).flatten(1)
        if self.config.head == "cosine":  # normalisations in float32, as every metric head
            with self.head_precision(z):
                return cosine_logits(self.head_input(z), self.classifier.weight.T, self.config.cosine_scale)
        return self.classifier(z)

    def meta_loss(self, batch: FlatBatch | TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:  # type: ignore[override]
        """Cross-entropy over all training classes on an ordinary labelled batch."""
        if not isinstance(batch, FlatBatch):
            raise ConfigError("algorithm 'baseline' pre-trains on flat labelled batches, not episodes; "
                              "train it through the runner, whose datamodule serves FlatBatches for it")
        logits = self.classify(batch.x)
        loss = F.cross_entropy(logits, batch.y)
        acc = (logits.argmax(-1) == batch.y).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc.detach()}

    # ------------------------------------------------------------------ per-task fine-tuning
    def fit_head(self, support_z: Tensor, support_y: Tensor, spec: EpisodeSpec) -> tuple[Tensor, Tensor]:
        """A new head ``(weight [T, D, ways], bias [T, ways])`` fitted on the frozen support features.

        The backbone takes no gradient, so evaluation may run under ``torch.inference_mode``
        (``needs_grad_at_eval`` stays false); the head's own gradient steps leave it locally
        (inference-mode tensors are cloned into ordinary ones first).
        """
        c = self.config
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device_type=support_z.device.type, enabled=False):
            z = support_z.flatten(2).detach().float().clone()
            support_y = support_y.clone()
            t, _, d = z.shape
            if c.head == "cosine":
                weight = class_means(z, support_y, spec.ways).transpose(1, 2).clone()
            else:
                weight = z.new_zeros(t, d, spec.ways)
            bias = z.new_zeros(t, spec.ways)
            params = [weight.requires_grad_(True), bias.requires_grad_(c.head == "linear")]
            velocity = [torch.zeros_like(p) for p in params]
            for _ in range(c.finetune_steps):
                logits = self._head(z, weight, bias)
                loss = F.cross_entropy(logits.flatten(0, 1), support_y.flatten(), reduction="sum") / support_y.shape[1]
                trainable = [p for p in params if p.requires_grad]
                grads = torch.autograd.grad(loss, trainable)
                with torch.no_grad():
                    for p, g, v in zip(trainable, grads, velocity):
                        v.mul_(c.finetune_momentum).add_(g + c.finetune_weight_decay * p)
                        p.sub_(c.finetune_lr * v)
        return weight.detach(), bias.detach()

    def _head(self, z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        if self.config.head == "cosine":
            return cosine_logits(z, weight, self.config.cosine_scale)
        return z @ weight + bias.unsqueeze(1)

    def head_logits(self, state: tuple[Tensor, Tensor], query_z: Tensor) -> Tensor:
        weight, bias = state
        return self._head(query_z.flatten(2).to(weight.dtype), weight, bias)

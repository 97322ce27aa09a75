"""Base for metric-based and closed-form-head meta-learners (ProtoNet, Matching/Relation
Networks, R2-D2, MetaOptNet).

These learners adapt without gradient steps: a backbone embeds the images and a per-task
*head* turns the support embeddings into a classifier for the query embeddings (class means,
attention over the support set, a ridge or SVM solution). So the whole meta-batch is embedded
in **one** backbone call, support and query of all ``T`` tasks together, and the head runs
batched over tasks; the base class's per-task loop is used for nothing but the single-task
``adapt``/``predict`` contract, which gives the same results (see BatchNorm below).

Subclasses implement two batched methods:

* ``fit_head(support_z [T, N*K, *F], support_y [T, N*K], spec) -> state`` (prototypes, a ridge
  solution, ...), and
* ``head_logits(state, query_z [T, N*Q, *F]) -> logits [T, N*Q, spec.ways]``,

where ``*F`` is the backbone's feature shape (``[D]`` for Conv4/MLP feature extractors). The
number of ways is read from ``spec`` at run time, never fixed at construction, so training and
evaluation episodes may differ in ways and shots (ProtoNet trains 60-way on Omniglot).

BatchNorm: in training mode the one backbone call normalises with the statistics of every
image of the meta-batch (support and query of all tasks). With one task per meta-batch this
is exactly what the ProtoNet reference does (it embeds ``cat(support, query)`` of an episode in
one call); with ``T`` tasks the statistics come from a larger sample of the same image
distribution, as in supervised training with a larger batch. BatchNorm sees images only, no
labels, and each task's head sees only that task's embeddings, so no label information crosses
tasks. Evaluation runs in ``eval()`` mode, so BatchNorm uses its running statistics (inductive):
a test task's predictions depend neither on the other tasks of its evaluation batch nor on
``eval_batch_size``, and the batched and per-task paths agree exactly. In training mode the
two paths agree exactly for backbones without BatchNorm; with BatchNorm the per-task path
(``adapt`` embeds the support set alone, ``predict`` the query set alone) normalises over
smaller batches.

Mixed precision: the backbone runs under autocast (bf16 or fp16, where the speed is), but the
head runs in float32 (or float64 if the embeddings are) with autocast off, since ridge and SVM
solves, squared distances and cosine normalisations lose too much in 16 bits (a squared
distance between 1600-dimensional embeddings easily exceeds float16's 65504). A head that is a
learned network (Relation Networks' relation module) sets ``fp32_head = False`` and stays under
autocast. Either way the loss and metrics are computed in float32 at least. Under
``16-mixed`` Lightning's GradScaler scales the outer loss; there is no inner gradient to scale.
"""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightmeta.episodes import EpisodeSpec, Task, TaskBatch
from lightmeta.errors import ConfigError
from lightmeta.meta_learner import MetaLearner


class MetricMetaLearner(MetaLearner):
    """A feature-extractor backbone plus a per-task head, batched over the meta-batch."""

    uses_head = False
    needs_grad_at_eval = False
    problems = ("classification",)
    example_model = {"name": "conv4", "filters": 8}  # a small conv net with BatchNorm for the harness
    #: Run ``fit_head``/``head_logits`` in float32 (at least) with autocast off; False for a head
    #: that is a learned network and should keep mixed precision's speed.
    fp32_head: ClassVar[bool] = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.task_info.problem not in self.problems:
            name = getattr(type(self), "registered_name", type(self).__qualname__)
            raise ConfigError(
                f"algorithm '{name}' is a few-shot classifier but the data is a {self.task_info.problem} "
                "task distribution; choose a classification datamodule or a gradient-based algorithm"
            )

    def add_logit_scale(self, value: float, learn: bool) -> None:
        """``self.scale``: a logit scale (temperature) starting at ``value``, a parameter trained
        with the backbone when ``learn``, else a fixed buffer (saved in checkpoints either way)."""
        scale = torch.tensor(float(value))
        if learn:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)

    # ------------------------------------------------------------------ the head contract
    @abstractmethod
    def fit_head(self, support_z: Tensor, support_y: Tensor, spec: EpisodeSpec) -> Any:
        """Per-task classifier state from support embeddings ``[T, N*K, *F]`` and labels ``[T, N*K]``."""

    @abstractmethod
    def head_logits(self, state: Any, query_z: Tensor) -> Tensor:
        """Logits ``[T, N*Q, ways]`` of query embeddings ``[T, N*Q, *F]`` under ``state``."""

    # ------------------------------------------------------------------ embedding
    def embed(self, x: Tensor) -> Tensor:
        """Embed ``[T, M, ...]`` images in one backbone call -> ``[T, M, *F]``."""
        z = self.model(x.flatten(0, 1))
        return z.unflatten(0, tuple(x.shape[:2]))

    def forward(self, x: Tensor) -> Tensor:
        """Backbone features of a flat batch of images."""
        return self.model(x)

    # ------------------------------------------------------------------ head precision
    @contextmanager
    def head_precision(self, z: Tensor) -> Iterator[None]:
        """Autocast off around the head when ``fp32_head`` (see the module notes)."""
        with torch.autocast(device_type=z.device.type, enabled=False) if self.fp32_head else nullcontext():
            yield

    def head_input(self, z: Tensor) -> Tensor:
        """Embeddings as the head takes them: float32 at least when ``fp32_head``."""
        return _at_least_fp32(z) if self.fp32_head else z

    def run_head(self, support_z: Tensor, support_y: Tensor, query_z: Tensor, spec: EpisodeSpec) -> Tensor:
        """Query logits ``[T, N*Q, ways]`` from support and query embeddings: ``fit_head`` then
        ``head_logits``, at the head's precision."""
        with self.head_precision(support_z):
            state = self.fit_head(self.head_input(support_z), support_y, spec)
            return self.head_logits(state, self.head_input(query_z))

    def episode_logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, spec: EpisodeSpec) -> Tensor:
        """Query logits ``[T, N*Q, ways]`` of ``T`` tasks; support and query embedded in one call."""
        n_support = support_x.shape[1]
        z = self.embed(torch.cat([support_x, query_x], dim=1))
        return self.run_head(z[:, :n_support], support_y, z[:, n_support:], spec)

    def batch_metrics(self, logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Per-task query ``loss`` (mean cross-entropy) and ``acc``, each ``[T]``."""
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        correct = (logits.argmax(-1) == targets).float()
        return {"loss": ce.view(targets.shape).mean(1), "acc": correct.mean(1)}

    # ------------------------------------------------------------------ single-task contract
    def adapt(self, support_x: Tensor, support_y: Tensor, spec: EpisodeSpec) -> Any:
        """The head state of one task (e.g. its prototypes), batched with ``T = 1``."""
        z = self.embed(support_x.unsqueeze(0))
        with self.head_precision(z):
            return self.fit_head(self.head_input(z), support_y.unsqueeze(0), spec)

    def predict(self, state: Any, query_x: Tensor) -> Tensor:
        z = self.embed(query_x.unsqueeze(0))
        with self.head_precision(z):
            return self.head_logits(state, self.head_input(z)).squeeze(0)

    # ------------------------------------------------------------------ batched outer loop
    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean over tasks of the per-task mean query cross-entropy (as the base's loop)."""
        logits = self.episode_logits(batch.support_x, batch.support_y, batch.query_x, batch.spec)
        metrics = self.batch_metrics(_at_least_fp32(logits), batch.query_y)
        loss = metrics["loss"].mean()
        return loss, {"loss": loss.detach(), "acc": metrics["acc"].mean().detach()}

    def evaluate_batch(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Per-task ``loss`` and ``acc`` ``[T]`` of a batch of evaluation tasks, in one call."""
        with torch.no_grad():
            logits = self.episode_logits(batch.support_x, batch.support_y, batch.query_x, batch.spec)
            return self.batch_metrics(_at_least_fp32(logits), batch.query_y)

    def evaluate_task(self, task: Task) -> dict[str, Tensor]:
        with torch.no_grad():
            return super().evaluate_task(task)


def _at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in float32, or unchanged if it is float64 already."""
    return x.to(torch.promote_types(x.dtype, torch.float32))

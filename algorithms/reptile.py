"""Reptile: Nichol, Achiam & Schulman (2018), "On First-Order Meta-Learning Algorithms".
https://arxiv.org/abs/1803.02999

Each task: ``inner_steps`` steps of SGD (or Adam, ``inner_optimizer: adam``, the paper's choice
for images) from the meta-parameters ``theta`` to task weights ``phi``; then
``theta <- theta + epsilon * mean_tasks(phi - theta)``.

That outer step is not the gradient of a query loss, so ``meta_loss`` returns the surrogate
``mean_tasks(0.5 * ||theta - stopgrad(phi)||^2)``, whose gradient is exactly
``mean_tasks(theta - phi)``: the outer optimizer, gradient clipping, Lightning and DDP (which
averages it across ranks like any gradient) then work unchanged; with ``task_backward`` each
task's term is back-propagated as soon as it is computed (``task_terms``). The paper's outer step size
``epsilon`` is the outer ``lr`` with ``optimizer: sgd`` and ``momentum: 0`` (the defaults
here); with Adam the Reptile direction is fed to Adam, as the paper also suggests. The paper
anneals epsilon linearly to 0; ``lr_schedule: cosine`` is the closest built-in schedule.

Inner data (``inner_data``): ``support`` (default) adapts on the support set, so the logged
training query loss/accuracy after adaptation are honest held-out figures; ``support+query``
pools both sets in training (the paper meta-trains with more shots than it tests with), and
the logged query figures are then on data the inner loop has seen. Evaluation always adapts on
the support set only. Inner steps are full-batch over the chosen data.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from lightmeta.episodes import TaskBatch
from lightmeta.gradient import GradientConfig, GradientMetaLearner, Params
from lightmeta.registry import register_algorithm


class ReptileConfig(GradientConfig):
    """Reptile hyperparameters: ``lr`` is the outer step size epsilon (with ``optimizer: sgd``)."""

    lr: float = Field(default=1.0, gt=0, description="outer step size epsilon (the outer optimizer's lr)")
    optimizer: Literal["adam", "adamw", "sgd"] = Field(
        default="sgd", description="outer optimizer; sgd with momentum 0 is the paper's update")
    momentum: float = Field(default=0.0, ge=0, lt=1, description="outer SGD momentum (0: the paper's update)")
    inner_steps: int = Field(default=5, ge=1, description="inner steps during meta-training (k)")
    first_order: Literal[True] = Field(default=True, description="Reptile is first order by construction")
    inner_optimizer: Literal["sgd", "adam"] = Field(default="sgd", description="inner-loop optimizer")
    inner_betas: tuple[float, float] = Field(
        default=(0.0, 0.999), description="Adam betas of the inner loop (the paper: beta1 = 0)")
    inner_eps: float = Field(default=1e-8, gt=0, description="Adam epsilon of the inner loop")
    inner_data: Literal["support", "support+query"] = Field(
        default="support", description="data of the training inner loop (evaluation: support only)")


@register_algorithm("reptile")
class Reptile(GradientMetaLearner):
    """First-order meta-learning: move the initialisation toward each task's adapted weights."""

    Config = ReptileConfig
    config: ReptileConfig
    differentiates_inner_loop = False  # the outer step is a surrogate on the detached task weights

    # ------------------------------------------------------------------ inner optimizer
    def inner_update(self, params: Params, grads: Params, step: int) -> Params:
        """SGD, or Adam whose moments restart with every task (``step == 0``)."""
        if self.config.inner_optimizer == "sgd":
            return super().inner_update(params, grads, step)
        b1, b2 = self.config.inner_betas
        if step == 0:
            self._adam_moments = {k: (torch.zeros_like(g), torch.zeros_like(g)) for k, g in grads.items()}
        out: Params = {}
        for k, p in params.items():
            m, v = self._adam_moments[k]
            g = grads[k]
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            self._adam_moments[k] = (m, v)
            m_hat, v_hat = m / (1 - b1 ** (step + 1)), v / (1 - b2 ** (step + 1))
            out[k] = p - self.config.inner_lr * m_hat / (v_hat.sqrt() + self.config.inner_eps)
        return out

    # ------------------------------------------------------------------ outer step
    def _inner_data(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> tuple[Tensor, Tensor]:
        if self.config.inner_data == "support+query":
            return torch.cat([support_x, query_x]), torch.cat([support_y, query_y])
        return support_x, support_y

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Surrogate whose gradient is ``mean_tasks(theta - phi)``; logs the query metrics at ``phi``."""
        named = dict(self.model.named_parameters())
        terms = self.task_terms(len(batch))
        metrics: dict[str, list[Tensor]] = {}
        for task in batch.tasks():
            x, y = self._inner_data(task.support_x, task.support_y, task.query_x, task.query_y)
            with torch.no_grad():  # first order by construction: no graph through the inner loop
                phi = self.inner_loop(x, y, self.config.inner_steps)
                for k, v in self.task_metrics(self.forward_with(phi, task.query_x, self.config.inner_steps), task.query_y).items():
                    metrics.setdefault(k, []).append(v)
            terms.add(sum(0.5 * (named[n] - p.detach()).pow(2).sum() for n, p in phi.items()))
        return terms.mean(), {k: torch.stack(v).mean() for k, v in metrics.items()}  # type: ignore[return-value]

"""MAML++: Antoniou, Edwards & Storkey (2019), "How to train your MAML", ICLR.
https://arxiv.org/abs/1810.09502

MAML with the paper's fixes, each a switch here:

* **MSL** (multi-step loss, ``multi_step_loss``): the meta-objective is a weighted sum of the
  query losses after every inner step; weights start uniform and anneal toward the last step
  over ``msl_epochs`` epochs (the reference code's schedule: non-final weights shrink by
  ``1/(n*msl_epochs)`` per epoch to a floor of ``0.03/n``, the last weight takes the rest, so
  they always sum to 1), then only the final step's loss is used.
* **LSLR** (``learn_inner_lr``): a learned inner learning rate per parameter tensor ("layer")
  and per step, initialised to ``inner_lr`` and trained by the outer optimizer.
* **BNRS** (``per_step_bn_stats``): separate BatchNorm running statistics for the network after
  each number of inner updates: the forward pass of fast weights with ``k`` updates uses set
  ``k`` (``k = 0..inner_steps``; evaluation beyond ``inner_steps`` reuses the last set). Running
  statistics only matter with ``batch_norm: inductive`` (the default here): then training
  updates set ``k`` and evaluation normalises with it. (The authors' code normalises with batch
  statistics even at evaluation; ``batch_norm: transductive`` reproduces that.)
* **BNWB** (``per_step_bn_weights``): per-step BatchNorm scales and biases, meta-learned and not
  adapted in the inner loop (the reference code's ``learnable_bn_gamma/beta`` with
  ``enable_inner_loop_optimizable_bn_params: false``); the backbone's own BatchNorm affine
  parameters are then frozen (unused).
* **DA** (derivative-order annealing, ``first_order_epochs``): first-order meta-gradients for
  the first epochs, second order afterwards.
* **CA** (cosine-annealed meta learning rate): ``lr_schedule: cosine`` by default.

The paper's per-step index is the inner step whose update produced the weights; here it is the
number of updates applied, so that the support pass at step ``k`` and the query pass after
``k`` updates share the statistics of the same weights (one more set than the reference code).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightmeta.episodes import TaskBatch
from lightmeta.gradient import GradientConfig, GradientMetaLearner, Params, param_key
from lightmeta.registry import register_algorithm
from lightmeta.task_info import TaskInfo

_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


class MAMLPlusPlusConfig(GradientConfig):
    """MAML++ hyperparameters; defaults follow the paper's Omniglot setup where it is generic."""

    inner_steps: int = Field(default=5, ge=1, description="inner steps during meta-training")
    eval_inner_steps: int = Field(default=5, ge=1, description="inner steps at validation/test")
    lr_schedule: Literal["constant", "cosine"] = Field(default="cosine", description="CA: cosine-annealed meta lr")
    batch_norm: Literal["transductive", "inductive"] = Field(
        default="inductive", description="inductive: evaluation normalises with the per-step running statistics")
    multi_step_loss: bool = Field(default=True, description="MSL: weighted query losses of every inner step")
    msl_epochs: int = Field(default=10, ge=0, description="epochs over which MSL weights anneal to the last step")
    learn_inner_lr: bool = Field(default=True, description="LSLR: learned per-layer, per-step inner learning rates")
    per_step_bn_stats: bool = Field(default=True, description="BNRS: BatchNorm running statistics per inner step")
    per_step_bn_weights: bool = Field(default=True, description="BNWB: BatchNorm scale and bias per inner step")
    first_order_epochs: int = Field(default=0, ge=0, description="DA: first-order meta-gradients before this epoch")


@register_algorithm("mamlpp")
class MAMLPlusPlus(GradientMetaLearner):
    """MAML with multi-step loss, learned per-step rates, per-step BatchNorm and annealing."""

    Config = MAMLPlusPlusConfig
    config: MAMLPlusPlusConfig

    def __init__(self, algorithm: dict[str, Any] | None = None, *, model: dict[str, Any],
                 task: dict[str, Any] | TaskInfo) -> None:
        super().__init__(algorithm, model=model, task=task)
        c = self.config
        sets = c.inner_steps + 1
        bns = [(n, m) for n, m in self.model.named_modules() if isinstance(m, _BatchNorm)]
        # BNRS: one holder of running statistics per number of inner updates
        self._bn_stat_names = [f"{n}.{b}" for n, m in bns if m.track_running_stats for b in _BN_STATS]
        self.step_bn_stats = nn.ModuleList()
        if c.per_step_bn_stats and self._bn_stat_names:
            buffers = dict(self.model.named_buffers())
            for _ in range(sets):
                holder = nn.Module()
                for name in self._bn_stat_names:
                    holder.register_buffer(param_key(name), buffers[name].detach().clone())
                self.step_bn_stats.append(holder)
        # BNWB: per-step affine parameters replace (and freeze) the backbone's own
        self._bn_affine_names = [f"{n}.{a}" for n, m in bns if m.affine for a in ("weight", "bias")]
        self.step_bn_affine = nn.ModuleList()
        if c.per_step_bn_weights and self._bn_affine_names:
            named = dict(self.model.named_parameters())
            for _ in range(sets):
                self.step_bn_affine.append(nn.ParameterDict(
                    {param_key(n): nn.Parameter(named[n].detach().clone()) for n in self._bn_affine_names}))
            for n in self._bn_affine_names:
                named[n].requires_grad_(False)
        # LSLR: a learning rate per adapted parameter tensor and inner step
        self.inner_lrs = nn.ParameterDict()
        if c.learn_inner_lr:
            for n in self.inner_param_names():
                self.inner_lrs[param_key(n)] = nn.Parameter(torch.full((c.inner_steps,), c.inner_lr))

    # ------------------------------------------------------------------ hooks
    def inner_update(self, params: Params, grads: Params, step: int) -> Params:
        if not self.config.learn_inner_lr:
            return super().inner_update(params, grads, step)
        k = min(step, self.config.inner_steps - 1)
        return {n: p - self.inner_lrs[param_key(n)][k] * grads[n] for n, p in params.items()}

    def use_first_order(self) -> bool:
        return self.config.first_order or self.current_epoch < self.config.first_order_epochs

    def forward_with(self, params: Params, x: Tensor, step: int | None = None) -> Tensor:
        """Forward with the BatchNorm statistics/affine set of ``step`` updates (``None``: 0)."""
        k = min(step or 0, self.config.inner_steps)
        extra: dict[str, Tensor] = {}
        if len(self.step_bn_stats):
            holder = self.step_bn_stats[k]
            extra.update({n: getattr(holder, param_key(n)) for n in self._bn_stat_names})
        if len(self.step_bn_affine):
            affine = self.step_bn_affine[k]
            extra.update({n: affine[param_key(n)] for n in self._bn_affine_names})
        return super().forward_with({**extra, **params}, x, step)

    # ------------------------------------------------------------------ multi-step loss
    def msl_weights(self, epoch: int | None = None) -> Tensor:
        """Weights of the query losses after steps ``1..inner_steps`` at ``epoch`` (sum 1)."""
        n = self.config.inner_steps
        epoch = self.current_epoch if epoch is None else epoch
        if not self.config.multi_step_loss or epoch >= self.config.msl_epochs or n == 1:
            return torch.nn.functional.one_hot(torch.tensor(n - 1), n).float()
        decay = 1.0 / n / self.config.msl_epochs
        floor = 0.03 / n
        w = torch.full((n,), max(1.0 / n - epoch * decay, floor))
        w[-1] = min(1.0 / n + epoch * (n - 1) * decay, 1.0 - (n - 1) * floor)
        return w

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean over tasks of the MSL-weighted query losses; logs the final step's metrics."""
        steps = self.config.inner_steps
        weights = self.msl_weights().tolist()
        objectives = self.task_terms(len(batch))
        finals: dict[str, list[Tensor]] = {}
        for task in batch.tasks():
            terms: list[Tensor] = []

            def on_step(k: int, params: Params) -> None:
                if k == 0 or weights[k - 1] == 0.0:
                    return
                metrics = self.task_metrics(self.forward_with(params, task.query_x, k), task.query_y)
                terms.append(weights[k - 1] * metrics["loss"])
                if k == steps:
                    for name, v in metrics.items():
                        finals.setdefault(name, []).append(v.detach())

            self.inner_loop(task.support_x, task.support_y, steps, on_step=on_step)
            objectives.add(torch.stack(terms).sum())
        loss = objectives.mean()
        logs = {k: torch.stack(v).mean() for k, v in finals.items()}
        if weights[-1] < 1.0:
            logs["msl_loss"] = loss.detach()
        return loss, logs

"""Batched task adaptation: the inner loops of a whole meta-batch as one ``torch.func.vmap``.

A Python loop over tasks launches many tiny kernels per task; vmapping the per-task inner loop
runs the meta-batch as one batched computation with the same meta-gradient.

BatchNorm is the trap: vmap over tasks gives wrong second-order meta-gradients through
``batch_norm``'s backward (pytorch/functorch #534; ``../shared/repro/
vmap_batchnorm_meta_gradient.py``), so models with BatchNorm always use the sequential loop.
Every gradient-based algorithm is tested batched vs sequential (float64, first and second
order) in ``tests/test_batched.py``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from lightmeta.episodes import TaskBatch

if TYPE_CHECKING:
    from lightmeta.gradient import GradientMetaLearner


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in module.modules())


#: Methods the vmapped path replaces; a subclass overriding one of them keeps the loop.
_SEQUENTIAL_ONLY = ("meta_loss", "inner_loop", "adapt", "predict", "evaluate_task")


def batched_unsupported_reason(learner: "GradientMetaLearner") -> str | None:
    """Why the batched path cannot be used for this learner, or ``None`` if it can."""
    from lightmeta.gradient import GradientMetaLearner

    overridden = [name for name in _SEQUENTIAL_ONLY
                  if getattr(type(learner), name) is not getattr(GradientMetaLearner, name)]
    if overridden:
        return f"{type(learner).__name__} overrides {', '.join(overridden)}, which the batched path does not call"
    if has_batch_norm(learner.model):
        return ("the model has BatchNorm, whose vmapped double backward gives wrong meta-gradients "
                "(pytorch/functorch #534)")
    return None


def batched_task_metrics(learner: "GradientMetaLearner", batch: TaskBatch, steps: int) -> dict[str, Tensor]:
    """Per-task query metrics ``[T]`` after ``steps`` differentiable inner steps, all tasks at once.

    Equal to running ``learner.inner_loop`` + ``predict`` per task (tested), including the
    first-order variant, ``inner_param_names`` and ``inner_update`` hooks.
    """
    named = dict(learner.model.named_parameters())
    params = {n: named[n] for n in learner.inner_param_names()}
    first_order = learner.use_first_order()

    def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> dict[str, Tensor]:
        fast = params
        for step in range(steps):
            def support_loss(p: dict[str, Tensor], step: int = step) -> Tensor:
                return learner.loss_fn(learner.forward_with(p, sx, step), sy)

            grads = grad(support_loss)(fast)
            if first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            fast = learner.inner_update(fast, grads, step)
        return learner.task_metrics(learner.forward_with(fast, qx, steps), qy)

    return vmap(one_task)(batch.support_x, batch.support_y, batch.query_x, batch.query_y)

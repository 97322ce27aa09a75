"""Batched task adaptation: the inner loops of a whole meta-batch as one ``torch.func.vmap``.

A Python loop over tasks launches many tiny kernels per task; vmapping the per-task inner loop
runs the meta-batch as one batched computation with the same meta-gradient.

BatchNorm is the trap: vmap over tasks gives wrong second-order meta-gradients through the
fused ``batch_norm`` kernel's backward (pytorch/functorch #534; ``../shared/repro/
vmap_batchnorm_meta_gradient.py``). In transductive mode (batch statistics, no running
statistics) the batched path therefore swaps every BatchNorm's forward for the same
normalisation written with plain tensor ops (:func:`composite_batch_norm`), whose vmapped double
backward is exact; inductive BatchNorm (running statistics updated during training) keeps the
sequential loop. Every gradient-based algorithm is tested batched vs sequential (float64, first
and second order, with and without BatchNorm) in ``tests/test_batched.py``.
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

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
    if has_batch_norm(learner.model) and learner.config.batch_norm != "transductive":
        return ("the model has inductive BatchNorm (running statistics updated per task), which a "
                "batched computation cannot reproduce")
    return None


def composite_batch_norm(module: _BatchNorm, x: Tensor) -> Tensor:
    """Batch-statistics normalisation in plain ops (what transductive BatchNorm computes).

    Equal to ``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)``, but its
    vmapped double backward is exact, unlike the fused kernel's (functorch #534).
    """
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + module.eps)
    if module.affine:
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = y * module.weight.view(shape) + module.bias.view(shape)
    return y


@contextmanager
def composite_batch_norms(model: nn.Module) -> Iterator[None]:
    """Route every BatchNorm of ``model`` through :func:`composite_batch_norm` for a while."""
    modules = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for m in modules:
        m.forward = types.MethodType(composite_batch_norm, m)  # instance attribute shadows the class method
    try:
        yield
    finally:
        for m in modules:
            del m.forward


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

    with composite_batch_norms(learner.model):
        return vmap(one_task)(batch.support_x, batch.support_y, batch.query_x, batch.query_y)

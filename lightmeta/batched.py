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

With ``checkpoint_inner_steps`` (second order) each inner step of all tasks is one checkpointed
step (:mod:`lightmeta.inner_checkpoint`) on fast weights ``[T, ...]``: it vmaps only the forward
and takes the per-task gradients with ``torch.autograd.grad`` of the summed support losses (task
``t``'s loss depends on its own fast weights alone, so the gradient of the sum with respect to
them is task ``t``'s gradient, exactly; tested in ``tests/test_inner_checkpointing.py``).
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.nn.modules.batchnorm import _BatchNorm

from lightmeta.acceleration import compiled
from lightmeta.episodes import TaskBatch
from lightmeta.inner_checkpoint import checkpointed_step

if TYPE_CHECKING:
    from lightmeta.gradient import GradientMetaLearner


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in module.modules())


#: Methods the vmapped path replaces; a subclass overriding one of them keeps the loop.
_SEQUENTIAL_ONLY = ("meta_loss", "task_terms", "inner_loop", "inner_step", "adapt", "predict", "evaluate_task")


def batched_unsupported_reason(learner: "GradientMetaLearner") -> str | None:
    """Why the batched path cannot be used for this learner, or ``None`` if it can."""
    from lightmeta.gradient import GradientMetaLearner

    overridden = [name for name in _SEQUENTIAL_ONLY
                  if getattr(type(learner), name) is not getattr(GradientMetaLearner, name)]
    if overridden:
        return f"{type(learner).__name__} overrides {', '.join(overridden)}, which the batched path does not call"
    if learner.config.task_backward:
        return "task_backward=true back-propagates each task's query loss on its own, in the per-task loop"
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
    """Route every BatchNorm of ``model`` through :func:`composite_batch_norm` for a while
    (nesting is harmless: modules already routed are left to the outer context)."""
    modules = [m for m in model.modules() if isinstance(m, _BatchNorm) and "forward" not in vars(m)]
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
    first-order variant, ``inner_param_names`` and ``inner_update`` hooks. Second order with
    ``checkpoint_inner_steps`` recomputes each step in the backward pass; ``compile`` compiles
    the whole vmapped computation.
    """
    named = dict(learner.model.named_parameters())
    params = {n: named[n] for n in learner.inner_param_names()}
    first_order = learner.use_first_order()
    data = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    with composite_batch_norms(learner.model):
        if learner.config.checkpoint_inner_steps and not first_order:
            return _checkpointed_metrics(learner, params, steps, *data)
        fn = compiled(learner, _vmapped_metrics, learner.config.compile_backend) if learner.config.compile \
            else _vmapped_metrics
        return fn(learner, params, steps, first_order, *data)


def _vmapped_metrics(learner: "GradientMetaLearner", params: dict[str, Tensor], steps: int, first_order: bool,
                     support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> dict[str, Tensor]:
    """The per-task inner loop and query metrics, vmapped over the tasks (inner gradients by
    ``torch.func.grad``, so the fused BatchNorm kernel must be swapped out, see above)."""
    def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> dict[str, Tensor]:
        fast = params
        for step in range(steps):
            fast = learner.functional_step(fast, sx, sy, step, first_order)
        return learner.task_metrics(learner.forward_with(fast, qx, steps), qy)

    return vmap(one_task)(support_x, support_y, query_x, query_y)


def _checkpointed_metrics(learner: "GradientMetaLearner", params: dict[str, Tensor], steps: int,
                          support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> dict[str, Tensor]:
    """Second-order batched inner loop with every step checkpointed: fast weights ``[T, ...]``."""
    tasks = support_x.shape[0]
    fast = {n: p.expand(tasks, *p.shape) for n, p in params.items()}
    trainable = [p for p in learner.parameters() if p.requires_grad]
    for step in range(steps):
        fast = checkpointed_step(lambda p, graph, step=step: _batched_step(learner, p, support_x, support_y, step, graph),
                                 fast, trainable, lambda: composite_batch_norms(learner.model))  # backward runs later
    return vmap(lambda p, qx, qy: learner.task_metrics(learner.forward_with(p, qx, steps), qy))(fast, query_x, query_y)


def _batched_step(learner: "GradientMetaLearner", fast: dict[str, Tensor], support_x: Tensor, support_y: Tensor,
                  step: int, create_graph: bool) -> dict[str, Tensor]:
    """One inner step of all tasks: vmapped forward, per-task gradients of the summed support
    losses, vmapped ``inner_update``."""
    with torch.enable_grad():
        losses = vmap(lambda p, x, y: learner.loss_fn(learner.forward_with(p, x, step), y))(fast, support_x, support_y)
        grads = torch.autograd.grad(losses.sum(), list(fast.values()), create_graph=create_graph)
    return vmap(lambda p, g: learner.inner_update(p, g, step))(fast, dict(zip(fast, grads)))

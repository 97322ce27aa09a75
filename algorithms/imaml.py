"""iMAML: Rajeswaran, Finn, Kakade & Levine (2019), "Meta-Learning with Implicit Gradients",
NeurIPS. https://arxiv.org/abs/1909.04630

Inner loop: ``inner_steps`` gradient-descent steps from ``theta`` on the proximally regularised
support loss ``L_s(phi) + (lam/2) ||phi - theta||^2`` (``inner_update`` adds the proximal
gradient ``lam * (phi - theta)``). No graph is kept through these steps, so memory does not
grow with ``inner_steps``.

Outer gradient: at the adapted ``phi`` the implicit function theorem gives
``d phi / d theta = (I + H / lam)^-1`` with ``H`` the Hessian of ``L_s`` at ``phi``, so the
meta-gradient of the query loss is ``v = (I + H / lam)^-1 g``, ``g = grad L_q(phi)``. It is
solved with ``cg_steps`` of conjugate gradient using Hessian-vector products (double backward
through one support pass); ``cg_damping`` adds ``cg_damping * I`` to the system for stability.
``meta_loss`` returns the surrogate ``mean_tasks(sum(theta * stopgrad(v)))``, whose gradient is
the implicit meta-gradient, so Lightning's optimizer step applies it unchanged; with
``task_backward`` each task's surrogate is back-propagated as soon as it is computed
(``task_terms``), so the per-task implicit gradients are summed instead of kept.
``first_order: true`` skips the solve (``v = g``, the paper's first-order approximation).
"""
from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field
from torch import Tensor

from lightmeta.episodes import TaskBatch
from lightmeta.gradient import GradientConfig, GradientMetaLearner, Params
from lightmeta.registry import register_algorithm

Vector = list[Tensor]


def _dot(a: Vector, b: Vector) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def conjugate_gradient(matvec: Callable[[Vector], Vector], b: Vector, steps: int, tol: float = 1e-12) -> Vector:
    """Approximate ``A^-1 b`` for symmetric positive definite ``A`` given as ``matvec``, from 0."""
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rs = _dot(r, r)
    for _ in range(steps):
        if rs <= tol * tol:
            break
        ap = matvec(p)
        alpha = rs / _dot(p, ap)
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * api for ri, api in zip(r, ap)]
        rs_new = _dot(r, r)
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
        rs = rs_new
    return x


class IMAMLConfig(GradientConfig):
    """iMAML hyperparameters (``first_order`` skips the conjugate-gradient solve)."""

    inner_steps: int = Field(default=10, ge=1, description="gradient steps on the regularised support loss")
    lam: float = Field(default=2.0, gt=0, description="proximal regularisation strength lambda (the paper's Omniglot value)")
    cg_steps: int = Field(default=5, ge=1, description="conjugate-gradient iterations of the implicit solve")
    cg_damping: float = Field(default=0.0, ge=0, description="added to the identity term: (1 + damping) I + H / lam")
    eval_proximal: bool = Field(
        default=True, description="keep the proximal term when adapting at validation/test (the paper's Alg*)")


@register_algorithm("imaml")
class IMAML(GradientMetaLearner):
    """Implicit MAML: proximal inner loop, implicit meta-gradient by conjugate gradient."""

    Config = IMAMLConfig
    config: IMAMLConfig
    differentiates_inner_loop = False  # the meta-gradient is implicit: no graph through the inner loop

    def inner_update(self, params: Params, grads: Params, step: int) -> Params:
        """Gradient step on ``L_s + (lam/2)||phi - theta||^2`` (plain ``L_s`` at eval if not ``eval_proximal``)."""
        c = self.config
        if not self.training and not c.eval_proximal:
            return super().inner_update(params, grads, step)
        theta = dict(self.model.named_parameters())
        return {k: p - c.inner_lr * (grads[k] + c.lam * (p - theta[k].detach())) for k, p in params.items()}

    def implicit_gradient(self, phi: Params, support_x: Tensor, support_y: Tensor, query_grad: Vector) -> Vector:
        """``((1 + cg_damping) I + H / lam)^-1 query_grad`` with ``H`` the support-loss Hessian at ``phi``."""
        c = self.config
        with torch.enable_grad():
            loss = self.loss_fn(self.forward_with(phi, support_x, c.inner_steps), support_y)
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)

        def matvec(u: Vector) -> Vector:
            hu = torch.autograd.grad(grads, list(phi.values()), grad_outputs=u, retain_graph=True)
            return [(1 + c.cg_damping) * ui + hui / c.lam for ui, hui in zip(u, hu)]

        return [v.detach() for v in conjugate_gradient(matvec, query_grad, c.cg_steps)]

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Surrogate whose gradient is the mean implicit meta-gradient; logs the query metrics at ``phi``."""
        c = self.config
        named = dict(self.model.named_parameters())
        inner = set(self.inner_param_names())
        outer_only = any(p.requires_grad and n not in inner for n, p in named.items())
        surrogates = self.task_terms(len(batch))  # task_backward: each task's surrogate back-propagated at once
        metrics: dict[str, list[Tensor]] = {}
        for task in batch.tasks():
            with torch.no_grad():  # no graph through the inner loop: memory independent of inner_steps
                phi = self.inner_loop(task.support_x, task.support_y, c.inner_steps)
            query = self.task_metrics(self.forward_with(phi, task.query_x, c.inner_steps), task.query_y)
            for k, v in query.items():
                metrics.setdefault(k, []).append(v.detach())
            g = list(torch.autograd.grad(query["loss"], list(phi.values()), retain_graph=outer_only))
            v = g if c.first_order else self.implicit_gradient(phi, task.support_x, task.support_y, g)
            surrogate = sum((named[n] * vi).sum() for n, vi in zip(phi, v))
            if outer_only:  # parameters the inner loop does not adapt get the plain query gradient
                surrogate = surrogate + query["loss"]
            surrogates.add(surrogate)
        loss = surrogates.mean()
        return loss, {k: torch.stack(v).mean() for k, v in metrics.items()}

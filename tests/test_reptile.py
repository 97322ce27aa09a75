"""Reptile: the outer step equals theta + epsilon * mean(phi - theta) with phi in closed form on a
quadratic (linear least-squares) problem; the inner Adam equals torch.optim.Adam."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor

from lightmeta import EpisodeSpec, TaskBatch
from lightmeta.registry import ALGORITHMS

DIM = 3
LINEAR = {"name": "mlp", "hidden": []}  # y = w.x + b: the MSE loss is quadratic in (w, b)
REGRESSION = {"problem": "regression", "in_shape": [DIM], "train_ways": 1, "eval_ways": 1}


def _batch(tasks: int = 2, n: int = 8) -> TaskBatch:
    g = torch.Generator().manual_seed(5)
    sx, qx = (torch.randn(tasks, n, DIM, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(tasks, DIM, 1, generator=g, dtype=torch.float64)
    return TaskBatch(sx, sx @ w + 0.3, qx, qx @ w + 0.3, EpisodeSpec(1, n, n), torch.arange(tasks))


def _reptile(**params):
    learner = ALGORITHMS.get("reptile")(params, model=LINEAR, task=REGRESSION).double()
    learner.train()
    return learner


def _theta(learner) -> Tensor:
    """Flat (w, b) of the linear model."""
    return torch.cat([learner.model.head.weight.detach().flatten(), learner.model.head.bias.detach()])


def _closed_form_phi(theta: Tensor, x: Tensor, y: Tensor, lr: float, steps: int) -> Tensor:
    """k SGD steps on (1/n)||A p - y||^2 from theta: phi - p* = (I - lr H)^k (theta - p*)."""
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    h = 2 / len(x) * a.T @ a
    p_star = torch.linalg.solve(h, 2 / len(x) * a.T @ y.flatten())
    contraction = torch.linalg.matrix_power(torch.eye(len(theta), dtype=x.dtype) - lr * h, steps)
    return p_star + contraction @ (theta - p_star)


@pytest.mark.parametrize("inner_data", ["support", "support+query"])
def test_outer_step_equals_reptile_formula_on_quadratic(inner_data: str) -> None:
    eps, lr, k = 0.7, 0.05, 4
    learner = _reptile(lr=eps, inner_lr=lr, inner_steps=k, inner_data=inner_data)
    batch = _batch()
    theta = _theta(learner)
    phis = []
    for t in batch.tasks():
        x, y = (t.support_x, t.support_y) if inner_data == "support" else (
            torch.cat([t.support_x, t.query_x]), torch.cat([t.support_y, t.query_y]))
        phis.append(_closed_form_phi(theta, x, y, lr, k))
    expected = theta + eps * (torch.stack(phis).mean(0) - theta)

    opt = learner.configure_optimizers()  # sgd, lr = epsilon, momentum 0
    loss, logs = learner.meta_loss(batch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.allclose(_theta(learner), expected, rtol=0, atol=1e-12)

    # the logged loss is the query MSE after adaptation (not the surrogate)
    query = [F.mse_loss(torch.cat([t.query_x, torch.ones(len(t.query_x), 1, dtype=torch.float64)], 1) @ phi, t.query_y.flatten())
             for t, phi in zip(batch.tasks(), phis)]
    assert torch.allclose(logs["loss"], torch.stack(query).mean(), atol=1e-12)


def test_inner_adam_equals_torch_adam() -> None:
    learner = _reptile(inner_optimizer="adam", inner_lr=0.01, inner_betas=(0.0, 0.999), inner_steps=6)
    task = _batch().task(0)
    learner.eval()
    phi = learner.inner_loop(task.support_x, task.support_y, 6)

    w = learner.model.head.weight.detach().clone().requires_grad_(True)
    b = learner.model.head.bias.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=0.01, betas=(0.0, 0.999), eps=1e-8)
    for _ in range(6):
        opt.zero_grad()
        F.mse_loss(task.support_x @ w.T + b, task.support_y).backward()
        opt.step()
    assert torch.allclose(phi["head.weight"], w, atol=1e-12) and torch.allclose(phi["head.bias"], b, atol=1e-12)
    # moments restart per task: a second adaptation from the same start gives the same weights
    again = learner.inner_loop(task.support_x, task.support_y, 6)
    assert torch.equal(again["head.weight"], phi["head.weight"])


def test_reptile_is_first_order_by_construction() -> None:
    with pytest.raises(ValidationError):
        ALGORITHMS.get("reptile").Config(first_order=False)

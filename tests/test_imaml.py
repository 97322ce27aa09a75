"""iMAML: the implicit meta-gradient equals the exact hypergradient of linear regression (closed
form), approaches the unrolled second-order gradient of the proximal inner loop as the inner
steps grow, and the conjugate-gradient solver solves SPD systems."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from lightmeta import EpisodeSpec, TaskBatch
from lightmeta.algorithms.imaml import conjugate_gradient
from lightmeta.registry import ALGORITHMS

REGRESSION = {"problem": "regression", "in_shape": [3], "train_ways": 1, "eval_ways": 1}


def _batch(tasks: int = 2, n: int = 6, dim: int = 3) -> TaskBatch:
    g = torch.Generator().manual_seed(11)
    sx, qx = (torch.randn(tasks, n, dim, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(tasks, dim, 1, generator=g, dtype=torch.float64)
    return TaskBatch(sx, torch.sin(sx @ w), qx, torch.sin(qx @ w), EpisodeSpec(1, n, n), torch.arange(tasks))


def _imaml(model: dict, **params):
    learner = ALGORITHMS.get("imaml")(params, model=model, task=REGRESSION).double()
    learner.train()
    return learner


def _meta_grad(learner, batch: TaskBatch) -> Tensor:
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in learner.model.parameters()])


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_conjugate_gradient_solves_spd_system() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: [a @ v[0]], [b], steps=6)[0]
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-9)
    partial = conjugate_gradient(lambda v: [a @ v[0]], [b], steps=2)[0]
    assert not torch.allclose(partial, torch.linalg.solve(a, b), atol=1e-6)  # steps really bound the work


def test_implicit_gradient_equals_exact_linear_regression_hypergradient() -> None:
    lam, lr = 2.0, 0.05
    learner = _imaml({"name": "mlp", "hidden": []}, lam=lam, inner_lr=lr, inner_steps=400, cg_steps=4)
    batch = _batch()
    # exact: phi*(theta) = (H + lam I)^-1 (b + lam theta) for L_s = (1/n)||A p - y||^2, then dL_q/dtheta
    theta = torch.cat([learner.model.head.weight.detach().flatten(), learner.model.head.bias.detach()]).requires_grad_(True)
    total = 0.0
    for t in batch.tasks():
        a = torch.cat([t.support_x, torch.ones(len(t.support_x), 1, dtype=torch.float64)], 1)
        aq = torch.cat([t.query_x, torch.ones(len(t.query_x), 1, dtype=torch.float64)], 1)
        h, b = 2 / len(a) * a.T @ a, 2 / len(a) * a.T @ t.support_y.flatten()
        phi = torch.linalg.solve(h + lam * torch.eye(4, dtype=torch.float64), b + lam * theta)
        total = total + F.mse_loss(aq @ phi, t.query_y.flatten())
    exact = torch.autograd.grad(total / len(batch), theta)[0]
    assert _rel(_meta_grad(learner, batch), exact) < 1e-8


def _unrolled_grad(learner, batch: TaskBatch, steps: int) -> Tensor:
    """Second-order gradient through ``steps`` GD steps on L_s + (lam/2)||phi - theta||^2."""
    c, model = learner.config, learner.model
    theta = dict(model.named_parameters())
    total = 0.0
    for t in batch.tasks():
        fast = dict(theta)
        for _ in range(steps):
            loss = F.mse_loss(functional_call(model, fast, (t.support_x,)), t.support_y)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - c.inner_lr * (g + c.lam * (p - theta[n])) for (n, p), g in zip(fast.items(), grads)}
        total = total + F.mse_loss(functional_call(model, fast, (t.query_x,)), t.query_y)
    grads = torch.autograd.grad(total / len(batch), list(theta.values()))
    return torch.cat([g.flatten() for g in grads])


def test_implicit_gradient_approaches_unrolled_second_order_gradient() -> None:
    """A tanh network: the gap to the unrolled gradient shrinks as the inner loop converges."""
    errors = []
    for steps in (3, 15, 60, 240):
        torch.manual_seed(0)
        learner = _imaml({"name": "mlp", "hidden": [6], "activation": "tanh"}, lam=2.0, inner_lr=0.1,
                         inner_steps=steps, cg_steps=60)
        batch = _batch()
        unrolled = _unrolled_grad(learner, batch, steps)
        errors.append(_rel(_meta_grad(learner, batch), unrolled))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-2 and errors[-1] < 1e-6, errors


def test_first_order_uses_the_query_gradient_at_phi() -> None:
    learner = _imaml({"name": "mlp", "hidden": [5]}, first_order=True, inner_steps=3, inner_lr=0.1)
    batch = _batch(tasks=1)
    task = batch.task(0)
    with torch.no_grad():
        phi = learner.inner_loop(task.support_x, task.support_y, 3)
    query = F.mse_loss(learner.forward_with(phi, task.query_x), task.query_y)
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(query, list(phi.values()))])
    assert _rel(_meta_grad(learner, batch), expected) < 1e-12


@pytest.mark.parametrize("proximal", [True, False])
def test_evaluation_adaptation_keeps_or_drops_the_proximal_term(proximal: bool) -> None:
    learner = _imaml({"name": "mlp", "hidden": []}, lam=5.0, inner_lr=0.05, eval_proximal=proximal)
    learner.eval()
    task = _batch().task(0)
    phi = learner.inner_loop(task.support_x, task.support_y, 1)
    theta = dict(learner.model.named_parameters())
    grads = torch.autograd.grad(F.mse_loss(learner.forward_with(theta, task.support_x), task.support_y),
                                list(theta.values()))
    plain = {n: p.detach() - 0.05 * g for (n, p), g in zip(theta.items(), grads)}
    # one step from theta: the proximal gradient lam * (phi - theta) is zero, so compare two steps
    phi2 = learner.inner_loop(task.support_x, task.support_y, 2)
    fast = {n: p.clone().requires_grad_(True) for n, p in plain.items()}
    g2 = torch.autograd.grad(F.mse_loss(learner.forward_with(fast, task.support_x), task.support_y), list(fast.values()))
    expected = {n: p - 0.05 * (g + (5.0 * (p - theta[n].detach()) if proximal else 0)) for (n, p), g in zip(plain.items(), g2)}
    for n in phi:
        assert torch.allclose(phi[n], plain[n], atol=1e-12)
        assert torch.allclose(phi2[n], expected[n], atol=1e-12)

"""MetaOptNet: the SVM dual against an independent scipy QP solution, its gradient against
finite differences, and the ridge head."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from lightmeta.algorithms.metaoptnet import project_simplex, svm_dual
from lightmeta.algorithms.r2d2 import ridge_weights
from lightmeta.episodes import EpisodeSpec
from lightmeta.registry import ALGORITHMS
from lightmeta.task_info import TaskInfo

IDENTITY = {"name": "mlp", "hidden": []}


def make(features: int, **algo):
    info = TaskInfo(problem="classification", in_shape=(features,), train_ways=3, eval_ways=3)
    return ALGORITHMS.get("metaoptnet")(algo, model=IDENTITY, task=info).double()


def scipy_dual(x: np.ndarray, labels: np.ndarray, ways: int, c: float, ridge: float) -> np.ndarray:
    """The Crammer-Singer dual solved by SLSQP with explicit constraints."""
    m = len(x)
    y = np.eye(ways)[labels]
    gram = x @ x.T + ridge * np.eye(m)

    def objective(a: np.ndarray) -> tuple[float, np.ndarray]:
        alpha = a.reshape(m, ways)
        return 0.5 * np.sum(alpha * (gram @ alpha)) - np.sum(alpha * y), (gram @ alpha - y).ravel()

    constraints = [
        {"type": "eq", "fun": lambda a, i=i: a.reshape(m, ways)[i].sum()} for i in range(m)
    ] + [{"type": "ineq", "fun": lambda a: (c * y - a.reshape(m, ways)).ravel()}]
    result = minimize(objective, np.zeros(m * ways), jac=True, constraints=constraints, method="SLSQP",
                      options={"ftol": 1e-14, "maxiter": 1000})
    assert result.success, result.message
    return result.x.reshape(m, ways)


def random_task(seed: int, ways: int, shots: int, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways).repeat(shots)[torch.randperm(ways * shots, generator=g)]
    x = torch.randn(ways * shots, features, generator=g, dtype=torch.float64) + 1.5 * F.one_hot(labels, features).double()
    return x, labels


def test_simplex_projection_is_the_nearest_point_of_the_simplex() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(50, 4, generator=g, dtype=torch.float64) * 3
    p = project_simplex(v, 0.7)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.full((50,), 0.7, dtype=torch.float64))
    # optimality: no random feasible point is closer
    for _ in range(200):
        other = project_simplex(torch.randn(50, 4, generator=g, dtype=torch.float64), 0.7)
        assert ((v - p).pow(2).sum(-1) <= (v - other).pow(2).sum(-1) + 1e-12).all()


@pytest.mark.parametrize(("ways", "shots", "features", "c", "ridge"), [(3, 2, 5, 0.1, 1.0), (4, 3, 6, 1.0, 0.1), (5, 1, 8, 0.5, 1.0)])
def test_svm_dual_matches_a_scipy_qp(ways: int, shots: int, features: int, c: float, ridge: float) -> None:
    x, labels = random_task(ways + shots, ways, shots, features)
    y = F.one_hot(labels, ways).double()
    ours = svm_dual((x @ x.T).unsqueeze(0), y.unsqueeze(0), c, ridge, steps=300)[0]
    ref = scipy_dual(x.numpy(), labels.numpy(), ways, c, ridge)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)
    # feasible, and not the trivial all-tight point
    assert (ours <= c * y + 1e-12).all() and torch.allclose(ours.sum(1), torch.zeros(len(x), dtype=torch.float64), atol=1e-12)
    assert ((c * y - ours) > 1e-6).sum() > len(x)
    # the learner's logits are those of w = X^T alpha
    learner = make(features, svm_c=c, dual_ridge=ridge, init_scale=1.0)
    q = torch.randn(4, features, dtype=torch.float64)
    state = learner.adapt(x, labels, EpisodeSpec(ways=ways, shots=shots, queries=1))
    np.testing.assert_allclose(learner.predict(state, q).detach().numpy(), q.numpy() @ x.numpy().T @ ref, atol=1e-5)


def test_svm_dual_gradient_matches_finite_differences() -> None:
    x, labels = random_task(7, 3, 2, 4)
    y = F.one_hot(labels, 3).double().unsqueeze(0)
    weights = torch.randn(1, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def value(features: torch.Tensor) -> torch.Tensor:
        gram = (features @ features.T).unsqueeze(0)
        return (svm_dual(gram, y, 0.5, 1.0, steps=300) * weights).sum()

    x = x.requires_grad_(True)
    (grad,) = torch.autograd.grad(value(x), x)
    eps = 1e-6
    numeric = torch.zeros_like(x)
    with torch.no_grad():
        for idx in np.ndindex(*x.shape):
            plus, minus = x.clone(), x.clone()
            plus[idx] += eps
            minus[idx] -= eps
            numeric[idx] = (value(plus) - value(minus)) / (2 * eps)
    assert grad.abs().max() > 1e-3
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-7)


def test_ridge_head_is_the_ridge_solution_and_scale_is_learned() -> None:
    x, labels = random_task(1, 3, 2, 5)
    learner = make(5, head="ridge", ridge_lambda=2.0)
    spec = EpisodeSpec(ways=3, shots=2, queries=1)
    w = learner.adapt(x, labels, spec)[0]
    y = F.one_hot(labels, 3).double()
    ref = torch.linalg.solve(x.T @ x + 2.0 * torch.eye(5, dtype=torch.float64), x.T @ y)
    torch.testing.assert_close(w, ref, rtol=1e-10, atol=1e-12)
    loss = F.cross_entropy(learner.predict(learner.adapt(x, labels, spec), x), labels)
    loss.backward()
    assert learner.scale.grad is not None and learner.scale.grad.abs() > 0
    assert torch.allclose(ridge_weights(x[None], y[None], torch.tensor(2.0, dtype=torch.float64), "woodbury")[0], ref)

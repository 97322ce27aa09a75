"""Batched (vmapped) task adaptation equals the per-task loop, for every gradient-based algorithm."""
from __future__ import annotations

import logging

import pytest
import torch
from helpers import assert_same_meta_gradient, meta_gradients

from lightmeta import ALGORITHMS, EpisodeSpec, GradientMetaLearner, TaskBatch
from lightmeta.batched import batched_task_metrics, batched_unsupported_reason

GRADIENT = [n for n in ALGORITHMS.names() if issubclass(ALGORITHMS.get(n), GradientMetaLearner)]
REGRESSION = {"problem": "regression", "in_shape": [1], "train_ways": 1, "eval_ways": 1}


def _batch(dtype: torch.dtype) -> TaskBatch:
    g = torch.Generator().manual_seed(3)
    sx, qx = torch.randn(4, 10, 1, generator=g, dtype=dtype), torch.randn(4, 10, 1, generator=g, dtype=dtype)
    amp = torch.rand(4, 1, 1, generator=g, dtype=dtype) * 4 + 0.5
    return TaskBatch(sx, amp * torch.sin(sx), qx, amp * torch.sin(qx), EpisodeSpec(1, 10, 10), torch.arange(4))


@pytest.mark.parametrize("name", GRADIENT)
@pytest.mark.parametrize("first_order", [False, True])
def test_batched_meta_gradient_equals_sequential(name: str, first_order: bool) -> None:
    torch.manual_seed(0)
    cls = ALGORITHMS.get(name)
    model = {"name": "mlp", "hidden": [16, 16]}
    reason = batched_unsupported_reason(cls({}, model=model, task=REGRESSION))
    if reason is not None:
        pytest.skip(f"{name} keeps the sequential loop: {reason}")
    learner = cls({"inner_lr": 0.05, "inner_steps": 3, "first_order": first_order}, model=model, task=REGRESSION).double()
    learner.train()
    batch = _batch(torch.float64)
    _assert_batched_equals_sequential(learner, batch)


def _assert_batched_equals_sequential(learner: GradientMetaLearner, batch: TaskBatch) -> None:
    learner.config.batched_tasks = "off"
    sequential, seq_logs = learner.meta_loss(batch)
    learner.config.batched_tasks = "on"
    batched, logs = learner.meta_loss(batch)
    assert torch.allclose(batched, sequential, rtol=1e-12, atol=0)
    assert all(torch.allclose(logs[k], seq_logs[k], rtol=1e-12, atol=0) for k in seq_logs)
    assert_same_meta_gradient(meta_gradients(learner, batched), meta_gradients(learner, sequential))


@pytest.mark.parametrize("name", GRADIENT)
@pytest.mark.parametrize("first_order", [False, True])
def test_batched_equals_sequential_with_transductive_batch_norm(name: str, first_order: bool) -> None:
    """Conv net with BatchNorm: the composite batch-statistics normalisation under vmap is exact
    where the fused kernel is not (../shared/repro/vmap_batchnorm_meta_gradient.py)."""
    cls = ALGORITHMS.get(name)
    task = {"problem": "classification", "in_shape": [1, 16, 16], "train_ways": 3, "eval_ways": 3}
    model = {"name": "conv4", "filters": 4}
    reason = batched_unsupported_reason(cls({}, model=model, task=task))
    if reason is not None:
        pytest.skip(f"{name} keeps the sequential loop: {reason}")
    torch.manual_seed(0)
    learner = cls({"inner_lr": 0.3, "inner_steps": 2, "first_order": first_order}, model=model, task=task).double()
    learner.train()
    g = torch.Generator().manual_seed(5)
    batch = TaskBatch(torch.randn(3, 6, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(3).repeat(2).expand(3, -1),
                      torch.randn(3, 9, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(3).repeat(3).expand(3, -1),
                      EpisodeSpec(3, 2, 3), torch.arange(3))
    _assert_batched_equals_sequential(learner, batch)


def test_batched_classification_metrics_equal_sequential() -> None:
    task = {"problem": "classification", "in_shape": [1, 6, 6], "train_ways": 3, "eval_ways": 3}
    learner = ALGORITHMS.get("maml")({"inner_lr": 0.5, "inner_steps": 2}, model={"name": "mlp", "hidden": [8]}, task=task).double()
    learner.train()
    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.randn(5, 6, 1, 6, 6, generator=g, dtype=torch.float64), torch.arange(3).repeat(2).expand(5, -1),
                      torch.randn(5, 9, 1, 6, 6, generator=g, dtype=torch.float64), torch.arange(3).repeat(3).expand(5, -1),
                      EpisodeSpec(3, 2, 3), torch.arange(5))
    per_task = batched_task_metrics(learner, batch, 2)
    loop = [learner.task_metrics(learner.predict(learner.adapt(t.support_x, t.support_y, t.spec), t.query_x), t.query_y)
            for t in batch.tasks()]
    assert torch.allclose(per_task["loss"], torch.stack([m["loss"] for m in loop]), rtol=1e-12)
    assert torch.equal(per_task["acc"], torch.stack([m["acc"] for m in loop]))


def test_batch_norm_falls_back_to_the_loop_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    """Inductive BatchNorm cannot be batched; transductive BatchNorm on CPU keeps the (faster) loop under auto."""
    inductive = ALGORITHMS.get("maml")({"batch_norm": "inductive"}, model={"name": "mlp", "hidden": [8], "batch_norm": True}, task=REGRESSION)
    assert "inductive BatchNorm" in batched_unsupported_reason(inductive)
    learner = ALGORITHMS.get("maml")({}, model={"name": "mlp", "hidden": [8], "batch_norm": True}, task=REGRESSION)
    learner.train()
    assert batched_unsupported_reason(learner) is None
    with caplog.at_level(logging.INFO):
        first, _ = learner.meta_loss(_batch(torch.float32))
        learner.meta_loss(_batch(torch.float32))
    assert sum("adapting tasks one by one" in r.getMessage() for r in caplog.records) == 1
    learner.config.batched_tasks = "off"
    assert torch.equal(first, learner.meta_loss(_batch(torch.float32))[0])

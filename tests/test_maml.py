"""MAML meta-gradients against learn2learn's MAML (the reference implementation)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import TinyConvBN, require_peer
from lightmeta import EpisodeSpec, TaskBatch, register_model
from lightmeta.registry import MODELS
from lightmeta.registry import ALGORITHMS

torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="module", autouse=True)
def tiny_conv():
    register_model("test_tiny_conv_bn")(TinyConvBN)
    yield
    MODELS.unregister("test_tiny_conv_bn")


def _regression_batch(tasks: int = 3) -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    sx, qx = torch.randn(tasks, 10, 1, generator=g), torch.randn(tasks, 10, 1, generator=g)
    return TaskBatch(sx, torch.sin(sx), qx, torch.sin(qx), EpisodeSpec(1, 10, 10), torch.arange(tasks))


def _classification_batch(tasks: int = 3, ways: int = 3) -> TaskBatch:
    g = torch.Generator().manual_seed(2)
    sx, qx = torch.randn(tasks, ways * 2, 1, 8, 8, generator=g), torch.randn(tasks, ways * 3, 1, 8, 8, generator=g)
    sy = torch.arange(ways).repeat_interleave(2).expand(tasks, -1)
    qy = torch.arange(ways).repeat_interleave(3).expand(tasks, -1)
    return TaskBatch(sx, sy, qx, qy, EpisodeSpec(ways, 2, 3), torch.arange(tasks))


CASES = {
    "mlp": (
        {"name": "mlp", "hidden": [16, 16]},
        {"problem": "regression", "in_shape": [1], "train_ways": 1, "eval_ways": 1},
        _regression_batch,
        F.mse_loss,
    ),
    "conv_bn": (
        {"name": "test_tiny_conv_bn", "channels": 4},
        {"problem": "classification", "in_shape": [1, 8, 8], "train_ways": 3, "eval_ways": 3},
        _classification_batch,
        F.cross_entropy,
    ),
}


def _reference_grads(l2l, model: nn.Module, batch: TaskBatch, loss_fn, lr: float, steps: int, first_order: bool):
    maml = l2l.algorithms.MAML(model, lr=lr, first_order=first_order)
    total = 0.0
    for task in batch.tasks():
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(loss_fn(learner(task.support_x), task.support_y))
        total = total + loss_fn(learner(task.query_x), task.query_y)
    (total / len(batch)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.peer
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_learn2learn(case: str, steps: int, first_order: bool) -> None:
    l2l = require_peer("learn2learn")
    model_cfg, task, make_batch, loss_fn = CASES[case]
    learner = ALGORITHMS.get("maml")({"inner_lr": 0.1, "inner_steps": steps, "first_order": first_order},
                                     model=model_cfg, task=task)
    learner.train()
    reference_model = copy.deepcopy(learner.model)
    batch = make_batch()

    loss, _ = learner.meta_loss(batch)
    loss.backward()
    ours = {n: p.grad for n, p in learner.model.named_parameters()}
    ref = _reference_grads(l2l, reference_model, batch, loss_fn, 0.1, steps, first_order)

    assert ours.keys() == ref.keys()
    whole = torch.cat([g.flatten() for g in ref.values()]).norm()
    for name in ours:
        # relative per tensor; a conv bias right before BatchNorm has a true gradient of 0, so its
        # float32 noise is measured against the whole meta-gradient instead
        scale = torch.maximum(ref[name].norm(), whole * 1e-3)
        rel = (ours[name] - ref[name]).norm() / scale
        assert rel <= 1e-5, f"{name}: relative difference {rel:.2e}"


def test_first_order_differs_from_second_order() -> None:
    """The flag must change the meta-gradient (it drops the Hessian term), not be ignored."""
    model_cfg, task, make_batch, _ = CASES["mlp"]
    grads = {}
    for fo in (False, True):
        torch.manual_seed(0)
        learner = ALGORITHMS.get("maml")({"inner_lr": 0.5, "inner_steps": 2, "first_order": fo}, model=model_cfg, task=task)
        learner.train()
        learner.meta_loss(make_batch())[0].backward()
        grads[fo] = torch.cat([p.grad.flatten() for p in learner.model.parameters()])
    assert not torch.allclose(grads[False], grads[True], rtol=1e-4, atol=1e-7)


def test_evaluation_keeps_no_outer_graph_and_reports_curve() -> None:
    model_cfg, task, make_batch, _ = CASES["mlp"]
    learner = ALGORITHMS.get("maml")({"inner_lr": 0.05, "eval_inner_steps": 4}, model=model_cfg, task=task)
    learner.eval()
    task0 = make_batch().task(0)
    task0.query_x, task0.query_y = task0.support_x, task0.support_y  # small steps must lower this loss
    with torch.no_grad():  # as Lightning runs validation with inference_mode=False
        out = learner.evaluate_task(task0)
    assert [f"loss_step{s}" for s in range(5)] == [k for k in out if k.startswith("loss_step")]
    assert all(not v.requires_grad for v in out.values())
    assert out["loss"] == out["loss_step4"]
    assert out["loss_step4"] < out["loss_step0"]  # adapting on a sine fits it better
    assert all(p.grad is None for p in learner.parameters())


def test_batch_norm_mode_is_explicit() -> None:
    """Transductive BN uses batch statistics even in eval() and never updates running stats;
    inductive BN in eval() uses the running statistics."""
    model_cfg, task, make_batch, _ = CASES["conv_bn"]
    x = make_batch().query_x[0]
    outs = {}
    for mode in ("transductive", "inductive"):
        torch.manual_seed(0)
        learner = ALGORITHMS.get("maml")({"batch_norm": mode}, model=model_cfg, task=task)
        learner.eval()
        bn = [m for m in learner.model.modules() if isinstance(m, nn.BatchNorm2d)][0]
        before = bn.running_mean.clone()
        with torch.no_grad():
            outs[mode] = learner.forward_with({}, x)
        assert torch.equal(bn.running_mean, before)
        assert bn.track_running_stats and not bn.training  # restored after the call
        with torch.no_grad():
            outs[mode + "_plain_eval"] = learner.model.eval()(x)  # running statistics (still initial)
            outs[mode + "_plain_train"] = learner.model.train()(x)  # batch statistics
    assert torch.allclose(outs["transductive"], outs["transductive_plain_train"], atol=1e-6)
    assert torch.allclose(outs["inductive"], outs["inductive_plain_eval"], atol=1e-6)
    assert not torch.allclose(outs["transductive"], outs["inductive"], atol=1e-3)

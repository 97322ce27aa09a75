"""The gradient-based zoo (FOMAML, ANIL, BOIL, Meta-SGD, Reptile, MAML++, iMAML): reference
meta-gradients (learn2learn where it has the algorithm, an independent unroll otherwise), the
properties every one of them must have on a BatchNorm conv net, and a short sinusoid fit of each
through the runner with a checkpoint round trip of its extra state (learned rates, per-step BN).
Reptile, MAML++ and iMAML have their own files (test_reptile.py, test_mamlpp.py, test_imaml.py)."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from helpers import TinyConvBN, require_peer
from lightmeta import Backbone, EpisodeSpec, PluginConfig, TaskBatch, register_model
from lightmeta.algorithms.maml import MAML
from lightmeta.config import load_config
from lightmeta.errors import ConfigError
from lightmeta.gradient import param_key
from lightmeta.registry import ALGORITHMS, MODELS
from lightmeta.runner import fit, load_learner

ZOO = ["fomaml", "anil", "boil", "metasgd", "reptile", "mamlpp", "imaml"]
MLP = {"name": "mlp", "hidden": [16, 16]}
CLS_TASK = {"problem": "classification", "in_shape": [4], "train_ways": 3, "eval_ways": 3}


@pytest.fixture(scope="module", autouse=True)
def tiny_conv():
    register_model("test_zoo_tiny_conv_bn")(TinyConvBN)
    yield
    MODELS.unregister("test_zoo_tiny_conv_bn")


def _classification_batch(tasks: int = 2, ways: int = 3, shape: tuple[int, ...] = (4,), dtype=torch.float64) -> TaskBatch:
    g = torch.Generator().manual_seed(3)
    sx = torch.randn(tasks, ways * 2, *shape, generator=g, dtype=dtype)
    qx = torch.randn(tasks, ways * 3, *shape, generator=g, dtype=dtype)
    sy = torch.arange(ways).repeat_interleave(2).expand(tasks, -1)
    qy = torch.arange(ways).repeat_interleave(3).expand(tasks, -1)
    return TaskBatch(sx, sy, qx, qy, EpisodeSpec(ways, 2, 3), torch.arange(tasks))


def _learner(name: str, params: dict, model: dict = MLP, task: dict = CLS_TASK):
    learner = ALGORITHMS.get(name)(params, model=model, task=task).double()
    learner.train()
    return learner


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _assert_close(ours: dict[str, Tensor], ref: dict[str, Tensor], tol: float = 1e-5) -> None:
    assert ours.keys() == ref.keys()
    for name in ours:
        assert _rel(ours[name], ref[name]) <= tol, f"{name}: relative difference {_rel(ours[name], ref[name]):.2e}"


def _unrolled_grads(model: nn.Module, batch: TaskBatch, adapted: list[str], lr: float, steps: int,
                    first_order: bool) -> dict[str, Tensor]:
    """Independent MAML-style unroll: SGD on the ``adapted`` parameters, mean query loss backward."""
    total = 0.0
    for task in batch.tasks():
        fast = {n: p for n, p in model.named_parameters() if n in adapted}
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (task.support_x,)), task.support_y)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
        total = total + F.cross_entropy(functional_call(model, fast, (task.query_x,)), task.query_y)
    (total / len(batch)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _meta_grads(learner, batch: TaskBatch) -> dict[str, Tensor]:
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    return {n: p.grad.clone() for n, p in learner.model.named_parameters()}


# ---------------------------------------------------------------------- FOMAML
def test_fomaml_is_registered_first_order_maml() -> None:
    cls = ALGORITHMS.get("fomaml")
    assert issubclass(cls, MAML) and cls.registered_name == "fomaml" and MAML.registered_name == "maml"
    assert cls.Config().first_order is True and ALGORITHMS.get("maml").Config().first_order is False


def test_fomaml_meta_gradient_is_query_gradient_at_adapted_weights() -> None:
    batch = _classification_batch()
    learner = _learner("fomaml", {"inner_lr": 0.5, "inner_steps": 2})
    names = [n for n, _ in learner.model.named_parameters()]
    ref = _unrolled_grads(copy.deepcopy(learner.model), batch, names, 0.5, 2, first_order=True)
    second = _unrolled_grads(copy.deepcopy(learner.model), batch, names, 0.5, 2, first_order=False)
    ours = _meta_grads(learner, batch)
    _assert_close(ours, ref, tol=1e-10)
    assert any(_rel(ours[n], second[n]) > 1e-3 for n in names)  # the Hessian term was really dropped


# ---------------------------------------------------------------------- ANIL / BOIL
@pytest.mark.peer
@pytest.mark.parametrize("first_order", [False, True])
def test_anil_matches_learn2learn_maml_on_the_head(first_order: bool) -> None:
    l2l = require_peer("learn2learn")
    batch = _classification_batch()
    learner = _learner("anil", {"inner_lr": 0.5, "inner_steps": 2, "first_order": first_order})
    assert learner.inner_param_names() == ["head.weight", "head.bias"]
    ref_model = copy.deepcopy(learner.model)
    ours = _meta_grads(learner, batch)

    head = l2l.algorithms.MAML(ref_model.head, lr=0.5, first_order=first_order)
    total = 0.0
    for task in batch.tasks():
        clone = head.clone()
        support = ref_model.features(task.support_x)
        for _ in range(2):
            clone.adapt(F.cross_entropy(clone(support), task.support_y))
        total = total + F.cross_entropy(clone(ref_model.features(task.query_x)), task.query_y)
    (total / len(batch)).backward()
    _assert_close(ours, {n: p.grad for n, p in ref_model.named_parameters()})


def test_boil_adapts_the_body_only_and_matches_an_unroll() -> None:
    batch = _classification_batch()
    learner = _learner("boil", {"inner_lr": 0.3, "inner_steps": 2})
    body = [n for n, _ in learner.model.named_parameters() if not n.startswith("head.")]
    assert learner.inner_param_names() == body
    fast = learner.adapt(batch.task(0).support_x, batch.task(0).support_y, batch.spec)
    assert set(fast) == set(body)  # the head keeps its meta-learned value during adaptation
    ref = _unrolled_grads(copy.deepcopy(learner.model), batch, body, 0.3, 2, first_order=False)
    ours = _meta_grads(learner, batch)
    _assert_close(ours, ref, tol=1e-10)
    assert ours["head.weight"].abs().sum() > 0  # the outer loop still trains the head


class HeadlessConfig(PluginConfig):
    pass


class Headless(Backbone):
    """A backbone without a ``head`` attribute."""

    Config = HeadlessConfig

    def __init__(self, config: HeadlessConfig, in_shape: tuple[int, ...], out_features: int | None):
        super().__init__(config, in_shape, out_features)
        self.net = nn.Linear(math.prod(in_shape), out_features or 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@pytest.mark.parametrize("name", ["anil", "boil"])
def test_head_split_needs_a_head(name: str) -> None:
    register_model("test_zoo_headless")(Headless)
    try:
        with pytest.raises(ConfigError, match="no trainable `head`"):
            ALGORITHMS.get(name)({}, model={"name": "test_zoo_headless"}, task=CLS_TASK)
    finally:
        MODELS.unregister("test_zoo_headless")


# ---------------------------------------------------------------------- Meta-SGD
@pytest.mark.peer
@pytest.mark.parametrize("first_order", [False, True])
def test_metasgd_matches_learn2learn(first_order: bool) -> None:
    l2l = require_peer("learn2learn")
    batch = _classification_batch()
    learner = _learner("metasgd", {"inner_lr": 0.3, "inner_steps": 2, "first_order": first_order})
    ref_model = copy.deepcopy(learner.model)
    loss, _ = learner.meta_loss(batch)
    loss.backward()

    meta = l2l.algorithms.MetaSGD(ref_model, lr=0.3, first_order=first_order)
    total = 0.0
    for task in batch.tasks():
        clone = meta.clone()
        for _ in range(2):
            clone.adapt(F.cross_entropy(clone(task.support_x), task.support_y))
        total = total + F.cross_entropy(clone(task.query_x), task.query_y)
    (total / len(batch)).backward()

    names = [n for n, _ in ref_model.named_parameters()]
    _assert_close({n: p.grad for n, p in learner.model.named_parameters()},
                  {n: p.grad for n, p in ref_model.named_parameters()})
    _assert_close({n: learner.inner_lrs[param_key(n)].grad for n in names},
                  {n: lr.grad for n, lr in zip(names, meta.lrs)})


def test_metasgd_rates_are_per_element_and_trained_by_the_outer_optimizer() -> None:
    learner = _learner("metasgd", {"inner_lr": 0.25})
    for n, p in learner.model.named_parameters():
        rate = learner.inner_lrs[param_key(n)]
        assert rate.shape == p.shape and torch.all(rate == 0.25)
    opt = learner.configure_optimizers()
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert all(id(r) in in_opt for r in learner.inner_lrs.values())


# ---------------------------------------------------------------------- every algorithm
@pytest.mark.parametrize("name", ZOO)
def test_conv_batchnorm_meta_gradient_reaches_every_trainable_parameter(name: str) -> None:
    """Defaults on a BatchNorm conv net: finite loss, finite gradient on every trainable
    parameter (per-step/learned extras included), finite evaluation with an adaptation curve."""
    task = {"problem": "classification", "in_shape": [1, 8, 8], "train_ways": 3, "eval_ways": 3}
    learner = _learner(name, {"eval_inner_steps": 2}, model={"name": "test_zoo_tiny_conv_bn"}, task=task)
    batch = _classification_batch(shape=(1, 8, 8))
    loss, logs = learner.meta_loss(batch)
    assert torch.isfinite(loss) and {"loss", "acc"} <= logs.keys()
    loss.backward()
    for n, p in learner.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: no meta-gradient reaches {n}"
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite meta-gradient on {n}"
    learner.eval()
    out = learner.evaluate_task(batch.task(0))
    assert {"acc_step0", "acc_step2", "acc", "loss"} <= out.keys()
    assert all(torch.isfinite(v) for v in out.values())


# ---------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", ZOO)
def test_short_sinusoid_fit_and_checkpoint_round_trip(name: str, tmp_path: Path) -> None:
    cfg = load_config(None, [f"algorithm={name}", "trainer.max_steps=5", "data.val_tasks=4", "data.test_tasks=4",
                             "data.train_batches_per_epoch=5", "data.meta_batch_size=4",
                             "trainer.enable_progress_bar=false", "logger=none", f"output_dir={tmp_path}"])
    run, results = fit(cfg)
    assert results is not None and results.algorithm == name and results.n_tasks == 4
    assert all(math.isfinite(row.mean) and row.n == 4 for row in results.rows)
    assert run.trainer.global_step == 5

    best = run.trainer.checkpoint_callback.best_model_path
    reloaded = load_learner(best)
    assert type(reloaded) is type(run.learner) and reloaded.config == run.learner.config
    ours, theirs = run.learner.state_dict(), reloaded.state_dict()
    assert ours.keys() == theirs.keys()
    trained = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(theirs[k], trained[k]) for k in trained)

"""``task_backward``: each task's meta-loss term back-propagated as soon as it is computed gives the
plain path's loss value and meta-gradient for every registered gradient-based algorithm, keeps
autograd memory independent of the meta-batch size, and trains to the plain run's weights
through Lightning, where the non-finite-loss check still works."""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Iterator

import lightning as L
import pytest
import torch

from helpers import TinyConvBN, assert_same_meta_gradient, graph_bytes
from lightmeta import ALGORITHMS, EpisodeSpec, GradientMetaLearner, TaskBatch, register_model, runner
from lightmeta.cli import cmd_list
from lightmeta.config import load_config
from lightmeta.errors import ConfigError
from lightmeta.faults import NonFiniteLossError
from lightmeta.registry import MODELS
from lightmeta.runner import build_datamodule, build_learner, fit
from lightmeta.task_backward import surrogate_from_gradients

GRADIENT = [n for n in ALGORITHMS.names() if issubclass(ALGORITHMS.get(n), GradientMetaLearner)]
TASK = {"problem": "classification", "in_shape": [1, 8, 8], "train_ways": 3, "eval_ways": 3}
BN_MODEL = "test_task_backward_tiny_conv_bn"


@pytest.fixture(scope="module", autouse=True)
def bn_model() -> Iterator[None]:
    register_model(BN_MODEL)(TinyConvBN)
    yield
    MODELS.unregister(BN_MODEL)


def _batch(tasks: int, dtype: torch.dtype = torch.float64, size: int = 8) -> TaskBatch:
    g = torch.Generator().manual_seed(tasks)
    return TaskBatch(torch.randn(tasks, 6, 1, size, size, generator=g, dtype=dtype), torch.arange(3).repeat(2).expand(tasks, -1),
                     torch.randn(tasks, 9, 1, size, size, generator=g, dtype=dtype), torch.arange(3).repeat(3).expand(tasks, -1),
                     EpisodeSpec(3, 2, 3), torch.arange(tasks))


def _pair(name: str, model: dict, **params: object) -> tuple[GradientMetaLearner, GradientMetaLearner]:
    """The plain learner and a copy with ``task_backward`` (same weights), float64, training mode."""
    torch.manual_seed(0)
    plain = ALGORITHMS.get(name)({"inner_lr": 0.3, **params}, model=model, task=TASK).double().train()
    per_task = copy.deepcopy(plain)
    per_task.config.task_backward = True
    return plain, per_task


def _grads(learner: GradientMetaLearner) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in learner.parameters() if p.requires_grad]


@pytest.mark.parametrize("name", GRADIENT)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("model", ["mlp", "bn", "bn-inductive"])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_same_loss_and_meta_gradient_as_the_plain_path(name: str, first_order: bool, model: str, checkpoint: bool) -> None:
    cls = ALGORITHMS.get(name)
    if checkpoint and not cls.differentiates_inner_loop:
        pytest.skip(f"{name} keeps no graph through its inner loop and refuses checkpoint_inner_steps")
    if first_order is False and "first_order" in cls.Config.model_fields \
            and cls.Config.model_fields["first_order"].annotation is not bool:
        pytest.skip(f"{name} is first order by construction")
    params = {"first_order": first_order, "inner_steps": 3 if model == "mlp" else 2, "batched_tasks": "off",
              "checkpoint_inner_steps": checkpoint, "batch_norm": "inductive" if model == "bn-inductive" else "transductive"}
    arch = {"name": "mlp", "hidden": [8, 8]} if model == "mlp" else {"name": BN_MODEL, "channels": 3}
    plain, per_task = _pair(name, arch, **params)
    batch = _batch(3)
    loss_p, logs_p = plain.meta_loss(batch)
    loss_t, logs_t = per_task.meta_loss(batch)
    assert torch.equal(loss_t.detach(), loss_p.detach())  # logged, checked for non-finite values: unchanged
    assert logs_t.keys() == logs_p.keys() and all(torch.equal(logs_t[k], logs_p[k]) for k in logs_p)
    assert all(not v.requires_grad for v in logs_t.values())
    loss_p.backward()
    loss_t.backward()
    assert_same_meta_gradient(_grads(per_task), _grads(plain))
    for (k, a), (_, b) in zip(plain.named_buffers(), per_task.named_buffers()):  # running statistics, if any
        assert torch.equal(a, b), f"buffer {k} differs"


@pytest.mark.parametrize("cast_cache", [True, False])
def test_bf16_autocast_gives_the_plain_bf16_meta_gradient(cast_cache: bool) -> None:
    """Under bf16 autocast (trainer.precision=bf16-mixed) the per-task backward, taken with
    autocast off as Lightning's backward is, gives the plain bf16 loss and meta-gradient. With
    autocast's weight-cast cache (the default) the plain path sums the tasks' gradients in bf16
    at the shared cast of each weight and the per-task path in float32: a difference of bf16
    rounding (1e-2 bound, 1e-3 measured); without the cache the two agree to float32 rounding."""
    torch.manual_seed(0)
    plain = ALGORITHMS.get("maml")({"inner_lr": 0.3, "inner_steps": 2, "batched_tasks": "off"},
                                   model={"name": BN_MODEL, "channels": 3}, task=TASK).train()
    per_task = copy.deepcopy(plain)
    per_task.config.task_backward = True
    batch = _batch(3, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cast_cache):
        loss_p, loss_t = plain.meta_loss(batch)[0], per_task.meta_loss(batch)[0]
    assert torch.equal(loss_t.detach(), loss_p.detach())
    loss_p.backward()
    loss_t.backward()
    gp, gt = (torch.cat([g.flatten() for g in _grads(m)]) for m in (plain, per_task))
    bound = 1e-2 if cast_cache else 1e-6
    assert (gt - gp).norm() <= bound * gp.norm(), f"relative difference {(gt - gp).norm() / gp.norm():.2e}"


def test_surrogate_value_and_gradient() -> None:
    """The surrogate's value is the given value and its gradient the given one; a non-finite
    gradient makes the value non-finite (so the non-finite-loss check sees it)."""
    p, q = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    g = torch.randn(3)
    value = torch.tensor(1.2345)
    loss = surrogate_from_gradients(value, [(p, g), (q, None)])
    assert torch.equal(loss.detach(), value)
    loss.backward()
    assert torch.equal(p.grad, g) and q.grad is None
    broken = surrogate_from_gradients(value, [(p, torch.tensor([1.0, float("nan"), 0.0]))])
    assert not torch.isfinite(broken)


def test_graph_memory_does_not_grow_with_the_meta_batch() -> None:
    """Second-order MAML, 1 vs 8 tasks: what the graph keeps after meta_loss returns grows with
    the meta-batch on the plain path, and by less than 10% of that with task_backward (also
    together with checkpoint_inner_steps)."""
    def growth(**params: object) -> int:
        sizes = []
        for tasks in (1, 8):
            torch.manual_seed(0)
            learner = ALGORITHMS.get("maml")({"inner_steps": 2, "batched_tasks": "off", **params},
                                             model={"name": "conv4", "filters": 8}, task={**TASK, "in_shape": [1, 16, 16]})
            sizes.append(graph_bytes(learner.train(), _batch(tasks, torch.float32, 16)))
        return sizes[1] - sizes[0]

    plain = growth()
    assert plain > 0
    for extra in ({}, {"checkpoint_inner_steps": True}):
        per_task = growth(task_backward=True, **extra)
        assert per_task <= 0.1 * plain, f"task_backward {extra}: growth {per_task} vs plain {plain} bytes"


def test_batched_tasks_fall_back_to_the_loop_and_say_so_once(caplog: pytest.LogCaptureFixture) -> None:
    """With task_backward, batched_tasks=on runs the per-task loop (one log line) and the result
    is the plain batched path's."""
    torch.manual_seed(0)
    batched = ALGORITHMS.get("maml")({"inner_lr": 0.3, "inner_steps": 2, "batched_tasks": "on"},
                                     model={"name": "mlp", "hidden": [8]}, task=TASK).double().train()
    per_task = copy.deepcopy(batched)
    per_task.config.task_backward = True
    batch = _batch(2)
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            loss, _ = per_task.meta_loss(batch)
    said = [r.getMessage() for r in caplog.records if "adapting tasks one by one" in r.getMessage()]
    assert len(said) == 1 and "task_backward" in said[0]
    reference, _ = batched.meta_loss(batch)
    assert torch.allclose(loss, reference, rtol=1e-12, atol=0)


def test_metric_learners_refuse_the_field() -> None:
    """task_backward belongs to the gradient learners' config; a metric learner rejects it by name."""
    with pytest.raises(ConfigError, match="algorithm.task_backward"):
        load_config(None, ["algorithm=protonet", "data=synthetic", "algorithm.task_backward=true"])


class _PoisonTask(L.Callback):
    """A NaN support target in task #1 of the third training meta-batch."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: TaskBatch, batch_idx: int) -> None:
        if trainer.global_step == 2:
            batch.support_y[1, 0] = float("nan")


def test_nonfinite_loss_is_still_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MetaLearner.training_step's non-finite check sees the surrogate's value: the run stops at
    the poisoned meta-step with the usual diagnosis."""
    build = runner.build_trainer

    def with_poison(*args: object) -> L.Trainer:
        trainer = build(*args)
        trainer.callbacks.append(_PoisonTask())
        return trainer

    monkeypatch.setattr(runner, "build_trainer", with_poison)
    cfg = load_config(None, ["trainer.max_steps=4", "data.train_batches_per_epoch=4", "data.val_tasks=4",
                             "data.test_tasks=4", "data.meta_batch_size=4", "trainer.enable_progress_bar=false",
                             "logger=none", "trainer.num_sanity_val_steps=0", "algorithm.task_backward=true",
                             f"output_dir={tmp_path}"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite meta-loss \(nan\) at meta-step 2: .*#1 of the meta-batch"):
        fit(cfg, test=False)


def test_list_shows_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    cmd_list("algorithms")
    out = capsys.readouterr().out
    assert "task_backward: bool" in out and "only one task's graph is alive at a time" in out


def test_fit_with_task_backward_matches_plain_training(tmp_path: Path) -> None:
    """Through Lightning (automatic optimization: its backward, gradient clipping, Adam steps) on
    the default sinusoid run in float64 (dashboard off: its fit gallery does not run in float64):
    the trained weights equal the plain run's (the vmapped path of batched_tasks=auto) to 1e-12
    relative (2e-17 measured). Not held to bit-identity: the per-task gradients are summed in
    another order than one backward through the vmapped meta-batch sums them, a rounding-level
    difference that the following steps carry forward."""
    weights = []
    for flag in ("false", "true"):
        cfg = load_config(None, ["trainer.max_steps=6", "data.train_batches_per_epoch=3", "data.val_tasks=4",
                                 "data.test_tasks=4", "data.meta_batch_size=4", "trainer.enable_progress_bar=false",
                                 "logger=none", "trainer.num_sanity_val_steps=0", "trainer.precision=64-true",
                                 "trainer.gradient_clip_val=0.5", "algorithm.inner_steps=2",
                                 f"algorithm.task_backward={flag}", f"output_dir={tmp_path / flag}"])
        run, _ = fit(cfg, test=False)
        assert run.trainer.global_step == 6
        weights.append(run.learner.state_dict())
    L.seed_everything(cfg.seed, verbose=False)  # the initial weights, built as the runner builds them
    initial = build_learner(cfg, build_datamodule(cfg)).double().state_dict()
    plain, per_task = weights
    assert plain.keys() == per_task.keys()
    for k, v in plain.items():
        assert (per_task[k] - v).norm() <= 1e-12 * v.norm(), k
    assert all((v - initial[k]).norm() > 1e-3 * v.norm() for k, v in plain.items()), "training did not move the weights"

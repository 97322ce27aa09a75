"""Speed flags give the plain path's results: ``compile``, ``channels_last`` and bf16 autocast
(``trainer.precision=bf16-mixed``), over every registered algorithm."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_same_meta_gradient, meta_gradients
from torch import Tensor
from torch._dynamo.utils import counters

from lightmeta import ALGORITHMS, GradientMetaLearner, MetaLearner
from lightmeta.cli import cmd_list
from lightmeta.config import validate_config
from lightmeta.datamodule import FlatBatch
from lightmeta.episodes import TaskBatch
from lightmeta.errors import ConfigError
from lightmeta.runner import build_datamodule, build_learner, fit
from lightmeta.testing import _first_batch, _first_flat_batch, example_config

NAMES = ALGORITHMS.names()
IMAGE_NAMES = [n for n in NAMES if "classification" in ALGORITHMS.get(n).problems]
CONV = {"name": "conv4", "filters": 4}


def _setup(name: str, tmp_path: Path, model: dict[str, Any] | None = None, **algorithm: Any,
           ) -> tuple[MetaLearner, TaskBatch | FlatBatch]:
    """A learner of ``name`` on its harness data (classification where it can), and a training batch."""
    cfg = example_config(name, tmp_path, "classification" if name in IMAGE_NAMES else None)
    raw = cfg.to_dict()
    raw["algorithm"].update(algorithm)
    if model is not None:
        raw["model"] = model
    cfg = validate_config(raw)
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    learner = build_learner(cfg, dm)
    learner.train()
    batch = _first_flat_batch(dm, learner) if learner.training_data == "flat" else _first_batch(dm)
    return learner, batch


def _twin(learner: MetaLearner, **algorithm: Any) -> MetaLearner:
    """The same learner (same weights) built again with other algorithm settings."""
    cls = type(learner)
    params = {**learner.config.model_dump(), **algorithm}
    twin = cls(params, model=dict(learner.hparams["model"]), task=learner.task_info)
    twin.load_state_dict(learner.state_dict())
    twin.train()
    return twin


def _double(batch: TaskBatch | FlatBatch) -> TaskBatch | FlatBatch:
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).double() for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), Tensor)
                                         and getattr(batch, f.name).is_floating_point()})


def _loss_and_grads(learner: MetaLearner, batch: TaskBatch | FlatBatch) -> tuple[Tensor, list[Tensor]]:
    torch.manual_seed(0)
    loss, _ = learner.meta_loss(batch)
    return loss.detach(), meta_gradients(learner, loss)


def _assert_close(a: tuple[Tensor, list[Tensor]], b: tuple[Tensor, list[Tensor]], rtol: float) -> None:
    """Same loss and meta-gradient to ``rtol``, relative per tensor (near-zero tensors: to the whole)."""
    (loss_a, ga), (loss_b, gb) = a, b
    assert torch.allclose(loss_a, loss_b, rtol=rtol, atol=0), f"loss {loss_a.item()} vs {loss_b.item()}"
    assert_same_meta_gradient(ga, gb, rtol=rtol, floor=1e-3)


# ---------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("name", NAMES)
def test_compiled_step_gives_the_plain_meta_gradient(name: str, tmp_path: Path) -> None:
    """``compile: true`` on the debugging backend ``eager`` (dynamo traces the hot path, no code
    generation): the same meta-loss and meta-gradient as without, in float32."""
    plain, batch = _setup(name, tmp_path)
    compiled = _twin(plain, compile=True, compile_backend="eager")
    torch._dynamo.reset()  # forget code compiled by earlier tests, so that this one must trace
    counters.clear()
    _assert_close(_loss_and_grads(compiled, batch), _loss_and_grads(plain, batch), rtol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"


@pytest.mark.parametrize("batched", ["off", "on"])
def test_compiled_second_order_maml_through_aot_autograd(batched: str, tmp_path: Path) -> None:
    """``aot_eager`` goes through AOTAutograd as ``inductor`` does, which has no double backward:
    the compiled inner step (torch.func.grad inside the traced graph) still gives the plain
    second-order meta-gradient, per task and vmapped; evaluation curves agree too."""
    plain, batch = _setup("maml", tmp_path, first_order=False, batched_tasks=batched, inner_steps=2)
    compiled = _twin(plain, compile=True, compile_backend="aot_eager")
    _assert_close(_loss_and_grads(compiled, batch), _loss_and_grads(plain, batch), rtol=1e-5)
    _assert_close(_loss_and_grads(compiled, batch), _loss_and_grads(plain, batch), rtol=1e-5)  # cached code
    plain.eval(), compiled.eval()
    ours, ref = compiled.evaluate_batch(batch), plain.evaluate_batch(batch)
    for k in ref:
        assert torch.allclose(ours[k], ref[k], rtol=1e-5, atol=1e-6), k


def test_compiled_fit_runs_through_the_runner(tmp_path: Path) -> None:
    raw = example_config("maml", tmp_path).to_dict()
    raw["algorithm"].update(compile=True, compile_backend="eager")
    run, results = fit(validate_config(raw))
    assert results is not None and run.learner.config.compile


def test_compile_refusals() -> None:
    task = {"problem": "classification", "in_shape": [1, 16, 16], "train_ways": 3, "eval_ways": 3}
    with pytest.raises(ConfigError, match="algorithm.compile_backend='nope' is not a torch.compile backend"):
        ALGORITHMS.get("protonet")({"compile": True, "compile_backend": "nope"}, model=CONV, task=task)
    with pytest.raises(ConfigError, match="algorithm.compile with batch_norm=inductive is not supported by 'mamlpp'"):
        ALGORITHMS.get("mamlpp")({"compile": True}, model=CONV, task=task)


# ---------------------------------------------------------------------- channels_last
@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_channels_last_gives_the_plain_meta_gradient(name: str, tmp_path: Path) -> None:
    """Backbone and image inputs in channels-last memory format: the same meta-loss and gradient
    (float64), and the conv weights really are channels-last."""
    cls = ALGORITHMS.get(name)
    model = cls.example_model if cls.example_model["name"] != "mlp" else CONV
    plain, batch = _setup(name, tmp_path, model=dict(model))
    plain = plain.double()
    fast = _twin(plain, channels_last=True).double()
    convs = [p for n, p in fast.model.named_parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(not p.is_contiguous() for p in convs)  # (one input channel: both formats coincide)
    batch = _double(batch)
    _assert_close(_loss_and_grads(fast, batch), _loss_and_grads(plain, batch), rtol=1e-9)


def test_channels_last_needs_images() -> None:
    task = {"problem": "regression", "in_shape": [1], "train_ways": 1, "eval_ways": 1}
    with pytest.raises(ConfigError, match=r"algorithm.channels_last needs image inputs \(C, H, W\), but the data's inputs are \(1,\)"):
        ALGORITHMS.get("maml")({"channels_last": True}, model={"name": "mlp"}, task=task)


# ---------------------------------------------------------------------- bf16 autocast
#: bf16 keeps 8 significand bits (relative rounding 2**-9); through a few layers and inner steps the
#: meta-loss stays within this relative tolerance of float32 (README "Running at scale").
BF16_LOSS_RTOL = 0.02


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_meta_loss_is_close_to_float32(name: str, tmp_path: Path) -> None:
    """What ``trainer.precision=bf16-mixed`` runs (autocast to bfloat16 around the step): the
    meta-loss within ``BF16_LOSS_RTOL`` of float32, the meta-gradient pointing the same way, and
    the inner loop's fast weights and gradients kept in float32."""
    learner, batch = _setup(name, tmp_path)
    _, ref_grads = _loss_and_grads(learner, batch)
    ref_loss = learner.meta_loss(batch)[1]["loss"]  # the logged query loss: Reptile's and iMAML's
    with torch.autocast("cpu", dtype=torch.bfloat16):  # meta-losses are surrogates for their gradient
        _, grads = _loss_and_grads(learner, batch)
        loss = learner.meta_loss(batch)[1]["loss"]
        if isinstance(learner, GradientMetaLearner):
            task = batch.task(0)
            fast = learner.adapt(task.support_x, task.support_y, task.spec)
            assert all(v.dtype == torch.float32 for v in fast.values()), "fast weights left float32"
    assert abs(loss.float() - ref_loss) <= BF16_LOSS_RTOL * ref_loss, f"bf16 {loss.item()} vs fp32 {ref_loss.item()}"
    assert all(g.dtype == torch.float32 for g in grads)
    flat, ref = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads])
    assert torch.nn.functional.cosine_similarity(flat, ref, dim=0) > 0.9


# ---------------------------------------------------------------------- documentation
def test_list_shows_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    cmd_list("algorithms")
    out = capsys.readouterr().out
    for flag in ("compile: bool", "compile_backend: str", "channels_last: bool", "checkpoint_inner_steps: bool"):
        assert flag in out, flag

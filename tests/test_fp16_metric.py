"""``trainer.precision=16-mixed`` for the metric learners: fp16 backbone, fp32 heads, scaled loss.

Lightning 2.6 replaces ``16-mixed`` by ``bf16-mixed`` when the accelerator is the CPU, so the
training test hands the trainer Lightning's own ``MixedPrecision("16-mixed", "cpu")`` plugin
(float16 autocast plus a GradScaler, as on a GPU) after the runner built it.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.amp import GradScaler

from lightmeta import ALGORITHMS
from lightmeta.datamodule import TrainEpisodes
from lightmeta.metric import MetricMetaLearner
from lightmeta.runner import build_datamodule, build_learner, build_run
from lightmeta.testing import example_config

METRIC = [n for n in ALGORITHMS.names() if issubclass(ALGORITHMS.get(n), MetricMetaLearner)]
FP32_HEADS = [n for n in METRIC if ALGORITHMS.get(n).fp32_head]


def _record(calls: list[tuple[str, Any, bool, Any]], label: str, fn: Callable[..., Any],
            arg: int) -> Callable[..., Any]:
    """``fn`` that records (label, dtype of argument ``arg``, autocast on?, output dtype)."""
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        dtype = out.dtype if isinstance(out, torch.Tensor) else None
        calls.append((label, args[arg].dtype, torch.is_autocast_enabled("cpu"), dtype))
        return out
    return wrapped


@pytest.mark.filterwarnings("ignore:.*AMP with fp16 is not supported on CPU")
@pytest.mark.parametrize("name", METRIC)
def test_fp16_mixed_trains_every_metric_learner(name: str, tmp_path: Path) -> None:
    # no dashboard: its figures call the learner outside the training and evaluation steps
    cfg = example_config(name, tmp_path, trainer={"precision": "16-mixed", "max_steps": 3}, dashboard={"enabled": False})
    run = build_run(cfg)  # accepted: metric learners have no inner-loop gradient to scale
    # a small initial loss scale: the default 2**16 skips the first steps while it backs off
    run.trainer.strategy.precision_plugin = MixedPrecision("16-mixed", "cpu", GradScaler("cpu", init_scale=16.0))
    learner = run.learner
    initial = {k: v.detach().clone() for k, v in learner.named_parameters()}
    calls: list[tuple[str, Any, bool, Any]] = []
    learner.model.register_forward_hook(lambda m, i, out: calls.append(("backbone", i[0].dtype, True, out.dtype)))
    learner.fit_head = _record(calls, "fit_head", learner.fit_head, 0)
    learner.head_logits = _record(calls, "head_logits", learner.head_logits, 1)
    learner.batch_metrics = _record(calls, "metrics", learner.batch_metrics, 0)

    run.trainer.fit(learner, datamodule=run.datamodule)
    run.trainer.test(learner, datamodule=run.datamodule, verbose=False)

    assert run.trainer.precision == "16-mixed"
    assert {c[3] for c in calls if c[0] == "backbone"} == {torch.float16}, "the backbone did not run in fp16"
    head = [c for c in calls if c[0] in ("fit_head", "head_logits")]
    assert head, f"{name}: the head never ran"
    if learner.fp32_head:  # ridge/SVM solves, distances and cosines in fp32 with autocast off
        assert all(c[1] == torch.float32 and not c[2] for c in head), f"{name}: head calls {head}"
        assert {c[3] for c in head if c[0] == "head_logits"} == {torch.float32}
    else:  # a learned head keeps mixed precision's speed
        assert all(c[2] for c in head), f"{name}: head calls {head}"
    assert all(c[1] == torch.float32 for c in calls if c[0] == "metrics"), "loss and metrics must be fp32"
    # the GradScaler scaled the loss and unscaled the gradients: it counts steps taken without
    # overflow (its update() refuses to run if the loss was never scaled)
    assert run.trainer.precision_plugin.scaler.state_dict()["_growth_tracker"] > 0
    # fp32 master weights, finite, and trained
    params = dict(learner.named_parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params.values())
    assert any(not torch.equal(initial[k], p) for k, p in params.items()), f"{name}: no step was taken"
    results = learner.last_results["test"]
    assert results and all(math.isfinite(v["mean"]) and v["n"] == cfg.data.test_tasks for v in results.values())


def _embeddings(learner: MetricMetaLearner, cfg: Any, magnitude: float) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """A training batch and fp16 support/query embeddings of the backbone's feature shape, with
    entries up to ``magnitude`` (squared norms far beyond float16's 65504)."""
    dm = build_datamodule(cfg)
    dm.setup("fit")
    batch = TrainEpisodes(dm.sampler, cfg.seed, 2, 0, 1)[0]
    with torch.no_grad():
        shape = learner.embed(batch.support_x[:, :1]).shape[2:]
    gen = torch.Generator().manual_seed(0)
    support = torch.rand(*batch.support_x.shape[:2], *shape, generator=gen) * magnitude
    query = torch.rand(*batch.query_x.shape[:2], *shape, generator=gen) * magnitude
    return batch, support.half(), query.half()


@pytest.mark.parametrize("name", FP32_HEADS)
def test_fp32_heads_under_fp16_autocast_match_float64(name: str, tmp_path: Path) -> None:
    """The head on fp16 embeddings under fp16 autocast equals the same head in float64."""
    cfg = example_config(name, tmp_path)
    learner = build_learner(cfg, build_datamodule(cfg)).eval()
    batch, support, query = _embeddings(learner, cfg, magnitude=200.0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        logits = learner.run_head(support, batch.support_y, query, batch.spec)
    reference = copy.deepcopy(learner).double()
    with torch.no_grad():
        expected = reference.run_head(support.double(), batch.support_y, query.double(), batch.spec)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all(), f"{name}: {logits.dtype}"
    # (Baseline fine-tunes its head in float32 even here, so its reference is float32)
    expected = expected.double()
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_without_the_fp32_island_fp16_distances_overflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embeddings above are a real hazard: ProtoNet's squared distances overflow in fp16."""
    cfg = example_config("protonet", tmp_path)
    learner = build_learner(cfg, build_datamodule(cfg)).eval()
    batch, support, query = _embeddings(learner, cfg, magnitude=200.0)
    monkeypatch.setattr(type(learner), "fp32_head", False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        logits = learner.run_head(support, batch.support_y, query, batch.spec)
    assert logits.dtype == torch.float16 and not torch.isfinite(logits).all()

"""Property test: any episode spec or hyperparameter either runs or fails validation cleanly.

"Cleanly" means a ConfigError/DataError (one line naming the field) raised before training,
never an exception from deep inside a meta-step.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightmeta.config import validate_config
from lightmeta.datamodule import TrainEpisodes
from lightmeta.errors import LightmetaError
from lightmeta.runner import build_datamodule, build_learner

small = st.integers(min_value=-2, max_value=9)
rates = st.one_of(st.floats(min_value=-1.0, max_value=2.0, allow_nan=False), st.just(0.0), st.just(float("nan")))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ways=small, shots=small, queries=small, train_classes=small, meta_batch=small, lr=rates, inner_lr=rates,
       steps=small, algorithm=st.sampled_from(["maml", "protonet", "anil", "metasgd"]))
def test_episode_specs_and_rates_run_or_fail_cleanly(ways: int, shots: int, queries: int, train_classes: int,
                                                      meta_batch: int, lr: float, inner_lr: float, steps: int,
                                                      algorithm: str) -> None:
    algo: dict = {"name": algorithm, "lr": lr}
    if algorithm != "protonet":
        algo |= {"inner_lr": inner_lr, "inner_steps": steps}
    raw = {
        "algorithm": algo,
        "model": {"name": "mlp", "hidden": [8]},
        "data": {"name": "synthetic", "ways": ways, "shots": shots, "queries": queries, "meta_batch_size": meta_batch,
                 "classes": {"train": train_classes, "val": 9, "test": 9}, "image_shape": [1, 4, 4]},
        "trainer": {"accelerator": "cpu"},
    }
    try:
        cfg = validate_config(raw)
        dm = build_datamodule(cfg)
        learner = build_learner(cfg, dm)
        dm.setup("fit")
        batch = TrainEpisodes(dm.sampler, 0, cfg.data.meta_batch_size, 0, 1)[0]
    except LightmetaError as exc:
        message = str(exc)
        assert "\n" not in message and message, "validation errors are one non-empty line"
        return
    # everything accepted must be sound and run a meta-step
    assert ways >= 2 and shots >= 1 and queries >= 1 and meta_batch >= 1 and train_classes >= ways
    assert lr > 0 and not math.isnan(lr)
    learner.train()
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)

"""Numerical faults: a non-finite loss stops the run with a diagnosis, or its meta-batch is skipped."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lightmeta import runner
from lightmeta.config import load_config
from lightmeta.faults import NonFiniteLossError
from lightmeta.runner import fit

SHORT = ["trainer.max_steps=6", "data.train_batches_per_epoch=2", "data.val_tasks=4", "data.test_tasks=4",
         "data.meta_batch_size=4", "trainer.enable_progress_bar=false", "logger=none", "trainer.num_sanity_val_steps=0"]


class _PoisonBatch(L.Callback):
    """Puts a NaN into one support target of task #1 at training batch ``index``."""

    def __init__(self, index: int) -> None:
        self.index, self.seen = index, 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.seen == self.index:
            batch.support_y[1, 0] = float("nan")
        self.seen += 1


def _poisoned(monkeypatch: pytest.MonkeyPatch, index: int) -> None:
    build = runner.build_trainer

    def with_poison(*args):
        trainer = build(*args)
        trainer.callbacks.append(_PoisonBatch(index))
        return trainer

    monkeypatch.setattr(runner, "build_trainer", with_poison)


def test_nonfinite_loss_stops_naming_step_task_and_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _poisoned(monkeypatch, 3)
    cfg = load_config(None, [*SHORT, f"output_dir={tmp_path}"])
    with pytest.raises(NonFiniteLossError) as info:
        fit(cfg)
    msg = str(info.value)
    assert "non-finite meta-loss (nan) at meta-step 3" in msg
    assert "task 13 (#1 of the meta-batch): inner-loop support loss at inner step 0 = nan" in msg
    assert "\n" not in msg
    # the checkpoint written before the fault (validation after step 2) is intact and finite
    best = next(tmp_path.glob("*/version_0/checkpoints/best-*.ckpt"))
    state = torch.load(best, weights_only=True)
    assert state["global_step"] == 2 and all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_skip_drops_the_meta_batch_and_counts_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _poisoned(monkeypatch, 3)
    cfg = load_config(None, [*SHORT, "trainer.on_nonfinite=skip", "trainer.log_every_n_steps=1", f"output_dir={tmp_path}"])
    run, results = fit(cfg)
    assert run.learner.skipped_nonfinite == 1
    assert all(torch.isfinite(p).all() for p in run.learner.parameters())
    assert results is not None and all(math.isfinite(r.mean) for r in results.rows)

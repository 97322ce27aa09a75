"""One rank of the registry-wide DDP smoke run (started by ``tests/test_ddp_registry.py``).

Launched twice by ``torchrun --standalone --nproc-per-node=2`` (the documented multi-node
recipe), so the gloo process group is set up once and every named algorithm trains inside
the same two processes: Lightning's DDP strategy finds the torchrun environment and creates
no processes of its own. Each algorithm runs the conformance harness's example config (its
example backbone and datamodule) with ``trainer.strategy=ddp, devices=2``: a short fit, then
the meta-test of its best checkpoint (``lightmeta.runner.evaluate``, so the checkpoint is
loaded on both ranks). The rank writes ``OUT/rank<r>.pt`` with, per algorithm, the parameters
before and after training and the meta-test rows, for the test to compare across ranks.

Usage: ``torchrun --standalone --nproc-per-node=2 tests/ddp_registry_worker.py OUT NAME...``
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightmeta.runner import RUN_DIR_ENV, build_datamodule, build_learner, evaluate, fit
from lightmeta.testing import example_config

#: Two meta-steps (one epoch), one validation, and a meta-test whose 5 tasks split 3/2 across ranks.
TRAINER = {"strategy": "ddp", "devices": 2, "accelerator": "cpu", "max_steps": 2}
DATA = {"meta_batch_size": 2, "train_batches_per_epoch": 2, "val_tasks": 4, "test_tasks": 5, "eval_batch_size": 2}


def _parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters only: BatchNorm running statistics are per-rank buffers, not all-reduced."""
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def train(name: str, out: Path) -> dict[str, Any]:
    """Fit, then meta-test, ``name`` under DDP; its parameters before/after training and test rows."""
    cfg = example_config(name, out / name, trainer=TRAINER, data=DATA)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # as build_run does before building the learner
    initial = _parameters(build_learner(cfg, build_datamodule(cfg)))
    run, _ = fit(cfg, test=False)
    trained = _parameters(run.learner)  # this rank's weights after the last optimizer step
    _, results = evaluate(cfg, "test", run.trainer.checkpoint_callback.best_model_path)
    # build_run exports the run directory for processes Lightning would launch; under torchrun
    # every process derives it itself, and the next algorithm needs its own
    os.environ.pop(RUN_DIR_ENV, None)
    return {
        "world_size": run.trainer.world_size,
        "global_step": run.trainer.global_step,
        "run_dir": str(run.run_dir),
        "initial": initial,
        "trained": trained,
        "rows": [(r.metric, r.mean, r.ci95, r.n) for r in results.rows],
        "test_tasks": cfg.data.test_tasks,
    }


def main(out: Path, names: list[str]) -> None:
    rank = int(os.environ["RANK"])
    report = {}
    for name in names:
        print(f"rank {rank}: training {name}", flush=True)
        report[name] = train(name, out)
    torch.save(report, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])

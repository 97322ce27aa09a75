"""Every registered algorithm trains under DDP (``strategy=ddp, devices=2``, CPU, gloo).

One ``torchrun --standalone --nproc-per-node=2`` launch (the documented multi-node recipe)
trains the whole registry inside the same two processes (``tests/ddp_registry_worker.py``), so
a new plug-in is covered the moment it is registered, at the cost of one process-group set-up.
Each algorithm's ranks adapt disjoint halves of every meta-batch; if the outer gradients were
not all-reduced, the ranks' weights would drift apart after the first step.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightmeta import ALGORITHMS

WORKER = Path(__file__).with_name("ddp_registry_worker.py")
NAMES = ALGORITHMS.names()


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Both ranks' reports (``rank0.pt``, ``rank1.pt``) of one torchrun launch over the registry."""
    out = tmp_path_factory.mktemp("ddp_registry")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun would set it (with a warning) anyway
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(WORKER), str(out), *NAMES], capture_output=True, text=True, timeout=600, cwd=out, env=env)
    log = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "sync_dist=True" not in line)
    assert proc.returncode == 0, log[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_algorithm_trains_under_two_process_ddp(name: str, reports: list[dict[str, Any]]) -> None:
    rank0, rank1 = (report[name] for report in reports)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["global_step"] == rank1["global_step"] == 2
    # one run directory per torchrun job, shared by both ranks
    assert rank0["run_dir"] == rank1["run_dir"] and Path(rank0["run_dir"]).name.startswith("job_")
    initial, trained = rank0["initial"], rank0["trained"]
    assert initial.keys() == trained.keys() == rank1["initial"].keys() == rank1["trained"].keys()
    for k in initial:
        assert torch.equal(initial[k], rank1["initial"][k]), f"{name}: ranks start from different '{k}'"
        # the ranks saw different tasks; only all-reduced outer gradients keep them in step
        assert torch.equal(trained[k], rank1["trained"][k]), f"{name}: '{k}' differs across ranks after training"
        assert torch.isfinite(trained[k]).all(), f"{name}: non-finite '{k}'"
    changed = [k for k in initial if not torch.equal(initial[k], trained[k])]
    assert changed, f"{name}: no parameter changed in two meta-steps"
    # the meta-test tasks (5: split 3/2) are counted once each, and both ranks report the same figures
    assert rank0["rows"] == rank1["rows"] and rank0["rows"]
    for metric, mean, ci95, n in rank0["rows"]:
        assert n == rank0["test_tasks"], f"{name}: '{metric}' over {n} tasks, expected {rank0['test_tasks']}"
        assert torch.isfinite(torch.tensor([mean, ci95])).all(), f"{name}: '{metric}' = {mean} ± {ci95}"

"""DDP on CPU (gloo): two ranks split each meta-batch and their update equals one process's."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SHORT = ["trainer.max_steps=3", "data.train_batches_per_epoch=3", "data.meta_batch_size=4", "data.val_tasks=10",
         "data.test_tasks=10", "data.eval_batch_size=3", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
         "trainer.num_sanity_val_steps=0", "logger=none", "checkpoint.save_top_k=0"]
CASES = {
    "maml": ["algorithm=maml", "algorithm.first_order=false", "algorithm.inner_steps=2"],
    # per-task backward: the surrogate's single backward must still all-reduce exactly once
    "maml_task_backward": ["algorithm=maml", "algorithm.first_order=false", "algorithm.inner_steps=2",
                           "algorithm.task_backward=true"],
    "metasgd": ["algorithm=metasgd"],
    "reptile": ["algorithm=reptile"],
    # an MLP: BatchNorm statistics would span a rank's share of the meta-batch in a metric learner
    "protonet": ["algorithm=protonet", "data=synthetic", "model=mlp", "model.hidden=[32,32]"],
}


def _fit(tmp: Path, name: str, extra: list[str]) -> tuple[dict[str, torch.Tensor], str]:
    tmp.mkdir()
    proc = subprocess.run([sys.executable, "-m", "lightmeta", "fit", *CASES[name], *SHORT, *extra,
                           f"output_dir={tmp}", "experiment=ddp"], capture_output=True, text=True, timeout=600, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(next(tmp.glob("ddp/version_*/checkpoints/last.ckpt")), weights_only=True)
    return ckpt["state_dict"], proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_two_rank_update_equals_single_process(name: str, tmp_path: Path) -> None:
    single, single_out = _fit(tmp_path / "single", name, [])
    ddp, ddp_out = _fit(tmp_path / "ddp", name, ["trainer.strategy=ddp", "trainer.devices=2"])
    assert single.keys() == ddp.keys()
    for k in single:
        if single[k].is_floating_point():
            rel = (single[k] - ddp[k]).norm() / single[k].norm().clamp(min=1e-12)
            assert rel <= 1e-5, f"{k}: relative difference {rel:.2e}"
    # evaluation tasks are split across ranks without loss or duplication; the table is printed once
    assert ddp_out.count("meta-test results") == 1 and ", 10 tasks," in ddp_out
    row = [line for line in ddp_out.splitlines() if line.startswith("| ") and "metric" not in line][0]
    assert row == [line for line in single_out.splitlines() if line.startswith("| ") and "metric" not in line][0]

"""Acceptance: a folder of images becomes a trained model and a test table through the CLI,
with exactly the README's command plus a small schedule."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightmeta.datamodules.imagefolder import write_example
from lightmeta.runner import load_learner, read_checkpoint_meta

SMALL_SCHEDULE = ["trainer.max_steps=1", "data.meta_batch_size=1", "data.train_batches_per_epoch=1",
                  "data.val_tasks=1", "data.test_tasks=2", "trainer.num_sanity_val_steps=0"]


@pytest.mark.slow
def test_fit_protonet_on_a_folder_of_images(tmp_path: Path) -> None:
    # 30 classes (19/5/6 by the default 64/16/20 ratio), 16 images each (1 shot + 15 queries)
    root = write_example(tmp_path / "my images", classes=30, per_class=16)
    command = ["fit", "data=imagefolder", f"data.root={root}", "algorithm=protonet",
               *SMALL_SCHEDULE, f"output_dir={tmp_path / 'runs'}"]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}  # the decoded cache stays in tmp_path
    proc = subprocess.run([sys.executable, "-m", "lightmeta", *command], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the test table
    assert "meta-test results: protonet on imagefolder, 2 tasks" in proc.stdout
    assert "| accuracy" in proc.stdout
    run_dir = Path(proc.stdout.split("run directory: ")[1].splitlines()[0].strip())
    rows = {r["metric"]: r for r in json.loads((run_dir / "results_test.json").read_text())["rows"]}
    assert rows["acc"]["n"] == 2 and 0.0 <= rows["acc"]["mean"] <= 1.0

    # the trained model: the best (meta-validation) checkpoint, a Conv4 on 84x84 RGB episodes
    best = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    assert read_checkpoint_meta(best)["algorithm"] == "protonet"
    learner = load_learner(best)
    assert learner.task_info.in_shape == (3, 84, 84) and type(learner.model).__name__ == "Conv4"

    # the class split used, kept with the run
    split = json.loads((run_dir / "imagefolder_split.json").read_text())
    assert [len(split[s]) for s in ("train", "val", "test")] == [19, 5, 6]

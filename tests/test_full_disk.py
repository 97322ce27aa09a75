"""A disk that fills up during a checkpoint save: one clear line, nothing half-written, nothing lost."""
from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lightmeta import checkpointing
from lightmeta.checkpointing import SafeCheckpointIO, safe_load
from lightmeta.cli import main
from lightmeta.runner import load_learner

# one meta-step per epoch, and every validation writes best-<step>.ckpt, then last.ckpt
SHORT = ["trainer.max_steps=3", "data.train_batches_per_epoch=1", "data.val_tasks=4", "data.test_tasks=4",
         "data.meta_batch_size=2", "trainer.enable_progress_bar=false", "logger=none", "trainer.num_sanity_val_steps=0",
         "checkpoint.save_top_k=-1", "experiment=disk"]


class _Filling:
    """A file on a disk with ``free`` bytes left: the write that passes the limit stores what fits
    and raises ``ENOSPC``, as the kernel does."""

    def __init__(self, file: Any, free: int) -> None:
        self.file, self.free = file, free

    def write(self, data: bytes) -> int:
        data = bytes(data)
        if len(data) > self.free:
            self.file.write(data[: self.free])
            self.free = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.free -= len(data)
        return self.file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)

    def __enter__(self) -> "_Filling":
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


class FullDisk:
    """``open`` for lightmeta.checkpointing: the first ``files_that_fit`` files are written whole,
    then the disk is full (1 kB left)."""

    def __init__(self, files_that_fit: int) -> None:
        self.left = files_that_fit
        self.failed: list[Path] = []

    def open(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        file = builtins.open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return file
        if self.left > 0:
            self.left -= 1
            return file
        self.failed.append(Path(path))
        return _Filling(file, free=1024)


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(1000)}, path)
    disk = FullDisk(files_that_fit=0)
    monkeypatch.setattr(checkpointing, "open", disk.open, raising=False)
    with pytest.raises(checkpointing.LightmetaError) as info:
        io.save_checkpoint({"w": torch.zeros(1000)}, path)
    assert disk.failed and disk.failed[0].name.endswith(".tmp"), "the save must go through a temporary file"
    assert str(info.value) == (f"cannot write checkpoint {path}: No space left on device; free disk space or choose "
                               "another output_dir (the previous checkpoint is untouched)")
    assert torch.equal(safe_load(path)["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "the half-written temporary file must be removed"


def test_full_disk_during_fit_is_one_line_and_the_run_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    disk = FullDisk(files_that_fit=2)  # best-1.ckpt and last.ckpt after meta-step 1 fit; step 2's do not
    monkeypatch.setattr(checkpointing, "open", disk.open, raising=False)
    assert main(["fit", *SHORT, f"output_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    ckpt_dir = tmp_path / "disk" / "version_0" / "checkpoints"
    assert len(disk.failed) == 1
    target = ckpt_dir / disk.failed[0].name.split(".")[1]  # .last.ckpt.<pid>.tmp -> last.ckpt
    assert err == (f"error: cannot write checkpoint {target}.ckpt: No space left on device; free disk space or "
                   "choose another output_dir (the previous checkpoint is untouched)\n")
    assert not list(ckpt_dir.glob(".*.tmp")), "a half-written checkpoint survived"

    # nothing lost: the step-1 checkpoints are whole, rebuild the learner, and the run resumes from them
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best-1.ckpt", "last.ckpt"]
    assert all(safe_load(p)["global_step"] == 1 for p in ckpt_dir.iterdir())
    last = ckpt_dir / "last.ckpt"
    learner = load_learner(last)
    assert all(torch.isfinite(p).all() for p in learner.parameters())
    monkeypatch.undo()  # space freed
    assert main(["fit", "--ckpt", "last", "--no-test", *SHORT, f"output_dir={tmp_path}"]) == 0
    assert safe_load(tmp_path / "disk" / "version_1" / "checkpoints" / "last.ckpt")["global_step"] == 3

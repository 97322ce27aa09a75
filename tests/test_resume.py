"""Exact resume, pre-emption (SIGTERM), atomic checkpoint writes and weights-only loading."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from lightmeta import runner
from lightmeta.checkpointing import SafeCheckpointIO, UnsafeCheckpointError, safe_load
from lightmeta.cli import main
from lightmeta.config import load_config
from lightmeta.runner import fit

COMMON = ["trainer.max_steps=12", "data.train_batches_per_epoch=5", "data.val_tasks=4", "data.test_tasks=4",
          "data.meta_batch_size=4", "trainer.enable_progress_bar=false", "logger=none", "trainer.num_sanity_val_steps=0"]
SETUPS = {
    "maml": [],
    "protonet": ["algorithm=protonet", "data=synthetic", "model=conv4", "model.filters=8", "data.num_workers=2"],
}


class _StopAt(L.Callback):
    """Sends the trainer the SIGTERM flag after ``step`` meta-steps, as a pre-emption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer._signal_connector.received_sigterm = True


@pytest.mark.parametrize(("setup", "stop"), [("maml", 7), ("maml", 5), ("protonet", 8)])
def test_interrupted_and_resumed_run_is_bit_identical(setup: str, stop: int, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop mid-epoch (7, 8) or at an epoch boundary (5), resume with --ckpt last: same weights."""
    cfg = load_config(None, [*COMMON, *SETUPS[setup], f"output_dir={tmp_path}"])
    straight, _ = fit(cfg, test=False)

    build = runner.build_trainer
    monkeypatch.setattr(runner, "build_trainer", lambda *a: _with(build(*a), _StopAt(stop)))
    stopped, results = fit(cfg, test=False)
    monkeypatch.setattr(runner, "build_trainer", build)
    assert results is None and stopped.stopped_at is not None and stopped.trainer.global_step == stop

    resumed, _ = fit(cfg, ckpt_path="last", test=False)
    assert resumed.trainer.global_step == straight.trainer.global_step == 12
    a, b = straight.learner.state_dict(), resumed.learner.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _CrashAt(L.Callback):
    """Raises after ``step`` meta-steps, as a node failure would (no checkpoint written then)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_after_a_crash_last_ckpt_is_the_latest_validation_not_the_latest_improvement(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's own save_last only follows top-k saves; ours follows every validation, so a
    crash at step 11 resumes from step 10 (here no top-k checkpoint is kept at all)."""
    cfg = load_config(None, [*COMMON, "checkpoint.save_top_k=0", f"output_dir={tmp_path}"])
    straight, _ = fit(cfg, test=False)

    build = runner.build_trainer
    monkeypatch.setattr(runner, "build_trainer", lambda *a: _with(build(*a), _CrashAt(11)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(cfg, test=False)
    monkeypatch.setattr(runner, "build_trainer", build)
    last = sorted(tmp_path.glob("*/version_1/checkpoints/last.ckpt"))
    assert len(last) == 1 and safe_load(last[0])["global_step"] == 10

    resumed, _ = fit(cfg, ckpt_path="last", test=False)
    assert resumed.trainer.global_step == 12
    a, b = straight.learner.state_dict(), resumed.learner.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _with(trainer: L.Trainer, callback: L.Callback) -> L.Trainer:
    trainer.callbacks.append(callback)
    return trainer


@pytest.mark.slow
def test_sigterm_to_a_real_fit_writes_a_resumable_checkpoint(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "lightmeta", "fit", "trainer.max_steps=400", "data.train_batches_per_epoch=10",
            "data.val_tasks=4", "data.test_tasks=20", "trainer.enable_progress_bar=false", "experiment=pre",
            f"output_dir={tmp_path}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 240
    while not list(tmp_path.glob("pre/version_0/checkpoints/best-*.ckpt")):  # training is under way
        assert proc.poll() is None and time.time() < deadline, "fit ended or never reached its first validation"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    assert "resumable checkpoint:" in out and "meta-test results" not in out
    last = tmp_path / "pre/version_0/checkpoints/last.ckpt"
    step = torch.load(last, weights_only=True)["global_step"]
    assert 10 <= step < 400

    resumed = subprocess.run([*args[:4], "--ckpt", "last", *args[4:]], capture_output=True, text=True,
                             timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "meta-test results: maml on sinusoid, 20 tasks" in resumed.stdout
    final = torch.load(next(tmp_path.glob("pre/version_1/checkpoints/last.ckpt")), weights_only=True)
    assert final["global_step"] == 400


def test_a_crash_during_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, path)

    def crash(obj: object, f: object) -> None:
        f.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(safe_load(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary file may survive"


class _Payload:
    """Pickles to a call that would create a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {}, "lightmeta": {"algorithm": "maml"}, "x": _Payload(marker)}, f)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load checkpoint"):
        safe_load(evil)
    classic = tmp_path / "evil2.ckpt"  # protocol 2: torch's unpickler reaches the GLOBAL and names it
    with open(classic, "wb") as f:
        pickle.dump({"x": _Payload(marker)}, f, protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="it would import code .*posix.system"):
        safe_load(classic)
    assert main(["test", "--ckpt", str(evil)]) == 1
    assert "refusing to load checkpoint" in capsys.readouterr().err
    assert main(["fit", "--ckpt", str(evil), f"output_dir={tmp_path}"]) == 1
    assert not marker.exists(), "the payload ran"


def test_ckpt_last_without_checkpoints_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--ckpt", "last", f"output_dir={tmp_path}"]) == 1
    assert "--ckpt last: no last.ckpt under" in capsys.readouterr().err

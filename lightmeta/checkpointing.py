"""Checkpoints that survive crashes and pre-emption, and never execute code when loaded.

* :class:`SafeCheckpointIO` writes to a temporary file and renames it into place (a crash during
  the save leaves the previous checkpoint intact, never a half-written one; a full disk or an
  unwritable folder is one line naming the checkpoint and the fix) and loads with
  ``torch.load(weights_only=True)`` (a pickle payload that would run code is refused).
* :class:`GracefulStop` turns SIGTERM (SLURM pre-emption) and the first Ctrl-C into a stop at the
  end of the current meta-step plus a resumable ``last.ckpt``.
* :func:`resolve_checkpoint` maps ``--ckpt last`` to the newest ``last.ckpt`` of the experiment.
"""
from __future__ import annotations

import errno
import os
import pickle
import signal
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightmeta.errors import LightmetaError

LAST = "last.ckpt"


class UnsafeCheckpointError(LightmetaError):
    """A checkpoint holds objects that weights-only loading refuses (possibly code)."""


class _WriteErrors:
    """A binary file for ``torch.save`` that remembers the ``OSError`` a write raised.

    torch's zip writer calls ``write`` from C++ and reports a failed write (a full disk) as a
    ``RuntimeError`` about file positions, dropping the ``OSError``; this keeps it.
    """

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.file.flush()


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic saves (temp file + rename) and weights-only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        writer: _WriteErrors | None = None
        try:
            with open(tmp, "wb") as f:
                writer = _WriteErrors(f)
                torch.save(checkpoint, writer)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:
            tmp.unlink(missing_ok=True)
            cause = exc if isinstance(exc, OSError) else writer.error if writer is not None else None
            if cause is None:
                raise  # torch failed for a reason other than the disk
            fix = "free disk space" if cause.errno in (errno.ENOSPC, errno.EDQUOT) else "make its folder writable"
            raise LightmetaError(f"cannot write checkpoint {path}: {cause.strerror or cause}; {fix} or choose "
                                 "another output_dir (the previous checkpoint is untouched)") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return safe_load(path, map_location=map_location)


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with one-line errors for missing, corrupt or unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise LightmetaError(f"checkpoint '{path}' does not exist; pass --ckpt PATH to a .ckpt written by fit (or 'last')")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _culprit(str(exc))
        if "GLOBAL" in detail:
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint '{path}': it would import code ({detail}); only load checkpoints you trust"
            ) from None
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint '{path}': it is not a weights-only checkpoint ({detail}): corrupt, or "
            "pickled with objects that could execute code; use a checkpoint written by lightmeta"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise LightmetaError(f"checkpoint '{path}' is corrupt or truncated ({type(exc).__name__}); use another checkpoint") from None


def _culprit(message: str) -> str:
    """The line of torch's weights-only error that names what was refused."""
    for line in message.splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip().rstrip(".")
    return "unsupported pickle content"


class LastCheckpoint(Callback):
    """Rewrite ``last.ckpt`` after every validation and every ``every_n_train_steps`` steps.

    Lightning's own ``save_last`` only rewrites it when a top-k checkpoint was saved, so after a
    crash ``--ckpt last`` would resume from the last *improving* step instead of the latest.
    """

    def __init__(self, dirpath: Path, every_n_train_steps: int | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self._saved_step = -1

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or trainer.global_step == self._saved_step or trainer.global_step == 0:
            return
        trainer.save_checkpoint(self.dirpath / LAST)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0:
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)


class GracefulStop(Callback):
    """SIGTERM or a first Ctrl-C: finish the current meta-step, write ``last.ckpt``, stop.

    Lightning raises ``SIGTERMException`` at the end of a training batch once SIGTERM arrived
    (after the step's progress is recorded), so the checkpoint written here resumes exactly.
    A second Ctrl-C aborts at once.
    """

    def __init__(self, dirpath: Path) -> None:
        self.dirpath = Path(dirpath)
        self.stopped_at: Path | None = None
        self._previous: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and _in_main_thread():
            self._previous = signal.signal(signal.SIGINT, lambda s, f: self._interrupt(trainer))

    def _interrupt(self, trainer: L.Trainer) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C aborts
        rank_zero_info("\nCtrl-C: stopping after this meta-step and writing a resumable checkpoint "
                       "(Ctrl-C again to abort)")
        trainer._signal_connector.received_sigterm = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if isinstance(exception, SIGTERMException):
            path = self.dirpath / LAST
            trainer.save_checkpoint(path)
            self.stopped_at = path

    def _restore(self) -> None:
        if self._previous is not None and _in_main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def resolve_checkpoint(ckpt: str, output_dir: str, experiment: str) -> str:
    """``last`` -> the newest ``last.ckpt`` under ``output_dir/experiment``; other values unchanged."""
    if ckpt != "last":
        return ckpt
    root = Path(output_dir) / experiment
    candidates = sorted(root.glob(f"*/checkpoints/{LAST}"), key=lambda p: p.stat().st_mtime)  # version_N, job_<id>
    if not candidates:
        raise LightmetaError(f"--ckpt last: no {LAST} under {root}; pass --ckpt PATH or check output_dir/experiment")
    return str(candidates[-1])

"""Helpers shared by the benchmark scripts: timing, device transfer, peak memory, fixtures.

The scripts run as ``python benchmarks/<name>.py``, so this module is imported as ``_common``
(the script's folder is on ``sys.path``); tests put ``benchmarks/`` on the path to do the same.
"""
from __future__ import annotations

import gc
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightmeta.episodes import TaskBatch


def sync(device: str) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                      device: str = "cpu") -> dict[str, list[float]]:
    """Seconds of each call of every ``fn``: ``warmup`` untimed calls each, then ``repeats``
    rounds that call every ``fn`` once in turn, so that a change of load on a shared machine
    during the run hits every contender alike. Returns ``{name: [seconds per call]}``."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    """The median (the mean of the middle two for an even count)."""
    return statistics.median(values)


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1, device: str = "cpu") -> float:
    """Median seconds per call of ``fn``."""
    return median(interleaved_times({"fn": fn}, repeats, warmup, device)["fn"])


def batch_to(batch: TaskBatch, device: str) -> TaskBatch:
    """The meta-batch with its tensors on ``device``."""
    return TaskBatch(batch.support_x.to(device), batch.support_y.to(device), batch.query_x.to(device),
                     batch.query_y.to(device), batch.spec, batch.task_ids)


def hardware(device: str) -> str:
    """The GPU's name, or the CPU architecture and torch's thread count."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------- peak memory
class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage created by the operators run under this mode and still alive;
    ``peak`` is their maximum.

    Every operator (forward, backward, double backward, inside ``vmap``/``torch.func.grad``
    too) reaches the dispatcher; each new storage among its outputs is counted until it is
    freed (a ``weakref.finalize`` on the storage, whose Python object lives exactly as long as
    the storage). Views and in-place results share an input's storage and add nothing. Tensors
    that existed before (parameters, data) are the baseline and are not counted. This is the
    CPU counterpart of ``torch.cuda.max_memory_allocated`` minus the memory allocated before:
    it counts what the tensors themselves hold, not allocator rounding or the scratch buffers
    of CPU kernels (oneDNN), and it slows every operator down, so never time code under it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, weakref.finalize] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        if self._tracked.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = id(storage), storage.nbytes()
            if nbytes == 0 or key in self._tracked or key in inputs:  # in-place results and views allocate nothing
                continue
            self._tracked[key] = weakref.finalize(storage, self._freed, key, nbytes)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


#: How :func:`peak_step_bytes` measures, per device type (written into result files).
PEAK_MEMORY_MEASURE = {
    "cuda": "torch.cuda.max_memory_allocated() during one step minus torch.cuda.memory_allocated() before it "
            "(gradients set to None first; parameters and data are the baseline)",
    "cpu": "peak bytes of live tensor storage created during one step, counted by a TorchDispatchMode over every "
           "operator (forward and backward); the CPU counterpart of torch.cuda.max_memory_allocated minus the "
           "baseline (see benchmarks/_common.py LiveTensorBytes)",
}


def peak_step_bytes(step: Callable[[], Any], device: str) -> int:
    """Peak memory one call of ``step`` adds on top of what is allocated before it (see
    :data:`PEAK_MEMORY_MEASURE`); call it after setting gradients to ``None``."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with LiveTensorBytes() as counter:
        step()
    return counter.peak


# ---------------------------------------------------------------------- gradients
def grad_agreement(ours: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, Any]:
    """How closely two meta-gradients (same parameter names) agree, in float64 L2 norms.

    ``whole``: ``|ours - ref| / |ref|`` over all tensors concatenated. ``worst_tensor``: the
    largest per-tensor ``|ours - ref| / |ref|`` among tensors carrying at least 1e-3 of the whole
    gradient's norm (``worst_name`` says which); the others, such as a conv bias right before
    BatchNorm whose true gradient is 0, hold only rounding noise, which ``whole`` covers.
    """
    if ours.keys() != reference.keys():
        raise ValueError(f"gradients of different parameters: {sorted(ours.keys() ^ reference.keys())}")
    diff = {n: (ours[n].double() - ref.double()).norm().item() for n, ref in reference.items()}
    size = {n: ref.double().norm().item() for n, ref in reference.items()}
    whole = sum(v * v for v in size.values()) ** 0.5
    rel = {n: diff[n] / size[n] for n in reference if size[n] >= 1e-3 * whole and size[n] > 0}
    worst = max(rel, key=rel.__getitem__) if rel else None
    return {"whole": sum(v * v for v in diff.values()) ** 0.5 / whole if whole > 0 else float("nan"),
            "worst_tensor": rel[worst] if worst else float("nan"), "worst_name": worst}


# ---------------------------------------------------------------------- synthetic data
def fixture(classes: int, per_class: int, size: int, seed: int = 0, channels: int = 3) -> Tensor:
    """``uint8 [classes * per_class, channels, size, size]`` random images, class after class."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (classes * per_class, channels, size, size), dtype=torch.uint8, generator=g)

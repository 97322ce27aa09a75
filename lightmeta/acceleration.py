"""Speed-ups that leave results unchanged: channels-last memory format and ``torch.compile``.

Both are switched on per algorithm (``AlgorithmConfig.channels_last`` / ``compile``) and are
tested for parity with the plain path (``tests/test_acceleration.py``). What is compiled depends
on the learner: metric learners compile the backbone (:meth:`MetaLearner.compile_hot_path`);
gradient learners compile their functional inner step, whose inner gradient is taken with
``torch.func.grad`` so that second-order meta-gradients need no double backward through a
compiled graph (AOTAutograd, behind the ``inductor`` and ``aot_eager`` backends, has none).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from lightmeta.errors import ConfigError


def to_channels_last(x: Tensor) -> Tensor:
    """``x [..., C, H, W]`` with channels-last strides per image (no copy if it has them already).

    Written with ``movedim`` + ``contiguous()`` rather than ``contiguous(memory_format=...)`` so it
    also runs inside ``torch.func.vmap`` (the batched inner loop), which cannot query memory formats.
    """
    return x.movedim(-3, -1).contiguous().movedim(-1, -3)


def _channels_last_inputs(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(to_channels_last(a) if isinstance(a, Tensor) and a.dim() == 4 else a for a in args)


def use_channels_last(model: nn.Module) -> None:
    """Convert ``model``'s 4-D parameters and buffers to channels-last and make its forward
    convert 4-D (image batch) inputs, whichever path calls it (``functional_call`` included)."""
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_channels_last_inputs)


def check_compile_backend(backend: str) -> None:
    """Refuse a ``torch.compile`` backend this torch does not have, naming the ones it has."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(f"algorithm.compile_backend={backend!r} is not a torch.compile backend; "
                          f"use one of: {', '.join(known)}")


def compiled(owner: Any, fn: Callable[..., Any], backend: str) -> Callable[..., Any]:
    """``torch.compile(fn, backend=backend)``, made once per ``owner`` and ``fn`` and reused, so
    that repeated meta-steps hit the compiled code instead of re-tracing a new function."""
    cache: dict[Any, Callable[..., Any]] = owner.__dict__.setdefault("_compiled_fns", {})
    if fn not in cache:
        cache[fn] = torch.compile(fn, backend=backend)
    return cache[fn]

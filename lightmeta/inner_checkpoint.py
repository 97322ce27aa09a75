"""Inner-step checkpointing: second-order meta-gradients with memory that barely grows with steps.

Plain second-order MAML keeps, for every inner step, the support forward's activations and
the graph of its ``create_graph`` gradient, so memory grows linearly with the inner steps.
:func:`checkpointed_step` keeps only the step's input fast weights instead: the forward pass
computes the step's values without a graph, and the backward pass recomputes that one step with
``create_graph=True`` and back-propagates through it (a vector-Jacobian product that includes
the second-order terms), then frees it. The meta-gradient is the plain path's, exactly
(``tests/test_inner_checkpointing.py``); the cost is one more support forward and backward per
step.

Why not ``torch.utils.checkpoint``: its non-reentrant variant drops the tensors saved inside the
region, so the inner ``autograd.grad`` taken *during the forward* already triggers a
recomputation (three support passes per step instead of two), and ``torch.func.grad`` (the
batched path) does not support its saved-tensor hooks at all.

The recomputation replays the forward's RNG state (CPU and the accelerators of the inputs, so
dropout draws the same masks) and autocast state, and runs inside ``recompute_context`` (the
learner freezes BatchNorm running statistics there, so they are updated once, in the forward).
Gradients reach every tensor the step uses: the fast weights, and the learner's ``parameters``
(learned inner rates, per-step BatchNorm weights, ANIL's body), which are passed in explicitly
because an ``autograd.Function`` only returns gradients for its inputs.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import get_device_states, set_device_states

Params = dict[str, Tensor]
#: ``run(fast, create_graph) -> next fast``: one inner step
StepFn = Callable[[Params, bool], Params]


def checkpointed_step(run: StepFn, fast: Params, parameters: list[Tensor],
                      recompute_context: Callable[[], AbstractContextManager[Any]]) -> Params:
    """``run(fast, True)``'s values, keeping only ``fast`` for a backward pass that recomputes it.

    ``parameters``: every other tensor requiring grad that ``run`` may use (the learner's
    trainable parameters). ``recompute_context()`` is entered around the recomputation.
    """
    names = list(fast)
    out = _RecomputedStep.apply(run, names, recompute_context, len(names), *fast.values(), *parameters)
    return dict(zip(names, out))


class _RecomputedStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: StepFn, names: list[str], recompute_context: Callable[[], Any], n_fast: int,
                *tensors: Tensor) -> tuple[Tensor, ...]:
        fast = tensors[:n_fast]
        ctx.run, ctx.names, ctx.recompute_context, ctx.n_fast = run, names, recompute_context, n_fast
        ctx.cpu_rng = torch.get_rng_state()
        ctx.device_ids, ctx.device_rng = get_device_states(*fast)
        ctx.device_type = next((t.device.type for t in fast if t.device.type not in ("cpu", "meta")), "cuda")
        ctx.autocast = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                        for d in {"cpu", *(t.device.type for t in fast)}}
        ctx.save_for_backward(*fast)
        ctx.parameters = tensors[n_fast:]  # leaves of the learner: holding them keeps nothing extra alive
        with torch.enable_grad():  # the inner gradient needs a graph; this step's is freed on return
            out = run({k: v.detach().requires_grad_(True) for k, v in zip(names, fast)}, False)
        return tuple(out[k].detach() for k in names)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_out: Tensor) -> tuple[Tensor | None, ...]:
        fast = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        parameters = list(ctx.parameters)
        with torch.random.fork_rng(devices=ctx.device_ids, device_type=ctx.device_type):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.device_ids:
                set_device_states(ctx.device_ids, ctx.device_rng, device_type=ctx.device_type)
            with torch.enable_grad():
                with ctx.recompute_context(), _AutocastState(ctx.autocast):
                    out = ctx.run(dict(zip(ctx.names, fast)), True)
                # back-propagated outside autocast, as the plain path's backward pass is
                wanted = [t for t in fast + parameters if t.requires_grad]
                grads = iter(torch.autograd.grad([out[k] for k in ctx.names], wanted, grad_out, allow_unused=True))
        result = [next(grads) if t.requires_grad else None for t in fast + parameters]
        return (None, None, None, None, *result)


class _AutocastState:
    """Re-enter the forward's autocast state (per device type) around the recomputation."""

    def __init__(self, states: dict[str, tuple[bool, torch.dtype]]) -> None:
        self.managers = [torch.autocast(d, dtype=dtype, enabled=on) for d, (on, dtype) in states.items()]

    def __enter__(self) -> None:
        for m in self.managers:
            m.__enter__()

    def __exit__(self, *exc: object) -> None:
        for m in reversed(self.managers):
            m.__exit__(*exc)

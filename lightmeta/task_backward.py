"""The meta-loss as a mean of per-task terms, optionally back-propagated one task at a time.

Most meta-losses are a mean over the meta-batch of per-task terms (a query loss, MAML++'s
weighted query losses, iMAML's implicit-gradient surrogate, Reptile's distance to the adapted
weights). Returned as one tensor, every task's graph stays alive until Lightning's single
backward pass, so memory grows with the meta-batch size. With ``task_backward`` (a
``GradientConfig`` field) :class:`TaskTerms` takes each term's gradient with
``torch.autograd.grad`` as soon as the term is computed, frees its graph and sums the gradients;
the meta-loss is then :func:`surrogate_from_gradients` of the sums: its value is the mean of the
terms and its gradient with respect to each parameter the summed one. Everything downstream is
unchanged (all inside automatic optimization): Lightning's backward writes the same ``.grad``,
DDP all-reduces it once in that backward, gradient clipping and the optimizer see it as usual,
and the logged loss and the non-finite-loss check see the same value.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Iterable, Sequence

import torch
from torch import Tensor


def surrogate_from_gradients(value: Tensor, gradients: Iterable[tuple[Tensor, Tensor | None]]) -> Tensor:
    """A scalar whose value is ``value`` and whose gradient with respect to each ``p`` is ``g``,
    for the pairs ``(p, g)`` (``g`` None: no gradient for ``p``).

    ``value + (s - s.detach())`` with ``s = sum((p * g).sum())``: the added term is exactly 0
    where ``s`` is finite, and non-finite where a gradient is, so a non-finite check on the
    loss still sees a broken meta-gradient.
    """
    terms = [(p * g.detach()).sum() for p, g in gradients if g is not None]
    if not terms:
        return value.detach()
    s = sum(terms[1:], terms[0])
    return value.detach() + (s - s.detach())


class TaskTerms:
    """Collects the per-task terms of a meta-loss; :meth:`mean` is the meta-loss.

    ``parameters`` None: the terms are kept with their graphs and :meth:`mean` is their mean, for
    one backward pass later. Otherwise each term is back-propagated as it is added: the gradient
    of ``term / tasks`` with respect to ``parameters`` is summed and the term's graph freed, and
    :meth:`mean` is the surrogate whose value is the terms' mean and whose gradient is the sum.
    """

    def __init__(self, tasks: int, parameters: Sequence[Tensor] | None = None) -> None:
        self.tasks = tasks
        self.parameters = None if parameters is None else list(parameters)
        self.terms: list[Tensor] = []
        self.sums: list[Tensor | None] = [None] * len(self.parameters or ())

    def add(self, term: Tensor) -> None:
        """One task's term (a scalar)."""
        if self.parameters is None:
            self.terms.append(term)
            return
        if term.requires_grad:
            with _autocast_off({"cpu", *(p.device.type for p in self.parameters)}):
                # the plain path's gradient is taken by Lightning's backward, outside autocast
                grads = torch.autograd.grad(term / self.tasks, self.parameters, allow_unused=True)
            self.sums = [s if g is None else g if s is None else s + g for s, g in zip(self.sums, grads)]
        self.terms.append(term.detach())

    def mean(self) -> Tensor:
        """The meta-loss: the mean of the terms (back-propagated: its surrogate)."""
        value = torch.stack(self.terms).mean()
        if self.parameters is None:
            return value
        return surrogate_from_gradients(value, zip(self.parameters, self.sums))


def _autocast_off(device_types: set[str]) -> ExitStack:
    """Autocast disabled on the device types where it is enabled, until the stack is closed."""
    stack = ExitStack()
    for d in sorted(device_types):
        if torch.is_autocast_enabled(d):
            stack.enter_context(torch.autocast(d, enabled=False))
    return stack

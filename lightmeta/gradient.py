"""Base for gradient-based meta-learners (MAML and its family).

Parameters are handled functionally (``torch.func.functional_call``) so the inner loop builds
fast weights without touching the module. Hooks for subclasses:
``inner_param_names`` (which parameters adapt: ANIL the head, BOIL the body) and
``inner_update`` (Meta-SGD's learned rates, MAML++'s per-step rates), ``use_first_order``
(MAML++'s derivative-order annealing), and the ``step`` argument of ``forward_with`` (the number
of inner updates already applied to ``params``; MAML++ picks per-step BatchNorm state with it).

One inner step is :meth:`GradientMetaLearner.inner_step` (``torch.autograd.grad``), or its
``torch.func.grad`` twin :meth:`GradientMetaLearner.functional_step` where it runs under
``vmap`` (lightmeta/batched.py) or ``torch.compile`` (``compile: true``); with
``checkpoint_inner_steps`` second-order steps are recomputed in the backward pass
(lightmeta/inner_checkpoint.py). Those paths call ``inner_update`` again or trace it, so any
state it keeps must be rebuilt from its arguments (Reptile's inner Adam restarts at step 0).
With ``task_backward`` each task's term of the meta-loss is back-propagated as soon as it is
computed (:meth:`GradientMetaLearner.task_terms`, lightmeta/task_backward.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterator, Literal

import torch
from pydantic import Field
from torch import Tensor
from torch.func import functional_call
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.modules.batchnorm import _BatchNorm

from lightmeta.acceleration import compiled
from lightmeta.batched import batched_task_metrics, batched_unsupported_reason, has_batch_norm
from lightmeta.episodes import EpisodeSpec, Task, TaskBatch
from lightmeta.errors import ConfigError
from lightmeta.inner_checkpoint import checkpointed_step
from lightmeta.meta_learner import AlgorithmConfig, MetaLearner
from lightmeta.task_backward import TaskTerms
from lightmeta.task_info import TaskInfo

Params = dict[str, Tensor]


def param_key(name: str) -> str:
    """A parameter name usable as an ``nn.ParameterDict``/buffer key (``features.0.weight`` ->
    ``features__0__weight``), for per-parameter meta-learned state (Meta-SGD, MAML++)."""
    return name.replace(".", "__")


class GradientConfig(AlgorithmConfig):
    inner_lr: float = Field(default=0.01, gt=0, description="inner-loop SGD step size")
    inner_steps: int = Field(default=1, ge=1, description="inner steps during meta-training")
    eval_inner_steps: int = Field(default=10, ge=1, description="inner steps at validation/test")
    first_order: bool = Field(default=False, description="drop second-order terms of the meta-gradient")
    batched_tasks: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="on: adapt the meta-batch's tasks in one vmapped computation where it is proven equal "
        "to the per-task loop (see lightmeta/batched.py); auto: the same, except for BatchNorm models on "
        "CPU, where the loop is faster; off: always the loop",
    )
    batch_norm: Literal["transductive", "inductive"] = Field(
        default="transductive",
        description="transductive: batch statistics of the current support/query set, in training "
        "and evaluation (the MAML reference); inductive: running statistics at evaluation",
    )
    checkpoint_inner_steps: bool = Field(
        default=False,
        description="second order: keep only each inner step's fast weights and recompute the step's graph "
        "in the backward pass (lightmeta/inner_checkpoint.py), so memory grows by one copy of the adapted "
        "parameters per inner step instead of one support-set graph; the same meta-gradient, at the cost "
        "of one more support forward and backward per step",
    )
    task_backward: bool = Field(
        default=False,
        description="back-propagate each task's query loss as soon as it is computed, so only one task's graph "
        "is alive at a time (memory independent of the meta-batch size); same meta-gradient",
    )


class GradientMetaLearner(MetaLearner):
    """Inner loop of SGD steps on the support loss, functional in the parameters.

    During meta-training the inner gradients are differentiable (``create_graph``) unless
    ``first_order``; during evaluation each step's fast weights are detached, so no outer
    graph is ever kept.
    """

    Config = GradientConfig
    config: GradientConfig
    needs_grad_at_eval = True
    #: Whether meta-training differentiates through the inner loop (so a graph is kept through
    #: it and ``checkpoint_inner_steps`` can save memory). Reptile and iMAML run it without one.
    differentiates_inner_loop: ClassVar[bool] = True

    def __init__(self, algorithm: dict[str, Any] | AlgorithmConfig | None = None, *, model: dict[str, Any],
                 task: dict[str, Any] | TaskInfo) -> None:
        super().__init__(algorithm, model=model, task=task)
        c, name = self.config, getattr(type(self), "registered_name", type(self).__qualname__)
        if c.checkpoint_inner_steps and not self.differentiates_inner_loop:
            raise ConfigError(f"algorithm.checkpoint_inner_steps is not supported by '{name}': its inner loop keeps "
                              "no graph, so its memory does not grow with inner_steps; set it to false")
        if c.checkpoint_inner_steps and c.compile:
            raise ConfigError("algorithm.checkpoint_inner_steps cannot be combined with algorithm.compile: a "
                              "checkpointed step recomputes its second-order graph with torch.autograd.grad, which "
                              "through compiled code would need double backward; turn one of them off")
        if c.compile and c.batch_norm == "inductive" and any(
                isinstance(m, _BatchNorm) and m.track_running_stats for m in self.model.modules()):
            raise ConfigError(f"algorithm.compile with batch_norm=inductive is not supported by '{name}': the compiled "
                              "inner step (torch.func.grad) cannot update BatchNorm running statistics; set "
                              "algorithm.batch_norm=transductive or algorithm.compile=false")

    def compile_hot_path(self) -> None:
        """Nothing to do at construction: the inner step is compiled on first use (``inner_step``,
        ``batched_task_metrics``), after subclasses have added their state (learned rates)."""

    # ------------------------------------------------------------------ hooks
    def inner_param_names(self) -> list[str]:
        """Names of the parameters adapted in the inner loop (default: all trainable)."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def inner_update(self, params: Params, grads: Params, step: int) -> Params:
        """One inner step; plain SGD with ``inner_lr``."""
        lr = self.config.inner_lr
        return {k: p - lr * grads[k] for k, p in params.items()}

    def use_first_order(self) -> bool:
        """Whether this meta-training step drops second-order terms (default: ``first_order``)."""
        return self.config.first_order

    def num_inner_steps(self) -> int:
        """Inner steps in the current mode: ``inner_steps`` in training, ``eval_inner_steps`` otherwise."""
        return self.config.inner_steps if self.training else self.config.eval_inner_steps

    # ------------------------------------------------------------------ functional model
    @contextmanager
    def batch_norm_mode(self) -> Iterator[None]:
        """Apply the configured BatchNorm mode, whatever ``train()``/``eval()`` says.

        Transductive: every BatchNorm normalises with the statistics of the batch it sees and
        leaves its running statistics untouched. Inductive: the module's own mode decides
        (batch statistics with running updates in training, running statistics in evaluation).
        """
        if self.config.batch_norm == "inductive":
            yield
            return
        saved = [(m, m.training, m.track_running_stats) for m in self.model.modules() if isinstance(m, _BatchNorm)]
        for m, _, _ in saved:
            m.training, m.track_running_stats = True, False
        try:
            yield
        finally:
            for m, training, track in saved:
                m.training, m.track_running_stats = training, track

    def forward_with(self, params: Params, x: Tensor, step: int | None = None) -> Tensor:
        """The backbone applied to ``x`` with ``params`` replacing the named parameters.

        ``step`` is the number of inner updates already applied to ``params`` (``None``: outside
        an inner loop). The default ignores it; subclasses may use it for per-step state.
        """
        with self.batch_norm_mode():
            return functional_call(self.model, params, (x,), strict=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with({}, x)

    @contextmanager
    def frozen_running_stats(self) -> Iterator[None]:
        """BatchNorm normalises as before but leaves its running statistics alone for a while:
        a checkpointed inner step is recomputed in the backward pass, and must not update them twice.
        (In training mode the output uses batch statistics either way; in evaluation mode the
        running statistics are used whatever ``track_running_stats`` says.) Re-entrant."""
        norms = [m for m in self.model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        for m in norms:
            m.track_running_stats = False
        try:
            yield
        finally:
            for m in norms:
                m.track_running_stats = True

    # ------------------------------------------------------------------ one inner step
    def inner_step(self, params: Params, x: Tensor, y: Tensor, step: int, create_graph: bool) -> Params:
        """One inner update of ``params`` on ``(x, y)``: the support-loss gradient (differentiable
        if ``create_graph``), then ``inner_update``."""
        with torch.enable_grad():
            loss = self.loss_fn(self.forward_with(params, x, step), y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        return self.inner_update(params, dict(zip(params, grads)), step)

    def functional_step(self, params: Params, x: Tensor, y: Tensor, step: int, first_order: bool) -> Params:
        """:meth:`inner_step` written with ``torch.func.grad``: the form that runs under ``vmap``
        (the batched path) and under ``torch.compile`` (``compile: true``), where second-order
        meta-gradients are ordinary first derivatives of the traced step."""
        def support_loss(p: Params) -> Tensor:
            return self.loss_fn(self.forward_with(p, x, step), y)

        grads = torch.func.grad(support_loss)(params)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        return self.inner_update(params, grads, step)

    def _take_step(self, params: Params, x: Tensor, y: Tensor, step: int, differentiable: bool,
                   create_graph: bool) -> Params:
        """One step of :meth:`inner_loop`, plain, checkpointed or compiled as configured."""
        if create_graph and self.config.checkpoint_inner_steps:
            return checkpointed_step(lambda p, graph: self.inner_step(p, x, y, step, graph), params,
                                     [p for p in self.parameters() if p.requires_grad], self.frozen_running_stats)
        if self.config.compile:
            step_fn = compiled(self, self.functional_step, self.config.compile_backend)
            with torch.enable_grad():
                return step_fn(params, x, y, step, differentiable and not create_graph)
        return self.inner_step(params, x, y, step, create_graph)

    # ------------------------------------------------------------------ inner loop
    def inner_loop(
        self,
        support_x: Tensor,
        support_y: Tensor,
        steps: int,
        on_step: Callable[[int, Params], None] | None = None,
    ) -> Params:
        """Run ``steps`` inner updates from the current meta-parameters; returns fast weights.

        ``on_step(k, params)`` is called with the fast weights after ``k`` steps (k = 0..steps),
        which is how evaluation records adaptation curves.
        """
        named = dict(self.model.named_parameters())
        differentiable = self.training and torch.is_grad_enabled()
        create_graph = differentiable and not self.use_first_order()
        if differentiable:
            params = {n: named[n] for n in self.inner_param_names()}
        else:
            params = {n: named[n].detach().requires_grad_(True) for n in self.inner_param_names()}
        if on_step is not None:
            on_step(0, params)
        for step in range(steps):
            params = self._take_step(params, support_x, support_y, step, differentiable, create_graph)
            if not differentiable:
                params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            if on_step is not None:
                on_step(step + 1, params)
        return params

    def adapt(self, support_x: Tensor, support_y: Tensor, spec: EpisodeSpec) -> Params:
        return self.inner_loop(support_x, support_y, self.num_inner_steps())

    def predict(self, state: Params, query_x: Tensor) -> Tensor:
        return self.forward_with(state, query_x, self.num_inner_steps())

    def find_nonfinite(self, task: Task) -> str | None:
        """The first non-finite inner-loop support loss or the query loss of ``task``."""
        named = dict(self.model.named_parameters())
        params = {n: named[n].detach().requires_grad_(True) for n in self.inner_param_names()}
        steps = self.num_inner_steps()
        with torch.enable_grad():
            for step in range(steps):
                loss = self.loss_fn(self.forward_with(params, task.support_x, step), task.support_y)
                if not torch.isfinite(loss):
                    return f"inner-loop support loss at inner step {step} = {loss.item()}"
                grads = torch.autograd.grad(loss, list(params.values()))
                params = {k: v.detach().requires_grad_(True)
                          for k, v in self.inner_update(params, dict(zip(params, grads)), step).items()}
                bad = [k for k, v in params.items() if not torch.isfinite(v).all()]
                if bad:
                    return f"fast weights {bad[0]} after inner step {step} (support loss {loss.item():.4g})"
            query = self.loss_fn(self.forward_with(params, task.query_x, steps), task.query_y)
        return None if torch.isfinite(query) else f"query (outer) loss after {steps} inner steps = {query.item()}"

    # ------------------------------------------------------------------ batched meta-training
    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The meta-batch's inner loops in one vmapped computation when that is proven equal
        to the per-task loop; otherwise (and with ``batched_tasks: off``) the loop."""
        if self.config.batched_tasks != "off" and torch.is_grad_enabled():
            reason = batched_unsupported_reason(self)
            if reason is None and self.config.batched_tasks == "auto" and batch.support_x.device.type == "cpu" \
                    and has_batch_norm(self.model):
                reason = "BatchNorm on CPU: the per-task loop is faster there (batched_tasks: on forces vmap)"
            if reason is None:
                metrics = batched_task_metrics(self, batch, self.num_inner_steps())
                loss = metrics["loss"].mean()
                return loss, {k: v.mean().detach() for k, v in metrics.items()}
            if not self._said_sequential:
                self._said_sequential = True
                rank_zero_info(f"{type(self).__name__}: adapting tasks one by one: {reason}")
        return super().meta_loss(batch)

    _said_sequential = False

    def task_terms(self, tasks: int) -> TaskTerms:
        """With ``task_backward`` (and gradients on), each task's term of the meta-loss is
        back-propagated as soon as it is computed and its graph freed (lightmeta/task_backward.py)."""
        if self.config.task_backward and torch.is_grad_enabled():
            return TaskTerms(tasks, [p for p in self.parameters() if p.requires_grad])
        return super().task_terms(tasks)

    # ------------------------------------------------------------------ evaluation with curves
    def eval_metric_names(self) -> list[str]:
        base = super().eval_metric_names()
        steps = range(self.config.eval_inner_steps + 1)
        return base + [f"{k}_step{s}" for s in steps for k in base]

    def evaluate_task(self, task: Task) -> dict[str, Tensor]:
        """Query metrics after every inner step (the adaptation curve) plus the final ones."""
        out: dict[str, Tensor] = {}

        def record(step: int, params: Params) -> None:
            with torch.no_grad():
                for k, v in self.task_metrics(self.forward_with(params, task.query_x, step), task.query_y).items():
                    out[f"{k}_step{step}"] = v.detach()

        self.inner_loop(task.support_x, task.support_y, self.config.eval_inner_steps, on_step=record)
        last = self.config.eval_inner_steps
        out.update({k: out[f"{k}_step{last}"] for k in super().eval_metric_names()})
        return out

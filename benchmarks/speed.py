"""Meta-training speed and memory (issue 8): lightmeta batched and sequential vs learn2learn.

Every case takes meta-steps (inner loops, query loss, backward: everything a training step
computes before the optimizer) with three contenders on the same model initialisation and the
same meta-batch, side by side in one process, timed in interleaved rounds so that load on a
shared machine hits them alike:

* **ours batched**: the lightmeta learner with ``batched_tasks: on`` (the meta-batch's inner
  loops as one vmapped computation; ProtoNet: every episode embedded in one backbone call);
* **ours sequential**: ``batched_tasks: off`` (the per-task loop; ProtoNet: the per-task
  ``adapt``/``predict`` contract of ``MetaLearner.meta_loss``);
* **learn2learn**: ``l2l.algorithms.MAML`` / ``MetaSGD`` on a copy of the same model (ANIL: MAML
  on the head over the body's features, as tests/test_gradient_algorithms.py checks), used as
  learn2learn's ``examples/vision/maml_omniglot.py`` does: per task ``clone -> adapt -> query
  loss -> backward``, then the gradients divided by the meta-batch size; ProtoNet: a per-episode
  loop with ``l2l.nn.PrototypicalClassifier`` on the embedding of ``cat(support, query)``.

Cases (``--cases`` picks some): MAML second and first order, ANIL and Meta-SGD on MAML's
Omniglot Conv4 (64 filters, stride-2 convolutions, spatial mean, Glorot init) with real Omniglot
5-way 1-shot 15-query episodes, meta-batch 32, 1 inner step; MAML second order on Conv4-32,
84x84x3 5w1s15q (random uint8 pixels: the arithmetic does not depend on them), meta-batch 4,
5 inner steps, also with ``checkpoint_inner_steps``, ``task_backward`` (each task's query loss
back-propagated as soon as it is computed, learn2learn's recipe inside ``meta_loss``; the
batched contender then runs the per-task loop too) and both; ProtoNet on Conv4-64 with 32
Omniglot 5w1s15q episodes per meta-batch.

Reported per contender: tasks (episodes) per second = meta-batch size / median seconds per
meta-step; the peak memory one meta-step adds to what was allocated before it (CUDA: the
allocator's peak; CPU: live tensor bytes counted per operator, see ``_common.LiveTensorBytes``),
also for learn2learn with one backward of the mean query loss instead of one per task; and how
far its float32 meta-gradient (TF32 off on GPUs) is from learn2learn's and from the float64
meta-gradient (learn2learn's recipe on float64 copies of the weights and episodes), as the
largest per-tensor relative difference (``_common.grad_agreement``). ProtoNet's gradients are
compared with BatchNorm on running statistics, where the three formulations are one function
(in training mode they normalise over different batches); its timing runs in training mode.

    python benchmarks/speed.py --device cuda                               # a GPU: a few minutes
    OMP_NUM_THREADS=2 python benchmarks/speed.py --device cpu --threads 2  # 2 CPU cores: ~10 min

Prints a table and writes ``benchmarks/results/speed_<device>.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from _common import (PEAK_MEMORY_MEASURE, batch_to, fixture, grad_agreement, hardware, interleaved_times, median,
                     peak_step_bytes)
from lightmeta.classification import ClassificationTasks, ClassImages
from lightmeta.episodes import EpisodeSpec, TaskBatch
from lightmeta.gradient import GradientMetaLearner, param_key
from lightmeta.meta_learner import MetaLearner
from lightmeta.registry import ALGORITHMS
from lightmeta.task_info import TaskInfo

RESULTS = Path(__file__).resolve().parent / "results"
CONTENDERS = ("ours_batched", "ours_sequential", "learn2learn")
#: MAML's Omniglot backbone (configs/maml/omniglot_5w1s.yaml)
CONV4_OMNIGLOT = {"name": "conv4", "filters": 64, "pool": "stride", "global_pool": True, "init": "maml"}
OMNIGLOT_5W1S = EpisodeSpec(5, 1, 15)
#: Tolerance the smoke test holds the gradient agreement to (float32, relative).
GRAD_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Case:
    """One benchmark setting: algorithm, backbone, episodes and meta-batch."""

    name: str
    title: str
    algorithm: str
    params: dict[str, Any]
    model: dict[str, Any]
    data: Literal["omniglot", "synthetic84"]
    spec: EpisodeSpec
    meta_batch: int
    unit: str = "tasks"
    #: "train": gradients compared on the timed step; "eval": on a step with BatchNorm on
    #: (reset) running statistics, where differently batched formulations are one function
    grad_check: Literal["train", "eval"] = "train"


CASES: tuple[Case, ...] = (
    Case("maml2-omniglot", "MAML 2nd order, Conv4, Omniglot 5w1s, mb 32, 1 step", "maml",
         {"inner_lr": 0.4, "inner_steps": 1, "first_order": False}, CONV4_OMNIGLOT, "omniglot", OMNIGLOT_5W1S, 32),
    Case("maml1-omniglot", "MAML 1st order, Conv4, Omniglot 5w1s, mb 32, 1 step", "maml",
         {"inner_lr": 0.4, "inner_steps": 1, "first_order": True}, CONV4_OMNIGLOT, "omniglot", OMNIGLOT_5W1S, 32),
    Case("maml2-84", "MAML 2nd order, Conv4-32, 84x84 5w1s, mb 4, 5 steps", "maml",
         {"inner_lr": 0.01, "inner_steps": 5, "first_order": False}, {"name": "conv4_32"}, "synthetic84",
         OMNIGLOT_5W1S, 4),
    Case("maml2-84-ckpt", "MAML 2nd order, Conv4-32, 84x84 5w1s, mb 4, 5 steps, checkpoint_inner_steps", "maml",
         {"inner_lr": 0.01, "inner_steps": 5, "first_order": False, "checkpoint_inner_steps": True},
         {"name": "conv4_32"}, "synthetic84", OMNIGLOT_5W1S, 4),
    Case("maml2-84-taskbw", "MAML 2nd order, Conv4-32, 84x84 5w1s, mb 4, 5 steps, task_backward", "maml",
         {"inner_lr": 0.01, "inner_steps": 5, "first_order": False, "task_backward": True},
         {"name": "conv4_32"}, "synthetic84", OMNIGLOT_5W1S, 4),
    Case("maml2-84-ckpt-taskbw", "MAML 2nd order, Conv4-32, 84x84 5w1s, mb 4, 5 steps, checkpoint_inner_steps + "
         "task_backward", "maml", {"inner_lr": 0.01, "inner_steps": 5, "first_order": False,
                                   "checkpoint_inner_steps": True, "task_backward": True},
         {"name": "conv4_32"}, "synthetic84", OMNIGLOT_5W1S, 4),
    Case("anil-omniglot", "ANIL 2nd order, Conv4, Omniglot 5w1s, mb 32, 1 step", "anil",
         {"inner_lr": 0.4, "inner_steps": 1, "first_order": False}, CONV4_OMNIGLOT, "omniglot", OMNIGLOT_5W1S, 32),
    Case("metasgd-omniglot", "Meta-SGD 2nd order, Conv4, Omniglot 5w1s, mb 32, 1 step", "metasgd",
         {"inner_lr": 0.1, "inner_steps": 1, "first_order": False}, CONV4_OMNIGLOT, "omniglot", OMNIGLOT_5W1S, 32),
    Case("protonet-omniglot", "ProtoNet, Conv4-64, Omniglot 5w1s15q, 32 episodes", "protonet",
         {"distance": "euclidean"}, {"name": "conv4", "filters": 64}, "omniglot", OMNIGLOT_5W1S, 32,
         unit="episodes", grad_check="eval"),
)
CASE_NAMES = tuple(c.name for c in CASES)


def unavailable(case: Case) -> str | None:
    """Why this lightmeta build cannot run ``case`` (an option its algorithm lacks), else None."""
    fields = ALGORITHMS.get(case.algorithm).Config.model_fields
    missing = [k for k in case.params if k not in fields]
    return f"n/a (flag missing: {', '.join(missing)})" if missing else None


# ---------------------------------------------------------------------- contenders
@dataclass
class Contender:
    """One implementation of a case's meta-step."""

    step: Callable[[], None]  # one meta-step: meta-loss and backward, gradients into .grad
    modules: list[nn.Module]  # everything whose gradients ``step`` writes
    grads: Callable[[], dict[str, Tensor]]  # the meta-gradient, named as lightmeta's learner names it

    def zero(self) -> None:
        for m in self.modules:
            m.zero_grad(set_to_none=True)

    def timed_step(self) -> None:
        self.zero()
        self.step()


def _named_grads(named: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone() for n, p in named.items()}


def build_learner(case: Case, batch: TaskBatch, batched: bool, device: str) -> MetaLearner:
    """The lightmeta learner of ``case``; gradient learners get ``batched_tasks`` on/off."""
    cls = ALGORITHMS.get(case.algorithm)
    params = dict(case.params)
    if issubclass(cls, GradientMetaLearner):
        params["batched_tasks"] = "on" if batched else "off"
    info = TaskInfo(problem="classification", in_shape=tuple(batch.support_x.shape[2:]),
                    train_ways=case.spec.ways, eval_ways=case.spec.ways)
    return cls(params, model=case.model, task=info).to(device).train()


def lightmeta_contender(learner: MetaLearner, batch: TaskBatch, sequential_contract: bool = False) -> Contender:
    """``learner.meta_loss(batch)`` and backward; ``sequential_contract`` runs the base class's
    per-task ``adapt``/``predict`` loop instead (the sequential path of metric learners)."""
    meta_loss = (lambda b: MetaLearner.meta_loss(learner, b)) if sequential_contract else learner.meta_loss

    def step() -> None:
        meta_loss(batch)[0].backward()

    return Contender(step, [learner], lambda: _named_grads(dict(learner.named_parameters())))


def learn2learn_contender(l2l: Any, case: Case, learner: MetaLearner, batch: TaskBatch,
                          per_task_backward: bool = True) -> Contender:
    """learn2learn's recipe for ``case`` on a copy of ``learner``'s backbone (same weights):
    a backward per task and the gradients divided by the meta-batch size (its examples), or,
    with ``per_task_backward=False``, one backward of the mean query loss (holding every task's
    graph at once, as lightmeta's loop and tests/test_maml.py do)."""
    ref = copy.deepcopy(learner.model)
    names = {f"model.{n}": p for n, p in ref.named_parameters()}
    if case.algorithm == "protonet":
        def task_loss(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
            z = ref(torch.cat([support_x, query_x]))
            classifier = l2l.nn.PrototypicalClassifier(z[: len(support_x)], support_y)
            return F.cross_entropy(classifier(z[len(support_x):]), query_y)
    else:
        lr, first_order = case.params["inner_lr"], case.params.get("first_order", False)
        body: nn.Module | None = None
        if case.algorithm == "maml":
            wrapper = l2l.algorithms.MAML(ref, lr=lr, first_order=first_order)
        elif case.algorithm == "anil":
            wrapper, body = l2l.algorithms.MAML(ref.head, lr=lr, first_order=first_order), ref.features
        elif case.algorithm == "metasgd":
            wrapper = l2l.algorithms.MetaSGD(ref, lr=lr, first_order=first_order)
            names.update({f"inner_lrs.{param_key(n)}": rate
                          for (n, _), rate in zip(ref.named_parameters(), wrapper.lrs)})
        else:
            raise ValueError(f"no learn2learn counterpart for algorithm '{case.algorithm}'")
        steps = case.params.get("inner_steps", 1)

        def task_loss(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
            clone = wrapper.clone()
            if body is not None:
                support_x, query_x = body(support_x), body(query_x)
            for _ in range(steps):
                clone.adapt(F.cross_entropy(clone(support_x), support_y))
            return F.cross_entropy(clone(query_x), query_y)

    def step() -> None:
        if not per_task_backward:
            losses = [task_loss(t.support_x, t.support_y, t.query_x, t.query_y) for t in batch.tasks()]
            (sum(losses) / len(batch)).backward()
            return
        for task in batch.tasks():
            task_loss(task.support_x, task.support_y, task.query_x, task.query_y).backward()
        for p in names.values():
            if p.grad is not None:
                p.grad.mul_(1.0 / len(batch))

    modules: list[nn.Module] = [ref] + ([wrapper] if case.algorithm == "metasgd" else [])
    return Contender(step, modules, lambda: _named_grads(names))


def contenders(case: Case, batch: TaskBatch, device: str, l2l: Any) -> dict[str, Contender]:
    """The three implementations of ``case``, all starting from the same weights, and two more
    of learn2learn's: ``learn2learn_one_backward`` (measured for memory only) and
    ``learn2learn_float64`` (the same weights and episodes in float64: the accuracy reference)."""
    torch.manual_seed(0)
    batched = build_learner(case, batch, True, device)
    sequential = build_learner(case, batch, False, device)
    sequential.load_state_dict(batched.state_dict())
    exact = build_learner(case, batch, False, device)
    exact.load_state_dict(batched.state_dict())
    batch64 = TaskBatch(batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y,
                        batch.spec, batch.task_ids)
    metric = not isinstance(batched, GradientMetaLearner)
    return {
        "ours_batched": lightmeta_contender(batched, batch),
        "ours_sequential": lightmeta_contender(sequential, batch, sequential_contract=metric),
        "learn2learn": learn2learn_contender(l2l, case, batched, batch),
        "learn2learn_one_backward": learn2learn_contender(l2l, case, batched, batch, per_task_backward=False),
        "learn2learn_float64": learn2learn_contender(l2l, case, exact.double(), batch64),
    }


def gradients(contender: Contender, mode: Literal["train", "eval"]) -> dict[str, Tensor]:
    """The meta-gradient of one step; ``eval``: with every BatchNorm on freshly reset running
    statistics (so all contenders see the same normalisation), training mode restored after."""
    if mode == "eval":
        for m in contender.modules:
            m.eval()
            for bn in m.modules():
                if isinstance(bn, _BatchNorm):
                    bn.reset_running_stats()
    try:
        contender.timed_step()
        return contender.grads()
    finally:
        for m in contender.modules:
            m.train()


# ---------------------------------------------------------------------- running
def run_case(case: Case, sampler: ClassificationTasks, device: str, repeats: int, warmup: int, l2l: Any) -> dict[str, Any]:
    """Time, measure and cross-check the three contenders of ``case``; a JSON-ready dict."""
    out: dict[str, Any] = {"case": case.name, "title": case.title, "algorithm": case.algorithm, "params": case.params,
                           "model": case.model, "episode": asdict(case.spec), "meta_batch": case.meta_batch,
                           "unit": case.unit, "grad_check": case.grad_check}
    reason = unavailable(case)
    if reason is not None:
        return {**out, "status": reason}
    batch = batch_to(sampler.sample("train", list(range(case.meta_batch)), seed=0), device)
    out["input_shape"] = list(batch.support_x.shape[2:])
    impls = contenders(case, batch, device, l2l)
    one_backward, exact = impls.pop("learn2learn_one_backward"), impls.pop("learn2learn_float64")
    times = interleaved_times({name: c.timed_step for name, c in impls.items()}, repeats, warmup, device)
    rows: dict[str, dict[str, Any]] = {}
    grads: dict[str, dict[str, Tensor]] = {}
    for name, c in impls.items():
        c.zero()
        peak = peak_step_bytes(c.step, device)
        grads[name] = c.grads() if case.grad_check == "train" else gradients(c, "eval")
        seconds = median(times[name])
        rows[name] = {"seconds": times[name], "median_s": seconds, "per_s": case.meta_batch / seconds, "peak_bytes": peak}
        c.zero()
    one_backward.zero()
    rows["learn2learn"]["peak_bytes_one_backward"] = peak_step_bytes(one_backward.step, device)
    one_backward.zero()
    exact_grads = gradients(exact, case.grad_check)
    exact.zero()
    for name, row in rows.items():
        row["grad_vs_float64"] = grad_agreement(grads[name], exact_grads)
    reference = rows["learn2learn"]
    for name in ("ours_batched", "ours_sequential"):
        rows[name]["speedup_vs_learn2learn"] = reference["median_s"] / rows[name]["median_s"]
        rows[name]["memory_vs_learn2learn"] = rows[name]["peak_bytes"] / reference["peak_bytes"]
        rows[name]["memory_vs_learn2learn_one_backward"] = rows[name]["peak_bytes"] / reference["peak_bytes_one_backward"]
        rows[name]["grad_vs_learn2learn"] = grad_agreement(grads[name], grads["learn2learn"])
    return {**out, "status": "ok", "contenders": rows}


def omniglot_sampler(root: str, cache_dir: str | None, spec: EpisodeSpec) -> ClassificationTasks:
    """Real Omniglot (28x28, Vinyals split, rotated training classes) episodes."""
    from lightmeta.datamodules.omniglot import OmniglotDataModule

    params: dict[str, Any] = {"root": root}
    if cache_dir:
        params["cache_dir"] = cache_dir
    return ClassificationTasks(OmniglotDataModule(params).load_classes(), spec, spec, rotations="train")


def class_tasks(images: Tensor, classes: int, per_class: int, train: int, spec: EpisodeSpec) -> ClassificationTasks:
    """Episodes from images stored class after class: classes ``0..train-1`` for meta-training,
    the rest split between validation and test (which the sampler requires)."""
    splits = {"train": range(train), "val": range(train, train + (classes - train) // 2),
              "test": range(train + (classes - train) // 2, classes)}
    data = ClassImages.from_counts(images, [per_class] * classes, {k: list(v) for k, v in splits.items()})
    return ClassificationTasks(data, spec, spec)


def synthetic84_sampler(spec: EpisodeSpec, classes: int, per_class: int) -> ClassificationTasks:
    """Episodes of random 3x84x84 uint8 images, ``classes`` x ``per_class``; all but ``2 * ways``
    classes (the validation and test splits the sampler requires) for meta-training."""
    return class_tasks(fixture(classes, per_class, 84), classes, per_class, classes - 2 * spec.ways, spec)


# ---------------------------------------------------------------------- reporting
def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f}" if nbytes >= 2**20 else f"{nbytes / 2**20:.2f}"


def table(cases: list[dict[str, Any]]) -> str:
    """The results as a Markdown table (gradient columns: the largest per-tensor relative
    difference, see ``_common.grad_agreement``)."""
    lines = [
        "| case | ours batched | ours sequential | learn2learn | speed-up vs l2l, batched / sequential "
        "| peak MB batched / sequential / l2l (l2l one backward) | memory batched / l2l "
        "| grad diff vs l2l, batched / sequential | grad diff vs float64, batched / sequential / l2l |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        if c["status"] != "ok":
            lines.append(f"| {c['title']} | {c['status']} | | | | | | | |")
            continue
        b, s, l2l = (c["contenders"][k] for k in CONTENDERS)
        lines.append(
            f"| {c['title']} | {b['per_s']:,.1f} {c['unit']}/s | {s['per_s']:,.1f} | {l2l['per_s']:,.1f} "
            f"| {b['speedup_vs_learn2learn']:.2f}x / {s['speedup_vs_learn2learn']:.2f}x "
            f"| {_mb(b['peak_bytes'])} / {_mb(s['peak_bytes'])} / {_mb(l2l['peak_bytes'])} ({_mb(l2l['peak_bytes_one_backward'])}) "
            f"| {b['memory_vs_learn2learn']:.2f} "
            f"| {b['grad_vs_learn2learn']['worst_tensor']:.0e} / {s['grad_vs_learn2learn']['worst_tensor']:.0e} "
            f"| {' / '.join(format(r['grad_vs_float64']['worst_tensor'], '.0e') for r in (b, s, l2l))} |"
        )
    return "\n".join(lines)


def git_state() -> dict[str, Any] | None:
    """The commit of the code measured and the files changed since (``None`` outside a git checkout)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "lightmeta", "algorithms", "datamodules", "benchmarks"],
                                 cwd=root, capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": head, "uncommitted": [line[3:] for line in changed]}


def environment(device: str, argv: list[str]) -> dict[str, Any]:
    """What the figures depend on besides the code: hardware, versions, threads, load."""
    import learn2learn

    return {
        "command": shlex.join(["python", *argv]),
        "device": device, "device_name": hardware(device), "torch": torch.__version__,
        "learn2learn": learn2learn.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "fp32_precision": {"matmul": torch.backends.cuda.matmul.fp32_precision, "conv": torch.backends.cudnn.conv.fp32_precision}
        if torch.device(device).type == "cuda" else None,
        "peak_memory_measure": PEAK_MEMORY_MEASURE[torch.device(device).type], "git": git_state(),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=None, help="timed meta-steps per contender (default: 20 on a GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed meta-steps per contender first (default: 3 on a GPU, 1 on CPU)")
    p.add_argument("--quick", action="store_true", help="1 timed step, no warm-up: a smoke test, not a measurement")
    p.add_argument("--cases", default=",".join(CASE_NAMES), help=f"comma-separated subset of {', '.join(CASE_NAMES)}")
    p.add_argument("--data", default="../shared/data/omniglot", help="Omniglot root (images_background.zip, images_evaluation.zip)")
    p.add_argument("--cache-dir", default=None, help="decoded Omniglot cache folder (default: lightmeta's)")
    p.add_argument("--synthetic-classes", type=int, default=64, help="classes of the random 84x84 fixture")
    p.add_argument("--synthetic-per-class", type=int, default=20, help="images per class of the random 84x84 fixture")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions on GPUs (default: full float32)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/speed_<device type>.json)")
    args = p.parse_args(argv)
    chosen = [c for c in args.cases.split(",") if c]
    unknown = [c for c in chosen if c not in CASE_NAMES]
    if unknown or not chosen:
        p.error(f"--cases: unknown case(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(CASE_NAMES)}")
    args.cases = chosen
    spec = OMNIGLOT_5W1S
    if args.synthetic_classes < 3 * spec.ways or args.synthetic_per_class < spec.shots + spec.queries:
        p.error(f"--synthetic-classes must be >= {3 * spec.ways} (meta-training, validation and test splits of "
                f"{spec.ways} ways) and --synthetic-per-class >= {spec.shots + spec.queries} (shots + queries)")
    gpu = torch.device(args.device).type == "cuda"
    if args.quick:
        args.repeats, args.warmup = args.repeats or 1, args.warmup or 0
    args.repeats = args.repeats or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    return args


def main(argv: list[str] | None = None, cases: tuple[Case, ...] = CASES,
         samplers: dict[str, ClassificationTasks] | None = None) -> dict[str, Any]:
    """Run the ``--cases`` chosen among ``cases``; ``samplers`` (by ``Case.data``) replaces
    the real and synthetic data (the smoke test passes tiny ones). Returns what it writes."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda":  # TF32 convolutions are torch's default on GPUs
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32" if args.tf32 else "ieee"
    import learn2learn as l2l

    cases = tuple(c for c in cases if c.name in args.cases)
    if samplers is None:
        samplers = {}
        if any(c.data == "omniglot" for c in cases):
            samplers["omniglot"] = omniglot_sampler(args.data, args.cache_dir, OMNIGLOT_5W1S)
        if any(c.data == "synthetic84" for c in cases):
            samplers["synthetic84"] = synthetic84_sampler(OMNIGLOT_5W1S, args.synthetic_classes, args.synthetic_per_class)
    env = environment(args.device, [os.path.relpath(__file__), *argv])
    load_before = os.getloadavg()
    started = time.perf_counter()
    results = []
    for case in cases:
        t = time.perf_counter()
        try:
            results.append(run_case(case, samplers[case.data], args.device, args.repeats, args.warmup, l2l))
        except Exception as exc:  # one broken case must not cost the others' figures (a GPU run is rationed)
            traceback.print_exc()
            results.append({"case": case.name, "title": case.title, "status": f"error: {type(exc).__name__}: {exc}"})
        print(f"[{time.perf_counter() - started:6.0f}s] {case.name}: {results[-1]['status']} "
              f"({time.perf_counter() - t:.0f}s)", file=sys.stderr, flush=True)
    result = {"benchmark": "speed", **env, "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
              "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
              "wall_s": time.perf_counter() - started, "cases": results}
    out = args.out or RESULTS / f"speed_{torch.device(args.device).type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nMeta-training speed on {env['device_name']} (torch {env['torch']}, learn2learn {env['learn2learn']}, "
          f"{args.repeats} timed steps after {args.warmup} warm-up, median; load average "
          f"{load_before[0]:.1f} before, {result['load_average_after'][0]:.1f} after)\n")
    print(table(results))
    print(f"\npeak memory: {env['peak_memory_measure']}\nwrote {out}")
    return result


if __name__ == "__main__":
    main()

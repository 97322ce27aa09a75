"""MAML++: multi-step loss weights, learned per-step rates (LSLR), per-step BatchNorm statistics
and weights (BNRS/BNWB), derivative-order annealing, and reduction to MAML with all fixes off."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightmeta import EpisodeSpec, TaskBatch
from lightmeta.algorithms.mamlpp import MAMLPlusPlus
from lightmeta.gradient import param_key
from lightmeta.registry import ALGORITHMS

BN_MLP = {"name": "mlp", "hidden": [6, 5], "batch_norm": True}
MLP = {"name": "mlp", "hidden": [8, 8]}
TASK = {"problem": "classification", "in_shape": [4], "train_ways": 3, "eval_ways": 3}
ALL_OFF = {"multi_step_loss": False, "learn_inner_lr": False, "per_step_bn_stats": False,
           "per_step_bn_weights": False, "lr_schedule": "constant", "batch_norm": "transductive"}


def _batch(tasks: int = 2, ways: int = 3) -> TaskBatch:
    g = torch.Generator().manual_seed(7)
    sx = torch.randn(tasks, ways * 2, 4, generator=g, dtype=torch.float64)
    qx = torch.randn(tasks, ways * 3, 4, generator=g, dtype=torch.float64)
    sy = torch.arange(ways).repeat_interleave(2).expand(tasks, -1)
    qy = torch.arange(ways).repeat_interleave(3).expand(tasks, -1)
    return TaskBatch(sx, sy, qx, qy, EpisodeSpec(ways, 2, 3), torch.arange(tasks))


def _learner(name: str = "mamlpp", model: dict = MLP, **params):
    learner = ALGORITHMS.get(name)(params, model=model, task=TASK).double()
    learner.train()
    return learner


def _grads(learner, batch: TaskBatch) -> dict[str, Tensor]:
    learner.zero_grad()
    learner.meta_loss(batch)[0].backward()
    return {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


# ---------------------------------------------------------------------- MSL
def test_msl_weights_sum_to_one_and_anneal_to_the_last_step() -> None:
    learner = _learner(inner_steps=5, msl_epochs=10)
    rows = torch.stack([learner.msl_weights(e) for e in range(14)])
    assert torch.allclose(rows.sum(1), torch.ones(14))
    assert torch.all(rows >= 0)
    assert torch.allclose(rows[0], torch.full((5,), 0.2))  # uniform at the start
    assert torch.all(rows[1:, -1] >= rows[:-1, -1]) and torch.all(rows[1:, :-1] <= rows[:-1, :-1])
    assert rows[5, -1] > rows[1, -1] > rows[0, -1]  # really annealing, not constant
    assert torch.equal(rows[10:], torch.tensor([[0.0, 0, 0, 0, 1]]).expand(4, -1))  # then the final step only
    off = _learner(inner_steps=5, multi_step_loss=False)
    assert torch.equal(off.msl_weights(0), torch.tensor([0.0, 0, 0, 0, 1]))


def test_msl_objective_is_the_weighted_sum_of_per_step_query_losses() -> None:
    learner = _learner(inner_steps=3, msl_epochs=4, learn_inner_lr=False, inner_lr=0.4)
    batch = _batch()
    loss, logs = learner.meta_loss(batch)
    weights = learner.msl_weights(0)
    per_task, finals = [], []
    for task in batch.tasks():  # independent unroll with plain SGD (LSLR off)
        fast = dict(learner.model.named_parameters())
        losses = []
        for _ in range(3):
            g = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(learner.model, fast, (task.support_x,)),
                                                    task.support_y), list(fast.values()), create_graph=True)
            fast = {n: p - 0.4 * gi for (n, p), gi in zip(fast.items(), g)}
            losses.append(F.cross_entropy(torch.func.functional_call(learner.model, fast, (task.query_x,)), task.query_y))
        per_task.append((weights.double() * torch.stack(losses)).sum())
        finals.append(losses[-1])
    assert torch.allclose(loss, torch.stack(per_task).mean(), atol=1e-12)
    assert torch.allclose(logs["loss"], torch.stack(finals).mean(), atol=1e-12)  # logged: the final step
    assert torch.allclose(logs["msl_loss"], loss, atol=1e-12)


# ---------------------------------------------------------------------- LSLR
def test_lslr_rates_are_per_layer_per_step_and_receive_exact_gradients() -> None:
    learner = _learner(inner_steps=3, inner_lr=0.3, multi_step_loss=True, msl_epochs=5)
    names = [n for n, _ in learner.model.named_parameters()]
    assert sorted(learner.inner_lrs.keys()) == sorted(param_key(n) for n in names)
    assert all(r.shape == (3,) and torch.allclose(r, torch.full_like(r, 0.3)) for r in learner.inner_lrs.values())
    batch = _batch()
    grads = _grads(learner, batch)
    for n in names:
        g = grads[f"inner_lrs.{param_key(n)}"]
        assert torch.isfinite(g).all() and torch.all(g != 0), n
    # finite differences on two entries (first and last step of the first layer)
    key = param_key(names[0])
    for step in (0, 2):
        rate = learner.inner_lrs[key]
        with torch.no_grad():
            rate[step] += 1e-6
            up = learner.meta_loss(batch)[0]
            rate[step] -= 2e-6
            down = learner.meta_loss(batch)[0]
            rate[step] += 1e-6
        fd = (up - down) / 2e-6
        assert abs(float(fd) - float(grads[f"inner_lrs.{key}"][step])) <= 1e-6 * max(1.0, abs(float(fd)))


# ---------------------------------------------------------------------- per-step BatchNorm
def test_per_step_batch_norm_keeps_separate_running_statistics() -> None:
    learner = _learner(model=BN_MLP, inner_steps=2, msl_epochs=5)  # inductive BN by default
    assert learner.config.batch_norm == "inductive" and len(learner.step_bn_stats) == 3
    bn0 = learner.model.features[2]
    own_mean = bn0.running_mean.clone()
    batch = _batch(tasks=1)
    task = batch.task(0)
    learner.meta_loss(batch)

    def stat(k: int, name: str) -> Tensor:
        return getattr(learner.step_bn_stats[k], param_key(f"features.2.{name}"))

    # set 0 saw exactly one forward: the support pass at the meta-parameters
    pre = learner.model.features[1](task.support_x.flatten(1))
    assert torch.allclose(stat(0, "running_mean"), bn0.momentum * pre.mean(0), atol=1e-12)
    # set k counts the passes of weights with k updates: support(0); support(1) + MSL query(1); query(2)
    assert [int(stat(k, "num_batches_tracked")) for k in range(3)] == [1, 2, 1]
    means = [stat(k, "running_mean") for k in range(3)]
    assert not torch.allclose(means[0], means[1]) and not torch.allclose(means[1], means[2])
    # the backbone's own BatchNorm buffers are not used
    assert torch.equal(bn0.running_mean, own_mean) and int(bn0.num_batches_tracked) == 0

    # evaluation normalises the weights after k updates with set k, and only with it
    learner.eval()
    params = {n: p.detach() for n, p in learner.model.named_parameters()}
    with torch.no_grad():
        out = [learner.forward_with(params, task.query_x, k) for k in range(3)]
        stat(1, "running_mean").add_(1.0)
        changed = [learner.forward_with(params, task.query_x, k) for k in range(3)]
    assert not torch.allclose(out[0], out[1])
    assert torch.equal(changed[0], out[0]) and torch.equal(changed[2], out[2])
    assert not torch.allclose(changed[1], out[1])
    with torch.no_grad():  # steps beyond inner_steps reuse the last set
        assert torch.equal(learner.forward_with(params, task.query_x, 7), out[2])


def test_per_step_batch_norm_weights_replace_the_backbone_affine() -> None:
    learner = _learner(model=BN_MLP, inner_steps=2, lr_schedule="constant")
    bn_affine = [n for n in dict(learner.model.named_parameters()) if n.startswith(("features.2.", "features.5."))]
    assert bn_affine and all(not dict(learner.model.named_parameters())[n].requires_grad for n in bn_affine)
    assert not set(bn_affine) & set(learner.inner_param_names())  # not adapted in the inner loop
    grads = _grads(learner, _batch())
    for k in range(3):
        for n in bn_affine:
            g = grads[f"step_bn_affine.{k}.{param_key(n)}"]
            assert torch.isfinite(g).all() and g.abs().sum() > 0, (k, n)
    opt = learner.configure_optimizers()
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert all(id(p) in in_opt for p in learner.step_bn_affine.parameters())


# ---------------------------------------------------------------------- annealing and reduction to MAML
def test_derivative_order_annealing(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _batch()
    base = _learner(inner_steps=2, inner_lr=0.5, first_order_epochs=3, **ALL_OFF)
    grads = {}
    for epoch in (0, 2, 3):
        monkeypatch.setattr(MAMLPlusPlus, "current_epoch", property(lambda self, e=epoch: e))
        grads[epoch] = _grads(copy.deepcopy(base), batch)
    monkeypatch.undo()
    fo = _grads(_copy_into("fomaml", base), batch)
    so = _grads(_copy_into("maml", base), batch)
    for n in fo:
        assert _rel(grads[0][n], fo[n]) < 1e-10 and _rel(grads[2][n], fo[n]) < 1e-10
        assert _rel(grads[3][n], so[n]) < 1e-10
    assert any(_rel(fo[n], so[n]) > 1e-3 for n in fo)


def _copy_into(name: str, source) -> object:
    """A learner of another algorithm with ``source``'s network weights and inner settings."""
    target = _learner(name, model=source.hparams["model"], inner_steps=source.config.inner_steps,
                      inner_lr=source.config.inner_lr)
    target.model.load_state_dict(source.model.state_dict())
    return target


def test_all_fixes_off_is_maml() -> None:
    batch = _batch()
    pp = _learner(model=BN_MLP, inner_steps=2, inner_lr=0.3, **ALL_OFF)
    maml = _copy_into("maml", pp)
    g_pp, g_maml = _grads(pp, batch), _grads(maml, batch)
    assert g_pp.keys() == g_maml.keys()
    # compared as one vector: a bias right before BatchNorm has an analytically zero gradient,
    # whose float noise differs between any two evaluation orders
    flat = [torch.cat([g[n].flatten() for n in sorted(g)]) for g in (g_pp, g_maml)]
    assert _rel(flat[0], flat[1]) < 1e-10

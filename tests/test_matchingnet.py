"""Matching Networks: logits against a hand-computed reference, and the full-context embeddings."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightmeta.episodes import EpisodeSpec
from lightmeta.registry import ALGORITHMS
from lightmeta.task_info import TaskInfo

IDENTITY = {"name": "mlp", "hidden": []}


def make(features: int, **algo):
    info = TaskInfo(problem="classification", in_shape=(features,), train_ways=3, eval_ways=3)
    return ALGORITHMS.get("matchingnet")(algo, model=IDENTITY, task=info).double()


def reference_log_probs(
    support: list[list[float]], labels: list[int], query: list[list[float]], ways: int, scale: float = 1.0
) -> np.ndarray:
    """Cosine similarities (times ``scale``), softmax over the support set, attention-weighted
    label sum, log."""
    out = np.zeros((len(query), ways))
    for a, q in enumerate(query):
        sims = []
        for s in support:
            dot = sum(x * y for x, y in zip(q, s))
            sims.append(dot / (math.sqrt(sum(x * x for x in q)) * math.sqrt(sum(y * y for y in s))))
        weights = [math.exp(scale * v) for v in sims]
        total = sum(weights)
        for k in range(ways):
            out[a, k] = math.log(max(sum(w for w, y in zip(weights, labels) if y == k) / total, 1e-8))
    return out


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_logits_equal_a_hand_computed_reference(scale: float) -> None:
    support = [[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [3.0, 0.0, 0.0], [-1.0, 2.0, 1.0], [0.5, 0.5, 0.5], [2.0, -2.0, 1.0]]
    labels = [2, 0, 1, 0, 2, 1]
    query = [[0.2, -0.3, 0.1], [1.0, 1.0, 1.0], [-2.0, 0.5, 3.0], [4.0, -1.0, 0.0]]
    learner = make(3, cosine_scale=scale)
    spec = EpisodeSpec(ways=3, shots=2, queries=1)
    state = learner.adapt(torch.tensor(support, dtype=torch.float64), torch.tensor(labels), spec)
    logits = learner.predict(state, torch.tensor(query, dtype=torch.float64))
    expected = reference_log_probs(support, labels, query, 3, scale)
    np.testing.assert_allclose(logits.detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    # the logits are log-probabilities: cross-entropy on them is the paper's NLL
    np.testing.assert_allclose(logits.exp().sum(-1).detach().numpy(), 1.0, rtol=1e-12)


def reference_fce(learner, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """The paper's g and f, one query at a time with explicit loops (same weights)."""
    fce = learner.fce
    lstm = fce.support_lstm
    d = support.shape[1]

    def cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
        gates = w_ih @ x + b_ih + w_hh @ h + b_hh
        i, f, g, o = gates.split(d)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def run(seq, suffix):
        h = c = torch.zeros(d, dtype=seq.dtype)
        outs = []
        for x in seq:
            h, c = cell(x, h, c, *(getattr(lstm, f"{n}_l0{suffix}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
            outs.append(h)
        return outs

    fwd = run(support, "")
    bwd = run(support.flip(0), "_reverse")[::-1]
    g = torch.stack([fwd[i] + bwd[i] + support[i] for i in range(len(support))])
    out = []
    cellp = fce.query_cell
    for x in query:
        h = c = r = torch.zeros(d, dtype=x.dtype)
        for _ in range(fce.steps):
            h, c = cell(x, h + r, c, cellp.weight_ih, cellp.weight_hh, cellp.bias_ih, cellp.bias_hh)
            h = h + x
            a = torch.softmax(g @ h, 0)
            r = a @ g
        out.append(h)
    return g, torch.stack(out)


def test_full_context_embeddings_match_a_loop_reference_and_learn() -> None:
    torch.manual_seed(0)
    learner = make(4, fce=True, fce_steps=3)
    spec = EpisodeSpec(ways=3, shots=2, queries=1)
    support = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    query = torch.randn(3, 4, dtype=torch.float64)
    state = learner.adapt(support, labels, spec)
    logits = learner.predict(state, query)
    g, f = reference_fce(learner, support, query)
    torch.testing.assert_close(state[0][0], g, rtol=1e-10, atol=1e-12)
    expected = reference_log_probs(g.tolist(), labels.tolist(), f.tolist(), 3)
    np.testing.assert_allclose(logits.detach().numpy(), expected, rtol=1e-9, atol=1e-12)
    # the embeddings depend on the whole support set (its order included), unlike fce=false
    permuted = learner.predict(learner.adapt(support[[1, 0, 2, 3, 4, 5]], labels[[1, 0, 2, 3, 4, 5]], spec), query)
    assert not torch.allclose(permuted, logits)
    logits.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.fce.parameters())


def test_learned_temperature_is_a_parameter_that_gets_gradients() -> None:
    learner = make(3, cosine_scale=10.0, learn_scale=True)
    assert any(p is learner.scale for p in learner.parameters())
    spec = EpisodeSpec(ways=3, shots=1, queries=1)
    state = learner.adapt(torch.randn(3, 3, dtype=torch.float64), torch.arange(3), spec)
    torch.nn.functional.cross_entropy(learner.predict(state, torch.randn(3, 3, dtype=torch.float64)), torch.arange(3)).backward()
    assert learner.scale.grad is not None and learner.scale.grad.abs() > 0
    fixed = make(3)
    assert all(p is not fixed.scale for p in fixed.parameters())

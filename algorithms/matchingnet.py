"""Matching Networks: Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra (2016), "Matching
Networks for One Shot Learning", NeurIPS. https://arxiv.org/abs/1606.04080

A query ``x`` is classified by attention over the support set (paper eq. 1-2):

    P(y = k | x, S) = sum_i a(x, x_i) [y_i = k],   a(x, x_i) = softmax_i(cos(f(x), g(x_i)))

The head returns ``log P`` as logits, so the base class's cross-entropy is the paper's
negative log-likelihood (``log_softmax(log P) = log P`` since ``P`` sums to one); ``P`` is
clamped at ``1e-8`` below so a class with no attention mass has a finite loss.

``cosine_scale`` multiplies the cosines before the softmax (1.0, fixed: the paper). A larger,
learned temperature (``cosine_scale: 10``, ``learn_scale: true``, the metric scaling of Oreshkin
et al. 2018) sharpens the attention, which the paper's unit-temperature softmax over values in
[-1, 1] cannot do; it trains much faster on many-way episodes.

``fce: true`` adds the paper's full-context embeddings (appendix A.2): ``g`` runs a
bidirectional LSTM over the support embeddings ``g'(x_i)`` and adds both directions' outputs
and the skip connection; ``f`` runs ``fce_steps`` steps of an attention LSTM on the query
embedding ``f'(x)``, each step reading the support set with content-based attention:

    h_k, c_k = LSTM(f'(x), [h_{k-1} + r_{k-1}], c_{k-1});  h_k <- h_k + f'(x)
    r_k = sum_i softmax_i(h_k . g(x_i)) g(x_i)

(the paper concatenates ``h`` and ``r`` into the LSTM state; like most reimplementations we
add them, which keeps the state width equal to the embedding width). With ``fce: false``,
``f = g`` is the backbone, as in the paper's Omniglot experiments.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lightmeta.episodes import EpisodeSpec
from lightmeta.meta_learner import AlgorithmConfig
from lightmeta.metric import MetricMetaLearner
from lightmeta.registry import register_algorithm

MIN_PROB = 1e-8


class MatchingNetConfig(AlgorithmConfig):
    """Matching Networks hyperparameters (Adam 1e-3)."""

    fce: bool = Field(default=False, description="full-context embeddings: BiLSTM over support, attention LSTM for queries")
    fce_steps: int = Field(default=5, ge=1, description="processing steps of the query attention LSTM (fce only)")
    cosine_scale: float = Field(default=1.0, gt=0, description="temperature multiplying the cosines before the attention softmax (1: the paper)")
    learn_scale: bool = Field(default=False, description="learn the attention temperature with the backbone")


def matching_log_probs(
    query: Tensor, support: Tensor, support_y: Tensor, ways: int, scale: Tensor | float = 1.0
) -> Tensor:
    """``log sum_i softmax_i(scale * cos(q, s_i)) onehot(y_i)`` for queries ``[T, Q, D]``,
    support ``[T, M, D]``, labels ``[T, M]`` -> ``[T, Q, ways]``."""
    cosine = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2)  # [T, Q, M]
    attention = (scale * cosine).softmax(-1)
    probs = attention @ F.one_hot(support_y, ways).to(attention.dtype)
    return probs.clamp(min=MIN_PROB).log()


class FullContextEmbedding(nn.Module):
    """The paper's ``g`` (bidirectional LSTM over the support set) and ``f`` (attention LSTM)."""

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.query_cell = nn.LSTMCell(dim, dim)

    def support(self, z: Tensor) -> Tensor:
        """``g(x_i) = forward_i + backward_i + g'(x_i)`` over the support sequence ``[T, M, D]``."""
        out, _ = self.support_lstm(z)
        forward, backward = out.chunk(2, dim=-1)
        return forward + backward + z

    def query(self, z: Tensor, support: Tensor) -> Tensor:
        """``f(x)`` after ``steps`` attention-LSTM steps; ``z [T, Q, D]``, ``support [T, M, D]``."""
        t, q, d = z.shape
        flat = z.reshape(t * q, d)
        h = torch.zeros_like(flat)
        c = torch.zeros_like(flat)
        r = torch.zeros_like(flat)
        for _ in range(self.steps):
            h, c = self.query_cell(flat, (h + r, c))
            h = h + flat
            attention = (h.view(t, q, d) @ support.transpose(1, 2)).softmax(-1)  # [T, Q, M]
            r = (attention @ support).reshape(t * q, d)
        return h.view(t, q, d)


@register_algorithm("matchingnet")
class MatchingNet(MetricMetaLearner):
    """Cosine attention over the support set, optionally with full-context embeddings."""

    Config = MatchingNetConfig
    config: MatchingNetConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fce = FullContextEmbedding(self.model.feature_dim, self.config.fce_steps) if self.config.fce else None
        self.add_logit_scale(self.config.cosine_scale, self.config.learn_scale)

    def fit_head(self, support_z: Tensor, support_y: Tensor, spec: EpisodeSpec) -> tuple[Tensor, Tensor, int]:
        """The (full-context) support embeddings, their labels and the number of ways."""
        support = support_z.flatten(2)
        if self.fce is not None:
            support = self.fce.support(support)
        return support, support_y, spec.ways

    def head_logits(self, state: tuple[Tensor, Tensor, int], query_z: Tensor) -> Tensor:
        support, support_y, ways = state
        query = query_z.flatten(2)
        if self.fce is not None:
            query = self.fce.query(query, support)
        return matching_log_probs(query, support, support_y, ways, self.scale)

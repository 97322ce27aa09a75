"""Conv4 backbones: the papers' layer stack, feature sizes, heads, functional calls, BatchNorm modes."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightmeta.errors import ConfigError
from lightmeta.models import build_model
from lightmeta.registry import ALGORITHMS, MODELS


@pytest.mark.parametrize(
    ("section", "in_shape", "features"),
    [
        # MAML paper §5.2: "Omniglot images are downsampled to 28x28, so the last hidden layer is 64"
        ({"name": "conv4"}, (1, 28, 28), 64),
        # 84x84 mini-ImageNet: 84 -> 42 -> 21 -> 10 -> 5, ProtoNet's 1600-d embedding
        ({"name": "conv4"}, (3, 84, 84), 64 * 5 * 5),
        # MAML's mini-ImageNet model: 32 filters, 32*5*5 = 800 inputs to the head
        ({"name": "conv4_32"}, (3, 84, 84), 32 * 5 * 5),
        # MAML's Omniglot reference code: stride-2 convs, 28 -> 14 -> 7 -> 4 -> 2
        ({"name": "conv4", "pool": "stride"}, (1, 28, 28), 64 * 2 * 2),
        ({"name": "conv4", "pool": "stride", "global_pool": True}, (1, 28, 28), 64),
    ],
)
def test_feature_dim_and_output_shapes(section: dict, in_shape: tuple[int, ...], features: int) -> None:
    x = torch.randn(3, *in_shape)
    extractor = build_model(section, in_shape, None)
    assert extractor.feature_dim == features
    assert extractor(x).shape == (3, features)
    classifier = build_model(section, in_shape, 7)
    assert classifier.feature_dim == features
    assert classifier(x).shape == (3, 7)
    assert isinstance(classifier.head, nn.Linear) and classifier.head.in_features == features


def test_layer_stack_is_the_papers() -> None:
    """4 x [3x3 conv padding 1, BatchNorm2d, ReLU, 2x2 max-pool] with 64 (conv4) / 32 (conv4_32) filters."""
    for name, filters in (("conv4", 64), ("conv4_32", 32)):
        model = build_model({"name": name}, (3, 84, 84), None)
        kinds = [type(m) for m in model.features]
        assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d] * 4 + [nn.Flatten]
        convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
        assert [c.in_channels for c in convs] == [3, filters, filters, filters]
        assert all(c.out_channels == filters and c.kernel_size == (3, 3) and c.padding == (1, 1)
                   and c.stride == (1, 1) for c in convs)
        pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
        assert all(p.kernel_size == 2 for p in pools)
        assert model.head is None


def test_filters_override_and_32_filter_default_validate() -> None:
    assert MODELS.get("conv4_32").Config().filters == 32
    assert build_model({"name": "conv4", "filters": 32}, (1, 28, 28), None).feature_dim == 32
    with pytest.raises(ValueError, match="filter"):
        build_model({"name": "conv4", "filter": 32}, (1, 28, 28), None)


@pytest.mark.parametrize("in_shape", [(784,), (1, 8, 8)])
def test_bad_input_shapes_fail_with_a_clear_error(in_shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match="in_shape"):
        build_model({"name": "conv4"}, in_shape, None)


def test_maml_init_is_glorot_uniform_with_zero_bias() -> None:
    model = build_model({"name": "conv4", "init": "maml"}, (1, 28, 28), 5)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.5 * bound
            assert torch.count_nonzero(m.bias) == 0


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_functional_call_equals_a_module_holding_the_same_weights(mode: str) -> None:
    model = build_model({"name": "conv4", "filters": 8}, (1, 28, 28), 5)
    getattr(model, mode)()
    twin = copy.deepcopy(model)
    params = {n: p * 1.5 + 0.01 for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.copy_(params[n])
    x = torch.randn(6, 1, 28, 28)
    out = functional_call(model, params, (x,), strict=False)
    torch.testing.assert_close(out, twin(x), rtol=1e-6, atol=1e-6)
    # gradients flow to every functional parameter (what MAML's inner loop differentiates)
    grads = torch.autograd.grad(out.pow(2).sum(), list(params.values()), allow_unused=True)
    names = [n for n, g in zip(params, grads) if g is None or not torch.any(g != 0)]
    assert not names, f"no gradient reached {names}"


def test_transductive_batch_norm_under_the_gradient_learner() -> None:
    """In eval() mode the MAML learner still normalises with batch statistics and leaves the
    running statistics alone (the MAML reference); inductive mode uses the running statistics."""
    maml = ALGORITHMS.get("maml")
    task = {"problem": "classification", "in_shape": (1, 28, 28), "train_ways": 5, "eval_ways": 5}
    learner = maml({"batch_norm": "transductive"}, model={"name": "conv4", "filters": 8}, task=task)
    learner.eval()
    bn = [m for m in learner.model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bn]
    x = torch.randn(10, 1, 28, 28) * 3 + 2
    params = dict(learner.model.named_parameters())
    out = learner.forward_with(params, x)
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bn))
    reference = copy.deepcopy(learner.model).train()  # batch statistics
    torch.testing.assert_close(out, reference(x))
    assert not torch.allclose(out, learner.model(x))  # eval(): running statistics differ

    inductive = maml({"batch_norm": "inductive"}, model={"name": "conv4", "filters": 8}, task=task)
    inductive.load_state_dict(learner.state_dict())
    inductive.eval()
    torch.testing.assert_close(inductive.forward_with(params, x), learner.model(x))

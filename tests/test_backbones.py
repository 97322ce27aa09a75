"""ResNet-12 and WRN-28-10: output shapes on 84x84 and 32x32 images, DropBlock, registry."""
from __future__ import annotations

import pytest
import torch

from lightmeta.errors import ConfigError
from lightmeta.models import build_model
from lightmeta.models.resnet12 import drop_block
from lightmeta.registry import MODELS


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("size", "spatial"), [(84, 5), (32, 2)])
def test_resnet12_shapes(size: int, spatial: int) -> None:
    torch.manual_seed(0)
    model = build_model({"name": "resnet12"}, (3, size, size), None)
    assert model.feature_dim == 640 * spatial * spatial
    x = torch.randn(2, 3, size, size)
    model.train()
    assert model(x).shape == (2, 640 * spatial * spatial)
    pooled = build_model({"name": "resnet12", "global_pool": True}, (3, size, size), 5).eval()
    with torch.no_grad():
        assert pooled(x).shape == (2, 5) and pooled.feature_dim == 640


def test_resnet12_is_the_metaoptnet_size() -> None:
    model = build_model({"name": "resnet12"}, (3, 84, 84), None)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 12 + 4  # 12 3x3 layers and 4 1x1 shortcuts
    assert [b.convs[0].out_channels for b in model.blocks] == [64, 160, 320, 640]
    assert 12_000_000 < n_params(model) < 13_000_000  # MetaOptNet's ResNet-12 has about 12.4M parameters
    assert "resnet12" in MODELS.names() and "wrn" in MODELS.names()


def test_dropblock_drops_square_blocks_and_keeps_the_mean() -> None:
    torch.manual_seed(0)
    x = torch.ones(4, 8, 10, 10)
    out = drop_block(x, gamma=0.02, block=3)
    zero = out == 0
    assert zero.any() and (~zero).any()
    # every zero lies in a 3x3 all-zero square
    z = zero.float()
    squares = (torch.nn.functional.avg_pool2d(z, 3, stride=1) == 1).float()  # top-left corners of all-zero 3x3s
    covered = torch.nn.functional.max_pool2d(torch.nn.functional.pad(squares, [2] * 4), 3, stride=1)
    assert (covered[zero] == 1).all()
    kept = out[~zero]
    torch.testing.assert_close(kept, torch.full_like(kept, x.numel() / (~zero).sum().item()))
    assert torch.equal(drop_block(x, gamma=0.0, block=3), x)


def test_dropblock_ramps_up_in_training_and_is_off_in_eval() -> None:
    from lightmeta.models.resnet12 import ResBlock

    torch.manual_seed(0)
    x = torch.randn(8, 4, 20, 20)

    def zeros(ramp: int) -> int:
        block = ResBlock(4, 16, 0.1, drop_rate=0.5, dropblock=True, block=3, ramp=ramp)
        with torch.no_grad():
            block.eval()
            reference = block(x)
            block.train()
            out = block(x)
        assert (reference != 0).all()  # leaky ReLU: no exact zeros without DropBlock
        return int((out == 0).sum())

    assert zeros(ramp=10**9) == 0  # start of the ramp: rate ~ 0
    assert zeros(ramp=1) > 0  # ramp done: rate = drop_rate


def test_wrn_28_10_shapes_and_size() -> None:
    torch.manual_seed(0)
    model = build_model({"name": "wrn"}, (3, 32, 32), None)
    assert model.feature_dim == 640
    assert 36_000_000 < n_params(model) < 37_000_000  # WRN-28-10: 36.5M parameters (Zagoruyko & Komodakis, Table 4)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 640)


def test_wrn_on_84x84_and_head() -> None:
    torch.manual_seed(0)
    small = build_model({"name": "wrn", "depth": 10, "widen": 2}, (3, 84, 84), 5)
    out = small(torch.randn(2, 3, 84, 84))
    assert out.shape == (2, 5) and small.feature_dim == 128
    out.sum().backward()
    assert all(p.grad is not None for p in small.parameters())
    with pytest.raises(Exception, match="divisible by 6"):
        build_model({"name": "wrn", "depth": 27}, (3, 32, 32), None)
    with pytest.raises(ConfigError, match="image inputs"):
        build_model({"name": "wrn"}, (10,), None)

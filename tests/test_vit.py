"""The small Vision Transformers of the zoo: shapes, the stage contract, the penultimate tap, the parameter
count from the architecture's formula, and the attention maps against a direct computation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mentor.cli import main
from mentor.config import ConfigError
from mentor.models import FeatureTap, PenultimateTap, create_model, list_models, model_info, stage_names
from mentor.models.vit import Attention, VisionTransformer, ViTSizeError, attention_maps, keep_attention


@pytest.mark.parametrize("size, channels", [(28, 1), (32, 3), (28, 3), (32, 1)])
def test_shapes_and_gradients_at_28_and_32(size, channels):
    torch.manual_seed(0)
    m = create_model("vit_tiny", 10, in_channels=channels, image_size=size)
    assert isinstance(m, VisionTransformer) and m.grid == size // 4
    with FeatureTap(m, [*m.stage_names, "pool"]) as tap:
        logits = m(torch.randn(3, channels, size, size))
        tokens = 1 + (size // 4) ** 2  # 7x7 or 8x8 patches and the class token
        for name in m.stage_names:
            assert tap[name].shape == (3, tokens, 128), name
        assert tap["pool"].shape == (3, 128)
    assert logits.shape == (3, 10)
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_stage_names_and_children_follow_the_zoo():
    m = create_model("vit_tiny", 10, in_channels=1, image_size=28)
    assert m.stage_names == ("stem", *(f"layer{i}" for i in range(1, 7)))
    assert [n for n, _ in m.named_children()] == [*m.stage_names, "pool", "fc"]
    assert stage_names(m, "student", ("pool", "fc")) == m.stage_names
    assert isinstance(m.fc, nn.Linear) and m.fc.in_features == m.num_features == 128
    assert create_model("vit_tiny", 10, depth=2).stage_names == ("stem", "layer1", "layer2")
    assert {"vit_tiny", "vit_small"} <= set(list_models("vit*"))


def test_penultimate_tap_reads_the_normalised_class_token():
    torch.manual_seed(0)
    m = create_model("vit_tiny", 10, in_channels=1, image_size=28, depth=2).eval()
    x = torch.randn(4, 1, 28, 28)
    tap = PenultimateTap(m)
    feats, logits = tap(x)
    with FeatureTap(m, "layer2") as ft:
        direct = m(x)
        cls = ft["layer2"][:, 0]
    assert torch.allclose(logits, direct)
    assert torch.allclose(feats, F.layer_norm(cls, (128,), m.pool.norm.weight, m.pool.norm.bias), atol=1e-6)
    assert torch.allclose(logits, feats @ m.fc.weight.T + m.fc.bias, atol=1e-5)
    assert tap.num_features == 128


def _count(dim, depth, channels, patch, grid, classes):
    """The ViT's parameters written out: patch conv, class token, positions; per block two LayerNorms,
    qkv, output projection and the 4x MLP; the final LayerNorm and the classifier."""
    stem = channels * patch * patch * dim + dim + dim + (1 + grid * grid) * dim
    norms, qkv, proj = 2 * 2 * dim, dim * 3 * dim + 3 * dim, dim * dim + dim
    mlp = (dim * 4 * dim + 4 * dim) + (4 * dim * dim + dim)
    block = norms + qkv + proj + mlp
    return stem + depth * block + 2 * dim + dim * classes + classes


def test_parameter_counts():
    assert model_info(create_model("vit_tiny", 10, in_channels=3)) == _count(128, 6, 3, 4, 8, 10) == 1_205_898
    assert model_info(create_model("vit_tiny", 10, in_channels=1, image_size=28)) == _count(128, 6, 1, 4, 7, 10)
    assert model_info(create_model("vit_small", 100, in_channels=3)) == _count(256, 8, 3, 4, 8, 100)


def test_attention_maps_are_row_stochastic_and_match_a_direct_computation():
    torch.manual_seed(0)
    m = create_model("vit_tiny", 10, in_channels=1, image_size=28, depth=3).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        plain = m(x)
    assert all(a is None for a in attention_maps(m))  # nothing is kept unless asked
    mods = keep_attention(m)
    assert len(mods) == 3 and all(isinstance(a, Attention) for a in mods)
    with torch.no_grad():
        kept = m(x)
    assert torch.allclose(plain, kept, atol=1e-5)  # the explicit path computes the same function
    maps = attention_maps(m)
    with FeatureTap(m, ["stem", "layer1"]) as tap, torch.no_grad():
        m(x)
        inputs = [tap["stem"], tap["layer1"]]
    for a, block, h in zip(maps, m.blocks(), inputs):
        assert a.shape == (2, 4, 50, 50) and not a.requires_grad
        assert torch.allclose(a.sum(-1), torch.ones(2, 4, 50), atol=1e-5)
        assert (a >= 0).all()
        # the same map from the block's weights, head by head
        y = block.norm1(h)
        qkv = block.attn.qkv(y)
        for head in range(4):
            q = qkv[..., head * 32:(head + 1) * 32]
            k = qkv[..., 128 + head * 32:128 + (head + 1) * 32]
            want = torch.softmax(q @ k.transpose(1, 2) / 32 ** 0.5, -1)
            assert torch.allclose(a[:, head], want, atol=1e-5)
    keep_attention(m, False)
    assert all(a is None for a in attention_maps(m))


def test_a_tap_on_the_map_keeps_its_graph():
    torch.manual_seed(0)
    m = create_model("vit_tiny", 10, in_channels=1, image_size=28, depth=2)
    with FeatureTap(m, "layer2.attn.map") as tap:
        m(torch.randn(2, 1, 28, 28))
        a = tap["layer2.attn.map"]
        assert a.shape == (2, 4, 50, 50) and a.requires_grad
        a[:, :, 0, 1:].sum().backward()  # attention of the class token on the patches
    assert m.layer2.attn.qkv.weight.grad.abs().sum() > 0 and m.layer1.attn.qkv.weight.grad.abs().sum() > 0


def test_wrong_image_size_and_bad_arguments_are_clear():
    m = create_model("vit_tiny", 10, in_channels=1)  # built for 32x32
    with pytest.raises(ViTSizeError, match="model.kwargs.image_size=28"):
        m(torch.randn(1, 1, 28, 28))
    assert issubclass(ViTSizeError, ConfigError)
    with pytest.raises(ConfigError, match="patch_size"):
        create_model("vit_tiny", 10, image_size=30)
    with pytest.raises(ConfigError, match="heads"):
        create_model("vit_tiny", 10, dim=130)


def test_the_cli_lists_the_vits(capsys):
    assert main(["list", "models", "vit*"]) == 0
    assert capsys.readouterr().out.split() == ["vit_small", "vit_tiny"]

"""The shared building blocks several methods use: spatial alignment and projectors (mentor.nn), stage
names (mentor.models.stages) and the distillers' loss tail (Distiller.combine), against hand
computations."""

import math

import pytest
import torch
from torch import nn

from mentor.distill.base import DistillConfig, DistillerBase
from mentor.errors import ConfigError
from mentor.methods import BuildInfo
from mentor.models import StageError, create_model, last_map_name, prepool_names, stage_names
from mentor.nn import align_spatial, conv_block, conv_projector, mlp, pool_to, resize_to

# -- spatial alignment -----------------------------------------------------------------------------


def block_means(rows, bh, bw):
    """Means of the non-overlapping bh x bw blocks of a list-of-lists map."""
    h, w = len(rows) // bh, len(rows[0]) // bw
    return [[sum(rows[i * bh + a][j * bw + b] for a in range(bh) for b in range(bw)) / (bh * bw)
             for j in range(w)] for i in range(h)]


def test_pool_to_is_the_block_mean_and_leaves_a_map_of_that_size_alone():
    rows = [[float(4 * i + j) for j in range(4)] for i in range(4)]
    x = torch.tensor(rows)[None, None]
    assert pool_to(x, (2, 2))[0, 0].tolist() == block_means(rows, 2, 2)
    assert pool_to(x, (1, 2))[0, 0].tolist() == block_means(rows, 4, 2)
    assert pool_to(x, (4, 4)) is x


def test_align_spatial_pools_each_side_to_the_smaller_height_and_width():
    rows = [[float(i * j - j) for j in range(4)] for i in range(4)]
    a, b = torch.tensor(rows)[None, None], torch.randn(1, 3, 2, 2)
    pa, pb = align_spatial(a, b)
    assert pa[0, 0].tolist() == block_means(rows, 2, 2) and pb is b
    wide, tall = torch.randn(2, 1, 4, 2), torch.randn(2, 5, 2, 4)  # sizes disagree in both directions
    assert [tuple(t.shape) for t in align_spatial(wide, tall)] == [(2, 1, 2, 2), (2, 5, 2, 2)]
    with pytest.raises(ValueError, match="B, C, H, W"):
        align_spatial(torch.randn(2, 3), b)


def test_resize_to_pools_down_and_upsamples_bilinearly():
    x = torch.tensor([[0.0, 4.0], [8.0, 12.0]])[None, None]
    # align_corners=False, 2 -> 4: output i samples the input at i/2 - 1/4, clamped to [0, 1], so the
    # weights of the two inputs along each axis are (1, 0), (3/4, 1/4), (1/4, 3/4), (0, 1).
    weights = [(1.0, 0.0), (0.75, 0.25), (0.25, 0.75), (0.0, 1.0)]
    grid = [[0.0, 4.0], [8.0, 12.0]]
    expected = [[sum(wi[a] * wj[b] * grid[a][b] for a in range(2) for b in range(2)) for wj in weights]
                for wi in weights]
    assert resize_to(x, (4, 4))[0, 0].tolist() == [pytest.approx(row) for row in expected]
    big = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(resize_to(big, (2, 2)), pool_to(big, (2, 2)))
    assert resize_to(big, (4, 4)) is big


# -- projectors ------------------------------------------------------------------------------------


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_conv_projector_layers_shapes_and_parameter_counts():
    p = conv_projector(3, 8, 4)
    assert [type(m) for m in p] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 3
    # conv1x1 3->4 (12) + BN (8) + conv3x3 4->4 (144) + BN (8) + conv1x1 4->8 (32) + BN (16)
    assert n_params(p) == 12 + 8 + 144 + 8 + 32 + 16
    assert p(torch.randn(2, 3, 5, 5)).shape == (2, 8, 5, 5)
    assert n_params(conv_projector(3, 8, 4, bias=True)) == 220 + 4 + 4 + 8
    bare = conv_projector(3, 8, 4, out_norm=False, out_act=False)
    assert n_params(bare) == 220 - 16 and isinstance(bare[-1], nn.Conv2d)
    assert n_params(conv_projector(3, 8)) == 3 * 8 + 2 * 8 and len(conv_projector(3, 8)) == 3


def test_conv_projector_draws_its_weights_in_the_order_of_its_layers():
    torch.manual_seed(0)
    p = conv_projector(6, 10, 5)
    torch.manual_seed(0)
    by_hand = nn.Sequential(nn.Conv2d(6, 5, 1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                            nn.Conv2d(5, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                            nn.Conv2d(5, 10, 1, bias=False), nn.BatchNorm2d(10), nn.ReLU())
    assert list(p.state_dict()) == list(by_hand.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(p.state_dict().values(), by_hand.state_dict().values()))


def test_conv_block_strides_groups_and_transposed_resolution():
    down = nn.Sequential(*conv_block(4, 6, 3, stride=2))
    assert down(torch.randn(1, 4, 7, 7)).shape == (1, 6, 4, 4)  # ceil(7 / 2)
    up = nn.Sequential(*conv_block(4, 6, 4, stride=2, transposed=True, act=False))
    assert up(torch.randn(1, 4, 5, 5)).shape == (1, 6, 10, 10) and len(up) == 2
    depthwise = conv_block(8, 8, 3, groups=8, norm=False, act=False)
    assert len(depthwise) == 1 and n_params(depthwise[0]) == 8 * 9


def test_mlp_is_linear_relu_linear():
    m = mlp(5, 7, 3)
    assert n_params(m) == 5 * 7 + 7 + 7 * 3 + 3
    x = torch.randn(4, 5)
    w1, b1, w2, b2 = (t.detach() for t in m.parameters())
    hidden = [[max(0.0, sum(x[n, i].item() * w1[h, i].item() for i in range(5)) + b1[h].item()) for h in range(7)]
              for n in range(4)]
    expected = [[sum(hidden[n][h] * w2[o, h].item() for h in range(7)) + b2[o].item() for o in range(3)]
                for n in range(4)]
    assert m(x).tolist() == [pytest.approx(row, abs=1e-5) for row in expected]


# -- stage names -----------------------------------------------------------------------------------


def test_stage_names_of_zoo_networks():
    resnet = create_model("resnet8", num_classes=10, in_channels=1)
    mobile = create_model("mobilenetv2", num_classes=10, in_channels=1)
    assert stage_names(resnet) == ("stem", "layer1", "layer2", "layer3")
    assert prepool_names(resnet) == stage_names(resnet) and last_map_name(resnet) == "layer3"
    assert prepool_names(mobile) == (*stage_names(mobile), "head") and last_map_name(mobile) == "head"


def test_a_network_without_stage_names_is_refused_with_what_is_missing():
    with pytest.raises(StageError, match="stage_names") as err:
        stage_names(nn.Linear(3, 3), "teacher")
    assert isinstance(err.value, ConfigError) and isinstance(err.value, TypeError)
    assert "teacher (Linear)" in str(err.value)
    headless = create_model("resnet8", num_classes=10, in_channels=1)
    del headless.fc
    assert stage_names(headless) == ("stem", "layer1", "layer2", "layer3")
    with pytest.raises(StageError, match=r"missing: \['fc'\]"):
        prepool_names(headless)


# -- the distillers' loss tail ---------------------------------------------------------------------


def test_combine_weights_the_terms_and_logs_them_unweighted():
    m = DistillerBase(DistillConfig(name="x", ce_weight=0.5), nn.Identity(), BuildInfo())
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    y = torch.tensor([0, 1])
    ce = (-math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(math.e / (1 + math.e + math.exp(3)))) / 2
    terms = {"kd": torch.tensor(0.3), "sub": torch.tensor(7.0)}
    out = m.combine(logits, y, terms, {"kd": 2.0})
    assert list(out) == ["loss", "ce", "kd", "sub", "train_acc"]
    assert out["ce"].item() == pytest.approx(ce)
    assert out["loss"].item() == pytest.approx(0.5 * ce + 2.0 * 0.3)
    assert out["kd"].item() == pytest.approx(0.3) and out["train_acc"].item() == 0.5
    later = m.combine(logits, y, lambda: terms, {"kd": 2.0, "sub": 1.0})
    assert later["loss"].item() == pytest.approx(0.5 * ce + 0.6 + 7.0)
    smoothed = m.combine(logits, y, {}, label_smoothing=0.3)
    # label smoothing eps: (1 - eps) * CE + eps * mean over classes of -log p
    logp = torch.log_softmax(logits, 1)
    by_hand = ((1 - 0.3) * -logp[torch.arange(2), y] - 0.3 * logp.mean(1)).mean()
    assert smoothed["ce"].item() == pytest.approx(by_hand.item())

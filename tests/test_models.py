"""Model zoo, model registry and FeatureTap."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mentor.models import MODELS, FeatureTap, create_model, list_models, model_info, register_model
from mentor.models.shufflenet import ShuffleV2Unit

ZOO = [
    *(f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)),
    "resnet8x4",
    "resnet32x4",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "wrn_28_2",
    "wrn_28_8",
    *(f"vgg{d}" for d in (8, 11, 13, 16, 19)),
    "mobilenetv2",
    "shufflenetv1",
    "shufflenetv2",
]
# (input shape, in_channels, num_classes): Fashion-MNIST-like and CIFAR-like.
INPUTS = {"gray28": ((2, 1, 28, 28), 1, 10), "rgb32": ((2, 3, 32, 32), 3, 100)}


def test_zoo_is_registered():
    assert set(ZOO) <= set(list_models())
    assert list_models("wrn_*") == ["wrn_16_1", "wrn_16_2", "wrn_28_2", "wrn_28_8", "wrn_40_1", "wrn_40_2"]


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("name", ZOO)
def test_forward_backward(name, kind):
    shape, in_channels, num_classes = INPUTS[kind]
    torch.manual_seed(0)
    model = create_model(name, num_classes, in_channels=in_channels)
    logits = model(torch.randn(shape))
    assert logits.shape == (shape[0], num_classes)
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", ZOO)
def test_stage_contract(name):
    model = create_model(name, 10, in_channels=1).eval()
    children = [n for n, _ in model.named_children()]
    k = len(model.stage_names) - 1
    assert model.stage_names == ("stem", *(f"layer{i}" for i in range(1, k + 1)))
    extra = ["head"] if "head" in children else []
    assert children == [*model.stage_names, *extra, "pool", "fc"]
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == model.num_features
    for size in (28, 32):
        with FeatureTap(model, [*model.stage_names, "pool"]) as tap, torch.no_grad():
            model(torch.randn(2, 1, size, size))
            sides = [tap[s].shape[-1] for s in model.stage_names]
            assert all(b <= a for a, b in zip(sides, sides[1:])), sides
            assert sides[-1] >= 1
            assert tap["pool"].shape == (2, model.num_features)


# Parameter counts at 100 classes as the KD papers quote them (CRD/RepDistiller zoo).
PUBLISHED_PARAMS_M = {
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_40_2": 2.26,
    "wrn_16_2": 0.70,
    "resnet56": 0.86,
    "resnet20": 0.28,
    "resnet110": 1.74,
    "vgg13": 9.46,
    "mobilenetv2": 0.81,
    "shufflenetv1": 0.95,
    "shufflenetv2": 1.36,
}


@pytest.mark.parametrize("name", PUBLISHED_PARAMS_M)
def test_published_parameter_counts(name):
    count = model_info(create_model(name, 100))
    assert count == pytest.approx(PUBLISHED_PARAMS_M[name] * 1e6, rel=0.02)


def _cifar_resnet_params(depth, widths, classes):
    """Closed form: 3x3 convs without bias, 2 BN params per channel, 1x1+BN projections."""
    n = (depth - 2) // 6
    total = 9 * 3 * widths[0] + 2 * widths[0]
    cin = widths[0]
    for w in widths[1:]:
        total += n * (2 * 9 * w * w + 4 * w) - 9 * w * w + 9 * cin * w  # first conv sees cin channels
        if cin != w or w != widths[1]:  # stride-2 stages and a widening first stage project
            total += cin * w + 2 * w
        cin = w
    return total + widths[-1] * classes + classes


@pytest.mark.parametrize(
    "name,depth,widths",
    [
        ("resnet8", 8, (16, 16, 32, 64)),
        ("resnet110", 110, (16, 16, 32, 64)),
        ("resnet32x4", 32, (32, 64, 128, 256)),
    ],
)
def test_resnet_parameter_count_closed_form(name, depth, widths):
    assert model_info(create_model(name, 100)) == _cifar_resnet_params(depth, widths, 100)


def _wrn_params(depth, widen, classes, in_channels=3, bias=False):
    """Closed form: pre-activation blocks (BN, 3x3, BN, 3x3), a 1x1 projection where the width or the
    stride changes, the final BN and the classifier; ``bias`` adds one per conv output channel."""
    n = (depth - 4) // 6
    b = int(bias)
    total = 9 * in_channels * 16 + b * 16
    cin = 16
    for w in (16 * widen, 32 * widen, 64 * widen):
        for j in range(n):
            c = cin if j == 0 else w
            total += 2 * c + 9 * c * w + b * w + 2 * w + 9 * w * w + b * w
            if c != w:  # a projection where the width changes (the first block of a stage)
                total += c * w + b * w
        cin = w
    return total + 2 * cin + cin * classes + classes


@pytest.mark.parametrize("name,depth,widen,bias", [("wrn_16_2", 16, 2, False), ("wrn_40_1", 40, 1, False),
                                                   ("wrn_28_2", 28, 2, True), ("wrn_28_8", 28, 8, True)])
def test_wrn_parameter_count_closed_form(name, depth, widen, bias):
    assert model_info(create_model(name, 10)) == _wrn_params(depth, widen, 10, bias=bias)
    assert model_info(create_model(name, 10, in_channels=1)) == _wrn_params(depth, widen, 10, 1, bias=bias)


def test_ssl_wrn_has_the_fixmatch_usb_form():
    # WRN-28-2: "1.5M parameters" (FixMatch, 2020); 4 blocks per stage at widths 32/64/128.
    model = create_model("wrn_28_2", 10)
    assert model_info(model) == pytest.approx(1.5e6, rel=0.03)
    assert [len(getattr(model, s)) for s in ("layer1", "layer2", "layer3")] == [4, 4, 6]  # layer3 + BN, act
    assert [getattr(model, s)[0].conv2.out_channels for s in ("layer1", "layer2", "layer3")] == [32, 64, 128]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    assert bns and all(m.momentum == 0.001 and m.eps == 1e-3 for m in bns)
    assert acts and all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.1 for m in acts)
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    # The distillation zoo's WRN keeps ReLU and PyTorch's BN defaults.
    kd = create_model("wrn_16_2", 10)
    assert all(m.momentum == 0.1 for m in kd.modules() if isinstance(m, nn.BatchNorm2d))
    assert not any(isinstance(m, nn.LeakyReLU) for m in kd.modules())


def test_vgg13_parameter_count_by_hand():
    convs = (
        [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256)] + [(256, 512)] + [(512, 512)] * 3
    )
    expected = sum(9 * a * b + b + 2 * b for a, b in convs) + 512 * 100 + 100  # conv w+b, BN, fc
    assert expected == 9_462_180
    assert model_info(create_model("vgg13", 100)) == expected


def test_create_model_passes_options():
    wide = create_model("mobilenetv2", 10, width_mult=1.0)
    assert wide.stem[0].out_channels == 32 and wide.num_features == 1280
    assert create_model("shufflenetv2", 10, net_size=1.5).layer1[0].act_out is not None
    with pytest.raises(TypeError):
        create_model("resnet20", 10, width_mult=2.0)


def test_registry_refuses_duplicates_and_suggests(monkeypatch):
    monkeypatch.setattr(MODELS, "_entries", dict(MODELS._entries))  # undo the registration below
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet20")(lambda num_classes, in_channels=3: nn.Linear(1, num_classes))
    register_model("tiny_linear")(lambda num_classes, in_channels=3: nn.Linear(in_channels, num_classes))
    assert create_model("tiny_linear", 4, in_channels=2).out_features == 4
    with pytest.raises(KeyError, match="wrn_40_2"):
        create_model("wrn_40_3", 10)
    with pytest.raises(KeyError, match="shufflenetv2"):
        create_model("shufflenet_v2", 10)


# ---------------------------------------------------------------- FeatureTap


def _all_hooks(model):
    return [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]


def test_tap_matches_manual_forward_and_removes_hooks():
    model = create_model("resnet20", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        manual, h = {}, x
        for name in model.stage_names:
            h = manual[name] = getattr(model, name)(h)
        logits = model.fc(model.pool(h))
        tap = FeatureTap(model, model.stage_names)
        out = model(x)
    assert torch.equal(out, logits)
    assert list(tap.features) == list(model.stage_names)
    for name in model.stage_names:
        assert torch.equal(tap[name], manual[name])
    tap.remove()
    assert _all_hooks(model) == [] and tap.features == {}
    with FeatureTap(model, ["layer2"]) as tap2:
        model(x)
        assert tap2["layer2"].shape == (2, 32, 16, 16)
    assert _all_hooks(model) == [] and tap2.features == {}


@pytest.mark.parametrize("name", ZOO)
def test_tap_pre_activation_relu_gives_feature(name):
    model = create_model(name, 10, in_channels=1).eval()
    post = FeatureTap(model, model.stage_names)
    pre = FeatureTap(model, model.stage_names, pre_activation=True)
    with torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
    for stage in model.stage_names:
        # Either the stage ends in a ReLU (then relu(pre) == post; a leaky ReLU of slope 0.1 for the
        # semi-supervised WRNs) or it has none (then pre is post).
        if pre.sources[stage].startswith("output"):
            assert torch.equal(pre[stage], post[stage]), stage
        else:
            slope = 0.1 if name.startswith("wrn_28") else 0.0
            assert torch.equal(torch.where(pre[stage] > 0, pre[stage], slope * pre[stage]), post[stage]), stage
            assert (pre[stage] < 0).any(), f"{stage}: pre-activation map has no negative entry"
    finals = [s for s in model.stage_names if pre.sources[s].startswith("input")]
    assert finals, "no stage exposes a final activation"


def test_tap_pre_activation_matches_reference_definitions():
    x = torch.randn(2, 3, 32, 32)
    resnet = create_model("resnet8x4", 10).eval()
    wrn = create_model("wrn_16_2", 10).eval()
    with torch.no_grad(), FeatureTap(resnet, ["layer2"], pre_activation=True) as tap:
        resnet(x)
        # RepDistiller's preact: the last block's residual sum before its ReLU.
        h = resnet.layer1(resnet.stem(x))
        b = resnet.layer2[-1]
        expected = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h))))) + b.shortcut(h)
        assert torch.allclose(tap["layer2"], expected, atol=1e-6)
    with torch.no_grad(), FeatureTap(wrn, ["layer1", "layer3"], pre_activation=True) as tap:
        wrn(x)
        h1 = wrn.layer1(wrn.stem(x))
        h3 = wrn.layer3[-2](wrn.layer3[:-2](wrn.layer2(h1)))  # layer3 ends with the net's BN, ReLU
        assert torch.equal(tap["layer1"], h1)  # pre-activation stage: the raw residual sum
        assert torch.allclose(tap["layer3"], h3, atol=1e-6)
        assert tap.sources["layer3"] == "input of 'layer3.3'"


def test_tap_on_plain_sequential():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    model = nn.Sequential(inner, nn.Conv2d(4, 5, 1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        bn_out = inner[1](inner[0](x))
        conv_out = model[1](bn_out.relu())
        with (
            FeatureTap(model, ["0", "1", "2"]) as post,
            FeatureTap(model, ["0", "1"], pre_activation=True) as pre,
        ):
            model(x)
            assert torch.equal(post["0"], bn_out.relu()) and torch.equal(post["1"], conv_out)
            assert torch.equal(post["2"], conv_out.relu())
            # The in-place ReLU's input was cloned before it was overwritten.
            assert torch.equal(pre["0"], bn_out) and (pre["0"] < 0).any()
            assert pre.sources == {"0": "input of '0.2'", "1": "output of '1'"}
            assert torch.equal(pre["1"], conv_out)
    assert _all_hooks(model) == []


def test_tap_unknown_name_suggests():
    model = create_model("resnet8", 10)
    with pytest.raises(KeyError, match="'layer1'") as err:
        FeatureTap(model, ["layer1", "layr1"])
    assert "stem, layer1, layer2, layer3" in str(err.value)
    assert _all_hooks(model) == []
    with FeatureTap(model, ["layer1"]) as tap, pytest.raises(KeyError, match="not tapped"):
        tap["layer2"]


def test_tap_refreshes_and_releases_tensors():
    model = create_model("resnet8", 10).eval()
    tap = FeatureTap(model, ["layer1", "layer3"])
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        first = weakref.ref(tap["layer1"])
        model(torch.randn(1, 3, 32, 32))
    gc.collect()
    assert first() is None, "the previous forward's feature is still alive"
    second = weakref.ref(tap["layer3"])
    tap.clear()
    gc.collect()
    assert second() is None and tap.features == {}
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    third = weakref.ref(tap["layer1"])
    tap.remove()
    gc.collect()
    assert third() is None and _all_hooks(model) == []
    # A tap that is simply dropped takes its hooks with it.
    FeatureTap(model, ["layer2"])
    gc.collect()
    assert _all_hooks(model) == []


def test_tap_gradients_flow_and_no_grad():
    model = create_model("wrn_16_1", 10)
    with FeatureTap(model, ["layer2"]) as tap:
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
        assert not tap["layer2"].requires_grad
        model(torch.randn(2, 3, 32, 32))
        tap["layer2"].pow(2).mean().backward()
    assert model.stem.weight.grad is not None and model.stem.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None  # the feature loss does not reach past the tapped stage


def test_shufflenetv2_unit_matches_reference_relu_placement():
    # The reference ReLUs only the transformed half before concatenating and shuffling; the zoo ReLUs
    # after the shuffle. They agree on non-negative inputs, which is what a unit receives in the net.
    torch.manual_seed(0)
    unit = ShuffleV2Unit(8).eval()
    x = torch.randn(2, 8, 5, 5).relu()
    with torch.no_grad():
        keep, x2 = x.chunk(2, 1)
        branch = F.relu(unit.bn3(unit.conv3(unit.bn2(unit.conv2(F.relu(unit.bn1(unit.conv1(x2))))))))
        joined = torch.cat([keep, branch], 1)
        shuffled = joined.view(2, 2, 4, 5, 5).transpose(1, 2).reshape(2, 8, 5, 5)  # interleave halves
        assert torch.equal(shuffled[:, 0::2], keep) and torch.equal(shuffled[:, 1::2], branch)
        assert torch.allclose(unit(x), shuffled, atol=1e-6)


def test_a_copy_of_a_tapped_network_can_be_stripped_of_the_taps():
    import copy

    from mentor.engine.ema import EMA
    from mentor.models import FeatureTap, create_model, strip_taps

    net = create_model("resnet8", num_classes=10, in_channels=1).eval()
    tap = FeatureTap(net, ["layer1", "layer3"], pre_activation=True)
    x = torch.randn(2, 1, 28, 28)
    net(x)
    live = {k: v.clone() for k, v in tap.features.items()}
    twin = copy.deepcopy(net)
    twin(torch.randn(2, 1, 28, 28))  # a plain deepcopy still writes into the live tap
    assert not torch.equal(tap["layer3"], live["layer3"])
    net(x)
    for copy_ in (strip_taps(copy.deepcopy(net)), EMA(net, 0.9).module):
        copy_(torch.randn(2, 1, 28, 28))
        for k, v in live.items():
            torch.testing.assert_close(tap[k], v)
    net(torch.randn(2, 1, 28, 28))  # the live network still records
    assert not torch.equal(tap["layer3"], live["layer3"])

"""Feature-perturbation DG methods: MixStyle, PLACE dropout and patch-aware BatchNorm. MixStyle's mixing is checked
against a per-sample numpy computation, PLACE's rate against the arctangent and its dropout by counting zeroed
channels, PBN's per-patch normalisation against a loop of BatchNorm calls on the cut patches (the reference code's
way); then each method trains a few engine steps."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _dg import dg_cfg
from _helpers import FixedMLP
from _nosync import NoHostSync
from torch import nn

from mentor.config import ConfigError
from mentor.engine import Trainer
from mentor.generalize.place import channel_keep, place_rate
from mentor.methods import BuildInfo, StepContext, create_method
from mentor.models import create_model, strip_taps
from mentor.nn.pbn import PatchBN2d, PatchDraw, cut_range, split_masks
from mentor.nn.style import MixStyle, instance_stats, mix_style, style_partners

C = 10  # classes of the digit domains


def _info(domains=2):
    return BuildInfo(num_classes=C, in_channels=1, image_size=8, num_domains=domains,
                     domain_names=tuple(f"d{i}" for i in range(domains)), max_steps=100)


def _method(name, net=None, domains=2, **hp):
    torch.manual_seed(0)
    return create_method(name, net if net is not None else create_model("resnet8", num_classes=C, in_channels=1),
                         _info(domains), **hp)


def _batch(domains, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(domains * b, 1, 8, 8, generator=g)
    y = torch.randint(0, C, (domains * b,), generator=g)
    return {"x": x, "y": y, "domain": torch.arange(domains).repeat_interleave(b), "index": torch.arange(domains * b)}


def _train_events(path):
    events = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["split"] == "train"]


# -- MixStyle ------------------------------------------------------------------------------------------------
def test_mixstyle_mixes_instance_statistics_like_a_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    n, c, h, w, eps = 5, 3, 4, 6, 1e-6
    x = (2 * torch.randn(n, c, h, w, generator=g, dtype=torch.float64) + 1).requires_grad_(True)
    partner = torch.tensor([3, 0, 4, 1, 2])
    lam = torch.rand(n, generator=g, dtype=torch.float64)
    got = mix_style(x, partner, lam, eps)
    a = x.detach().numpy()
    ref = np.empty_like(a)
    for i in range(n):
        for ch in range(c):
            mu_i, mu_j = a[i, ch].mean(), a[partner[i], ch].mean()
            sd_i = math.sqrt(a[i, ch].var(ddof=1) + eps)
            sd_j = math.sqrt(a[partner[i], ch].var(ddof=1) + eps)
            lm = lam[i].item()
            ref[i, ch] = (a[i, ch] - mu_i) / sd_i * (lm * sd_i + (1 - lm) * sd_j) + lm * mu_i + (1 - lm) * mu_j
    np.testing.assert_allclose(got.detach().numpy(), ref, rtol=1e-10, atol=1e-10)
    # the statistics are detached: d out / d x is the per-map constant sigma_mix / sigma
    upstream = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((got * upstream).sum(), x)
    mu, sd = instance_stats(x.detach(), eps)
    lam4 = lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(grad, upstream * (lam4 * sd + (1 - lam4) * sd[partner]) / sd)


@pytest.mark.parametrize("domains", [2, 3, 4])
def test_mixstyle_crossdomain_partners_are_a_bijection_onto_another_domain(domains):
    b = 5
    seen_targets = set()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        perm = style_partners(domains * b, "crossdomain", domains, g)
        assert sorted(perm.tolist()) == list(range(domains * b))
        dom, partner_dom = torch.arange(domains * b) // b, perm // b
        assert (dom != partner_dom).all()
        # a whole domain block goes to one other domain; the map between domains is a single cycle
        target = partner_dom.view(domains, b)
        assert (target == target[:, :1]).all()
        cycle, d = [0], int(target[0, 0])
        while d != 0:
            cycle.append(d)
            d = int(target[d, 0])
        assert len(cycle) == domains
        seen_targets.add(tuple(target[:, 0].tolist()))
    assert len(seen_targets) == (1 if domains == 2 else math.factorial(domains - 1))  # every cyclic order occurs
    perm = style_partners(12, "random", 3, torch.Generator().manual_seed(0))
    assert sorted(perm.tolist()) == list(range(12))
    with pytest.raises(ValueError, match="equal per-domain blocks"):
        style_partners(10, "crossdomain", 3)


def test_mixstyle_layer_applies_with_probability_p_in_training_only():
    x = torch.randn(6, 4, 5, 5)
    layer = MixStyle(p=1.0, alpha=0.1, mix="crossdomain", num_domains=2).train()
    layer.generator = torch.Generator().manual_seed(3)
    got = layer(x)
    g = torch.Generator().manual_seed(3)  # the layer's draws in order: partners, weights, the coin
    partner = style_partners(6, "crossdomain", 2, g)
    g1, g2 = torch._standard_gamma(torch.full((2, 6), 0.1), generator=g)
    torch.testing.assert_close(got, mix_style(x, partner, torch.nan_to_num(g1 / (g1 + g2), nan=1.0)))
    assert not torch.equal(got, x)
    assert torch.equal(MixStyle(p=0.0).train()(x), x)
    assert torch.equal(MixStyle(p=1.0).eval()(x), x)
    # p = 0.5: one coin for the whole batch, heads about half the time
    half = MixStyle(p=0.5, mix="random").train()
    changed = [not torch.equal(half(x), x) for _ in range(400)]
    assert 0.4 < sum(changed) / 400 < 0.6


def test_mixstyle_method_restyles_the_named_stages_in_its_training_step_only():
    m = _method("mixstyle", p=1.0)
    plain = strip_taps(copy.deepcopy(m.student))
    seen = {}
    m.student.layer1.register_forward_hook(lambda mod, a, out: seen.__setitem__("layer1", out))
    batch = _batch(2, 4)
    gen = torch.Generator().manual_seed(11)
    m.train()
    plain.train()
    m.training_step(batch, StepContext(step=0, max_steps=10, generator=gen))
    y1 = plain.layer1(plain.stem(batch["x"]))
    expected = MixStyle(1.0, 0.1, 1e-6, "crossdomain", 2).train()
    expected.generator = torch.Generator().manual_seed(11)
    torch.testing.assert_close(seen["layer1"], expected(y1))
    # a forward outside the step (evaluation, a BN pass in training mode) is untouched
    m.eval()
    plain.load_state_dict(m.student.state_dict())
    plain.eval()
    torch.testing.assert_close(m.student(batch["x"]), plain(batch["x"]))
    m.student.train()
    plain.train()
    torch.testing.assert_close(m.student(batch["x"]), plain(batch["x"]))


def test_mixstyle_names_an_unknown_stage():
    with pytest.raises(ConfigError, match="method.layers names 'layer9'.*Its stages: stem, layer1, layer2, layer3"):
        _method("mixstyle", layers=["layer1", "layer9"])


# -- PLACE dropout -------------------------------------------------------------------------------------------
def test_place_rate_is_the_arctangent_of_the_integer_epoch():
    for epoch in (0, 0.5, 1, 1.99, 4, 7.3, 30):
        ref = 0.33 * 2 / np.pi * np.arctan(np.floor(epoch) / 4)
        assert place_rate(epoch, 0.33, 4.0).item() == pytest.approx(ref, rel=1e-12, abs=1e-15)
        assert place_rate(torch.tensor(epoch), 0.33, 4.0).item() == pytest.approx(ref, rel=1e-6, abs=1e-9)
    assert place_rate(0, 0.33, 4.0).item() == 0.0
    assert place_rate(1e9, 0.33, 4.0).item() == pytest.approx(0.33, rel=1e-6)


@pytest.mark.parametrize("channels,epoch", [(16, 3), (32, 30), (64, 9), (10, 0)])
def test_place_zeroes_floor_c_p_random_channels_of_each_sample_and_rescales(channels, epoch):
    m = _method("place_dropout")
    rate = place_rate(epoch, 0.33, 4.0)
    k = int(channels * rate.item())
    y = torch.rand(12, channels, 3, 3) + 0.5  # no channel is zero by itself
    hits = torch.zeros(channels)
    for draw in range(50):
        m._draw = (torch.tensor(1), rate, torch.Generator().manual_seed(draw))
        out = m.drop(1, y)
        zero = (out == 0).all(3).all(2)
        assert (zero.sum(1) == k).all()
        torch.testing.assert_close(out[~zero], (y / (1 - rate.item()))[~zero])
        hits += zero.sum(0)
        assert torch.equal(m.drop(0, y), y) and torch.equal(m.drop(2, y), y)  # the stages not drawn
    if k:  # each channel is dropped about k / C of the time
        freq = hits / (50 * 12)
        assert (freq - k / channels).abs().max() < 0.12
    keep = channel_keep(torch.rand(3, 7), torch.tensor(0.999, dtype=torch.float64))
    assert (keep.sum(1) == 1).all()  # floor(7 * 0.999) = 6 channels dropped


def test_place_drops_after_the_drawn_stage_of_the_step_only():
    m = _method("place_dropout")
    raw, final = {}, {}
    for name in ("layer1", "layer2", "layer3"):
        layer = m.student.get_submodule(name)
        layer.register_forward_hook(lambda mod, a, out, n=name: raw.__setitem__(n, out.detach().clone()),
                                    prepend=True)
        layer.register_forward_hook(lambda mod, a, out, n=name: final.__setitem__(n, out.detach().clone()))
    m.train()
    chosen_seen = set()
    for step in range(12):
        ctx = StepContext(step=step, max_steps=100, steps_per_epoch=1, generator=torch.Generator().manual_seed(step))
        out = m.training_step(_batch(2, 4, seed=step), ctx)
        chosen = ["layer1", "layer2", "layer3"][int(out["layer"])]
        chosen_seen.add(chosen)
        rate = place_rate(step, 0.33, 4.0).item()
        assert out["drop_rate"].item() == pytest.approx(rate, rel=1e-6)
        for name in raw:
            if name != chosen:
                assert torch.equal(raw[name], final[name])
                continue
            c = raw[name].shape[1]
            dropped = (final[name] == 0).all(3).all(2) & ~(raw[name] == 0).all(3).all(2)
            assert (dropped.sum(1) <= int(c * rate)).all()
            kept = ~(final[name] == 0).all(3).all(2)
            torch.testing.assert_close(final[name][kept], raw[name][kept] / (1 - rate))
            assert ((final[name] == 0).all(3).all(2).sum(1) >= int(c * rate)).all()
    assert chosen_seen == {"layer1", "layer2", "layer3"}
    m.eval()
    plain = strip_taps(copy.deepcopy(m.student)).eval()
    x = _batch(2, 4)["x"]
    assert torch.equal(m.student(x), plain(x))


def test_place_freeze_first_leaves_the_stem_and_first_stage_out_of_the_optimizer():
    m = _method("place_dropout", freeze_first=True)
    trained = {id(p) for p in m.phases()[0].params}
    for name, p in m.student.named_parameters():
        assert (id(p) in trained) == (not name.startswith(("stem.", "layer1."))), name
    assert len(_method("place_dropout").phases()[0].params) == len(list(m.student.parameters()))
    with pytest.raises(ConfigError, match="freeze_first"):
        _method("place_dropout", freeze_first=True, layers=["layer1.0"])


# -- PBN -----------------------------------------------------------------------------------------------------
def _patches(x, kind, by_rows, two_cut, four_cut):
    """The code's split of ``x``: (list of patches, function assembling normalised patches back)."""
    h, w = x.shape[2], x.shape[3]
    if kind == 0:
        return [x], lambda out: out[0]
    if kind == 1 and by_rows:
        r = two_cut[0]
        return list(torch.split(x, [r, h - r], 2)), lambda out: torch.cat(out, 2)
    if kind == 1:
        c = two_cut[1]
        return list(torch.split(x, [c, w - c], 3)), lambda out: torch.cat(out, 3)
    r, c = four_cut
    up, down = torch.split(x, [r, h - r], 2)
    parts = [*torch.split(up, [c, w - c], 3), *torch.split(down, [c, w - c], 3)]
    return parts, lambda o: torch.cat([torch.cat(o[:2], 3), torch.cat(o[2:], 3)], 2)


def _reference_pbn(x, bn, draw):
    """PBN's training forward as the reference code computes it: a loop of BatchNorm calls, one per patch."""
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    results = []
    for i, kind in enumerate(draw.kinds.tolist()):
        parts, assemble = _patches(x, kind, bool(draw.by_rows), draw.two_cut.tolist(), draw.four_cut.tolist())
        outs = []
        for k, part in enumerate(parts):
            # (clones: the training call below updates rm, rv in place, which the backward of z0 would read)
            z0 = F.batch_norm(part, rm.clone(), rv.clone(), bn.weight, bn.bias, False, bn.momentum, bn.eps)
            if i == 0:  # updates rm, rv in place
                z1 = F.batch_norm(part, rm, rv, bn.weight, bn.bias, True, bn.momentum, bn.eps)
            else:
                z1 = F.batch_norm(part, None, None, bn.weight, bn.bias, True, bn.momentum, bn.eps)
            s = draw.stoch[i, k].view(1, -1, 1, 1)
            outs.append((1 - s) * z0 + s * z1)
        results.append(assemble(outs))
    m = draw.mix.view(1, -1, 1, 1)
    return (1 - m) * results[0] + m * results[1], rm, rv


def _pbn_layer(c, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g, dtype=dtype) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g, dtype=dtype))
        bn.running_mean.copy_(torch.randn(c, generator=g, dtype=dtype))
        bn.running_var.copy_(torch.rand(c, generator=g, dtype=dtype) + 0.5)
    return bn, PatchBN2d.from_bn(bn).to(dtype).train()


@pytest.mark.parametrize("kinds", [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)])
@pytest.mark.parametrize("by_rows", [0, 1])
def test_pbn_normalises_each_patch_like_a_batchnorm_call_on_the_cut_patch(kinds, by_rows):
    g = torch.Generator().manual_seed(sum(kinds) * 2 + by_rows)
    n, c, h, w = 5, 3, 8, 7
    bn, pbn = _pbn_layer(c, seed=by_rows)
    x = (3 * torch.randn(n, c, h, w, generator=g, dtype=torch.float64) + 1).requires_grad_(True)
    draw = PatchDraw(torch.tensor(kinds), torch.tensor(by_rows), torch.tensor([3, 2]), torch.tensor([5, 4]),
                     (torch.rand(2, 4, c, generator=g) < 0.5).double(), (torch.rand(c, generator=g) < 0.5).double())
    got = pbn.train_forward(x, draw)
    ref, rm, rv = _reference_pbn(x, bn, draw)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(pbn.running_mean, rm)
    torch.testing.assert_close(pbn.running_var, rv)
    assert not torch.equal(rm, bn.running_mean)  # the first split moved the statistics
    upstream = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((got * upstream).sum(), [x, pbn.weight, pbn.bias])
    grads_ref = torch.autograd.grad((ref * upstream).sum(), [x, bn.weight, bn.bias])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_pbn_without_momentum_averages_the_patch_statistics_cumulatively():
    pbn = PatchBN2d(2, momentum=None).double().train()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    draw = PatchDraw(torch.tensor([2, 0]), torch.tensor(0), torch.tensor([3, 3]), torch.tensor([2, 4]),
                     torch.zeros(2, 4, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    pbn.train_forward(x, draw)
    parts = [x[:, :, :2, :4], x[:, :, :2, 4:], x[:, :, 2:, :4], x[:, :, 2:, 4:]]
    means = torch.stack([p.mean((0, 2, 3)) for p in parts])
    variances = torch.stack([p.transpose(0, 1).flatten(1).var(1) for p in parts])
    # the first update replaces the initial statistics (factor 1/1), then a running mean over the patches
    torch.testing.assert_close(pbn.running_mean, means.mean(0))
    torch.testing.assert_close(pbn.running_var, variances.mean(0))
    assert pbn.num_batches_tracked.item() == 4


def test_pbn_cuts_small_maps_and_its_patches_cover_the_map_once():
    assert [cut_range(n) for n in (1, 2, 3, 4, 5, 8, 13)] == [(1, 2), (1, 2), (1, 2), (1, 3), (1, 3), (2, 6), (3, 9)]
    for h, w in ((1, 1), (2, 2), (4, 3), (8, 8), (1, 6)):
        pbn = PatchBN2d(2).train()
        for seed in range(20):
            pbn.generator = torch.Generator().manual_seed(seed)
            draw = pbn.draw(torch.zeros(3, 2, h, w))
            assert draw.kinds[0] != draw.kinds[1]
            masks = split_masks(h, w, draw)
            assert torch.equal(masks.sum(1), torch.ones(2, h, w))
        # a map of 1x1 is not cut: the split's second patch is empty and the statistics stay finite
        x = torch.randn(4, 2, h, w)
        out = pbn(x)
        assert out.shape == x.shape and torch.isfinite(out).all() and torch.isfinite(pbn.running_var).all()


def test_pbn_is_plain_batchnorm_in_eval_and_with_the_same_state():
    bn, pbn = _pbn_layer(4, dtype=torch.float32)
    x = torch.randn(6, 4, 5, 5)
    torch.testing.assert_close(pbn.eval()(x), bn.eval()(x))
    assert set(pbn.state_dict()) == set(bn.state_dict())


def test_pbn_method_converts_every_batchnorm2d_and_refuses_a_network_without():
    m = _method("pbn")
    kinds = {type(mod) for mod in m.student.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {PatchBN2d} and len(m.patch_norms) == 9
    with pytest.raises(ConfigError, match="method pbn adapts BatchNorm layers"):
        _method("pbn", net=FixedMLP(C))
    m.train()
    out = m.training_step(_batch(2, 4), StepContext(step=0, max_steps=10))
    assert torch.isfinite(out["loss"])


# -- no host synchronisation, engine runs --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mixstyle", "place_dropout", "pbn"])
def test_a_step_reads_nothing_back_to_the_host(name):
    m = _method(name, domains=3).train()
    batch = _batch(3, 4)
    with NoHostSync():
        for step in (0, torch.tensor(37), 120):
            out = m.training_step(batch, StepContext(step=step, max_steps=200, steps_per_epoch=10))
            out["loss"].backward()
            m.after_step(StepContext(step=step, max_steps=200, steps_per_epoch=10))


@pytest.mark.parametrize("name,extra,terms", [
    ("mixstyle", [], set()), ("mixstyle", ["method.mix=random", "method.layers=[layer1,layer2,layer3]"], set()),
    ("place_dropout", [], {"drop_rate", "layer"}), ("pbn", [], set())])
def test_each_method_trains_in_the_engine(tmp_path, name, extra, terms):
    summary = Trainer(dg_cfg(tmp_path, "run", name, "model.name=resnet8", *extra)).fit()
    assert summary["steps"] == 4 and 0 <= summary["test_acc_last@rolled"] <= 1
    train = _train_events(tmp_path / "run")
    assert len(train) == 4 and all(math.isfinite(e["loss"]) and {"train_acc", *terms} <= set(e) for e in train)


def test_pbn_engine_run_on_the_test_network(tmp_path):
    summary = Trainer(dg_cfg(tmp_path, "run", "pbn")).fit()  # conv -> bn -> relu -> pool -> fc
    assert summary["steps"] == 4 and 0 <= summary["test_acc_last"] <= 1


def test_recipes_load():
    from pathlib import Path

    from mentor.config import load_config

    root = Path(__file__).resolve().parents[1]
    for name in ("mixstyle", "place_dropout", "pbn"):
        cfg = load_config(str(root / "recipes" / "generalize" / f"rotated_fmnist_{name}.yaml"), [])
        assert cfg.method.name == name and cfg.model.name == "resnet8"
        net = create_model(cfg.model.name, 10, 1, **cfg.model.kwargs)
        create_method(name, net, BuildInfo(num_classes=10, image_size=28, num_domains=5,
                                           domain_names=tuple("abcde")))

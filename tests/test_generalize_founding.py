"""The founding domain-generalisation methods (mentor.generalize: normaug, aloft, spurious_dg), their norm layers
(mentor.nn.dsbn) and the GFNet backbone (mentor.models.gfnet): every statistic, perturbation and loss against an
independent computation (a loop of plain BatchNorm networks, numpy FFTs, per-sample loops), the NormAUG ensemble
against a hand-assembled mean over its paths, no host synchronisation in a step, short engine runs and an exact
resume."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _dg import dg_cfg, resumes_bitwise
from _nosync import NoHostSync
from torch import nn

from mentor.config import ConfigError
from mentor.engine import Trainer
from mentor.generalize.aloft import low_frequency_region, perturb_spectrum
from mentor.generalize.spurious import SpuriousDG, restrict_frequencies
from mentor.methods import METHODS, BuildInfo, StepContext
from mentor.models import create_model
from mentor.models.gfnet import GFNetSizeError, GlobalFilter, gfnet_tiny
from mentor.nn.dsbn import DomainSubsetNorm2d, OptimizedNorm2d, SubsetBatchNorm2d

C, D, B = 5, 3, 4  # classes, training domains, images per domain
ROOT = Path(__file__).resolve().parents[1]


class TwoBN(nn.Module):
    """conv-BN-ReLU twice, average pooling and a linear classifier ``fc``."""

    def __init__(self, num_classes=C, in_channels=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def info(num_domains=D):
    return BuildInfo(num_classes=C, in_channels=1, image_size=6, num_domains=num_domains,
                     domain_names=tuple(f"d{i}" for i in range(num_domains)))


def make(name, net, num_domains=D, **hp):
    cls = METHODS.get(name)
    return cls(cls.Config(name=name, **hp), net, info(num_domains))


def dg_batch(seed, same_views=False, num_domains=D):
    g = torch.Generator().manual_seed(seed)
    n = num_domains * B
    weak = torch.randn(n, 1, 6, 6, generator=g)
    strong = weak.clone() if same_views else torch.randn(n, 1, 6, 6, generator=g)
    return {"x": weak, "x_weak": weak, "x_strong": strong, "y": torch.randint(0, C, (n,), generator=g),
            "domain": torch.arange(num_domains).repeat_interleave(B), "index": torch.arange(n)}


def ctx(step=0, seed=1):
    return StepContext(step=step, max_steps=10, generator=torch.Generator().manual_seed(seed))


# -- mentor.nn.dsbn -------------------------------------------------------------------------------------------
def random_bn(channels, seed):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return bn


def test_normaug_subset_branches_normalise_like_a_batchnorm_per_branch_on_its_samples():
    torch.manual_seed(0)
    layer = SubsetBatchNorm2d.from_bn(random_bn(3, 1), 8)
    with torch.no_grad():  # every branch its own affine parameters and running statistics
        for i, bn in enumerate(layer.bns):
            bn.load_state_dict(random_bn(3, 10 + i).state_dict())
    before = copy.deepcopy(layer)
    x = torch.randn(10, 3, 4, 5) * 2 + 1
    branch = torch.tensor([3, 5, 3, 0, 5, 5, 6, 3, 0, 6])  # branches 1, 2, 4, 7 get no sample
    with NoHostSync():
        out = layer.train()(x, branch)
    for k in range(8):
        rows = [i for i in range(10) if int(branch[i]) == k]
        ref = copy.deepcopy(before.bns[k]).train()
        if rows:
            assert torch.allclose(out[rows], ref(x[rows]), atol=1e-5), k
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.allclose(getattr(layer.bns[k], name), getattr(ref, name), atol=1e-6), (k, name)
    # eval mode: each sample with its own branch's running statistics
    out = layer.eval()(x, branch)
    for i in range(10):
        bn = layer.bns[int(branch[i])].eval()
        assert torch.allclose(out[i], bn(x[i:i + 1])[0], atol=1e-5)


def test_normaug_optimized_norm_mixes_instance_and_batch_statistics_with_softmax_weights():
    torch.manual_seed(0)
    layer = OptimizedNorm2d.from_bn(random_bn(3, 2))
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.3, -0.8]))
        layer.var_weight.copy_(torch.tensor([-0.2, 0.9]))
    x = torch.randn(4, 3, 3, 5) * 3 - 1
    rm0, rv0 = layer.running_mean.clone().numpy(), layer.running_var.clone().numpy()
    out = layer.train()(x).detach().numpy()
    xs, w, b = x.numpy().astype(np.float64), layer.weight.detach().numpy(), layer.bias.detach().numpy()
    wm = np.exp([0.3, -0.8]) / np.exp([0.3, -0.8]).sum()
    wv = np.exp([-0.2, 0.9]) / np.exp([-0.2, 0.9]).sum()
    for c in range(3):
        bm = xs[:, c].mean()  # batch statistics over batch and space (population variance)
        bv = xs[:, c].var()
        for i in range(4):
            im, iv = xs[i, c].mean(), xs[i, c].var()
            ref = (xs[i, c] - (wm[0] * im + wm[1] * bm)) / np.sqrt(wv[0] * iv + wv[1] * bv + 1e-5) * w[c] + b[c]
            assert np.allclose(out[i, c], ref, atol=1e-4)
        assert np.isclose(layer.running_mean[c].item(), 0.9 * rm0[c] + 0.1 * bm, atol=1e-5)
        assert np.isclose(layer.running_var[c].item(), 0.9 * rv0[c] + 0.1 * bv, atol=1e-4)
    out = layer.eval()(x).detach().numpy()
    rm, rv = layer.running_mean.numpy(), layer.running_var.numpy()
    for i in range(4):
        for c in range(3):
            im, iv = xs[i, c].mean(), xs[i, c].var()
            ref = (xs[i, c] - (wm[0] * im + wm[1] * rm[c])) / np.sqrt(wv[0] * iv + wv[1] * rv[c] + 1e-5) * w[c] + b[c]
            assert np.allclose(out[i, c], ref, atol=1e-4)


def test_normaug_routed_norm_sends_the_routed_samples_to_the_subsets_and_the_rest_to_the_main_path():
    layer = DomainSubsetNorm2d.from_bn(random_bn(2, 3), 2).train()
    x, route = torch.randn(7, 2, 3, 3), torch.tensor([1, 2, 1, 3])
    layer.route = route
    out = layer(x)
    layer.route = None
    sub, main = copy.deepcopy(layer.subsets), copy.deepcopy(layer.main)
    assert torch.allclose(out[:4], sub(x[:4], route), atol=1e-6)
    assert torch.allclose(out[4:], main(x[4:]), atol=1e-6)
    assert torch.allclose(layer(x), copy.deepcopy(layer.main)(x), atol=1e-6)  # no route: all on the main path


# -- normaug ----------------------------------------------------------------------------------------------------
def test_normaug_grouping_choice_gives_the_reference_code_subset_masks():
    for d in (2, 3, 4):
        method = make("normaug", TwoBN(), num_domains=d)
        full = (1 << d) - 1
        for o in range(d + 1):
            mask = full if o == d else (1 << o) ^ full  # the reference trainer's `myop`
            # augModel._forward_train(_op): domain i jointly by bns[mask] when its bit is in a partial mask
            expected = [mask if (o < d and (1 << i) & mask) else 1 << i for i in range(d)]
            assert method.subset_branches(torch.tensor(o)).tolist() == expected, (d, o)


def plain_copy(original, method, k):
    """A plain copy of the unconverted network with the method's convolutions, branch ``k``'s BN layers and bank
    classifier ``k`` as ``fc``."""
    net = copy.deepcopy(original)
    for name in ("conv1", "conv2"):
        getattr(net, name).load_state_dict(getattr(method.student, name).state_dict())
    for name in ("bn1", "bn2"):
        getattr(net, name).load_state_dict(getattr(method.student, name).subsets.bns[k].state_dict())
    net.fc.load_state_dict(method.student.fc.bank[k].state_dict())
    return net


def seed_for_grouping(o):
    """The first seed whose generator draws the grouping choice ``o`` first (the step's first draw)."""
    return next(s for s in range(100) if int(torch.randint(0, D + 1, (), generator=torch.Generator().manual_seed(s)))
                == o)


@pytest.mark.parametrize("o", range(D + 1))
def test_normaug_step_is_the_loss_of_each_subset_group_through_its_own_bn_and_classifier(o):
    torch.manual_seed(0)
    original = TwoBN()
    method = make("normaug", copy.deepcopy(original)).train()
    with torch.no_grad():  # distinct branches and classifiers
        for m in method.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
        for h in method.student.fc.bank:
            h.weight.normal_()
    batch, step_ctx = dg_batch(o, same_views=True), ctx(seed=seed_for_grouping(o))
    with NoHostSync():
        out = method.training_step(batch, step_ctx)
    assert int(out["grouping"]) == o
    route = method.subset_branches(torch.tensor(o))[batch["domain"]]
    x, y = batch["x_weak"], batch["y"]
    total = 0.0
    for k in sorted(set(route.tolist())):
        rows = [i for i in range(len(y)) if int(route[i]) == k]
        total += F.cross_entropy(plain_copy(original, method, k).train()(x[rows]), y[rows], reduction="sum")
    aux = total / len(y)
    main = F.cross_entropy(method.student(x), y)  # no route: the main path (optimised norm, original fc)
    assert torch.allclose(out["aux"], aux, atol=1e-5) and torch.allclose(out["main"], main, atol=1e-5)
    assert torch.allclose(out["loss"], aux + main, atol=1e-5)


@pytest.mark.parametrize("strong_prob,view", [(0.0, "x_weak"), (1.0, "x_strong")])
def test_normaug_each_sample_takes_its_weak_or_strong_view(strong_prob, view):
    torch.manual_seed(0)
    method = make("normaug", TwoBN(), strong_prob=strong_prob).train()
    batch = dg_batch(5)
    out = method.training_step(batch, ctx())
    with torch.no_grad():
        main = F.cross_entropy(method.student(batch[view]), batch["y"])
    assert torch.allclose(out["main"], main, atol=1e-5)


def test_normaug_draws_a_fresh_view_per_sample_and_part():
    method = make("normaug", TwoBN(), strong_prob=0.5).train()
    n = 40
    batch = {"x_weak": torch.zeros(n, 1, 2, 2), "x_strong": torch.ones(n, 1, 2, 2)}
    with NoHostSync():
        aux, main = method.views(batch, ctx(seed=3))
    g = torch.Generator().manual_seed(3)
    coins = torch.rand(2, n, generator=g) < 0.5  # one Bernoulli coin per image and input
    assert torch.equal(aux[:, 0, 0, 0], coins[0].float()) and torch.equal(main[:, 0, 0, 0], coins[1].float())
    assert (aux == aux[:, :1, :1, :1]).all() and 0 < int(coins.sum()) < 2 * n and not torch.equal(coins[0], coins[1])


def test_normaug_ensemble_is_the_mean_of_the_single_domain_paths_and_the_main_path():
    torch.manual_seed(0)
    original = TwoBN()
    method = make("normaug", copy.deepcopy(original)).train()
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    for step in range(4):  # every branch's statistics and the classifiers move apart
        loss = method.training_step(dg_batch(10 + step), ctx(step, seed=step))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    method.eval()
    x = torch.randn(7, 1, 6, 6)
    got = method.predict(x)
    with torch.no_grad():
        singles = [plain_copy(original, method, 1 << d).eval()(x) for d in range(D)]
        main = method.student(x)
    expected = (torch.stack(singles).mean(0) + main) / 2
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(singles[0], singles[1], atol=1e-3)  # the paths do differ
    assert set(method.eval_heads()) == {"main"}


def test_normaug_needs_batchnorm_and_two_domains(tmp_path):
    with pytest.raises(ConfigError, match="has no BatchNorm2d"):
        make("normaug", gfnet_tiny(C, 1, image_size=8, patch_size=2))
    with pytest.raises(ConfigError, match="needs at least 2"):
        Trainer(dg_cfg(tmp_path, "one", "normaug", "data.test_domains=[rolled, inverted]"))


def test_normaug_engine_run_with_resnet8(tmp_path):
    summary = Trainer(dg_cfg(tmp_path, "run", "normaug", "model.name=resnet8")).fit()
    train = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in train if e["split"] == "train"]
    assert len(train) == 4 and all(math.isfinite(e["loss"]) and {"aux", "main"} <= set(e) for e in train)
    assert summary["steps"] == 4 and 0 <= summary["test_acc_last"] <= 1 and "test_acc_last_main" in summary


def test_normaug_resumes_bitwise(tmp_path):
    def cfg(name):
        return dg_cfg(tmp_path, name, "normaug", "trainer.max_steps=6", "trainer.eval_every=3",
                      "trainer.ckpt_every=3")

    _, ref = resumes_bitwise(cfg, stop_after=2)
    assert any("subsets.bns.3" in k for k in ref)


# -- the GFNet backbone and aloft ------------------------------------------------------------------------------
def test_gfnet_global_filter_is_an_elementwise_product_of_spectra():
    torch.manual_seed(0)
    f = GlobalFilter(dim=3, grid=5)
    x = torch.randn(2, 25, 3)
    out = f(x).detach().numpy()
    w = f.complex_weight.detach().numpy()
    w = w[..., 0] + 1j * w[..., 1]
    spec = np.fft.rfft2(x.view(2, 5, 5, 3).numpy().astype(np.float64), axes=(1, 2), norm="ortho")
    ref = np.fft.irfft2(spec * w[None], s=(5, 5), axes=(1, 2), norm="ortho").reshape(2, 25, 3)
    assert np.allclose(out, ref, atol=1e-5)
    net = gfnet_tiny(C, 1, image_size=28)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, C) and len(net.filters()) == 4
    with pytest.raises(GFNetSizeError, match="model.kwargs.image_size=32"):
        net(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("h,w,ratio", [(7, 4, 0.5), (8, 5, 0.5), (4, 3, 0.5), (14, 8, 0.25), (6, 4, 1.0)])
def test_aloft_mask_region_holds_the_lowest_frequencies(h, w, ratio):
    rows, cols = low_frequency_region(h, w, ratio)
    shifted = np.fft.fftshift(np.fft.fftfreq(h))  # the row frequencies after fftshift along h
    nrows, ncols = math.floor(h * math.sqrt(ratio)), math.floor(w * math.sqrt(ratio))
    assert rows.stop - rows.start == nrows and (cols.start, cols.stop) == (0, ncols)
    assert 0.0 in shifted[rows]  # centred on the zero frequency, holding the lowest row frequencies
    assert np.allclose(sorted(abs(shifted[rows])), sorted(abs(shifted))[:nrows])
    freq_cols = np.fft.rfftfreq(2 * (w - 1))
    assert np.allclose(freq_cols[cols], sorted(freq_cols)[:ncols])


def numpy_aloft(x, mode, ratio, strength, noise, eps=1e-6):
    """ALOFT's perturbation with loops over batch, rows, columns and channels, in float64."""
    spec = np.fft.rfft2(x.astype(np.float64), axes=(1, 2), norm="ortho")
    b, h, w, c = spec.shape
    amp, phase = np.fft.fftshift(np.abs(spec), axes=1), np.angle(spec)
    hc, wc = int(h * math.sqrt(ratio)), int(w * math.sqrt(ratio))
    r0 = h // 2 - hc // 2
    cells = [(i, j) for i in range(h) for j in range(w) if r0 <= i < r0 + hc and j < wc]
    new = amp.copy()
    if mode == "statistic":
        mu = np.array([[np.mean([amp[n, i, j, k] for i, j in cells]) for k in range(c)] for n in range(b)])
        sig = np.array([[math.sqrt(np.var([amp[n, i, j, k] for i, j in cells], ddof=1) + eps) for k in range(c)]
                        for n in range(b)])
        s_mu = np.sqrt(np.var(mu, axis=0, ddof=1) + eps)
        s_sig = np.sqrt(np.var(sig, axis=0, ddof=1) + eps)
        for n in range(b):
            for k in range(c):
                beta = mu[n, k] + strength * noise[0, n, 0, 0, k] * s_mu[k]
                gamma = sig[n, k] + strength * noise[1, n, 0, 0, k] * s_sig[k]
                for i, j in cells:
                    new[n, i, j, k] = gamma * (amp[n, i, j, k] - mu[n, k]) / sig[n, k] + beta
    else:
        for i, j in cells:
            for k in range(c):
                s = math.sqrt(np.var(amp[:, i, j, k], ddof=1) + eps)
                for n in range(b):
                    new[n, i, j, k] = amp[n, i, j, k] + strength * noise[n, i - r0, j, k] * s
    new = np.fft.ifftshift(new, axes=1)
    return new * np.exp(1j * phase), spec, cells


@pytest.mark.parametrize("mode,strength", [("statistic", 0.9), ("element", 1.0)])
@pytest.mark.parametrize("grid", [7, 8])
def test_aloft_perturbation_matches_a_numpy_loop_with_a_fixed_noise_tensor(mode, strength, grid):
    torch.manual_seed(grid)
    x = torch.randn(5, grid, grid, 3) * 2 + 0.5
    wr = grid // 2 + 1
    hc, wc = int(grid * math.sqrt(0.5)), int(wr * math.sqrt(0.5))
    noise = torch.randn(2, 5, 1, 1, 3) if mode == "statistic" else torch.randn(5, hc, wc, 3)
    spec = torch.fft.rfft2(x, dim=(1, 2), norm="ortho")
    with NoHostSync():
        got = perturb_spectrum(spec, mode, 0.5, strength, noise).numpy()
    ref, ref_spec, cells = numpy_aloft(x.numpy(), mode, 0.5, strength, noise.numpy().astype(np.float64))
    assert np.allclose(got, ref, atol=1e-4)
    # outside the region nothing changes
    region = np.zeros((grid, wr))
    for i, j in cells:
        region[i, j] = 1
    outside = np.fft.ifftshift(region, axes=0) == 0  # the region in the unshifted spectrum's coordinates
    assert np.allclose(got[:, outside], ref_spec[:, outside], atol=1e-5)
    # got = A' exp(i P) with a real (possibly negative) A': rotating back by the input's phase leaves no imaginary
    signed = got * np.exp(-1j * np.angle(ref_spec))
    assert np.allclose(signed.imag, 0, atol=1e-4)
    assert not np.allclose(got, ref_spec, atol=1e-3)


def aloft_method(**hp):
    torch.manual_seed(0)
    return make("aloft", gfnet_tiny(C, 1, image_size=8, patch_size=2), **hp)


def test_aloft_perturbs_inside_every_global_filter_in_training_only():
    x = torch.randn(6, 1, 8, 8)
    method = aloft_method(perturb_prob=1.0)
    plain = copy.deepcopy(method.student)
    for f in plain.filters():
        f.spectrum = nn.Identity()
    assert len(method.perturbations) == 4 and all(f.spectrum in method.perturbations for f in method.student.filters())
    assert method.perturbations[0].strength == 1.0 and aloft_method(mode="statistic").perturbations[0].strength == 0.9
    method.train()
    assert not torch.allclose(method.student(x), plain.train()(x), atol=1e-4)
    with NoHostSync():
        out = method.training_step({"x": x, "y": torch.arange(6) % C}, ctx())
    assert torch.isfinite(out["loss"]) and all(p.generator is None for p in method.perturbations)
    method.eval()
    assert torch.allclose(method.predict(x), plain.eval()(x), atol=1e-6)
    never = aloft_method(perturb_prob=0.0).train()
    assert torch.allclose(never.student(x), plain.train()(x), atol=1e-6)
    # the perturbation of a block is the one of perturb_spectrum with the hook's own draws
    hook = method.perturbations[0].train()
    spec = torch.fft.rfft2(torch.randn(6, 4, 4, 8), dim=(1, 2), norm="ortho")
    hook.generator = torch.Generator().manual_seed(4)
    got = hook(spec)
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(hook.noise_shape(spec), generator=g)
    assert torch.allclose(got, perturb_spectrum(spec, "element", 0.5, 1.0, noise), atol=1e-6)


def test_aloft_needs_a_gfnet(tmp_path):
    with pytest.raises(ConfigError, match="model.name=gfnet_tiny"):
        Trainer(dg_cfg(tmp_path, "bad", "aloft"))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("mode", ["element", "statistic"])
def test_aloft_engine_run_with_gfnet_tiny(tmp_path, mode):
    summary = Trainer(dg_cfg(tmp_path, mode, "aloft", f"method.mode={mode}", "model.name=gfnet_tiny",
                             "model.kwargs.image_size=8", "model.kwargs.patch_size=2", "optim.name=adamw",
                             "optim.lr=5e-4", "optim.weight_decay=0.05")).fit()
    events = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(e["loss"]) for e in events if e["split"] == "train")
    assert summary["steps"] == 4 and 0 <= summary["test_acc_last"] <= 1


# -- spurious_dg -------------------------------------------------------------------------------------------------
def numpy_high_pass(pixels, radius):
    """The authors' filter script, written out: per image and channel, the fftshift-ed FFT2 spectrum loses the
    disk ``(iy - H/2)^2 + (ix - W/2)^2 < radius^2`` (looped over every bin), and the image is the clipped modulus
    of the inverse transform."""
    pixels = np.asarray(pixels, dtype=np.float64)
    out = np.empty_like(pixels)
    n, c, h, w = pixels.shape
    disk = np.zeros((h, w), dtype=bool)
    for iy in range(h):
        for ix in range(w):
            disk[iy, ix] = (iy - h / 2.0) ** 2 + (ix - w / 2.0) ** 2 < radius**2
    for b in range(n):
        for ch in range(c):
            spec = np.fft.fftshift(np.fft.fft2(pixels[b, ch]))
            kept = np.where(disk, 0, spec)
            out[b, ch] = np.clip(np.abs(np.fft.ifft2(np.fft.ifftshift(kept))), 0, 1)
    return out


@pytest.mark.parametrize("h,w,ratio", [(8, 8, 0.25), (7, 9, 0.2), (6, 5, 0.1), (28, 28, 0.02), (9, 6, 0.5)])
def test_spurious_frequency_restriction_matches_the_shifted_numpy_filter_with_a_looped_disk(h, w, ratio):
    torch.manual_seed(h * w)
    pixels = torch.rand(3, 2, h, w)
    with NoHostSync():
        got = restrict_frequencies(pixels, ratio).numpy()
    ref = numpy_high_pass(pixels.numpy(), ratio * h)
    assert np.allclose(got, ref, atol=1e-5)
    assert not np.allclose(got, pixels.numpy(), atol=1e-2)  # at least the zero frequency is gone
    assert torch.allclose(restrict_frequencies(pixels, 0.0), pixels, atol=1e-5)  # no disk: the image itself


def test_spurious_restriction_works_on_pixels_and_normalises_again():
    stats = BuildInfo(num_classes=C, in_channels=2, image_size=6, num_domains=D, mean=(0.4, 0.2), std=(0.3, 0.5))
    method = SpuriousDG(SpuriousDG.Config(name="spurious_dg", frm_ratio=0.34), TapNet(in_channels=2), stats)
    pixels = torch.rand(4, 2, 6, 6)
    mean, std = torch.tensor([0.4, 0.2]).view(1, 2, 1, 1), torch.tensor([0.3, 0.5]).view(1, 2, 1, 1)
    with NoHostSync():
        got = method.restrict((pixels - mean) / std)
    ref = (torch.from_numpy(numpy_high_pass(pixels.numpy(), 0.34 * 6)).float() - mean) / std
    assert torch.allclose(got, ref, atol=1e-5)
    assert method.deployable() is method.student


class TapNet(nn.Module):
    def __init__(self, num_classes=C, in_channels=1):
        super().__init__()
        self.layer1, self.fc = nn.Linear(36 * in_channels, 7), nn.Linear(7, num_classes)

    def forward(self, x):
        return self.fc(torch.tanh(self.layer1(x.flatten(1))))


def test_spurious_loss_over_both_views_and_tail_interaction_matches_a_per_sample_loop():
    torch.manual_seed(0)
    method = make("spurious_dg", TapNet(), frm_ratio=0.34, tim_weight=0.7).train()
    batch = dg_batch(3)
    batch["x"] = torch.rand_like(batch["x"])  # pixels (this method's info has no normalisation)
    with NoHostSync():
        out = method.training_step(batch, ctx())
    net, tim = method.student, method.tim
    views = np.concatenate([batch["x"].numpy(), numpy_high_pass(batch["x"].numpy(), 0.34 * 6)])
    y = torch.cat([batch["y"], batch["y"]])
    with torch.no_grad():
        f = torch.tanh(F.linear(torch.from_numpy(views).flatten(1), net.layer1.weight.double(),
                                net.layer1.bias.double()))
        q, k, v = (F.linear(f, m.weight.double(), m.bias.double()) for m in (tim.q, tim.k, tim.v))
    n, dim = f.shape
    assert n == 2 * D * B  # every image of every domain, plain and restricted
    t = []
    for i in range(n):
        scores = [sum(q[i, c] * k[j, c] for c in range(dim)) / math.sqrt(dim) for j in range(n)]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        total = sum(weights)
        t.append([f[i, c] + sum(weights[j] / total * v[j, c] for j in range(n)) for c in range(dim)])
    t = torch.tensor(t, dtype=torch.float64)
    fc_w, fc_b = net.fc.weight.double(), net.fc.bias.double()
    ce = F.cross_entropy(f @ fc_w.t() + fc_b, y)
    ti = F.cross_entropy(t @ fc_w.t() + fc_b, y)
    assert math.isclose(out["ce"].item(), ce.item(), rel_tol=1e-5)
    assert math.isclose(out["tim"].item(), ti.item(), rel_tol=1e-5)
    assert math.isclose(out["loss"].item(), ce.item() + 0.7 * ti.item(), rel_tol=1e-5)
    plain = (f[: D * B] @ fc_w.t() + fc_b).argmax(1)
    assert math.isclose(out["train_acc"].item(), (plain == batch["y"]).double().mean().item(), rel_tol=1e-6)


def test_spurious_without_restriction_trains_on_the_plain_batch():
    method = make("spurious_dg", TapNet(), frm_ratio=0.0, tim_weight=0.0)
    batch = dg_batch(4)
    out = method.training_step(batch, ctx())
    assert torch.allclose(out["ce"], F.cross_entropy(method.student(batch["x"]), batch["y"]), atol=1e-6)
    assert torch.allclose(out["loss"], out["ce"])


def test_spurious_engine_run(tmp_path):
    summary = Trainer(dg_cfg(tmp_path, "run", "spurious_dg")).fit()
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["split"] == "train"]
    assert len(train) == 4 and all(math.isfinite(e["loss"]) and {"ce", "tim"} <= set(e) for e in train)
    assert summary["steps"] == 4 and 0 <= summary["test_acc_last"] <= 1


def test_recipes_load():
    from mentor.config import load_config

    for name, model in (("normaug", "resnet8"), ("aloft", "gfnet_tiny"), ("spurious_dg", "resnet8")):
        cfg = load_config(str(ROOT / "recipes" / "generalize" / f"rotated_fmnist_{name}.yaml"), [])
        assert cfg.method.name == name and cfg.model.name == model
        net = create_model(cfg.model.name, 10, 1, **cfg.model.kwargs)
        assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [
    ("normaug", ["model.name=resnet8", "data.padding=1", "data.flip=false"]),
    ("aloft", ["model.name=gfnet_tiny", "model.kwargs.image_size=8", "model.kwargs.patch_size=2", "optim.name=adamw",
               "optim.lr=2e-3", "optim.weight_decay=0.05"]),
    ("spurious_dg", ["model.name=resnet8"]),
])
def test_each_method_learns_the_training_domains(tmp_path, name, extra):
    summary = Trainer(dg_cfg(tmp_path, name, name, "trainer.max_steps=120", "trainer.eval_every=120",
                             "trainer.ckpt_every=120", "trainer.log_every=40", "data.batch_size=32", *extra)).fit()
    assert summary["val_acc_last"] > 0.6, summary["val_acc_last"]  # chance is 0.1

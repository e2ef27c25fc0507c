"""The adaptation runner: ordered single passes, online accuracy, reset vs continual, clear errors."""

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from _adapt_shift import digit_shift, train_bn_source
from _helpers import BNNet  # noqa: F401  (registers test_bncnn)

import mentor.adapt.base as tta
from mentor.cli import main
from mentor.config import ConfigError, load_config
from mentor.data import ArrayDataset, load_dataset
from mentor.data.domains import DOMAIN_SETS, DomainSet, register_domains
from mentor.engine import train
from mentor.engine.adapt import AdaptPlan, adapt, build_adapt_config
from mentor.errors import DataError
from mentor.methods import METHODS, MethodConfig, Phase, register_method
from mentor.models import create_model

pytest.importorskip("sklearn")


_shift = digit_shift

if "test_entropy_tta" not in METHODS:

    @register_method("test_entropy_tta")
    class EntropyTTA(tta.TestTimeMethod):
        """Entropy minimisation on the BN affine parameters with test-batch statistics (tent's shape)."""

        @dataclass
        class Config(MethodConfig):
            pass

        def prepare(self):
            self.student.train()

        def phases(self):
            return [Phase("main", [self.student.bn.weight, self.student.bn.bias])]

        def adapt_step(self, batch, ctx):
            logits = self.student(batch["x"])
            p = logits.softmax(1)
            ent = -(p * logits.log_softmax(1)).sum(1).mean()
            return {"logits": logits.detach(), "loss": ent, "entropy": ent.detach()}


if "test_episodic_tta" not in METHODS:

    @register_method("test_episodic_tta")
    class EpisodicEntropyTTA(EntropyTTA):
        """The same method reset to the source before every batch."""

        episodic = True


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    return train_bn_source(tmp_path_factory)


def _run(tmp_path, source_run, method, setting="reset", shift="test_digit_shift", *extra):
    cfg = build_adapt_config([f"method.name={method}", f"out_dir={tmp_path / method / setting}",
                              "data.batch_size=50", *extra])
    return adapt(AdaptPlan(run=str(source_run), shift=shift, setting=setting), cfg)


def _network(source_run):
    net = create_model("test_bncnn", num_classes=10, in_channels=1)
    net.load_state_dict(torch.load(source_run / "best.pt", weights_only=True)["model"])
    return net


def _normalise(images):
    ds = load_dataset("digits", "test")
    mean, std = torch.tensor(ds.mean).view(1, -1, 1, 1), torch.tensor(ds.std).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def test_source_is_the_plain_accuracy_of_the_checkpoint(tmp_path, source_run):
    summary = _run(tmp_path, source_run, "source")
    net = _network(source_run).eval()
    shift = _shift()
    for name, ds in shift.domains.items():
        with torch.no_grad():
            acc = (net(_normalise(ds.images)).argmax(1) == ds.labels).sum().item() / len(ds)
        assert summary[f"acc@{name}"] == pytest.approx(acc, abs=1e-9), name
    accs = [summary[f"acc@{n}"] for n in shift.names()]
    assert summary["acc_mean"] == pytest.approx(sum(accs) / 3) and summary["acc_worst"] == min(accs)
    records = [json.loads(line) for line in (tmp_path / "source" / "reset" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stream"] for r in records] == ["clean", "dark", "inverted"]
    assert sum(r["n"] for r in records) == 3 * len(shift.first)  # every image once, last partial batch kept


def test_norm_normalises_each_batch_with_its_own_statistics(tmp_path, source_run):
    summary = _run(tmp_path, source_run, "norm")
    net = _network(source_run)
    ds = _shift().domains["dark"]
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))  # the runner's seeded order
    correct = 0
    for start in range(0, len(ds), 50):
        idx = order[start:start + 50]
        x = _normalise(ds.images[idx])
        with torch.no_grad():
            h = net.conv(x)
            mu, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
            scale, shift = net.bn.weight.view(1, -1, 1, 1), net.bn.bias.view(1, -1, 1, 1)
            h = (h - mu) / torch.sqrt(var + net.bn.eps) * scale + shift
            logits = net.fc(F.adaptive_avg_pool2d(torch.relu(h), 1).flatten(1))
        correct += (logits.argmax(1) == ds.labels[idx]).sum().item()
    assert summary["acc@dark"] == pytest.approx(correct / len(ds), abs=1e-9)


def test_reset_and_continual_differ_only_by_the_carried_state(tmp_path, source_run):
    reset = _run(tmp_path, source_run, "test_entropy_tta", "reset")
    continual = _run(tmp_path, source_run, "test_entropy_tta", "continual")
    assert reset["acc@clean"] == continual["acc@clean"]  # the first stream starts from the source in both
    assert reset["acc@inverted"] != continual["acc@inverted"]  # later streams inherit the adapted state
    # reset: a stream's result does not depend on the streams before it
    alone = adapt(AdaptPlan(run=str(source_run), shift="test_digit_shift", setting="reset"),
                  build_adapt_config(["method.name=test_entropy_tta", f"out_dir={tmp_path / 'alone'}",
                                      "data.batch_size=50"]))
    assert alone["acc@inverted"] == reset["acc@inverted"]


def test_an_episodic_method_predicts_every_batch_from_the_source_state(tmp_path, source_run):
    # Its predictions are made before its update, from the source weights with test-batch statistics
    # on every batch: exactly what `norm` predicts, in both settings.
    norm = _run(tmp_path, source_run, "norm")
    for setting in ("reset", "continual"):
        episodic = _run(tmp_path, source_run, "test_episodic_tta", setting)
        assert [episodic[f"acc@{n}"] for n in ("clean", "dark", "inverted")] == \
               [norm[f"acc@{n}"] for n in ("clean", "dark", "inverted")]


@pytest.mark.parametrize("shift,setting,method,words", [
    ("test_three_classes", "reset", "source", "does not fit the source run"),
    ("fmnist_cc", "reset", "source", "Did you mean 'fmnist_c'"),
    ("test_digit_shift", "episodic", "source", "use one of reset, continual"),
    ("test_digit_shift", "reset", "kd", "not a test-time method"),
])
def test_bad_adaptation_requests_are_clear_errors_and_write_nothing(tmp_path, source_run, shift, setting, method,
                                                                    words):
    with pytest.raises((ConfigError, DataError), match=words):
        cfg = build_adapt_config([f"method.name={method}", f"out_dir={tmp_path / 'out'}"])
        adapt(AdaptPlan(run=str(source_run), shift=shift, setting=setting), cfg)
    assert not (tmp_path / "out").exists()


def test_the_command_line(tmp_path, source_run, capsys):
    out = tmp_path / "cli"
    assert main(["adapt", str(source_run), "--shift", "test_digit_shift", "method.name=norm", f"out_dir={out}"]) == 0
    assert json.loads((out / "summary.json").read_text())["method"] == "norm"
    code = main(["adapt", str(tmp_path / "missing"), "--shift", "test_digit_shift"])
    err = capsys.readouterr().err
    assert code == 2 and "not found" in err and "Traceback" not in err


if "test_rgb_shift" not in DOMAIN_SETS:

    @register_domains("test_rgb_shift")
    def _rgb(root=None, **_):
        ds = _shift().first
        return DomainSet("test_rgb_shift", {"rgb": ArrayDataset(ds.images.expand(-1, 3, -1, -1).contiguous(),
                                                                ds.labels, 10, "digits", ds.classes,
                                                                ds.mean * 3, ds.std * 3)})


if "test_bn_only_tta" not in METHODS:

    @register_method("test_bn_only_tta")
    class BNOnlyTTA(EntropyTTA):
        """A method that adapts BatchNorm layers; records the source split it was shown."""

        needs_bn = True

        def on_source(self, source):
            self.source_seen = (len(source.labeled), source.labeled.name)


def test_mixed_reads_every_domain_once_shuffled_into_one_stream(tmp_path, source_run):
    reset = _run(tmp_path, source_run, "source", "reset")
    mixed = _run(tmp_path, source_run, "source", "mixed")
    # the source model is stateless: each domain's accuracy is the same whatever the order
    for name in ("clean", "dark", "inverted"):
        assert mixed[f"acc@{name}"] == pytest.approx(reset[f"acc@{name}"], abs=1e-12)
    assert mixed["acc_online"] == pytest.approx(reset["acc_mean"], abs=1e-12)  # equal-sized domains
    records = (tmp_path / "source" / "mixed" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 1 and json.loads(records[0])["n"] == 3 * len(_shift().first)
    # a method that learns sees the domains interleaved: not what it sees stream by stream
    learnt = _run(tmp_path, source_run, "test_entropy_tta", "mixed")
    continual = _run(tmp_path, source_run, "test_entropy_tta", "continual")
    assert learnt["acc@inverted"] != continual["acc@inverted"]


def test_the_cost_column_counts_backward_passes_per_test_sample(tmp_path, source_run):
    assert _run(tmp_path, source_run, "source")["backward_per_sample"] == 0.0
    assert _run(tmp_path, source_run, "test_entropy_tta")["backward_per_sample"] == 1.0
    assert _run(tmp_path, source_run, "test_episodic_tta", "continual")["backward_per_sample"] == 1.0


def test_on_source_gets_the_source_runs_training_split(tmp_path, source_run):
    seen = {}
    original = BNOnlyTTA.on_source

    def spy(self, source):
        original(self, source)
        seen["split"] = self.source_seen

    BNOnlyTTA.on_source = spy
    try:
        _run(tmp_path, source_run, "test_bn_only_tta")
    finally:
        BNOnlyTTA.on_source = original
    assert seen["split"] == (len(load_dataset("digits", "train")), "digits")


def test_a_bn_method_on_a_network_without_bn_names_the_method_and_the_layers(tmp_path):
    out = tmp_path / "mlp"
    train(load_config(None, [f"out_dir={out}", "data.name=digits", "data.val_size=200", "model.name=test_mlp",
                             "trainer.max_steps=4", "trainer.eval_every=4", "trainer.ckpt_every=4",
                             "trainer.progress=false"]))
    with pytest.raises(ConfigError, match=r"method test_bn_only_tta adapts BatchNorm .* FixedMLP has none"):
        _run(tmp_path, out, "test_bn_only_tta")
    assert not (tmp_path / "test_bn_only_tta").exists()


def test_a_shift_with_other_channels_is_refused(tmp_path, source_run):
    with pytest.raises(ConfigError, match="3x8x8 images, the network was trained on 1 channels"):
        _run(tmp_path, source_run, "source", "reset", "test_rgb_shift")
    assert not (tmp_path / "source").exists()


def test_replace_norm_swaps_layers_in_place_keeping_their_state():
    from mentor.nn import bn_layers, replace_norm

    class Marked(torch.nn.BatchNorm2d):
        pass

    def factory(old):
        new = Marked(old.num_features, eps=old.eps, momentum=old.momentum)
        new.load_state_dict(old.state_dict())
        return new

    torch.manual_seed(0)
    net = create_model("resnet8", num_classes=10, in_channels=1)
    for bn in bn_layers(net):
        bn.running_mean.uniform_(-1, 1)
        bn.weight.data.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(4, 1, 28, 28)
    before = net(x)
    names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    skip = names[-1]
    swapped = replace_norm(net, factory, where=lambda name, layer: name != skip)
    assert swapped == names[:-1]
    kinds = {n: type(m) for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert all(kinds[n] is Marked for n in swapped) and kinds[skip] is torch.nn.BatchNorm2d
    assert not any(m.training for m in net.modules())  # the new layers keep the old mode
    assert torch.equal(net(x), before)


def test_a_step_that_does_not_apply_leaves_weights_and_optimizer_state_as_they_were():
    from mentor.config import OptimConfig
    from mentor.engine.adapt import _step
    from mentor.engine.optim import build_optimizer
    from mentor.methods import StepContext

    class Gate(tta.TestTimeMethod):
        def adapt_step(self, batch, ctx):
            logits = self.student(batch["x"])
            return {"logits": logits.detach(), "loss": logits.pow(2).mean(), "apply": batch["apply"]}

    torch.manual_seed(0)
    method = Gate(MethodConfig(), torch.nn.Linear(3, 2), None)
    opt = build_optimizer(list(method.parameters()), OptimConfig(name="adamw", lr=0.1, weight_decay=0.0), {})
    cfg = build_adapt_config([])
    x = torch.randn(4, 3)

    def run(apply):
        return _step(method, [(None, opt)], {"x": x, "apply": torch.tensor(apply)}, StepContext(0, 0), _nullcontext,
                     cfg)

    def state():
        return [t.clone() for t in method.parameters()] + [v.clone() for s in opt.state.values() for v in s.values()]

    start = [p.clone() for p in method.parameters()]
    run(False)  # the first step creates Adam's state: it is left as a fresh one (zeros)
    assert all(torch.equal(a, b) for a, b in zip(method.parameters(), start))
    assert all(not v.any() for s in opt.state.values() for v in s.values())
    run(True)
    before = state()
    run(False)
    assert all(torch.equal(a, b) for a, b in zip(state(), before))
    run(True)
    assert not all(torch.equal(a, b) for a, b in zip(state(), before))


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()

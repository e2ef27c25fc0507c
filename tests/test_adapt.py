"""The adaptation runner: ordered single passes, online accuracy, reset vs continual, clear errors."""

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
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


def _shift(root=None, classes=10, **_):
    ds = load_dataset("digits", "test")
    keep = ds.labels < classes

    def part(images):
        return ArrayDataset(images[keep].contiguous(), ds.labels[keep], classes, "digits", ds.classes[:classes],
                            ds.mean, ds.std)

    return DomainSet("test_digit_shift", {"clean": part(ds.images), "dark": part(ds.images // 2),
                                          "inverted": part(255 - ds.images)})


if "test_digit_shift" not in DOMAIN_SETS:
    register_domains("test_digit_shift")(_shift)
    register_domains("test_three_classes")(lambda root=None, **kw: _shift(classes=3))

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
    out = tmp_path_factory.mktemp("source") / "run"
    train(load_config(None, [f"out_dir={out}", "data.name=digits", "data.val_size=200", "data.batch_size=32",
                             "data.padding=1", "data.flip=false", "model.name=test_bncnn", "trainer.max_steps=30",
                             "trainer.eval_every=30", "trainer.ckpt_every=30", "trainer.progress=false",
                             "optim.lr=0.1"]))
    return out


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

"""The domain-generalisation protocol: DomainBed's in/out split of every domain, validation as the mean over
training domains, held-out domains recorded at every evaluation, the three selection methods, open-set and
unlabelled-domain splits, and the clear errors of bad domain recipes."""

from dataclasses import dataclass

import pytest
import torch
from _dg import dg_cfg
from _helpers import BNNet  # noqa: F401

from mentor.cli import main
from mentor.config import ConfigError
from mentor.data import ArrayDataset, load_dataset
from mentor.data.domains import DOMAIN_SETS, DomainSet, register_domains
from mentor.engine import Trainer
from mentor.errors import DataError
from mentor.generalize.base import DomainMethod
from mentor.generalize.selection import (
    RunRecord,
    leave_one_domain_out,
    oracle,
    read_run,
    training_domain_validation,
)
from mentor.methods import METHODS, Inputs, MethodConfig, register_method

pytest.importorskip("sklearn")


def _skewed_domains(root=None, **_):
    """Two digit domains; "narrow" holds only the classes 8 and 9."""
    ds = load_dataset("digits", "train")
    narrow = torch.nonzero(ds.labels >= 8).flatten()
    half = len(ds) // 2

    def part(idx):
        return ArrayDataset(ds.images[idx].contiguous(), ds.labels[idx], 10, "digits", ds.classes, ds.mean, ds.std)

    return DomainSet("test_skewed_domains", {"wide": part(torch.arange(half)), "narrow": part(narrow),
                                             "other": part(torch.arange(half, len(ds)))})


if "test_skewed_domains" not in DOMAIN_SETS:
    register_domains("test_skewed_domains")(_skewed_domains)

if "test_two_domains" not in METHODS:

    @register_method("test_two_domains")
    class TwoDomains(DomainMethod):
        min_domains = 2

    @register_method("test_unlabeled_domains")
    class UnlabeledPeek(DomainMethod):
        inputs = Inputs(labeled=("none",), unlabeled=("none",), domains=True)

        @dataclass
        class Config(MethodConfig):
            label_smoothing: float = 0.0

        def training_step(self, batch, ctx):
            self.seen = {k: v for k, v in batch.items()}
            return super().training_step(batch, ctx)


def test_every_domain_is_split_in_and_out_the_same_way_whether_trained_on_or_held_out(tmp_path):
    held = Trainer(dg_cfg(tmp_path, "a", "erm")).splits
    trained = Trainer(dg_cfg(tmp_path, "b", "erm", "data.test_domains=[plain]")).splits
    n = len(load_dataset("digits", "train")) // 3
    test_in, test_out = held.tests["rolled"], held.oracle["rolled"]
    assert len(test_in) + len(test_out) == n and len(test_out) == round(0.2 * n)
    # "rolled" trained on in the second run: its training part is the first run's test part, its
    # validation part the first run's oracle part
    assert torch.equal(trained.domains["rolled"].images, test_in.images)
    assert torch.equal(trained.val_parts["rolled"].images, test_out.images)
    assert set(held.val_parts) == {"plain", "inverted"} and not set(held.oracle) & set(held.val_parts)


def test_validation_is_the_mean_over_training_domains_and_held_out_domains_are_recorded(tmp_path):
    summary = Trainer(dg_cfg(tmp_path, "run", "erm")).fit()
    rec = read_run(tmp_path / "run")
    assert [e["step"] for e in rec.evals] == [2, 4] and rec.test_domains == ("rolled",)
    for e in rec.evals:
        assert e["val_acc"] == pytest.approx((e["val_acc@plain"] + e["val_acc@inverted"]) / 2)
        assert 0 <= e["test_acc@rolled"] <= 1 and 0 <= e["oracle_acc@rolled"] <= 1
    last = rec.evals[-1]
    assert summary["test_acc_last@rolled"] == pytest.approx(last["test_acc@rolled"])
    assert summary["oracle_acc_last@rolled"] == pytest.approx(last["oracle_acc@rolled"])
    assert "training-domain validation" in summary["best_selected_on"]
    best = training_domain_validation([rec], "rolled")
    assert best.step == summary["best_step"] and best.test == pytest.approx(summary["test_acc_best"])


def _rec(tests, hp, rows):
    return RunRecord(tuple(tests), [dict(step=s, **r) for s, r in rows], hp, f"{hp}:{'+'.join(tests)}")


def test_selection_methods_pick_what_domainbed_would():
    # two settings; a run holding out "t" alone and one per other domain holding out ("t", v)
    runs = [
        _rec(["t"], "A", [(1, {"val_acc": 0.5, "test_acc@t": 0.30, "oracle_acc@t": 0.31}),
                          (2, {"val_acc": 0.7, "test_acc@t": 0.40, "oracle_acc@t": 0.41}),
                          (3, {"val_acc": 0.6, "test_acc@t": 0.50, "oracle_acc@t": 0.52})]),
        _rec(["t"], "B", [(1, {"val_acc": 0.65, "test_acc@t": 0.60, "oracle_acc@t": 0.61}),
                          (2, {"val_acc": 0.66, "test_acc@t": 0.45, "oracle_acc@t": 0.40}),
                          (3, {"val_acc": 0.60, "test_acc@t": 0.55, "oracle_acc@t": 0.50})]),
        _rec(["t", "u"], "A", [(1, {"test_acc@u": 0.2}), (2, {"test_acc@u": 0.4}), (3, {"test_acc@u": 0.9})]),
        _rec(["t", "v"], "A", [(1, {"test_acc@v": 0.2}), (2, {"test_acc@v": 0.4}), (3, {"test_acc@v": 0.5})]),
        _rec(["t", "u"], "B", [(1, {"test_acc@u": 0.3}), (2, {"test_acc@u": 0.3}), (3, {"test_acc@u": 0.3})]),
    ]
    # training-domain validation: A's best step is 2 (0.7 > B's best 0.66) -> 0.40
    tdv = training_domain_validation(runs, "t")
    assert (tdv.val, tdv.test, tdv.step, tdv.run) == (0.7, 0.40, 2, "A:t")
    # oracle: last step; A's oracle 0.52 > B's 0.50 -> A's last test 0.50
    orc = oracle(runs, "t")
    assert (orc.val, orc.test, orc.step) == (0.52, 0.50, 3)
    # leave-one-domain-out over domains t, u, v: only A is complete; step means 0.2, 0.4, 0.7 -> step 3
    lodo = leave_one_domain_out(runs, "t", ["t", "u", "v"])
    assert lodo.val == pytest.approx(0.7) and (lodo.test, lodo.step) == (0.50, 3)
    assert leave_one_domain_out(runs[:2], "t", ["t", "u", "v"]) is None


def test_open_set_keeps_known_classes_for_training_and_labels_unknown_ones_as_one_class(tmp_path):
    t = Trainer(dg_cfg(tmp_path, "open", "erm", "data.unknown_classes=[8, 9]"))
    s = t.splits
    assert int(s.train.labels.max()) == 7 and s.train.num_classes == 8 and t.method.info.open_set
    test = s.tests["rolled"]
    assert int(test.labels.max()) == 8 and int((test.labels == 8).sum()) > 0
    assert t.method.info.num_classes == 8


@pytest.mark.parametrize("extra,words", [
    (["data.name=test_skewed_domains", "data.test_domains=[other]", "data.unknown_classes=[8, 9]"],
     "leaves training domain 'narrow' without images of a known class"),
    (["data.unknown_classes=[0, 1, 2, 3, 4, 5, 6, 7, 8]"], "leaves 1 known class"),
    (["data.unknown_classes=[eleven]"], "has no class 'eleven'"),
    (["data.test_domains=[roled]"], "no domain 'roled'. Did you mean 'rolled'"),
    (["data.unlabeled_domains=[plain, inverted]"], "keep at least one labelled domain"),
    (["data.unlabeled_domains=[rolled]"], "share"),
])
def test_bad_domain_recipes_are_one_clear_message(tmp_path, extra, words):
    with pytest.raises((ConfigError, DataError), match=words):
        Trainer(dg_cfg(tmp_path, "bad", "erm", *extra))
    assert not (tmp_path / "bad").exists()


def _needs_two():
    from mentor.methods import BUILTIN

    out = []
    for name, module in sorted(BUILTIN.items()):
        if module.startswith("mentor.generalize.") and getattr(METHODS.get(name), "min_domains", 1) >= 2:
            out.append(name)
    return out


@pytest.mark.parametrize("name", _needs_two())
def test_every_method_that_compares_domains_refuses_one_training_domain(tmp_path, name):
    with pytest.raises(ConfigError, match=f"method {name} compares training domains and needs at least "
                                          "[0-9]; this run trains on 1 \\(plain\\)"):
        Trainer(dg_cfg(tmp_path, "one", name, "data.test_domains=[rolled, inverted]"))
    assert not (tmp_path / "one").exists()


def test_the_methods_that_compare_domains_say_so():
    assert {"irm", "vrex", "groupdro", "mixup", "mldg", "fishr", "coral", "mmd", "dann", "cdann", "medic",
            "normaug"} <= set(_needs_two())


def test_a_method_that_needs_several_training_domains_says_so(tmp_path):
    with pytest.raises(ConfigError, match="needs at least 2; this run trains on 1 \\(plain\\)"):
        Trainer(dg_cfg(tmp_path, "one", "test_two_domains", "data.test_domains=[rolled, inverted]"))
    assert not (tmp_path / "one").exists()


def test_command_line_bad_held_out_domain_is_a_paragraph_not_a_traceback(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["train", "recipes/generalize/rotated_fmnist_erm.yaml", f"out_dir={out}", "data.test_domains=[90]"])
    err = capsys.readouterr().err
    assert code == 1 and "no domain '90'" in err and "Traceback" not in err and not out.exists()


def test_unlabelled_domains_feed_a_per_domain_unlabelled_stream(tmp_path):
    t = Trainer(dg_cfg(tmp_path, "u", "test_unlabeled_domains", "data.unlabeled_domains=[inverted]",
                       "data.unlabeled_ratio=2", "trainer.max_steps=1"))
    assert t.method.info.domain_names == ("plain",) and t.method.info.unlabeled_domains == ("inverted",)
    t.fit()
    seen = t.method.seen
    assert seen["x"].shape[0] == 8 and seen["domain"].tolist() == [0] * 8
    assert seen["u"].shape[0] == 16 and seen["u_domain"].tolist() == [0] * 16
    assert "_u_y" not in seen


def test_few_labels_per_domain_keep_each_domain_as_its_own_unlabelled_pool(tmp_path):
    t = Trainer(dg_cfg(tmp_path, "few", "test_unlabeled_domains", "data.labels_per_class=2",
                       "data.unlabeled_ratio=1", "trainer.max_steps=1"))
    s = t.splits
    assert [len(d) for d in s.domains.values()] == [20, 20]
    assert list(s.unlabeled_domains) == ["plain", "inverted"]
    t.fit()
    assert t.method.seen["u_domain"].tolist() == [0] * 8 + [1] * 8


def test_every_dg_method_reports_open_set_numbers_in_an_open_set_run(tmp_path):
    summary = Trainer(dg_cfg(tmp_path, "erm_open", "erm", "data.unknown_classes=[8, 9]")).fit()
    for key in ("closed_acc", "h_score", "oscr", "known_acc", "unknown_acc"):
        assert 0.0 <= summary[f"test_{key}_last@rolled"] <= 1.0
    assert summary["test_acc_last"] == summary["test_closed_acc_last"]  # closed accuracy over the known images

"""The small shift and source run the adaptation tests share: the UCI digits test split clean, darkened and
inverted (``test_digit_shift``), and a 30-step BN network trained on the clean digits."""

from _helpers import BNNet  # noqa: F401  (registers test_bncnn)

from mentor.config import load_config
from mentor.data import ArrayDataset, load_dataset
from mentor.data.domains import DOMAIN_SETS, DomainSet, register_domains
from mentor.engine import train


def digit_shift(root=None, classes=10, **_):
    ds = load_dataset("digits", "test")
    keep = ds.labels < classes

    def part(images):
        return ArrayDataset(images[keep].contiguous(), ds.labels[keep], classes, "digits", ds.classes[:classes],
                            ds.mean, ds.std)

    return DomainSet("test_digit_shift", {"clean": part(ds.images), "dark": part(ds.images // 2),
                                          "inverted": part(255 - ds.images)})


if "test_digit_shift" not in DOMAIN_SETS:
    register_domains("test_digit_shift")(digit_shift)
    register_domains("test_three_classes")(lambda root=None, **kw: digit_shift(classes=3))


def train_bn_source(tmp_path_factory):
    """A run directory: ``test_bncnn`` trained 30 steps on the clean digits (the source of the shift)."""
    out = tmp_path_factory.mktemp("source") / "run"
    train(load_config(None, [f"out_dir={out}", "data.name=digits", "data.val_size=200", "data.batch_size=32",
                             "data.padding=1", "data.flip=false", "model.name=test_bncnn", "trainer.max_steps=30",
                             "trainer.eval_every=30", "trainer.ckpt_every=30", "trainer.progress=false",
                             "optim.lr=0.1"]))
    return out

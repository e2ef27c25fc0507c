"""Teachers load from run directories, are frozen, and mismatches are clear errors."""

import pytest
import torch

from mentor.distill import TeacherError, load_teacher
from mentor.methods import BuildInfo

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    from mentor.config import load_config
    from mentor.engine import train

    out = tmp_path_factory.mktemp("t") / "teacher"
    train(load_config(None, [f"out_dir={out}", "data.name=digits", "data.val_size=200", "data.batch_size=32",
                             "data.flip=false", "model.name=resnet8", "trainer.max_steps=6", "trainer.eval_every=3",
                             "trainer.ckpt_every=3", "trainer.progress=false"]))
    return out


DIGITS = BuildInfo(num_classes=10, in_channels=1, image_size=8)


def test_loads_best_and_last_to_the_frozen_trained_network(digits_teacher):
    best = torch.load(digits_teacher / "best.pt", weights_only=True)
    net = load_teacher(digits_teacher, DIGITS)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, best["model"][k]), k
    last = torch.load(digits_teacher / "last.pt", weights_only=True)
    net_last = load_teacher(digits_teacher / "last.pt", DIGITS)
    for k, v in net_last.state_dict().items():
        assert torch.equal(v, last["method"]["student." + k]), k


@pytest.mark.parametrize("field,value,word", [("num_classes", 100, "classes"), ("in_channels", 3, "input channels"),
                                              ("image_size", 28, "image size")])
def test_mismatch_is_a_clear_error(digits_teacher, field, value, word):
    info = BuildInfo(**{**DIGITS.__dict__, field: value})
    with pytest.raises(TeacherError, match=word) as e:
        load_teacher(digits_teacher, info)
    assert "resnet8" in str(e.value) and "digits" in str(e.value)


def test_missing_or_empty_teacher(tmp_path):
    with pytest.raises(TeacherError, match="not found"):
        load_teacher(tmp_path / "nope", DIGITS)
    with pytest.raises(TeacherError, match="no best.pt or last.pt"):
        load_teacher(tmp_path, DIGITS)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match="cannot be read"):
        load_teacher(bad, DIGITS)

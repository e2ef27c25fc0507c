"""The command line: exit codes and messages a user sees, and the eval of a finished run."""

import json

import pytest
import yaml

from mentor.cli import main

pytest.importorskip("sklearn")

TINY = ["data.name=digits", "data.val_size=200", "data.batch_size=32", "model.name=resnet8", "data.flip=false",
        "trainer.max_steps=6", "trainer.eval_every=3", "trainer.ckpt_every=3", "trainer.log_every=3",
        "trainer.progress=false"]


def recipe(tmp_path, data=None):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data or {"method": {"name": "supervised"}}))
    return str(p)


def test_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", recipe(tmp_path), f"out_dir={out}", *TINY, "--json"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{\n"):]) == json.loads((out / "summary.json").read_text())
    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = json.loads((out / "summary.json").read_text())
    assert result["checkpoint"].endswith("best.pt")
    assert result["step"] == expected["best_step"]
    assert result["val_acc"] == pytest.approx(expected["val_acc_best"])
    assert result["test_acc"] == pytest.approx(expected["test_acc_best"])
    assert main(["eval", str(out / "last.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_acc"] == pytest.approx(expected["test_acc_last"])


def test_unknown_key_exits_2_with_suggestion(tmp_path, capsys):
    assert main(["train", recipe(tmp_path), "optim.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "Did you mean 'lr'" in err


def test_unknown_model_and_dataset_are_clear(tmp_path, capsys):
    assert main(["train", recipe(tmp_path), f"out_dir={tmp_path / 'x'}", *TINY, "model.name=resnet9"]) == 2
    err = capsys.readouterr().err
    assert "model.name" in err and "resnet8" in err
    assert main(["train", recipe(tmp_path), f"out_dir={tmp_path / 'z'}", *TINY, "data.augment=weka"]) == 2
    err = capsys.readouterr().err
    assert "data.augment" in err and "'weak'" in err
    assert main(["train", recipe(tmp_path), f"out_dir={tmp_path / 'y'}", *TINY, "data.name=fmnist"]) == 1
    assert "fashion_mnist" in capsys.readouterr().err


def test_eval_of_a_non_run_is_clear(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 1
    assert "run directory" in capsys.readouterr().err


def test_list_and_data_info(capsys):
    assert main(["list", "models", "wrn*"]) == 0
    assert capsys.readouterr().out.split() == ["wrn_16_1", "wrn_16_2", "wrn_28_2", "wrn_28_8", "wrn_40_1", "wrn_40_2"]
    assert main(["list", "methods"]) == 0
    assert "supervised" in capsys.readouterr().out.split()
    assert main(["data", "info", "digits"]) == 0
    assert "digits" in capsys.readouterr().out

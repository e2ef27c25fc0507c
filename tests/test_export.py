"""mentor export: every format gives back the trained network's logits, a SimKD run rebuilds its wrapper from
its checkpoint alone, the zoo scripts with TorchScript, mentor eval reads exported files, bad requests write
nothing."""

import json
import shutil
import sys

import pytest
import torch
import yaml
from _adapt_shift import digit_shift  # noqa: F401  (registers the test_digit_shift domain set)

from mentor.cli import main
from mentor.config import load_config
from mentor.engine import Trainer
from mentor.engine.deployable import build_deployable
from mentor.engine.exported import load_exported, read_sidecar
from mentor.engine.run import evaluate_run
from mentor.errors import ExportError
from mentor.export import FORMATS, SUFFIX, export_run
from mentor.models import StagedNet, create_model, list_models

pytest.importorskip("sklearn")
# torch 2.13 deprecates TorchScript in favour of torch.export; mentor export still offers it (and says so)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DIGITS = ["data.name=digits", "data.val_size=200", "data.batch_size=64", "data.padding=1", "data.flip=false",
          "trainer.log_every=20", "trainer.progress=false"]


def _run(out, *extra):
    """A finished run in ``out`` (one evaluation, at the last step: best.pt holds the final weights) and its
    trained network, in memory."""
    trainer = Trainer(load_config(None, [f"out_dir={out}", *DIGITS, *extra]))
    trainer.fit()
    return out, trainer


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A ResNet-8 trained 20 steps on the digits (about 65% test accuracy)."""
    return _run(tmp_path_factory.mktemp("plain") / "run", "model.name=resnet8", "optim.lr=0.1",
                "trainer.max_steps=20", "trainer.eval_every=20", "trainer.ckpt_every=20")


@pytest.fixture(scope="module")
def simkd(tmp_path_factory, digits_teacher):
    """A WRN-16-2 student (128 channels) distilled by SimKD from the session's ResNet-8 teacher (64)."""
    return _run(tmp_path_factory.mktemp("simkd") / "run", "model.name=wrn_16_2", "method.name=simkd",
                f"method.teacher={digits_teacher}", "optim.lr=0.05", "trainer.max_steps=8", "trainer.eval_every=8",
                "trainer.ckpt_every=8")


@pytest.fixture(scope="module")
def runs(plain, simkd):
    return {"plain": plain, "simkd": simkd}


def _batch(trainer, n=16):
    """Real validation images, normalised as the run normalises them (computed here, not by the engine)."""
    split = trainer.splits.val
    mean = torch.tensor(split.mean).view(1, -1, 1, 1)
    std = torch.tensor(split.std).view(1, -1, 1, 1)
    return (split.images[:n].float() / 255.0 - mean) / std


def _no_temporaries(folder):
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("which", ["plain", "simkd"])
def test_every_format_gives_back_the_trained_networks_logits_and_accuracy(runs, which, fmt, tmp_path):
    run, trainer = runs[which]
    file = tmp_path / f"net{SUFFIX[fmt]}"
    export_run(run, fmt, out=file)
    x = _batch(trainer)
    with torch.no_grad():
        expected = trainer.method.deployable().eval()(x)
        got = load_exported(file)(x)
    assert got.shape == expected.shape == (16, 10)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 if fmt == "onnx" else 0.0)

    meta = json.loads((tmp_path / f"net{SUFFIX[fmt]}.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    recipe = yaml.safe_load((run / "config.yaml").read_text())
    assert meta["format"] == fmt and meta["file"] == file.name
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["input"]["shape"] == [1, 8, 8] and meta["input"]["normalized"] is True
    assert meta["input"]["mean"] == pytest.approx(list(trainer.splits.reference.mean))
    assert meta["input"]["std"] == pytest.approx(list(trainer.splits.reference.std))
    assert meta["test_acc"] == summary["test_acc_best"] and meta["test_acc_key"] == "test_acc_best"
    assert meta["recipe"]["model"] == recipe["model"] and meta["recipe"]["method"]["name"] == recipe["method"]["name"]
    assert meta["versions"]["torch"] == str(torch.__version__) and meta["versions"]["mentor"]
    assert meta["check"]["ok"] and meta["check"]["max_abs_diff"] <= meta["check"]["atol"]
    assert (meta["deployable"] or {}).get("kind") == (None if which == "plain" else "simkd")
    assert _no_temporaries(tmp_path)

    # mentor eval reads the exported file and scores it as it scores the run
    assert evaluate_run(file) == {**_run_numbers(run), "checkpoint": str(file), "format": fmt,
                                  "source_test_acc": summary["test_acc_best"]}


_EVAL: dict = {}


def _run_numbers(run):
    if run not in _EVAL:
        result = evaluate_run(run)
        _EVAL[run] = {"val_acc": result["val_acc"], "test_acc": result["test_acc"]}
        assert 0.0 < result["test_acc"] <= 1.0
    return _EVAL[run]


def test_the_cli_exports_beside_the_run_and_eval_prints_the_same_accuracy(plain, capsys):
    run, _ = plain
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    printed = capsys.readouterr().out
    file = run / "export" / "resnet8.ts"
    assert file.is_file() and (run / "export" / "resnet8.ts.json").is_file()
    assert str(file) in printed and "max |diff|" in printed and "does not normalise" in printed
    assert main(["eval", str(file), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert (exported["val_acc"], exported["test_acc"]) == (trained["val_acc"], trained["test_acc"])


@pytest.mark.parametrize("checkpoint", ["best", "last"])
def test_ema_weights_export_from_either_checkpoint(tmp_path, checkpoint):
    run, trainer = _run(tmp_path / "ema", "model.name=resnet8", "optim.lr=0.1", "trainer.ema=0.9",
                        "trainer.max_steps=6", "trainer.eval_every=6", "trainer.ckpt_every=6")
    meta = export_run(run, "torch", out=tmp_path / "ema.pt", ema=True, checkpoint=checkpoint)
    assert meta["source"]["weights"] == "ema" and meta["source"]["checkpoint"].endswith(f"{checkpoint}.pt")
    x = _batch(trainer)
    with torch.no_grad():
        ema = trainer.ema.module.eval()(x)
        assert torch.equal(load_exported(tmp_path / "ema.pt")(x), ema)
        assert not torch.allclose(trainer.method.deployable()(x), ema)  # the EMA copy is another network


# -- SimKD: the checkpoint says how to rebuild its network ------------------------------------------------

def test_a_simkd_checkpoint_rebuilds_its_wrapper_without_the_teacher_run(simkd, digits_teacher, monkeypatch):
    run, trainer = simkd
    state = torch.load(run / "best.pt", weights_only=True)
    info = state["info"]
    assert info["model"] == "wrn_16_2"
    assert info["deployable"] == {"kind": "simkd", "teacher": {"model": "resnet8", "kwargs": {}},
                                  "channels": [128, 64], "factor": 2, "size": [2, 2]}
    # what `model: wrn_16_2` alone builds cannot hold these weights (the projector, the teacher's head)
    with pytest.raises(RuntimeError):
        create_model("wrn_16_2", num_classes=10, in_channels=1).load_state_dict(state["model"])

    import mentor.distill.base
    import mentor.engine.teacher

    def no_teacher(*_):
        raise AssertionError("the teacher's run was read")
    monkeypatch.setattr(mentor.engine.teacher, "load_teacher", no_teacher)
    monkeypatch.setattr(mentor.distill.base, "load_teacher", no_teacher)
    net = build_deployable(info)
    net.load_state_dict(state["model"])  # strict: the same entries and shapes
    assert type(net).__name__ == "ReusedHeadNet"
    x = _batch(trainer)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), trainer.method.deployable()(x))
    # a checkpoint written before the spec existed rebuilds the bare model, as it always did
    assert type(build_deployable({k: v for k, v in info.items() if k != "deployable"})).__name__ == "WideResNet"


def test_init_from_a_simkd_run_says_what_it_holds(simkd, tmp_path):
    from mentor.errors import ConfigError

    run, _ = simkd
    with pytest.raises(ConfigError, match="simkd network built around a wrn_16_2"):
        Trainer(load_config(None, [f"out_dir={tmp_path / 'x'}", *DIGITS, "model.name=wrn_16_2",
                                   f"model.init_from={run}", "trainer.max_steps=2"]))


def test_simkd_safetensors_load_into_the_wrapper_the_sidecar_rebuilds(simkd, tmp_path):
    from safetensors.torch import load_file

    run, trainer = simkd
    file = tmp_path / "simkd.safetensors"
    export_run(run, "safetensors", out=file)
    meta = read_sidecar(file)
    net = build_deployable(meta["info"])
    net.load_state_dict(load_file(str(file)))  # strict
    x = _batch(trainer)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), trainer.method.deployable()(x))
    assert meta["rebuild"].startswith("mentor.engine.deployable.build_deployable")


def test_a_simkd_run_serves_as_a_teacher(simkd):
    from mentor.engine.teacher import load_teacher
    from mentor.methods import BuildInfo

    run, trainer = simkd
    teacher = load_teacher(str(run), BuildInfo(num_classes=10, in_channels=1, image_size=8))
    x = _batch(trainer)
    with torch.no_grad():
        assert torch.equal(teacher(x), trainer.method.deployable()(x))
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("name", ["normaug", "multimatch", "arfnet", "medic", "dsbf"])
def test_other_wrappers_rebuild_from_their_spec(name):
    """NormAUG and MultiMatch ship an ensemble over BatchNorm branches, ARFNet its fused network, MEDIC and DSBF
    the student with another head: each records a spec from which an untrained copy with the same entries is
    built."""
    from mentor.methods import BuildInfo, create_method

    torch.manual_seed(0)
    info = BuildInfo(num_classes=10, in_channels=1, image_size=8, num_domains=3, domain_names=("a", "b", "c"),
                     unlabeled_domains=("d",) if name == "dsbf" else (), train_size=64, unlabeled_size=64)
    method = create_method(name, create_model("resnet8", num_classes=10, in_channels=1), info).eval()
    deployable = method.deployable()
    with torch.no_grad():  # trained-looking weights and statistics, so a copy that ignored them would differ
        for v in deployable.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.rand_like(v) * 0.5)
    spec = method.deployable_spec()
    assert spec["kind"] == name
    rebuilt = build_deployable({"model": "resnet8", "kwargs": {}, "num_classes": 10, "in_channels": 1,
                                "image_size": 8, "deployable": json.loads(json.dumps(spec))})
    rebuilt.load_state_dict(deployable.state_dict())  # strict
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), deployable(x))


# -- TorchScript -----------------------------------------------------------------------------------------

SMALL = ["resnet8", "resnet20", "resnet8x4", "wrn_16_1", "vgg8", "mobilenetv2", "shufflenetv1", "shufflenetv2",
         "vit_tiny", "gfnet_tiny"]
# every other zoo classifier (edm_unet and amed_predictor belong to diffusion; test_* are the suite's own networks)
DIFFUSION = {"edm_unet", "amed_predictor"}
LARGE = [n for n in list_models() if n not in SMALL and n not in DIFFUSION and not n.startswith("test_")]


def _script_matches_eager(name):
    kwargs = {"image_size": 8, "patch_size": 2} if name.startswith(("vit", "gfnet")) else {}
    torch.manual_seed(0)
    net = create_model(name, num_classes=10, in_channels=1, **kwargs).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        h = x
        for stage in net.stage_names:  # the staged forward, composed by hand
            h = getattr(net, stage)(h)
        if hasattr(net, "head"):
            h = net.head(h)
        manual = net.fc(net.pool(h))
        assert torch.allclose(net(x), manual, atol=1e-6)
        assert torch.allclose(scripted(x), manual, atol=1e-5)


@pytest.mark.parametrize("name", SMALL)
def test_torch_jit_script_compiles_the_zoo(name):
    _script_matches_eager(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_torch_jit_script_compiles_the_larger_zoo_networks(name):
    _script_matches_eager(name)


def test_a_staged_net_with_a_head_scripts():
    net = StagedNet(torch.nn.Conv2d(1, 4, 3, padding=1), [torch.nn.Conv2d(4, 6, 3, stride=2), torch.nn.ReLU()], 5,
                    3, head=torch.nn.Conv2d(6, 5, 1)).eval()
    x = torch.randn(2, 1, 9, 9)
    expected = net.fc(net.pool(net.head(net.layer2(net.layer1(net.stem(x))))))
    assert torch.allclose(torch.jit.script(net)(x), expected, atol=1e-6)


# -- ONNX ------------------------------------------------------------------------------------------------

def test_the_onnx_file_runs_in_onnxruntime_with_any_batch_size(plain, tmp_path):
    import onnxruntime as ort

    run, trainer = plain
    file = tmp_path / "net.onnx"
    meta = export_run(run, "onnx", out=file)
    assert meta["check"]["what"].startswith("onnxruntime") and meta["check"]["ok"]
    assert meta["onnx"]["exporter"] in ("torchscript", "dynamo") and meta["versions"]["onnxruntime"]
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    net = trainer.method.deployable().eval()
    for n in (1, 7):
        x = _batch(trainer, n)
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        with torch.no_grad():
            assert torch.allclose(got, net(x), atol=1e-4)


# -- mentor adapt --save-model ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["bn_ema", "rotta"])  # rotta: robust BN layers, saved as BatchNorm's entries
def test_an_adapted_network_is_saved_and_exported(plain, tmp_path, method):
    run, trainer = plain
    out = tmp_path / "adapt"
    assert main(["adapt", str(run), "--shift", "test_digit_shift", "--setting", "continual", f"method.name={method}",
                 "data.batch_size=64", f"out_dir={out}", "--save-model"]) == 0
    state = torch.load(out / "adapted.pt", weights_only=True)
    assert state["adapted"]["method"] == method and state["info"]["model"] == "resnet8"
    source = torch.load(run / "best.pt", weights_only=True)["model"]
    # the test streams moved the BatchNorm statistics
    assert not torch.equal(state["model"]["stem.1.running_mean"], source["stem.1.running_mean"])
    if method == "bn_ema":  # which trains nothing
        assert torch.equal(state["model"]["stem.0.weight"], source["stem.0.weight"])

    file = tmp_path / "adapted.safetensors"
    assert main(["export", str(out), "--format", "safetensors", "--out", str(file)]) == 0
    meta = read_sidecar(file)
    assert meta["adapted"]["shift"] == "test_digit_shift" and meta["recipe"]["model"]["name"] == "resnet8"
    net = create_model("resnet8", num_classes=10, in_channels=1)
    net.load_state_dict(state["model"])
    x = _batch(trainer)
    with torch.no_grad():
        assert torch.equal(load_exported(file)(x), net.eval()(x))
    assert 0.0 <= evaluate_run(file)["test_acc"] <= 1.0
    if method == "rotta":
        return
    other = tmp_path / "b"
    assert main(["adapt", str(run), "--shift", "test_digit_shift", "method.name=norm", f"out_dir={other}"]) == 0
    assert not (other / "adapted.pt").exists()  # only on request


# -- bad requests: one clear message, nothing written ----------------------------------------------------

def _fails(capsys, argv, words, code=1):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("mentor: ") and "Traceback" not in err
    for w in words:
        assert w in err, err
    return err


def test_bad_requests_are_clear_and_write_nothing(plain, tmp_path, capsys, monkeypatch):
    run, _ = plain
    out = tmp_path / "out"
    out.mkdir()
    _fails(capsys, ["export", str(tmp_path / "missing"), "--format", "onnx", "--out", str(out / "a.onnx")],
           ["not found"])
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, ["export", str(empty), "--format", "onnx"], ["run directory"])
    assert not list(empty.iterdir())
    only_last = tmp_path / "only_last"
    only_last.mkdir()
    shutil.copy(run / "last.pt", only_last / "last.pt")
    _fails(capsys, ["export", str(only_last), "--format", "torch", "--checkpoint", "best"], ["best.pt"])
    _fails(capsys, ["export", str(run), "--format", "torch", "--ema", "--out", str(out / "e.pt")], ["trainer.ema"])
    with pytest.raises(SystemExit) as e:
        main(["export", str(run), "--format", "tflite"])
    assert e.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(ExportError, match="tflite"):
        export_run(run, "tflite", out=out / "x.tflite")

    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    _fails(capsys, ["export", str(run), "--format", "safetensors", "--out", str(out / "s.safetensors")],
           ["pip install 'mentor[export]'"])
    monkeypatch.undo()

    import mentor.export

    monkeypatch.setattr(mentor.export, "_tolerance", lambda ref: -1.0)  # every check fails
    _fails(capsys, ["export", str(run), "--format", "onnx", "--out", str(out / "c.onnx")], ["nothing was written"])
    monkeypatch.undo()
    assert not list(out.iterdir())  # no file, no sidecar, no temporary

    good = tmp_path / "good.onnx"
    export_run(run, "onnx", out=good)
    alone = out / "alone.onnx"
    shutil.copy(good, alone)  # without its sidecar
    _fails(capsys, ["eval", str(alone)], ["sidecar"])

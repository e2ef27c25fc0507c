"""Networks from the ecosystem: timm:/torchvision: names (stand-in packages), a user's file.py:build_fn,
local weights files (model.weights), stages found from the module tree, and teachers given as a network
with its weights."""

import subprocess
import sys
import textwrap
import types

import pytest
import torch
import yaml
from torch import nn

from mentor.config import ConfigError, load_config
from mentor.engine import train
from mentor.engine.teacher import TeacherSpec, load_teacher, parse_teacher
from mentor.errors import TeacherError
from mentor.methods import BuildInfo
from mentor.models import (
    FeatureTap,
    ModelSpecError,
    attach_stages,
    build_network,
    create_model,
    discover_stages,
    read_weights,
    stage_names,
)

pytest.importorskip("sklearn")

TINY = ["data.name=digits", "data.val_size=200", "data.batch_size=32", "data.flip=false", "trainer.max_steps=4",
        "trainer.eval_every=2", "trainer.ckpt_every=2", "trainer.log_every=2", "trainer.progress=false",
        "trainer.device=cpu"]
DIGITS = BuildInfo(num_classes=10, in_channels=1, image_size=8)


# -- stand-ins for torchvision's and timm's networks -------------------------------------------------------


class Block(nn.Module):
    """torchvision's BasicBlock layout: one ReLU module called twice, a strided downsample branch."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchvisionResNet(nn.Module):
    """torchvision.models.ResNet's module tree: conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc."""

    def __init__(self, num_classes: int = 1000, widths=(4, 8, 8, 16)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, w in enumerate(widths, start=1):
            self.add_module(f"layer{i}", nn.Sequential(Block(cin, w, 1 if i == 1 else 2), Block(w, w, 1)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TimmNet(nn.Module):
    """A timm-style network whose feature_info names dotted stages."""

    def __init__(self, num_classes: int, in_chans: int, width: int = 4):
        super().__init__()
        self.conv_stem = nn.Conv2d(in_chans, width, 3, 1, 1)
        self.act1 = nn.ReLU()
        self.stages = nn.Sequential(nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU()),
                                    nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, 2, 1), nn.ReLU()))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        self.feature_info = [dict(num_chs=width, reduction=1, module="act1"),
                             dict(num_chs=2 * width, reduction=2, module="stages.0"),
                             dict(num_chs=4 * width, reduction=4, module="stages.1")]

    def forward(self, x):
        return self.fc(self.global_pool(self.stages(self.act1(self.conv_stem(x)))).flatten(1))


@pytest.fixture
def fake_timm(monkeypatch):
    calls = []

    def create_model_(name, pretrained=False, num_classes=1000, in_chans=3, **kw):
        calls.append(dict(name=name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kw))
        if name != "tinynet":
            raise RuntimeError(f"Unknown model ({name})")
        return TimmNet(num_classes, in_chans, **kw)

    module = types.ModuleType("timm")
    module.create_model = create_model_
    monkeypatch.setitem(sys.modules, "timm", module)
    return calls


@pytest.fixture
def fake_torchvision(monkeypatch):
    calls = []

    def get_model(name, weights=None, num_classes=1000, **kw):
        calls.append(dict(name=name, weights=weights, num_classes=num_classes, **kw))
        if name != "resnet18":
            raise ValueError(f"Unknown model {name}")
        return TorchvisionResNet(num_classes, **kw)

    package, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    models.get_model = get_model
    package.models = models
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return calls


# -- timm: and torchvision: -----------------------------------------------------------------------------


def test_timm_names_are_built_without_weights_for_the_data(fake_timm):
    net = create_model("timm:tinynet", num_classes=7, in_channels=1, width=3)
    assert fake_timm == [dict(name="tinynet", pretrained=False, num_classes=7, in_chans=1, width=3)]
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 7) and net.conv_stem.in_channels == 1
    # its feature_info gives the stages, dotted names included, and feature methods tap them
    assert stage_names(net) == ("act1", "stages.0", "stages.1")
    with FeatureTap(net, stage_names(net)[1:]) as tap:
        net(torch.zeros(2, 1, 8, 8))
        assert [tuple(tap[n].shape) for n in ("stages.0", "stages.1")] == [(2, 6, 4, 4), (2, 12, 2, 2)]
    with pytest.raises(ModelSpecError, match=r"timm cannot build 'nosuch'.*Unknown model"):
        create_model("timm:nosuch", num_classes=7, in_channels=1)
    with pytest.raises(ModelSpecError, match="pretrained.*never downloaded"):
        create_model("timm:tinynet", num_classes=7, in_channels=1, pretrained=True)


def test_torchvision_names_adapt_the_first_conv_to_the_input_channels(fake_torchvision):
    rgb = create_model("torchvision:resnet18", num_classes=5, in_channels=3)
    assert fake_torchvision[-1] == dict(name="resnet18", weights=None, num_classes=5)
    assert rgb.conv1.in_channels == 3 and rgb.fc.out_features == 5
    gray = create_model("torchvision:resnet18", num_classes=5, in_channels=1)
    c = gray.conv1
    assert (c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.bias) == (1, 4, (7, 7), (2, 2),
                                                                                        (3, 3), None)
    assert gray(torch.zeros(2, 1, 32, 32)).shape == (2, 5)
    with pytest.raises(ModelSpecError, match="torchvision cannot build 'resnet9'"):
        create_model("torchvision:resnet9", num_classes=5)


def test_a_missing_or_broken_package_names_the_zoo_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(ModelSpecError, match=r"needs timm.*pip install 'mentor\[zoo\]'"):
        create_model("timm:resnet18", num_classes=10)
    broken = tmp_path / "site" / "torchvision"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.delitem(sys.modules, "torchvision.models", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(ModelSpecError, match=r"RuntimeError: operator torchvision::nms.*mentor\[zoo\]"):
        create_model("torchvision:resnet18", num_classes=10)
    # a recipe naming it fails with the key and the extra, before any training
    with pytest.raises(ConfigError, match=r"model.name=timm:resnet18.*mentor\[zoo\]"):
        build_network("timm:resnet18", 10, 1, 8)


def _importable(module: str) -> str:
    """'' when ``module`` imports in a fresh interpreter, else its error (last line)."""
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    return "" if r.returncode == 0 else (r.stderr.strip().splitlines() or ["failed"])[-1]


@pytest.mark.parametrize("name,module", [("timm:resnet18", "timm"), ("torchvision:resnet18", "torchvision.models")])
def test_the_real_packages_when_they_import(name, module):
    problem = _importable(module)
    if problem:
        pytest.skip(f"{module} does not import here ({problem}); the zoo extra is optional")
    net = build_network(name, num_classes=10, in_channels=1, image_size=32)
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    assert len(stage_names(net)) >= 4


# -- stages from the module tree ----------------------------------------------------------------------------


def test_stages_of_a_resnet_like_module_are_the_last_map_at_each_resolution():
    net = TorchvisionResNet(10)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    assert discover_stages(net, (3, 64, 64)) == ("relu", "layer1", "layer2", "layer3", "layer4")
    assert net.training and torch.equal(torch.get_rng_state(), rng)  # mode and random state as they were
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # no BN statistics moved
    attach_stages(net, (3, 64, 64))
    with FeatureTap(net, stage_names(net)) as tap:
        net(torch.zeros(1, 3, 64, 64))
        sizes = [tap[n].shape[-1] for n in stage_names(net)]
    assert sizes == [32, 16, 8, 4, 2]


def test_stages_of_a_features_sequential_and_a_shared_activation():
    features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    vgg = nn.Sequential()
    vgg.add_module("features", features)
    vgg.add_module("pool", nn.AdaptiveAvgPool2d(1))
    vgg.add_module("flat", nn.Flatten())
    vgg.add_module("fc", nn.Linear(8, 3))
    # descends into `features` (three resolutions): the last module at 16, 8 and 4 pixels
    assert discover_stages(vgg, (1, 16, 16)) == ("features.1", "features.4", "features.5")

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, 2, 1), nn.ReLU()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.act(self.b(self.act(self.a(x)))).mean((2, 3)))

    # `act` runs at both resolutions, so a tap on it would record the second call: never a stage
    assert discover_stages(Shared(), (1, 8, 8)) == ("a", "b")
    assert discover_stages(nn.Linear(4, 2), (1, 8, 8)) == ()  # no maps, or a forward that fails: none


# -- a user's file.py:build_fn ------------------------------------------------------------------------------

NET_PY = '''
import torch
from torch import nn


class Small(nn.Module):
    def __init__(self, num_classes, in_channels, width):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def build(num_classes, in_channels, width=4):
    return Small(num_classes, in_channels, width)


def not_a_net(num_classes, in_channels):
    return 3


def fixed(num_classes):
    return Small(num_classes, 1, 4)


def broken(num_classes, in_channels):
    raise ValueError("no such width")
'''


@pytest.fixture
def net_py(tmp_path):
    path = tmp_path / "nets" / "net.py"
    path.parent.mkdir()
    path.write_text(textwrap.dedent(NET_PY))
    return path


def test_a_build_function_from_a_file_gets_classes_channels_kwargs_and_stages(net_py):
    net = build_network(f"{net_py}:build", num_classes=6, in_channels=1, image_size=8, kwargs={"width": 3})
    assert net.conv1.in_channels == 1 and net.conv1.out_channels == 3 and net.fc.out_features == 6
    assert stage_names(net) == ("act1", "act2")  # 8x8, then 4x4 after the strided conv


def test_file_models_fail_clearly(net_py, tmp_path):
    with pytest.raises(ModelSpecError, match=r"the file '.*missing.py' not found.*relative to the current directory"):
        create_model(f"{tmp_path}/missing.py:build", num_classes=3)
    with pytest.raises(ModelSpecError, match=r"'biuld' is not defined there. Did you mean 'build'\?"):
        create_model(f"{net_py}:biuld", num_classes=3)
    with pytest.raises(ModelSpecError, match=r"not_a_net\(\) in .* returned a int, not a torch.nn.Module"):
        create_model(f"{net_py}:not_a_net", num_classes=3)
    with pytest.raises(ModelSpecError, match=r"fixed\(\) takes no argument 'in_channels'"):
        create_model(f"{net_py}:fixed", num_classes=3)
    with pytest.raises(ModelSpecError, match=r"broken\(num_classes=3, in_channels=1\) failed \(ValueError: no such"):
        create_model(f"{net_py}:broken", num_classes=3, in_channels=1)
    bad = tmp_path / "bad.py"
    bad.write_text("import no_such_module_here\n")
    with pytest.raises(ModelSpecError, match=r"running .*bad.py failed \(ModuleNotFoundError"):
        create_model(f"{bad}:build", num_classes=3)


# -- model.weights ------------------------------------------------------------------------------------------


def test_weights_files_load_exactly_in_every_layout(net_py, tmp_path):
    from safetensors.torch import save_file

    src = create_model(f"{net_py}:build", num_classes=10, in_channels=1)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "nested.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    for file in ("plain.pt", "nested.pth", "w.safetensors"):
        torch.manual_seed(123)  # another initialisation than src's
        net = build_network(f"{net_py}:build", 10, 1, 8, weights=tmp_path / file)
        loaded = net.state_dict()
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state), file
    assert read_weights(tmp_path / "nested.pth").keys() == state.keys()


def test_a_weights_file_that_does_not_fit_is_a_clear_error(net_py, tmp_path):
    other = create_model(f"{net_py}:build", num_classes=10, in_channels=1, width=5)
    torch.save(other.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ConfigError, match=r"model.weights=.*wide.pt: .*wide.pt does not fit .*shapes differ: "
                                          r"conv1.weight is \(5, 1, 3, 3\) in the checkpoint but \(4, 1, 3, 3\) here"):
        build_network(f"{net_py}:build", 10, 1, 8, weights=tmp_path / "wide.pt")
    torch.save({"conv1.weight": torch.zeros(4, 1, 3, 3)}, tmp_path / "part.pt")
    with pytest.raises(ConfigError, match=r"part.pt: .*part.pt does not fit .*missing 5 tensors \(conv1.bias, "):
        build_network(f"{net_py}:build", 10, 1, 8, weights=tmp_path / "part.pt")
    with pytest.raises(ConfigError, match=r"model.weights=.*nope.pt: the weights file .*nope.pt is not found"):
        build_network("resnet8", 10, 1, 8, weights=tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="never downloaded"):
        build_network("resnet8", 10, 1, 8, weights="https://example.org/r8.pt")
    (tmp_path / "junk.pt").write_bytes(b"not weights at all")
    with pytest.raises(ConfigError, match=r"junk.pt: .*junk.pt cannot be read as torch weights"):
        build_network("resnet8", 10, 1, 8, weights=tmp_path / "junk.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(ConfigError, match=r"meta.pt: .*meta.pt holds a mapping with keys \['epoch', 'lr'\]"):
        build_network("resnet8", 10, 1, 8, weights=tmp_path / "meta.pt")
    with pytest.raises(ConfigError, match="model.weights=.* and model.init_from=.* keep one"):
        load_config(None, ["model.weights=w.pt", "model.init_from=runs/x", *TINY])


# -- teachers given as a network and its weights ------------------------------------------------------------


def test_teacher_strings(tmp_path):
    (tmp_path / "run").mkdir()
    assert parse_teacher(tmp_path / "run") is None  # an existing path is a run
    assert parse_teacher("runs/not/there") is None  # load_teacher says it is not found
    assert parse_teacher("timm:resnet18@w/r18.safetensors") == TeacherSpec("timm:resnet18", "w/r18.safetensors")
    assert parse_teacher("mobilenetv2(width_mult=0.5, x=[1, 2])@m.pt") == TeacherSpec(
        "mobilenetv2", "m.pt", {"width_mult": 0.5, "x": [1, 2]})
    assert parse_teacher("nets/t.py:build") == TeacherSpec("nets/t.py:build")  # the function loads its weights
    with pytest.raises(TeacherError, match="needs trained weights; write resnet8@FILE"):
        parse_teacher("resnet8")
    with pytest.raises(TeacherError, match="key=value pairs of Python literals"):
        parse_teacher("resnet8(0.5)@w.pt")
    with pytest.raises(TeacherError, match="'resnett8' is no model name"):
        parse_teacher("resnett8@w.pt")
    with pytest.raises(TeacherError, match=r"not found.*or MODEL@WEIGHTS"):
        load_teacher("runs/not/there", DIGITS)


def test_a_file_model_trains_as_student_and_teaches_kd_from_its_weights(net_py, tmp_path):
    from safetensors.torch import save_file

    student_run = tmp_path / "student"
    summary = train(load_config(None, ["method.name=supervised", f"model.name={net_py}:build", "model.kwargs.width=3",
                                       f"out_dir={student_run}", *TINY]))
    assert summary["model"] == f"{net_py}:build" and summary["steps"] == 4
    best = torch.load(student_run / "best.pt", weights_only=True)["model"]
    assert best["conv1.weight"].shape == (3, 1, 3, 3)
    save_file(best, str(tmp_path / "teacher.safetensors"))

    # the same weights as a teacher, from the file with its kwargs, and from the run directory
    spec = f"{net_py}:build(width=3)@{tmp_path / 'teacher.safetensors'}"
    for teacher in (load_teacher(spec, DIGITS), load_teacher(student_run, DIGITS)):
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert all(torch.equal(teacher.state_dict()[k], v) for k, v in best.items())
        assert stage_names(teacher) == ("act1", "act2")

    kd_run = tmp_path / "kd"
    summary = train(load_config(None, ["method.name=kd", f"method.teacher={spec}", "model.name=resnet8",
                                       f"out_dir={kd_run}", *TINY]))
    assert summary["method"] == "kd" and summary["steps"] == 4
    saved = yaml.safe_load((kd_run / "config.yaml").read_text())
    assert saved["method"]["teacher"] == spec
    # a feature method taps the file model's discovered stages, as student and as teacher
    summary = train(load_config(None, ["method.name=fitnet", f"method.teacher={student_run}",
                                       f"model.name={net_py}:build", f"out_dir={tmp_path / 'fitnet'}", *TINY]))
    assert summary["method"] == "fitnet"


def test_model_weights_start_the_student_and_data_free_needs_a_run(net_py, tmp_path):
    from mentor.engine.inputs import load_splits
    from mentor.engine.trainer import build_method, source_splits
    from mentor.methods import METHODS

    torch.manual_seed(5)
    src = create_model(f"{net_py}:build", num_classes=10, in_channels=1)
    torch.save(src.state_dict(), tmp_path / "start.pt")
    cfg = load_config(None, [f"model.name={net_py}:build", f"model.weights={tmp_path / 'start.pt'}", *TINY])
    method = build_method(cfg, load_splits(cfg.data), torch.device("cpu"), steps_per_epoch=1)
    assert all(torch.equal(method.student.state_dict()[k], v) for k, v in src.state_dict().items())

    cfg = load_config(None, ["method.name=dafl", f"method.teacher={net_py}:build@{tmp_path / 'start.pt'}", *TINY])
    with pytest.raises(ConfigError, match="trains without data.*MODEL@WEIGHTS.*run directory"):
        source_splits(cfg, METHODS.get("dafl"))

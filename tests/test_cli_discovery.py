"""The command line tells what it has: mentor show / config / list / --version / data info, and stays
light until a command runs (no torch import to parse arguments or print help)."""

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from mentor.cli import main
from mentor.config import POSITIVE, load_config, rules, to_dict
from mentor.methods import METHODS, Inputs, Method, MethodConfig, register_method

ROOT = Path(__file__).resolve().parents[1]

if "test_show_me" not in METHODS:

    @register_method("test_show_me")
    class ShowMe(Method):
        """Doe & Roe, "A Method Shown on the Command Line", 2031.

        ``alpha``: the weight of the first term. ``beta``: the temperature of the second term.
        """

        inputs = Inputs(labeled=("weak",), unlabeled=("weak", "strong"))

        @rules(alpha=POSITIVE)
        @dataclass
        class Config(MethodConfig):
            alpha: float = 0.25
            beta: float = 3.0  # said by the comment, which wins over the docstring
            gamma: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
            # a comment on the line above
            delta: str = "x"


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# -- mentor show --------------------------------------------------------------------------------------------


def test_show_gives_the_paper_every_field_with_default_rule_and_note_the_inputs_and_requirements(capsys):
    code, out, _ = _run(["show", "test_show_me"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == 'test_show_me: Doe & Roe, "A Method Shown on the Command Line", 2031.'
    row = {line.split()[0]: line for line in lines if line.startswith("  ") and line.split()[0] in
           ("alpha", "beta", "gamma", "delta")}
    assert row["alpha"].split()[1:4] == ["float", "0.25", "[>"] and "the weight of the first term" in row["alpha"]
    assert "said by the comment, which wins" in row["beta"] and "temperature" not in row["beta"]
    assert row["gamma"].split()[1:3] == ["list[int]", "[1,"] and "a comment on the line above" in row["delta"]
    assert "labelled batch, views: weak" in out and "views: weak, strong" in out
    assert "data.labels_per_class" in out and "(none in recipes/)" in out


def test_show_a_shipped_method_lists_its_defaults_teacher_and_recipe(capsys):
    code, out, _ = _run(["show", "kd"], capsys)
    assert code == 0
    assert out.startswith('kd: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.')
    for f in dataclasses.fields(METHODS.get("kd").Config):
        if f.name != "name":
            assert any(line.split()[:1] == [f.name] and str(f.default if f.default != "" else "''") in line
                       for line in out.splitlines()), f.name
    assert "method.teacher: the trained teacher" in out and "MODEL@WEIGHTS" in out
    assert "recipes/distill/fmnist_kd.yaml" in out and "train (data.augment)" in out
    _, out, _ = _run(["show", "shot"], capsys)
    assert "model.init_from" in out and "source-free" in out and "recipes/adapt/digits_shot.yaml" in out
    code, _, err = _run(["show", "fixmach"], capsys)
    assert code == 2 and "Did you mean 'fixmatch'" in err


# -- mentor config ------------------------------------------------------------------------------------------


def test_config_prints_the_resolved_recipe_with_every_default(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: {name: kd, teacher: runs/t}\ndata: {name: digits}\nout_dir: runs/x\n")
    code, out, _ = _run(["config", str(recipe), "method.temperature=2", "trainer.max_steps=7"], capsys)
    assert code == 0
    printed = yaml.safe_load(out)
    assert printed == to_dict(load_config(recipe, ["method.temperature=2", "trainer.max_steps=7"]))
    assert printed["method"]["kd_weight"] == 0.9 and printed["method"]["temperature"] == 2.0  # default, override
    assert printed["trainer"]["max_steps"] == 7 and printed["optim"]["momentum"] == 0.9
    assert printed["model"] == {"name": "resnet20", "kwargs": {}, "init_from": None, "weights": None}
    code, _, err = _run(["config", str(recipe), "method.temprature=2"], capsys)
    assert code == 2 and "Did you mean 'temperature'" in err


# -- mentor list --------------------------------------------------------------------------------------------


def _registries():
    from mentor.data.augment import AUGMENTS
    from mentor.data.domains import DOMAIN_SETS, list_domain_sets
    from mentor.data.folders import FOLDER_DATASETS
    from mentor.data.sources import DATASETS
    from mentor.models import MODELS

    list_domain_sets()  # registers the built-in domain sets
    return {"methods": [METHODS], "models": [MODELS], "datasets": [DATASETS, DOMAIN_SETS, FOLDER_DATASETS],
            "shifts": [DOMAIN_SETS], "augments": [AUGMENTS]}


def test_every_list_is_its_registries(capsys):
    registries = _registries()
    for what, regs in registries.items():
        code, out, _ = _run(["list", what], capsys)
        expected = sorted({n for r in regs for n in r.names()})
        assert code == 0 and out.split() == expected, what
    _, out, _ = _run(["list", "datasets"], capsys)
    assert {"image_folder", "digits", "rotated_fmnist", "fashion_mnist"} <= set(out.split())
    _, out, _ = _run(["list", "datasets", "*folder"], capsys)
    assert out.split() == ["domain_folder", "image_folder"]
    code, out, _ = _run(["list"], capsys)
    sections = {}
    for line in out.splitlines():
        if not line.startswith(" "):
            what = line.split(" (")[0]
            sections[what] = (int(line.split("(")[1].split(")")[0]), [])
        elif not line.strip().startswith("also:"):
            sections[what][1].extend(n.strip() for n in line.split(",") if n.strip())
    assert code == 0 and list(sections) == list(registries)
    for what, (count, names) in sections.items():
        assert names == sorted({n for r in registries[what] for n in r.names()}) and count == len(names), what
    assert "timm:NAME" in out and "file.py:build_fn" in out


# -- mentor --version, and nothing heavy to parse ---------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"mentor {metadata.version('mentor')} (torch {metadata.version('torch')}, Python ")


def test_parsing_and_help_import_no_torch():
    script = (
        "import sys, contextlib, io\n"
        "import mentor.cli as cli\n"
        "p = cli.build_parser()\n"
        "commands = [a for a in p._subparsers._group_actions[0].choices]\n"
        "for argv in [['--help'], ['--version'], *[[c, '--help'] for c in commands]]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        cli.main(argv)\n"
        "print(sorted(commands), 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    commands, torch_loaded = r.stdout.rsplit(" ", 1)
    assert {"show", "config", "list", "train", "data"} <= set(eval(commands))
    assert torch_loaded.strip() == "False"


# -- mentor data info -------------------------------------------------------------------------------------


def test_data_info_exits_non_zero_when_data_is_missing_and_names_data_root(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MENTOR_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    code, out, err = _run(["data", "info", "cifar10"], capsys)
    assert code == 1
    assert "train: not found" in out and "data.root=DIR" in out and "data.root=DIR" in err
    assert " root=DIR" not in out.replace("data.root=DIR", "")
    code, out, _ = _run(["data", "info", "digits"], capsys)
    assert code == 0 and "digits" in out
    code, out, _ = _run(["data", "info", "image_folder"], capsys)
    assert code == 0 and "data.root=DIR" in out and "DIR/train/<class>" in out
    code, out, _ = _run(["data", "info", "rotated_fmnist"], capsys)
    assert code == 0 and "domain set" in out
    code, _, err = _run(["data", "info", "imagefolder"], capsys)
    assert code == 1 and "Did you mean 'image_folder'" in err


def test_show_lists_every_recipe_of_a_method(capsys):
    _, out, _ = _run(["show", "supervised"], capsys)
    listed = [line.strip() for line in out.split("recipes:\n")[1].splitlines()]
    expected = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml")
                      if (yaml.safe_load(p.read_text()) or {}).get("method", {}).get("name") == "supervised")
    assert listed == expected and len(expected) >= 2
    assert "nothing beyond data.name and model.name" in out

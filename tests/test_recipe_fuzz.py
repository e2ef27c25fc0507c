"""`mentor train` under hostile recipes: every shipped recipe, one value (or key, or section) mutated.

Each example either trains (exit 0, ``summary.json`` written) or stops with exit status 1 or 2 and one
paragraph on stderr that names what to fix; an exception escaping ``main`` is the traceback a user
would see, and fails the test. Runs are made tiny and offline by overrides placed before the
mutation, so a mutated key may undo them (a hostile ``trainer.max_steps`` is kept small: a long run is
not an error). Digits replace Fashion-MNIST where it is not installed. ``out_dir`` is not mutated: the
run directory's own errors are the engine's (``mentor.engine.trainer``), tested there. ``model.kwargs``
is mutated as a whole but not inside: the values a zoo model's constructor accepts are the model's.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import HAVE_FMNIST
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mentor.cli import main
from mentor.config import RunConfig, read_recipe, to_dict
from mentor.methods import METHODS

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml"))
NOT_MUTATED = {("out_dir",), ("trainer", "compile")}  # see the module docstring; compile: slow, not hostile

HOSTILE = st.one_of(
    st.sampled_from([-1, 0, 1, 2, 2**31, 2**63, -(2**63), 10**30]),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.5, 0.0, 1e-300, 1e300, 0.999, 1.5]),
    st.sampled_from(["", " ", "x", "None", "null ", "cuda:7", "../", "~", "ü", "a" * 300, "1e-3", "-1", "\t"]),
    st.sampled_from([[], [1], [-1, 2], ["a"], [[]], [0.5, 0.25], [None]]),
    st.sampled_from([{}, {"a": 1}, {"name": "x"}, {"": None}]),
    st.sampled_from([None, True, False]),
)


def leaves(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a nested mapping (a mapping's own path too, so a whole section is replaced)."""
    if not isinstance(tree, dict):
        return [prefix]
    out = [prefix] if prefix else []
    for key, value in tree.items():
        if prefix[:2] == ("model", "kwargs"):
            continue
        out += leaves(value, (*prefix, str(key)))
    return out


def key_paths(recipe: str) -> list[tuple[str, ...]]:
    raw = read_recipe(ROOT / recipe)
    method = raw.get("method", {})
    name = method.get("name", "supervised") if isinstance(method, dict) else method
    defaults = {k: v for k, v in to_dict(RunConfig()).items() if k != "method"}
    defaults["method"] = {f.name: None for f in dataclasses.fields(METHODS.get(name).Config)}
    paths = {*leaves(raw), *leaves(defaults)}
    return sorted(p for p in paths if p not in NOT_MUTATED)


PATHS = {recipe: key_paths(recipe) for recipe in RECIPES}


def render(value: Any) -> str:
    """A value as an override's YAML text."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, allow_unicode=True).rstrip("\n")
    return text[: -len("\n...")] if text.endswith("\n...") else text


def tiny(recipe: str, out: Path, real: bool = False) -> list[str]:
    """Overrides that make a run of ``recipe`` a few seconds on one CPU thread, offline; Fashion-MNIST
    recipes run on the UCI digits unless ``real`` (and Fashion-MNIST is installed)."""
    raw = read_recipe(ROOT / recipe)
    data, method = raw.get("data", {}), raw.get("method", {})
    base = [f"out_dir={out}", "trainer.max_steps=2", "trainer.eval_every=2", "trainer.ckpt_every=2",
            "trainer.log_every=1", "trainer.progress=false", "trainer.threads=1", "schedule.warmup_steps=0",
            "data.batch_size=16", "data.eval_batch_size=256", "data.val_size=64", "data.unlabeled_ratio=2"]
    if data.get("name", "fashion_mnist") == "fashion_mnist":
        real = real and HAVE_FMNIST
        base += ["data.subset=256"] if real and "labels_per_class" not in data else []
        base += [] if real else ["data.name=digits"]
    if method.get("name") == "edm":
        base += ["method.eval_sigmas=2", "method.eval_images=32"]
    return base


@st.composite
def mutations(draw) -> tuple[str, list[str], str | None, str]:
    """(recipe, overrides, replacement recipe text or None, the key the mutation touches)."""
    recipe = draw(st.sampled_from(RECIPES))
    kind = draw(st.sampled_from(["value", "value", "value", "case", "delete", "duplicate"]))
    if kind == "duplicate":
        lines = yaml.safe_dump(read_recipe(ROOT / recipe), sort_keys=False).splitlines()
        i = draw(st.integers(0, len(lines) - 1))
        key = lines[i].strip().split(":")[0].lstrip("- ")
        return recipe, [], "\n".join([*lines[: i + 1], lines[i], *lines[i + 1:]]) + "\n", key
    path = draw(st.sampled_from(PATHS[recipe]))
    if kind == "value":
        value = draw(HOSTILE)
        if path == ("trainer", "max_steps"):
            assume(not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 8))
        return recipe, [f"{'.'.join(path)}={render(value)}"], None, path[-1]
    if kind == "case":
        i = draw(st.integers(0, len(path) - 1))
        shouting = [p.upper() if j == i else p for j, p in enumerate(path)]
        return recipe, [f"{'.'.join(shouting)}=1"], None, path[i]
    raw = read_recipe(ROOT / recipe)
    node = raw
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    assume(isinstance(node, dict) and path[-1] in node)
    del node[path[-1]]
    return recipe, [], yaml.safe_dump(raw, sort_keys=False), path[-1]


_runs = itertools.count()


def run_one(tmp_root: Path, mutation: tuple[str, list[str], str | None, str], real: bool = False) -> None:
    recipe, overrides, text, key = mutation
    out = tmp_root / f"run{next(_runs)}"
    path = ROOT / recipe
    if text is not None:
        path = tmp_root / f"{out.name}.yaml"
        path.write_text(text)
    argv = ["train", str(path), *tiny(recipe, out, real), *overrides]
    err, threads = io.StringIO(), torch.get_num_threads()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            rc = main(argv)
    except BaseException as e:  # a traceback a user would see
        raise AssertionError(f"mentor {' '.join(argv)} raised {type(e).__name__}: {e}") from e
    finally:
        torch.set_num_threads(threads)  # a mutated trainer.threads must not outlive its example
    message = err.getvalue()
    if rc == 0:
        assert (out / "summary.json").is_file(), f"exit 0 without a summary: {argv}"
        return
    assert rc in (1, 2), (rc, argv, message)
    assert message.startswith("mentor: ") and "Traceback" not in message, (argv, message)
    body = message.strip()
    lines = body.splitlines()
    assert lines and all(line.strip() for line in lines), f"not one paragraph: {argv}\n{message}"
    # It names what to fix: the mutated key, the recipe, or the file or key it was really about.
    names_a_place = (key.lower() in body.lower() or str(path) in body
                     or re.search(r"[a-z_]+\.[a-z_]+|/|unknown \w+ '", body) is not None)
    assert names_a_place, (argv, message)


FAST = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@FAST
@given(mutation=mutations())
def test_mutated_recipes_train_or_fail_in_one_paragraph(tmp_path_factory, mutation):
    run_one(tmp_path_factory.mktemp("fuzz"), mutation)


@pytest.mark.slow
@settings(FAST, max_examples=300)
@given(mutation=mutations())
def test_many_mutated_recipes_train_or_fail_in_one_paragraph(tmp_path_factory, mutation):
    run_one(tmp_path_factory.mktemp("fuzz"), mutation, real=True)


# The cases a user reported as tracebacks or silent acceptance, through the command line.
DIGITS = "recipes/supervised/digits_resnet8.yaml"


@pytest.mark.parametrize("override, key, status", [
    ("optim.lr=-1", "optim.lr", 2), ("optim.lr=0", "optim.lr", 2), ("optim.momentum=1.5", "optim.momentum", 2),
    ("data.val_size=100000", "data.val_size", 2), ("data.val_size=-1", "data.val_size", 2),
    ("trainer.cuda_graph=true", "trainer.cuda_graph", 2), ("trainer.device=cuda", "trainer.device", 2),
    ("trainer.seed=-1", "trainer.seed", 2),
    ("trainer.clip_grad=-1", "trainer.clip_grad", 2), ("data.eval_batch_size=-1", "data.eval_batch_size", 2),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps", 2), ("schedule.min_lr=-1", "schedule.min_lr", 2),
    ("schedule.milestones=[-1]", "schedule.milestones", 2), ("OUT_DIR=x", "'out_dir'", 2),
    ("data.subset=5", None, 0),  # smaller than a batch: repeated to fill it
])
def test_reported_cases_exit_cleanly(tmp_path, capsys, override, key, status):
    if override.startswith(("trainer.cuda_graph", "trainer.device")) and torch.cuda.is_available():
        pytest.skip("the machine has CUDA")
    rc = main(["train", DIGITS, *tiny(DIGITS, tmp_path / "run"), override])
    err = capsys.readouterr().err
    assert rc == status, err
    if status:
        assert err.startswith("mentor: recipe error: ") and err.count("\n") == 1 and key in err, err
    else:
        assert (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.parametrize("text, says", [
    ("optim: {lr: 0.1}\noptim: {lr: 0.2}\n", "'optim' is given twice"),
    ("a:" + " [" * 3000 + " ]" * 3000 + "\n", "nesting deeper than 64"),
    ("# nothing\n", "is empty"),
])
def test_reported_recipe_files_exit_cleanly(tmp_path, capsys, text, says):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mentor: recipe error: recipe ") and err.count("\n") == 1 and says in err, err


def test_a_utf16_recipe_trains(tmp_path):
    recipe = tmp_path / "r16.yaml"
    recipe.write_bytes((ROOT / DIGITS).read_text().encode("utf-16"))  # with its byte-order mark
    assert main(["train", str(recipe), *tiny(DIGITS, tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "summary.json").is_file()

"""Sweeps: cells and their names, validation before anything starts, the local and Slurm (submitit) launchers,
skipping, resuming and failures, `mentor train --seeds/--grid`, and one job over two processes under torchrun.

The fast tests run the launchers with a stand-in for `mentor train` (a short script that records its command
and environment and writes a summary); the tests marked slow train tiny digits runs for real."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _helpers import free_port

from mentor import sweep
from mentor.cli import main
from mentor.config import parse_override
from mentor.errors import ConfigError, MentorError
from mentor.sweep import launch

pytest.importorskip("sklearn")

RECIPE = {"method": {"name": "supervised"}, "model": {"name": "resnet8"},
          "data": {"name": "digits", "val_size": 200, "batch_size": 32, "augment": "none", "flip": False},
          "trainer": {"max_steps": 4, "eval_every": 2, "ckpt_every": 2, "log_every": 2, "progress": False}}

# Stands in for `python -m mentor.cli train RECIPE overrides...`: records what it was given and writes the
# summary of a finished run (optim.lr=0.666 fails the way the command line does).
FAKE_TRAIN = r'''
import json, os, sys
from pathlib import Path
recipe, overrides = sys.argv[1], sys.argv[2:]
given = dict(o.split("=", 1) for o in overrides)
out = Path(given["out_dir"])
print("overrides " + json.dumps(overrides))
print("env " + json.dumps({k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}))
print("start " + ("resume" if (out / "last.pt").exists() else "fresh"))
if given.get("optim.lr") == "0.666":
    print("Traceback (most recent call last): ...")
    print("mentor: error: the loss became NaN at step 3", file=sys.stderr)
    sys.exit(1)
steps = int(given.get("trainer.max_steps", 4))
summary = {"steps": steps, "select": "val_acc", "val_acc_best": 0.5, "test_acc_last": 0.25, "test_acc_best": 0.3}
(out / "summary.json").write_text(json.dumps(summary))
'''


def write_recipe(folder: Path, name: str = "tiny.yaml", **changes) -> str:
    data = json.loads(json.dumps(RECIPE))
    for key, value in changes.items():
        data[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def write_sweep(folder: Path, **spec) -> str:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    """Every launcher runs FAKE_TRAIN instead of `mentor train` (same recipe and overrides)."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    real = launch.train_argv
    monkeypatch.setattr(launch, "train_argv", lambda cell, extra=(): [sys.executable, str(script),
                                                                      *real(cell, extra)[4:]])
    return script


def logged(cell_dir: Path) -> list[dict]:
    """Each session FAKE_TRAIN logged in a cell's log.txt: its overrides, environment and start."""
    sessions = []
    for line in (cell_dir / "log.txt").read_text().splitlines():
        if line.startswith("=== "):
            sessions.append({})
        elif line.startswith(("overrides ", "env ")):
            kind, text = line.split(" ", 1)
            sessions[-1][kind] = json.loads(text)
        elif line.startswith("start "):
            sessions[-1]["start"] = line.split(" ", 1)[1]
    return sessions


# -- cells ------------------------------------------------------------------------------------------------


def test_cells_of_recipes_grid_and_seeds_are_named_by_what_differs(tmp_path):
    cells = sweep.make_cells(tmp_path, ["recipes/distill/fmnist_kd.yaml", "r/dkd.yaml"], ["trainer.max_steps=300"],
                             {"method.temperature": [2, 4.5], "optim.lr": [0.1]}, [0, 1])
    names = [c.name for c in cells]
    assert names == [f"{r}/method.temperature={t},optim.lr=0.1/seed{s}"
                     for r in ("fmnist_kd", "dkd") for t in ("2", "4.5") for s in (0, 1)]
    assert [c.out_dir for c in cells] == [str(tmp_path / n) for n in names]
    assert cells[3].recipe == "recipes/distill/fmnist_kd.yaml" and cells[4].recipe == "r/dkd.yaml"
    assert cells[3].train_overrides() == ["trainer.max_steps=300", "method.temperature=4.5", "optim.lr=0.1",
                                          "trainer.seed=1", f"out_dir={tmp_path / names[3]}"]
    # one recipe (mentor train --seeds/--grid): no recipe level; no grid: no point level; no seeds: no seed level
    assert [c.name for c in sweep.make_cells(tmp_path, ["a.yaml"], seeds=[3], by_recipe=False)] == ["seed3"]
    only = sweep.make_cells(tmp_path, ["a.yaml"], grid={"optim.lr": [0.5]}, by_recipe=False)
    assert [c.name for c in only] == ["optim.lr=0.5"] and only[0].train_overrides()[-2:] == [
        "optim.lr=0.5", f"out_dir={tmp_path / 'optim.lr=0.5'}"]


@pytest.mark.parametrize("value", [2, 0.1, 1e-5, True, None, "a b", "2", "runs/x", [1, 2], {"a": 1}, "x: y", "null"])
def test_override_values_read_back_as_themselves(value):
    assert parse_override(f"k={sweep.value_text(value)}")[1] == value


def test_point_names_are_safe_folder_names_and_long_ones_stay_unique():
    assert sweep.point_name([("method.teacher", "runs/t 1")]) == "method.teacher=runs_t_1"
    assert sweep.point_name([("b", [1, 2]), ("a", "2")]) == "a=_2_,b=[1,2]"  # keys sorted; the string "2" marked
    long = [("method.teachers", [f"runs/teacher_{i}" for i in range(20)])]
    other = [("method.teachers", [f"runs/teacher_{i}" for i in range(21)])]
    assert len(sweep.point_name(long)) == 111 and sweep.point_name(long) != sweep.point_name(other)
    assert sweep.point_name(long) == sweep.point_name(list(long))  # stable


def test_grid_and_seed_options_parse_like_overrides():
    assert sweep.split_values("2,[4,8],'a,b',{x: 1}") == ["2", "[4,8]", "'a,b'", "{x: 1}"]
    assert sweep.parse_grid_args(["method.beta=2,4.5,8", "data.test_domains=[a],[b,c]"]) == {
        "method.beta": [2, 4.5, 8], "data.test_domains": [["a"], ["b", "c"]]}
    assert sweep.parse_seeds("0,1,7") == [0, 1, 7]
    for bad in (["method.beta"], ["method.beta=2,,4"], ["a=1", "a=2"]):
        with pytest.raises(ConfigError, match="--grid"):
            sweep.parse_grid_args(bad)
    with pytest.raises(ConfigError, match="--seeds"):
        sweep.parse_seeds("0,one")


def test_a_sweep_file_becomes_its_cells_and_launcher(tmp_path):
    recipe = write_recipe(tmp_path / "recipes")
    path = write_sweep(tmp_path, out=str(tmp_path / "root"), recipes=[recipe], overrides=["optim.lr=0.1"],
                       grid={"method": {"label_smoothing": [0.0, 0.1]}}, seeds=5,
                       launcher={"name": "local", "processes": 3, "gpus": []})
    s = sweep.load_sweep(path)
    assert [c.name for c in s.cells] == [f"tiny/method.label_smoothing={v}/seed5" for v in ("0.0", "0.1")]
    assert s.root == tmp_path / "root" and s.index == tmp_path / "root" / "sweep.json"
    assert s.launcher == sweep.LocalLauncher(processes=3, gpus=[])
    assert sweep.load_sweep(path, processes=1).launcher.processes == 1
    # a recipe named relative to the sweep file's folder is found there
    (tmp_path / "sub").mkdir()
    rel = write_sweep(tmp_path / "sub", recipes=["../recipes/tiny.yaml"])
    assert Path(sweep.load_sweep(rel).cells[0].recipe).resolve() == Path(recipe).resolve()
    assert sweep.load_sweep(rel).root == Path("runs/sweeps/sweep")


# -- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, says", [
    ({"grd": {"optim.lr": [1]}}, ["'grd'", "Did you mean 'grid'"]),
    ({"recipes": ["RECIPE", "missing/r.yaml"]}, ["recipes[1]", "'missing/r.yaml' not found"]),
    ({"grid": {"method.temprature": [2, 4]}}, ["unknown key 'method.temprature'", "label_smoothing",
                                               "Nothing was started"]),
    ({"grid": {"optim.lr": [0.1, -1.0]}}, ["optim.lr=-1.0", "optim.lr must be > 0"]),
    ({"grid": {"optim.lr": []}}, ["grid.optim.lr has no values"]),
    ({"grid": {"out_dir": ["a", "b"]}}, ["grid.out_dir"]),
    ({"overrides": ["out_dir=x"]}, ["out_dir=x", "set per cell"]),
    ({"grid": {"trainer.seed": [1]}, "seeds": [0]}, ["grid.trainer.seed", "seeds"]),
    ({"seeds": [0, 0]}, ["seeds lists a seed twice"]),
    ({"launcher": {"name": "sge"}}, ["launcher.name", "local or slurm"]),
    ({"launcher": {"name": "local", "procesess": 2}}, ["launcher.procesess", "processes"]),
    ({"launcher": {"name": "slurm", "partition": 3}}, ["launcher.partition"]),
    ({"launcher": {"name": "local", "processes": 0}}, ["launcher.processes", ">= 1"]),
    ({"launcher": {"name": "local", "gpus": [0], "processes": 3}}, ["launcher.processes=3", "launcher.per_gpu=3"]),
])
def test_a_bad_sweep_names_the_key_and_writes_nothing(tmp_path, capsys, spec, says):
    recipe = write_recipe(tmp_path / "recipes")
    spec = {"out": str(tmp_path / "root"), "recipes": [recipe], "seeds": [0], **spec}
    spec["recipes"] = [recipe if r == "RECIPE" else r for r in spec["recipes"]]
    assert main(["sweep", write_sweep(tmp_path, **spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mentor: recipe error: ") and "Traceback" not in err and err.count("\n") == 1
    for text in says:
        assert text in err
    assert not (tmp_path / "root").exists()


def test_a_cell_folder_holding_another_recipe_stops_the_sweep_before_it_starts(tmp_path, capsys, fake_train):
    recipe = write_recipe(tmp_path)
    cells = sweep.make_cells(tmp_path / "root", [recipe], seeds=[0, 1], by_recipe=False)
    held = Path(cells[1].out_dir)
    held.mkdir(parents=True)
    saved = yaml.safe_load(yaml.safe_dump({**RECIPE, "optim": {"lr": 0.5}}))
    (held / "config.yaml").write_text(yaml.safe_dump(saved))
    says = r"cell 'seed1'.*optim.lr: 0.5 -> 0.05.*resume=false\. Nothing was started\.$"
    with pytest.raises(ConfigError, match=says):
        sweep.run_cells(cells, sweep.LocalLauncher(processes=2, gpus=[]), tmp_path / "root" / "sweep.json")
    assert not Path(cells[0].out_dir).exists() and not (tmp_path / "root" / "sweep.json").exists()
    assert sorted(p.name for p in held.iterdir()) == ["config.yaml"]


def test_cells_that_run_elsewhere_leave_the_cuda_check_to_their_machine(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks a machine without CUDA")
    recipe = write_recipe(tmp_path, trainer={**RECIPE["trainer"], "device": "cuda"})
    cells = sweep.make_cells(tmp_path / "root", [recipe], seeds=[0], by_recipe=False)
    with pytest.raises(ConfigError, match="trainer.device=cuda: CUDA is not available"):
        sweep.prepare(cells)  # the local launcher: this machine runs the cell
    ((cell, cfg, state, _),) = sweep.prepare(cells, machine=False)  # Slurm: a node with GPUs runs it
    assert cfg.trainer.device == "cuda" and state == "new" and cfg.out_dir == cell.out_dir


# -- the local launcher ------------------------------------------------------------------------------------


def test_workers_get_a_gpu_each_or_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(launch, "available_cores", lambda: 16)
    slots = sweep.LocalLauncher(gpus=[0, 1], per_gpu=2).slots()
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in slots] == ["0", "1", "0", "1"]
    assert [t for _, t in slots] == [4, 4, 4, 4] and slots[0][0]["OMP_NUM_THREADS"] == "4"
    assert [e["CUDA_VISIBLE_DEVICES"] for e, _ in sweep.LocalLauncher(gpus=["3", "5"], processes=1).slots()] == ["3"]
    cpu = sweep.LocalLauncher(processes=3, gpus=[]).slots()
    assert [(e["CUDA_VISIBLE_DEVICES"], t) for e, t in cpu] == [("", 5)] * 3
    assert [t for _, t in sweep.LocalLauncher(processes=3, gpus=[], threads=2).slots()] == [2, 2, 2]
    monkeypatch.setattr(launch, "available_cores", lambda: 2)
    assert [t for _, t in sweep.LocalLauncher(processes=4, gpus=[]).slots()] == [1, 1, 1, 1]
    with pytest.raises(ConfigError, match=r"launcher.processes=3 .*2 GPU\(s\).*launcher.per_gpu=2"):
        sweep.LocalLauncher(gpus=[0, 1], processes=3).slots()
    with pytest.raises(ConfigError, match="launcher.per_gpu"):
        sweep.LocalLauncher(gpus=[0], per_gpu=0).slots()


def test_local_sweep_runs_resumes_skips_and_reports_a_failing_cell(tmp_path, capsys, fake_train, monkeypatch):
    monkeypatch.setattr(launch, "available_cores", lambda: 2)
    recipe = write_recipe(tmp_path / "recipes")
    root = tmp_path / "root"
    path = write_sweep(tmp_path, out=str(root), recipes=[recipe], grid={"optim.lr": [0.05, 0.666]}, seeds=[0, 1],
                       launcher={"name": "local", "processes": 2, "gpus": []})
    interrupted = root / "tiny" / "optim.lr=0.05" / "seed1"
    interrupted.mkdir(parents=True)
    (interrupted / "last.pt").write_bytes(b"")  # a run stopped after a checkpoint: no summary yet
    assert main(["sweep", path]) == 1
    out = capsys.readouterr().out
    index = json.loads((root / "sweep.json").read_text())
    status = {c["name"]: (c["status"], c["resumed"]) for c in index["cells"]}
    assert status == {"tiny/optim.lr=0.05/seed0": ("done", False), "tiny/optim.lr=0.05/seed1": ("done", True),
                      "tiny/optim.lr=0.666/seed0": ("failed", False), "tiny/optim.lr=0.666/seed1": ("failed", False)}
    assert index["counts"] == {"done": 2, "failed": 2} and index["launcher"]["processes"] == 2
    failed = next(c for c in index["cells"] if c["status"] == "failed")
    assert failed["error"] == "exit status 1: mentor: error: the loss became NaN at step 3"
    assert failed["grid"] == {"optim.lr": 0.666} and failed["seed"] == 0 and failed["recipe"] == recipe
    assert "2 of 4 cells failed" in out and "the loss became NaN" in out
    table = out[out.index("cell "):].splitlines()
    assert table[1].split()[:2] == ["tiny/optim.lr=0.05/seed0", "done"]
    assert table[2].split()[:3] == ["tiny/optim.lr=0.05/seed1", "done", "(resumed)"]
    # what each worker ran: the cell's overrides, out_dir last, half the cores each, no GPU
    for cell in index["cells"]:
        (session,) = logged(Path(cell["out_dir"]))
        assert session["overrides"] == [f"optim.lr={cell['grid']['optim.lr']}", f"trainer.seed={cell['seed']}",
                                        "trainer.threads=1", f"out_dir={cell['out_dir']}"]
        assert session["env"] == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        assert session["start"] == ("resume" if cell["resumed"] else "fresh")
    # again: the finished cells are left alone, the failed ones run again
    before = {c["name"]: (Path(c["out_dir"]) / "summary.json").stat().st_mtime_ns for c in index["cells"]
              if c["status"] == "done"}
    assert main(["sweep", path]) == 1
    again = {c["name"]: c["status"] for c in json.loads((root / "sweep.json").read_text())["cells"]}
    assert again == {"tiny/optim.lr=0.05/seed0": "skipped", "tiny/optim.lr=0.05/seed1": "skipped",
                     "tiny/optim.lr=0.666/seed0": "failed", "tiny/optim.lr=0.666/seed1": "failed"}
    for name, mtime in before.items():
        assert (root / name / "summary.json").stat().st_mtime_ns == mtime and len(logged(root / name)) == 1
    assert len(logged(root / "tiny" / "optim.lr=0.666" / "seed0")) == 2


def test_gpu_workers_each_see_one_gpu(tmp_path, fake_train, monkeypatch):
    monkeypatch.setattr(launch, "available_cores", lambda: 8)
    cells = sweep.make_cells(tmp_path / "root", [write_recipe(tmp_path)], seeds=[0, 1, 2, 3, 4], by_recipe=False)
    results = sweep.run_cells(cells, sweep.LocalLauncher(gpus=[0, 1], per_gpu=2), echo=lambda _: None)
    assert [r.status for r in results] == ["done"] * 5
    envs = [logged(Path(c.out_dir))[0]["env"] for c in cells]
    assert {e["CUDA_VISIBLE_DEVICES"] for e in envs} <= {"0", "1"} and {e["OMP_NUM_THREADS"] for e in envs} == {"2"}
    assert all("trainer.threads=2" in logged(Path(c.out_dir))[0]["overrides"] for c in cells)


def test_the_recipes_own_threads_are_kept(tmp_path, fake_train):
    recipe = write_recipe(tmp_path, trainer={**RECIPE["trainer"], "threads": 1})
    (cell,) = sweep.make_cells(tmp_path / "root", [recipe], seeds=[0], by_recipe=False)
    sweep.run_cells([cell], sweep.LocalLauncher(gpus=[], threads=3), echo=lambda _: None)
    assert not any(o.startswith("trainer.threads=") for o in logged(Path(cell.out_dir))[0]["overrides"])


def test_a_cell_in_use_by_a_live_process_is_not_started(tmp_path, fake_train):
    cells = sweep.make_cells(tmp_path / "root", [write_recipe(tmp_path)], seeds=[0, 1], by_recipe=False)
    busy = Path(cells[0].out_dir)
    busy.mkdir(parents=True)
    (busy / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    results = sweep.run_cells(cells, sweep.LocalLauncher(gpus=[]), echo=lambda _: None)
    assert [r.status for r in results] == ["running", "done"]
    assert f"process {os.getpid()}" in results[0].error and not (busy / "log.txt").exists()


def test_benchmark_stages_share_one_index(tmp_path, fake_train):
    recipe = write_recipe(tmp_path)
    index = tmp_path / "bench" / "sweep.json"
    first = sweep.Cell(recipe, str(tmp_path / "bench" / "teacher"), ("optim.lr=0.1",))
    second = sweep.Cell(recipe, str(tmp_path / "bench" / "student"), (f"model.init_from={first.out_dir}",))
    sweep.run_cells([first], sweep.LocalLauncher(gpus=[]), index, echo=lambda _: None)
    sweep.run_cells([second], sweep.LocalLauncher(gpus=[]), index, echo=lambda _: None)
    cells = json.loads(index.read_text())["cells"]
    assert [(c["name"], c["status"], c["overrides"]) for c in cells] == [
        (first.out_dir, "done", ["optim.lr=0.1"]), (second.out_dir, "done", [f"model.init_from={first.out_dir}"])]


# -- Slurm through submitit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cluster", ["debug", "local"])
def test_submitit_runs_the_cells(tmp_path, fake_train, cluster):
    pytest.importorskip("submitit")
    recipe = write_recipe(tmp_path)
    path = write_sweep(tmp_path, out=str(tmp_path / "root"), recipes=[recipe], grid={"optim.lr": [0.05, 0.666]},
                       launcher={"name": "slurm", "cluster": cluster, "time": 5, "cpus": 1, "gpus": 0})
    s = sweep.load_sweep(path)
    assert sweep.execute(s, echo=lambda _: None) == 1
    cells = json.loads(s.index.read_text())["cells"]
    assert [(c["name"], c["status"]) for c in cells] == [("tiny/optim.lr=0.05", "done"),
                                                         ("tiny/optim.lr=0.666", "failed")]
    assert all(c["job"] for c in cells) and "the loss became NaN" in cells[1]["error"]
    (session,) = logged(tmp_path / "root" / "tiny" / "optim.lr=0.05")
    assert session["overrides"][-2:] == ["trainer.threads=1", f"out_dir={tmp_path / 'root/tiny/optim.lr=0.05'}"]
    assert session["env"]["OMP_NUM_THREADS"] == "1"
    assert (tmp_path / "root" / ".submitit").is_dir()  # submitit's own files, beside the cells


def test_slurm_parameters_reach_the_executor(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    with pytest.raises(MentorError, match="srun.*launcher.cluster: local"):
        sweep.make_launcher({"name": "slurm"}).executor(tmp_path)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: 1))  # as on a login node
    launcher = sweep.make_launcher({"name": "slurm", "partition": "gpu", "time": 90, "gpus": 1, "cpus": 6,
                                    "account": "lab", "setup": ["module load cuda"], "parallelism": 4})
    ex = launcher.executor(tmp_path)
    params = ex._executor.parameters
    assert params["partition"] == "gpu" and params["time"] == 90 and params["gpus_per_node"] == 1
    assert params["cpus_per_task"] == 6 and params["account"] == "lab" and params["setup"] == ["module load cuda"]
    assert params["array_parallelism"] == 4 and params["signal_delay_s"] == 120


# -- mentor train --seeds/--grid ----------------------------------------------------------------------------


def test_train_with_seeds_and_grid_is_a_sweep_under_the_recipes_out_dir(tmp_path, capsys, fake_train):
    root = tmp_path / "runs" / "tiny"
    recipe = write_recipe(tmp_path, out_dir=str(root))
    argv = ["train", recipe, "--seeds", "0,1", "--grid", "optim.lr=0.05,0.1", "trainer.max_steps=6"]
    assert main([*argv, "--dry-run"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in listed[:4]] == [[f"optim.lr={lr}/seed{s}", "new"]
                                                         for lr in ("0.05", "0.1") for s in (0, 1)]
    assert not root.exists()
    assert main(argv) == 0
    index = json.loads((root / "sweep.json").read_text())
    assert index["sweep"].startswith("mentor train ") and "--grid optim.lr=0.05,0.1" in index["sweep"]
    assert [(c["name"], c["status"], c["seed"], c["grid"]) for c in index["cells"]] == [
        (f"optim.lr={lr}/seed{s}", "done", s, {"optim.lr": lr}) for lr in (0.05, 0.1) for s in (0, 1)]
    (session,) = logged(root / "optim.lr=0.1" / "seed1")
    assert session["overrides"][:3] == ["trainer.max_steps=6", "optim.lr=0.1", "trainer.seed=1"]
    assert json.loads((root / "optim.lr=0.1" / "seed1" / "summary.json").read_text())["steps"] == 6
    # without out_dir in the recipe: runs/<recipe name>; an out_dir override moves the root
    other = write_recipe(tmp_path, "plain.yaml")
    assert main(["train", other, "--seeds", "4", f"out_dir={tmp_path / 'here'}"]) == 0
    assert (tmp_path / "here" / "seed4" / "summary.json").is_file()
    assert sweep.train_sweep(other, [], "1", []).root == Path("runs/plain")
    capsys.readouterr()
    assert main(["train", recipe, "--seeds", "0", "--force"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["train", recipe, "--seeds", "0,x"]) == 2
    assert "--seeds" in capsys.readouterr().err


# -- real runs ----------------------------------------------------------------------------------------------


def _tiny_sweep(tmp_path, **spec):
    recipe = write_recipe(tmp_path / "recipes")
    return write_sweep(tmp_path, **{"out": str(tmp_path / "root"), "recipes": [recipe],
                                    "overrides": ["trainer.threads=1"], **spec})


@pytest.mark.slow
def test_a_real_sweep_trains_two_by_two_cells_and_skips_them_when_run_again(tmp_path, capsys):
    path = _tiny_sweep(tmp_path, grid={"optim.lr": [0.05, 0.1]}, seeds=[0, 1],
                       launcher={"name": "local", "processes": 2, "gpus": []})
    assert main(["sweep", path]) == 0
    cells = json.loads((tmp_path / "root" / "sweep.json").read_text())["cells"]
    assert [c["status"] for c in cells] == ["done"] * 4
    mtimes = {}
    for c in cells:
        d = Path(c["out_dir"])
        summary = json.loads((d / "summary.json").read_text())
        saved = yaml.safe_load((d / "config.yaml").read_text())
        assert summary["steps"] == 4 and summary["world_size"] == 1 and summary["threads"] == 1
        assert saved["optim"]["lr"] == c["grid"]["optim.lr"] and saved["trainer"]["seed"] == c["seed"]
        assert c["result"]["test_acc_last"] == summary["test_acc_last"]
        assert "training into" in (d / "log.txt").read_text()
        mtimes[d] = (d / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["sweep", path]) == 0
    assert "4 finished, 0 to run" in capsys.readouterr().out
    assert {d: (d / "summary.json").stat().st_mtime_ns for d in mtimes} == mtimes


@pytest.mark.slow
def test_an_interrupted_sweep_saves_its_cells_and_resumes_them(tmp_path):
    path = _tiny_sweep(tmp_path, overrides=["trainer.threads=1", "trainer.max_steps=150", "trainer.log_every=1",
                                            "trainer.eval_every=150", "trainer.ckpt_every=150"],
                       seeds=[0], launcher={"name": "local", "processes": 1, "gpus": []})
    cell = tmp_path / "root" / "tiny" / "seed0"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mentor.cli", "sweep", path], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            metrics = cell / "metrics.jsonl"
            if (metrics.is_file() and metrics.read_text().count("\n") >= 3) or proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the sweep forwards one SIGINT, the run saves last.pt and stops
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    (entry,) = json.loads((tmp_path / "root" / "sweep.json").read_text())["cells"]
    assert entry["status"] == "interrupted" and "interrupted" in out
    import torch

    step = torch.load(cell / "last.pt", weights_only=True)["step"]
    assert 3 <= step < 150 and not (cell / "summary.json").exists()
    assert main(["sweep", path]) == 0
    (entry,) = json.loads((tmp_path / "root" / "sweep.json").read_text())["cells"]
    assert entry["status"] == "done" and entry["resumed"] is True
    assert f"resuming {cell} at step {step}" in (cell / "log.txt").read_text()
    steps = [json.loads(x)["step"] for x in (cell / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["split"] == "train"]
    assert steps == list(range(1, 151))  # every step logged once, across the two sessions


@pytest.mark.slow
def test_submitit_debug_executor_trains_a_real_cell(tmp_path):
    pytest.importorskip("submitit")
    path = _tiny_sweep(tmp_path, seeds=[0], launcher={"name": "slurm", "cluster": "debug", "cpus": 1, "gpus": 0})
    assert main(["sweep", path]) == 0
    summary = json.loads((tmp_path / "root" / "tiny" / "seed0" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["threads"] == 1


@pytest.mark.slow
def test_torchrun_with_c10d_rendezvous_trains_one_run_over_two_processes(tmp_path):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{free_port()}", "-m", "mentor.cli", "train", recipe,
            f"out_dir={out}", "data.batch_size=16", "trainer.threads=1", "trainer.device=cpu"]
    run = subprocess.run(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["batch_size"] == 16  # per process: the global batch is 2 x 16
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if e["split"] == "train"] == [2, 4]  # written once, by rank 0

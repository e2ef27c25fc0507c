"""The main job (`make demo`): a teacher, then one student trained alone and by distillation, one table.

On a CPU the pair is the one that fits the 10-minute budget on 2 cores (resnet20 -> resnet8); on a
GPU it is the pair of the distillation literature (resnet32x4 -> resnet8x4). Every student row uses
the same seed, so the students start from the same weights and see the same batches.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .config import load_config
from .engine import train

# (role, recipe, extra overrides); "{teacher}" is replaced by the teacher's run directory.
CPU_PLAN = {
    "teacher": ("supervised/fmnist_resnet20.yaml", ["trainer.eval_every=800"]),
    "students": [
        ("student alone", "supervised/fmnist_resnet8.yaml", []),
        ("KD", "distill/fmnist_kd.yaml", []),
        ("DKD", "distill/fmnist_dkd.yaml", ["method.warmup_epochs=0.15"]),
    ],
    "student_overrides": ["trainer.max_steps=800", "trainer.eval_every=400", "trainer.ckpt_every=400"],
    # On a CPU, channels-last convolutions (oneDNN) train resnet20 about 30% faster and evaluate about 2.5x
    # faster, and evaluation batches of 128 stay in cache (a batch of 1000 is 2-3x slower per image);
    # torch.compile did not pay on the CPUs measured (benchmarks/demo_speed.py).
    "overrides": ["trainer.channels_last=true", "data.eval_batch_size=128"],
}
GPU_PLAN = {
    "teacher": ("supervised/fmnist_resnet32x4.yaml", []),
    "students": [
        ("student alone", "supervised/fmnist_resnet8x4.yaml", []),
        ("KD", "distill/fmnist_kd.yaml", []),
        ("DKD", "distill/fmnist_dkd.yaml", ["method.warmup_epochs=2.5"]),
    ],
    "student_overrides": ["model.name=resnet8x4", "trainer.max_steps=12880", "trainer.eval_every=1288",
                          "trainer.ckpt_every=1288"],
    "overrides": ["trainer.channels_last=true"],
}


def recipes_dir() -> Path:
    """``./recipes`` when run from a checkout, else the one beside the installed sources."""
    for base in (Path.cwd() / "recipes", Path(__file__).resolve().parents[2] / "recipes"):
        if base.is_dir():
            return base
    raise FileNotFoundError("recipes/ folder not found: run from the mentor checkout")


HEAD = ["role", "model", "params", "steps", "val acc", "test acc (last)", "test acc (best val)", "img/s", "minutes"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    """The demo's table as strings, one list per row (the header is :data:`HEAD`)."""
    out = []
    for r in rows:
        s = r["summary"]
        out.append([r["role"], s["model"], f"{s['params'] / 1e6:.2f}M", str(s["steps"]),
                    f"{100 * s['val_acc_best']:.2f}", f"{100 * s['test_acc_last']:.2f}",
                    f"{100 * s.get('test_acc_best', float('nan')):.2f}",
                    f"{s['train_img_s'] or float('nan'):,.0f}", f"{s['wall_s'] / 60:.1f}"])
    return out


def format_table(rows: list[dict]) -> str:
    """The table as aligned text for the terminal."""
    lines = [HEAD, *table_rows(rows)]
    widths = [max(len(row[i]) for row in lines) for i in range(len(HEAD))]
    out = []
    for i, row in enumerate(lines):
        out.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(rows: list[dict]) -> str:
    """The table in Markdown (what ``demo.md`` holds)."""
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
    return "\n".join(lines)


def save_tables(rows: list[dict], out: str | Path, title: str, wall_s: float) -> tuple[Path, Path]:
    """``demo.md`` and ``demo.json`` beside the runs: the table, the hardware, versions and the whole wall time."""
    from .fileio import atomic_write_text
    from .provenance import provenance

    out = Path(out)
    first = rows[0]["summary"]
    facts = {"title": title, "device": first.get("device"), "threads": first.get("threads"), **provenance(),
             "wall_s": round(wall_s, 1)}
    md = (f"# {title}\n\n{markdown_table(rows)}\n\nWhole demo: {wall_s / 60:.1f} min on {facts['device']} "
          f"({facts['threads']} threads), mentor {facts['mentor_version']} (git {facts['git_commit']}), "
          f"torch {facts['torch']}.\n")
    doc = {**facts, "rows": [{"role": r["role"], "run": r["run"], **{k: r["summary"].get(k) for k in (
        "model", "params", "steps", "val_acc_best", "test_acc_last", "test_acc_best", "train_img_s", "wall_s")}}
        for r in rows]}
    atomic_write_text(out / "demo.md", md)
    atomic_write_text(out / "demo.json", json.dumps(doc, indent=2) + "\n")
    return out / "demo.md", out / "demo.json"


# --quick: every row a few steps on a 5,000-image subset, test accuracy on the whole test set (a smoke test
# of the whole path in about a minute, not a result).
QUICK = ["trainer.max_steps=100", "trainer.eval_every=100", "trainer.ckpt_every=100", "trainer.log_every=25",
         "data.subset=5000", "data.val_size=1000", "schedule.warmup_steps=0"]


def run_demo(device: str = "auto", out: str | None = None, quick: bool = False) -> list[dict]:
    """Teacher and students on Fashion-MNIST, one table, printed and saved as ``demo.md`` and ``demo.json``
    in ``out``. ``quick`` runs are another recipe (a few steps), so they go to their own folder
    (``runs/demo-quick``) and never meet the full runs'."""
    out = out or ("runs/demo-quick" if quick else "runs/demo")
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    plan = GPU_PLAN if on_gpu else CPU_PLAN
    base = [f"trainer.device={device}", *plan["overrides"]]
    if quick:
        base += QUICK  # after the plan's overrides: the later value of a key wins
    t0 = time.perf_counter()
    recipe, extra = plan["teacher"]
    teacher_dir = f"{out}/teacher_{Path(recipe).stem.removeprefix('fmnist_')}"
    rows = [{"role": "teacher", "run": teacher_dir,
             "summary": train(load_config(recipes_dir() / recipe, [f"out_dir={teacher_dir}", *extra, *base]))}]
    for role, recipe, extra in plan["students"]:
        run = f"{out}/{role.replace(' ', '_').lower()}"
        overrides = [f"out_dir={run}", *plan["student_overrides"], *extra, *base]
        if recipe.startswith("distill/"):
            overrides.append(f"method.teacher={teacher_dir}")
        rows.append({"role": role, "run": run, "summary": train(load_config(recipes_dir() / recipe, overrides))})
    title = "Fashion-MNIST, " + ("GPU" if on_gpu else f"CPU ({torch.get_num_threads()} threads)") + \
        (", --quick (a smoke test, not a result)" if quick else "")
    md, js = save_tables(rows, out, title, time.perf_counter() - t0)
    print(f"\n{title}\n")
    print(format_table(rows))
    print(f"\nsaved {md} and {js}")
    return rows

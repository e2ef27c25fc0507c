"""The main job (`make demo`): a teacher, then one student trained alone and by distillation, one table.

On a CPU the pair is the one that fits the 10-minute budget on 2 cores (resnet20 -> resnet8); on a
GPU it is the pair of the distillation literature (resnet32x4 -> resnet8x4). Every student row uses
the same seed, so the students start from the same weights and see the same batches.
"""

from __future__ import annotations

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
}
GPU_PLAN = {
    "teacher": ("supervised/fmnist_resnet32x4.yaml", []),
    "students": [
        ("student alone", "supervised/fmnist_resnet8x4.yaml", []),
        ("KD", "distill/fmnist_kd.yaml", []),
        ("DKD", "distill/fmnist_dkd.yaml", ["method.warmup_epochs=2.5"]),
    ],
    "student_overrides": ["model.name=resnet8x4", "trainer.max_steps=12880", "trainer.eval_every=1288",
                          "trainer.ckpt_every=1288", "trainer.channels_last=true"],
}


def recipes_dir() -> Path:
    """``./recipes`` when run from a checkout, else the one beside the installed sources."""
    for base in (Path.cwd() / "recipes", Path(__file__).resolve().parents[2] / "recipes"):
        if base.is_dir():
            return base
    raise FileNotFoundError("recipes/ folder not found: run from the mentor checkout")


def format_table(rows: list[dict]) -> str:
    head = ["role", "model", "params", "steps", "val acc", "test acc (last)", "test acc (best val)",
            "img/s", "minutes"]
    lines = [head]
    for r in rows:
        s = r["summary"]
        lines.append([r["role"], s["model"], f"{s['params'] / 1e6:.2f}M", str(s["steps"]),
                      f"{100 * s['val_acc_best']:.2f}", f"{100 * s['test_acc_last']:.2f}",
                      f"{100 * s.get('test_acc_best', float('nan')):.2f}",
                      f"{s['train_img_s'] or float('nan'):,.0f}", f"{s['wall_s'] / 60:.1f}"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = []
    for i, row in enumerate(lines):
        out.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def run_demo(device: str = "auto", out: str | None = None, quick: bool = False) -> list[dict]:
    """Teacher and students on Fashion-MNIST, one table. ``quick`` runs are another recipe (a few steps),
    so they go to their own folder (``runs/demo-quick``) and never meet the full runs'."""
    out = out or ("runs/demo-quick" if quick else "runs/demo")
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    plan = GPU_PLAN if on_gpu else CPU_PLAN
    base = [f"trainer.device={device}"]
    if quick:
        base += ["trainer.max_steps=20", "trainer.eval_every=20", "trainer.ckpt_every=20", "trainer.log_every=10",
                 "data.val_size=1000", "schedule.warmup_steps=0"]  # the recipes warm up longer than 20 steps
    recipe, extra = plan["teacher"]
    teacher_dir = f"{out}/teacher_{Path(recipe).stem.removeprefix('fmnist_')}"
    rows = [{"role": "teacher",
             "summary": train(load_config(recipes_dir() / recipe, [f"out_dir={teacher_dir}", *extra, *base]))}]
    for role, recipe, extra in plan["students"]:
        run = f"{out}/{role.replace(' ', '_').lower()}"
        overrides = [f"out_dir={run}", *plan["student_overrides"], *extra, *base]
        if recipe.startswith("distill/"):
            overrides.append(f"method.teacher={teacher_dir}")
        rows.append({"role": role, "summary": train(load_config(recipes_dir() / recipe, overrides))})
    print("\nFashion-MNIST, " + ("GPU" if on_gpu else f"CPU ({torch.get_num_threads()} threads)") + "\n")
    print(format_table(rows))
    return rows

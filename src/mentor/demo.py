"""The main job (`make demo`): a teacher and a small student trained on Fashion-MNIST, one table.

On a CPU the pair is the one that fits the 10-minute budget on 2 cores (resnet20 -> resnet8); on a
GPU it is the pair of the distillation literature (resnet32x4 -> resnet8x4).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import load_config
from .engine import train

CPU_PLAN = [("teacher", "supervised/fmnist_resnet20.yaml"), ("student", "supervised/fmnist_resnet8.yaml")]
GPU_PLAN = [("teacher", "supervised/fmnist_resnet32x4.yaml"), ("student", "supervised/fmnist_resnet8x4.yaml")]


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
                      f"{s['train_img_s']:,.0f}", f"{s['wall_s'] / 60:.1f}"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = []
    for i, row in enumerate(lines):
        out.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def run_demo(device: str = "auto", out: str = "runs/demo", quick: bool = False) -> list[dict]:
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    plan = GPU_PLAN if on_gpu else CPU_PLAN
    rows = []
    for role, recipe in plan:
        overrides = [f"out_dir={out}/{Path(recipe).stem}", f"trainer.device={device}"]
        if quick:
            overrides += ["trainer.max_steps=20", "trainer.eval_every=20", "trainer.ckpt_every=20",
                          "trainer.log_every=10", "data.val_size=1000"]
        cfg = load_config(recipes_dir() / recipe, overrides)
        rows.append({"role": role, "summary": train(cfg)})
    table = format_table(rows)
    print("\nFashion-MNIST, " + ("GPU" if on_gpu else f"CPU ({torch.get_num_threads()} threads)") + "\n")
    print(table)
    return rows

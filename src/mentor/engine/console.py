"""What a run says on the console besides its progress: the header at the start, the warnings about a
recipe that likely defeats its purpose, and the readable end-of-run and evaluation summaries.

The header (rank 0, once per session) names the method, the network and its parameter count, the
teachers and how well they did in their own runs, the data sizes, the length of the run in steps and
epochs, the batch, the device and precision, and the output directory. :func:`summary_text` and
:func:`eval_text` are what ``mentor train`` and ``mentor eval`` print (``--json`` prints the JSON).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .logger import format_duration

if TYPE_CHECKING:
    from ..methods import Method
    from .trainer import Trainer


def parameter_count(module: nn.Module, trainable: bool = False) -> int:
    """Elements of ``module``'s parameters (only those with ``requires_grad`` when ``trainable``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


# -- the header ------------------------------------------------------------------------------------------

def _headline(summary: dict[str, Any]) -> tuple[str, float | None, float | None]:
    """(number name, test value last, test value at the best validation step) of a run's summary."""
    metric = str(summary.get("select", "val_acc")).removeprefix("val_")
    base = metric.removesuffix("_ema")
    return base, summary.get(f"test_{metric}_last"), summary.get(f"test_{base}_best")


def _number(name: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}%" if name.split("@")[0].split("_")[0] == "acc" else f"{value:.4f}"


def teacher_line(net: nn.Module) -> str:
    """``teacher MODEL (N parameters) from RUN: test acc X (best val), Y (last)`` for a loaded teacher."""
    source = getattr(net, "teacher_source", None) or {}
    text = f"teacher {source.get('model', type(net).__name__)} ({parameter_count(net):,} parameters)"
    file = source.get("file")
    if not file:
        return text
    run = Path(file).parent
    summary_file = run / "summary.json"
    if source.get("dataset") is None or not summary_file.is_file():
        return f"{text} from {file}" + ("" if source.get("dataset") is None else " (its run has no summary.json)")
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError):
        return f"{text} from {run} (its summary.json cannot be read)"
    name, last, best = _headline(summary)
    return (f"{text} from {run}: test {name} {_number(name, best)} (best val), {_number(name, last)} (last), "
            f"trained on {source['dataset']}")


def teacher_lines(method: Method) -> list[str]:
    """One line per frozen teacher the method declared (a ModuleList of teachers: one per member)."""
    lines = []
    for name in method.teacher_names():
        module = getattr(method, name)
        if isinstance(module, nn.ModuleDict):
            members = list(module.values())
        elif isinstance(module, nn.ModuleList):
            members = list(module)
        else:
            members = [module]
        lines += [teacher_line(m) for m in members]
    return lines


def data_line(trainer: Trainer) -> str:
    """``data NAME: N train / N val / N test (+ N unlabelled)``; held-out domains by name."""
    s, d = trainer.splits, trainer.cfg.data
    parts = [f"{len(s.train):,} train" if s.train is not None else "no training data (data-free)",
             f"{len(s.val):,} val"]
    if s.tests:
        parts.append("test " + ", ".join(f"{k} {len(v):,}" for k, v in s.tests.items()))
    else:
        parts.append(f"{len(s.test):,} test")
    text = f"data {d.name}: " + " / ".join(parts)
    if s.unlabeled is not None:
        text += f" (+ {len(s.unlabeled):,} unlabelled)"
    return text


def precision_name(trainer: Trainer) -> str:
    """``fp32``, ``bf16 autocast`` or ``fp16 autocast`` (``trainer.precision=auto`` resolved)."""
    p = getattr(trainer, "precision", None) or trainer.cfg.trainer.precision
    if p == "auto":
        p = "bf16" if trainer.device.type == "cuda" else "fp32"
    return p if p == "fp32" else f"{p} autocast"


def run_header(trainer: Trainer) -> list[str]:
    """The lines logged when a run starts: what trains, from what, on what, for how long, and where to."""
    from .trainer import hardware_name

    cfg, t, method = trainer.cfg, trainer.cfg.trainer, trainer.method
    deploy = method.deployable()
    n, trained = parameter_count(deploy), parameter_count(method, trainable=True)
    same = trained == parameter_count(deploy, trainable=True)
    extra = "" if same else f" ({trained:,} trained in all, with the method's other parts)"
    lines = [f"method {cfg.method.name}: {cfg.model.name}, {n:,} parameters{extra}"]
    lines += teacher_lines(method)
    lines.append(data_line(trainer))
    per_epoch = trainer.inputs.steps_per_epoch
    world = trainer.dist.world_size
    batch = f"batch {cfg.data.batch_size}"
    if world > 1 or t.accumulate > 1:
        batch += (f" x {world} processes x {t.accumulate} accumulated = "
                  f"{cfg.data.batch_size * world * t.accumulate} images per step")
    if type(method).inputs.data:
        length = (f"{t.max_steps:,} steps ~ {t.max_steps / max(1, per_epoch):.1f} epochs ({per_epoch:,} step"
                  f"{'s' if per_epoch > 1 else ''} per epoch)")
    else:
        length = f"{t.max_steps:,} steps (no data: every batch is synthesised)"
    evals = f"evaluates every {t.eval_every:,} steps" if t.eval_every < t.max_steps else "evaluates at the end"
    lines.append(f"{length}, {batch}; {evals}")
    device = f"device {trainer.device} ({hardware_name(trainer.device)}), {precision_name(trainer)}"
    if trainer.device.type == "cpu":
        import torch

        threads = torch.get_num_threads()
        device += f", {threads} thread{'s' if threads > 1 else ''}"
    if t.ema is not None:
        device += f", EMA {t.ema}"
    lines.append(device)
    outputs = ["metrics.jsonl", *(f"metrics.{x}" if x == "csv" else f"{x}/" for x in dict.fromkeys(t.loggers)
                                  if x != "jsonl")]
    lines.append(f"output {trainer.run_dir} ({', '.join(outputs)})")
    return lines


# -- warnings --------------------------------------------------------------------------------------------

def start_warnings(trainer: Trainer) -> list[str]:
    """Recipe settings that likely defeat the run's purpose, logged once at the start (rank 0): a warm-up
    that takes half the run or more (``schedule.warmup_steps`` or a phase's own), and what the method says
    through :meth:`mentor.methods.Method.warnings` (by default: an EMA horizon longer than the run)."""
    t, s = trainer.cfg.trainer, trainer.cfg.schedule
    out: list[str] = []
    for phase in trainer.phases:
        warm = int(phase.schedule.get("warmup_steps", s.warmup_steps))
        if not warm or 2 * warm < t.max_steps:
            continue
        key = "schedule.warmup_steps" if "warmup_steps" not in phase.schedule else \
            f"the warm-up of phase {phase.name!r} of method {trainer.cfg.method.name}"
        if warm >= t.max_steps:
            msg = (f"{key}={warm} is not shorter than the run (trainer.max_steps={t.max_steps}): the learning rate "
                   "never reaches its peak")
        else:
            msg = (f"{key}={warm} takes {warm / t.max_steps:.0%} of the run (trainer.max_steps={t.max_steps}): the "
                   f"learning rate peaks only at step {warm}; shorten the warm-up or train longer")
        if msg not in out:
            out.append(msg)
    for msg in trainer.method.warnings(t.max_steps, t.ema):
        if msg not in out:
            out.append(msg)
    return out


# -- summaries -------------------------------------------------------------------------------------------

def summary_text(summary: dict[str, Any], run_dir: str | Path | None = None) -> str:
    """The end of ``mentor train``: the headline numbers of a run's ``summary.json`` in a few lines."""
    name, last, best = _headline(summary)
    select = str(summary.get("select", f"val_{name}"))
    params = summary.get("params")
    head = f"{summary.get('method', '?')}: {summary.get('model', '?')}"
    head += f", {params:,} parameters" if isinstance(params, int) else ""
    head += f", {summary.get('steps', '?'):,} steps" if isinstance(summary.get("steps"), int) else ""
    lines = [head,
             f"  test {name}   {_number(name, last)} (last)   {_number(name, best)} (best val, step "
             f"{summary.get('best_step', '?')})"]
    worst_last = summary.get(f"test_{name}_last@worst")
    if worst_last is not None:
        lines.append(f"  worst held-out domain   {_number(name, worst_last)} (last)")
    val = summary.get(f"{select}_best")
    if val is not None:
        lines.append(f"  {select} {_number(name, val)} (best)   {_number(name, summary.get(f'{select}_last'))} (last)")
    timing = []
    if isinstance(summary.get("wall_s"), (int, float)):
        timing.append(f"wall time {format_duration(summary['wall_s'])}")
    if isinstance(summary.get("train_img_s"), (int, float)):
        timing.append(f"{summary['train_img_s']:,.0f} img/s")
    if summary.get("device"):
        timing.append(str(summary["device"]))
    if timing:
        lines.append("  " + ", ".join(timing))
    if run_dir is not None:
        lines.append(f"  run {run_dir} (summary.json; --json prints it)")
    return "\n".join(lines)


def eval_text(result: dict[str, Any]) -> str:
    """The result of ``mentor eval`` as aligned ``name  value`` lines under the checkpoint's name."""
    head = f"{result.get('checkpoint', '?')}"
    facts = []
    if result.get("step") is not None:
        facts.append(f"step {result['step']:,}")
    if isinstance(result.get("params"), int):
        facts.append(f"{result['params']:,} parameters")
    lines = [head + (f" ({', '.join(facts)})" if facts else "")]
    numbers = {k: v for k, v in result.items() if k not in ("checkpoint", "step", "params")}
    width = max((len(k) for k in numbers), default=0)
    for key, value in numbers.items():
        name = key.split("_", 1)[1] if "_" in key else key
        shown = _number(name, value) if isinstance(value, (int, float)) else str(value)
        lines.append(f"  {key.ljust(width)}  {shown}")
    return "\n".join(lines)

"""The adaptation runner: a trained run adapts online over ordered test streams (``mentor adapt``).

Each stream of a shift (``fmnist_c``: one per corruption and severity; a domain set: one per domain)
is read once, in a fixed seeded order, in batches of ``data.batch_size`` with the last partial batch
kept (no ``drop_last``). The method predicts each batch as its paper prescribes (before or as it
adapts) and the accuracy is that of the predictions made online. Settings: ``reset`` restores the
source state (weights, statistics, optimizer) before every stream; ``continual`` carries it across
streams in order; ``mixed`` shuffles every stream into one (domains interleaved batch by batch) and
reports the accuracy of each domain from the same online predictions. An episodic method is reset
before every batch in every setting.

The run directory holds ``config.yaml`` (the resolved method and the adaptation settings),
``metrics.jsonl`` (one record per stream) and ``summary.json`` (accuracy per stream, their mean and
the worst, the test batch size, the backward passes per test sample and the images per second).
Everything a user can get wrong (the run, the shift, its classes, the method) is checked before the
directory is created.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import ConfigError, RunConfig, build_config, to_dict
from ..errors import ContractError
from ..methods import METHODS, BuildInfo, Refresh, StepContext
from . import checkpoint as ckpt
from .deployable import ADAPTED, build_deployable
from .logger import format_duration, log
from .optim import build_optimizer
from .rundir import RunDir
from .trainer import autocast_for, hardware_name, init_network, resolve_device

SETTINGS = ("reset", "continual", "mixed")


@dataclass
class AdaptPlan:
    """What ``mentor adapt`` was asked: the source run, the shift, the setting and the shift's options."""

    run: str
    shift: str
    setting: str = "reset"
    root: str | None = None
    options: dict[str, Any] | None = None
    save_model: bool = False  # write the adapted network, as it stands after the last stream, to adapted.pt


def _source(run: str) -> tuple[Path, dict[str, Any]]:
    try:
        file, info, _ = ckpt.run_info(run, "source run")
    except ckpt.CheckpointError as e:
        raise ConfigError(str(e)) from None
    return file, info


def _stats(info: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The source run's input normalisation (older runs: the dataset's published constants)."""
    if info.get("mean"):
        return tuple(info["mean"]), tuple(info["std"])
    from ..data import get_source

    src = get_source(info["dataset"])
    return src.mean, src.std


def _check_shift(shift, info: dict[str, Any], file: Path) -> None:
    c, _, w = shift.image_shape
    problems = []
    if shift.num_classes != info["num_classes"]:
        problems.append(f"{shift.num_classes} classes, the network {info['num_classes']}")
    elif info.get("classes") and list(info["classes"]) != shift.classes:
        problems.append(f"classes {shift.classes[:4]}..., the network's {list(info['classes'])[:4]}...")
    if c != info["in_channels"] or w != info["image_size"]:
        problems.append(f"{c}x{w}x{w} images, the network was trained on {info['in_channels']} channels of "
                        f"{info['image_size']} pixels")
    if problems:
        raise ConfigError(f"shift {shift.name!r} does not fit the source run {file}: the shift has "
                          f"{'; '.join(problems)}. Adapt a network trained on the shift's source data "
                          f"(for {shift.name}: its clean training set).")


def _default_out(plan: AdaptPlan, method: str) -> str:
    name = Path(plan.run).resolve().name if Path(plan.run).is_dir() else Path(plan.run).resolve().parent.name
    return f"runs/adapt/{name}-{plan.shift}-{method}-{plan.setting}"


def build_adapt_config(overrides: list[str]) -> RunConfig:
    """The method, batch size and engine settings of an adaptation run (``method.name`` default
    ``source``; ``data.batch_size`` the test batch, default 128)."""
    raw: dict[str, Any] = {"method": {"name": "source"}, "data": {"batch_size": 128}}
    from ..config import apply_overrides

    cfg = build_config(apply_overrides(raw, overrides))
    from ..adapt.base import TestTimeMethod

    if not issubclass(METHODS.get(cfg.method.name), TestTimeMethod):
        names = [n for n in METHODS.names() if _is_tta(n)]
        raise ConfigError(f"method.name={cfg.method.name!r} is not a test-time method; `mentor adapt` runs "
                          f"{', '.join(names)}")
    return cfg


def _is_tta(name: str) -> bool:
    from ..adapt.base import TestTimeMethod
    from ..methods.catalog import BUILTIN

    return BUILTIN.get(name, "").startswith("mentor.adapt") and issubclass(METHODS.get(name), TestTimeMethod)


def adapt(plan: AdaptPlan, cfg: RunConfig) -> dict[str, Any]:
    """Run one adaptation plan; returns the summary (also written to ``<out_dir>/summary.json``)."""
    from ..data.domains import load_domains

    if plan.setting not in SETTINGS:
        raise ConfigError(f"--setting {plan.setting!r}: use one of {', '.join(SETTINGS)}")
    file, info = _source(plan.run)
    shift = load_domains(plan.shift, root=plan.root, **(plan.options or {}))
    _check_shift(shift, info, file)
    t = cfg.trainer
    device = resolve_device(t.device)
    autocast = autocast_for(device, t.precision)
    if not cfg.out_dir:
        cfg.out_dir = _default_out(plan, cfg.method.name)
    run_dir = Path(cfg.out_dir)

    mean, std = _stats(info)
    binfo = BuildInfo(num_classes=info["num_classes"], in_channels=info["in_channels"], image_size=info["image_size"],
                      device=str(device), mean=mean, std=std)
    torch.manual_seed(t.seed)
    net = build_deployable(info)  # the student, or what its run ships instead (SimKD's reused head, ...)
    init_network(net, plan.run, binfo, info["model"])
    method = METHODS.get(cfg.method.name)(cfg.method, net, binfo).to(device)
    if plan.save_model:
        _adapted_state(method, info, cfg.method.name)  # refused before anything is written
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)

    with RunDir(run_dir).locked():  # one run per directory
        resolved = {"adapt": {"run": str(plan.run), "checkpoint": str(file), "shift": plan.shift,
                              "setting": plan.setting, "root": plan.root, "options": plan.options or {}},
                    **to_dict(cfg)}
        ckpt.atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        method.on_source(_source_refresh(info, cfg, m, s, device, autocast))
        method.snapshot()

        streams = _streams(shift, plan.setting, t.seed)
        records: list[dict[str, Any]] = []
        optimizers = None
        t0 = time.perf_counter()
        images = 0
        backward = torch.zeros((), device=device)
        seen = 0  # batches since the last reset: ctx.step
        gen = torch.Generator(device=device).manual_seed(t.seed)
        for i, (name, ds, domain, order) in enumerate(streams):
            if plan.setting == "reset" or i == 0:
                method.reset()
                optimizers = _optimizers(method, cfg)
                seen = 0
            method.prepare()
            correct = torch.zeros(max(1, len(shift.domains)), dtype=torch.long, device=device)
            sums: dict[str, torch.Tensor] = {}
            batches = 0
            for start in range(0, len(ds), cfg.data.batch_size):
                idx = order[start:start + cfg.data.batch_size]
                x = (ds.images[idx].to(device).float().div_(255.0) - m) / s
                y = ds.labels[idx].to(device)
                if method.episodic:
                    method.reset()
                    optimizers = _optimizers(method, cfg)
                    method.prepare()
                    seen = 0
                ctx = StepContext(step=seen, max_steps=0, generator=gen)
                out = _step(method, optimizers, {"x": x}, ctx, autocast, cfg)
                hit = (out.pop("logits").argmax(1) == y).long()
                correct += _per_domain(hit, domain[idx].to(device), len(correct))
                backward += out.pop("backward_samples")
                for k, v in out.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
                batches += 1
                seen += 1
            images += len(ds)
            per = correct.tolist()  # one read per stream
            acc = sum(per) / len(ds)
            record = {"stream": name, "acc": acc, "error": 1.0 - acc, "n": len(ds),
                      **{k: float(v) / batches for k, v in sums.items()}}
            if plan.setting == "mixed":
                counts = torch.bincount(domain, minlength=len(per)).tolist()
                record["acc_by_domain"] = {d: per[j] / counts[j] for j, d in enumerate(shift.domains) if counts[j]}
            records.append(record)
            ckpt.atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            log.info(f"{name}: acc {acc:.4f}")
        wall = time.perf_counter() - t0
        accs = {r["stream"]: r["acc"] for r in records}
        if plan.setting == "mixed":
            accs = dict(records[0]["acc_by_domain"])
        summary = {"method": cfg.method.name, "setting": plan.setting, "shift": plan.shift, "source_run": str(plan.run),
                   "checkpoint": str(file),
                   "options": plan.options or {}, "streams": len(accs), "acc_mean": sum(accs.values()) / len(accs),
                   "acc_worst": min(accs.values()), "error_mean": 1.0 - sum(accs.values()) / len(accs),
                   **({"acc_online": records[0]["acc"]} if plan.setting == "mixed" else {}),
                   **{f"acc@{k}": v for k, v in accs.items()}, "batch_size": cfg.data.batch_size,
                   "backward_per_sample": float(backward) / images,
                   "wall_s": wall, "img_s": images / wall if wall > 0 else float("nan"),
                   "device": hardware_name(device), "torch": str(torch.__version__)}
        ckpt.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if plan.save_model:
            adapted = {"source_run": str(plan.run), "source_checkpoint": str(file), "method": cfg.method.name,
                       "shift": plan.shift, "setting": plan.setting, "acc_mean": summary["acc_mean"]}
            ckpt.atomic_save({"model": _adapted_state(method, info, cfg.method.name), "info": dict(info),
                              "adapted": adapted}, run_dir / ADAPTED)
            log.info(f"adapted network written to {run_dir / ADAPTED}")
        log.info(f"done in {format_duration(wall)}: mean acc {summary['acc_mean']:.4f}, worst "
                 f"{summary['acc_worst']:.4f} over {len(accs)} streams ({plan.setting})")
        return summary


def _adapted_state(method, info: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    """The adapted network's weights as the source run's network holds them: ``--save-model`` needs the same
    entries and shapes. A method whose own normalisation modules keep BatchNorm's statistics under BatchNorm's
    names (RoTTA's robust BN) fits, its missing ``num_batches_tracked`` counters taken from the source network;
    one that changes the layers otherwise cannot be saved."""
    source = build_deployable(info).state_dict()
    state = method.deployable().state_dict()
    counters = {k: v for k, v in source.items() if k.endswith("num_batches_tracked") and k not in state}
    state = {**state, **counters}
    expected = {k: tuple(v.shape) for k, v in source.items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        odd = sorted(set(expected.items()) ^ set(got.items()))[:3]
        raise ConfigError(f"--save-model: method {name} changes the network's layers (entries such as "
                          f"{', '.join(k for k, _ in odd)} differ from the source network's), so its adapted "
                          "network would not load into the source run's architecture; leave --save-model out")
    return state


def _per_domain(hit: torch.Tensor, domain: torch.Tensor, n: int) -> torch.Tensor:
    """Correct predictions per domain (one stream holds one domain except in the ``mixed`` setting)."""
    return torch.zeros(n, dtype=torch.long, device=hit.device).index_add_(0, domain, hit)


def _streams(shift, setting: str, seed: int) -> list[tuple[str, Any, torch.Tensor, torch.Tensor]]:
    """(name, images, domain position of each image, read order) per stream. ``mixed`` concatenates every
    domain and shuffles them into one stream (the online benchmark's ``mixed_domains``)."""
    from ..data.readers import ArrayDataset

    parts = list(shift.domains.items())
    if setting == "mixed":
        first = parts[0][1]
        ds = ArrayDataset(torch.cat([d.images for _, d in parts]), torch.cat([d.labels for _, d in parts]),
                          first.num_classes, f"{shift.name}:mixed", list(first.classes), first.mean, first.std)
        domain = torch.cat([torch.full((len(d),), j, dtype=torch.long) for j, (_, d) in enumerate(parts)])
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
        return [("mixed", ds, domain, order)]
    return [(name, ds, torch.full((len(ds),), j, dtype=torch.long),
             torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)))
            for j, (name, ds) in enumerate(parts)]


def _source_refresh(info: dict[str, Any], cfg: RunConfig, m, s, device, autocast) -> Refresh:
    """The source run's labelled training split for :meth:`TestTimeMethod.on_source` (None when the source
    run's dataset is not one the library reads by name)."""
    from ..data import load_dataset
    from .evaluate import Evaluator

    try:
        train = load_dataset(info["dataset"], split="train", root=info.get("root"))
    except Exception:  # a domain set or a folder: the method says what it needs
        train = None
    ev = Evaluator(m, s, cfg.data.eval_batch_size, device, autocast=autocast)
    return Refresh(labeled=train, unlabeled=None, evaluator=ev, device=device)


def _optimizers(method, cfg: RunConfig) -> list[tuple[Any, torch.optim.Optimizer]]:
    return [(p, build_optimizer(p.params, cfg.optim, p.optim)) for p in method.phases() if p.params]


def _step(method, optimizers, batch: dict[str, torch.Tensor], ctx: StepContext, autocast, cfg: RunConfig
          ) -> dict[str, torch.Tensor]:
    """One test batch: the method's predictions and, where it learns, its update."""
    with autocast():
        out = method.adapt_step(batch, ctx)
    if "logits" not in out:
        raise ContractError(f"{cfg.method.name}.adapt_step must return 'logits' (the predictions scored)")
    loss = out.get("loss")
    learns = loss is not None and loss.requires_grad
    out.setdefault("backward_samples", torch.full((), float(len(batch["x"]) if learns else 0.0),
                                                  device=batch["x"].device))
    apply = out.pop("apply", None)
    if learns:
        held = _hold(optimizers) if apply is not None else None
        for _, opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for _, opt in optimizers:
            opt.step()
        if held is not None:
            _keep_unless(held, optimizers, apply)
        method.after_step(ctx)  # EMA teachers, stochastic restore: after every update, as in training
        reset = method.optimizer_reset()
        if reset is not None:
            _zero_state_where(optimizers, reset)
    return {k: v for k, v in out.items() if k == "logits" or v.dim() == 0}


def _opt_tensors(opt: torch.optim.Optimizer) -> list[tuple[Any, str, torch.Tensor | None]]:
    """Every parameter and every tensor of its optimizer state, as (owner, key, tensor) triples."""
    out: list[tuple[Any, str, torch.Tensor | None]] = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append((p, "", p))
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out.append((p, k, v))
    return out


@torch.no_grad()
def _hold(optimizers) -> list[dict[tuple[int, str], torch.Tensor]]:
    return [{(id(owner), k): t.detach().clone() for owner, k, t in _opt_tensors(opt)} for _, opt in optimizers]


@torch.no_grad()
def _keep_unless(held, optimizers, apply: torch.Tensor) -> None:
    """Where ``apply`` (0-d bool, from the step's ``"apply"``) is false, put the parameters and the optimizer
    state back as they were before the step (a state created by the step goes back to zeros, which the
    optimizers read as a fresh state). No host read."""
    for saved, (_, opt) in zip(held, optimizers):
        for owner, k, t in _opt_tensors(opt):
            old = saved.get((id(owner), k))
            t.copy_(torch.where(apply, t, torch.zeros_like(t) if old is None else old))


@torch.no_grad()
def _zero_state_where(optimizers, flag: torch.Tensor) -> None:
    """Where ``flag`` (0-d bool) holds, reset every optimizer's state to a fresh one (zeros), as a method
    that restores its source weights also restarts its optimizer (SAR's model recovery)."""
    for _, opt in optimizers:
        for _, k, t in _opt_tensors(opt):
            if k:
                t.mul_((~flag).to(t.dtype))

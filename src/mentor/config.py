"""Recipes: YAML files mapped onto typed dataclasses, with dotted overrides and strict validation.

A recipe is a plain YAML mapping whose shape is :class:`RunConfig`. ``method`` names a registered
method and carries that method's hyper-parameters (its own dataclass, defaults = the paper's)::

    method: {name: supervised, label_smoothing: 0.1}
    model: {name: resnet20}
    data: {name: fashion_mnist, batch_size: 128}
    optim: {name: sgd, lr: 0.1}
    trainer: {max_steps: 2000}

Unknown keys fail and suggest the nearest valid key; wrong types name the key and the expected type;
``key.sub=value`` overrides are parsed as YAML scalars and validated the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .registry import suggest


@dataclass
class ModelConfig:
    """Which zoo model to build (any name from ``mentor list models``) and extra constructor kwargs."""

    name: str = "resnet20"
    kwargs: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # a run directory or checkpoint whose network starts this one


@dataclass
class DataConfig:
    """The labelled training data, its validation split and the augmentation of each view.

    ``val_size`` images are carved from the training set (stratified, seeded by ``split_seed``);
    ``subset`` keeps a stratified subset of the remaining training images (the low-data regime).

    Few labels: ``labels_per_class`` keeps that many labelled images per class (stratified, seeded by
    ``label_seed``, the fold); a method that consumes unlabelled data then gets the whole training
    split (labelled images included, as in FixMatch and USB) as its unlabelled pool, in batches of
    ``unlabeled_ratio * batch_size``. A labelled split smaller than a batch is repeated to fill it.

    Domains: ``name`` may be a domain set (``rotated_fmnist``, ``digits_domains``, ``domain_folder``,
    ``domain_list``); ``test_domains`` are held out (reported one by one, with their mean and worst),
    ``domains`` are the training domains (default: all the others), each split into a training part
    and a ``holdout_fraction`` validation part (DomainBed's in/out split, seeded by ``split_seed``);
    validation is the union of the training domains' holdout parts.

    ``name: image_folder`` reads ``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``root`` and
    ``test_root``), resized to ``image_size`` with ``channels`` 1 or 3; ``stream: true`` decodes batches
    in ``num_workers`` DataLoader workers instead of holding the images on the device.
    """

    name: str = "fashion_mnist"
    root: str | None = None
    val_size: int = 5000
    split_seed: int = 0
    subset: int | None = None
    labels_per_class: int | None = None
    label_seed: int = 0
    unlabeled_ratio: float = 7.0
    domains: list[str | int] | None = None
    test_domains: list[str | int] = field(default_factory=list)
    holdout_fraction: float = 0.2
    batch_size: int = 128
    eval_batch_size: int = 1000
    augment: str = "weak"
    padding: int = 4
    flip: bool = True
    image_size: int = 32
    channels: int = 3
    test_root: str | None = None
    stream: bool = False
    num_workers: int = 2


@dataclass
class OptimConfig:
    """Optimizer. Weight decay is not applied to norm weights and biases unless ``decay_norm_bias``."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    decay_norm_bias: bool = False


@dataclass
class ScheduleConfig:
    """Learning-rate schedule over optimizer steps, after ``warmup_steps`` of linear warm-up.

    ``milestones`` (multistep) are step indices; fractions in (0, 1) are read as a share of
    ``trainer.max_steps`` so one recipe can be shortened with a single override.
    """

    name: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_steps: int = 0
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclass
class TrainerConfig:
    """What the engine does around the method: steps, precision, checkpoints, logging, EMA."""

    max_steps: int = 1000
    eval_every: int = 500
    ckpt_every: int = 500
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = False
    compile: bool = False
    cuda_graph: bool = False  # capture the whole step once and replay it (CUDA; see engine.graph)
    accumulate: int = 1
    clip_grad: float | None = None
    ema: float | None = None
    threads: int | None = None
    progress: bool = True


@dataclass
class RunConfig:
    """One training run: the method with its hyper-parameters, the model, the data and the engine."""

    method: Any = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    out_dir: str = "runs/default"
    resume: bool = True


# --------------------------------------------------------------------------------------------------
# typed construction


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only where it is lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        near = suggest(str(value), [str(a) for a in typing.get_args(tp)])
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}.{near}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        arm = args[0] if args else Any
        items = [_coerce(v, arm, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool (true/false), got {value!r} ({type(value).__name__})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected int, got {value!r} ({type(value).__name__})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {value!r} ({type(value).__name__})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {value!r} ({type(value).__name__})")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            near = suggest(str(key), names)
            raise ConfigError(f"unknown key {full!r}.{near} Valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML-safe data (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------------
# recipes and overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted override in a copy of the raw recipe mapping (validation happens later)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a mapping")
            node = nxt
        node[path[-1]] = value
    return out


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe file as a mapping, with a clear error for a missing file or bad YAML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {str(p)!r} not found (see `ls recipes/*/`)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(p)!r} must be a mapping at the top level")
    return data


def build_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a raw recipe mapping into a RunConfig, resolving the method's own dataclass."""
    from .methods import METHODS
    raw = dict(raw)
    method_raw = raw.pop("method", None) or {"name": "supervised"}
    if isinstance(method_raw, str):
        method_raw = {"name": method_raw}
    if not isinstance(method_raw, dict) or "name" not in method_raw:
        raise ConfigError("method: expected a mapping with a 'name' key, e.g. {name: supervised}")
    name = method_raw["name"]
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}.{suggest(str(name), METHODS.names())} "
                          f"Known: {', '.join(METHODS.names())}")
    hp = from_dict(METHODS.get(name).Config, method_raw, prefix="method")
    hp.name = name
    cfg = from_dict(RunConfig, raw)
    cfg.method = hp
    _check(cfg)
    return cfg


def _check(cfg: RunConfig) -> None:
    t = cfg.trainer
    for key in ("max_steps", "eval_every", "ckpt_every", "log_every", "accumulate"):
        if getattr(t, key) < 1:
            raise ConfigError(f"trainer.{key} must be >= 1, got {getattr(t, key)}")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    if t.ema is not None and not 0.0 < t.ema < 1.0:
        raise ConfigError(f"trainer.ema is a decay in (0, 1), got {t.ema}")
    d = cfg.data
    if d.labels_per_class is not None and d.labels_per_class < 1:
        raise ConfigError(f"data.labels_per_class must be >= 1, got {d.labels_per_class}")
    if d.labels_per_class is not None and d.subset is not None:
        raise ConfigError("data.labels_per_class and data.subset both choose the labelled images: set one")
    if not d.unlabeled_ratio > 0:
        raise ConfigError(f"data.unlabeled_ratio (mu) must be > 0, got {d.unlabeled_ratio}")
    if not 0.0 < d.holdout_fraction < 1.0:
        raise ConfigError(f"data.holdout_fraction must lie in (0, 1), got {d.holdout_fraction}")
    d.test_domains = [str(x) for x in d.test_domains]
    if d.domains is not None:
        d.domains = [str(x) for x in d.domains]
        both = sorted(set(d.domains) & set(d.test_domains))
        if both:
            raise ConfigError(f"data.domains and data.test_domains share {both}: a held-out domain is never "
                              "trained on")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe (or start from defaults), apply overrides, validate."""
    raw = read_recipe(path) if path is not None else {}
    try:
        return build_config(apply_overrides(raw, overrides or []))
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

"""Recipes: YAML files mapped onto typed dataclasses, with dotted overrides and strict validation.

A recipe is a plain YAML mapping whose shape is :class:`RunConfig`. ``method`` names a registered
method and carries that method's hyper-parameters (its own dataclass, defaults = the paper's)::

    method: {name: supervised, label_smoothing: 0.1}
    model: {name: resnet20}
    data: {name: fashion_mnist, batch_size: 128}
    optim: {name: sgd, lr: 0.1}
    trainer: {max_steps: 2000}

Unknown keys fail and suggest the nearest valid key (case ignored); wrong types name the key and the
expected type; ``key.sub=value`` overrides are parsed by the same YAML loader and validated the same way.

Values are checked where their dataclass is defined: :func:`rules` attaches a :class:`Rule` (a range,
positivity, a non-empty string, ...) to a field, and :func:`check_values` applies them whenever a recipe
builds the dataclass (null skips a field's rules: it means off, all or default). Method hyper-parameter
dataclasses declare theirs the same way; a subclass adds to the rules it inherits. What involves two
sections (``schedule.min_lr <= optim.lr``) or the machine (CUDA) is checked once the whole run is built.

Recipe files are read strictly: UTF-8 (a BOM selects UTF-8/16/32), no duplicate keys at any level, no
nesting deeper than :data:`MAX_DEPTH`, no tags beyond YAML's plain data (``safe_load``'s set).
"""

from __future__ import annotations

import codecs
import copy
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .registry import suggest

# --------------------------------------------------------------------------------------------------
# value rules


@dataclass(frozen=True)
class Rule:
    """What one recipe value may be: ``ok(value)`` decides, ``says`` tells the user ("> 0", "in [0, 1)").

    ``each``: the rule applies to every item of a list (the message names the item); ``note``: why,
    added to the message where the bare range does not say what goes wrong.
    """

    ok: Callable[[Any], bool]
    says: str
    note: str = ""
    each: bool = False

    def because(self, note: str) -> Rule:
        return dataclasses.replace(self, note=note)


def above(lo: float) -> Rule:
    return Rule(lambda v: v > lo, f"> {lo}")


def at_least(lo: float) -> Rule:
    return Rule(lambda v: v >= lo, f">= {lo}")


def between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """``lo <= v <= hi``, either end open."""
    def ok(v: Any) -> bool:
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)

    return Rule(ok, f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


def each(rule: Rule) -> Rule:
    return dataclasses.replace(rule, each=True)


POSITIVE = above(0)
NON_NEGATIVE = at_least(0)
COUNT = at_least(1)
PROBABILITY = between(0, 1)  # probabilities, confidence thresholds, fractions
DECAY = between(0, 1, hi_open=True)  # momenta, EMA decays, Adam's betas: 1 would never forget
# NumPy's RandomState (the seeded splits) takes 32-bit seeds, and the domain splits add 1000 per domain.
SEED = Rule(lambda v: 0 <= v < 2**31, "in [0, 2**31)")
NON_EMPTY = Rule(lambda v: v.strip() != "", "a non-empty string")
# A path the OS can take: no NUL byte, no name over 255 bytes, at most 4095 bytes in all (Linux's limits).
PATH = Rule(lambda v: "\0" not in v and len(v.encode()) < 4096 and all(len(p.encode()) <= 255 for p in v.split("/")),
            "a usable path (no NUL byte, no name over 255 bytes, under 4096 bytes in all)")
ASCENDING = Rule(lambda v: all(a < b for a, b in zip(v, v[1:])), "in ascending order without repeats")
DEVICE = Rule(lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "one of auto, cpu, cuda, cuda:N")
MANY = 1024  # threads, workers, micro-batches per step: more is a typo, and would exhaust the machine
# Images per step and process. A split smaller than a batch is repeated to fill it (40 labels, batch 64),
# so the data does not bound it; this does, before a typo asks the device for terabytes.
MAX_BATCH = 2**16
# trainer.loggers: metrics.jsonl is always written; the others add backends (mentor.engine.loggers)
LOGGERS = ("jsonl", "csv", "tensorboard", "wandb")


def rules(**table: Rule | tuple[Rule, ...]) -> Callable[[type], type]:
    """Class decorator (above ``@dataclass``): the rules of a dataclass's fields, by field name.

    A subclass's table extends (and may replace entries of) the one it inherits; a name that is not a
    field is a programming error, refused at import."""

    def deco(cls: type) -> type:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - names)
        if unknown:
            raise TypeError(f"@rules on {cls.__name__}: no field named {', '.join(unknown)}")
        merged = dict(getattr(cls, "__rules__", {}))
        merged.update({k: v if isinstance(v, tuple) else (v,) for k, v in table.items()})
        cls.__rules__ = merged  # type: ignore[attr-defined]
        return cls

    return deco


def _holds(rule: Rule, value: Any) -> bool:
    try:
        return bool(rule.ok(value))
    except (TypeError, ValueError):  # a value of a type the rule cannot compare is not in its range
        return False


def check_values(obj: Any, prefix: str = "") -> None:
    """Raise ConfigError, naming the key, for the first field of dataclass ``obj`` that breaks its rules."""
    table = getattr(type(obj), "__rules__", {})
    if not table:
        return
    hints = typing.get_type_hints(type(obj))
    for name, checks in table.items():
        value = getattr(obj, name)
        if value is None:
            continue
        key = f"{prefix}.{name}" if prefix else name
        nullable = type(None) in typing.get_args(hints.get(name))
        for rule in checks:
            items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if rule.each else [(key, value)]
            for where, v in items:
                if not _holds(rule, v):
                    alt = " or null" if nullable and not rule.each else ""
                    why = f" ({rule.note})" if rule.note else ""
                    raise ConfigError(f"{where} must be {rule.says}{alt}, got {v!r}{why}")


# --------------------------------------------------------------------------------------------------
# the run's dataclasses


@rules(name=NON_EMPTY, init_from=(NON_EMPTY, PATH), weights=(NON_EMPTY, PATH))
@dataclass
class ModelConfig:
    """Which model to build (any name from ``mentor list models``) and extra constructor kwargs."""

    name: str = "resnet20"
    kwargs: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # a run directory or checkpoint whose network starts this one
    weights: str | None = None  # a local weights file (safetensors or torch state dict) loaded into the network


@rules(name=NON_EMPTY, root=(NON_EMPTY, PATH), test_root=(NON_EMPTY, PATH), augment=NON_EMPTY, val_size=NON_NEGATIVE,
       split_seed=SEED, subset=COUNT.because("null keeps every training image"),
       labels_per_class=COUNT.because("null uses every label"), label_seed=SEED,
       unlabeled_ratio=between(0, 256, lo_open=True).because("mu: unlabelled images per labelled one"),
       unlabeled_imbalance=at_least(1).because("largest over smallest class of the unlabelled pool; null = as is"),
       holdout_fraction=between(0, 1, lo_open=True, hi_open=True), domain_limit=COUNT, batch_size=between(1, MAX_BATCH),
       eval_batch_size=COUNT,
       padding=between(0, 128).because("pixels of padding before the random crop"),
       image_size=between(1, 4096).because("the side in pixels images are resized to"),
       channels=Rule(lambda v: v in (1, 3), "1 or 3").because("grayscale or RGB"), num_workers=between(0, MANY))
@dataclass
class DataConfig:
    """The labelled training data, its validation split and the augmentation of each view.

    ``val_size`` images are carved from the training set (stratified, seeded by ``split_seed``);
    ``subset`` keeps a stratified subset of the remaining training images (the low-data regime).

    Few labels: ``labels_per_class`` keeps that many labelled images per class (stratified, seeded by
    ``label_seed``, the fold); a method that consumes unlabelled data then gets the whole training
    split (labelled images included, as in FixMatch and USB) as its unlabelled pool, in batches of
    ``unlabeled_ratio * batch_size``. A labelled split smaller than a batch is repeated to fill it.
    ``unlabeled_imbalance`` (e.g. 100) makes that pool long-tailed while the labels stay balanced (the
    mismatched regime): class ``c`` keeps ``n * imbalance ** (-c / (C - 1))`` images, ``n`` the smallest
    class's count (:func:`mentor.data.splits.long_tailed_subset`, seeded by ``label_seed``).

    Domains: ``name`` may be a domain set (``rotated_fmnist``, ``digits_domains``, ``domain_folder``,
    ``domain_list``); ``test_domains`` are held out (reported one by one, with their mean and worst),
    ``domains`` are the training domains (default: all the others), each split into a training part
    and a ``holdout_fraction`` validation part (DomainBed's in/out split, seeded by ``split_seed`` and the
    domain's position in the set, so a domain splits the same way whether it is trained on or held out);
    validation (model selection) is the mean accuracy over the training domains' holdout ("out") parts.
    A held-out domain is split the same way: its "in" part is the reported test split, its "out" part the
    oracle's selection split (logged as ``oracle_acc@<domain>``, never used by the engine).
    ``unlabeled_domains`` are training domains whose labels are dropped (single-labelled-domain and
    semi-supervised DG): they only feed a method's unlabelled stream, drawn per domain. ``unknown_classes``
    (names or indices) makes the run open-set: training domains keep the known classes (relabelled in order),
    held-out domains keep every image with the unknown classes labelled as one extra class.
    ``domain_limit`` keeps the first N images of every domain of a generated set (a smaller benchmark).

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
    unlabeled_imbalance: float | None = None
    domains: list[str | int] | None = None
    test_domains: list[str | int] = field(default_factory=list)
    holdout_fraction: float = 0.2
    unlabeled_domains: list[str | int] = field(default_factory=list)
    domain_limit: int | None = None
    unknown_classes: list[str | int] = field(default_factory=list)
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
    empty_classes: Literal["error", "skip"] = "error"  # an image_folder class folder without images


@rules(lr=POSITIVE, momentum=DECAY, weight_decay=NON_NEGATIVE, betas=each(DECAY))
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


@rules(warmup_steps=NON_NEGATIVE, milestones=(each(NON_NEGATIVE), ASCENDING),
       gamma=between(0, 1, lo_open=True).because("the factor of the rate at each milestone"),
       min_lr=NON_NEGATIVE)
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


@rules(max_steps=COUNT, eval_every=COUNT, ckpt_every=COUNT, log_every=COUNT, seed=SEED, device=DEVICE,
       accumulate=between(1, MANY), threads=between(1, MANY).because("null leaves torch's default"),
       clip_grad=POSITIVE.because("the largest gradient norm; null = no clipping, a negative one would reverse "
                                  "the gradients"),
       loggers=each(Rule(lambda v: v in LOGGERS, "one of " + ", ".join(LOGGERS)).because(
           "metrics.jsonl is always written; the list adds backends")),
       snapshots=each(POSITIVE).because("steps (1, 2, ...) or fractions of trainer.max_steps in (0, 1)"))
@dataclass
class TrainerConfig:
    """What the engine does around the method: steps, precision, checkpoints, logging, EMA."""

    max_steps: int = 1000
    eval_every: int = 500
    ckpt_every: int = 500
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = False
    compile: bool = False
    cuda_graph: bool = False  # capture the whole step once and replay it (CUDA; see engine.graph)
    accumulate: int = 1
    clip_grad: float | None = None
    ema: float | None = None
    threads: int | None = None
    progress: bool = True
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])  # jsonl, csv, tensorboard, wandb
    # steps (or fractions of max_steps) at which the deployable weights are kept as snapshot_<step>.pt
    snapshots: list[float] = field(default_factory=list)
    sync_bn: bool = False  # several processes: BatchNorm statistics over the global batch (SyncBatchNorm)


@rules(out_dir=(NON_EMPTY.because("the run directory; an empty one would write into the current directory"), PATH))
@dataclass
class RunConfig:
    """One training run: the method with its hyper-parameters, the model, the data and the engine."""

    method: Any = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    out_dir: str | None = None  # null: runs/<recipe name>-<date>-<time>, a directory of its own
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


_FLOAT32_MAX = 3.4028234663852886e38


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only where it is lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, float) and not abs(value) <= _FLOAT32_MAX and float in typing.get_args(tp):
            return _coerce(value, float, key)  # the float arm's message says what is wrong
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
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
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        if number is None:
            raise ConfigError(f"{key}: expected int, got {value!r} ({type(value).__name__})")
        if not -(2**63) <= number < 2**63:  # the engine's counters and seeds are 64-bit
            raise ConfigError(f"{key}: expected an integer of at most 64 bits, got {value!r}")
        return number
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf  # float(10**400) would overflow
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected float, got {value!r} ({type(value).__name__})")
        if not abs(number) <= _FLOAT32_MAX:  # also nan; values end up in float32 tensors
            raise ConfigError(f"{key}: expected a finite number (at most {_FLOAT32_MAX:.3g} in size), got {value!r}")
        return number
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
    obj = cls(**kwargs)
    check_values(obj, prefix)
    return obj


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


MAX_DEPTH = 64  # nesting of mappings and lists in one recipe; the shipped ones use 3


class _RecipeYAMLError(yaml.YAMLError):
    """A recipe-specific YAML problem (a key given twice, too deep), phrased for the user."""


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data only: no tag builds a Python object) that also refuses a key given
    twice in one mapping (YAML would keep the last silently), nesting deeper than :data:`MAX_DEPTH`
    (the composer recurses: a RecursionError otherwise) and an alias inside its own anchor (a cycle)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._open: list[str | None] = []  # anchors of the collections being composed, outermost first

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent) and event.anchor in self._open:
            raise _RecipeYAMLError(f"alias *{event.anchor} at line {line} refers to a collection that holds it "
                                   "(a cycle); copy the values instead")
        if len(self._open) >= MAX_DEPTH:
            raise _RecipeYAMLError(f"nesting deeper than {MAX_DEPTH} levels at line {line}; a recipe is a few "
                                   "levels of mappings (see recipes/)")
        self._open.append(getattr(event, "anchor", None))
        try:
            return super().compose_node(parent, index)
        finally:
            self._open.pop()

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden, by design
                    continue
                line = key_node.start_mark.line + 1
                try:
                    key = self.construct_object(key_node, deep=True)
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if first is not None:
                    raise _RecipeYAMLError(f"key {key!r} is given twice in one mapping (lines {first} and "
                                           f"{line}); keep one")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: what PyYAML found and where (its own message spans several lines)."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return " ".join(" ".join(x for x in (e.context, e.problem) if x).split()) + where
    return " ".join(str(e).split())


def load_yaml(text: str) -> Any:
    """Parse recipe text (one document) with :class:`RecipeLoader`."""
    loader = RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# UTF-32's little-endian mark starts with UTF-16's, so it is tried first.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def _decode(data: bytes, where: str) -> str:
    """Recipe bytes as text: UTF-8, or UTF-8/16/32 announced by a byte-order mark."""
    for bom, codec in _BOMS:
        if data.startswith(bom):
            label = codec[:6].upper()
            try:
                return data[len(bom):].decode(codec)
            except UnicodeDecodeError as e:
                raise ConfigError(f"{where} starts with a {label} byte-order mark but is not valid {label} (at "
                                  f"byte {len(bom) + e.start}); save it as UTF-8") from None
    if b"\0" in data:
        raise ConfigError(f"{where} is not a text file (it holds NUL bytes: binary data, or UTF-16/32 without a "
                          "byte-order mark); a recipe is YAML text saved as UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); save it "
                          "as UTF-8") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value parsed by the recipe loader)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part.strip() for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key; write key.sub=value")
    try:
        value = load_yaml(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(e)}); quote a string "
                          "value, e.g. key='a: b'") from None
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
    """Read a recipe file as a mapping, with one clear message for a missing, unreadable, undecodable or
    malformed file (the file named, and the line where there is one)."""
    p = Path(path)
    where = f"recipe {str(p)!r}"
    if p.is_dir():
        raise ConfigError(f"{where} is a directory; give a recipe file, e.g. recipes/supervised/digits_resnet8.yaml")
    if not p.is_file():
        raise ConfigError(f"{where} not found (see `ls recipes/*/`)")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where} cannot be read ({e.strerror or e}); check its permissions") from None
    try:
        recipe = load_yaml(_decode(data, where))
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(e)}; fix the recipe there") from None
    if recipe is None:
        recipe = {}
    if not isinstance(recipe, dict):
        raise ConfigError(f"{where} must be a mapping at the top level (method: ..., data: ...), got a "
                          f"{type(recipe).__name__}")
    return recipe


_MINIMAL = ("a recipe names at least its method and data, e.g. `method: {name: supervised}` and "
            "`data: {name: digits}`, and usually model, optim, schedule, trainer and out_dir (see "
            "recipes/supervised/digits_resnet8.yaml)")


def build_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a raw recipe mapping into a RunConfig, resolving the method's own dataclass."""
    from .methods import METHODS
    raw = dict(raw)
    method_raw = raw.pop("method", None)
    if method_raw is None:  # no method given: the supervised baseline
        method_raw = {"name": "supervised"}
    if isinstance(method_raw, str) and method_raw.strip():
        method_raw = {"name": method_raw}
    if not isinstance(method_raw, dict) or not method_raw:
        raise ConfigError(f"method: expected a mapping with a 'name' key, e.g. {{name: supervised}}, got "
                          f"{method_raw!r}")
    if "name" not in method_raw:
        raise ConfigError(f"method.name is missing (the method has {sorted(map(str, method_raw))}): name the "
                          "method, e.g. method.name=supervised (`mentor list methods` lists them)")
    name = method_raw["name"]
    if not isinstance(name, str):
        raise ConfigError(f"method.name: expected the name of a method (a string), got {name!r}; "
                          "`mentor list methods` lists them")
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
    """What no single field can say: rules across sections, the zoo model and the machine."""
    t, d, o, s = cfg.trainer, cfg.data, cfg.optim, cfg.schedule
    if t.ema is not None and not 0.0 < t.ema < 1.0:
        raise ConfigError(f"trainer.ema is a decay in (0, 1), got {t.ema}; 0.999 is typical, null turns EMA off")
    if d.labels_per_class is not None and d.subset is not None:
        raise ConfigError("data.labels_per_class and data.subset both choose the labelled images: set one")
    if d.unlabeled_imbalance is not None and d.labels_per_class is None:
        raise ConfigError(f"data.unlabeled_imbalance={d.unlabeled_imbalance} shapes the unlabelled pool, and there "
                          "is none: every image is labelled; set data.labels_per_class=N as well")
    if o.name == "sgd" and o.nesterov and o.momentum == 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0 (Nesterov's look-ahead is along the "
                          "momentum); set optim.momentum (0.9 is usual) or optim.nesterov=false")
    if s.min_lr > o.lr:
        raise ConfigError(f"schedule.min_lr={s.min_lr} is above optim.lr={o.lr}: the schedule would raise the "
                          "learning rate; set schedule.min_lr <= optim.lr (0 decays to zero)")
    if s.warmup_steps >= t.max_steps:
        raise ConfigError(f"schedule.warmup_steps={s.warmup_steps} must be < trainer.max_steps={t.max_steps}: "
                          "warm-up would last the whole run; lower schedule.warmup_steps (0 = none)")
    d.test_domains = [str(x) for x in d.test_domains]
    d.unlabeled_domains = [str(x) for x in d.unlabeled_domains]
    d.unknown_classes = [str(x) for x in d.unknown_classes]
    if (d.unlabeled_domains or d.unknown_classes) and not d.test_domains:
        key = "data.unlabeled_domains" if d.unlabeled_domains else "data.unknown_classes"
        raise ConfigError(f"{key} belongs to a domain-generalisation run: set data.name to a domain set and "
                          "data.test_domains to the held-out domain(s)")
    if set(d.unlabeled_domains) & set(d.test_domains):
        raise ConfigError(f"data.unlabeled_domains and data.test_domains share "
                          f"{sorted(set(d.unlabeled_domains) & set(d.test_domains))}: an unlabelled training "
                          "domain is trained on, a held-out one never is; list each domain in one of them")
    if d.domains is not None:
        d.domains = [str(x) for x in d.domains]
        both = sorted(set(d.domains) & set(d.test_domains))
        from .methods import METHODS

        inputs = METHODS.get(cfg.method.name).inputs
        source_free = bool(inputs.unlabeled) and not inputs.labeled  # adapts on the target's unlabelled images
        if both and not source_free:
            raise ConfigError(f"data.domains and data.test_domains share {both}: a held-out domain is never "
                              "trained on (only a source-free method adapts to its test domain's unlabelled "
                              "images)")
    _check_model(cfg.model)
    _check_machine(t)


def _check_model(m: ModelConfig) -> None:
    """``model.kwargs`` are arguments the zoo model's factory takes, of the types it annotates where
    those are plain (int, float, bool, str, or null). An unknown ``model.name`` is the model registry's
    to report, with the near names."""
    import inspect

    from .models import MODELS

    if m.weights and m.init_from:
        raise ConfigError(f"model.weights={m.weights} and model.init_from={m.init_from} both give the network's "
                          "starting weights; keep one")
    if m.name not in MODELS:
        return
    factory = MODELS.get(m.name)
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = [n for n in params if n not in ("num_classes", "in_channels")]
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # annotations that do not resolve: names are still checked
        hints = {}
    plain = {int, float, bool, str, type(None)}
    for key, value in m.kwargs.items():
        if key in ("num_classes", "in_channels"):
            raise ConfigError(f"model.kwargs.{key} is set from the data; remove it")
        if not isinstance(key, str) or not (key in params or takes_any):
            raise ConfigError(f"model.kwargs: {m.name} takes no argument {key!r}.{suggest(str(key), names)} "
                              f"It takes: {', '.join(names) or 'none'}")
        tp = hints.get(key)
        union = typing.get_origin(tp) in (typing.Union, types.UnionType)
        if tp in plain or (union and set(typing.get_args(tp)) <= plain):
            m.kwargs[key] = _coerce(value, tp, f"model.kwargs.{key}")


def _check_machine(t: TrainerConfig) -> None:
    """CUDA asked for (``trainer.device``, ``trainer.cuda_graph``) where this machine has none; fp16 (whose
    gradient scaler reads a value back every step) in a captured step."""
    if t.precision == "fp16" and t.cuda_graph:
        raise ConfigError("trainer.precision=fp16 scales the loss with a gradient scaler, which reads a value back "
                          "to the host every step and so cannot run inside a captured step: use "
                          "trainer.precision=bf16 (or fp32) with trainer.cuda_graph=true, or set "
                          "trainer.cuda_graph=false")
    if not (t.device.startswith("cuda") or t.cuda_graph):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    why = "this torch build has no CUDA" if torch.version.cuda is None else "torch finds no usable GPU"
    if t.device.startswith("cuda") and count == 0:
        raise ConfigError(f"trainer.device={t.device}: CUDA is not available ({why}); use trainer.device=cpu "
                          "or trainer.device=auto")
    if t.device.startswith("cuda:") and int(t.device[5:]) >= count:
        raise ConfigError(f"trainer.device={t.device}: this machine has {count} GPU(s), numbered from 0; use "
                          f"trainer.device=cuda:0 .. cuda:{count - 1}, or cuda")
    if t.cuda_graph and (t.device == "cpu" or count == 0):
        run_on = "cpu" if t.device == "cpu" else f"cpu: {why}"
        raise ConfigError(f"trainer.cuda_graph: it needs a CUDA device (the run uses {run_on}). "
                          "Set trainer.cuda_graph=false.")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe (or start from defaults, ``path=None``), apply overrides, validate.

    A recipe file that sets nothing (empty, only comments, ``{}``) is refused unless overrides say what
    to run."""
    raw = read_recipe(path) if path is not None else {}
    if path is not None and not raw and not overrides:
        raise ConfigError(f"recipe {str(path)!r} is empty: {_MINIMAL}")
    try:
        cfg = build_config(apply_overrides(raw, overrides or []))
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None
    if cfg.out_dir is None:
        cfg.out_dir = default_out_dir(path)
    return cfg


def default_out_dir(recipe: str | Path | None) -> str:
    """``runs/<recipe name>-<date>-<time>`` (with a suffix where that exists): a recipe without ``out_dir``
    trains into a directory of its own, never into another run's."""
    import time

    stem = Path(recipe).stem if recipe else "run"
    base = f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 1
    while Path(out).exists():
        n += 1
        out = f"{base}-{n}"
    return out


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

"""What the command line tells about itself: a method's paper, hyper-parameters, inputs and recipes
(``mentor show``), a resolved recipe (``mentor config``), the registries (``mentor list``) and the
versions (``mentor --version``). Everything is read from the code (the method catalog, the ``Config``
dataclasses and their comments, ``Method.inputs``, the registries), so it cannot drift from it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any

LISTS = ("methods", "models", "datasets", "shifts", "augments")


# --------------------------------------------------------------------------------------------------
# versions


def version_text() -> str:
    """``mentor <version> (torch <version>, Python <version>)``, read from the installed packages' metadata
    (torch is not imported)."""
    from importlib import metadata

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            if dist == "mentor":
                from . import __version__
                return __version__
            return "not installed"

    return f"mentor {version('mentor')} (torch {version('torch')}, Python {sys.version.split()[0]})"


# --------------------------------------------------------------------------------------------------
# registries


def list_names(what: str, pattern: str = "*") -> list[str]:
    """The registered names of one kind (``LISTS``) matching a glob, sorted, from its registries."""
    if what == "methods":
        from .methods import METHODS

        return METHODS.names(pattern)
    if what == "models":
        from .models import list_models

        return list_models(pattern)
    if what == "datasets":
        from .data.names import dataset_names

        return dataset_names(pattern)
    if what == "shifts":
        from .data.domains import list_domain_sets

        return list_domain_sets(pattern)
    if what == "augments":
        from .data.augment import AUGMENTS

        return AUGMENTS.names(pattern)
    raise ValueError(f"unknown list {what!r}; one of {', '.join(LISTS)}")


_MODEL_FORMS = ("also: timm:NAME, torchvision:NAME (the zoo extra, never with downloaded weights) and "
                "path/to/file.py:build_fn; model.weights=FILE loads local weights")


def listing_text(pattern: str = "*") -> str:
    """Every kind of ``LISTS``, a heading and the names of each (``mentor list`` without a kind)."""
    parts = []
    for what in LISTS:
        names = list_names(what, pattern)
        body = textwrap.fill(", ".join(names), width=110, initial_indent="  ", subsequent_indent="  ",
                             break_on_hyphens=False) if names else "  (none)"
        if what == "models":
            body += "\n  " + _MODEL_FORMS
        parts.append(f"{what} ({len(names)}):\n{body}")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------
# mentor config


def config_text(recipe: str, overrides: list[str] | None = None) -> str:
    """The recipe with ``overrides`` applied and every default filled in, as YAML (what ``mentor train``
    would run; ``out_dir`` as the run would choose it)."""
    from .config import dump_config, load_config

    return dump_config(load_config(recipe, overrides or []))


# --------------------------------------------------------------------------------------------------
# mentor show


def _paragraphs(doc: str | None) -> list[str]:
    return [" ".join(p.split()) for p in inspect.cleandoc(doc or "").split("\n\n") if p.strip()]


def _own_doc(cls: type) -> str:
    """A class's docstring, but not the signature ``dataclass`` writes for a class without one."""
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else doc


def _comments(cls: type) -> dict[str, str]:
    """Field -> the comment on its line (or on the comment lines just above it) in ``cls``'s source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        return {}
    lines = source.splitlines()
    out: dict[str, str] = {}
    try:
        body = ast.parse(source).body[0]
    except (SyntaxError, IndexError):
        return {}
    for node in getattr(body, "body", []):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            note = comments.get(node.end_lineno or node.lineno, "")
            if not note:  # comment lines directly above the field
                above, i = [], node.lineno - 1
                while i >= 1 and lines[i - 1].strip().startswith("#"):
                    above.insert(0, comments.get(i, ""))
                    i -= 1
                note = " ".join(above)
            if note and "noqa" not in note:
                out[node.target.id] = note
    return out


_NAMES = r"(?:``\w+``\s*/\s*)*``\w+``"
# ``name``: text, up to the end of its sentence or the next ``other``: after a comma or semicolon
_DOC_FIELD = re.compile(rf"({_NAMES})\s*:\s*(.+?)(?=\.\s+(?=[A-Z`])|[;,]\s*(?={_NAMES}\s*:)|\.$|$)")


def _doc_notes(text: str) -> dict[str, str]:
    """``name``: text -> {name: text} from a docstring (several names may share one text: ``a``/``b``: ...)."""
    out: dict[str, str] = {}
    flat = " ".join(text.split())
    for m in _DOC_FIELD.finditer(flat):
        for name in re.findall(r"``(\w+)``", m[1]):
            out.setdefault(name, m[2].strip())
    return out


def _plain(text: str) -> str:
    """reStructuredText markup off: ``x`` and :func:`x` -> x."""
    return re.sub(r"(?::\w+:)?`+~?([^`]+?)`+", r"\1", text)


def field_notes(method_cls: type) -> dict[str, str]:
    """Field -> what it is, for a method's ``Config``: the comment on the field in the source (the most
    derived class first), else a sentence "``field``: what it is" in the Config's or the method's docstrings."""
    notes: dict[str, str] = {}
    config_mro = [c for c in method_cls.Config.__mro__ if dataclasses.is_dataclass(c)]
    for cls in config_mro:
        for k, v in _comments(cls).items():
            notes.setdefault(k, v)
    from .methods import Method

    methods = [c for c in method_cls.__mro__ if isinstance(c, type) and issubclass(c, Method) and c is not Method]
    for cls in [*config_mro, *methods]:
        for k, v in _doc_notes(_own_doc(cls) if dataclasses.is_dataclass(cls) else cls.__doc__ or "").items():
            notes.setdefault(k, v)
    return notes


def _value(v: Any) -> str:
    import yaml

    text = yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def _inputs_lines(inputs: Any) -> list[str]:
    def views(names: tuple[str, ...]) -> str:
        return ", ".join("train (data.augment)" if v == "train" else v for v in names)

    if not inputs.data:
        return ["no data: the method synthesises its inputs; the class count, image shape and normalisation come "
                "from the teacher's run (method.teacher), whose dataset's validation and test splits are scored"]
    lines = []
    if inputs.labeled:
        per = " per training domain (data.batch_size from each, batch['domain'])" if inputs.domains else ""
        lines.append(f"labelled batch{per}, views: {views(inputs.labeled)}")
    if inputs.unlabeled:
        if inputs.labeled:
            lines.append(f"unlabelled batch of data.unlabeled_ratio x data.batch_size images, views: "
                         f"{views(inputs.unlabeled)}")
        else:
            lines.append(f"source-free: the training split (the target domain), unlabelled, in batches of "
                         f"data.batch_size, views: {views(inputs.unlabeled)}")
    return lines


def _requirements(method_cls: type) -> list[str]:
    """The keys a run of this method must set beyond what the defaults give."""
    inputs, out = method_cls.inputs, []
    defaults = {f.name: f.default for f in dataclasses.fields(method_cls.Config)}
    forms = "a run directory of `mentor train`, or MODEL@WEIGHTS (a model name and a local weights file)"
    if defaults.get("teacher", None) == "":
        what = forms if inputs.data else "the run directory of a `mentor train` run (data-free: no data of its own)"
        out.append(f"method.teacher: the trained teacher, {what}")
    if "teachers" in defaults:
        out.append(f"method.teachers: a list of trained teachers, each {forms}")
    if inputs.unlabeled and not inputs.labeled:
        out.append("model.init_from: the source run (trained with the same model.name on the source domain)")
    elif inputs.unlabeled:
        out.append("data.labels_per_class (or data.unlabeled_domains with a domain set): which images stay "
                   "labelled; the rest of the training split is the unlabelled pool")
    if inputs.domains:
        out.append("data.name: a domain set (`mentor list shifts`), with data.test_domains=[...] held out")
    return out


def recipes_dir() -> Path | None:
    """The ``recipes/`` folder: in the current directory, else beside the source tree of this package."""
    for candidate in (Path.cwd() / "recipes", Path(__file__).resolve().parents[2] / "recipes"):
        if candidate.is_dir():
            return candidate
    return None


def recipes_using(method: str, folder: Path | None = None) -> list[Path]:
    """The recipes (``recipes/**/*.yaml``) whose ``method.name`` is ``method``."""
    from .config import load_yaml

    folder = folder or recipes_dir()
    found = []
    for path in sorted(folder.rglob("*.yaml")) if folder else []:
        try:
            raw = load_yaml(path.read_text(encoding="utf-8"))
        except Exception:  # a file that is not a readable recipe is simply not listed
            continue
        m = raw.get("method") if isinstance(raw, dict) else None
        name = m.get("name") if isinstance(m, dict) else m
        if name == method:
            found.append(path)
    return found


def method_text(name: str, full: bool = False) -> str:
    """What ``mentor show METHOD`` prints: the paper, the config with defaults, rules and notes, the inputs,
    the keys a run must set and the recipes that use it. ``full`` adds the whole docstring."""
    from .config import _type_name
    from .errors import ConfigError
    from .methods import METHODS
    from .methods.catalog import BUILTIN
    from .registry import suggest

    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}.{suggest(name, METHODS.names())} `mentor list methods` lists them")
    cls = METHODS.get(name)
    paragraphs = _paragraphs(cls.__doc__)
    lines = [f"{name}: {_plain(paragraphs[0]) if paragraphs else '(no docstring)'}",
             f"  {cls.__module__}.{cls.__qualname__}"
             + (f" (catalog: {BUILTIN[name]})" if name in BUILTIN else " (registered outside the catalog)")]
    if full and len(paragraphs) > 1:
        lines += ["", *[textwrap.fill(_plain(p), 110, initial_indent="  ", subsequent_indent="  ")
                        for p in paragraphs[1:]]]
    hints = typing.get_type_hints(cls.Config)
    rules = getattr(cls.Config, "__rules__", {})
    notes = field_notes(cls)
    required = {"teacher"} if any(f.name == "teacher" and f.default == "" for f in dataclasses.fields(cls.Config)) \
        else set()
    rows = []
    for f in dataclasses.fields(cls.Config):
        if f.name == "name":
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        extra = ", ".join(r.says.split(" (")[0] for r in rules.get(f.name, ()))
        note = _plain(notes.get(f.name, ""))
        if f.name in required:
            note = "required. " + note
        rows.append((f.name, _type_name(hints.get(f.name, Any)), _value(default), extra, note))
    lines += ["", "config: method.KEY=VALUE (defaults are the paper's; `mentor config RECIPE` resolves a recipe)"]
    if rows:
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for n, t, d, rule, note in rows:
            tail = "  ".join(x for x in (rule and f"[{rule}]", note) if x)
            lines.append(f"  {n:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {tail}".rstrip())
    else:
        lines.append("  (no hyper-parameters)")
    lines += ["", "inputs:", *[f"  {x}" for x in _inputs_lines(cls.inputs)]]
    if isinstance(cls.select, tuple):  # (a method may use the name for something else)
        lines.append(f"  best.pt is selected on val_{cls.select[0]} ({cls.select[1]})")
    needs = _requirements(cls)
    lines += ["", "requires:", *([f"  {x}" for x in needs] or ["  nothing beyond data.name and model.name"])]
    found = recipes_using(name)
    root = recipes_dir()
    shown = [str(p.relative_to(root.parent)) if root else str(p) for p in found]
    lines += ["", "recipes:", *([f"  {p}" for p in shown] or ["  (none in recipes/)"])]
    return "\n".join(lines)


__all__ = ["LISTS", "config_text", "field_notes", "list_names", "listing_text", "method_text",
           "recipes_dir", "recipes_using", "version_text"]

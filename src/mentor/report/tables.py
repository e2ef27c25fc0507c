"""Groups of runs, mean ± std over seeds and paired gains, as tables of strings for the page.

Runs whose resolved recipes are equal apart from :data:`~mentor.report.collect.BOOKKEEPING` (the seed,
the output folder, logging cadence) form a group. A group is named by its method, plus the keys that
tell it apart from the other groups of the same method. Spreads are sample standard deviations
(``ddof=1``) over seeds; a gain against the baseline group pairs the runs of equal seed and reports the
mean ± std of the per-seed differences, and counts as clear when its mean exceeds twice that std.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ReportError
from .collect import Run


@dataclass
class Table:
    """A table of formatted cells, rendered alike as HTML and Markdown."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


@dataclass
class Group:
    """Runs of one recipe (seeds); ``key`` is the recipe without bookkeeping."""

    name: str
    runs: list[Run]
    key: dict[str, Any]

    @property
    def method(self) -> str:
        """The method name of the group's runs."""
        return self.runs[0].method

    @property
    def kind(self) -> str:
        """"train" or "adapt"."""
        return self.runs[0].kind

    @property
    def metric(self) -> str:
        """The number the group's runs were selected on (see :attr:`Run.metric`)."""
        return next((r.metric for r in self.runs if r.finished), self.runs[0].metric)

    @property
    def finished(self) -> list[Run]:
        """The runs with a ``summary.json``."""
        return [r for r in self.runs if r.finished]

    def by_seed(self, key: str) -> dict[str, float]:
        """``key`` of every finished run, per seed (the mean of runs that share a seed)."""
        per: dict[str, list[float]] = {}
        for r in self.finished:
            v = r.number(key)
            if v is not None:
                per.setdefault(r.pair, []).append(v)
        return {s: sum(v) / len(v) for s, v in per.items()}


@dataclass
class Gain:
    """Mean ± std of the per-seed differences ``group - baseline`` over ``n`` shared seeds."""

    mean: float
    std: float
    n: int

    @property
    def clear(self) -> bool:
        """The mean difference exceeds two standard deviations of the differences (needs two seeds)."""
        return self.n >= 2 and abs(self.mean) > 2 * self.std


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (nan below two values) and count; (nan, nan, 0) for none."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std, n


def paired_gain(group: dict[str, float], baseline: dict[str, float]) -> Gain | None:
    """The gain of ``group`` over ``baseline`` (both ``{seed: value}``) on their shared seeds; None if none."""
    shared = [s for s in group if s in baseline]
    if not shared:
        return None
    mean, std, n = mean_std([group[s] - baseline[s] for s in shared])
    return Gain(mean, std, n)


# ---------------------------------------------------------------------------------------------- groups


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


_MISSING = object()


def differing_keys(keys: list[dict[str, Any]], present_in: int = 1) -> list[str]:
    """Keys whose values are not the same in every mapping, among keys set in at least ``present_in``."""
    union = sorted({k for key in keys for k in key})
    out = []
    for k in union:
        vals = [json.dumps(key.get(k, _MISSING), sort_keys=True, default=repr) for key in keys]
        if sum(k in key for key in keys) >= present_in and len(set(vals)) > 1:
            out.append(k)
    return out


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs grouped by their recipe without bookkeeping, in order of first appearance, and named."""
    groups: dict[str, Group] = {}
    for r in runs:
        key = r.group_key()
        ident = json.dumps(key, sort_keys=True, default=repr)
        if ident not in groups:
            groups[ident] = Group("", [], key)
        groups[ident].runs.append(r)
    out = list(groups.values())
    for method in dict.fromkeys(g.method for g in out):
        same = [g for g in out if g.method == method]
        diff = [k for k in differing_keys([g.key for g in same]) if k != "method.name"] if len(same) > 1 else []
        for g in same:
            parts = [f"{k}={_value(g.key.get(k))}" for k in diff]
            g.name = " ".join([method, *parts])
    seen: dict[str, int] = {}
    for g in out:  # equal names cannot happen for different keys; kept unique all the same
        seen[g.name] = seen.get(g.name, 0) + 1
        if seen[g.name] > 1:
            g.name = f"{g.name} ({seen[g.name]})"
    return out


@dataclass
class Section:
    """Groups compared in one summary table: training runs selected on the same metric, or adaptation runs."""

    title: str
    groups: list[Group]
    columns: list[str]
    kind: str = "train"
    metric: str = "acc"
    baseline: Group | None = None


def sections(groups: list[Group], baseline: str | None = None) -> list[Section]:
    """Groups split by kind and metric, each section with its columns and baseline group (``baseline`` by
    name; else a ``supervised`` group (``source`` for adaptation), else the first)."""
    parts: dict[tuple[str, str], list[Group]] = {}
    for g in groups:
        parts.setdefault((g.kind, g.metric), []).append(g)
    out = []
    for (kind, metric), gs in parts.items():
        if kind == "adapt":
            title, candidates = "Summary: test-time adaptation (accuracy over the streams)", ["acc_mean", "acc_worst"]
        else:
            title = "Summary: test accuracy" if metric == "acc" else f"Summary: test {metric}"
            candidates = [f"test_{metric}_{t}" for t in ("last", "best", "ema_last", "ema_best")]
        present = {k for g in gs for r in g.finished for k in (r.summary or {})}
        out.append(Section(title, gs, [c for c in candidates if c in present], kind, metric))
    names = [g.name for g in groups]
    if baseline is not None and baseline not in names:
        raise ReportError(f"--baseline {baseline!r} names no group of these runs; the groups are: "
                          + "; ".join(repr(n) for n in names) + ". Give one of them (quoted), or leave "
                          "--baseline out for the default (a supervised group, else the first).")
    for s in out:
        chosen = [g for g in s.groups if g.name == baseline]
        default = "source" if s.kind == "adapt" else "supervised"
        chosen = chosen or [g for g in s.groups if g.method == default] or s.groups[:1]
        s.baseline = chosen[0]
    return out


# -------------------------------------------------------------------------------------------- formatting


def percent(key: str) -> bool:
    """Whether ``key`` is a fraction shown in percent (accuracies, errors, calibration)."""
    base = key.split("@")[0]
    return any(t in base for t in ("acc", "error", "ece"))


def fmt(mean: float, std: float = math.nan, pct: bool = False, sign: bool = False) -> str:
    """``mean ± std`` (percent points with ``pct``); a lone number without a spread; "—" for nothing."""
    if mean is None or math.isnan(mean):
        return "—"
    scale, spec = (100.0, ".2f") if pct else (1.0, ".4g")
    text = f"{mean * scale:{'+' if sign else ''}{spec}}"
    if not math.isnan(std):
        text += f" ± {std * scale:{spec}}"
    return text


def stat_cell(values: list[float], pct: bool) -> str:
    """``mean ± std`` of ``values`` (see :func:`fmt`)."""
    mean, std, _ = mean_std(values)
    return fmt(mean, std, pct)


def gain_cell(gain: Gain | None, pct: bool) -> str:
    """A signed gain ``+m ± s``, with `` *`` when it exceeds 2 std; "no shared seed" without a pair."""
    if gain is None:
        return "no shared seed"
    return fmt(gain.mean, gain.std, pct, sign=True) + (" *" if gain.clear else "")


def column_label(key: str) -> str:
    """A summary key as a column header, with its unit."""
    return f"{key} (%)" if percent(key) else key


# -------------------------------------------------------------------------------------------------- tables


def run_ece(run: Run) -> float | None:
    """The ECE of a run's test details, pooled over its test splits; None without details."""
    pooled = pool_details([run.details]) if run.details else None
    return None if pooled is None else pooled["ece"]


def summary_table(section: Section) -> Table:
    """Mean ± std over seeds of the section's columns per group, the number of seeds and the paired gains
    against the baseline group (``*``: the gain exceeds 2 std of the per-seed differences)."""
    base = section.baseline
    assert base is not None
    ece = section.kind == "train" and section.metric == "acc" and any(r.details for g in section.groups
                                                                      for r in g.runs)
    cols = ["group", "n seeds", *[column_label(c) for c in section.columns]]
    if ece:
        cols.append("test ECE last (%)")
    unit = lambda c: " (pp)" if percent(c) else ""  # noqa: E731
    cols += [f"gain {c}{unit(c)}" for c in section.columns]
    rows, clear = [], {}
    for g in [base, *(g for g in section.groups if g is not base)]:  # the baseline first
        seeds = {r.pair for r in g.finished}
        row = [g.name + (" (baseline)" if g is base else ""), str(len(seeds))]
        row += [stat_cell(list(g.by_seed(c).values()), percent(c)) for c in section.columns]
        if ece:
            row.append(stat_cell([v for r in g.finished if (v := run_ece(r)) is not None], True))
        for c in section.columns:
            if g is base:
                row.append("baseline")
                continue
            gain = paired_gain(g.by_seed(c), base.by_seed(c))
            row.append(gain_cell(gain, percent(c)))
            if gain is not None and gain.clear:
                clear.setdefault(g.name, []).append(f"{c} {gain_cell(gain, percent(c)).rstrip(' *')}")
        rows.append(row)
    notes = [f"Baseline: {base.name}. Mean ± sample std over seeds; gains are group minus baseline, paired by "
             "seed (mean ± std of the per-seed differences); * marks a gain whose mean exceeds 2 std."]
    if len(section.groups) > 1:
        notes.append("Gains above 2 std: " + "; ".join(f"{name} ({', '.join(cs)})" for name, cs in clear.items())
                     + "." if clear else "No gain exceeds 2 std.")
    if any("loss" in c for c in section.columns):
        notes.append("Lower is better for a loss: a negative gain is an improvement.")
    shared = [f"{g.name}: {len(g.finished) - len({r.pair for r in g.finished})} extra run(s) share a seed with another"
              for g in section.groups if len({r.pair for r in g.finished}) < len(g.finished)]
    if shared:
        notes.append("Runs of one group with the same seed are averaged into one value per seed (" + "; ".join(shared)
                     + ").")
    return Table("Mean ± std over seeds, and paired gains against the baseline", cols, rows, notes)


def differences_table(groups: list[Group]) -> Table | None:
    """The recipe keys that differ between groups (set in at least two of them), one row per group."""
    if len(groups) < 2:
        return None
    keys = differing_keys([g.key for g in groups], present_in=2)
    if not keys:
        return None
    rows = [[g.name, *[_value(g.key[k]) if k in g.key else "—" for k in keys]] for g in groups]
    return Table("What differs between the groups", ["group", *keys], rows)


def runs_table(groups: list[Group]) -> Table:
    """Every run: its folder, group, seed, steps and headline numbers."""
    rows = []
    for g in groups:
        for r in g.runs:
            s = r.summary or {}
            m = r.metric
            head = "acc_mean" if r.kind == "adapt" else f"test_{m}_last"
            value = r.number(head)
            ece = run_ece(r)
            wall = r.number("wall_s")
            rows.append([r.label, g.name, r.seed, str(s.get("steps", s.get("streams", "—"))),
                         f"{head} {fmt(value, pct=percent(head))}" if value is not None else "—",
                         fmt(ece, pct=True) if ece is not None else "—",
                         f"{wall:.1f}" if wall is not None else "—", "finished" if r.finished else "unfinished"])
    return Table("Runs", ["run", "group", "seed", "steps", "headline", "test ECE (%)", "wall (s)", "state"], rows)


def _domain_keys(groups: list[Group], prefix: str) -> list[str]:
    names: list[str] = []
    for g in groups:
        for r in g.finished:
            for k in r.summary or {}:
                if k.startswith(prefix + "@"):
                    names.append(k.split("@", 1)[1])
    names = list(dict.fromkeys(names))
    return [n for n in names if n != "worst"] + (["worst"] if "worst" in names else [])


def domain_tables(section: Section) -> list[Table]:
    """Per held-out domain (generalisation: ``test_<m>_last@<domain>``) or per stream (adaptation:
    ``acc@<stream>``): one row per domain, one column per group, mean ± std over seeds."""
    if section.kind == "adapt":
        prefixes = [("acc", "Accuracy per stream (%)")]
    else:
        m = section.metric
        prefixes = [(f"test_{m}_{t}", f"{f'test_{m}_{t}'} per held-out domain") for t in ("last", "best")]
    out = []
    for prefix, title in prefixes:
        names = _domain_keys(section.groups, prefix)
        groups = [g for g in section.groups if _domain_keys([g], prefix)]
        if not names:
            continue
        rows = [[n, *[stat_cell(list(g.by_seed(f"{prefix}@{n}").values()), percent(prefix))
                      for g in groups]] for n in names]
        out.append(Table(title, ["stream" if section.kind == "adapt" else "domain", *[g.name for g in groups]], rows))
    return out


# ----------------------------------------------------------------------------------------- test details


def pool_details(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Sum the confusion matrices and reliability bins of ``test_details.json`` records (every test split
    of every record): ``confusion``, ``count``, ``confidence`` / ``correct`` sums per bin, ``n``, ``ece``,
    ``per_class_acc`` and ``classes``. None when the records disagree in classes or bins, or hold nothing."""
    confusion: list[list[float]] | None = None
    count = conf = correct = None
    classes = None
    for rec in records:
        for split in rec.get("splits", {}).values():
            cm, bins = split.get("confusion"), split.get("bins") or {}
            if not cm or "count" not in bins:
                continue
            b = bins["count"]
            c_sum = [(m or 0.0) * k for m, k in zip(bins["confidence"], b)]
            a_sum = [(m or 0.0) * k for m, k in zip(bins["accuracy"], b)]
            if confusion is None:
                confusion, count, conf, correct = [list(map(float, r)) for r in cm], list(b), c_sum, a_sum
                classes = rec.get("classes")
                continue
            if len(cm) != len(confusion) or len(b) != len(count):
                return None
            confusion = [[x + y for x, y in zip(r1, r2)] for r1, r2 in zip(confusion, cm)]
            count = [x + y for x, y in zip(count, b)]
            conf = [x + y for x, y in zip(conf, c_sum)]
            correct = [x + y for x, y in zip(correct, a_sum)]
    if confusion is None or not sum(count):
        return None
    n = sum(count)
    k = len(confusion)
    rows = [sum(r) for r in confusion]
    names = [str(c) for c in classes] if classes and len(classes) == k else [str(i) for i in range(k)]
    return {"confusion": confusion, "count": count, "confidence": conf, "correct": correct, "n": n,
            "ece": sum(abs(a - c) for a, c in zip(correct, conf)) / n, "classes": names,
            "per_class_acc": [confusion[i][i] / rows[i] if rows[i] else None for i in range(k)],
            "acc": sum(confusion[i][i] for i in range(k)) / n}


def per_class_table(groups: list[Group]) -> Table | None:
    """Test accuracy per class (rows) of each group with recorded details (columns), mean ± std over runs."""
    have = [(g, [pool_details([r.details]) for r in g.finished if r.details]) for g in groups]
    have = [(g, [p for p in ps if p is not None]) for g, ps in have]
    have = [(g, ps) for g, ps in have if ps]
    if not have:
        return None
    k = max(len(ps[0]["classes"]) for _, ps in have)
    classes = next(ps[0]["classes"] for _, ps in have if len(ps[0]["classes"]) == k)
    rows = []
    for i, name in enumerate(classes):
        row = [name]
        for _, ps in have:
            vals = [p["per_class_acc"][i] for p in ps if i < len(p["per_class_acc"])
                    and p["per_class_acc"][i] is not None]
            row.append(stat_cell(vals, True))
        rows.append(row)
    notes = [f"{g.name}: {len(ps)} of {len(g.finished)} runs recorded test details" for g, ps in have
             if len(ps) < len(g.finished)]
    return Table("Test accuracy per class (%), last step", ["class", *[g.name for g, _ in have]], rows, notes)

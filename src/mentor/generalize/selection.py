"""Model selection for domain generalisation, after training, from what every run logged (DomainBed's
``model_selection.py``; Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021).

Every evaluation of a run with held-out domains records, in ``metrics.jsonl``, the validation accuracy
(``val_acc``: the mean over the training domains' holdout "out" parts), each held-out domain's "in" part
(``test_acc@<domain>``, the number that is reported) and "out" part (``oracle_acc@<domain>``). A selection
method picks, for one held-out domain, a checkpoint (and, over several runs of different hyper-parameters,
a run) by a validation number, and reports the held-out domain's "in" accuracy there:

- :func:`training_domain_validation` (the headline): the step with the best ``val_acc``, then the run with
  the best such ``val_acc``.
- :func:`leave_one_domain_out`: needs, beside the run that holds out ``test`` only, one run per other domain
  ``v`` holding out ``test`` and ``v``; a step is scored by the mean over ``v`` of ``v``'s "in" accuracy
  in those runs (the domain left out of training stands in for the unseen one).
- :func:`oracle`: the last step only, the run with the best ``oracle_acc@<test>`` (the held-out domain's
  "out" part). It looks at the test domain, so it is an upper bound, labelled as such wherever shown; with
  a single hyper-parameter setting it reports the last checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import ConfigError


@dataclass
class RunRecord:
    """The evaluation records of one run: its held-out domains, a key naming its hyper-parameters (runs
    with equal keys are one setting), and one dict per evaluation (``step`` and the logged numbers)."""

    test_domains: tuple[str, ...]
    evals: list[dict] = field(default_factory=list)
    hparams: str = ""
    path: str = ""

    def at(self, step: int) -> dict | None:
        for e in self.evals:
            if e["step"] == step:
                return e
        return None


@dataclass
class Selected:
    """What a selection method picked: the validation number it maximised, the reported test accuracy,
    the step and the run."""

    val: float
    test: float
    step: int
    run: str


def read_run(run_dir: str | Path, hparams: str | None = None) -> RunRecord:
    """A run directory's evaluation records. ``hparams`` defaults to the run's method section."""
    run_dir = Path(run_dir)
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"{run_dir} is not a finished training run ({e.strerror}: {e.filename}); "
                          "train it with `mentor train`") from None
    evals = [r for r in map(json.loads, lines) if r.get("split") == "val"]
    tests = tuple(str(d) for d in cfg["data"]["test_domains"])
    key = hparams if hparams is not None else json.dumps(cfg.get("method", {}), sort_keys=True)
    return RunRecord(tests, evals, key, str(run_dir))


def _finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _best(candidates: Iterable[Selected]) -> Selected | None:
    best = None
    for c in candidates:
        if _finite(c.val) and (best is None or c.val > best.val):
            best = c
    return best


def training_domain_validation(runs: Sequence[RunRecord], test: str, key: str = "acc") -> Selected | None:
    """Training-domain validation: per run holding out ``test`` alone, the step with the highest
    ``val_<key>``; over runs, the highest of those."""
    def per_run(r: RunRecord) -> Selected | None:
        return _best(Selected(e.get(f"val_{key}"), e.get(f"test_{key}@{test}"), e["step"], r.path) for e in r.evals)

    return _best(s for r in runs if r.test_domains == (test,) for s in [per_run(r)] if s is not None)


def oracle(runs: Sequence[RunRecord], test: str, key: str = "acc") -> Selected | None:
    """Oracle (test-domain validation): the last evaluation of each run holding out ``test`` alone, the run
    with the highest ``oracle_<key>@<test>``. An upper bound that looks at the test domain."""
    last = []
    for r in runs:
        if r.test_domains == (test,) and r.evals:
            e = max(r.evals, key=lambda e: e["step"])
            last.append(Selected(e.get(f"oracle_{key}@{test}"), e.get(f"test_{key}@{test}"), e["step"], r.path))
    return _best(last)


def leave_one_domain_out(runs: Sequence[RunRecord], test: str, domains: Sequence[str],
                         key: str = "acc") -> Selected | None:
    """Leave-one-domain-out cross-validation. For each hyper-parameter setting: the run holding out ``test``
    and, for every other domain ``v`` of ``domains``, a run holding out ``test`` and ``v``; a step's
    validation number is the mean over ``v`` of ``test_<key>@<v>`` in its run (steps every run evaluated);
    the reported number is ``test_<key>@<test>`` of the first run at the best step. Settings missing a run
    are skipped; None when none is complete."""
    others = [d for d in domains if d != test]
    groups: dict[str, list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(r.hparams, []).append(r)
    picks = []
    for group in groups.values():
        main = next((r for r in group if r.test_domains == (test,)), None)
        held = {}
        for r in group:
            if len(r.test_domains) == 2 and r.test_domains[0] == test and r.test_domains[1] in others:
                held[r.test_domains[1]] = r
        if main is None or len(held) != len(others):
            continue
        steps = [e["step"] for e in main.evals]
        candidates = []
        for step in steps:
            vals = [(held[v].at(step) or {}).get(f"test_{key}@{v}") for v in others]
            if all(_finite(v) for v in vals):
                candidates.append(Selected(sum(vals) / len(vals), main.at(step).get(f"test_{key}@{test}"), step,
                                           main.path))
        pick = _best(candidates)
        if pick is not None:
            picks.append(pick)
    return _best(picks)


SELECTIONS = {
    "training_domain": "training-domain validation",
    "lodo": "leave-one-domain-out",
    "oracle": "oracle (test-domain validation, last step; an upper bound)",
}

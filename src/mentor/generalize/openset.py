"""Open-set domain generalisation: the numbers a method reports when the held-out domains hold classes no
training domain has (``data.unknown_classes``).

With ``K`` known classes the network has ``K`` outputs; a held-out domain keeps every image and labels the
unknown ones ``K``. A method accepts an image as known when its *confidence* (the maximum softmax probability,
or a method's own score such as MEDIC's one-vs-all head) reaches a threshold, and then predicts the closed-set
argmax. The numbers, as MEDIC's evaluation computes them (Wang et al., "Generalizable Decision Boundaries:
Dualistic Meta-Learning for Open Set Domain Generalization", ICCV 2023; zzwdx/MEDIC ``eval.py`` and
``util/ROC.py``):

- ``closed_acc``: accuracy of the argmax over the ``K`` classes on the known images alone (threshold-free);
- ``known_acc`` and ``unknown_acc`` at a threshold ``t``: the share of known images predicted correctly *and*
  accepted (confidence ``>= t``), and the share of unknown images rejected (confidence ``< t``);
  ``h_score`` is their harmonic mean (0 when both are 0). MEDIC tries ``hits = 10`` thresholds evenly spaced
  from the lowest to the highest confidence over all images of the split and reports the best H-score;
  ``known_acc``/``unknown_acc`` are read at that threshold (the first of equal H-scores). The threshold is
  chosen on the test split's own labels, as in MEDIC: an optimistic number, comparable between methods;
- ``oscr``: the open-set classification rate (Dhamija et al., NeurIPS 2018), the area under the curve of the
  correct classification rate ``CCR(t) = #{known, correct, conf >= t} / #known`` against the false positive rate
  ``FPR(t) = #{unknown, conf >= t} / #unknown`` over every threshold (threshold-free), by the trapezoid rule
  from ``(0, 0)``. MEDIC sorts the images by confidence and steps one image at a time; tied confidences are
  taken together here (one point per distinct confidence), which is the same curve when no two confidences
  are equal and does not depend on the order of ties otherwise.

A split without unknown images (validation: the training domains' holdout keeps only known classes) reports
``closed_acc`` and ``acc`` and leaves the open-set numbers NaN; one without known images leaves ``closed_acc``
NaN. ``acc`` is ``closed_acc``, so model selection (``val_acc``) and the per-domain records mean the same thing
in open-set runs.

:class:`OpenSetScore` is the mixin a method lists before its base class (``class M(OpenSetScore, ERM)``): its
``score`` returns these numbers when ``self.info.open_set`` and the base class's otherwise; a method with its
own confidence overrides :meth:`OpenSetScore.open_set_outputs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

#: MEDIC's number of evenly spaced thresholds for the H-score (``eval.py --hits``)
HITS = 10

Outputs = Callable[[nn.Module, Tensor], tuple[Tensor, dict[str, Tensor]]]


def max_softmax(logits: Tensor) -> Tensor:
    """The maximum softmax probability of each row: the confidence of a method without its own."""
    return logits.float().softmax(1).max(1).values


def _harmonic(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    s = a + b
    return np.where(s > 0, 2 * a * b / np.where(s > 0, s, 1.0), 0.0)


def oscr(confidence: Tensor, correct: Tensor, unknown: Tensor) -> float:
    """Area under CCR against FPR over every threshold: ``confidence`` ``[N]``, ``correct`` ``[N]`` (the closed
    prediction is right; read for known images only) and ``unknown`` ``[N]`` (the image is of an unknown
    class), all on the host. NaN without known or without unknown images."""
    conf = confidence.double().cpu()
    unknown = unknown.bool().cpu()
    hit = (correct.bool().cpu() & ~unknown).double()
    n_known, n_unknown = int((~unknown).sum()), int(unknown.sum())
    if n_known == 0 or n_unknown == 0:
        return math.nan
    order = conf.argsort(descending=True, stable=True)
    conf, hit, neg = conf[order], hit[order], unknown[order].double()
    # one point per distinct confidence: the counts up to the last image holding it
    last = torch.ones_like(conf, dtype=torch.bool)
    last[:-1] = conf[1:] != conf[:-1]
    ccr = torch.cat([torch.zeros(1, dtype=torch.float64), hit.cumsum(0)[last] / n_known])
    fpr = torch.cat([torch.zeros(1, dtype=torch.float64), neg.cumsum(0)[last] / n_unknown])
    return float(((fpr[1:] - fpr[:-1]) * (ccr[1:] + ccr[:-1]) / 2).sum())


def open_set_metrics(logits_or_scores: Tensor, confidence: Tensor | None, labels: Tensor, num_known: int,
                     hits: int = HITS) -> dict[str, float]:
    """``closed_acc``, ``known_acc``, ``unknown_acc``, ``h_score`` and ``oscr`` (see the module docstring) of one
    split: ``logits_or_scores`` ``[N, K]`` (the closed prediction is their argmax), ``confidence`` ``[N]`` (None:
    the maximum softmax probability of ``logits_or_scores``, which are then logits), ``labels`` ``[N]`` with
    ``num_known`` (``K``) for an unknown image."""
    if logits_or_scores.shape[1] != num_known:
        raise ValueError(f"open-set scores need {num_known} columns (the known classes), got "
                         f"{logits_or_scores.shape[1]}")
    if hits < 2:
        raise ValueError(f"the H-score needs at least 2 thresholds, got hits={hits}")
    conf = max_softmax(logits_or_scores) if confidence is None else confidence
    conf = conf.detach().double().cpu()
    labels = labels.detach().cpu()
    unknown = labels >= num_known
    correct = logits_or_scores.detach().argmax(1).cpu() == labels
    n_known, n_unknown = int((~unknown).sum()), int(unknown.sum())
    closed = float((correct & ~unknown).sum()) / n_known if n_known else math.nan
    out = {"closed_acc": closed, "known_acc": math.nan, "unknown_acc": math.nan, "h_score": math.nan,
           "oscr": math.nan}
    if n_known == 0 or n_unknown == 0:
        return out
    c = conf.numpy()
    thresholds = c.min() + (c.max() - c.min()) * np.arange(hits) / (hits - 1)
    accepted = c[None, :] >= thresholds[:, None]  # [hits, N]
    known_acc = (accepted & (correct & ~unknown).numpy()[None]).sum(1) / n_known
    unknown_acc = (~accepted & unknown.numpy()[None]).sum(1) / n_unknown
    h = _harmonic(known_acc, unknown_acc)
    best = int(np.argmax(h))
    out.update(known_acc=float(known_acc[best]), unknown_acc=float(unknown_acc[best]), h_score=float(h[best]),
               oscr=oscr(conf, correct, unknown))
    return out


def msp_outputs(net: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """``(logits, {"": maximum softmax probability})``: the default open-set outputs of a classifier."""
    logits = net(x)
    return logits, {"": max_softmax(logits)}


def _gather_rows(t: Tensor, n: int, ev) -> Tensor:
    """This rank's share of a split's rows (positions ``rank, rank + W, ...``, as ``split.batches`` deals them)
    gathered from every rank: all ``n`` rows, in some order. One process: ``t`` itself."""
    d = getattr(ev, "dist", None)
    world = getattr(d, "world_size", 1)
    if world <= 1:
        return t
    per = -(-n // world)
    padded = t.new_zeros((per, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    sizes = [len(range(r, n, world)) for r in range(world)]
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


@torch.no_grad()
def open_set_score(net: nn.Module, split, ev, num_known: int, outputs: Outputs = msp_outputs,
                   hits: int = HITS) -> dict[str, float]:
    """A method's ``score`` on an open-set split, read with the engine's evaluator ``ev``: ``acc`` and
    ``closed_acc`` (the same number), then ``known_acc``, ``unknown_acc``, ``h_score`` and ``oscr`` for each
    confidence ``outputs(net, x)`` returns, suffixed with its name (``""``: no suffix). Every rank reads its
    share; the rows are gathered so each rank holds the whole split (OSCR sorts all of it)."""
    logits, confs, labels = [], {}, []
    for x, y in ev.batches(split):
        z, c = ev.run(lambda inp: outputs(net, inp), x)
        logits.append(z.float())
        labels.append(y)
        for name, value in c.items():
            confs.setdefault(name, []).append(value.float())
    n = len(split)
    if not logits:  # an empty split (or an empty share of it)
        logits = [torch.zeros(0, num_known, device=ev.device)]
        labels = [torch.zeros(0, dtype=torch.long, device=ev.device)]
    z = _gather_rows(torch.cat(logits), n, ev)
    y = _gather_rows(torch.cat(labels), n, ev)
    names = list(confs) or [""]
    out: dict[str, float] = {}
    for name in names:
        parts = confs.get(name) or [torch.zeros(0, device=ev.device)]
        m = open_set_metrics(z, _gather_rows(torch.cat(parts), n, ev), y, num_known, hits)
        if not out:
            out = {"acc": m["closed_acc"], "closed_acc": m["closed_acc"]}
        out.update({f"{k}{name}": v for k, v in m.items() if k != "closed_acc"})
    return out


class OpenSetScore:
    """Mixin for a domain-generalisation method (``class M(OpenSetScore, ERM)``): ``score`` reports the open-set
    numbers of :func:`open_set_score` when the run is open-set (``self.info.open_set``), the base class's
    numbers otherwise. :meth:`open_set_outputs` gives the closed-set logits and the confidence(s); by default
    the maximum softmax probability."""

    open_set_hits: int = HITS

    def open_set_outputs(self, net: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return msp_outputs(net, x)

    def score(self, net: nn.Module, split, ev) -> dict[str, float]:
        if not self.info.open_set:
            return super().score(net, split, ev)
        return open_set_score(net, split, ev, self.info.num_classes, self.open_set_outputs, self.open_set_hits)


__all__ = ["HITS", "OpenSetScore", "max_softmax", "msp_outputs", "open_set_metrics", "open_set_score", "oscr"]

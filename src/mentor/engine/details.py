"""Per-class numbers and calibration of a classifier on the test split, recorded at the end of a run.

:class:`DetailsRecorder` rides along the engine's own test pass (the logits that give ``test_acc_last``),
so the numbers cost no extra pass over the data: a confusion matrix and the reliability bins of the
maximum softmax probability, summed on the device and read once, over every rank. The trainer writes
them as ``test_details.json`` in the run directory for runs selected on classification accuracy;
``mentor report`` draws the confusion matrix, the per-class accuracy and the reliability diagram from it.

Calibration follows Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017): ``BINS``
equal-width confidence bins ``(k/B, (k+1)/B]`` (a confidence of exactly 0 falls in the first), and the
expected calibration error ``ECE = sum_b |correct_b - confidence_b| / N``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..fileio import atomic_write_text

if TYPE_CHECKING:
    from .trainer import Trainer

BINS = 15
FILE = "test_details.json"


def bin_index(confidence: Tensor, bins: int = BINS) -> Tensor:
    """The bin ``(k/B, (k+1)/B]`` of each confidence in [0, 1], as a long tensor in ``[0, bins)``."""
    return (confidence * bins).ceil().long().sub_(1).clamp_(0, bins - 1)


def split_sums(logits: Tensor, labels: Tensor, num_classes: int, bins: int = BINS,
               dtype: torch.dtype = torch.float64) -> Tensor:
    """One flat device vector for a batch: the confusion counts (row = true class, column = predicted,
    ``num_classes**2``), then per confidence bin the count, the sum of confidences and the number of
    correct predictions (``3 * bins``). Sums of such vectors over batches and ranks stay exact counts."""
    probs = logits.detach().float().softmax(1)
    confidence, pred = probs.max(1)
    labels = labels.long()
    out = torch.zeros(num_classes * num_classes + 3 * bins, dtype=dtype, device=logits.device)
    ones = torch.ones_like(confidence, dtype=dtype)
    out.index_add_(0, labels * num_classes + pred, ones)  # index_add_, not bincount: no host synchronisation
    b = bin_index(confidence, bins) + num_classes * num_classes
    out.index_add_(0, b, ones)
    out.index_add_(0, b + bins, confidence.to(dtype))
    out.index_add_(0, b + 2 * bins, (pred == labels).to(dtype))
    return out


def summarise(sums: list[float], num_classes: int, bins: int = BINS) -> dict[str, Any]:
    """The JSON record of :func:`split_sums` summed over a split: ``n``, ``acc``, ``confusion``,
    ``per_class_acc`` (None for a class without test images), ``ece`` and the bins (count, mean
    confidence, accuracy; None for an empty bin)."""
    c2 = num_classes * num_classes
    confusion = [[round(sums[i * num_classes + j]) for j in range(num_classes)] for i in range(num_classes)]
    count = [round(v) for v in sums[c2:c2 + bins]]
    conf_sum, correct = sums[c2 + bins:c2 + 2 * bins], sums[c2 + 2 * bins:c2 + 3 * bins]
    n = sum(count)
    rows = [sum(r) for r in confusion]
    return {
        "n": n,
        "acc": sum(confusion[i][i] for i in range(num_classes)) / n if n else None,
        "confusion": confusion,
        "per_class_acc": [confusion[i][i] / rows[i] if rows[i] else None for i in range(num_classes)],
        "ece": sum(abs(a - c) for a, c in zip(correct, conf_sum)) / n if n else None,
        "bins": {"edges": [k / bins for k in range(bins + 1)], "count": count,
                 "confidence": [s / k if k else None for s, k in zip(conf_sum, count)],
                 "accuracy": [s / k if k else None for s, k in zip(correct, count)]},
    }


class DetailsRecorder:
    """Accumulates :func:`split_sums` of named splits on the device. The engine's evaluator calls
    :meth:`add` with the logits it scores; :meth:`result` sums over ranks (one reduction per split, a
    collective every rank must call) and returns ``{name: summarise(...)}`` for the splits that saw images.

    ``names`` maps each split object (by identity) to its name: "test", or a held-out domain's name.
    Logits of another width than ``num_classes`` (an open-set head) are not recorded; with ``sizes``
    (``{name: len(split)}``) a split whose count differs (a method that scored it twice) is left out."""

    def __init__(self, names: dict[int, str], num_classes: int, device: torch.device, bins: int = BINS,
                 sizes: dict[str, int] | None = None):
        self.names, self.num_classes, self.bins, self.sizes = names, num_classes, bins, sizes or {}
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        size = num_classes * num_classes + 3 * bins
        self.sums = {name: torch.zeros(size + 1, dtype=self.dtype, device=device) for name in names.values()}

    def add(self, split: object, logits: Tensor, labels: Tensor) -> None:
        """Record one batch of ``split`` (ignored when the split is not one of ``names``)."""
        name = self.names.get(id(split))
        if name is None:
            return
        acc = self.sums[name]
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            acc[-1] += 1  # flags the split: every rank learns of it after the reduction
            return
        acc[:-1] += split_sums(logits, labels, self.num_classes, self.bins, self.dtype)

    def result(self, total: Callable[[Tensor], Tensor]) -> dict[str, dict[str, Any]]:
        """``{name: record}`` summed over ranks by ``total`` (e.g. ``Evaluator.total``)."""
        out = {}
        for name, acc in self.sums.items():
            summed = total(acc.clone()).tolist()
            if summed[-1] or not any(summed[:-1]):
                continue
            record = summarise(summed[:-1], self.num_classes, self.bins)
            if name in self.sizes and record["n"] != self.sizes[name]:
                continue
            out[name] = record
        return out


@torch.no_grad()
def network_details(net: Callable[[Tensor], Tensor], split, evaluator, num_classes: int,
                 bins: int = BINS) -> dict[str, Any] | None:
    """The confusion matrix, per-class accuracy and reliability bins of ``net`` on ``split`` (one pass,
    read with an :class:`~mentor.engine.evaluate.Evaluator`); None for an empty split."""
    rec = DetailsRecorder({id(split): "split"}, num_classes, evaluator.device, bins, {"split": len(split)})
    for x, y in evaluator.batches(split):
        rec.add(split, evaluator.run(net, x), y)
    return rec.result(evaluator.total).get("split")


@contextlib.contextmanager
def recording(trainer: Trainer) -> Iterator[DetailsRecorder | None]:
    """While open, the trainer's evaluators record the test split(s) into a :class:`DetailsRecorder`; on
    leaving, the main rank writes ``test_details.json`` in the run directory (atomically). Only for a run
    selected on classification accuracy (``acc``); otherwise it yields None and records nothing."""
    splits = trainer.splits.tests or ({"test": trainer.splits.test} if trainer.splits.test is not None else {})
    if trainer.metric.removesuffix("_ema") != "acc" or not splits:
        yield None
        return
    rec = DetailsRecorder({id(s): name for name, s in splits.items()}, trainer.method.info.num_classes, trainer.device,
                          sizes={name: len(s) for name, s in splits.items()})
    trainer.details = rec
    try:
        yield rec
    finally:
        trainer.details = None
    result = rec.result(trainer.evaluator().total)
    if trainer.is_main and result:
        record = {"step": trainer.cfg.trainer.max_steps, "network": "deployable (last step)", "bins": rec.bins,
                  "classes": [str(c) for c in trainer.splits.reference.classes], "splits": result}
        atomic_write_text(trainer.run_dir / FILE, json.dumps(record) + "\n")

"""SHOT and SHOT-IM: source hypothesis transfer by information maximisation and self-supervised
pseudo-labels (Liang, Hu & Feng, ICML 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import COUNT, NON_NEGATIVE, POSITIVE, rules
from ..methods import Refresh, StepContext, register_method
from ..nn.pseudo import centroid_pseudo_labels, im_terms
from .sfda import SourceFreeConfig, SourceFreeMethod


@register_method("shot")
class SHOT(SourceFreeMethod):
    """Liang, Hu & Feng, "Do We Really Need to Access the Source Data? Source Hypothesis Transfer for
    Unsupervised Domain Adaptation", ICML 2020; official code tim-learn/SHOT ``object/image_target.py``,
    ``object/loss.py`` (and ``digit/uda_digit.py``).

    The source classifier (the hypothesis) is frozen; the network below it learns on the unlabelled
    target pool with

        ``loss = ent_par * (mean_i H(p_i) - H(mean_i p_i)) + cls_par * CE(p_i, y_i)``

    (:func:`~mentor.adapt.sfda.im_terms`, ``H(p) = -sum_c p_c log(p_c + epsilon)``), where ``y_i`` are
    self-supervised pseudo-labels of the whole pool (:func:`~mentor.adapt.sfda.centroid_pseudo_labels`:
    soft centroids of the normalised features, nearest-centroid labels, one hard refinement), computed
    with the network in eval mode and kept in the buffer ``pseudo_labels`` (checkpointed). Logged terms:
    ``ent`` (mean entropy), ``div`` (entropy of the mean), ``ce``.

    Defaults are the official ones: ``cls_par`` 0.3, ``ent_par`` 1.0, ``epsilon`` 1e-5, ``threshold`` 0;
    SGD with momentum 0.9, Nesterov and weight decay 1e-3 at ``lr`` 1e-2 (``sfda.PAPER_SGD``).

    Design choices:

    - SHOT's network is a backbone, a bottleneck (Linear + BatchNorm1d) and a weight-normed linear
      classifier. A zoo network ends with ``pool -> fc``; the features are the input of ``fc`` and ``fc``
      is the frozen hypothesis, so SHOT here adapts the whole network below ``fc`` and adds no bottleneck
      (train the source run with whichever network the target run uses).
    - One learning rate for every trainable parameter (a phase has one rate): SHOT's digit code trains its
      backbone and bottleneck at 1e-2, its object code the backbone at 0.1 x 1e-2. ``lr: null`` uses the
      run's ``optim`` section instead.
    - SHOT's schedule ``lr (1 + 10 p)^-0.75`` is not an engine schedule: the run's ``schedule`` applies
      (the recipes use a cosine decay to ``min_lr`` = 0.17 lr, the official schedule's final rate).
    - Pseudo-labels are refreshed at the start of every ``interval``-th epoch (default 1): SHOT refreshes
      every ``max_iter // interval`` iterations, which with its defaults (15 epochs, interval 15) and in its
      digit code is once per epoch. Each refresh reads the un-augmented pool.
    """

    @rules(cls_par=NON_NEGATIVE, ent_par=NON_NEGATIVE, epsilon=POSITIVE, interval=COUNT, threshold=NON_NEGATIVE)
    @dataclass
    class Config(SourceFreeConfig):
        cls_par: float = 0.3
        ent_par: float = 1.0
        epsilon: float = 1e-5
        interval: int = 1  # epochs between pseudo-label refreshes
        threshold: int = 0  # a class needs more than this many argmax predictions to take pseudo-labels

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        self.register_buffer("pseudo_labels", torch.zeros(info.unlabeled_size, dtype=torch.long))

    def on_epoch(self, epoch: int, refresh: Refresh) -> None:
        if self.cfg.cls_par > 0 and epoch % self.cfg.interval == 0:
            self.refresh_labels(refresh)

    @torch.no_grad()
    def refresh_labels(self, refresh: Refresh) -> None:
        """SHOT's ``obtain_label`` over the whole target pool, into ``pseudo_labels``."""
        feats, probs = self.embed(refresh.unlabeled, refresh)
        labels = centroid_pseudo_labels(feats, probs, rounds=1, threshold=self.cfg.threshold)
        self.pseudo_labels.copy_(labels.to(self.pseudo_labels.device))

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        c = self.cfg
        _, logits = self.tap(batch["u_weak"])
        ent, div = im_terms(logits, c.epsilon)
        loss = c.ent_par * (ent - div)
        out = {"ent": ent.detach(), "div": div.detach()}
        if c.cls_par > 0:
            target = self.pseudo_labels[batch["u_index"]]
            ce = F.cross_entropy(logits.float(), target)
            loss = loss + c.cls_par * ce
            out["ce"] = ce.detach()
            ctx.pseudo_labels(target)
        else:
            ctx.pseudo_labels(logits.detach().argmax(1))  # the predictions the entropy term sharpens
        return {"loss": loss, **out}


@register_method("shot_im")
class SHOTIM(SHOT):
    """SHOT-IM: SHOT without the pseudo-label term (``cls_par`` 0), information maximisation alone
    (Liang, Hu & Feng, ICML 2020, the ablation the paper reports as SHOT-IM; tim-learn/SHOT with
    ``--cls_par 0``). No pseudo-labels are computed; the logged ``pl_acc`` is the accuracy of the batch's
    own predictions."""

    @dataclass
    class Config(SHOT.Config):
        cls_par: float = 0.0

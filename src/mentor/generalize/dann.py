"""Domain-adversarial training as DomainBed runs it: a discriminator learns to tell the training domains apart
from the features, and the network learns features it cannot (DANN), or cannot given the class (CDANN).

The discriminator and the network take alternating optimizer steps, each its own :class:`Phase` with its own
Adam: ``d_steps_per_g_step`` discriminator steps, then one step of the network, counted as DomainBed's
``update_count`` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any  # noqa: F401  (the inherited Phase fields' annotations, resolved here by doc tools)

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import COUNT, DECAY, NON_NEGATIVE, POSITIVE, PROBABILITY, at_least, rules
from ..methods import Phase, StepContext, register_method
from ..nn import train_accuracy
from .erm import ERM


class MLP(nn.Module):
    """DomainBed's ``networks.MLP``: ``Linear(n_in, width)``, then ``depth - 2`` hidden ``Linear(width, width)``,
    each followed by dropout and ReLU, then ``Linear(width, n_out)``."""

    def __init__(self, n_in: int, n_out: int, width: int, depth: int, dropout: float):
        super().__init__()
        self.input = nn.Linear(n_in, width)
        self.hiddens = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 2))
        self.output = nn.Linear(width, n_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.dropout(self.input(x)))
        for layer in self.hiddens:
            x = F.relu(self.dropout(layer(x)))
        return self.output(x)


@dataclass
class AllBut(Phase):
    """A phase due at every step but those where ``(step - offset) % every == 0``: the discriminator's
    ``d_steps_per_g_step`` steps of each cycle of ``1 + d_steps_per_g_step``, around the network's one."""

    def due(self, step: int) -> bool:
        return (step - self.offset) % self.every != 0


def input_gradient_penalty(disc_out: Tensor, labels: Tensor, disc_input: Tensor) -> Tensor:
    """DomainBed's gradient penalty: the mean over samples of ``||d/dz sum_n CE(D(z)_n, d_n)||^2`` at the
    discriminator's input ``z``, differentiable (``create_graph``) so the penalty trains the discriminator."""
    (grad,) = torch.autograd.grad(F.cross_entropy(disc_out, labels, reduction="sum"), [disc_input],
                                  create_graph=True)
    return grad.pow(2).sum(1).mean(0)


@register_method("dann")
class DANN(ERM):
    """Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016, with the training domains as
    the domains, in the form of DomainBed's ``DANN`` (Gulrajani & Lopez-Paz, "In Search of Lost Domain
    Generalization", ICLR 2021).

    A discriminator MLP (DomainBed's ``networks.MLP``: ``mlp_width`` 256, ``mlp_depth`` 3, ``mlp_dropout`` 0)
    predicts each image's training domain from its penultimate features ``z``
    (:meth:`~mentor.generalize.base.DomainMethod.features`). ``disc_loss`` is its cross-entropy (plus
    ``grad_penalty`` times :func:`input_gradient_penalty`, 0 by default). Two phases alternate on the steps as
    DomainBed's ``update_count`` does (incremented before it is read, so step ``s`` is update ``s + 1``; the
    discriminator steps when ``(s + 1) % (1 + d_steps_per_g_step) < d_steps_per_g_step``):

    - ``disc`` (discriminator and, for CDANN, the class embeddings): ``loss = disc_loss``, the features
      held fixed (DomainBed computes their gradient and discards it);
    - ``gen`` (the whole student): ``loss = CE(classifier(z), y) - lambda_adv * disc_loss`` (the gradient penalty
      included, as DomainBed subtracts the whole ``disc_loss``), so the features follow the negated gradient
      of the discriminator's loss.

    With the default one discriminator step per network step, the network steps at even steps (step 0
    first) and the discriminator at odd ones. Defaults are DomainBed's: ``lambda`` 1 (``lambda_adv``),
    ``d_steps_per_g_step`` 1, ``grad_penalty`` 0.

    Optimizers: DomainBed's Adam with betas ``(beta1, 0.9)``, ``beta1`` 0.5, at ``lr_d`` / ``lr_g`` with
    weight decay ``weight_decay_d`` / ``weight_decay_g``; DomainBed's values for its small images (1e-3, 1e-3,
    0, 0; 5e-5 and tuned decays on the larger ones). The engine's Adam is AdamW (decoupled decay); it is
    DomainBed's Adam at the default decay of 0, and the decay applies to every parameter (norms and biases
    too) as torch's Adam does. ``lr_d: null`` (``lr_g: null``) trains that phase with the run's ``optim``
    section instead. The recipe's schedule applies to both rates.
    """

    min_domains = 2

    @rules(lambda_adv=NON_NEGATIVE, d_steps_per_g_step=COUNT, grad_penalty=NON_NEGATIVE, beta1=DECAY,
           lr_d=POSITIVE, lr_g=POSITIVE, weight_decay_d=NON_NEGATIVE, weight_decay_g=NON_NEGATIVE,
           mlp_width=COUNT, mlp_depth=at_least(2), mlp_dropout=PROBABILITY)
    @dataclass
    class Config(ERM.Config):
        lambda_adv: float = 1.0
        d_steps_per_g_step: int = 1
        grad_penalty: float = 0.0
        beta1: float = 0.5
        lr_d: float | None = 1e-3
        lr_g: float | None = 1e-3
        weight_decay_d: float = 0.0
        weight_decay_g: float = 0.0
        mlp_width: int = 256
        mlp_depth: int = 3
        mlp_dropout: float = 0.0

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        self.discriminator = MLP(self.feature_width, self.num_domains, cfg.mlp_width, cfg.mlp_depth, cfg.mlp_dropout)

    # -- what CDANN changes ------------------------------------------------------------------------------------
    def discriminator_input(self, z: Tensor, y: Tensor) -> Tensor:
        """What the discriminator reads: the features (CDANN adds the class embedding)."""
        return z

    def discriminator_loss(self, disc_out: Tensor, domain: Tensor, y: Tensor) -> Tensor:
        """The discriminator's cross-entropy: the mean over the batch (CDANN weighs the classes equally)."""
        return F.cross_entropy(disc_out, domain)

    def discriminator_params(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    # -- the two phases ------------------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        cfg = self.cfg
        cycle, offset = 1 + cfg.d_steps_per_g_step, cfg.d_steps_per_g_step - 1

        def adam(lr: float | None, decay: float) -> dict:
            if lr is None:
                return {}
            return {"name": "adamw", "lr": lr, "weight_decay": decay, "betas": (cfg.beta1, 0.9),
                    "decay_norm_bias": True}

        return [AllBut("disc", self.discriminator_params(), every=cycle, offset=offset,
                       optim=adam(cfg.lr_d, cfg.weight_decay_d)),
                Phase("gen", list(self.student.parameters()), every=cycle, offset=offset,
                      optim=adam(cfg.lr_g, cfg.weight_decay_g))]

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        cfg = self.cfg
        y, domain = batch["y"], batch["domain"]
        generator = ctx.phase != "disc"
        with torch.set_grad_enabled(generator):
            z, logits = self.features(batch["x"])
        if not generator:
            # the discriminator's step: the features are an input (for the gradient penalty, a differentiable one)
            z = z.detach().requires_grad_(cfg.grad_penalty > 0)
        disc_input = self.discriminator_input(z, y)
        disc_out = self.discriminator(disc_input)
        disc_loss = self.discriminator_loss(disc_out, domain, y)
        out: dict[str, Tensor] = {}
        if cfg.grad_penalty > 0:
            penalty = input_gradient_penalty(disc_out, domain, disc_input)
            disc_loss = disc_loss + cfg.grad_penalty * penalty
            out["grad_penalty"] = penalty.detach()
        disc_acc = train_accuracy(disc_out, domain)
        if not generator:
            return {"loss": disc_loss, **out, "disc_acc": disc_acc}
        nll = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        loss = nll - cfg.lambda_adv * disc_loss
        return {"loss": loss, "nll": nll.detach(), "disc_loss": disc_loss.detach(), **out, "disc_acc": disc_acc,
                "train_acc": train_accuracy(logits, y)}


@register_method("cdann")
class CDANN(DANN):
    """Li et al., "Deep Domain Generalization via Conditional Invariant Adversarial Networks", ECCV 2018, in the
    form of DomainBed's ``CDANN``: DANN whose discriminator reads ``z + e(y)``, the features plus a learned
    embedding of the image's class (``nn.Embedding(num_classes, F)``, trained with the discriminator), and
    whose cross-entropy is class-balanced: sample ``n`` weighs ``1 / (count(y_n) * K)`` and the weighted terms
    are summed, ``count`` being the batch's count of each class and ``K`` the width of DomainBed's
    ``F.one_hot(y)``, the largest label in the batch plus one (``num_classes`` when the last class is drawn).
    Every class present weighs the same; the sum is ``(classes present) / K`` times a class-balanced mean.
    Defaults as :class:`DANN`.
    """

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        self.class_embeddings = nn.Embedding(info.num_classes, self.feature_width)

    def discriminator_input(self, z: Tensor, y: Tensor) -> Tensor:
        return z + self.class_embeddings(y)

    def discriminator_loss(self, disc_out: Tensor, domain: Tensor, y: Tensor) -> Tensor:
        classes = torch.arange(self.info.num_classes, device=y.device)
        counts = (y.unsqueeze(1) == classes).sum(0)  # a static one-hot: F.one_hot reads the labels back
        width = y.max() + 1
        weights = 1.0 / (counts[y] * width).float()
        return (weights * F.cross_entropy(disc_out, domain, reduction="none")).sum()

    def discriminator_params(self) -> list[nn.Parameter]:
        return [*self.discriminator.parameters(), *self.class_embeddings.parameters()]


__all__ = ["CDANN", "DANN", "MLP", "AllBut", "input_gradient_penalty"]

"""CMI: Fang et al., "Contrastive Model Inversion for Data-Free Knowledge Distillation", IJCAI 2021
(zju-vipa/CMI; ``datafree/synthesis/contrastive.py`` of zju-vipa/Fast-Datafree).

Every round re-initialises the generator (DCGAN initialisation), draws new latent codes ``z`` and
optimises both for ``g_steps`` steps. Besides the inversion terms (BN statistics, the teacher's
cross-entropy to the round's classes, and the masked adversarial KL of "decision adversarial
distillation" on the samples where the student still agrees with the teacher), a contrastive term makes
every synthetic image distinguishable from the others and from the images of earlier rounds:

* the feature ``f(x)`` of an image is the per-sample spatial mean of the *input* of every teacher BN
  layer, concatenated (forward pre-hooks of this module);
* two views of the batch: the global one (the base's crop and flip, which the inversion terms see
  too) and a local one (a random resized crop of scale [0.25, 1] and aspect [3/4, 4/3], and a flip);
* a head ``h`` (Linear, ReLU, Linear to ``head_dim``, L2-normalised) projects both; anchors are the
  local views, the positive of each is the global view of the same image, and the negatives the global
  views of the rest of the batch and of ``n_neg`` (local, global) feature pairs drawn without
  replacement from a memory bank of earlier rounds' best batches (the bank's pairs are anchors too):

      logits = h(f_local) . sg(h(f_global))^T / cr_T,   L_cr = mean_batch CE_i + mean_bank CE_i

  (``sg``: no gradient; the second mean only once the bank holds something, as the reference).

The loss is ``bn * L_BN + oh * CE + adv * L_adv + cr * L_cr``; the round's lowest-loss batch joins the
pool and its (local, global) features join the bank. The bank stores the teacher features (not the
head's projections), as the reference does.

Defaults: Fast-Datafree ``scripts/cmi_cifar.sh`` (g_steps 200, kd_steps 400, lr_g 1e-3, bn 1, oh 1,
adv 0.5, cr 0.8, cr_T 0.2, KD temperature 20) and its ``datafree_kd.py`` (head_dim 256, n_neg 4096,
bank_size 40960, nz 256). The reference optimises the generator and ``z`` in one Adam at ``lr_g`` with
betas (0.5, 0.999), so ``lr_z`` = 0 (the base's "same as lr_g") is its setting; the head has its own
Adam at ``lr_g`` with torch's default betas.

Design choices and deviations:

* The bank is a ring of device buffers (checkpointed), not a CPU tensor; negatives are the ``n_neg``
  smallest of random keys over the filled slots (sampling without replacement with no host read);
  while fewer than ``n_neg`` pairs are stored, the missing ones are masked out of the logits and the
  mean. The reference's bank starts as random noise that it never reads, and in the round where it
  holds exactly ``bank_size`` pairs it draws none (its bank mean is then over an empty set); neither
  is kept.
* The head's parameters are a group of the synthesis phase's optimizer, so their Adam moments restart
  with every round (the reference keeps one Adam for the head across rounds); the head itself is never
  re-initialised.
* The local crop is :func:`mentor.nn.crops.resized_crops` (torchvision's ``RandomResizedCrop`` drawn on the
  device, 10 tries per image in parallel, resampled bilinearly at sub-pixel offsets rather than integer ones).
* The student is in eval mode during synthesis, as in the reference; the adversarial term is 0 during
  the base's ``warmup_rounds`` (none by default).
* Bank memory is ``bank_size x 2F x 4`` bytes with ``F`` the summed channels of the teacher's BN
  layers: recipes on small machines scale ``bank_size`` down.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import COUNT, DECAY, NON_NEGATIVE, POSITIVE, PROBABILITY, ConfigError, rules
from ..methods import BuildInfo, StepContext, register_method
from ..nn.crops import resized_crops
from ..nn.norm import bn_layers, evaluating
from .base import InversionConfig, LatentGeneratorMethod
from .deepinversion import adversarial_weight
from .losses import masked_adversarial_kl


# ------------------------------------------------------------------------------------------------ head
class ProjectionHead(nn.Module):
    """CMI's head: ``Linear(d, d) -> ReLU -> Linear(d, head_dim)``, then L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(), nn.Linear(dim_in, dim_out))

    def forward(self, f: Tensor) -> Tensor:
        return F.normalize(self.net(f.float()), dim=1)


def info_nce(h_local: Tensor, h_global: Tensor, temperature: float, bank_valid: Tensor) -> Tensor:
    """CMI's contrastive loss from projected features: rows ``[batch; bank]`` of ``h_local`` are anchors,
    the same rows of ``h_global`` (no gradient) their positives and every other column a negative. The
    first ``len(h_local) - len(bank_valid)`` rows are the current batch; bank rows and columns where
    ``bank_valid`` is False are left out. Returns ``mean_batch CE + mean_bank CE`` (0 for an empty bank)."""
    n = h_local.shape[0] - bank_valid.shape[0]
    logits = h_local @ h_global.detach().T / temperature
    valid = torch.cat([torch.ones(n, dtype=torch.bool, device=bank_valid.device), bank_valid])
    logits = logits.masked_fill(~valid[None, :], float("-inf"))
    per = F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device), reduction="none")
    per = torch.where(valid, per, 0.0)
    bank = per[n:].sum() / bank_valid.sum().clamp(min=1)
    return per[:n].mean() + bank


# ------------------------------------------------------------------------------------------------ CMI
@register_method("cmi")
class CMI(LatentGeneratorMethod):
    """Contrastive model inversion (see the module docstring for the loss, the defaults' sources and the
    design choices)."""

    reset_generator = True

    @rules(cr=NON_NEGATIVE, cr_T=POSITIVE, head_dim=COUNT, n_neg=NON_NEGATIVE, bank_size=COUNT,
           local_scale=(POSITIVE, PROBABILITY), head_beta1=DECAY)
    @dataclass
    class Config(InversionConfig):
        """``cr``: weight of the contrastive term, ``cr_T`` its temperature; ``head_dim``: the projection's
        size; ``n_neg``: bank pairs drawn as extra negatives per step, ``bank_size``: pairs the bank keeps;
        ``local_scale``: the local crop's smallest area fraction; ``head_beta1``: the head's Adam beta1."""

        g_steps: int = 200
        kd_steps: int = 400
        lr_g: float = 1e-3
        lr_z: float = 0.0
        beta1: float = 0.5
        bn: float = 1.0
        oh: float = 1.0
        adv: float = 0.5
        temperature: float = 20.0
        cr: float = 0.8
        cr_T: float = 0.2
        head_dim: int = 256
        n_neg: int = 4096
        bank_size: int = 40960
        local_scale: float = 0.25
        head_beta1: float = 0.9

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        super().__init__(cfg, student, info)
        layers = bn_layers(self.teacher)
        if not layers:
            raise ConfigError(f"method cmi: the teacher {cfg.teacher} has no BatchNorm layer; CMI's contrastive "
                              "features are the inputs of the teacher's BN layers")
        dim = sum(m.num_features for m in layers)
        self.feature_dim = dim
        self.head = ProjectionHead(dim, cfg.head_dim)
        self.register_buffer("bank", torch.zeros(cfg.bank_size, 2 * dim))
        self.register_buffer("bank_added", torch.zeros((), dtype=torch.long))
        self.register_buffer("best_feat", torch.zeros(cfg.batch_size, 2 * dim))
        self._recording = False
        self._means: list[Tensor | None] = [None] * len(layers)
        ref = weakref.ref(self)
        self._handles = [m.register_forward_pre_hook(self._hook(ref, i)) for i, m in enumerate(layers)]

    # -- teacher features --------------------------------------------------------------------------
    @staticmethod
    def _hook(ref: weakref.ref, i: int):
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            self = ref()
            if self is None or not self._recording:
                return
            x = args[0]
            self._means[i] = x.float().mean(tuple(range(2, x.dim()))) if x.dim() > 2 else x.float()

        return hook

    def teacher_features(self, x: Tensor, bn: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The teacher's logits on ``x`` (normalised), its CMI features ``[N, F]`` and the BN-statistics term
        (recorded only with ``bn``; else 0)."""
        self._recording = True
        try:
            if bn:
                t, bn_loss = self.teacher_bn_loss(x)
            else:
                t = self.teacher(x)
                bn_loss = t.new_zeros((), dtype=torch.float32)
            feats = torch.cat(self._means, 1)
        finally:
            self._recording = False
            self._means = [None] * len(self._means)
        return t, feats, bn_loss

    def local_view(self, x01: Tensor) -> Tensor:
        """The local view of images in [0, 1]: a random resized crop (scale ``[local_scale, 1]``) and flip,
        normalised."""
        return self.normalize(resized_crops(x01, 1, None, (self.cfg.local_scale, 1.0), flip=self.cfg.flip))

    # -- memory bank -------------------------------------------------------------------------------
    def bank_negatives(self) -> tuple[Tensor, Tensor, Tensor]:
        """``min(n_neg, bank_size)`` stored (local, global) feature pairs drawn uniformly without replacement
        from the filled slots, and which of them are real (False where the bank holds fewer pairs)."""
        size = self.cfg.bank_size
        k = min(self.cfg.n_neg, size)
        filled = self.bank_added.clamp(max=size)
        slots = torch.arange(size, device=self.bank.device)
        keys = torch.where(slots < filled, torch.rand(size, device=self.bank.device), 2.0)
        idx = keys.topk(k, largest=False).indices
        pairs = self.bank[idx]
        return pairs[:, : self.feature_dim], pairs[:, self.feature_dim:], idx < filled

    @torch.no_grad()
    def bank_add(self, feats: Tensor) -> None:
        """Append (local, global) feature pairs ``[n, 2F]``, overwriting the oldest once full."""
        size = self.cfg.bank_size
        feats = feats[-size:]
        slots = (self.bank_added + torch.arange(feats.shape[0], device=self.bank.device)) % size
        self.bank[slots] = feats.to(self.bank.dtype)
        self.bank_added += feats.shape[0]

    def contrastive(self, f_local: Tensor, f_global: Tensor) -> Tensor:
        """``L_cr`` of the current batch's features against the bank (see :func:`info_nce`)."""
        neg_local, neg_global, valid = self.bank_negatives()
        h = self.head(torch.cat([f_local, neg_local, f_global, neg_global]))
        h_local, h_global = h.chunk(2)
        return info_nce(h_local, h_global, self.cfg.cr_T, valid)

    def end_round(self) -> None:
        super().end_round()
        self.bank_add(self.best_feat)

    # -- the synthesiser ---------------------------------------------------------------------------
    def synthesis_params(self):
        params, groups = super().synthesis_params()
        head = {"lr": self.cfg.lr_g, "betas": (self.cfg.head_beta1, 0.999)}
        return params, [*groups, (list(self.head.parameters()), head)]

    def synthesis_terms(self, x01: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        cfg = self.cfg
        seen = self.view(x01)
        t, f_global, bn = self.teacher_features(seen, bn=True)
        ce = F.cross_entropy(t.float(), self.y)
        if cfg.adv > 0:
            with evaluating(self.student):
                s = self.student(seen)
            adv = masked_adversarial_kl(s, t)
        else:
            adv = ce.new_zeros(())
        adv_w = adversarial_weight(cfg.adv, self.in_warmup(ctx.step), ce.device)
        if cfg.cr > 0:
            _, f_local, _ = self.teacher_features(self.local_view(x01))
            cr = self.contrastive(f_local, f_global)
        else:
            f_local = f_global
            cr = ce.new_zeros(())
        loss = cfg.bn * bn + cfg.oh * ce + adv_w * adv + cfg.cr * cr
        with torch.no_grad():  # the features of the round's best batch go to the bank at its end
            better = loss.detach() < self.best_loss
            feats = torch.cat([f_local, f_global], 1).detach()
            self.best_feat.copy_(torch.where(better, feats, self.best_feat))
        return {"loss": loss, "ce": ce, "bn": bn, "adv": adv, "cr": cr}

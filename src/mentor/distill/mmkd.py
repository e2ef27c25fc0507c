"""MMKD: multi-teacher KD whose per-sample teacher weights come from meta-learned weight networks.

Zhang, Chen & Wang, "Adaptive Multi-Teacher Knowledge Distillation with Meta-Learning", ICME 2023.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..config import COUNT, MANY, NON_NEGATIVE, POSITIVE, ConfigError, between, rules
from ..methods import Phase, StepContext, register_method
from ..nn import align_spatial, mlp
from .losses.crosslayer import sample_similarity
from .losses.multi import multi_teacher_feature_loss, multi_teacher_kd_loss
from .multi_teacher import FeatureMKD, FeatureMKDConfig
from .semckd import fixed_batch_error

# The virtual steps' learning rate when neither method.virtual_lr nor the engine (ctx.lrs) gives one:
# the base lr of the CIFAR recipe MMKD was tuned with.
_FALLBACK_LR = 0.05


class WeightNet(nn.Module):
    """Linear(n -> n/2) -> ReLU -> Linear(-> K) -> softmax over the K teachers: ``[B, n] -> [K, B]``."""

    def __init__(self, n_in: int, num_teachers: int):
        super().__init__()
        self.mlp = mlp(n_in, max(1, n_in // 2), num_teachers)

    def forward(self, state: Tensor) -> Tensor:
        return self.mlp(state.float()).softmax(-1).t()


class LogitWeightNet(WeightNet):
    """MMKD's logit weights, from the logits of every teacher and of the (detached) student."""

    def forward(self, teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
        return super().forward(torch.cat([*teacher_logits, student_logits.detach()], 1))


class FeatureWeightNet(WeightNet):
    """MMKD's feature weights, as its code builds them (``models/meta_util.py::FeatureWeight``): per
    sample b, the concatenation of its rows of the batch's similarity matrices ``A = F F^T`` [B, B] of
    every teacher's last feature map, then of the (detached) student's
    (:func:`~mentor.distill.losses.sample_similarity`), B (K + 1) values -> the weight MLP, in float32.
    The input width is tied to the batch size fixed at setup (the reference skips incomplete
    batches): only batches of ``batch_size`` are accepted, and a sample's weights depend on the rest
    of its batch. The matrices are not normalised (as in the reference): a last map's dot products
    run into the thousands, so the softmax is typically saturated from initialisation on: one-hot
    weights in float32, and no meta gradient reaches this network (seen with ResNet teachers on
    Fashion-MNIST at batch 64; ``pooled`` does not saturate)."""

    def __init__(self, batch_size: int, num_teachers: int):
        super().__init__(batch_size * (num_teachers + 1), num_teachers)
        self.batch_size = batch_size

    def forward(self, teacher_maps: list[Tensor], student_map: Tensor) -> Tensor:
        if student_map.shape[0] != self.batch_size:
            raise fixed_batch_error("method.feature_weight_input", self.batch_size, student_map.shape[0])
        with torch.autocast(student_map.device.type, enabled=False):
            state = torch.cat([sample_similarity(f) for f in [*teacher_maps, student_map.detach()]], 1)
            return super().forward(state)


class PooledFeatureWeightNet(WeightNet):
    """The pooled variant of the feature weights (this library's, not MMKD's): each last feature map
    (every teacher's, then the detached student's) is global-average-pooled and L2-normalised per
    sample, and the vectors are concatenated: the input size is the sum of the channel counts,
    independent of the batch size, and a sample's weights do not depend on the rest of its batch."""

    def forward(self, teacher_maps: list[Tensor], student_map: Tensor) -> Tensor:
        pooled = [F.normalize(f.float().mean((-2, -1)), dim=1) for f in [*teacher_maps, student_map.detach()]]
        return super().forward(torch.cat(pooled, 1))


@rules(meta_every=COUNT, meta_lr=POSITIVE, meta_weight_decay=NON_NEGATIVE, virtual_steps=between(1, MANY),
       virtual_lr=POSITIVE.because("null follows the student's rate"), buffer_size=COUNT)
@dataclass
class MMKDConfig(FeatureMKDConfig):
    """Defaults of the MMKD README command (``-r 1 -a 1 -b 100 --hard_buffer --convs``) and code.

    ``meta_every``, ``meta_lr``, ``meta_weight_decay``: the weight networks' step every k student steps
    with Adam(W) lr 1e-3, weight decay 1e-4. ``virtual_steps``: SGD steps on the distillation terms in
    the virtual update (2), then ``virtual_ce_step`` one on CE, as in the reference. ``virtual_lr``:
    their learning rate; None = the student's current lr (``ctx.lrs["student"]`` from the engine).
    ``hard_buffer``/``buffer_size``: the outer batch is drawn from the last misclassified samples.
    ``convs``: the README passes ``--convs``, but the reference calls ``Embed(s_n, t_n, convs)``
    against the signature ``(dim_in, dim_out, factor=2, convs=False)``, so the flag lands in
    ``factor`` and the conv1x1 Embed is what ran; we default to what ran (False), and True builds the
    intended bottleneck. ``feature_weight_input``: the feature-weight network reads the batch's
    sample-similarity matrices (``similarity``, the reference's form, :class:`FeatureWeightNet`) or the
    pooled maps (``pooled``, a variant of this library, :class:`PooledFeatureWeightNet`).
    """

    feat_weight: float = 100.0
    meta_every: int = 5
    meta_lr: float = 1e-3
    meta_weight_decay: float = 1e-4
    virtual_steps: int = 2
    virtual_ce_step: bool = True
    virtual_lr: float | None = None
    hard_buffer: bool = True
    buffer_size: int = 256
    feature_weight_input: Literal["similarity", "pooled"] = "similarity"


@register_method("mmkd")
class MMKD(FeatureMKD):
    """Adaptive multi-teacher KD with meta-learning (Zhang et al., "Adaptive Multi-Teacher Knowledge
    Distillation with Meta-Learning", ICME 2023).

    Student phase (every step): ``CE + kd_weight * sum_k w_k KL_k + feat_weight * sum_k v_k MSE_k``,
    with per-sample logit weights ``w`` and feature weights ``v`` from two small weight networks
    (held fixed here; ``v`` from the batch's sample-similarity matrices of the last maps, as in the
    reference, unless ``feature_weight_input=pooled``), the student's last map pooled to the smaller of
    the two sizes and mapped by ``Embed_k`` to teacher k's channels. Misclassified samples enter a
    hard-sample ring buffer.

    Meta phase (every ``meta_every`` steps): on a batch drawn from the buffer, a differentiable copy
    of the student and its Embeds takes ``virtual_steps`` SGD steps on the distillation terms (and
    one on CE); the CE of the virtually updated student on the same batch is back-propagated through
    the unrolled steps into the weight networks only. The virtual steps run on detached copies of
    the parameters and BN statistics through ``torch.func.functional_call``, so the real student is
    never modified (the reference's ``rollback``). Unlike the reference, the virtual steps are plain
    SGD (no momentum or weight decay).
    """

    Config = MMKDConfig

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        if cfg.meta_every < 1 or cfg.virtual_steps < 1 or cfg.buffer_size < 1:
            raise ConfigError("mmkd: method.meta_every, method.virtual_steps and method.buffer_size must be >= 1")

    def setup(self, batch: dict[str, Tensor]) -> None:
        super().setup(batch)
        x = batch["x"]
        f_s, f_t = self.last_maps()
        k = len(self.teachers)
        self.logit_net = LogitWeightNet(self.info.num_classes * (k + 1), k).to(x.device)
        if self.cfg.feature_weight_input == "similarity":
            self.feat_net = FeatureWeightNet(x.shape[0], k).to(x.device)
        else:
            self.feat_net = PooledFeatureWeightNet(sum(f.shape[1] for f in [*f_t, f_s]), k).to(x.device)
        if self.cfg.hard_buffer:
            # On the device and in the checkpoint: filled by masked writes, never read by the host.
            n = self.cfg.buffer_size
            self.register_buffer("hard_x", torch.zeros(n, *x.shape[1:], dtype=x.dtype, device=x.device))
            self.register_buffer("hard_y", torch.zeros(n, dtype=torch.long, device=x.device))
            self.register_buffer("hard_ptr", torch.zeros((), dtype=torch.long, device=x.device))
            self.register_buffer("hard_count", torch.zeros((), dtype=torch.long, device=x.device))

    def phases(self) -> list[Phase]:
        meta = [*self.logit_net.parameters(), *self.feat_net.parameters()]
        ids = {id(p) for p in meta}
        learner = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [Phase("student", learner),
                Phase("meta", meta, every=self.cfg.meta_every,
                      optim={"name": "adamw", "lr": self.cfg.meta_lr, "weight_decay": self.cfg.meta_weight_decay})]

    # -- losses ----------------------------------------------------------------------------------
    def distill_terms(self, s: Tensor, t: Tensor, f_s: Tensor, f_t: list[Tensor], embed,
                      learn_weights: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(KD, feature MSE, w, v) from logits and maps; ``embed(list of maps) -> list of maps``.
        The larger of the student's and teacher k's maps is average-pooled to the smaller one's size
        (:func:`mentor.nn.align_spatial`) before Embed k. The weight networks get gradients only when
        ``learn_weights`` (the meta phase)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and learn_weights):
            w, v = self.logit_net(t, s), self.feat_net(f_t, f_s)
        ins, targets = zip(*(align_spatial(f_s, f) for f in f_t))
        kd = multi_teacher_kd_loss(s, t, w, self.cfg.temperature)
        return kd, multi_teacher_feature_loss(embed(list(ins)), list(targets), v), w, v

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        if ctx.phase == "meta":
            return self.meta_step(batch, ctx)
        x, y = batch["x"], batch["y"]
        t = self.teacher_logits(x)
        s = self.student(x)
        f_s, f_t = self.last_maps()
        kd, feat, w, v = self.distill_terms(s, t, f_s, f_t, self.embeds, learn_weights=False)
        if self.cfg.hard_buffer:
            self.remember(x, y, s.detach().argmax(1) != y)
        out = self.combine(s, y, {"kd": kd, "feat": feat}, {"kd": self.cfg.kd_weight, "feat": self.cfg.feat_weight})
        out.update({f"w{k}": wk.mean() for k, wk in enumerate(w)})
        out.update({f"v{k}": vk.mean() for k, vk in enumerate(v)})
        return out

    # -- the meta step ---------------------------------------------------------------------------
    def virtual_lr(self, ctx: StepContext) -> float:
        if self.cfg.virtual_lr is not None:
            return self.cfg.virtual_lr
        return float((getattr(ctx, "lrs", None) or {}).get("student", _FALLBACK_LR))

    def meta_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x, y = self.hard_batch(batch["x"], batch["y"])
        t = self.teacher_logits(x)
        f_t = self.teacher_maps()
        # Differentiable copies: gradients of the outer loss stop here, and BN statistics updated by
        # the virtual forwards land in clones, so the real student and Embeds stay as they are.
        nets = {"student": self.student, "embeds": self.embeds}
        params = {m: {n: p.detach().requires_grad_() for n, p in net.named_parameters()} for m, net in nets.items()}
        stats = {m: {n: b.clone() for n, b in net.named_buffers()} for m, net in nets.items()}

        def run(name: str, p: dict[str, dict[str, Tensor]], *args):
            return functional_call(nets[name], {**p[name], **stats[name]}, args)

        def matching(p):
            s = run("student", p, x)
            f_s = self.student_tap[self.student_tap.names[0]]
            kd, feat, _, _ = self.distill_terms(s, t, f_s, f_t, lambda ins: run("embeds", p, ins), learn_weights=True)
            return self.cfg.kd_weight * kd + self.cfg.feat_weight * feat

        def ce(p):
            return F.cross_entropy(run("student", p, x), y)

        lr = self.virtual_lr(ctx)
        for objective in [matching] * self.cfg.virtual_steps + [ce] * self.cfg.virtual_ce_step:
            flat = [(m, n) for m in params for n in params[m]]
            grads = torch.autograd.grad(objective(params), [params[m][n] for m, n in flat],
                                        create_graph=True, allow_unused=True)
            params = {m: dict(params[m]) for m in params}
            for (m, n), g in zip(flat, grads):
                if g is not None:
                    params[m][n] = params[m][n] - lr * g
        outer = ce(params)
        fill = self.hard_count.float() if self.cfg.hard_buffer else torch.zeros((), device=x.device)
        return {"loss": outer, "buffer": fill}

    # -- the hard-sample buffer ------------------------------------------------------------------
    @torch.no_grad()
    def remember(self, x: Tensor, y: Tensor, wrong: Tensor) -> None:
        """Write the samples flagged ``wrong`` into the ring buffer, oldest slots first.

        Every slot is rewritten with ``where`` (a B x capacity match of samples to slots), so the
        number of misclassified samples is never read by the host; of more than ``capacity`` flagged
        samples the last ``capacity`` are kept.
        """
        cap = self.hard_y.numel()
        rank = wrong.long().cumsum(0) - 1  # position among the flagged samples
        n = rank[-1] + 1
        keep = wrong & (rank >= n - cap)
        slot = (self.hard_ptr + rank) % cap
        hit = keep[:, None] & (slot[:, None] == torch.arange(cap, device=slot.device))  # [B, cap]
        has = hit.any(0)
        src = hit.long().argmax(0)
        self.hard_x.copy_(torch.where(has.view(-1, *[1] * (x.dim() - 1)), x[src].to(self.hard_x.dtype), self.hard_x))
        self.hard_y.copy_(torch.where(has, y[src], self.hard_y))
        self.hard_ptr.copy_((self.hard_ptr + n) % cap)
        self.hard_count.copy_((self.hard_count + n).clamp(max=cap))

    @torch.no_grad()
    def hard_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """A batch of ``len(x)`` buffered samples drawn uniformly with replacement (the reference draws
        without), or ``(x, y)`` itself while the buffer is empty or disabled."""
        if not self.cfg.hard_buffer:
            return x, y
        n = self.hard_count
        idx = (torch.rand(len(x), device=x.device) * n.clamp(min=1)).long()
        full = n > 0
        return torch.where(full, self.hard_x[idx].to(x.dtype), x), torch.where(full, self.hard_y[idx], y)


__all__ = ["FeatureWeightNet", "LogitWeightNet", "MMKD", "MMKDConfig", "PooledFeatureWeightNet", "WeightNet"]

"""Which pseudo-labels a semi-supervised step trusts: confidence masks and weights, with their state.

Each masker takes the (detached) class probabilities of the unlabelled weak view and returns one weight
per image in ``[0, 1]`` (a 0/1 mask, or SoftMatch's soft weight); the unsupervised loss multiplies the
per-image loss by it and averages over *all* images of the unlabelled batch, as USB's
``consistency_loss`` does. The family, as USB (microsoft/Semi-supervised-learning) implements it:

- :class:`FixedThreshold`: FixMatch's ``max p >= tau``;
- :class:`FlexThreshold`: FlexMatch's per-class curriculum thresholds;
- :class:`FreeMatchThreshold` and :func:`freematch_fairness`: FreeMatch's self-adaptive threshold and
  self-adaptive fairness term;
- :class:`SoftMatchWeight`: SoftMatch's truncated Gaussian weights;
- :class:`DashThreshold`: Dash's dynamic threshold on the per-image loss;
- :func:`relative_threshold`: AdaMatch's threshold relative to the labelled batch's confidence.

State lives in buffers, so it is checkpointed with the method that owns the masker and a resumed run
continues exactly. Every update runs on the device without reading a value back to the host (no
``.item()``, no Python ``if`` on a tensor, no ``torch.bincount``, which reads its maximum back to size
its output): a training step that uses them can be captured as a CUDA graph. Statistics the reference
takes over the whole batch are reduced over the DDP ranks (each rank holds a slice of the global
unlabelled batch), so the state is the same on every rank and equal to a one-process run of the
global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

# -- DDP and step helpers (no host synchronisation) -------------------------------------------------


def distributed() -> bool:
    """A process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over the ranks (in place); ``t`` itself in one process."""
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: Tensor) -> Tensor:
    """The ranks' ``t`` concatenated along dim 0 in rank order: the rows of the one-process batch, since
    rank ``r`` holds rows ``[r*B, (r+1)*B)`` of it (every rank holds the same number). No gradient."""
    if not distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def step_tensor(step: int | Tensor, device: torch.device) -> Tensor:
    """``ctx.step`` (an int eagerly, a 0-d device tensor in a captured step) as a float 0-d tensor on
    ``device``."""
    if isinstance(step, Tensor):
        return step.to(device=device, dtype=torch.float32)
    return torch.full((), float(step), device=device)


def class_counts(labels: Tensor, num_classes: int, weights: Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """How often each class in ``[0, num_classes)`` occurs in ``labels`` (``weights`` summed instead of
    ones, when given), as ``dtype``: ``torch.bincount`` without its host synchronisation."""
    ones = torch.ones_like(labels, dtype=dtype) if weights is None else weights.to(dtype)
    return torch.zeros(num_classes, device=labels.device, dtype=dtype).scatter_add_(0, labels, ones)


# -- the maskers -------------------------------------------------------------------------------------


class FixedThreshold(nn.Module):
    """``mask = 1[max_c p_c >= p_cutoff]``: Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning
    with Consistency and Confidence", NeurIPS 2020 (USB's ``FixedThresholdingHook``). Stateless."""

    def __init__(self, p_cutoff: float = 0.95):
        super().__init__()
        self.p_cutoff = p_cutoff

    def forward(self, probs: Tensor) -> Tensor:
        return (probs.max(1).values >= self.p_cutoff).to(probs.dtype)


class FlexThreshold(nn.Module):
    """FlexMatch's curriculum pseudo-labelling: Zhang et al., "FlexMatch: Boosting Semi-Supervised Learning
    with Curriculum Pseudo Labeling", NeurIPS 2021, in the form of USB's ``FlexMatchThresholdingHook``.

    ``selected_label`` holds one entry per image of the unlabelled pool: the last confident prediction
    for it, ``-1`` while it has none. The learning effect of class ``c`` is ``sigma(c)``, the number of
    images whose entry is ``c``, and its normalised form is ``beta(c) = sigma(c) / max(...)``, where the
    maximum runs over the classes and, with ``thresh_warmup`` (the paper's threshold warm-up), over the
    unused bucket ``-1`` too: early on, when most images are unused, every ``beta`` is small. The mask is
    ``max p >= p_cutoff * M(beta(argmax p))`` with the convex mapping ``M(b) = b / (2 - b)``.

    Order and details of one step, as USB: the mask uses the ``beta`` of the previous step (all 0 at the
    start, so every image passes until the first confident one is recorded); then the images with
    ``max p >= p_cutoff`` record their prediction (``record="fixed"``, the default: the *fixed* threshold,
    USB's and TorchSSL's choice, questioned in TorchSSL issues #57 and #73; ``record="flexible"`` records
    the images the flexible mask keeps, as the paper's text suggests); then
    ``beta`` is recomputed, unless every entry holds one value (all unused, or all one class), when it
    is kept. An image that appears twice in a batch keeps its last occurrence's prediction. Under DDP the
    ranks' indices and predictions are gathered first, so every rank records the global batch.
    """

    def __init__(self, num_classes: int, num_unlabeled: int, p_cutoff: float = 0.95, thresh_warmup: bool = True,
                 record: str = "fixed"):
        super().__init__()
        if num_unlabeled < 1:
            raise ValueError("FlexThreshold needs the size of the unlabelled pool (num_unlabeled >= 1)")
        if record not in ("fixed", "flexible"):
            raise ValueError(f"FlexThreshold(record={record!r}): use 'fixed' or 'flexible'")
        self.num_classes, self.num_unlabeled = num_classes, num_unlabeled
        self.p_cutoff, self.thresh_warmup, self.record = p_cutoff, thresh_warmup, record
        self.register_buffer("selected_label", torch.full((num_unlabeled,), -1, dtype=torch.long))
        self.register_buffer("classwise_acc", torch.zeros(num_classes))

    def forward(self, probs: Tensor, index: Tensor) -> Tensor:
        conf, pred = probs.max(1)
        beta = self.classwise_acc[pred]
        keep = conf >= self.p_cutoff * beta / (2.0 - beta)
        self.update(conf >= self.p_cutoff if self.record == "fixed" else keep, pred, index)
        return keep.to(probs.dtype)

    @torch.no_grad()
    def update(self, select: Tensor, pred: Tensor, index: Tensor) -> None:
        """Record ``pred`` for the pool entries ``index`` where ``select``; recompute ``beta``."""
        index, pred, select = all_gather_cat(index), all_gather_cat(pred), all_gather_cat(select)
        # The batch position that writes each pool entry (the last confident occurrence), -1 for none.
        pos = torch.where(select, torch.arange(index.numel(), device=index.device), -1)
        writer = torch.full_like(self.selected_label, -1).scatter_reduce_(0, index, pos, "amax")
        recorded = torch.where(writer >= 0, pred[writer.clamp(min=0)], self.selected_label)
        self.selected_label.copy_(recorded)
        counts = class_counts(recorded + 1, self.num_classes + 1, dtype=self.classwise_acc.dtype)  # 0: unused
        sigma = counts[1:]
        top = counts.max() if self.thresh_warmup else sigma.max()
        beta = sigma / top.clamp(min=1.0)
        self.classwise_acc.copy_(torch.where(counts.max() < self.num_unlabeled, beta, self.classwise_acc))


class FreeMatchThreshold(nn.Module):
    """FreeMatch's self-adaptive threshold (SAT): Wang et al., "FreeMatch: Self-adaptive Thresholding for
    Semi-supervised Learning", ICLR 2023, as USB's ``FreeMatchThresholingHook`` (``use_quantile`` and
    ``clip_thresh`` off, their defaults).

    Three exponential moving averages (momentum ``ema``) of the unlabelled weak batch: the global
    confidence ``tau`` (mean of ``max p``), the class-wise mean probability ``p_model`` and the histogram
    of predicted classes ``label_hist``. They are updated first, with this batch, and then
    ``mask = max p >= tau * p_model(argmax p) / max_c p_model(c)``. All three start at ``1/C``, the paper's
    initialisation (USB at HEAD starts them at 1, its ``/ num_classes`` commented out, so its ``tau``
    starts at 1). Under DDP the batch means are taken over the global batch.
    """

    def __init__(self, num_classes: int, ema: float = 0.999):
        super().__init__()
        self.num_classes, self.ema = num_classes, ema
        self.register_buffer("time_p", torch.tensor(1.0 / num_classes))
        self.register_buffer("p_model", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("label_hist", torch.full((num_classes,), 1.0 / num_classes))

    def forward(self, probs: Tensor) -> Tensor:
        self.update(probs)
        conf, pred = probs.max(1)
        relative = self.p_model / self.p_model.max()
        return (conf >= self.time_p * relative[pred]).to(probs.dtype)

    @torch.no_grad()
    def update(self, probs: Tensor) -> None:
        c, m = self.num_classes, self.ema
        probs = probs.to(self.p_model.dtype)
        conf, pred = probs.max(1)
        n = torch.full((1,), float(probs.shape[0]), device=probs.device, dtype=probs.dtype)
        sums = all_reduce_sum(torch.cat([conf.sum()[None], probs.sum(0), class_counts(pred, c, dtype=probs.dtype), n]))
        n = sums[-1]
        self.time_p.mul_(m).add_((1 - m) * sums[0] / n)
        self.p_model.mul_(m).add_((1 - m) * sums[1:c + 1] / n)
        self.label_hist.mul_(m).add_((1 - m) * sums[c + 1:2 * c + 1] / n)


def freematch_fairness(logits_s: Tensor, mask: Tensor, p_model: Tensor, label_hist: Tensor) -> Tensor:
    """FreeMatch's self-adaptive fairness term ``L_f`` (Wang et al., ICLR 2023), as USB computes it.

    Over the images the mask keeps (``mask > 0``), with ``q = softmax(logits_s)`` of the strong view and
    ``h_s`` the normalised histogram of their ``argmax q``:
    ``p' = SumNorm(p_model / label_hist)``, ``s' = SumNorm(mean_kept(q) / h_s)`` (classes with
    ``h_s = 0`` scaled by 0) and ``L_f = sum_c p'(c) log(s'(c) + 1e-12)``, the negative cross-entropy the
    paper minimises to keep predictions diverse. 0 when the mask keeps nothing (USB skips the term then;
    here a ``torch.where``, so nothing is read back to the host and no NaN reaches the gradient). The
    batch is this rank's, as in USB.
    """
    dtype = torch.promote_types(logits_s.dtype, torch.float32)  # bf16 logits in float32, float64 kept
    keep = (mask > 0).to(dtype)
    kept = keep.sum()
    q = logits_s.to(dtype).softmax(1)
    hist_s = class_counts(q.detach().argmax(1), q.shape[1], keep, dtype) / kept.clamp(min=1.0)
    mean_q = (q * keep[:, None]).sum(0) / kept.clamp(min=1.0)
    scale_s = torch.where(hist_s > 0, 1.0 / hist_s.clamp(min=1e-12), torch.zeros_like(hist_s))
    s = mean_q * scale_s
    s = s / s.sum().clamp(min=1e-12)
    scale_p = torch.where(label_hist > 0, 1.0 / label_hist.clamp(min=1e-12), torch.zeros_like(label_hist))
    p = (p_model * scale_p).detach().to(dtype)
    p = p / p.sum()
    loss = (p * torch.log(s + 1e-12)).sum()
    return torch.where(kept > 0, loss, torch.zeros_like(loss))


class SoftMatchWeight(nn.Module):
    """SoftMatch's truncated Gaussian weights: Chen et al., "SoftMatch: Addressing the Quantity-Quality
    Trade-off in Semi-supervised Learning", ICLR 2023, as USB's ``SoftMatchWeightingHook`` (global, not
    per class: USB's ``per_class`` path cannot run, see the research notes 1.14).

    Moving averages (momentum ``ema``) of the batch mean ``mu`` and the unbiased batch variance ``var``
    of ``max p``, starting at ``1/C`` and 1, are updated with this batch first; then
    ``w = exp(-min(max p - mu, 0)^2 / (2 var / n_sigma^2))``: 1 above the mean, a Gaussian tail below.
    The probabilities given are the ones the statistics and weights are taken of: SoftMatch in USB passes
    the *aligned* probabilities (uniform alignment first, then these statistics), the order this library
    follows; the paper's and TorchSSL's code update the statistics before the alignment (USB issue #89;
    the maintainers note the paper's Table 1 was run with TorchSSL). Under DDP the mean and variance are
    those of the global batch (USB's gather there calls a method that does not exist).
    """

    def __init__(self, num_classes: int, n_sigma: float = 2.0, ema: float = 0.999):
        super().__init__()
        self.n_sigma, self.ema = n_sigma, ema
        self.register_buffer("mu", torch.tensor(1.0 / num_classes))
        self.register_buffer("var", torch.tensor(1.0))

    def forward(self, probs: Tensor) -> Tensor:
        conf = probs.to(self.mu.dtype).max(1).values
        self.update(conf)
        gap = (conf - self.mu).clamp(max=0.0)
        return torch.exp(-gap.square() / (2.0 * self.var / self.n_sigma ** 2)).to(probs.dtype)

    @torch.no_grad()
    def update(self, conf: Tensor) -> None:
        m = self.ema
        n = torch.full((), float(conf.numel()), device=conf.device, dtype=conf.dtype)
        sums = all_reduce_sum(torch.stack([conf.sum(), n]))
        mean = sums[0] / sums[1]
        squares = all_reduce_sum((conf - mean).square().sum())
        var = squares / (sums[1] - 1).clamp(min=1.0)  # unbiased; one image has variance 0, not NaN
        self.mu.mul_(m).add_((1 - m) * mean)
        self.var.mul_(m).add_((1 - m) * var)


class DashThreshold(nn.Module):
    """Dash's dynamic threshold on the per-image loss: Xu et al., "Dash: Semi-Supervised Learning with
    Dynamic Thresholding", ICML 2021, with USB's defaults (``semilearn/algorithms/dash``: ``gamma`` 1.27,
    ``C`` 1.0001, ``rho_min`` 0.05, a 2048-step supervised warm-up, the threshold lowered every 10
    "epochs" of 1024 iterations) and its form of the update (``DashThresholdingHook``).

    An unlabelled image is kept when its loss on the weak view against its own pseudo-label is at most
    ``rho_t = max(C * gamma^-k * rho_hat, rho_min)``, ``k = floor((step - warmup_steps) / decay_every)``.
    Once ``rho_t`` has reached ``rho_min`` the pseudo-labels turn from soft (``softmax(z / T)``) to hard
    (:meth:`hard`), as USB does. Before ``warmup_steps`` nothing is kept (the warm-up trains on the labels
    only).

    ``rho_hat``: USB sets it to the loss on its evaluation split after the warm-up (the test set in the
    classic protocol, read on the host); the official code (TensorFlow, on the FixMatch code base) to the
    mean unlabelled loss of the warm-up's last epoch. This module averages, on the device, the
    labelled-batch cross-entropy of the last ``window`` warm-up steps (:meth:`observe`): the labelled
    loss the paper's analysis uses, without reading any held-out split during training. Under DDP the
    ranks' batch losses are averaged.
    """

    def __init__(self, rho_min: float = 0.05, gamma: float = 1.27, C: float = 1.0001, warmup_steps: int = 2048,
                 window: int = 100, decay_every: int = 10240):
        super().__init__()
        if warmup_steps < 1 or window < 1 or decay_every < 1:
            raise ValueError("DashThreshold needs warmup_steps, window and decay_every >= 1")
        self.rho_min, self.gamma, self.C = rho_min, gamma, C
        self.warmup_steps, self.window, self.decay_every = warmup_steps, min(window, warmup_steps), decay_every
        self.register_buffer("loss_sum", torch.zeros(()))
        self.register_buffer("loss_count", torch.zeros(()))

    @torch.no_grad()
    def observe(self, step: int | Tensor, sup_loss: Tensor) -> None:
        """Add the labelled batch's mean cross-entropy of a step in the last ``window`` warm-up steps (every
        micro-batch of such a step, with gradient accumulation)."""
        t = step_tensor(step, self.loss_sum.device)
        loss = sup_loss.detach().float().reshape(1)
        if distributed():
            loss = all_reduce_sum(loss) / dist.get_world_size()
        inside = (t >= float(self.warmup_steps - self.window)) & (t < float(self.warmup_steps))
        self.loss_sum.add_(torch.where(inside, loss[0], torch.zeros_like(loss[0])))
        self.loss_count.add_(inside.float())  # micro-batches of an accumulated step count one by one

    @property
    def rho_hat(self) -> Tensor:
        return self.loss_sum / self.loss_count.clamp(min=1.0)

    def _decayed(self, step: int | Tensor) -> Tensor:
        """``C * gamma^-k * rho_hat`` before the floor ``rho_min``."""
        t = step_tensor(step, self.loss_sum.device)
        k = torch.floor((t - float(self.warmup_steps)) / float(self.decay_every)).clamp(min=0.0)
        return self.C * self.gamma ** (-k) * self.rho_hat

    def rho(self, step: int | Tensor) -> Tensor:
        return self._decayed(step).clamp(min=self.rho_min)

    def hard(self, step: int | Tensor) -> Tensor:
        """A 0-d bool: the warm-up is over, the threshold has reached ``rho_min``, the pseudo-labels are hard."""
        t = step_tensor(step, self.loss_sum.device)
        return (self._decayed(step) <= self.rho_min) & (t >= float(self.warmup_steps))

    def forward(self, loss_w: Tensor, step: int | Tensor) -> Tensor:
        t = step_tensor(step, loss_w.device)
        return ((loss_w <= self.rho(step)) & (t >= float(self.warmup_steps))).to(loss_w.dtype)


def relative_threshold(probs_lb: Tensor, probs_u: Tensor, p_cutoff: float = 0.95) -> Tensor:
    """AdaMatch's relative confidence threshold: Berthelot et al., "AdaMatch: A Unified Approach to
    Semi-Supervised Learning and Domain Adaptation", ICLR 2022 (USB's ``AdaMatchThresholdingHook``).

    ``mask = max p_u >= p_cutoff * mean_b max p_lb`` with ``p_lb`` the labelled weak batch's
    probabilities. The mean is over the global labelled batch under DDP, so every rank uses one threshold,
    that of a one-process run (USB takes each GPU's own batch)."""
    conf_lb = probs_lb.to(torch.promote_types(probs_lb.dtype, torch.float32)).max(1).values
    n = torch.full((), float(conf_lb.numel()), device=conf_lb.device, dtype=conf_lb.dtype)
    sums = all_reduce_sum(torch.stack([conf_lb.sum(), n]))
    cutoff = p_cutoff * sums[0] / sums[1]
    return (probs_u.max(1).values >= cutoff).to(probs_u.dtype)


__all__ = ["DashThreshold", "FixedThreshold", "FlexThreshold", "FreeMatchThreshold", "SoftMatchWeight",
           "all_gather_cat", "all_reduce_sum", "class_counts", "distributed", "freematch_fairness",
           "relative_threshold", "step_tensor"]


#: the maskers a recipe can name with ``method.masker`` (the confidence-threshold family composes any of them)
MASKERS = ("fixed", "flexmatch", "freematch", "softmatch")


def named_masker(name: str, num_classes: int, num_unlabeled: int, p_cutoff: float = 0.95,
                 ema: float = 0.999) -> nn.Module:
    """The masker called ``name`` (one of :data:`MASKERS`) with its paper's defaults: FixMatch's fixed
    threshold at ``p_cutoff``, FlexMatch's per-class curriculum over the unlabelled pool, FreeMatch's
    self-adaptive threshold, SoftMatch's truncated Gaussian weights (both with moving averages at ``ema``)."""
    if name == "fixed":
        return FixedThreshold(p_cutoff)
    if name == "flexmatch":
        return FlexThreshold(num_classes, num_unlabeled, p_cutoff)
    if name == "freematch":
        return FreeMatchThreshold(num_classes, ema)
    if name == "softmatch":
        return SoftMatchWeight(num_classes, ema=ema)
    raise ValueError(f"unknown masker {name!r}; known: {', '.join(MASKERS)}")


def apply_masker(masker: nn.Module, probs: Tensor, index: Tensor) -> Tensor:
    """One weight per unlabelled image from any masker of :func:`named_masker` (FlexMatch's reads the
    images' positions ``index`` in the pool)."""
    return masker(probs, index) if isinstance(masker, FlexThreshold) else masker(probs)

"""Stateless pieces of the consistency-regularisation methods: sharpening, MixUp across labelled and
unlabelled data, and VAT's adversarial direction.

Every random draw takes a ``torch.Generator`` on the data's device (``None``: the device's default
generator) and stays on the device, so nothing here reads a value back to the host and a step that
uses it can be captured in a CUDA graph. :func:`step_generator` gives a method a generator that is a
pure function of (seed, step, rank), the way the engine draws its batches.
"""

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kl import kl_div
from .norm import frozen_bn_stats


def step_generator(step: int | Tensor, seed: int, device: torch.device | str, salt: int = 0) -> torch.Generator | None:
    """A generator for the random draws of one training step, seeded from (seed, step, rank, salt).

    In an eager step (``step`` an int) the draws are a pure function of those numbers, so a resumed run
    repeats them exactly whatever else consumed random numbers. In a step captured as a CUDA graph
    (``step`` a 0-d device tensor) a generator cannot be seeded from the step without reading it back,
    so ``None`` is returned: the device's default generator, which the graph advances on every replay
    and the engine checkpoints."""
    if isinstance(step, Tensor):
        return None
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else 0
    # Distinct odd multipliers keep nearby (seed, step, rank, salt) tuples far apart; the generators
    # hash their seed further (Philox on CUDA, MT19937 on the CPU).
    key = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB + salt) % 2**63
    return torch.Generator(device=device).manual_seed(key)


def sharpen(p: Tensor, temperature: float, dim: int = -1) -> Tensor:
    """``p^(1/T) / sum_c p_c^(1/T)``: the sharpened class distribution of MixMatch (Berthelot et al.,
    "MixMatch: A Holistic Approach to Semi-Supervised Learning", NeurIPS 2019, eq. 7), also used by
    ReMixMatch and UDA. Computed as ``softmax(log p / T)`` in float64 (a few numbers per image), which
    neither underflows nor overflows for a small ``T`` (it tends to the arg-max); a class of
    probability 0 stays 0."""
    if temperature <= 0:
        raise ValueError(f"sharpening temperature must be > 0, got {temperature}")
    return torch.softmax(torch.log(p.double()) / temperature, dim=dim).to(p.dtype)


class Mixed(NamedTuple):
    """The result of :func:`mixup`: inputs, targets, the weights ``lam`` (``[1]`` or ``[N]``) of the
    original rows and ``index``, the partner row of each row."""

    x: Tensor
    y: Tensor
    lam: Tensor
    index: Tensor


def sample_beta(alpha: float, n: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """``n`` draws of Beta(alpha, alpha) on the device as ``G1 / (G1 + G2)`` with ``G1, G2`` independent
    Gamma(alpha, 1) draws (no host round trip, unlike ``numpy.random.beta``)."""
    if alpha <= 0:
        raise ValueError(f"the Beta parameter must be > 0, got {alpha}")
    g = torch._standard_gamma(torch.full((2, n), float(alpha), device=device), generator=generator)
    # Both draws of a small alpha may underflow to 0: their ratio is then 0/0; either end is as likely.
    return torch.nan_to_num(g[0] / (g[0] + g[1]), nan=1.0)


def mixup(x: Tensor, y: Tensor, alpha: float, generator: torch.Generator | None = None,
          per_sample: bool = False) -> Mixed:
    """MixMatch's MixUp of a batch with a shuffled copy of itself (Berthelot et al. 2019, section 3.3).

    ``lam ~ Beta(alpha, alpha)``, ``lam' = max(lam, 1 - lam)`` (so each row stays closer to itself),
    ``x'_i = lam' x_i + (1 - lam') x_{index_i}`` and the same for the (soft) targets ``y``, with
    ``index`` a uniform random permutation. MixMatch passes the concatenation of the labelled batch
    and every unlabelled view, so a labelled image may be mixed with an unlabelled one and vice versa.

    ``per_sample=False`` draws one ``lam`` for the batch: the form of USB (``mixup_one_target``) and of
    the common PyTorch ports; ``per_sample=True`` one per row, as the authors' TensorFlow code does
    (``MixMode.augment_pair``). The permutation is drawn on the device (the argsort of uniform draws).
    """
    n = x.shape[0]
    lam = sample_beta(alpha, n if per_sample else 1, generator, x.device)
    lam = torch.maximum(lam, 1.0 - lam)
    index = torch.rand(n, generator=generator, device=x.device).argsort()
    lx = lam.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    ly = lam.view(-1, *([1] * (y.dim() - 1))).to(y.dtype)
    return Mixed(lx * x + (1 - lx) * x[index], ly * y + (1 - ly) * y[index], lam, index)


def unit_rows(d: Tensor, tiny: float = 1e-30) -> Tensor:
    """Each row (sample) of ``d`` divided by its L2 norm over all other dimensions; a zero row stays 0."""
    norm = d.flatten(1).norm(dim=1).clamp_min(tiny)
    return d / norm.view(-1, *([1] * (d.dim() - 1)))


def vat_perturbation(model_fn: Callable[[Tensor], Tensor], x: Tensor, logits: Tensor, xi: float = 1e-6,
                     eps: float = 6.0, iterations: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """VAT's virtual adversarial perturbation ``r_adv`` of ``x`` (Miyato et al., "Virtual Adversarial
    Training: A Regularization Method for Supervised and Semi-Supervised Learning", TPAMI 2018, eq. 12).

    ``r_adv = eps * d / ||d||`` (per sample), where ``d`` approximates the dominant eigenvector of the
    Hessian of ``KL(p(x) || p(x + r))`` at ``r = 0`` by ``iterations`` power-iteration steps with finite
    differences: ``d <- grad_r KL(p(x) || p(x + r)) at r = xi * d / ||d||``, starting from a Gaussian
    ``d``. ``p(x) = softmax(logits)`` is the (detached) prediction on the clean input. Defaults are
    USB's (``vat_eps`` 6, ``xi`` 1e-6, one iteration) and the paper's (``xi`` 1e-6, ``K`` 1).

    The probe forwards run in float32 (float64 for a float64 input) with autocast off (a bf16 forward
    rounds away a perturbation of norm ``xi``), take gradients with respect to the probe only (no
    parameter gradient is touched), and, where ``model_fn`` is a module, do not update its BatchNorm
    running statistics (:func:`frozen_bn_stats`, as USB's ``bn_controller`` freeze).

    Precision: a probe of norm 1e-6 spread over hundreds of pixels moves an input element of magnitude
    ~1 by less than its float32 rounding step, so in float32 most of it is rounded away and the
    gradient is that of the part that survives (the same holds for USB's code). On a small conv net at
    28x28 the direction found with ``xi`` 1e-6 raised the KL ~50x over random directions of the same
    norm, against ~85-90x with ``xi`` 1e-4 to 1 (from 1e-3 up it equals the float64 direction); a larger
    ``xi`` is the remedy where it matters.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    target = F.log_softmax(logits.detach().to(dtype), dim=1)
    x = x.detach().to(dtype)
    d = torch.randn(x.shape, generator=generator, device=x.device).to(dtype)  # the same start in any precision
    frozen = frozen_bn_stats(model_fn) if isinstance(model_fn, nn.Module) else contextlib.nullcontext()
    with frozen, torch.autocast(x.device.type, enabled=False), torch.enable_grad():
        for _ in range(iterations):
            probe = (xi * unit_rows(d)).requires_grad_(True)
            out = model_fn(x + probe).to(dtype)
            # The sum over samples (not the mean) gives the same per-sample directions with a gradient
            # B times larger, further from float32's underflow.
            divergence = kl_div(F.log_softmax(out, dim=1), target, reduction="none").sum()
            (d,) = torch.autograd.grad(divergence, probe)
    return eps * unit_rows(d.detach())


__all__ = ["Mixed", "mixup", "sample_beta", "sharpen", "step_generator", "unit_rows", "vat_perturbation"]

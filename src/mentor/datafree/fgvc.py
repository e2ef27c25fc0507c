"""DFKD-FGVC: Shao, Zhang, Yin and Wang, "Data-free Knowledge Distillation for Fine-grained Visual
Categorization", ICCV 2023 (arXiv 2404.12037). Status: partial. The repository RoryShao/DFKD-FGVC holds
no method code, so this module is written from the paper's description alone; where that leaves a detail
open it is a choice listed below.

An online adversarial distillation with three additions:

* an **attention generator** (:class:`AttentionGenerator`): DCGAN-like, each upsampling block followed by
  a spatial attention module (:class:`SpatialAttention`) whose map re-weights the block's features;
* **mixed high-order attention distillation** (MHAD): the teacher's block features and the student's
  (through a 1x1-conv adapter per block) pass through the same mixed high-order attention
  (:class:`MixedHighOrderAttention`, orders 1..R), and the attended maps are matched by MSE;
* **semantic feature contrast learning** (SFCL, :func:`teacher_anchored_infonce`): the penultimate
  features of both networks go through 2-hidden-layer MLP projectors, and an InfoNCE over the 2N
  projected features takes each image's teacher feature as the anchor and its student feature as the
  positive.

The generator minimises ``bn * L_BN - adv * L_KD`` (``alpha = 0.3``), the student
``L_KD + mhad * L_MHAD + sfcl * L_SFCL`` (``beta = 10``, ``gamma = 8``), ``g_steps = 20`` generator
steps then ``s_steps = 15`` student steps; generator Adam 1e-3 with betas (0.5, 0.99); the student's SGD
(lr 1e-2, momentum 0.9, wd 5e-4, cosine, batch 64) is the recipe's. These are the paper's values.

Design choices where the paper is silent or its text cannot be followed literally:

* Generator size: the paper's 224 px generator has 4 blocks (512 -> 256 -> 128 -> 64 -> 64 channels
  from a 14x14 start, ``ngf = 64``). Here the block count is ``g_blocks`` (0: 4 blocks for images of
  64 px or more, else 2), the start is ``ceil(size / 2**blocks)``, the first map has
  ``ngf * 2**(blocks-1)`` channels and each block halves it down to ``ngf``; 28 px images start at 7x7
  (``2ngf -> ngf -> ngf``). Blocks are a 3x3 stride-2 transposed conv with spectral norm,
  LeakyReLU(0.2) and the attention module, without BN (the paper names none); the output is a 3x3 conv
  and Tanh, mapped to an image in [0, 1] as ``(x + 1) / 2`` before the teacher's normalisation.
* Spatial attention: ``r = sam_reduction = 8``; encoder conv3x3-BN-ReLU-MaxPool(2), decoder
  3x3 transposed conv (stride 1) then MaxUnpool(2) with the pooling indices. The softmax runs over the
  H*W positions of each channel and is multiplied by H*W (a uniform map is 1): the paper's
  ``F~ = lambda * softmax(A_s) * F + F`` taken literally would scale the residual by 1/(H*W) and make
  the module a no-op at any resolution. ``lambda = 0`` is the identity.
* Mixed high-order attention: the polynomial predictor of Chen et al.'s High-Order Attention (MHN, ICCV
  2019) with rank-one factors, ``a(x) = sigmoid(sum_{r=1..R} alpha_r (prod_{k=1..r} U_{r,k} x))`` at
  every position, the attended map ``x * a(x)``. Its factors are **fixed random buffers** (N(0, 1/C),
  N(0, 1/D), rank ``D = C``), one module per block shared by the teacher and the student: trained
  together with the student they would shrink ``a`` to zero, which matches any two maps. ``a`` reads
  each sample's map divided by its root mean square, so the fixed weights see unit-scale inputs.
* MHAD: the sum over blocks of the mean over (N, C, H, W) of the squared difference (the paper's
  ``1/(N C) sum MSE``). Blocks are the zoo stages after ``stem``; networks of different depths pair
  their last stages; a student map of another resolution is average-pooled to the smaller one.
  The adapters are 1x1 convs with bias, trained with the student.
* SFCL: two projectors, ``Linear(d, h) - ReLU - Linear(h, h) - ReLU - Linear(h, p)`` with
  ``h = proj_hidden = 256`` and ``p = proj_dim = 128``, one per network, both trained with the student
  (the teacher's backbone stays frozen); cosine similarity, ``tau = 0.5`` (no value in the sources used;
  SimCLR's NT-Xent default). The negatives of an anchor are the other 2N-2 features.
* The student runs in training mode during the generator step (as in DFAD's code; the paper does not
  say), so its BN statistics also follow the generator's batches.
* KD temperature 1 for both players (no value in the sources used; the Fast-Datafree code base that runs the
  baselines it compares with distils its generative methods at T=1); no augmentation of the generated
  images.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from ..config import COUNT, DECAY, NON_NEGATIVE, POSITIVE, ConfigError, rules
from ..methods import BuildInfo, StepContext, register_method
from ..models import FeatureTap, stage_names
from ..models.penultimate import PenultimateTap
from ..nn import align_spatial, frozen_bn_stats, soft_kl, train_accuracy
from .base import GenerativeConfig, GenerativeMethod


# ------------------------------------------------------------------------------------------- generator
class SpatialAttention(nn.Module):
    """The attention generator's spatial attention module: ``F + lam * (H W softmax_hw(A_s(F))) * F``.

    ``A_s``: 1x1 conv ``C -> C/r``, an encoder (3x3 conv, BN, ReLU, 2x2 max-pool), a decoder (3x3
    transposed conv, 2x2 max-unpool with the encoder's indices) and a 1x1 conv back to ``C``."""

    def __init__(self, channels: int, reduction: int = 8, lam: float = 0.05):
        super().__init__()
        mid = max(1, channels // reduction)
        self.lam = lam
        self.reduce = nn.Conv2d(channels, mid, 1)
        self.encode = nn.Sequential(nn.Conv2d(mid, mid, 3, 1, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
        self.decode = nn.ConvTranspose2d(mid, mid, 3, 1, 1)
        self.expand = nn.Conv2d(mid, channels, 1)

    def attention(self, x: Tensor) -> Tensor:
        """The map ``A_s`` (``[N, C, H, W]``, before the softmax)."""
        h = self.encode(self.reduce(x))
        p, idx = F.max_pool2d(h, 2, return_indices=True)
        u = F.max_unpool2d(self.decode(p), idx, 2, output_size=h.shape[-2:])
        return self.expand(u)

    def weights(self, x: Tensor) -> Tensor:
        """``H W * softmax`` of ``A_s`` over the positions of each channel: positive, mean 1 per channel."""
        a = self.attention(x)
        n, c, h, w = a.shape
        return F.softmax(a.flatten(2).float(), -1).view(n, c, h, w).to(x.dtype) * (h * w)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.lam * self.weights(x) * x


class AttentionGenerator(nn.Module):
    """``G(z) -> images in [0, 1]`` of ``channels x size x size`` (see the module docstring): FC, BN, then
    ``blocks`` x (3x3 stride-2 transposed conv with spectral norm, LeakyReLU(0.2), spatial attention), a
    3x3 conv and Tanh, mapped to ``(x + 1) / 2``."""

    def __init__(self, nz: int = 256, ngf: int = 64, size: int = 28, channels: int = 1, blocks: int = 0,
                 lam: float = 0.05, reduction: int = 8):
        super().__init__()
        blocks = blocks or (4 if size >= 64 else 2)
        self.nz, self.size, self.blocks = nz, size, blocks
        self.init_size = math.ceil(size / 2 ** blocks)
        widths = [ngf * 2 ** (blocks - 1)]
        for i in range(blocks):
            widths.append(max(ngf, widths[0] // 2 ** (i + 1)))
        self.widths = tuple(widths)
        self.fc = nn.Linear(nz, widths[0] * self.init_size ** 2)
        self.bn = nn.BatchNorm2d(widths[0])
        self.ups = nn.ModuleList(
            spectral_norm(nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=1))
            for a, b in zip(widths, widths[1:]))
        self.attn = nn.ModuleList(SpatialAttention(b, reduction, lam) for b in widths[1:])
        self.out = nn.Conv2d(widths[-1], channels, 3, 1, 1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.bn(self.fc(z).view(z.shape[0], -1, self.init_size, self.init_size))
        for up, attn in zip(self.ups, self.attn):
            h = attn(F.leaky_relu(up(h), 0.2))
        h = self.out(h)[:, :, : self.size, : self.size]
        return (torch.tanh(h) + 1) / 2


@contextlib.contextmanager
def frozen_spectral_norm(module: nn.Module) -> Iterator[None]:
    """Forwards that use the spectral norms' current estimate without a power-iteration step (their
    ``u``, ``v`` are trained state: drawing a grid of samples must not move them)."""
    norms = [m for m in module.modules() if parametrize.is_parametrized(m)]
    params = [p for m in norms for plist in m.parametrizations.values() for p in plist]
    modes = [p.training for p in params]
    for p in params:
        p.eval()
    try:
        yield
    finally:
        for p, mode in zip(params, modes):
            p.train(mode)


# ------------------------------------------------------------------------------------------- MHAD, SFCL
class MixedHighOrderAttention(nn.Module):
    """``x * sigmoid(sum_{r=1..R} alpha_r prod_{k=1..r} (U_{r,k} x_hat))`` at every position, ``x_hat``
    each sample's map over its root mean square; ``U_{r,k}`` (``D x C``) and ``alpha_r`` (``C x D``) are
    fixed random buffers (see the module docstring)."""

    def __init__(self, channels: int, order: int = 3, rank: int = 0):
        super().__init__()
        rank = rank or channels
        self.order = order
        use = torch.ones(order, order).tril().bool()  # factor k takes part in order r (0-based) when k <= r
        u = torch.randn(order, order, rank, channels) / math.sqrt(channels)
        self.register_buffer("factors", u * use[:, :, None, None])
        self.register_buffer("alpha", torch.randn(order, channels, rank) / math.sqrt(rank))
        self.register_buffer("use", use, persistent=False)

    def logits(self, x: Tensor) -> Tensor:
        """The attention's pre-sigmoid map ``[N, C, H, W]``."""
        x = x.float()
        xn = x * torch.rsqrt(x.pow(2).mean((1, 2, 3), keepdim=True) + 1e-6)
        proj = torch.einsum("rkdc,nchw->nrkdhw", self.factors, xn)
        proj = torch.where(self.use[:, :, None, None, None], proj, torch.ones_like(proj))
        return torch.einsum("rcd,nrdhw->nchw", self.alpha, proj.prod(2))

    def forward(self, x: Tensor) -> Tensor:
        return x.float() * torch.sigmoid(self.logits(x))


def mhad_loss(mha: nn.ModuleList, t_maps: list[Tensor], s_maps: list[Tensor]) -> Tensor:
    """``sum_l mean_{n,c,h,w} (MHA_l(F_t^l) - MHA_l(F_s^l))^2``: per block, ``1/(N C) sum_{n,c}`` of the
    spatial MSE of the attended maps (student maps already adapted and aligned)."""
    return sum(F.mse_loss(m(s), m(t)) for m, t, s in zip(mha, t_maps, s_maps))


def projector(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    """The SFCL projector: an MLP with two hidden layers."""
    return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, c_out))


def teacher_anchored_infonce(zt: Tensor, zs: Tensor, tau: float) -> Tensor:
    """InfoNCE over the 2N features ``[zt; zs]`` (cosine similarity over ``tau``): each teacher feature
    ``zt_i`` is an anchor, the student feature ``zs_i`` of the same image its positive, and the other
    2N - 2 features its negatives. Batch mean of ``-log softmax`` of the positive."""
    zt, zs = F.normalize(zt.float(), dim=1), F.normalize(zs.float(), dim=1)
    n = zt.shape[0]
    sim = zt @ torch.cat([zt, zs]).T / tau
    self_ = torch.eye(n, 2 * n, dtype=torch.bool, device=zt.device)
    sim = sim.masked_fill(self_, float("-inf"))
    return F.cross_entropy(sim, torch.arange(n, n * 2, device=zt.device))


# ------------------------------------------------------------------------------------------- the method
def _blocks(net: nn.Module, role: str) -> list[str]:
    names = list(stage_names(net, role))
    return names[1:] if len(names) > 1 and names[0] == "stem" else names


@register_method("dfkd_fgvc")
class DFKDFGVC(GenerativeMethod):
    """DFKD-FGVC (Shao et al., ICCV 2023; partial: from the paper's text, no official code). The attention
    generator minimises ``bn * L_BN - adv * KD``; the student minimises ``KD + mhad * L_MHAD + sfcl *
    L_SFCL`` with 1x1-conv adapters and two projectors trained beside it. Defaults are the paper's
    (alpha 0.3, beta 10, gamma 8, R 3, lambda 5e-2, 20 generator then 15 student steps, Adam 1e-3 with
    betas (0.5, 0.99), batch 64); the fixed random high-order attention, the H*W-scaled spatial softmax,
    T = 1, tau = 0.5, the projector widths and the generator's scaling to small images are design
    choices, each argued in the module docstring."""

    @rules(order=COUNT, mhad=NON_NEGATIVE, sfcl=NON_NEGATIVE, tau=POSITIVE, sam_lambda=NON_NEGATIVE,
           sam_reduction=COUNT, g_blocks=NON_NEGATIVE, proj_hidden=COUNT, proj_dim=COUNT, beta2=DECAY)
    @dataclass
    class Config(GenerativeConfig):
        """``bn``: the generator's BN-statistics weight (alpha); ``adv``: its weight on ``-L_KD``;
        ``mhad``/``sfcl``: the student's weights (beta, gamma); ``order``: R of the mixed high-order
        attention; ``tau``: SFCL's temperature; ``proj_hidden``/``proj_dim``: the projectors' widths;
        ``sam_lambda``/``sam_reduction``: the generator's attention blend and channel reduction;
        ``g_blocks``: its upsampling blocks (0: by image size); ``beta2``: the generator's Adam beta2."""

        temperature: float = 1.0
        batch_size: int = 64
        nz: int = 256
        ngf: int = 64
        g_steps: int = 20
        s_steps: int = 15
        beta2: float = 0.99
        bn: float = 0.3
        adv: float = 1.0
        mhad: float = 10.0
        sfcl: float = 8.0
        order: int = 3
        tau: float = 0.5
        proj_hidden: int = 256
        proj_dim: int = 128
        sam_lambda: float = 0.05
        sam_reduction: int = 8
        g_blocks: int = 0

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        if cfg.output != "sigmoid" or cfg.conditional:
            raise ConfigError(f"method {cfg.name}: the attention generator is unconditional and emits images in [0, 1] "
                              f"(got output={cfg.output!r}, conditional={cfg.conditional})")
        super().__init__(cfg, student, info)
        t_blocks, s_blocks = _blocks(self.teacher, "teacher"), _blocks(student, "student")
        k = min(len(t_blocks), len(s_blocks))
        self.t_names, self.s_names = t_blocks[-k:], s_blocks[-k:]
        self.t_tap, self.s_tap = FeatureTap(self.teacher, self.t_names), FeatureTap(student, self.s_names)
        self.t_pen, self.s_pen = PenultimateTap(self.teacher), PenultimateTap(student)
        t_shapes, s_shapes = self._probe(self.teacher, self.t_tap), self._probe(student, self.s_tap)
        for n, shape in [*zip(self.t_names, t_shapes), *zip(self.s_names, s_shapes)]:
            if len(shape) != 4:
                raise ConfigError(f"method {cfg.name}: MHAD compares feature maps [N, C, H, W]; block {n!r} gives "
                                  f"{tuple(shape)}")
        self.adapters = nn.ModuleList(nn.Conv2d(s[1], t[1], 1) for s, t in zip(s_shapes, t_shapes))
        self.mha = nn.ModuleList(MixedHighOrderAttention(t[1], cfg.order) for t in t_shapes)
        self.proj_t = projector(self.t_pen.num_features, cfg.proj_hidden, cfg.proj_dim)
        self.proj_s = projector(self.s_pen.num_features, cfg.proj_hidden, cfg.proj_dim)

    def _probe(self, net: nn.Module, tap: FeatureTap) -> list[torch.Size]:
        mode = net.training
        net.eval()
        try:
            with torch.no_grad():
                net(torch.zeros(2, *self.shape))
            return [tap[n].shape for n in tap.names]
        finally:
            net.train(mode)

    def build_generator(self) -> nn.Module:
        cfg = self.cfg
        c, h, _ = self.shape
        return AttentionGenerator(cfg.nz, cfg.ngf, h, c, cfg.g_blocks, cfg.sam_lambda, cfg.sam_reduction)

    def phase_adam(self) -> dict[str, Any]:
        return {**super().phase_adam(), "betas": (self.cfg.beta1, self.cfg.beta2)}

    def student_params(self) -> list[nn.Parameter]:
        return [*self.student.parameters(), *self.adapters.parameters(), *self.proj_t.parameters(),
                *self.proj_s.parameters()]

    # -- the two players ---------------------------------------------------------------------------
    def generator_terms(self, x: Tensor, z: Tensor, y: Tensor, ctx: StepContext) -> dict[str, Tensor]:
        cfg = self.cfg
        t, bn = self.teacher_bn_loss(x)
        s = self.student(x)
        kd = soft_kl(s, t, cfg.temperature)
        return {"loss": cfg.bn * bn - cfg.adv * kd, "bn": bn, "kd": kd}

    def student_batch(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        cfg = self.cfg
        with torch.no_grad():
            ft, t = self.t_pen(x)
            t_maps = [self.t_tap[n] for n in self.t_names]
        fs, s = self.s_pen(x)
        s_maps = [self.s_tap[n] for n in self.s_names]
        pairs = [align_spatial(a(m), tm) for a, m, tm in zip(self.adapters, s_maps, t_maps)]
        kd = soft_kl(s, t, cfg.temperature)
        mhad = mhad_loss(self.mha, [tm for _, tm in pairs], [sm for sm, _ in pairs])
        sfcl = teacher_anchored_infonce(self.proj_t(ft.flatten(1)), self.proj_s(fs.flatten(1)), cfg.tau)
        loss = kd + cfg.mhad * mhad + cfg.sfcl * sfcl
        return {"loss": loss, "kd": kd, "mhad": mhad, "sfcl": sfcl, "agree": train_accuracy(s, t.argmax(1))}

    @torch.no_grad()
    def samples(self, n: int) -> Tensor:
        z, _ = self.draw(n)
        with frozen_bn_stats(self.generator), frozen_spectral_norm(self.generator):
            return self.generator(z).float()

"""CoTTA: continual test-time adaptation with a weight- and augmentation-averaged teacher and stochastic
restore (Wang, Fink, Van Gool & Dai, "Continual Test-Time Domain Adaptation", CVPR 2022).

Also home of :class:`TTAViews`, CoTTA's test-time augmentation on the device, which RoTTA reuses for
its student's strong views.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import COUNT, DECAY, NON_NEGATIVE, POSITIVE, PROBABILITY, rules
from ..methods import MethodConfig, Phase, StepContext, register_method
from ..models.tap import strip_taps
from ..nn import use_batch_stats
from .base import TestTimeMethod

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, torchvision's rgb_to_grayscale


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> HSV with hue in [0, 1) (the hexcone model of colorsys)."""
    r, g, b = x.unbind(1)
    hi, lo = x.amax(1), x.amin(1)
    chroma = hi - lo
    grey = chroma == 0
    safe = torch.where(grey, torch.ones_like(chroma), chroma)
    s = chroma / torch.where(hi == 0, torch.ones_like(hi), hi)
    rc, gc, bc = (hi - r) / safe, (hi - g) / safe, (hi - b) / safe
    h = torch.where(hi == r, bc - gc, torch.where(hi == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(grey, torch.zeros_like(h), (h / 6.0) % 1.0)
    return torch.stack([h, s, hi], 1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of :func:`_rgb_to_hsv`: channel n of (R, G, B) is ``v - v s clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6 h) mod 6`` for n = 5, 3, 1."""
    h, s, v = x.unbind(1)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6.0 * h) % 6.0
        out.append(v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(out, 1)


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    hsv = _rgb_to_hsv(x)
    h = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], 1))


@dataclass(frozen=True)
class TTAViews:
    """CoTTA's test-time views on a batch in [0, 1] (``get_tta_transforms`` of qinenergy/cotta, as RoTTA's
    ``custom_transforms`` repeats it), on the device, with every random draw per image:

    1. colour jitter in a random order per image: brightness ``[0.6, 1.4]``, contrast ``[0.7, 1.3]``,
       saturation ``[0.5, 1.5]``, hue ``[-0.06, 0.06]``, gamma ``[0.7, 1.3]`` (torchvision's adjust_* ops;
       saturation and hue leave a one-channel image unchanged, as torchvision does);
    2. a random affine map about the centre: rotation ``[-15, 15]`` degrees, scale ``[0.9, 1.1]``, an
       integer translation of up to 1/16 of the padded side (the reference pads by half the side with
       edge pixels and crops the centre back: here the warp reads border pixels, bilinear);
    3. a 5-tap Gaussian blur with sigma ``[0.001, 0.5]`` (edge-replicated border);
    4. a horizontal flip with p = 0.5 (``flip``);
    5. Gaussian noise with std ``noise_std`` (0.005), then clipping to [0, 1].

    ``soft`` narrows the ranges (brightness [0.8, 1.2], contrast [0.85, 1.15], saturation
    [0.75, 1.25], hue [-0.03, 0.03], gamma [0.85, 1.15], rotation 8 degrees, scale [0.95, 1.05],
    blur sigma [0.001, 0.25]). The reference applies torchvision transforms to a batch tensor, so one
    draw is shared by the whole batch; here each image draws its own.
    """

    soft: bool = False
    flip: bool = True
    noise_std: float = 0.005

    def ranges(self) -> dict[str, tuple[float, float]]:
        if self.soft:
            return {"brightness": (0.8, 1.2), "contrast": (0.85, 1.15), "saturation": (0.75, 1.25),
                    "hue": (-0.03, 0.03), "gamma": (0.85, 1.15), "degrees": (-8.0, 8.0), "scale": (0.95, 1.05),
                    "sigma": (0.001, 0.25)}
        return {"brightness": (0.6, 1.4), "contrast": (0.7, 1.3), "saturation": (0.5, 1.5), "hue": (-0.06, 0.06),
                "gamma": (0.7, 1.3), "degrees": (-15.0, 15.0), "scale": (0.9, 1.1), "sigma": (0.001, 0.5)}

    def __call__(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.apply(x, self.sample_params(x.shape, generator, x.device))

    def sample_params(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator | None,
                      device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Per image: ``order`` [B, 5] (the jitter ops' order: 0 brightness, 1 contrast, 2 saturation,
        3 hue, 4 gamma), each factor [B], ``angle`` (degrees), ``scale``, ``shift`` [B, 2] (pixels, x
        and y), ``sigma``, ``flip`` (bool) and ``noise`` [B, C, H, W] (standard normal)."""
        b, _, h, w = shape
        dev = generator.device if generator is not None else torch.device(device)

        def uniform(lo: float, hi: float, *size: int) -> Tensor:
            return lo + (hi - lo) * torch.rand((b, *size), generator=generator, device=dev)

        r = self.ranges()
        params = {"order": torch.rand((b, 5), generator=generator, device=dev).argsort(1)}
        for name in ("brightness", "contrast", "saturation", "hue", "gamma"):
            params[name] = uniform(*r[name])
        params["angle"] = uniform(*r["degrees"])
        params["scale"] = uniform(*r["scale"])
        # torchvision RandomAffine: translate=(1/16, 1/16) of the padded image (side + 2 * side // 2)
        u = 2 * torch.rand((b, 2), generator=generator, device=dev) - 1
        params["shift"] = torch.stack([u[:, 0] * ((w + 2 * (w // 2)) / 16.0), u[:, 1] * ((h + 2 * (h // 2)) / 16.0)],
                                      1).round()
        params["sigma"] = uniform(*r["sigma"])
        params["flip"] = (torch.rand(b, generator=generator, device=dev) < 0.5) & self.flip
        params["noise"] = torch.randn(tuple(shape), generator=generator, device=dev)
        return params

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        x = x.float().clamp(0.0, 1.0)
        for slot in range(5):  # over the five jitter slots (static), never over images
            x = self._jitter(x, params["order"][:, slot], params)
        x = self._warp(x, params["angle"], params["scale"], params["shift"])
        x = self._blur(x, params["sigma"])
        x = torch.where(params["flip"].view(-1, 1, 1, 1), x.flip(-1), x)
        return (x + self.noise_std * params["noise"]).clamp(0.0, 1.0)

    @staticmethod
    def _jitter(x: Tensor, op: Tensor, p: dict[str, Tensor]) -> Tensor:
        op = op.view(-1, 1, 1, 1)

        def f(name: str) -> Tensor:
            return p[name].view(-1, 1, 1, 1).to(x.dtype)

        out = torch.where(op == 0, (x * f("brightness")).clamp(0.0, 1.0), x)
        mean = _gray(x).mean((1, 2, 3), keepdim=True)
        out = torch.where(op == 1, (mean + f("contrast") * (x - mean)).clamp(0.0, 1.0), out)
        if x.shape[1] == 3:  # saturation and hue leave a grey image unchanged
            gray = _gray(x)
            out = torch.where(op == 2, (gray + f("saturation") * (x - gray)).clamp(0.0, 1.0), out)
            out = torch.where(op == 3, _adjust_hue(x, p["hue"].to(x.dtype)), out)
        # The reference clamps to [1e-8, 1] before the power (a zero base has no gradient in gamma).
        return torch.where(op == 4, x.clamp(1e-8, 1.0).pow(f("gamma")).clamp(0.0, 1.0), out)

    @staticmethod
    def _warp(x: Tensor, angle: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """Bilinear resampling through ``out = R(angle) * scale * (in - c) + c + shift`` (pixel units)."""
        b, _, h, w = x.shape
        theta = angle.float() * (math.pi / 180.0)
        cos, sin = torch.cos(theta) / scale, torch.sin(theta) / scale
        ys = torch.arange(h, device=x.device, dtype=torch.float32) - (h - 1) / 2.0
        xs = torch.arange(w, device=x.device, dtype=torch.float32) - (w - 1) / 2.0
        ox = xs.view(1, 1, w) - shift[:, 0].view(b, 1, 1)
        oy = ys.view(1, h, 1) - shift[:, 1].view(b, 1, 1)
        c, s = cos.view(b, 1, 1), sin.view(b, 1, 1)
        ix, iy = c * ox + s * oy, -s * ox + c * oy  # the inverse rotation and scale
        # grid_sample's normalised coordinates (align_corners=False): pixel offset / half the side
        grid = torch.stack([ix / (w / 2.0), iy / (h / 2.0)], -1)
        return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)

    @staticmethod
    def _blur(x: Tensor, sigma: Tensor) -> Tensor:
        taps = torch.arange(-2, 3, device=x.device, dtype=torch.float32)
        k = torch.exp(-(taps.view(1, 5) ** 2) / (2.0 * sigma.float().view(-1, 1) ** 2))
        k = (k / k.sum(1, keepdim=True)).to(x.dtype)  # [B, 5]
        h, w = x.shape[-2:]
        padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
        rows = sum(k[:, j].view(-1, 1, 1, 1) * padded[..., j:j + w] for j in range(5))
        return sum(k[:, j].view(-1, 1, 1, 1) * rows[..., j:j + h, :] for j in range(5))


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per-sample ``-sum_c softmax(teacher)_c log softmax(student)_c`` (CoTTA's and RoTTA's consistency loss)."""
    return -(teacher_logits.float().softmax(1) * student_logits.float().log_softmax(1)).sum(1)


class PixelViews(torch.nn.Module):
    """Engine-normalised batches to [0, 1] and back around a [0, 1] augmentation (the source run's mean
    and std; a run without them is taken to be in [0, 1] already)."""

    def __init__(self, augment: TTAViews, info):
        super().__init__()
        self.augment = augment
        c = info.in_channels
        mean = torch.tensor(info.mean or (0.0,) * c, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(info.std or (1.0,) * c, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        pixels = x.float() * self.std + self.mean
        return ((self.augment(pixels, generator) - self.mean) / self.std).to(x.dtype)


@register_method("cotta")
class CoTTA(TestTimeMethod):
    """Wang et al., "Continual Test-Time Domain Adaptation", CVPR 2022 (qinenergy/cotta ``cifar/cotta.py``;
    mariodoebler/test-time-adaptation ``classification/methods/cotta.py``).

    Three copies of the source network normalise every batch with its own BN statistics: the student
    (all parameters trained), its EMA teacher (``momentum`` 0.999) and the frozen source ``anchor``.
    Per test batch:

    - the anchor's mean max-probability ``c``; when ``c < ap`` (0.92) the teacher's logits are averaged
      over ``n_augmentations`` (32) :class:`TTAViews` views, each forwarded as its own batch, else
      the teacher's logits of the batch itself (both are computed and one is picked with
      ``torch.where``, so the choice never reads back to the host);
    - the loss is the soft cross-entropy ``-sum softmax(teacher) log softmax(student)`` (its mean
      over the batch; ``symmetric`` adds the reverse direction, each half-weighted, the ImageNet form);
    - after the optimizer step (Adam, lr 1e-3, betas (0.9, 0.999), no weight decay: AdamW with zero decay
      is Adam) :meth:`after_step` moves the teacher toward the student and then restores every element
      of every student parameter to its source value with probability ``restore`` (0.01), one Bernoulli
      draw per element from ``ctx.generator``.

    The predictions scored are the teacher's (augmentation-averaged where triggered), as in both codes;
    the deployable network is the teacher. Every parameter of the student is restored (the reference
    restores those named ``weight`` or ``bias``, which are all of them in its networks).
    """

    @rules(lr=POSITIVE, momentum=DECAY, restore=PROBABILITY, ap=PROBABILITY, n_augmentations=COUNT,
           noise_std=NON_NEGATIVE)
    @dataclass
    class Config(MethodConfig):
        lr: float = 1e-3
        momentum: float = 0.999
        restore: float = 0.01
        ap: float = 0.92
        n_augmentations: int = 32
        symmetric: bool = False
        soft: bool = False
        flip: bool = True
        noise_std: float = 0.005

    def __init__(self, cfg, student, info):
        super().__init__(cfg, student, info)
        student.requires_grad_(True)
        self.add_ema_teacher("teacher", "student", cfg.momentum)
        self.add_teacher("anchor", strip_taps(copy.deepcopy(student)))
        self.views = PixelViews(TTAViews(soft=cfg.soft, flip=cfg.flip, noise_std=cfg.noise_std), info)

    def phases(self) -> list[Phase]:
        return [Phase("main", list(self.student.parameters()),
                      optim={"name": "adamw", "lr": self.cfg.lr, "betas": (0.9, 0.999), "weight_decay": 0.0})]

    def prepare(self) -> None:
        self.eval()
        for net in (self.student, self.teacher, self.anchor):
            use_batch_stats(net)

    def deployable(self):
        return self.teacher

    @torch.no_grad()
    def teacher_views(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """The teacher's logits averaged over ``n_augmentations`` views of ``x`` (one forward per view, so
        each view is normalised with its own batch statistics, as in the reference)."""
        total = None
        for _ in range(self.cfg.n_augmentations):  # over the views (a fixed count), never over images
            logits = self.teacher(self.views(x, generator)).float()
            total = logits if total is None else total + logits
        return total / self.cfg.n_augmentations

    def adapt_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        x = batch["x"]
        student = self.student(x)
        with torch.no_grad():
            confidence = self.anchor(x).float().softmax(1).amax(1).mean()
            plain = self.teacher(x).float()
            averaged = self.teacher_views(x, ctx.generator)
            augmented = confidence < self.cfg.ap
            teacher = torch.where(augmented, averaged, plain)
        loss = soft_cross_entropy(student, teacher)
        if self.cfg.symmetric:
            loss = 0.5 * loss + 0.5 * soft_cross_entropy(teacher, student)
        loss = loss.mean()
        return {"logits": teacher, "loss": loss, "anchor_confidence": confidence, "augmented": augmented.float()}

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        super().after_step(ctx)  # the EMA teacher, from the updated student
        self.stochastic_restore(ctx.generator)

    @torch.no_grad()
    def stochastic_restore(self, generator: torch.Generator | None) -> None:
        """Reset each element of each student parameter to the anchor's (source) value with probability
        ``restore``: one uniform draw per element, all parameters in one draw."""
        if self.cfg.restore <= 0:
            return
        params = list(self.student.parameters())
        sources = list(self.anchor.parameters())
        total = sum(p.numel() for p in params)
        draws = torch.rand(total, generator=generator, device=params[0].device)
        for p, src, u in zip(params, sources, draws.split([p.numel() for p in params])):
            p.copy_(torch.where(u.view_as(p) < self.cfg.restore, src, p))

"""DFDG: Luo et al., "DFDG: Data-Free Dual-Generator Adversarial Distillation for One-Shot Federated
Learning", arXiv 2409.07734, 2024 (lkyddd/DFDG, ``LightFed/experiments/horizontal/DFDG/manager.py``),
in its single-server form: one frozen teacher in place of the clients' label-weighted ensemble.

Two class-conditional generators ``G1`` and ``G2`` (:class:`ACGenerator`, the reference's
``Generator_ACGan``) are trained in turn, each against the other frozen, then the student learns from both.
Every iteration draws one batch of codes and classes ``(z, y)``, ``y ~ U(K)``, kept for the whole iteration:
``g_steps`` steps of ``G1`` on it, ``g_steps`` steps of ``G2`` (on the same codes, or on codes of its own with
``dual_noise``), then ``s_steps`` student steps on both generators' images of those codes. With ``t`` the
teacher's logits, ``s`` the student's, ``tau`` the temperature, a generator's loss is::

    L_G = oh * CE(t, y) - adv * L_tran + div * L_div - cd * L_cd

* fidelity ``CE(t, y)``: the teacher classifies the images as their class;
* transferability :func:`transfer_kl`: ``KL(p_S^tau || p_T^tau)`` on the images the teacher gets right and the
  student gets wrong, the student's side detached, maximised;
* diversity :func:`diversity_loss`: ``exp(-mean_ij d(h_i, h_j) * d(x_i, x_j))`` with ``d`` the mean squared
  difference, ``h`` the generator's label-modulated code and ``x`` its Tanh output;
* cross-divergence :func:`cross_divergence`: ``KL`` from the teacher's distribution on the other generator's
  images (detached) to that on this generator's, over all pairs of images (or the pairs of one class with
  ``cd_same_label``), maximised, so the two generators cover different regions.

The student minimises ``tau^2 * KL(p_T^tau || p_S^tau)`` on ``G1``'s images plus the same on ``G2``'s (batch
means). The reference leaves out the ``tau^2`` factor (``tau_squared: false``): its server model is trained
for a round of a federated run at a small rate, whereas here the student starts from scratch like every
other data-free student, and at ``tau`` 10 the unscaled KL's gradient is a hundredth of the usual one. The
recipe gives it the family's student SGD. (On the CPU benchmark's short budget the student stays near chance
either way: docs/BENCHMARKS.md.)

Defaults are the README's command (``--batch_size 64 --I_g 20 --I_d 2 --eta_g 2e-4 --b1 0.5 --b2 0.999
--beta_tran 1 --beta_div 1 --beta_cd 1 --latent_dim 100 --noise_label_combine mul --tran_strategy 1
--condition_ False``) and ``param_config.py`` (temperature 10, ``dual_noise`` off); the student's SGD (0.01,
momentum 0.9, wd 1e-4, constant) is the recipe's. As in the reference, the other generator and the student
run in eval mode during a generator's step (running statistics, nothing updated) and both generators in
eval mode during the student's; each generator's window starts from a fresh Adam (the reference builds one
per call); there is no BN-statistics term.

Where this differs from the reference: the federated version draws ``y`` from the clients' pooled label
counts and weights each client's logits by its share of class ``y``; here classes are uniform and the
teacher is one network. The generators' Tanh output in [-1, 1] is mapped to an image ``(x + 1) / 2`` and
normalised like the teacher's data before the networks see it (the reference feeds the Tanh output as it
is); the diversity term reads the Tanh output, as there. The reference's transferability and
cross-divergence means divide by the number of selected samples or pairs and give NaN when there are none;
here they are 0 then. The label-embedding hinge ``L_ey`` the reference computes but never adds is left
out. The student's SGD keeps its momentum across windows (the reference rebuilds it every call, i.e.
every 2 steps; ``fresh_student`` does that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import NON_NEGATIVE, ConfigError, rules
from ..methods import BuildInfo, Phase, StepContext, register_method
from ..nn import kl_div, train_accuracy
from ..nn.norm import evaluating
from .base import GenerativeConfig, GenerativeMethod
from .generators import dcgan_init


class ACGenerator(nn.Module):
    """``G(z, y) -> images`` in [-1, 1] of ``channels x size x size``: the code ``h = z * E[y]`` (a learnt label
    embedding, N(0, 1) at start, multiplied with the noise), read as a ``nz x 1 x 1`` map, then a transposed
    convolution to ``8*ngf`` channels at the initial size and ReLU, stride-2 transposed convolutions (kernel 4)
    halving the width with BN and ReLU, and a last one to the image channels with Tanh.

    At 32 px this is the reference's ``Generator_ACGan`` (``ngf`` 64: 512 at 4x4, 256 at 8x8, 128 at 16x16,
    then 3 channels at 32x32); at 64 px its Tiny-ImageNet branch. Other sizes take as many stride-2 stages
    as keep the size a multiple of their power of 2 with an initial map of at least 4 pixels (28 px: 7x7
    then two stages; the reference resizes Fashion-MNIST to 32), at least one; the initial map is
    ``ceil(size / 2^stages)`` and the image is cropped to ``size``. Weights as the reference's ``weights_init``
    (DCGAN: convolutions N(0, 0.02), BN gains N(1, 0.02)); no convolution has a bias."""

    def __init__(self, nz: int, num_classes: int, size: int, channels: int, ngf: int = 64):
        super().__init__()
        stages = 1
        while size % 2 ** (stages + 1) == 0 and size // 2 ** (stages + 1) >= 4:
            stages += 1
        self.nz, self.size, self.channels = nz, size, channels
        self.init_size = math.ceil(size / 2 ** stages)
        self.embedding = nn.Embedding(num_classes, nz)
        width = 8 * ngf
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, width, self.init_size, 1, 0, bias=False), nn.ReLU()]
        for _ in range(stages - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2),
                       nn.ReLU()]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init(self.net)

    def code(self, z: Tensor, y: Tensor) -> Tensor:
        """The label-modulated code ``h = z * E[y]`` the generator decodes (the diversity term reads it)."""
        return z * self.embedding(y)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.code(z, y)
        return self.net(h[:, :, None, None])[:, :, : self.size, : self.size]


def transfer_kl(s: Tensor, t: Tensor, y: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """DFDG's transferability: ``KL(softmax(s/tau) || softmax(t/tau))``, the student's side detached, averaged
    over the samples the teacher classifies as ``y`` and the student does not (0 when there are none); the
    generator maximises it, moving the teacher's belief away from the student's where the student has
    still to learn. Returns the mean and the fraction of samples selected."""
    mask = ((t.argmax(1) == y) & (s.argmax(1) != y)).float()
    log_p_s = F.log_softmax(s.detach().float() / temperature, 1)
    log_p_t = F.log_softmax(t.float() / temperature, 1)
    per = kl_div(log_p_t, log_p_s, reduction="none")  # KL(p_s || p_t)
    return (per * mask).sum() / mask.sum().clamp_min(1.0), mask.mean()


def pairwise_msd(v: Tensor) -> Tensor:
    """``D[i, j] = mean_d (v_i - v_j)^2`` over the flattened rows of ``v``."""
    v = v.float().flatten(1)
    sq = v.pow(2).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * v @ v.T).clamp_min(0) / v.shape[1]


def diversity_loss(h: Tensor, x: Tensor) -> Tensor:
    """DENSE's / FedFTG's ``DiversityLoss`` (``metric='l2'``) as DFDG uses it: ``exp(-mean_ij D_h[i, j] *
    D_x[i, j])`` over all ordered pairs (the diagonal's zeros included), with ``D`` the mean squared difference
    of the codes ``h`` and of the images ``x``; minimising it spreads images whose codes differ."""
    return torch.exp(-(pairwise_msd(h) * pairwise_msd(x)).mean())


def cross_divergence(t: Tensor, t_other: Tensor, y: Tensor, y_other: Tensor, temperature: float,
                     same_label: bool) -> Tensor:
    """``mean_(i, j) KL(softmax(t_other_j/tau) || softmax(t_i/tau))`` over all pairs ``(i, j)`` of this
    generator's and the other generator's images, or over those with ``y_i == y_other_j`` (0 when there are
    none); ``t_other`` carries no gradient. The generator maximises it."""
    log_q = F.log_softmax(t.float() / temperature, 1)
    log_p = F.log_softmax(t_other.detach().float() / temperature, 1)
    p = log_p.exp()
    # KL(p_j || q_i) = sum_c p_jc log p_jc - sum_c p_jc log q_ic
    kl = (p * log_p).sum(1)[None, :] - log_q @ p.T
    if not same_label:
        return kl.mean()
    pairs = (y[:, None] == y_other[None, :]).float()
    return (kl * pairs).sum() / pairs.sum().clamp_min(1.0)


@register_method("dfdg")
class DFDG(GenerativeMethod):
    @rules(div=NON_NEGATIVE, cd=NON_NEGATIVE)
    @dataclass
    class Config(GenerativeConfig):
        """``oh``: weight of the fidelity term (1 in the reference); ``adv``: beta_tran, of the transferability
        term; ``div``: beta_div; ``cd``: beta_cd; ``cd_same_label``: the cross-divergence over pairs of one
        class only (the reference's ``condition_``); ``dual_noise``: ``G2`` draws codes and classes of its
        own; ``g_steps`` steps per generator and ``s_steps`` student steps per iteration (``I_g``, ``I_d``);
        ``fresh_student``: a new student optimizer state at every student window, as the reference."""

        batch_size: int = 64
        temperature: float = 10.0
        nz: int = 100
        ngf: int = 64
        lr_g: float = 2e-4
        beta1: float = 0.5
        g_steps: int = 20
        s_steps: int = 2
        conditional: bool = True
        oh: float = 1.0
        adv: float = 1.0
        div: float = 1.0
        cd: float = 1.0
        cd_same_label: bool = False
        dual_noise: bool = False
        fresh_student: bool = False
        tau_squared: bool = True

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        if not cfg.conditional or cfg.bn > 0 or cfg.output != "sigmoid":
            raise ConfigError(f"method {cfg.name}: DFDG's generators are class-conditional, end with Tanh (mapped to "
                              f"[0, 1] images) and have no BN-statistics term; got conditional={cfg.conditional}, "
                              f"bn={cfg.bn}, output={cfg.output}: leave these at their defaults")
        super().__init__(cfg, student, info)
        self.generator2 = self.build_generator()
        b, nz = cfg.batch_size, cfg.nz
        for i in (1, 2):
            self.register_buffer(f"z{i}", torch.zeros(b, nz))
            self.register_buffer(f"y{i}", torch.zeros(b, dtype=torch.long))

    def build_generator(self) -> nn.Module:
        c, h, _ = self.shape
        return ACGenerator(self.cfg.nz, self.info.num_classes, h, c, self.cfg.ngf)

    @property
    def period(self) -> int:
        return 2 * self.cfg.g_steps + self.cfg.s_steps

    @classmethod
    def steps_for(cls, cfg, student_steps: int) -> int:
        return -(-student_steps // cfg.s_steps) * (2 * cfg.g_steps + cfg.s_steps)

    def phases(self) -> list[Phase]:
        cfg, p = self.cfg, self.period
        const = {"name": "constant", "warmup_steps": 0}
        return [Phase("gen1", list(self.generator.parameters()), every=p, span=cfg.g_steps, fresh=True,
                      optim=self.phase_adam(), schedule=const),
                Phase("gen2", list(self.generator2.parameters()), every=p, offset=cfg.g_steps, span=cfg.g_steps,
                      fresh=True, optim=self.phase_adam(), schedule=const),
                Phase("student", self.student_params(), every=p, offset=2 * cfg.g_steps, span=cfg.s_steps,
                      fresh=cfg.fresh_student)]

    # -- the iteration's codes ---------------------------------------------------------------------
    @torch.no_grad()
    def redraw(self, step: int | Tensor) -> None:
        """At the first step of an iteration, new codes and classes for it (``G2``'s the same unless
        ``dual_noise``); drawn every call and kept only then, so no value is read back to the host."""
        first = torch.as_tensor(step % self.period == 0, device=self.z1.device)
        b = self.cfg.batch_size
        z1, y1 = torch.randn_like(self.z1), self.random_labels(b)
        z2, y2 = (torch.randn_like(self.z2), self.random_labels(b)) if self.cfg.dual_noise else (z1, y1)
        for buf, new in ((self.z1, z1), (self.y1, y1), (self.z2, z2), (self.y2, y2)):
            buf.copy_(torch.where(first, new, buf))

    def images(self, g: nn.Module, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """A generator's Tanh output and what the networks see of it (``(x + 1) / 2``, normalised)."""
        out = g(z, y)
        return out, self.view((out + 1) / 2)

    # -- the steps ---------------------------------------------------------------------------------
    def generator_step(self, g: nn.Module, other: nn.Module, z: Tensor, y: Tensor, z_o: Tensor,
                       y_o: Tensor) -> dict[str, Tensor]:
        cfg = self.cfg
        out, x = self.images(g, z, y)
        t = self.teacher(x)
        with torch.no_grad(), evaluating(self.student, other):
            s = self.student(x)
            t_o = self.teacher(self.images(other, z_o, y_o)[1])
        fid = F.cross_entropy(t.float(), y)
        tran, rate = transfer_kl(s, t, y, cfg.temperature)
        div = diversity_loss(g.code(z, y), out)
        cd = cross_divergence(t, t_o, y, y_o, cfg.temperature, cfg.cd_same_label)
        loss = cfg.oh * fid - cfg.adv * tran + cfg.div * div - cfg.cd * cd
        return {"loss": loss, "fid": fid, "tran": tran, "div": div, "cd": cd, "tran_rate": rate,
                "t_acc": train_accuracy(t, y)}

    def kd(self, s: Tensor, t: Tensor) -> Tensor:
        """``tau^2 * KL(p_T^tau || p_S^tau)``, batch mean (without ``tau^2`` with ``tau_squared: false``, as the
        reference)."""
        tau = self.cfg.temperature
        kl = kl_div(F.log_softmax(s.float() / tau, 1), F.log_softmax(t.float() / tau, 1))
        return kl * (tau * tau) if self.cfg.tau_squared else kl

    def student_step(self) -> dict[str, Tensor]:
        with torch.no_grad(), evaluating(self.generator, self.generator2):
            x1 = self.images(self.generator, self.z1, self.y1)[1]
            x2 = self.images(self.generator2, self.z2, self.y2)[1]
            t1, t2 = self.teacher(x1), self.teacher(x2)
            self.synthesised += x1.shape[0] + x2.shape[0]
        s1, s2 = self.student(x1), self.student(x2)
        kl1, kl2 = self.kd(s1, t1), self.kd(s2, t2)
        agree = 0.5 * (train_accuracy(s1, t1.argmax(1)) + train_accuracy(s2, t2.argmax(1)))
        return {"loss": kl1 + kl2, "kl1": kl1, "kl2": kl2, "agree": agree}

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        if ctx.phase == "gen1":
            self.redraw(ctx.step)
            return self.generator_step(self.generator, self.generator2, self.z1, self.y1, self.z2, self.y2)
        if ctx.phase == "gen2":
            return self.generator_step(self.generator2, self.generator, self.z2, self.y2, self.z1, self.y1)
        return self.student_step()

    @torch.no_grad()
    def samples(self, n: int) -> Tensor:
        """``n`` images, the first half from ``G1`` and the rest from ``G2``, classes in turn, in eval mode (as
        the student sees them)."""
        z = torch.randn(n, self.cfg.nz, device=self.z1.device)
        y = torch.arange(n, device=z.device) % self.info.num_classes
        h = (n + 1) // 2
        with evaluating(self.generator, self.generator2):
            out = torch.cat([self.generator(z[:h], y[:h]), self.generator2(z[h:], y[h:])])
        return ((out + 1) / 2).float()

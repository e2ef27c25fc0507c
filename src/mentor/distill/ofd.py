"""A Comprehensive Overhaul of Feature Distillation: pre-ReLU features, a margin ReLU on the teacher's side, a
partial L2 distance."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import COUNT, ConfigError, rules
from ..methods import BuildInfo, register_method
from ..models import FeatureTap, final_activation
from ..nn.projectors import conv_block
from .fitnet import FeatureDistiller, FeatureKDConfig, pair_stages
from .losses.margin import ofd_loss, ofd_margin

SKIP_BRANCHES = ("shortcut", "downsample")


def _first_leaf(module: nn.Module) -> nn.Module:
    leaves = [m for m in module.modules() if not any(True for _ in m.children())]
    return leaves[0] if leaves else module


def bn_before_relu(model: nn.Module, name: str) -> nn.BatchNorm2d:
    """The BN layer whose output feeds the final ReLU of ``model``'s module ``name`` (a stage).

    The rule, for zoo networks and any that follows their conventions:

    1. the stage's final activation (:func:`~mentor.models.final_activation`) is found; within the module
       that holds it (a residual block, or the ``Sequential`` of a conv-BN-ReLU group), the BN is the
       last ``BatchNorm2d`` registered before it, outside a ``shortcut``/``downsample`` branch: ``bn2``
       of the last basic block of a ResNet stage (the residual branch, as mdistiller's
       ``get_bn_before_relu``), the group's last BN in VGG, the closing BN of WRN's ``layer3``;
    2. a stage with no final activation (the pre-activation blocks of WRN's ``layer1``/``layer2``) is
       normalised and activated at the start of the next stage: the BN is that stage's first module
       when it is a ``BatchNorm2d`` (WRN's ``bn1``, as mdistiller's WRN rule);
    3. otherwise :class:`~mentor.errors.ConfigError`: name the layers in ``method.teacher_bns``.
    """
    modules = dict(model.named_modules())
    stage = modules[name]
    act = final_activation(stage)
    if act is not None:
        owner = next((m for m in stage.modules() if any(c is act for c in m.children())), act)
        found = None
        for path, m in owner.named_modules():
            if m is act:
                break
            if isinstance(m, nn.BatchNorm2d) and not set(path.split(".")) & set(SKIP_BRANCHES):
                found = m
        if found is not None:
            return found
    else:
        names = list(getattr(model, "stage_names", ()) or ())
        if name in names and names.index(name) + 1 < len(names):
            first = _first_leaf(modules[names[names.index(name) + 1]])
            if isinstance(first, nn.BatchNorm2d):
                return first
    raise ConfigError(f"ofd: found no BN layer before the final ReLU of the teacher's {name!r} (see "
                      "mentor.distill.ofd.bn_before_relu for the rule); name one BatchNorm2d per teacher layer in "
                      "method.teacher_bns, e.g. [layer1.2.bn2, layer2.2.bn2, layer3.2.bn2]")


def connector(c_s: int, c_t: int, kernel: int = 1) -> nn.Sequential:
    """OFD's connector: conv (no bias) -> BN, the conv drawn from N(0, 2 / (k^2 C_t)) (He, fan-out), BN = identity."""
    layers = nn.Sequential(*conv_block(c_s, c_t, kernel, act=False))
    nn.init.kaiming_normal_(layers[0].weight, mode="fan_out", nonlinearity="relu")
    return layers


@register_method("ofd")
class OFD(FeatureDistiller):
    """OFD (Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive Overhaul of Feature Distillation", ICCV 2019).

    At each paired stage the student's pre-ReLU map goes through a connector (:func:`connector`: 1x1 conv
    + BN) and the teacher's pre-ReLU map (average-pooled to the student's resolution) through the margin
    ReLU ``max(x, m)``, ``m`` per channel from the teacher's BN before that ReLU (:func:`bn_before_relu`,
    :func:`~mentor.distill.losses.ofd_margin`); the loss is the partial L2
    :func:`~mentor.distill.losses.ofd_loss`, the deepest stage weighted 1, each shallower one half.

    Defaults as mdistiller (``OFD.py``, ``CFG.OFD``): the stages after the stem (``preact_feats[1:]``, the
    last ``min(K_s, K_t)`` when the numbers differ), CE 1, no KL, ``beta`` = 1e-3 (the official code's
    ``/ 1000``), connector kernel 1. ``teacher_bns`` names the BN layers (one per teacher layer) where the
    rule finds none. The teacher stays in eval mode: mdistiller and the official code run it in train
    mode (batch statistics, its running statistics updated), which a frozen teacher here never is.
    """

    @rules(kernel_size=COUNT)
    @dataclass
    class Config(FeatureKDConfig):
        beta: float = 1e-3
        kernel_size: int = 1
        layers: list[str] = field(default_factory=list)
        teacher_layers: list[str] = field(default_factory=list)
        teacher_bns: list[str] = field(default_factory=list)

    term = "ofd"

    def __init__(self, cfg: Config, student: nn.Module, info: BuildInfo):
        if cfg.kernel_size < 1 or cfg.kernel_size % 2 == 0:
            raise ConfigError(f"ofd: method.kernel_size must be an odd number >= 1 (1 in the reference), got "
                              f"{cfg.kernel_size}")
        super().__init__(cfg, student, info)
        # Both networks' pre-ReLU maps (the reference's preact_feats).
        self.s_tap.remove()
        self.t_tap.remove()
        self.s_tap = FeatureTap(student, self.s_names, pre_activation=True)
        self.t_tap = FeatureTap(self.teacher, self.t_names, pre_activation=True)
        bns = list(cfg.teacher_bns)
        if bns and len(bns) != len(self.t_names):
            raise ConfigError(f"ofd: method.teacher_bns names {len(bns)} layers for {len(self.t_names)} teacher "
                              f"layers {self.t_names}; name one BatchNorm2d per layer")
        modules = dict(self.teacher.named_modules())
        for b in bns:
            if not isinstance(modules.get(b), nn.BatchNorm2d):
                raise ConfigError(f"ofd: method.teacher_bns entry {b!r} is not a BatchNorm2d of the teacher")
        self.bns = [modules[b] for b in bns] or [bn_before_relu(self.teacher, n) for n in self.t_names]

    def layers(self) -> tuple[list[str], list[str]]:
        c = self.cfg
        return pair_stages(self.method_name, self.student, self.teacher, c.layers, c.teacher_layers, align="last")

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        for name, shape, role in [*zip(self.s_names, student_shapes, ["student"] * len(student_shapes)),
                                  *zip(self.t_names, teacher_shapes, ["teacher"] * len(teacher_shapes))]:
            if len(shape) != 4:
                raise ConfigError(f"ofd: the {role} layer {name!r} outputs {tuple(shape)}, not a feature map "
                                  "[B, C, H, W]; name convolutional stages in method.layers / method.teacher_layers")
        for name, shape, bn in zip(self.t_names, teacher_shapes, self.bns):
            if bn.num_features != shape[1]:
                raise ConfigError(f"ofd: the BN layer chosen for the teacher's {name!r} has {bn.num_features} "
                                  f"channels, the layer's pre-ReLU map {shape[1]}; name the right one in "
                                  "method.teacher_bns")
        self.connectors = nn.ModuleList(connector(s[1], t[1], self.cfg.kernel_size)
                                        for s, t in zip(student_shapes, teacher_shapes))
        for i, bn in enumerate(self.bns):
            # Constants of the frozen teacher, recomputed at every setup: not part of the checkpoint.
            self.register_buffer(f"margin{i}", ofd_margin(bn.weight, bn.bias), persistent=False)

    def margins(self) -> list[torch.Tensor]:
        """The margin of each teacher layer, ``[C_t]``."""
        return [getattr(self, f"margin{i}") for i in range(len(self.bns))]

    def feature_loss(self, fs, ft, batch):
        return ofd_loss([c(f) for c, f in zip(self.connectors, fs)], ft, self.margins()), {}

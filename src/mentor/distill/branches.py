"""Multi-branch networks built from any zoo model: a shared trunk and several copies of its last stages.

Online distillation trains several peers at once. ONE, OKDDip and their successors (Lan et al.,
"Knowledge Distillation by On-the-Fly Native Ensemble", NeurIPS 2018; Chen et al., "Online Knowledge
Distillation with Diverse Peers", AAAI 2020) share the low layers and give every peer its own copy of
the last stage and classifier; Deep Mutual Learning (Zhang et al., CVPR 2018) shares nothing.
:class:`MultiBranchNet` builds both from any network that follows the zoo naming
(``stage_names``, an optional ``head``, ``pool``, ``fc``; see :class:`mentor.models.StagedNet`).

Every branch is itself a complete network of the zoo model's shape: the trunk stages are the *same*
module objects in every branch, the branch stages are that branch's own. A branch's ``forward`` is
therefore the ordinary zoo forward, its ``state_dict`` has the zoo model's keys (a branch can be
shipped, evaluated or loaded as a teacher like any trained model), and :meth:`MultiBranchNet.forward`
runs the trunk once per batch for all branches.
"""

import copy
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..models import stage_names


class BranchOutputs(NamedTuple):
    """One forward pass of every branch: the map entering ``pool`` (a list, one ``[B, D, H, W]`` per
    branch), the pooled features ``[K, B, D]`` and the logits ``[K, B, C]``."""

    maps: list[Tensor]
    features: Tensor
    logits: Tensor


def reinitialise(module: nn.Module) -> None:
    """Draw every parameter of ``module`` afresh (and reset BN statistics).

    Convolutions get the zoo's He-normal fan-out initialisation (``mentor.models.common.init_reference``);
    every other module with parameters or buffers its own ``reset_parameters()`` (BN: identity with
    reset statistics; Linear: PyTorch's default, which for VGG/MobileNetV2 classifiers differs from
    the zoo's N(0, 0.01)).
    """
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif callable(getattr(m, "reset_parameters", None)) and (
                any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))):
            m.reset_parameters()


class MultiBranchNet(nn.Module):
    """``num_branches`` networks that share ``model``'s first stages and own copies of its last ones.

    Args:
        model: a zoo-style network; it becomes branch ``keep`` unchanged (its weights and its
            initialisation are kept, so the branch a method ships starts from the same network as a
            plain supervised run with the same seed).
        num_branches: number of branches (peers), at least 1.
        branch_stages: how many of the last ``stage_names`` each branch owns; the stages before form
            the shared trunk. ``1`` is ONE/OKDDip (trunk = stem .. layer{K-1}, branch = layer{K});
            ``None`` (or the number of stages) shares nothing, i.e. independent networks as in DML.
            A ``head`` (the 1x1 conv some nets apply before pooling), ``pool`` and ``fc`` always belong
            to the branch.
        keep: the index at which ``model`` itself sits (negative counts from the end).

    The other branches are deep copies of ``model`` whose own stages are re-initialised
    (:func:`reinitialise`): branches start from independent draws, not identical copies, because
    identical peers receive identical gradients from a shared target and only diverge through noise.
    """

    def __init__(self, model: nn.Module, num_branches: int, branch_stages: int | None = 1, keep: int = 0):
        super().__init__()
        stages = stage_names(model, "model to split into branches", ("pool", "fc"))
        n = len(stages) if branch_stages is None else branch_stages
        if not 1 <= n <= len(stages):
            raise ConfigError(f"method.branch_stages must be in 1..{len(stages)} for {type(model).__name__} "
                              f"(stages {', '.join(stages)}), got {branch_stages}")
        if num_branches < 1:
            raise ValueError(f"num_branches must be >= 1, got {num_branches}")
        self.trunk_names = stages[:len(stages) - n]
        self.branch_names = stages[len(stages) - n:] + (("head",) if isinstance(getattr(model, "head", None),
                                                                                  nn.Module) else ())
        self.keep = keep % num_branches
        branches = []
        for i in range(num_branches):
            if i == self.keep:
                branches.append(model)
                continue
            net = copy.deepcopy(model)
            for name in self.trunk_names:
                setattr(net, name, getattr(model, name))  # shared: the same module object
            for name in (*self.branch_names, "fc"):
                reinitialise(getattr(net, name))
            branches.append(net)
        self.branches = nn.ModuleList(branches)
        self.num_features: int = getattr(model, "num_features", None) or model.fc.in_features

    def __len__(self) -> int:
        return len(self.branches)

    def trunk(self, x: Tensor) -> Tensor:
        first = self.branches[0]
        for name in self.trunk_names:
            x = getattr(first, name)(x)
        return x

    def forward(self, x: Tensor) -> BranchOutputs:
        h = self.trunk(x)
        maps, features, logits = [], [], []
        for net in self.branches:
            y = h
            for name in self.branch_names:
                y = getattr(net, name)(y)
            f = net.pool(y)
            maps.append(y)
            features.append(f)
            logits.append(net.fc(f))
        return BranchOutputs(maps, torch.stack(features), torch.stack(logits))


class Head(nn.Module):
    """A network for :meth:`mentor.methods.Method.eval_heads` made from a function of the input (an
    ensemble or fused prediction that needs every branch); it holds no parameters of its own."""

    def __init__(self, fn):
        super().__init__()
        self._fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self._fn(x)


__all__ = ["BranchOutputs", "Head", "MultiBranchNet", "reinitialise"]

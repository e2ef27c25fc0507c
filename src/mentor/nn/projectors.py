"""Projectors: small trainable networks that map one feature space onto another.

Distillation connectors (FitNets' regressor, SimKD's projector, SemCKD's per-pair regressors,
CA-MKD's and MMKD's embeds), fusion modules and query/key or weight heads are all made of the two
shapes below: a stack of conv -> BN -> ReLU blocks on feature maps, and a two-layer MLP on vectors.
Modules are created in the order they are applied, so a network built from these draws its initial
weights in that order from the global generator.
"""

from __future__ import annotations

from torch import nn


def conv_block(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, *, groups: int = 1, bias: bool = False,
               norm: bool = True, act: bool = True, transposed: bool = False) -> list[nn.Module]:
    """conv -> [BN] -> [ReLU], as a list of modules to splice into an ``nn.Sequential``.

    The conv is padded so that it keeps the resolution at stride 1 (``kernel // 2``) and divides it
    by ``stride`` otherwise (rounding up); ``transposed`` makes it a transposed conv that multiplies
    the resolution by ``stride`` exactly (padding ``(kernel - stride) // 2``). ``bias`` defaults to
    off, as a BN follows; the ReLU is not in place (feature taps may read its input).
    """
    if transposed:
        conv: nn.Module = nn.ConvTranspose2d(c_in, c_out, kernel, stride=stride, padding=(kernel - stride) // 2,
                                             groups=groups, bias=bias)
    else:
        conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=bias)
    return [conv, *([nn.BatchNorm2d(c_out)] if norm else []), *([nn.ReLU()] if act else [])]


def conv_projector(c_in: int, c_out: int, mid: int | None = None, *, bias: bool = False, out_norm: bool = True,
                   out_act: bool = True) -> nn.Sequential:
    """A feature-map projector ``[B, c_in, H, W] -> [B, c_out, H, W]``.

    Without ``mid``: conv1x1 -> BN -> ReLU. With ``mid``: the bottleneck conv1x1 (``c_in -> mid``)
    -> BN -> ReLU -> conv3x3 (``mid -> mid``) -> BN -> ReLU -> conv1x1 (``mid -> c_out``) -> BN ->
    ReLU, the projector of SimKD (Chen et al., "Knowledge Distillation with the Reused Teacher
    Classifier", CVPR 2022) and SemCKD (Chen et al., "Cross-Layer Distillation with Semantic
    Calibration", AAAI 2021). ``out_norm``/``out_act`` drop the last BN/ReLU (for a target that is
    any real-valued map); ``bias`` gives every conv a bias.
    """
    last = dict(bias=bias, norm=out_norm, act=out_act)
    if mid is None:
        return nn.Sequential(*conv_block(c_in, c_out, 1, **last))
    return nn.Sequential(*conv_block(c_in, mid, 1, bias=bias), *conv_block(mid, mid, 3, bias=bias),
                         *conv_block(mid, c_out, 1, **last))


def mlp(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    """Linear(``c_in -> hidden``) -> ReLU -> Linear(``hidden -> c_out``): the two-layer head of
    query/key embeddings and weight networks."""
    return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, c_out))


__all__ = ["conv_block", "conv_projector", "mlp"]

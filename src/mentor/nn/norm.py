"""Batch-normalisation controls shared by the families: freezing running statistics for a forward
pass, and normalising with the statistics of the batch at hand (test-time)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def bn_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, BN_TYPES)]


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """A forward pass in training mode whose batch statistics normalise the batch but do not enter the
    running statistics (USB's ``bn_controller`` freeze for unlabelled forwards). Momentum 0 leaves the
    running mean and variance as they are without a host-side copy, so it works in a captured step."""
    layers = [m for m in bn_layers(module) if m.track_running_stats and m.momentum is not None]
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(layers, saved):
            m.momentum = mom


def use_batch_stats(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode except its BN layers, which then normalise with the statistics of
    each batch (test-batch normalisation: Schneider et al., "Improving robustness against common
    corruptions by covariate shift adaptation", NeurIPS 2020; Nado et al., 2020)."""
    module.eval()
    for m in bn_layers(module):
        m.train()
    return module


NORM_TYPES = (*BN_TYPES, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)


def norm_kinds(module: nn.Module) -> list[str]:
    """The class names of the normalisation layers in ``module`` (for error messages)."""
    return sorted({type(m).__name__ for m in module.modules() if isinstance(m, NORM_TYPES)})


def require_bn(module: nn.Module, method: str) -> None:
    """Stop with a clear message when ``method`` needs BatchNorm layers and ``module`` has none."""
    if bn_layers(module):
        return
    from ..errors import ConfigError

    kinds = norm_kinds(module)
    has = f"its normalisation layers are {', '.join(kinds)}" if kinds else "it has no normalisation layer"
    raise ConfigError(f"method {method} adapts BatchNorm layers (their statistics or affine parameters), but the "
                      f"network {type(module).__name__} has none: {has}. Adapt a network with BatchNorm (a ResNet "
                      "of the zoo), or a method that adapts any normalisation layer")


def norm_affine(module: nn.Module, kinds: tuple[type[nn.Module], ...] = BN_TYPES) -> list[nn.Parameter]:
    """The affine weights and biases of the normalisation layers of ``kinds`` (tent's trainable set), in
    module order."""
    params: list[nn.Parameter] = []
    for m in module.modules():
        if isinstance(m, kinds):
            params += [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if p is not None]
    return params


def replace_norm(module: nn.Module, factory, kinds: tuple[type[nn.Module], ...] = BN_TYPES,
                 where=None) -> list[str]:
    """Swap every normalisation layer of ``kinds`` in ``module`` for ``factory(layer)``, in place.

    The one converter of the library (AdaMixBN, test-batch BN, patch-aware BN, domain-specific BN):
    ``factory`` receives the old layer and returns its replacement, which takes over the old layer's
    state (``load_state_dict`` of the old one, or its tensors), device and dtype. ``where(name, layer)``
    selects the layers to swap by qualified name (default: all). Returns the names swapped, in order."""
    swapped: list[str] = []
    for name, child in list(module.named_modules()):
        for attr, layer in list(child.named_children()):
            full = f"{name}.{attr}" if name else attr
            if isinstance(layer, kinds) and (where is None or where(full, layer)):
                new = factory(layer)
                ref = next(iter(layer.parameters()), None)
                if ref is None:
                    ref = next(iter(layer.buffers()), None)
                if ref is not None:
                    new = new.to(ref.device)
                    if ref.is_floating_point():
                        new = new.to(ref.dtype)
                new.train(layer.training)
                setattr(child, attr, new)
                swapped.append(full)
    return swapped


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """``modules`` in eval mode inside the block (BatchNorm reads its running statistics and records nothing,
    no dropout), then every sub-module's own mode restored: a student's forward during a data-free
    synthesis step, the other generator of a pair."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode

"""Stage names for networks that do not declare them (timm, torchvision, a user's module).

Zoo networks name their stages (``stage_names``: ``stem``, ``layer1`` ..); feature-based methods tap
those by name (:mod:`mentor.models.stages`). :func:`discover_stages` finds the same thing in any
convolutional network, so those methods can tap it too:

1. a timm network's ``feature_info`` (the modules timm's ``features_only`` returns), where present;
2. otherwise one dry forward pass on a zero image of the given shape, recording the spatial size of every
   sub-module's output. Walking from the top-level children in the order they run (and into any child
   whose own children produce maps of several sizes, such as a VGG's or MobileNet's ``features``), the
   maps are grouped by spatial size; a stage is the last module of each group, i.e. the last feature map
   at each resolution, up to the global pooling. For a torchvision ResNet that is ``relu`` (the stem's
   end, 1/2 resolution), ``layer1`` .. ``layer4``; for timm's ResNet ``act1``, ``layer1`` .. ``layer4``.

The first stage plays the zoo's ``stem`` (methods that skip it skip this one). A module called more than
once in a forward pass (a shared activation) is never a stage: a tap on it would record its last call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .ecosystem import timm_stage_names

_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)


def discover_stages(model: nn.Module, input_shape: Sequence[int]) -> tuple[str, ...]:
    """The names (as in ``named_modules``) of ``model``'s stages, for inputs of ``input_shape`` ``(C, H, W)``.

    Returns ``()`` when none are found (no 2-D feature maps, or the forward pass fails on a zero image).
    Leaves the model's parameters, buffers, mode and the global random state as they were."""
    names = timm_stage_names(model)
    if names:
        return names
    calls = _record_calls(model, tuple(input_shape))
    if calls is None:
        return ()
    order, sizes, counts = calls
    modules = dict(model.named_modules())

    def trunk(parent: str) -> list[tuple[str, tuple[int, int]]]:
        out: list[tuple[str, tuple[int, int]]] = []
        for name in order:
            if name.rpartition(".")[0] != parent:
                continue
            if isinstance(modules[name], _GLOBAL_POOLS):
                break  # the features end where global pooling starts
            size = sizes.get(name)
            if size is None:
                continue
            inner = trunk(name)
            out.extend(inner if len({s for _, s in inner}) > 1 else [(name, size)])
        return out

    stages: list[str] = []
    groups: list[list[str]] = []
    last_size = None
    for name, size in trunk(""):
        if size != last_size:
            groups.append([])
            last_size = size
        groups[-1].append(name)
    for group in groups:
        single = [n for n in group if counts[n] == 1]
        if single:
            stages.append(single[-1])
    return tuple(stages)


def attach_stages(model: nn.Module, input_shape: Sequence[int]) -> nn.Module:
    """Set ``model.stage_names`` from :func:`discover_stages` when the model declares none and some are
    found; returns ``model``."""
    if not getattr(model, "stage_names", None):
        names = discover_stages(model, input_shape)
        if names:
            model.stage_names = names
    return model


def _record_calls(model: nn.Module, shape: tuple[int, ...]):
    """(sub-module names in the order their calls end, first call first; the spatial size of each one's 4-D
    output; how often each was called) for one forward pass on zeros, or None when it fails."""
    order: list[str] = []
    sizes: dict[str, tuple[int, int] | None] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            counts[name] = counts.get(name, 0) + 1
            if counts[name] == 1:
                order.append(name)
                sizes[name] = tuple(output.shape[-2:]) if isinstance(output, torch.Tensor) and output.dim() == 4 \
                    else None

        return hook

    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if n]
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            model(torch.zeros(2, *shape, device=device, dtype=dtype))
    except Exception:  # a network that cannot run on this shape: no stages, nothing else breaks
        return None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return order, sizes, counts


__all__ = ["attach_stages", "discover_stages"]

"""Networks written by ``mentor export``, read back: :func:`load_exported` and :func:`evaluate_exported`.

Every exported file has a sidecar ``<file>.json`` (see :mod:`mentor.export`) that says its format, the
network's architecture (``info``, which :func:`~mentor.engine.deployable.build_deployable` rebuilds), the
input it expects and the recipe of the run it came from. ``mentor eval FILE`` evaluates such a file on the
validation and test splits of the dataset the recipe names, as it evaluates a run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ExportError

FORMATS = ("safetensors", "onnx", "torchscript", "torch")
EXPORTED_SUFFIXES = (".safetensors", ".onnx", ".ts")  # files that are never checkpoints: they need a sidecar
INSTALL = "pip install 'mentor[export]'"


def sidecar_path(file: str | Path) -> Path:
    """The sidecar of an exported file: ``<file>.json`` beside it."""
    file = Path(file)
    return file.with_name(file.name + ".json")


def read_sidecar(file: str | Path) -> dict[str, Any] | None:
    """The sidecar of ``file`` when it is one ``mentor export`` wrote, else None."""
    side = sidecar_path(file)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{side} cannot be read as JSON ({e}); export the network again (mentor export RUN)"
                          ) from None
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS or "info" not in meta:
        return None
    return meta


def require(module: str, what: str):
    """Import an optional package, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{what} needs the package {module.split('.')[0]!r}, which is not installed: "
                          f"{INSTALL}") from None


class OnnxNet:
    """An ONNX file run by onnxruntime on the host, called like a network: ``net(x) -> logits`` (torch)."""

    def __init__(self, path: str | Path):
        ort = require("onnxruntime", "running an ONNX network")
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {self.input: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def load_exported(file: str | Path, meta: dict[str, Any] | None = None) -> Callable[[Tensor], Tensor]:
    """The network in an exported file, ready to call on normalised images ``[N, C, H, W]`` (eval mode)."""
    file = Path(file)
    meta = meta if meta is not None else read_sidecar(file)
    if meta is None:
        raise ExportError(f"{file} has no sidecar {sidecar_path(file).name} written by mentor export; keep the "
                          "two files together (or export again: mentor export RUN)")
    fmt = meta["format"]
    if fmt == "onnx":
        return OnnxNet(file)
    if fmt == "torchscript":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript for torch.export
            return torch.jit.load(str(file), map_location="cpu").eval()
    from .checkpoint import load_weights
    from .deployable import build_deployable

    if fmt == "safetensors":
        weights = require("safetensors.torch", "reading a safetensors file").load_file(str(file))
    else:
        from . import checkpoint as ckpt

        weights = ckpt.load(file)["model"]
    net = build_deployable(meta["info"])
    load_weights(net, weights, file, f"the {meta['info']['model']} network its sidecar describes")
    return net.requires_grad_(False).eval()


def _splits(meta: dict[str, Any]):
    """The validation and test splits of the dataset the sidecar's recipe names (a data-free run: the
    dataset its network was evaluated on)."""
    from ..config import build_config
    from ..methods import METHODS
    from .inputs import data_free_splits, load_splits

    cfg = build_config(meta["recipe"])
    if METHODS.get(cfg.method.name).inputs.data:
        return cfg, load_splits(cfg.data)
    return cfg, data_free_splits(cfg.data, {"dataset": meta["info"]["dataset"]})


@torch.no_grad()
def evaluate_exported(file: str | Path, meta: dict[str, Any] | None = None, device: str = "auto") -> dict[str, Any]:
    """Top-1 accuracy of an exported network on the validation and test splits its sidecar's recipe names
    (``val_acc``, ``test_acc``; ``test_acc@<domain>`` for several test domains), normalised with the
    sidecar's mean and std. ONNX files run on the host with onnxruntime."""
    from .evaluate import Evaluator
    from .trainer import resolve_device

    meta = meta if meta is not None else read_sidecar(file)
    if meta is None:
        raise ExportError(f"{file} has no sidecar written by mentor export")
    if not meta.get("recipe"):
        raise ExportError(f"the sidecar of {file} holds no recipe, so the data to evaluate on is unknown; export "
                          "from the run directory (which holds config.yaml)")
    dev = torch.device("cpu") if meta["format"] == "onnx" else resolve_device(device)
    net = load_exported(file, meta)
    if isinstance(net, torch.nn.Module):
        net = net.to(dev)
    cfg, splits = _splits(meta)
    c = len(meta["input"]["mean"])
    mean = torch.tensor(meta["input"]["mean"], dtype=torch.float32, device=dev).view(1, c, 1, 1)
    std = torch.tensor(meta["input"]["std"], dtype=torch.float32, device=dev).view(1, c, 1, 1)
    ev = Evaluator(mean, std, cfg.data.eval_batch_size, dev)
    out: dict[str, Any] = {"checkpoint": str(file), "format": meta["format"], "val_acc": ev.accuracy(net, splits.val)}
    for name, split in splits.test_splits().items():
        out["test_acc" if name == "test" else f"test_acc@{name}"] = ev.accuracy(net, split)
    out["source_test_acc"] = meta.get("test_acc")
    return out


__all__ = ["EXPORTED_SUFFIXES", "FORMATS", "ExportError", "OnnxNet", "evaluate_exported", "load_exported",
           "read_sidecar", "sidecar_path"]

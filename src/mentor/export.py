"""``mentor export``: a run's deployable network as a file people can ship, with a sidecar that describes it.

``mentor export RUN --format safetensors|onnx|torchscript|torch [--out FILE] [--ema] [--checkpoint best|last]``

``RUN`` is a ``mentor train`` run directory (``best.pt``, else ``last.pt``), a checkpoint file, or a
``mentor adapt`` directory run with ``--save-model`` (its ``adapted.pt``). The network is the run's
``deployable()`` (the student, or SimKD's student + projector + reused teacher head, ...), rebuilt from the
checkpoint's info (:func:`mentor.engine.deployable.build_deployable`), in eval mode, on the host.

Formats:

- ``safetensors``: the network's ``state_dict``; it loads into ``build_deployable(sidecar["info"])`` (for a
  bare student that is ``create_model(model, num_classes=..., in_channels=..., **kwargs)``).
- ``torch``: the same weights with the info, as a mentor checkpoint (``{"model", "info"}``, read with
  ``torch.load(..., weights_only=True)``); it can serve as ``method.teacher`` or ``model.init_from``.
- ``torchscript``: ``torch.jit.script`` of the network, or ``torch.jit.trace`` where scripting fails (the
  sidecar says which, and why); load with ``torch.jit.load``.
- ``onnx``: ``torch.onnx.export`` with a dynamic batch axis (input ``input``, output ``logits``), through the
  TorchScript-based exporter, or the dynamo exporter where that one fails (the sidecar says which).

Every file is checked right after it is written, before it replaces anything: read back (onnxruntime for
ONNX) and run on a batch whose size differs from the export's example, its outputs compared with the
PyTorch network's (``atol = 1e-4 * max(1, max |logit|)``); the result is in the sidecar. A failed check
writes nothing.

The sidecar ``<FILE>.json`` holds: the format, the classes, the input shape ``[C, H, W]`` and the
normalisation the network expects (it does **not** normalise: feed ``(x - mean) / std`` of images scaled
to ``[0, 1]``), the checkpoint's ``info`` (architecture and deployable spec), the run's resolved recipe,
its test accuracy from ``summary.json``, the mentor and torch versions and the check. ``mentor eval FILE``
evaluates an exported file on the dataset its recipe names.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .engine import checkpoint as ckpt
from .engine.deployable import Deployable, build_deployable, load_deployable
from .engine.exported import FORMATS, ExportError, evaluate_exported, load_exported, require, sidecar_path
from .fileio import atomic_write_text, fsync_dir

SUFFIX = {"safetensors": ".safetensors", "onnx": ".onnx", "torchscript": ".ts", "torch": ".pt"}
CHECK_BATCH = 3  # the batch the checks run; the export's example batch is EXAMPLE_BATCH (dynamic axes differ)
EXAMPLE_BATCH = 2
OPSET = 17


def _needs(fmt: str) -> None:
    """Fail before reading anything when the format's optional package is missing."""
    if fmt == "safetensors":
        require("safetensors.torch", "--format safetensors")
    elif fmt == "onnx":
        require("onnx", "--format onnx")
        require("onnxruntime", "checking an ONNX export")


def _default_out(dep: Deployable, fmt: str) -> Path:
    tags = [dep.info["model"].replace(":", "_").replace("/", "_")]
    if dep.weights == "ema":
        tags.append("ema")
    if dep.file.name != "best.pt":
        tags.append(dep.file.stem)
    return (dep.run_dir or dep.file.parent) / "export" / ("-".join(tags) + SUFFIX[fmt])


def _stats(info: dict[str, Any]) -> tuple[list[float], list[float]]:
    if info.get("mean"):
        return [float(v) for v in info["mean"]], [float(v) for v in info["std"]]
    from .data import get_source  # runs written before the checkpoint kept them: the dataset's constants

    src = get_source(info["dataset"])
    return list(src.mean), list(src.std)


def _recipe(dep: Deployable) -> dict[str, Any] | None:
    """The resolved recipe of the run (for an adapted network, its source run's)."""
    import yaml

    folders = [dep.run_dir] if dep.run_dir is not None else []
    if dep.extra.get("adapted"):
        folders = [Path(dep.extra["adapted"]["source_checkpoint"]).parent]
    for folder in folders:
        if (folder / "config.yaml").is_file():
            recipe = yaml.safe_load((folder / "config.yaml").read_text())
            recipe.pop("provenance", None)
            return recipe
    return None


def _test_acc(dep: Deployable) -> tuple[str | None, float | None]:
    """The run's test accuracy of the exported weights (summary.json), and its key."""
    if dep.run_dir is None or not (dep.run_dir / "summary.json").is_file() or dep.file.stem not in ("best", "last"):
        return None, None
    summary = json.loads((dep.run_dir / "summary.json").read_text())
    from .methods import METHODS

    name = dep.info.get("method", "")
    selects_ema = name in METHODS and METHODS.get(name).select[0].endswith("_ema")
    ema = "_ema" if dep.weights == "ema" and not (selects_ema and dep.file.stem == "best") else ""
    key = f"test_acc{ema}_{dep.file.stem}"
    return key, summary.get(key)


def _tolerance(ref: Tensor) -> float:
    return 1e-4 * max(1.0, float(ref.abs().max()))


def _compare(ref: Tensor, got: Tensor, what: str) -> dict[str, Any]:
    diff = float((ref.float() - got.float()).abs().max())
    atol = _tolerance(ref)
    check = {"what": what, "batch": int(ref.shape[0]), "max_abs_diff": diff, "atol": atol, "ok": diff <= atol}
    if not check["ok"]:
        raise ExportError(f"the exported network ({what}) gives outputs up to {diff:.3g} away from the PyTorch "
                          f"network's on a batch of {ref.shape[0]} (tolerance {atol:.3g}); nothing was written. "
                          "Export another format (safetensors always round-trips)")
    return check


def _batches(info: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """A fixed example batch (the export's) and a check batch of another size, like normalised images."""
    g = torch.Generator().manual_seed(0)
    shape = (info["in_channels"], info["image_size"], info["image_size"])
    return torch.randn(EXAMPLE_BATCH, *shape, generator=g), torch.randn(CHECK_BATCH, *shape, generator=g)


def _tensors(net: nn.Module) -> dict[str, Tensor]:
    # safetensors refuses tensors that share memory; every entry gets its own contiguous copy
    return {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}


def _rebuilt(info: dict[str, Any], weights: dict[str, Tensor], tmp: Path) -> nn.Module:
    """The network :func:`build_deployable` makes of ``info``, with the written weights."""
    fresh = build_deployable(info)
    try:
        ckpt.load_weights(fresh, weights, tmp, "the network rebuilt from the checkpoint's info")
    except ckpt.CheckpointError as e:
        raise ExportError(f"the {info.get('method')} run's network is not the one its checkpoint's info describes "
                          f"({e}), so a weights file could not be loaded again; export torchscript or onnx, which "
                          "carry the network's graph") from None
    return fresh.eval()


def _write_safetensors(net: nn.Module, info: dict[str, Any], tmp: Path, x: Tensor, ref: Tensor) -> dict[str, Any]:
    st = require("safetensors.torch", "--format safetensors")
    st.save_file(_tensors(net), str(tmp), metadata={"mentor_info": json.dumps(info)})
    fresh = _rebuilt(info, st.load_file(str(tmp)), tmp)
    with torch.no_grad():
        return {"check": _compare(ref, fresh(x), "safetensors loaded into build_deployable(info)")}


def _write_torch(net: nn.Module, info: dict[str, Any], tmp: Path, x: Tensor, ref: Tensor) -> dict[str, Any]:
    ckpt.atomic_save({"model": net.state_dict(), "info": info}, tmp)
    fresh = _rebuilt(info, ckpt.load(tmp)["model"], tmp)
    with torch.no_grad():
        return {"check": _compare(ref, fresh(x), "torch checkpoint loaded into build_deployable(info)")}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _write_torchscript(net: nn.Module, info: dict[str, Any], tmp: Path, x: Tensor, ref: Tensor) -> dict[str, Any]:
    example, _ = _batches(info)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module, how = torch.jit.script(net), {"mode": "script"}
        except Exception as e:  # a network TorchScript cannot compile (context managers, dynamic lookups, ...)
            module = torch.jit.trace(net, example, check_trace=False)
            how = {"mode": "trace", "why": f"torch.jit.script failed ({_first_line(e)}); traced on a batch of "
                   f"{EXAMPLE_BATCH}: the graph follows that forward, with no data-dependent branches"}
        torch.jit.save(module, str(tmp))
        loaded = torch.jit.load(str(tmp), map_location="cpu").eval()
        with torch.no_grad():
            check = _compare(ref, loaded(x), f"torch.jit.load ({how['mode']})")
    return {"torchscript": how, "check": check}


@contextlib.contextmanager
def _silenced():
    """Standard output and error (the file descriptors) sent to the null device: the TorchScript-based ONNX
    exporter prints the whole graph when it meets an operator it lacks, and the dynamo exporter is tried next."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def _onnx_legacy(net: nn.Module, example: Tensor, tmp: Path) -> None:
    with _silenced():
        torch.onnx.export(net, (example,), str(tmp), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET)


def _onnx_dynamo(net: nn.Module, example: Tensor, tmp: Path) -> None:
    require("onnxscript", "the dynamo ONNX exporter")
    program = torch.onnx.export(net, (example,), dynamo=True, input_names=["input"], output_names=["logits"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    program.save(str(tmp))


def _write_onnx(net: nn.Module, info: dict[str, Any], tmp: Path, x: Tensor, ref: Tensor) -> dict[str, Any]:
    import logging

    onnx = require("onnx", "--format onnx")
    example, _ = _batches(info)
    how: dict[str, Any] = {"opset": OPSET}
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _onnx_legacy(net, example, tmp)
                how["exporter"] = "torchscript"
            except Exception as e:  # an operator the TorchScript-based exporter lacks (rfft2, adaptive pooling)
                tmp.unlink(missing_ok=True)
                try:
                    _onnx_dynamo(net, example, tmp)
                except ExportError:
                    raise
                except Exception as e2:
                    raise ExportError(f"torch.onnx.export cannot export this {info['model']} network: the "
                                      f"TorchScript-based exporter says {_first_line(e)}; the dynamo exporter says "
                                      f"{_first_line(e2)}. Export safetensors or torchscript instead") from None
                how.update(exporter="dynamo", why=f"the TorchScript-based exporter failed ({_first_line(e)})")
    finally:
        quiet.setLevel(level)
    onnx.checker.check_model(str(tmp))
    from .engine.exported import OnnxNet

    with torch.no_grad():
        check = _compare(ref, OnnxNet(tmp)(x), "onnxruntime (CPUExecutionProvider)")
    versions = {"onnx": onnx.__version__, "onnxruntime": require("onnxruntime", "checking an ONNX export").__version__}
    return {"onnx": how, "check": check, "versions": versions}


WRITERS = {"safetensors": _write_safetensors, "torch": _write_torch, "torchscript": _write_torchscript,
           "onnx": _write_onnx}


def export_run(run: str | Path, fmt: str, out: str | Path | None = None, ema: bool = False,
               checkpoint: str | None = None) -> dict[str, Any]:
    """Write the deployable network of ``run`` in format ``fmt`` to ``out`` (default
    ``<run>/export/<model>.<ext>``) and its sidecar ``<out>.json``; returns the sidecar's content and
    ``path`` (the file written).

    Raises :class:`~mentor.errors.ExportError` (or a :class:`~mentor.errors.CheckpointError`) for an unknown
    format, a missing optional package, a run without a checkpoint or a failed check; nothing is written then.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    _needs(fmt)
    dep = load_deployable(run, checkpoint, ema)
    net, info = dep.net.cpu().eval(), dict(dep.info)
    from .methods import METHODS

    if info.get("method") in METHODS and not METHODS.get(info["method"]).classifier:
        raise ExportError(f"{dep.file} holds the network of a {info['method']} run ({info['model']}), which is not a "
                          "classifier net(x) -> logits; mentor export ships classifiers (sample a diffusion run with "
                          "mentor sample)")
    target = Path(out).expanduser() if out is not None else _default_out(dep, fmt)
    if target.is_dir():
        target = target / _default_out(dep, fmt).name
    _, x = _batches(info)
    with torch.no_grad():
        ref = net(x)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        result = WRITERS[fmt](net, info, tmp, x, ref)
        meta = _sidecar(dep, fmt, target, info, result)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)
    atomic_write_text(sidecar_path(target), json.dumps(meta, indent=2) + "\n")
    return {**meta, "path": str(target)}


def export_text(meta: dict[str, Any]) -> str:
    """What ``mentor export`` prints: the files written, how, and the check."""
    path = meta.get("path", meta["file"])
    how = meta.get("onnx", {}).get("exporter") or meta.get("torchscript", {}).get("mode")
    lines = [f"wrote {path} ({meta['format']}{f', {how}' if how else ''}) and its sidecar {Path(path).name}.json"]
    for part in ("torchscript", "onnx"):
        if meta.get(part, {}).get("why"):
            lines.append(f"  note: {meta[part]['why']}")
    c = meta["check"]
    lines.append(f"  check: {c['what']} on a batch of {c['batch']}: max |diff| {c['max_abs_diff']:.3g} <= atol "
                 f"{c['atol']:.3g}: {'ok' if c['ok'] else 'FAILED'}")
    lines.append(f"  input: {'x'.join(str(v) for v in meta['input']['shape'])} float32, normalised with mean "
                 f"{meta['input']['mean']} and std {meta['input']['std']} (the network does not normalise)")
    if meta.get("test_acc") is not None:
        lines.append(f"  {meta['test_acc_key']}: {meta['test_acc']:.4f} (the run's summary.json)")
    return "\n".join(lines)


def _sidecar(dep: Deployable, fmt: str, target: Path, info: dict[str, Any], result: dict[str, Any]
             ) -> dict[str, Any]:
    mean, std = _stats(info)
    key, acc = _test_acc(dep)
    spec = info.get("deployable")
    meta: dict[str, Any] = {
        "format": fmt,
        "file": target.name,
        "model": info["model"],
        "kwargs": dict(info.get("kwargs") or {}),
        "num_classes": info["num_classes"],
        "classes": list(info.get("classes") or []),
        "input": {"shape": [info["in_channels"], info["image_size"], info["image_size"]], "dtype": "float32",
                  "layout": "NCHW", "normalized": True, "mean": mean, "std": std,
                  "expects": "images scaled to [0, 1], then (x - mean) / std per channel: the network does not "
                             "normalise its input"},
        "output": "scores [N, num_classes] (logits); the argmax indexes classes",
        "deployable": spec,
        "rebuild": ("mentor.engine.deployable.build_deployable(sidecar['info'])" if spec else
                    "mentor.models.create_model(model, num_classes=num_classes, in_channels=input.shape[0], "
                    "**kwargs)"),
        "info": info,
        "dataset": info.get("dataset"),
        "recipe": _recipe(dep),
        "test_acc": acc,
        "test_acc_key": key,
        "source": {"run": str(dep.run_dir) if dep.run_dir else None, "checkpoint": str(dep.file),
                   "weights": dep.weights, "step": dep.step, "rebuilt_from": dep.rebuilt},
        "versions": {"mentor": __version__, "torch": str(torch.__version__), **result.pop("versions", {})},
        **result,
    }
    if fmt == "safetensors":
        meta["versions"]["safetensors"] = require("safetensors", "--format safetensors").__version__
    if dep.extra.get("adapted"):
        meta["adapted"] = dep.extra["adapted"]
    return meta


__all__ = ["FORMATS", "ExportError", "build_deployable", "evaluate_exported", "export_run", "export_text",
           "load_deployable", "load_exported"]

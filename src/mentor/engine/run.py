"""Working with finished run directories: rebuild the method from ``config.yaml`` and evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError, load_config
from ..methods import METHODS
from . import checkpoint as ckpt
from .evaluate import Evaluator
from .inputs import TrainInputs, stat_tensors
from .trainer import autocast_for, build_method, resolve_device, source_splits


def _locate(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint file) from either of them."""
    file = ckpt.find_checkpoint(path, "run")
    return file.parent, file


def load_run(path: str | Path, device: str = "auto"):
    """(config, method with the checkpoint's weights, splits) of a run directory or checkpoint."""
    run_dir, file = _locate(path)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir / 'config.yaml'} not found: the checkpoint needs its run's config.yaml")
    # The run may have trained on a GPU this machine lacks: the device is this call's, not the recipe's.
    cfg = load_config(run_dir / "config.yaml", ["trainer.device=cpu", "trainer.cuda_graph=false"])
    dev = resolve_device(device)
    splits = source_splits(cfg, METHODS.get(cfg.method.name))
    method = build_method(cfg, splits, dev, steps_per_epoch=1)
    method.to(dev)
    # Connectors are sized by a dry run, so the method must see a batch before its weights load.
    inputs = TrainInputs(splits, cfg.data, type(method).inputs, cfg.trainer.seed, 0, 1, dev)
    batch = inputs(0)
    batch.pop("_u_y", None)
    method.setup(batch)
    method.to(dev)
    state = ckpt.load(file, map_location=dev)
    if "method" in state:
        method.load_trained_state(state["method"], str(file))
    elif "model" in state:
        # best.pt: the weights the run selected on (its EMA copy for a method that selects on "<key>_ema")
        use_ema = type(method).select[0].endswith("_ema") and state.get("ema") is not None
        ckpt.load_weights(method.deployable(), state["ema"] if use_ema else state["model"], file,
                          f"the network of {cfg.method.name} ({cfg.model.name})")
    else:
        raise ckpt.CheckpointError(f"{file} holds neither 'method' nor 'model' weights")
    method.eval()
    method._checkpoint_ema = state.get("ema")  # the EMA copy's weights, when the run kept one
    return cfg, method, splits, file, state.get("step")


def ema_network(method) -> Any:
    """The deployable network with the EMA weights of the loaded checkpoint, or None without them
    (``last.pt`` stores the EMA module's state, ``best.pt`` its network's)."""
    state = getattr(method, "_checkpoint_ema", None)
    if state is None:
        return None
    import copy

    net = copy.deepcopy(method.deployable())
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    net.load_state_dict(state)
    return net.eval()


def evaluate_run(path: str | Path, device: str = "auto") -> dict[str, Any]:
    """The method's validation and test numbers (accuracy for classifiers) of a run's checkpoint
    (best.pt by default), or the accuracy of a file written by ``mentor export`` (its sidecar says the data)."""
    from .exported import EXPORTED_SUFFIXES, evaluate_exported, read_sidecar

    if Path(path).is_file():
        meta = read_sidecar(path)
        if meta is not None or Path(path).suffix in EXPORTED_SUFFIXES:
            return evaluate_exported(path, meta, device)
    cfg, method, splits, file, step = load_run(path, device)
    dev = resolve_device(device)
    mean, std = stat_tensors(splits.reference, dev)
    ev = Evaluator(mean, std, cfg.data.eval_batch_size, dev, autocast=autocast_for(dev, cfg.trainer.precision))
    out: dict[str, Any] = {"checkpoint": str(file), "step": step}
    named = [("val", splits.val)] + [("test" if name == "test" else f"test@{name}", split)
                                     for name, split in splits.test_splits().items()]
    ema = ema_network(method)
    for prefix, split in named:
        base, at, name = prefix.partition("@")
        out.update({f"{base}_{k}{at}{name}": v for k, v in method.score(method.deployable(), split, ev).items()})
        if ema is not None:
            out.update({f"{base}_{k}_ema{at}{name}": v for k, v in method.score(ema, split, ev).items()})
    out["params"] = sum(p.numel() for p in method.deployable().parameters())
    return out

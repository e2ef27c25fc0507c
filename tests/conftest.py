import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _fashion_mnist_dirs():
    env = os.environ.get("MENTOR_DATA")
    if env:
        yield Path(env) / "fashion_mnist"
        yield Path(env)
    yield Path.home() / ".cache" / "mentor" / "fashion_mnist"
    yield Path("/usr/share/datasets/fashion-mnist")


HAVE_FMNIST = any((d / "train-images-idx3-ubyte.gz").is_file() for d in _fashion_mnist_dirs())

needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST, reason="Fashion-MNIST not installed (make data / apt-get install dataset-fashion-mnist)")


# Fashion-MNIST subset used by the distillation tests: teachers train for a few seconds on 2 cores.
FMNIST_SMALL = ["data.name=fashion_mnist", "data.val_size=500", "data.subset=2000", "data.batch_size=64",
                "data.padding=2", "trainer.eval_every=30", "trainer.ckpt_every=30", "trainer.log_every=10",
                "trainer.progress=false", "optim.lr=0.1"]


def _train_teacher(out, model, steps=60):
    from mentor.config import load_config
    from mentor.engine import train

    train(load_config(None, [f"out_dir={out}", *FMNIST_SMALL, f"model.name={model}", f"trainer.max_steps={steps}"]))
    return out


@pytest.fixture(scope="session")
def fmnist_teachers(tmp_path_factory):
    """Run directories of three small teachers (resnet14, wrn_16_1, resnet8) trained on a Fashion-MNIST
    subset; distillation tests pass them as method.teacher / method.teachers."""
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST not installed")
    base = tmp_path_factory.mktemp("teachers")
    return [str(_train_teacher(base / m, m)) for m in ("resnet14", "wrn_16_1", "resnet8")]


@pytest.fixture
def distill_overrides(tmp_path):
    """Overrides for a short distillation run on the Fashion-MNIST subset (student resnet8)."""
    return [f"out_dir={tmp_path / 'student'}", *FMNIST_SMALL, "model.name=resnet8", "trainer.max_steps=40",
            "trainer.eval_every=20", "trainer.ckpt_every=20"]

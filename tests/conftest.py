import dataclasses
import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: a spinning thread on a core another process needs slows
# both by an order of magnitude (must be set before torch starts its thread pool).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from _datafree import digits_teacher  # noqa: E402, F401  (one session teacher for every data-free test module)

# One intra-op thread by default: the tests' networks and batches are small, and on a shared 2-core
# machine a second thread costs more in waiting than it gains. MENTOR_TEST_THREADS=2 on an idle machine.
torch.set_num_threads(max(1, int(os.environ.get("MENTOR_TEST_THREADS", "1"))))


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


def _train_teacher(out, model, steps=60, splits=None):
    from mentor.config import load_config
    from mentor.engine import Trainer

    cfg = load_config(None, [f"out_dir={out}", *FMNIST_SMALL, f"model.name={model}", f"trainer.max_steps={steps}"])
    Trainer(cfg, splits=splits).fit()
    return out


TEACHER_MODELS = ("resnet14", "wrn_16_1", "resnet8")


@pytest.fixture(scope="session")
def fmnist_teachers(tmp_path_factory):
    """Run directories of three small teachers (resnet14, wrn_16_1, resnet8) trained on a Fashion-MNIST
    subset (minutes on 2 cores: for the slow tests); distillation tests pass them as method.teacher /
    method.teachers."""
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST not installed")
    base = tmp_path_factory.mktemp("teachers")
    return [str(_train_teacher(base / m, m)) for m in TEACHER_MODELS]


@pytest.fixture(scope="session")
def fmnist_tiny():
    """Fashion-MNIST splits small enough that a run costs seconds: a stratified subset of 256 training
    images, 64 validation and the first 64 test images (evaluating the full test set would dominate)."""
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST not installed")
    from mentor.config import load_config
    from mentor.engine.inputs import load_splits

    splits = load_splits(load_config(None, [*FMNIST_SMALL, "data.subset=256", "data.val_size=64"]).data)
    return dataclasses.replace(splits, test=splits.test.subset(torch.arange(64)))


@pytest.fixture(scope="session")
def fast_teachers(tmp_path_factory, fmnist_tiny):
    """Run directories of the same three architectures as ``fmnist_teachers``, trained for a few steps on
    ``fmnist_tiny``: real checkpoints in seconds, for the fast tests of loading, connectors, losses and
    resuming (not of what a good teacher teaches)."""
    base = tmp_path_factory.mktemp("fast_teachers")
    return [str(_train_teacher(base / m, m, steps=8, splits=fmnist_tiny)) for m in TEACHER_MODELS]


@pytest.fixture
def distill_overrides(tmp_path):
    """Overrides for a short distillation run on the Fashion-MNIST subset (student resnet8)."""
    return [f"out_dir={tmp_path / 'student'}", *FMNIST_SMALL, "model.name=resnet8", "trainer.max_steps=40",
            "trainer.eval_every=20", "trainer.ckpt_every=20"]


@torch.no_grad()
def split_accuracy(net, split, like) -> float:
    """Top-1 accuracy of ``net`` on the uint8 ``split``, normalised with the statistics of ``like`` (the
    run's training split), in one batch: the reference for the accuracy a run reports."""
    mean = torch.tensor(like.mean).view(1, -1, 1, 1)
    std = torch.tensor(like.std).view(1, -1, 1, 1)
    x = (split.images.float() / 255.0 - mean) / std
    return (net(x).argmax(1) == split.labels).float().mean().item()

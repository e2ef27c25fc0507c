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

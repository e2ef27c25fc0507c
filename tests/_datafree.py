"""Shared by the data-free tests: a small BN teacher trained on the 8x8 digits (once per session) and the
recipe of a few data-free steps distilling it into a ResNet-8."""

from __future__ import annotations

import pytest

from mentor.config import load_config

TEACHER = ["method.name=supervised", "model.name=resnet8", "data.name=digits", "data.val_size=200",
           "data.batch_size=64", "data.padding=1", "data.flip=false", "optim.lr=0.05", "trainer.max_steps=120",
           "trainer.eval_every=120", "trainer.ckpt_every=120", "trainer.log_every=60", "trainer.progress=false"]

# A run of a few steps: small synthetic batches, crops of 1 pixel without flips (digits), reporting on the
# real digits' validation split.
DF_RUN = ["model.name=resnet8", "data.name=digits", "data.val_size=200", "method.batch_size=16", "method.padding=1",
          "method.flip=false", "method.nz=16", "method.ngf=8", "optim.lr=0.05", "trainer.eval_every=4",
          "trainer.ckpt_every=4", "trainer.log_every=2", "trainer.progress=false"]


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """The run directory of a ResNet-8 trained on the digits for 120 steps (about 90% accuracy)."""
    from mentor.engine.trainer import train

    out = tmp_path_factory.mktemp("datafree_teacher") / "run"
    train(load_config(None, [f"out_dir={out}", *TEACHER]))
    return out


def df_cfg(tmp_path, name: str, method: str, teacher, *extra: str):
    """The recipe of a short data-free run of ``method`` distilling ``teacher`` into ``tmp_path / name``."""
    return load_config(None, [f"out_dir={tmp_path / name}", f"method.name={method}", f"method.teacher={teacher}",
                              *DF_RUN, *extra])

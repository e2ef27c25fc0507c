"""Shared by the domain-generalisation tests: three domains made from the 8x8 digits (as they are,
inverted, rolled by two pixels) and a recipe of a few steps on them with a small BN network."""

from __future__ import annotations

import torch
from _helpers import BNNet  # noqa: F401  (registers test_bncnn)
from _helpers import resumes_bitwise as resumes_bitwise

from mentor.config import load_config
from mentor.data import ArrayDataset, load_dataset
from mentor.data.domains import DOMAIN_SETS, DomainSet, register_domains


def _digit_domains(root=None, **_):
    """Three domains made from the digits: as they are, inverted, and rolled by two pixels."""
    ds = load_dataset("digits", "train")
    n = len(ds) // 3

    def part(images, sl):
        return ArrayDataset(images[sl].contiguous(), ds.labels[sl], 10, "digits", ds.classes, ds.mean, ds.std)

    return DomainSet("test_digit_domains", {
        "plain": part(ds.images, slice(0, n)),
        "inverted": part(255 - ds.images, slice(n, 2 * n)),
        "rolled": part(torch.roll(ds.images, 2, dims=3), slice(2 * n, 3 * n)),
    })


if "test_digit_domains" not in DOMAIN_SETS:
    register_domains("test_digit_domains")(_digit_domains)

# Two training domains (plain, inverted), "rolled" held out; 8 images per domain per step.
DG_RUN = ["data.name=test_digit_domains", "data.test_domains=[rolled]", "data.batch_size=8", "data.augment=none",
          "model.name=test_bncnn", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.ckpt_every=2",
          "trainer.log_every=1", "trainer.progress=false", "optim.lr=0.05"]


def dg_cfg(tmp_path, name: str, method: str, *extra: str):
    """The recipe of a 4-step DG run of ``method`` into ``tmp_path / name``."""
    return load_config(None, [f"out_dir={tmp_path / name}", f"method.name={method}", *DG_RUN, *extra])


